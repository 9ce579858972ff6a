"""End-to-end training on a tiny dataset: resume, device counts, processes, NaN, export.

Each run goes through `main.py` in a subprocess, as users run it, so that device counts
and process groups can differ between runs.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import ssast_jax
from ssast_jax.data.demo import write_demo_dataset

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIME_KEYS = ('train/clips_per_s', 'train/data_wait_ms')


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  out = tmp_path_factory.mktemp('data')
  return write_demo_dataset(out, num_clips=80, seed=1, target_length=64, num_mel_bins=64)


def _flags(dataset, workdir, **overrides):
  config = {'data.train_json': dataset['train_json'], 'data.train_pt_dir': dataset['train_pt_dir'],
            'data.val_json': dataset['val_json'], 'data.val_pt_dir': dataset['val_pt_dir'],
            'data.shards_dir': os.path.join(os.path.dirname(dataset['train_json']), 'shards'),
            'data.target_length': 64, 'data.num_mel_bins': 64, 'data.mean': -7.0,
            'data.std': 2.5, 'model.size': 'tiny', 'model.depth': 1, 'mask_patch': 6,
            'eval_mask_patch': 6, 'batch_size': 8, 'lr': 1e-4, 'warmup': False,
            'num_epochs': 2, 'epoch_iter': 8, 'checkpoint_every_steps': 3,
            'print_every_steps': 1, 'keep_checkpoints': 2}
  config.update(overrides)
  return ['--config', str(ROOT / 'configs' / 'pretrain_joint.py'), f'--workdir={workdir}'] + [
      f'--config.{k}={v}' for k, v in config.items()]


def _env(devices=1):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['PYTHONPATH'] = str(ROOT)
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _run(args, devices=1, check=True):
  result = subprocess.run([sys.executable, str(ROOT / 'main.py')] + args, env=_env(devices),
                          capture_output=True, text=True, timeout=600)
  if check and result.returncode:
    raise AssertionError(f'main.py failed ({result.returncode}):\n{result.stderr[-4000:]}')
  return result


def _rows(workdir):
  lines = pathlib.Path(workdir, 'metrics.jsonl').read_text().splitlines()
  return [{k: v for k, v in json.loads(line).items() if k not in TIME_KEYS} for line in lines]


def _train_losses(workdir):
  return {r['step']: r['train/loss'] for r in _rows(workdir) if 'train/loss' in r}


def _final_params(workdir, tmp_path, which='latest'):
  out = tmp_path / f'{pathlib.Path(workdir).name}-{which}.pth'
  subprocess.run([sys.executable, '-m', 'ssast_jax.export', '--workdir', str(workdir),
                  '--out', str(out), '--which', which], env=_env(), check=True,
                 capture_output=True, timeout=300)
  return ssast_jax.from_pytorch(out).params


@pytest.fixture(scope='module')
def reference_run(dataset, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('reference')
  _run(_flags(dataset, workdir))
  return workdir


def test_run_logs_evaluates_and_checkpoints(reference_run):
  rows = _rows(reference_run)
  losses = _train_losses(reference_run)
  assert sorted(losses) == list(range(1, 19))  # 2 epochs of 72 clips in batches of 8
  evals = [r for r in rows if 'eval/mpc_acc' in r]
  assert [r['step'] for r in evals] == [0, 8, 16]
  assert all(0 <= r['eval/mpc_acc'] <= 1 and r['eval/mpg_loss'] > 0 for r in evals)
  train = [r for r in rows if 'train/loss' in r]
  for row in train:
    np.testing.assert_allclose(row['train/loss'],
                               row['train/mpc_loss'] + 10 * row['train/mpg_loss'], rtol=1e-5)
  result = np.loadtxt(pathlib.Path(reference_run, 'result.csv'), delimiter=',', ndmin=2)
  assert result.shape == (2, 5)
  assert json.loads(pathlib.Path(reference_run, 'config.json').read_text())['task'] == (
      'pretrain_joint')
  events = list(pathlib.Path(reference_run, 'tensorboard').iterdir())
  assert events


def test_sigkill_and_resume_is_bit_identical(dataset, reference_run, tmp_path):
  workdir = tmp_path / 'killed'
  args = _flags(dataset, workdir)
  process = subprocess.Popen([sys.executable, str(ROOT / 'main.py')] + args, env=_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics_file = workdir / 'metrics.jsonl'
  deadline = time.time() + 300
  while time.time() < deadline:
    if metrics_file.exists() and len(_train_losses(workdir)) >= 11:
      break
    time.sleep(0.05)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert len(_train_losses(workdir)) < 18, 'the run finished before it could be killed'
  _run(args)
  assert _rows(workdir) == _rows(reference_run)
  np.testing.assert_array_equal(_flat(_final_params(workdir, tmp_path)),
                                _flat(_final_params(reference_run, tmp_path)))


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])


def test_eight_devices_match_one(dataset, reference_run, tmp_path):
  workdir = tmp_path / 'eight'
  _run(_flags(dataset, workdir), devices=8)
  one, eight = _train_losses(reference_run), _train_losses(workdir)
  assert sorted(one) == sorted(eight)
  np.testing.assert_allclose([eight[s] for s in sorted(one)], [one[s] for s in sorted(one)],
                             rtol=1e-5)
  _assert_params_close(_final_params(workdir, tmp_path), _final_params(reference_run, tmp_path))


def _assert_params_close(got, expected):
  """Equal up to float summation order, which differs between device counts.

  Adam turns rounding noise into full-size steps wherever the exact gradient is (near) 0:
  cpred's output bias and every key bias have exactly zero gradient (a shared shift cancels
  in a softmax), and a few other elements almost so. Those drift apart by a few learning
  rates; every other element agrees to 2e-6.
  """
  got_leaves = jax.tree_util.tree_leaves_with_path(got)
  expected_leaves = jax.tree.leaves(expected)
  for (path, a), b in zip(got_leaves, expected_leaves):
    a, b = np.asarray(a), np.asarray(b)
    assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b) + 1e-3, jax.tree_util.keystr(path)
  far = np.abs(_flat(got) - _flat(expected)) > 2e-6
  assert far.mean() < 1e-3, far.sum()


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_match_one(dataset, reference_run, tmp_path):
  workdir = tmp_path / 'two'
  port = _free_port()
  processes = [subprocess.Popen(
      [sys.executable, str(ROOT / 'main.py')] + _flags(dataset, workdir) + [
          f'--coordinator_address=localhost:{port}', '--num_processes=2', f'--process_id={i}'],
      env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in processes]
  for p, (_, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-4000:]
  assert outputs[1][0] == ''  # only process 0 prints
  one, two = _train_losses(reference_run), _train_losses(workdir)
  assert sorted(one) == sorted(two)
  np.testing.assert_allclose([two[s] for s in sorted(one)], [one[s] for s in sorted(one)],
                             rtol=1e-5)
  _assert_params_close(_final_params(workdir, tmp_path), _final_params(reference_run, tmp_path))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(dataset, tmp_path):
  workdir = tmp_path / 'diverged'
  result = _run(_flags(dataset, workdir, lr=1e30), check=False)
  assert result.returncode != 0
  assert 'non-finite loss or gradient at step' in result.stderr
  params = _final_params(workdir, tmp_path)
  assert np.all(np.isfinite(_flat(params)))


def test_skip_policy_finishes_with_finite_parameters(dataset, tmp_path):
  workdir = tmp_path / 'skipped'
  _run(_flags(dataset, workdir, lr=1e30, nan_policy='skip', num_epochs=1))
  assert np.all(np.isfinite(_flat(_final_params(workdir, tmp_path))))


def test_incompatible_resume_is_refused(dataset, reference_run):
  result = _run(_flags(dataset, reference_run, lr=5e-4, mask_patch=5), check=False)
  assert result.returncode == 2
  assert 'differing keys: lr, mask_patch' in result.stderr


def _start(args):
  return subprocess.Popen([sys.executable, str(ROOT / 'main.py')] + args, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(workdir, count):
  deadline = time.time() + 300
  while time.time() < deadline:
    if (workdir / 'metrics.jsonl').exists() and len(_train_losses(workdir)) >= count:
      return
    time.sleep(0.02)
  raise AssertionError(f'{workdir}: fewer than {count} steps logged in 300 s')


def test_sigterm_saves_and_exits_then_resumes_identically(dataset, reference_run, tmp_path):
  workdir = tmp_path / 'terminated'
  args = _flags(dataset, workdir)
  process = _start(args)
  _wait_for_steps(workdir, 4)
  process.send_signal(signal.SIGTERM)
  out, err = process.communicate(timeout=300)
  assert process.returncode == 0, err[-3000:]
  saved = int(out.split('SIGTERM: saved the checkpoint at step ')[1].split(';')[0])
  assert saved < 18 and (workdir / 'checkpoints' / str(saved)).is_dir()
  _run(args)
  assert _rows(workdir) == _rows(reference_run)


def test_damaged_latest_checkpoint_is_skipped(dataset, reference_run, tmp_path):
  workdir = tmp_path / 'damaged'
  args = _flags(dataset, workdir, max_steps=10)
  _run(args)
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps[-1] == 10
  for path in (workdir / 'checkpoints' / '10' / 'state').rglob('*'):
    if path.is_file():
      path.write_bytes(b'')
  result = _run(_flags(dataset, workdir))
  assert 'checkpoint at step 10 is incomplete or damaged' in result.stderr
  assert _rows(workdir) == _rows(reference_run)
