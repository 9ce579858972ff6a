"""Helpers for tests: a tiny config, runs of `main.py` end to end in subprocesses on a tiny
dataset (one or several processes), and comparisons of runs."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np

import ssast_jax
from ssast_jax import export
from ssast_jax.config import defaults
from ssast_jax.training import host_allocator

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIME_KEYS = ('train/clips_per_s', 'train/data_wait_ms')
MIDS = ('/m/a', '/m/b', '/m/c')  # the classes of write_labelled_clips


def write_label_csv(path):
  """The index,mid,display_name CSV of MIDS at `path`."""
  path.write_text('index,mid,display_name\n' +
                  ''.join(f'{i},{mid},"class {i}"\n' for i, mid in enumerate(MIDS)))
  return path


def write_labelled_clips(root, split, count, seed, missing=()):
  """`count` labelled `.pt` clips of 40..90 frames x 64 bins (padded or cut to 64) under
  `root/SPLIT_pt` and their JSON `root/SPLIT.json`; clip i is of class i % 3 (MIDS), with
  the bins `5c..5c+4` of every 16-bin patch row raised: a patch-level pattern, since a
  clip feature averages the patch tokens over position. The JSON also lists the `missing`
  wavs, which have no `.pt` file. Returns (JSON path, .pt folder)."""
  import torch  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  pt_dir = root / f'{split}_pt'
  pt_dir.mkdir()
  entries = []
  for i in range(count):
    label = i % 3
    fbank = rng.normal(-5, 1, (int(rng.integers(40, 90)), 64)).astype(np.float32)
    fbank[:, (np.arange(64) % 16) // 5 == label] += 4
    torch.save(torch.from_numpy(fbank), pt_dir / f'{split}{i}.pt')
    entries.append({'wav': f'/audio/{split}{i}.wav', 'labels': MIDS[label]})
  entries += [{'wav': wav, 'labels': MIDS[0]} for wav in missing]
  json_path = root / f'{split}.json'
  json_path.write_text(json.dumps({'data': entries}))
  return json_path, pt_dir


def tiny_config(**overrides):
  """A tiny model on 64 x 64 inputs (4 x 4 patches); '__' in a key stands for '.'."""
  config = defaults.get_config()
  values = {'model.size': 'tiny', 'model.depth': 1, 'data.target_length': 64,
            'data.num_mel_bins': 64, 'mask_patch': 6, 'eval_mask_patch': 6, 'batch_size': 8,
            'warmup': False}
  values.update({k.replace('__', '.'): v for k, v in overrides.items()})
  for key, value in values.items():
    *parents, name = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  return config


def tiny_run_flags(dataset, workdir, **overrides):
  """`main.py` arguments: a 1-block tiny model on 64 x 64 clips of `dataset` (the dict of
  `write_demo_dataset`), 2 epochs, logging every step; `overrides` set config keys."""
  config = {'data.train_json': dataset['train_json'], 'data.train_pt_dir': dataset['train_pt_dir'],
            'data.val_json': dataset['val_json'], 'data.val_pt_dir': dataset['val_pt_dir'],
            'data.shards_dir': os.path.join(os.path.dirname(dataset['train_json']), 'shards'),
            'data.target_length': 64, 'data.num_mel_bins': 64, 'data.mean': -7.0,
            'data.std': 2.5, 'model.size': 'tiny', 'model.depth': 1, 'mask_patch': 6,
            'eval_mask_patch': 6, 'batch_size': 8, 'lr': 1e-4, 'warmup': False,
            'num_epochs': 2, 'epoch_iter': 8, 'checkpoint_every_steps': 3,
            'print_every_steps': 1, 'keep_checkpoints': 2, 'eval_picture': False}
  config.update(overrides)
  return ['--config', str(ROOT / 'configs' / 'pretrain_joint.py'), f'--workdir={workdir}'] + [
      f'--config.{k}={v}' for k, v in config.items()]


def env(devices=1):
  """The environment of a CPU run with `devices` forced host devices, and glibc's malloc
  tunables of host_allocator already set: main.py trains as it does by default without
  restarting itself first (the demo test runs that restart)."""
  return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
              GLIBC_TUNABLES=host_allocator.TUNABLES)


def run_main(args, devices=1, check=True):
  result = subprocess.run([sys.executable, str(ROOT / 'main.py')] + args, env=env(devices),
                          capture_output=True, text=True, timeout=600)
  if check and result.returncode:
    raise AssertionError(f'main.py failed ({result.returncode}):\n{result.stderr[-4000:]}')
  return result


def metric_rows(workdir):
  """metrics.jsonl rows without the timing keys."""
  lines = pathlib.Path(workdir, 'metrics.jsonl').read_text().splitlines()
  return [{k: v for k, v in json.loads(line).items() if k not in TIME_KEYS} for line in lines]


def train_losses(workdir):
  return {r['step']: r['train/loss'] for r in metric_rows(workdir) if 'train/loss' in r}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def start_processes(args, count=2):
  """`count` processes of one `main.py` job on this host, with pipes for their output."""
  port = free_port()
  return [subprocess.Popen(
      [sys.executable, str(ROOT / 'main.py')] + args + [
          f'--coordinator_address=localhost:{port}', f'--num_processes={count}',
          f'--process_id={i}'],
      env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(count)]


def wait_for_steps(workdir, count, timeout=300):
  """Waits until `workdir`'s metrics.jsonl logs `count` training steps."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    try:
      if len(train_losses(workdir)) >= count:
        return
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or a torn line
      pass
    time.sleep(0.005)
  raise AssertionError(f'{workdir}: fewer than {count} steps logged in {timeout} s')


def final_params(workdir, tmp_path, which='latest'):
  """The parameters of `workdir`'s `which` checkpoint as `python -m ssast_jax.export` writes
  them (a .pth read back), exported in this process."""
  out = tmp_path / f'{pathlib.Path(workdir).name}-{which}.pth'
  export.export(str(workdir), str(out), which)
  return ssast_jax.from_pytorch(out).params


def assert_same_run(workdir, reference, tmp_path):
  """Same per-step losses and final parameters as the reference run, up to float rounding.

  The losses agree to 1e-3: on this tiny cluster-masked config they drift apart by up to
  2.6e-4 after 18 steps (measured), because Adam turns rounding noise into lr-sized steps
  where the exact gradient is 0 (see assert_params_close) and the MPC head's drift reaches
  the encoder through the MPC loss; other masks or a wrong batch split move them by percents.
  """
  expected, got = train_losses(reference), train_losses(workdir)
  assert sorted(got) == sorted(expected)
  np.testing.assert_allclose([got[s] for s in sorted(expected)],
                             [expected[s] for s in sorted(expected)], rtol=1e-3)
  assert_params_close(final_params(workdir, tmp_path), final_params(reference, tmp_path))


def assert_params_close(got, expected):
  """Equal up to float summation order, which differs between device counts.

  Adam turns rounding noise into full-size steps wherever the exact gradient is (near) 0:
  every key bias has exactly zero gradient (a shared shift cancels in a softmax), and so
  does the MPC head (cpred) along the directions that shift all of a clip's predictions
  together, which its InfoNCE ignores; its gradient is a nearly cancelling sum. The MPC
  head therefore drifts apart by a few learning rates in some of its elements, and through
  the MPC loss the encoder follows: parameters are compared by norm (1e-2 relative).
  """
  got_leaves = jax.tree_util.tree_leaves_with_path(got)
  expected_leaves = jax.tree.leaves(expected)
  for (path, a), b in zip(got_leaves, expected_leaves):
    a, b = np.asarray(a), np.asarray(b)
    assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(b) + 1e-3, jax.tree_util.keystr(path)
