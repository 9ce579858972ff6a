"""The newcomer's first command, end to end: `python main.py --config=configs/demo.py`, cut
to its first 4 of 28 epochs (88 of 616 steps, one validation after step 0's) to fit the
suite's time (validation MPC accuracy 0.030 -> 0.059 there, 2026-12-03)."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np

import ssast_jax
from ssast_jax import export

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_demo_learns_checkpoints_and_exports(tmp_path):
  workdir = tmp_path / 'demo'
  env = {**os.environ, 'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu'}
  run = subprocess.run([sys.executable, str(ROOT / 'main.py'), '--config',
                        str(ROOT / 'configs' / 'demo.py'), f'--workdir={workdir}',
                        '--config.num_epochs=4'],
                       env=env, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-4000:]
  assert 'normalisation from' in run.stdout  # mean/std taken from the manifest, and said so

  manifest = json.loads((workdir / 'shards' / 'train' / 'manifest.json').read_text())
  assert manifest['counts']['missing'] == 3 and manifest['num_clips'] == 360
  evals = [r for r in map(json.loads, (workdir / 'metrics.jsonl').read_text().splitlines())
           if 'eval/mpc_acc' in r]
  assert [r['step'] for r in evals] == [0, 88]
  assert evals[-1]['eval/mpc_acc'] >= 1.5 * evals[0]['eval/mpc_acc'], evals
  assert evals[-1]['eval/mpg_loss'] < evals[0]['eval/mpg_loss']
  events = [p.read_bytes() for p in (workdir / 'tensorboard').rglob('*') if p.is_file()]
  assert any(b'val/clip' in e for e in events)  # the clip figure of each validation

  out = tmp_path / 'demo.pth'
  export.export(workdir, out)  # what `python -m ssast_jax.export` runs
  model = ssast_jax.from_pytorch(out)
  assert (model.config.embed_dim, model.config.depth, model.config.patch_grid) == (192, 2, (8, 16))
  assert all(np.all(np.isfinite(np.asarray(v))) for v in
             jax.tree.leaves(model.params))
