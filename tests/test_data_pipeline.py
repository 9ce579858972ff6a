"""The Grain pipelines: SPEC section 1 preprocessing, shuffling, sharding, state, evaluation."""

import json

import numpy as np
import pytest
import torch
from absl import flags

from ssast_jax.data import (ShardedFeatures, convert, demo, eval_loader, num_eval_batches,
                            steps_per_epoch, train_loader)

T, F = 40, 16
MEAN, STD = -6.5, 2.25


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  """20 demo clips of 35..43 frames converted to float32 and float16 shards, and the clips
  as the `.pt` files hold them (in manifest order)."""
  root = tmp_path_factory.mktemp('pipeline')
  paths = demo.write_demo_dataset(root / 'users', num_clips=22, seed=5, target_length=T,
                                  num_mel_bins=F)
  dirs = {}
  for dtype in ('float32', 'float16'):
    dirs[dtype] = root / dtype
    convert.convert(paths['train_json'], paths['train_pt_dir'], dirs[dtype], dtype=dtype,
                    workers=1, clips_per_shard=6, verbose=False)
  clips = []
  for entry in json.loads(paths['train_json'].read_text())['data']:
    path = paths['train_pt_dir'] / (entry['wav'].rsplit('/', 1)[1][:-5] + '.pt')
    if path.exists():
      obj = torch.load(path)
      obj = next(iter(obj.values())) if isinstance(obj, dict) else obj
      clips.append(obj.reshape(-1, F).numpy())
  assert len(clips) == 20 and len({len(c) for c in clips}) > 3
  assert min(len(c) for c in clips) < T < max(len(c) for c in clips)
  return dirs, clips


def spec_input(fbank, target_length=T, mean=MEAN, std=STD):
  """SPEC section 1: zero-pad at the end or keep the first frames, then normalise."""
  x = np.asarray(fbank, np.float32)[:target_length]
  x = np.concatenate([x, np.zeros((target_length - len(x), x.shape[1]), np.float32)])
  return (x - mean) / (2 * std)


def _identify(rows, expected):
  """Index into `expected` of each row, asserting every row equals one of them exactly."""
  found = []
  for row in rows:
    matches = [k for k, e in enumerate(expected) if np.array_equal(row, e)]
    assert len(matches) == 1
    found.append(matches[0])
  return found


def _train(dataset, dtype='float32', **kwargs):
  settings = dict(batch_size=4, target_length=T, mean=MEAN, std=STD, seed=0)
  settings.update(kwargs)
  return train_loader(dataset[0][dtype], **settings)


def _take(it, n):
  return [next(it)['fbank'] for _ in range(n)]


@pytest.mark.parametrize('dtype', ['float32', 'float16'])
def test_train_batches_are_spec_preprocessed_and_shuffled_per_epoch(dataset, dtype):
  _, clips = dataset
  stored = [c.astype(dtype).astype(np.float32) for c in clips]  # what the shards hold
  expected = [spec_input(c) for c in stored]
  batches = _take(_train(dataset, dtype, batch_size=6, num_epochs=2), 6)
  assert steps_per_epoch(dataset[0][dtype], 6) == 3
  for batch in batches:
    assert batch.shape == (6, T, F) and batch.dtype == np.float32
  epochs = [_identify(np.concatenate(batches[3 * e:3 * e + 3]), expected) for e in range(2)]
  for order in epochs:
    assert len(set(order)) == 18  # drop_remainder: 2 of 20 clips left out per epoch
  assert epochs[0] != epochs[1] and epochs[0] != sorted(epochs[0])
  again = _take(_train(dataset, dtype, batch_size=6, num_epochs=2), 6)
  assert all(np.array_equal(a, b) for a, b in zip(batches, again))
  other_seed = _take(_train(dataset, dtype, batch_size=6, seed=1), 3)
  assert _identify(np.concatenate(other_seed), expected) != epochs[0]


def test_finite_epochs_end(dataset):
  assert len(list(_train(dataset, batch_size=6, num_epochs=2))) == 6


def test_random_crop_takes_windows_of_long_clips(dataset):
  _, clips = dataset
  windows = {}  # (clip, start) -> preprocessed window
  for k, clip in enumerate(clips):
    for start in range(max(1, len(clip) - T + 1)):
      windows[k, start] = spec_input(clip[start:])
  keys = list(windows)
  rows = np.concatenate(_take(_train(dataset, random_crop=True, num_epochs=1), 5))
  found = [keys[k] for k in _identify(rows, list(windows.values()))]
  assert any(start > 0 for _, start in found)
  again = np.concatenate(_take(_train(dataset, random_crop=True, num_epochs=1), 5))
  np.testing.assert_array_equal(rows, again)


def test_processes_split_each_global_batch(dataset):
  single = _take(_train(dataset), 8)  # crosses the epoch boundary after 5 batches
  halves = [_take(_train(dataset, process_index=p, process_count=2), 8) for p in range(2)]
  for whole, first, second in zip(single, *halves):
    assert first.shape == second.shape == (2, T, F)
    np.testing.assert_array_equal(whole[:2], first)
    np.testing.assert_array_equal(whole[2:], second)
  with pytest.raises(ValueError, match='batch_size 5 must be a positive multiple of '
                     'process_count 2'):
    _train(dataset, batch_size=5, process_count=2)


@pytest.mark.parametrize('worker_count', [0, 2])
def test_state_restore_continues_exactly(dataset, worker_count):
  flags.FLAGS.mark_as_parsed()  # Grain's multiprocessing reads absl flags.
  it = _train(dataset, worker_count=worker_count)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
  expected = _take(it, 4)  # crosses the epoch boundary after 5 batches
  it.close()
  restored = _train(dataset, worker_count=worker_count)
  restored.set_state(state)
  got = _take(restored, 4)
  restored.close()
  assert all(np.array_equal(a, b) for a, b in zip(expected, got))
  assert state['loader']['worker_count'] == worker_count
  mismatched = _train(dataset, worker_count=1 - min(worker_count, 1))
  with pytest.raises(ValueError, match=f'saved with worker_count={worker_count}'):
    mismatched.set_state(state)


@pytest.mark.parametrize('process_count', [1, 2])
def test_eval_visits_every_clip_once(dataset, process_count):
  dirs, clips = dataset
  expected = [spec_input(c) for c in clips]
  assert num_eval_batches(dirs['float32'], 6) == 4
  per_process = [list(eval_loader(dirs['float32'], batch_size=6, target_length=T, mean=MEAN,
                                  std=STD, process_index=p, process_count=process_count))
                 for p in range(process_count)]
  assert all(len(batches) == 4 for batches in per_process)
  rows = []
  for step in range(4):
    for batches in per_process:
      batch = batches[step]
      assert batch['fbank'].shape == (6 // process_count, T, F)
      rows += [row for row, valid in zip(batch['fbank'], batch['valid']) if valid]
  assert len(rows) == 20
  for row, clip in zip(rows, expected):  # in manifest order
    np.testing.assert_array_equal(row, clip)
  last = np.concatenate([b[-1]['valid'] for b in per_process])
  assert last.tolist() == [True, True, False, False, False, False]
  padding = np.concatenate([b[-1]['fbank'] for b in per_process])[2:]
  np.testing.assert_array_equal(padding, np.full_like(padding, np.float32(-MEAN) / (2 * STD)))


def test_sharded_features_match_pt(dataset):
  dirs, clips = dataset
  ds = ShardedFeatures(dirs['float32'])
  assert len(ds) == 20
  for k, clip in enumerate(clips):
    np.testing.assert_array_equal(ds[k], clip)
