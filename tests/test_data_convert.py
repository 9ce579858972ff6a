"""The `.pt` -> shard converter, the shard reader and the demo data."""

import json
import os
import pickle
import re

import numpy as np
import pytest
import torch

from ssast_jax.data import ShardedFeatures, convert as convert_lib, demo, shards

F = 16


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
