"""Shard integrity: the sizes and hashes the converter records and `check_shards` checks."""

import hashlib
import os
import pathlib
import json
import re
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from ssast_jax.data import ShardedFeatures, check_shards, convert as convert_lib, shards

F = 8


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  """A float32 conversion of 5 clips in 3 shards; returns (out dir, json path, pt dir)."""
  root = tmp_path_factory.mktemp('integrity')
  rng = np.random.default_rng(0)
  pt_dir = root / 'pt'
  pt_dir.mkdir()
  entries = []
  for i in range(5):
    torch.save(torch.from_numpy(rng.standard_normal((20 + i, F)).astype(np.float32)),
               pt_dir / f'clip{i}.pt')
    entries.append({'wav': f'/audio/clip{i}.wav', 'labels': '/m/a'})
  json_path = root / 'data.json'
  json_path.write_text(json.dumps({'data': entries}))
  out = root / 'out'
  convert_lib.convert(json_path, pt_dir, out, dtype='float32', clips_per_shard=2, workers=1,
                      verbose=False)
  return out, json_path, pt_dir


@pytest.fixture
def shards_dir(converted, tmp_path):
  """A fresh copy of the converted directory, to damage."""
  return shutil.copytree(converted[0], tmp_path / 'shards')


def _rebuild(converted, out) -> str:
  _, json_path, pt_dir = converted
  return (f'python -m ssast_jax.data.convert --json {json_path} --pt-dir {pt_dir} --out {out} '
          '--dtype float32 --clips-per-shard 2 --overwrite')


def _fails(shards_dir, converted, name, problem, verify_content=False):
  """check_shards raises one line naming the file, the problem and the rebuild command."""
  expected = (f'{shards_dir / name}: {problem}; rebuild with: '
              f'{_rebuild(converted, shards_dir)}')
  with pytest.raises(shards.ManifestError) as raised:
    check_shards(shards_dir, verify_content=verify_content)
  assert str(raised.value) == expected and '\n' not in expected


def _cut(path, drop: int) -> int:
  size = path.stat().st_size
  with open(path, 'r+b') as f:
    f.truncate(size - drop)
  return size


def test_manifest_records_every_file_size_and_hash(converted):
  out = converted[0]
  manifest = shards.read_manifest(out)
  assert len(manifest['shards']) == 3
  for row in manifest['shards']:
    for kind in ('frames', 'clips'):
      data = (out / row[kind]).read_bytes()
      assert row[f'{kind}_bytes'] == len(data)
      assert row[f'{kind}_sha256'] == hashlib.sha256(data).hexdigest()
  assert manifest['index_bytes'] == (out / 'index.npy').stat().st_size
  check_shards(out)
  check_shards(out, verify_content=True)


def test_truncated_frames_file_is_named_with_the_rebuild_command(shards_dir, converted):
  size = _cut(shards_dir / 'shard-00001.frames.npy', 10)
  _fails(shards_dir, converted, 'shard-00001.frames.npy',
         f'truncated: {size - 10} of {size} bytes')


def test_corrupted_frames_pass_the_size_check_and_fail_the_content_check(shards_dir, converted):
  path = shards_dir / 'shard-00002.frames.npy'
  data = bytearray(path.read_bytes())
  data[-7] ^= 0xFF
  path.write_bytes(bytes(data))
  check_shards(shards_dir)
  _fails(shards_dir, converted, 'shard-00002.frames.npy', 'content hash mismatch',
         verify_content=True)


def test_missing_clips_file_and_truncated_or_grown_index(shards_dir, converted):
  (shards_dir / 'shard-00000.clips.json').unlink()
  _fails(shards_dir, converted, 'shard-00000.clips.json', 'missing')
  shutil.copy(converted[0] / 'shard-00000.clips.json', shards_dir)
  size = _cut(shards_dir / 'index.npy', 24)
  _fails(shards_dir, converted, 'index.npy', f'truncated: {size - 24} of {size} bytes')
  shutil.copy(converted[0] / 'index.npy', shards_dir)
  with open(shards_dir / 'index.npy', 'ab') as f:
    f.write(b'\0')
  _fails(shards_dir, converted, 'index.npy', f'{size + 1} bytes, expected {size}')


def test_the_rebuild_command_rebuilds(shards_dir, converted):
  _cut(shards_dir / 'shard-00001.frames.npy', 10)
  with pytest.raises(shards.ManifestError) as raised:
    check_shards(shards_dir)
  argv = shlex.split(str(raised.value).partition('rebuild with: ')[2])
  assert argv[:3] == ['python', '-m', 'ssast_jax.data.convert']
  # As a user runs it, in its own process (the CLI forks its workers, unsafe beside JAX).
  subprocess.run([sys.executable] + argv[1:], check=True, capture_output=True, timeout=300,
                 env={**os.environ, 'PYTHONPATH': str(pathlib.Path(__file__).parents[1])})
  check_shards(shards_dir, verify_content=True)
  assert len(ShardedFeatures(shards_dir)) == 5


def test_manifest_without_sizes_is_checked_against_npy_headers(shards_dir, converted, capsys):
  manifest_path = shards_dir / 'manifest.json'
  manifest = json.loads(manifest_path.read_text())
  for key in ('index_bytes', 'index_sha256'):
    del manifest[key]
  for row in manifest['shards']:
    for key in ('frames_bytes', 'frames_sha256', 'clips_bytes', 'clips_sha256'):
      del row[key]
  manifest_path.write_text(json.dumps(manifest))
  check_shards(shards_dir, verify_content=True)
  convert_lib.main(['--verify', str(shards_dir)])
  assert capsys.readouterr().out == (
      'ok: 3 shards, 5 clips verified (sizes only: the manifest predates content hashes; '
      'rebuild with --overwrite to add them)\n')
  size = _cut(shards_dir / 'shard-00000.frames.npy', 4 * F)
  _fails(shards_dir, converted, 'shard-00000.frames.npy',
         f'truncated: {size - 4 * F} of {size} bytes')
  (shards_dir / 'shard-00000.frames.npy').write_bytes(b'\x93NUMPY')
  with pytest.raises(shards.ManifestError, match=r'shard-00000\.frames\.npy: not a readable '
                     r'\.npy file: .*; rebuild with: python -m'):
    check_shards(shards_dir)


def test_audio_rebuild_command():
  manifest = {'dtype': 'float16', 'request': {'num_mel_bins': None, 'clips_per_shard': 256},
              'source': {'kind': 'audio', 'json': '/d/train set.json', 'audio_root': '/d/wav',
                         'label_csv': '/d/labels.csv'}}
  assert shards.rebuild_command(manifest, '/s/train') == (
      "python -m ssast_jax.data.convert --json '/d/train set.json' --audio --audio-root /d/wav "
      '--out /s/train --dtype float16 --clips-per-shard 256 --label-csv /d/labels.csv '
      '--overwrite')


def test_verify_cli_exit_codes(shards_dir, converted, capsys):
  convert_lib.main(['--verify', str(shards_dir)])
  assert capsys.readouterr().out == 'ok: 3 shards, 5 clips verified\n'
  path = shards_dir / 'shard-00001.clips.json'
  path.write_text(path.read_text().replace('/m/a', '/m/b'))
  with pytest.raises(SystemExit) as raised:
    convert_lib.main(['--verify', str(shards_dir)])
  assert raised.value.code == 2
  err = capsys.readouterr().err
  assert err == (f'error: {path}: content hash mismatch; rebuild with: '
                 f'{_rebuild(converted, shards_dir)}\n')
  with pytest.raises(SystemExit) as raised:
    convert_lib.main(['--verify', str(shards_dir / 'nothing')])
  assert raised.value.code == 2
  assert re.match(r'error: .*nothing/manifest\.json does not exist', capsys.readouterr().err)
  with pytest.raises(SystemExit, match=r'^error: --verify DIR takes no --json'):
    convert_lib.main(['--verify', str(shards_dir), '--out', str(shards_dir)])
