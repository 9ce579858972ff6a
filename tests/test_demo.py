"""The newcomer's first command, end to end: `python main.py --config=configs/demo.py`."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np

import ssast_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_demo_learns_checkpoints_and_exports(tmp_path):
  workdir = tmp_path / 'demo'
  env = {**os.environ, 'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu'}
  run = subprocess.run([sys.executable, str(ROOT / 'main.py'), '--config',
                        str(ROOT / 'configs' / 'demo.py'), f'--workdir={workdir}'],
                       env=env, capture_output=True, text=True, timeout=900)
  assert run.returncode == 0, run.stderr[-4000:]
  assert 'normalisation from' in run.stdout  # mean/std taken from the manifest, and said so

  manifest = json.loads((workdir / 'shards' / 'train' / 'manifest.json').read_text())
  assert manifest['counts']['missing'] == 3 and manifest['num_clips'] == 360
  evals = [r for r in map(json.loads, (workdir / 'metrics.jsonl').read_text().splitlines())
           if 'eval/mpc_acc' in r]
  assert evals[0]['step'] == 0 and evals[-1]['step'] == 616
  assert evals[-1]['eval/mpc_acc'] >= 5 * evals[0]['eval/mpc_acc'], evals
  assert evals[-1]['eval/mpg_loss'] < evals[0]['eval/mpg_loss']
  events = [p.read_bytes() for p in (workdir / 'tensorboard').rglob('*') if p.is_file()]
  assert any(b'val/clip' in e for e in events)  # the clip figure of each validation

  out = tmp_path / 'demo.pth'
  subprocess.run([sys.executable, '-m', 'ssast_jax.export', '--workdir', str(workdir),
                  '--out', str(out)], env=env, check=True, capture_output=True, timeout=300)
  model = ssast_jax.from_pytorch(out)
  assert (model.config.embed_dim, model.config.depth, model.config.patch_grid) == (192, 2, (8, 16))
  assert all(np.all(np.isfinite(np.asarray(v))) for v in
             jax.tree.leaves(model.params))
