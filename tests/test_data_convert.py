"""The `.pt` and audio -> shard converter, the shard reader and the demo data."""

import json
import os
import pathlib
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import torch

from ssast_jax.data import ShardedFeatures, convert as convert_lib, demo, shard_writer, shards
from ssast_jax.features import clip_features

F = 16
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _clip(rng, length, bins=F):
  return torch.from_numpy((rng.standard_normal((length, bins)) * 2.5 - 7).astype(np.float32))


def _user_dataset(root):
  """A dataset in the users' layout: every accepted .pt form plus every kind of bad entry.

  Returns (json path, pt dir, {wav: expected float32 clip or skip reason}, JSON order).
  """
  rng = np.random.default_rng(0)
  pt_dir = root / 'pt'
  pt_dir.mkdir(parents=True)
  expected, entries = {}, []

  def add(name, obj, outcome, labels='/m/a'):
    wav = f'/audio/{name}.wav'
    entries.append({'wav': wav, 'labels': labels})
    if obj is not None:
      if isinstance(obj, bytes):
        (pt_dir / f'{name}.pt').write_bytes(obj)
      else:
        torch.save(obj, pt_dir / f'{name}.pt')
    expected[wav] = outcome

  for i in range(14):
    clip = _clip(rng, 30 + 3 * i)
    form = i % 7
    if form == 0:
      obj = clip
    elif form == 1:
      obj = clip[None]
    elif form == 2:
      obj = {'fbank': clip, 'sample_rate': 16000}
    elif form == 3:
      obj = {'features': clip}
    elif form == 4:  # a strided view into a larger storage, at an offset
      obj = torch.stack([_clip(rng, clip.shape[0]), clip], 2)[:, :, 1]
    elif form == 5:  # column-major
      obj = clip.t().contiguous().t()
    else:
      obj = clip.double()
    add(f'good{i:02d}', obj, clip.float().numpy(), labels=f'/m/a,/m/{i % 3}')
  legacy = _clip(rng, 33)  # torch's pre-1.6 file format
  legacy_path = root / 'legacy.pt'
  torch.save(legacy, legacy_path, _use_new_zipfile_serialization=False)
  add('legacy', legacy_path.read_bytes(), legacy.numpy())
  add('missing', None, 'missing')
  add('garbage', b'not a torch file at all' * 10, 'unreadable')
  add('truncated', b'PK\x03\x04' + bytes(100), 'unreadable')
  add('threed', torch.zeros(2, 30, F), 'bad_shape')
  add('wrongbins', _clip(rng, 30, F + 1), 'bad_shape')
  add('twotensors', {'a': _clip(rng, 30), 'b': _clip(rng, 30)}, 'bad_shape')
  add('nan', torch.full((30, F), float('nan')), 'non_finite')
  add('inf', torch.cat([_clip(rng, 29), torch.full((1, F), float('inf'))]), 'non_finite')
  json_path = root / 'data.json'
  json_path.write_text(json.dumps({'data': entries}))
  return json_path, pt_dir, expected, [e['wav'] for e in entries]


@pytest.fixture(scope='module')
def user_dataset(tmp_path_factory):
  return _user_dataset(tmp_path_factory.mktemp('users'))


def _convert(user_dataset, out, **kwargs):
  json_path, pt_dir, _, _ = user_dataset
  kwargs.setdefault('workers', 1)
  kwargs.setdefault('verbose', False)
  return convert_lib.convert(json_path, pt_dir, out, **kwargs)


def test_float32_shards_equal_pt_and_bad_entries_are_listed(user_dataset, tmp_path):
  _, _, expected, order = user_dataset
  manifest = _convert(user_dataset, tmp_path, dtype='float32', workers=2, clips_per_shard=4)
  kept = [w for w in order if not isinstance(expected[w], str)]
  ds = ShardedFeatures(tmp_path)
  assert len(ds) == manifest['num_clips'] == len(kept) == 15
  for i, wav in enumerate(kept):
    assert ds.wav(i) == wav
    assert ds[i].dtype == np.float32
    np.testing.assert_array_equal(ds[i], expected[wav])
  assert ds.labels(0) == '/m/a,/m/0'
  assert manifest['skipped'] == [{'wav': w, 'reason': expected[w]} for w in order
                                 if isinstance(expected[w], str)]
  assert manifest['counts'] == {'entries': 23, 'converted': 15, 'skipped': 8, 'missing': 1,
                                'unreadable': 2, 'bad_shape': 3, 'non_finite': 2}
  assert manifest['num_mel_bins'] == F and manifest['dtype'] == 'float32'
  assert manifest['format_version'] == shards.FORMAT_VERSION
  assert [s['frames'] for s in manifest['shards']] == [f'shard-{k:05d}.frames.npy'
                                                       for k in range(6)]
  frames = np.concatenate([expected[w] for w in kept]).astype(np.float64)
  assert manifest['num_frames'] == frames.shape[0]
  np.testing.assert_allclose([manifest['mean'], manifest['std']], [frames.mean(), frames.std()],
                             rtol=1e-6)


def test_float16_shards_hold_the_rounded_clips(user_dataset, tmp_path):
  _, _, expected, order = user_dataset
  _convert(user_dataset, tmp_path, dtype='float16')
  ds = ShardedFeatures(tmp_path)
  kept = [w for w in order if not isinstance(expected[w], str)]
  for i, wav in enumerate(kept):
    assert ds[i].dtype == np.float16
    np.testing.assert_array_equal(ds[i], expected[wav].astype(np.float16))


def test_given_num_mel_bins_rejects_other_widths(user_dataset, tmp_path):
  manifest = _convert(user_dataset, tmp_path, num_mel_bins=F + 1)
  assert ShardedFeatures(tmp_path).wav(0) == '/audio/wrongbins.wav'
  # The shape is checked before the values, so the NaN and inf clips count as bad_shape.
  assert manifest['counts'] == {'entries': 23, 'converted': 1, 'skipped': 22, 'missing': 1,
                                'unreadable': 2, 'bad_shape': 19, 'non_finite': 0}


def test_resume_rebuilds_only_unfinished_shards(user_dataset, tmp_path):
  first = _convert(user_dataset, tmp_path, clips_per_shard=4)
  reference = {k: ShardedFeatures(tmp_path)[k] for k in range(first['num_clips'])}
  mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob('shard-*')}
  # Interrupted states: manifest not yet written, shard 1 lost, shard 2 renamed its frames
  # but not its clip list, shard 3's frames cut short, and a temporary left behind.
  (tmp_path / 'manifest.json').unlink()
  for name in ('shard-00001.frames.npy', 'shard-00001.clips.json', 'shard-00002.clips.json'):
    (tmp_path / name).unlink()
  with open(tmp_path / 'shard-00003.frames.npy', 'r+b') as f:
    f.truncate(200)
  (tmp_path / '.shard-00004.frames.npy.4242.tmp').write_bytes(b'partial')
  second = _convert(user_dataset, tmp_path, clips_per_shard=4)
  assert second == first
  ds = ShardedFeatures(tmp_path)
  for k, clip in reference.items():
    np.testing.assert_array_equal(ds[k], clip)
  rebuilt = {p.name for p in tmp_path.glob('shard-*') if p.stat().st_mtime_ns != mtimes[p.name]}
  assert rebuilt == {'shard-00001.frames.npy', 'shard-00001.clips.json',
                     'shard-00002.frames.npy', 'shard-00002.clips.json',
                     'shard-00003.frames.npy', 'shard-00003.clips.json'}
  assert not list(tmp_path.glob('.*.tmp'))


def test_cli_summary_up_to_date_and_overwrite(user_dataset, tmp_path, capsys):
  json_path, pt_dir, _, _ = user_dataset
  argv = ['--json', str(json_path), '--pt-dir', str(pt_dir), '--out', str(tmp_path),
          '--workers', '1']
  convert_lib.main(argv)
  out = capsys.readouterr()
  assert 'converted 15 of 23 clips into 1 shards' in out.out
  assert 'skipped 8: 1 missing, 2 unreadable, 3 bad_shape, 2 non_finite' in out.out
  assert 'convert: 100%' in out.err
  mtime = (tmp_path / 'shard-00000.frames.npy').stat().st_mtime_ns
  convert_lib.main(argv)
  assert 'is up to date' in capsys.readouterr().out
  assert (tmp_path / 'shard-00000.frames.npy').stat().st_mtime_ns == mtime
  with pytest.raises(SystemExit, match=r'dtype differ\); pass --overwrite'):
    convert_lib.main(argv + ['--dtype', 'float32'])
  convert_lib.main(argv + ['--dtype', 'float32', '--overwrite'])
  assert ShardedFeatures(tmp_path).dtype == np.float32
  assert (tmp_path / 'shard-00000.frames.npy').stat().st_mtime_ns != mtime


def test_run_without_surviving_clip_fails_without_output(user_dataset, tmp_path):
  (tmp_path / 'pt').mkdir()
  (tmp_path / 'pt' / 'garbage.pt').write_bytes(b'garbage')
  torch.save(torch.zeros(2, 3, F), tmp_path / 'pt' / 'threed.pt')
  torch.save(torch.full((3, F), float('nan')), tmp_path / 'pt' / 'nan.pt')
  json_path = tmp_path / 'bad.json'
  json_path.write_text(json.dumps({'data': [{'wav': f'{name}.wav', 'labels': ''} for name in
                                            ('missing', 'garbage', 'threed', 'nan')]}))
  out = tmp_path / 'out'
  with pytest.raises(SystemExit, match=r'no entry has a usable \.pt file in .* \(1 missing, '
                     r'1 unreadable, 1 bad_shape, 1 non_finite\)'):
    convert_lib.main(['--json', str(json_path), '--pt-dir', str(tmp_path / 'pt'),
                      '--out', str(out)])
  # With F given nothing is probed: every entry is converted, skipped, and the run fails.
  with pytest.raises(convert_lib.ConversionError,
                     match=r'no clip of .* survived conversion \(1 missing, 2 unreadable, '
                     r'20 bad_shape\)'):
    _convert(user_dataset, out, num_mel_bins=F + 7)
  assert not (out / 'manifest.json').exists()


@pytest.mark.parametrize('content, message', [
    (None, 'does not exist'),
    ('{"data": [', 'is not readable JSON'),
    ('{"items": []}', "must be an object with a list under 'data'"),
    ('{"data": [{"labels": "/m/a"}]}', "entry 0 needs a string 'wav'"),
    ('{"data": []}', 'lists no clips'),
])
def test_bad_json_is_named(tmp_path, content, message):
  json_path = tmp_path / 'data.json'
  if content is not None:
    json_path.write_text(content)
  with pytest.raises(convert_lib.ConversionError, match=f'--json {re.escape(str(json_path))}.*'
                     f'{re.escape(message)}'):
    convert_lib.convert(json_path, tmp_path, tmp_path / 'out', verbose=False)


@pytest.mark.parametrize('csv_text, message', [
    ('id,name\n0,/m/a\n', 'needs the columns index,mid,display_name'),
    ('index,mid,display_name\nx,/m/a,A\n', "line 2: index 'x' is not an integer"),
    ('index,mid,display_name\n0,/m/a,A\n2,/m/b,B\n', 'indices must be 0..1'),
    ('index,mid,display_name\n0,/m/a,A\n1,/m/a,B\n', 'a mid appears twice'),
])
def test_bad_label_csv_is_named(user_dataset, tmp_path, csv_text, message):
  csv_path = tmp_path / 'labels.csv'
  csv_path.write_text(csv_text)
  with pytest.raises(convert_lib.ConversionError, match=message):
    _convert(user_dataset, tmp_path / 'out', label_csv=csv_path)


def test_label_csv_is_recorded_and_unknown_labels_counted(user_dataset, tmp_path, capsys):
  csv_path = tmp_path / 'labels.csv'
  csv_path.write_text('index,mid,display_name\n0,/m/a,Alpha\n1,/m/0,Zero\n2,/m/1,"One, uno"\n')
  manifest = _convert(user_dataset, tmp_path / 'out', label_csv=csv_path, verbose=True)
  assert manifest['labels'] == {'mids': ['/m/a', '/m/0', '/m/1'],
                                'display_names': ['Alpha', 'Zero', 'One, uno']}
  # good02, good05, good08, good11 carry /m/2, which the CSV lacks.
  assert manifest['labels_not_in_csv'] == {'clips': 4, 'mids': ['/m/2']}
  assert '4 clips carry 1 label ids not in the label CSV' in capsys.readouterr().err


def test_sharded_features_pickles_and_checks_indices(user_dataset, tmp_path):
  _convert(user_dataset, tmp_path, clips_per_shard=5)
  ds = ShardedFeatures(tmp_path)
  first = ds[0]
  restored = pickle.loads(pickle.dumps(ds))
  np.testing.assert_array_equal(restored[0], first)
  np.testing.assert_array_equal(restored[-1], ds[len(ds) - 1])
  assert restored.wav(len(ds) - 1) == ds.wav(-1) == '/audio/legacy.wav'
  assert list(ds.lengths[:3]) == [30, 33, 36]
  with pytest.raises(IndexError, match='clip 15 is out of range for 15 clips'):
    ds[15]
  os.remove(tmp_path / 'manifest.json')
  with pytest.raises(shards.ManifestError, match='manifest.json does not exist'):
    ShardedFeatures(tmp_path)


def test_demo_dataset_converts_with_every_path(tmp_path):
  paths = demo.write_demo_dataset(tmp_path, num_clips=12, seed=3, target_length=40,
                                  num_mel_bins=128)
  train = json.loads(paths['train_json'].read_text())['data']
  assert len(train) == 11 + 3 and len(json.loads(paths['val_json'].read_text())['data']) == 2
  forms = {type(torch.load(p)).__name__ for p in paths['train_pt_dir'].glob('*.pt')}
  assert forms == {'Tensor', 'dict'}
  manifest = convert_lib.convert(paths['train_json'], paths['train_pt_dir'], tmp_path / 'out',
                                 label_csv=paths['label_csv'], verbose=False)
  assert manifest['counts']['missing'] == 3 and manifest['num_clips'] == 11
  assert manifest['labels_not_in_csv'] == {'clips': 0, 'mids': []}
  lengths = ShardedFeatures(tmp_path / 'out').lengths
  assert 35 <= lengths.min() and lengths.max() <= 43 and len(set(lengths.tolist())) > 3
  assert -9 < manifest['mean'] < -3 and 1.5 < manifest['std'] < 3.5  # like real log-mel


def _save_pt_features(pairs):
  """torch.save(torch.from_numpy(clip_features(audio))) into pt for each (audio, pt) pair, in
  a process with the converter workers' one BLAS thread: a threaded BLAS rounds the mel
  filters' product differently (1 ulp), and the .pt files are to hold the same bits."""
  script = ('import json, sys, torch\nfrom ssast_jax.features import clip_features\n'
            'for audio, pt in json.loads(sys.argv[1]):\n'
            '  torch.save(torch.from_numpy(clip_features(audio)), pt)\n')
  subprocess.run([sys.executable, '-c', script, json.dumps(pairs)], check=True, cwd=ROOT,
                 env={**os.environ, **shard_writer.WORKER_ENV, 'PYTHONPATH': str(ROOT)})


def _audio_dataset(root):
  """Audio clips in wav and flac, mono and stereo, 8 and 16 kHz, named relative to
  `root/audio` (one absolute), a bad file of every kind, and the `.pt` files of the good
  clips' features as the original saves them. The JSON is written in `root/audio`.

  Returns (json path, audio root, pt dir, JSON order of wav ids, {bad wav id: reason}).
  """
  rng = np.random.default_rng(1)
  audio_root, pt_dir = root / 'audio', root / 'pt'
  (audio_root / 'sub').mkdir(parents=True)
  pt_dir.mkdir()
  entries, bad, pt_files = [], {}, []

  def tone(seconds, rate, channels):
    t = np.arange(int(seconds * rate)) / rate
    signal = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size)
    return np.stack([signal * (c + 1) / channels for c in range(channels)], 1)

  good = [('sub/mono.wav', 0.5, 16000, 1), ('sub/stereo.wav', 0.42, 16000, 2),
          ('sub/flacmono.flac', 0.37, 16000, 1), ('stereo8k.flac', 0.61, 8000, 2),
          ('sub/absolute.wav', 0.3, 16000, 1)]
  for name, seconds, rate, channels in good:
    soundfile.write(audio_root / name, tone(seconds, rate, channels), rate, subtype='PCM_16')
    wav = str(audio_root / name) if name.startswith('sub/absolute') else name
    entries.append({'wav': wav, 'labels': f'/m/{len(entries)}'})
    pt_files.append((str(audio_root / name),
                     str(pt_dir / f'{os.path.splitext(os.path.basename(name))[0]}.pt')))
  _save_pt_features(pt_files)
  nan = tone(0.3, 16000, 1)
  nan[100] = np.nan
  soundfile.write(audio_root / 'nan.wav', nan, 16000, subtype='FLOAT')
  soundfile.write(audio_root / 'short.wav', tone(0.01, 16000, 1), 16000, subtype='PCM_16')
  soundfile.write(audio_root / 'slow.wav', tone(5, 50, 1), 50, subtype='PCM_16')
  (audio_root / 'sub' / 'garbage.flac').write_bytes(b'not audio' * 50)
  for wav, reason in (('gone.wav', 'missing'), ('sub/garbage.flac', 'unreadable'),
                      ('short.wav', 'empty'), ('nan.wav', 'non_finite'),
                      ('slow.wav', 'bad_rate')):
    entries.insert(2 * len(bad) + 1, {'wav': wav, 'labels': ''})
    bad[wav] = reason
  json_path = audio_root / 'data.json'
  json_path.write_text(json.dumps({'data': entries}))
  return json_path, audio_root, pt_dir, [e['wav'] for e in entries], bad


@pytest.fixture(scope='module')
def audio_dataset(tmp_path_factory):
  return _audio_dataset(tmp_path_factory.mktemp('audio'))


def _shard_files(out):
  return {p.name: p.read_bytes() for p in out.iterdir() if p.name.endswith('.npy')}


def _clip_fields(out):
  return [json.loads(p.read_text())['clips'] for p in sorted(out.glob('*.clips.json'))]


def test_audio_and_pt_of_the_same_features_give_equal_shards(audio_dataset, tmp_path):
  json_path, audio_root, pt_dir, order, bad = audio_dataset
  from_audio = convert_lib.convert(json_path, out_dir=tmp_path / 'a', audio=True,
                                   audio_root=audio_root, workers=2, clips_per_shard=3,
                                   verbose=False)
  from_pt = convert_lib.convert(json_path, pt_dir, tmp_path / 'p', workers=1,
                                clips_per_shard=3, verbose=False)
  convert_lib.convert(json_path, out_dir=tmp_path / 'a1', audio=True, audio_root=audio_root,
                      workers=1, clips_per_shard=3, verbose=False)
  # Frames files and index bit-equal, so their recorded digests are too; and the same with
  # any number of workers.
  assert _shard_files(tmp_path / 'a') == _shard_files(tmp_path / 'p')
  assert _shard_files(tmp_path / 'a') == _shard_files(tmp_path / 'a1')
  assert len(_shard_files(tmp_path / 'a')) == 1 + 4
  assert _clip_fields(tmp_path / 'a') == _clip_fields(tmp_path / 'p')
  assert from_audio['index_sha256'] == from_pt['index_sha256']
  assert ([r['frames_sha256'] for r in from_audio['shards']]
          == [r['frames_sha256'] for r in from_pt['shards']])
  ds = ShardedFeatures(tmp_path / 'a')
  kept = [w for w in order if w not in bad]
  assert [ds.wav(i) for i in range(len(ds))] == kept and ds.num_mel_bins == 128
  np.testing.assert_allclose(ds[1].astype(np.float32), clip_features(audio_root / kept[1]),
                             atol=1e-2)  # float16
  assert from_audio['skipped'] == [{'wav': w, 'reason': bad[w]} for w in order if w in bad]
  assert [item['wav'] for item in from_pt['skipped']] == [w for w in order if w in bad]
  assert from_audio['counts'] == {'entries': 10, 'converted': 5, 'skipped': 5, 'missing': 1,
                                  'unreadable': 1, 'empty': 1, 'non_finite': 1, 'bad_rate': 1}
  assert from_audio['source']['kind'] == 'audio' and from_pt['source']['kind'] == 'pt'
  assert from_audio['source']['audio_root'] == str(audio_root.resolve())


def test_audio_paths_default_to_the_json_folder_and_kinds_never_mix(audio_dataset, tmp_path,
                                                                     capsys):
  json_path, audio_root, pt_dir, _, _ = audio_dataset
  out = tmp_path / 'out'
  convert_lib.convert(json_path, None, out, audio=True, audio_root=audio_root, workers=1)
  capsys.readouterr()
  # Without --audio-root relative paths start from the JSON's folder, here the same root.
  convert_lib.convert(json_path, None, out, audio=True, workers=1)
  assert 'is up to date' in capsys.readouterr().out
  with pytest.raises(convert_lib.ConversionError,
                     match=r'\(audio_root, pt_dir, source_kind differ\); pass --overwrite'):
    convert_lib.convert(json_path, pt_dir, out, workers=1)
  # Shards left by an audio conversion are never reused for a .pt one, nor the reverse.
  (out / 'manifest.json').unlink()
  convert_lib.convert(json_path, pt_dir, out, workers=1)
  assert '0 shards reused from an earlier run' in capsys.readouterr().out
  elsewhere = tmp_path / 'elsewhere.json'
  elsewhere.write_text(json_path.read_text())
  manifest = convert_lib.convert(elsewhere, None, tmp_path / 'other', audio=True,
                                 verbose=False)
  assert manifest['num_clips'] == 1  # only the absolute path is found from another folder
  assert manifest['counts']['missing'] == 9


def test_audio_cli_summary_and_source_options(audio_dataset, tmp_path, capsys):
  json_path, audio_root, pt_dir, _, _ = audio_dataset
  base = ['--json', str(json_path), '--out', str(tmp_path / 'out'), '--workers', '1']
  convert_lib.main(base + ['--audio', '--audio-root', str(audio_root)])
  out = capsys.readouterr()
  assert 'converted 5 of 10 clips into 1 shards' in out.out
  assert 'skipped 5: 1 missing, 1 unreadable, 1 empty, 1 non_finite, 1 bad_rate' in out.out
  assert '  e.g. bad_rate: ' in out.out and 'convert: 100%' in out.err
  one_of = r'^error: give exactly one of --pt-dir D .* and --audio \(.*\)$'
  for argv, message in ((['--audio', '--pt-dir', str(pt_dir)], one_of), ([], one_of),
                        (['--audio-root', str(audio_root), '--pt-dir', str(pt_dir)],
                         r'^error: --audio-root is only for --audio$'),
                        (['--audio', '--audio-root', str(tmp_path / 'nope')],
                         r'^error: --audio-root .*nope is not a directory$')):
    with pytest.raises(SystemExit, match=message):
      convert_lib.main(base + argv)
  with pytest.raises(SystemExit, match=r'^error: --json and --out are required'):
    convert_lib.main(['--audio'])
