"""What pretraining is worth: frozen-feature probes of a tiny model after a few budgets.

  python benchmarks/learning.py --workdir DIR [--budgets 0,1000,3000] [--depth 4]
      [--batch_size 16] [--lr 5e-4] [--mask_patch 40] [--pretrain_run DIR] [--out PATH]

Makes the spoken-keyword set of benchmarks/keywords.py in DIR/keywords (espeak-ng), pretrains
a tiny model (`pretrain_joint`, the original's objective, cluster masking) on every word
with `main.py` for the largest budget, checkpointing at each budget, and for each budget's
checkpoint fits `ssast_jax.probe.probe` (logistic) on the labelled training voices' clip
features and scores it on the held-out voices (10 keywords, chance 0.10). Features are
probed at every depth: the mean over patch tokens of each block's output, of the final norm
(`embed`'s `clip`, what `avgtok` fine-tuning pools), and of the two leading tokens (what
`cls` pools). Prints and writes (`--out`, default benchmarks/results/learning.json) the
accuracies per budget and feature, with the settings used. `--pretrain_run` probes the
checkpoints of an earlier run of this script (DIR/pretrain) instead of pretraining again.

Not yet here: the short fine-tuning of each budget's model against fine-tuning from scratch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import keywords  # pylint: disable=wrong-import-position
from ssast_jax import export, probe  # pylint: disable=wrong-import-position
from ssast_jax.data import sources  # pylint: disable=wrong-import-position
from ssast_jax.finetune import labels  # pylint: disable=wrong-import-position
from ssast_jax.model import abstract_model  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_LENGTH = 128  # frames: keywords.CLIP_SECONDS


def pretrain(args, data_dir: str, workdir: str, steps: int, budgets) -> None:
  """Runs main.py to `steps` steps, a checkpoint at each of `budgets` (every 250 steps)."""
  every = int(np.gcd.reduce([b for b in budgets if b] + [250]))
  flags = {
      'data.train_json': f'{data_dir}/pretrain_train.json',
      'data.val_json': f'{data_dir}/pretrain_val.json', 'data.train_audio': True,
      'data.audio_root': data_dir, 'data.mean': None, 'data.std': None,
      'data.target_length': TARGET_LENGTH, 'model.size': 'tiny', 'model.depth': args.depth,
      'mask_patch': args.mask_patch, 'eval_mask_patch': args.mask_patch,
      'batch_size': args.batch_size, 'lr': args.lr, 'warmup': False, 'num_epochs': 1000,
      'max_steps': steps, 'epoch_iter': 500, 'checkpoint_every_steps': every,
      'keep_checkpoints': 1000, 'print_every_steps': 50, 'eval_picture': False}
  command = [sys.executable, os.path.join(ROOT, 'main.py'),
             f'--config={ROOT}/configs/pretrain_joint.py', f'--workdir={workdir}']
  command += [f'--config.{k}={v}' for k, v in flags.items()]
  subprocess.run(command, check=True)


def probe_data(data_dir: str, mean: float, std: float):
  """Normalised fbanks and multi-hot targets of the labelled train and val clips."""
  table = labels.load_label_table(f'{data_dir}/labels.csv')
  out = []
  for split in ('train', 'val'):
    entries, targets = probe._targets(f'{data_dir}/{split}.json', table)  # pylint: disable=protected-access
    clips = [probe._normalised(  # pylint: disable=protected-access
        sources.load_clip(sources.AUDIO, sources.clip_path(sources.AUDIO, data_dir, wav), 128),
        TARGET_LENGTH, mean, std) for wav, _ in entries]
    out += [np.stack(clips).astype(np.float32), targets]
  return out


def depth_features(settings, params, x, batch_size: int = 64) -> np.ndarray:
  """`(depth + 2, N, D)`: per block the mean over patch tokens of its output, then of the
  final norm's, then the mean of the two leading final-norm tokens."""
  graphdef, _ = abstract_model(settings.model)

  @jax.jit
  def features(params, batch):
    model = nnx.merge(graphdef, params)
    h, outs = model.embed(batch, None), []
    for block in model.blocks:
      h = block(h)
      outs.append(jnp.mean(h[:, 2:], 1))
    normed = model.norm(h)
    return jnp.stack(outs + [jnp.mean(normed[:, 2:], 1), jnp.mean(normed[:, :2], 1)])

  return np.concatenate([np.asarray(features(params, jnp.asarray(x[i:i + batch_size])))
                         for i in range(0, len(x), batch_size)], axis=1)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--budgets', default='0,1000,3000')
  parser.add_argument('--depth', type=int, default=4)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--lr', type=float, default=5e-4)
  parser.add_argument('--mask_patch', type=int, default=40)
  parser.add_argument('--pretrain_run', help='an earlier pretraining run to probe')
  parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks/results/learning.json'))
  args = parser.parse_args()
  budgets = sorted({int(b) for b in args.budgets.split(',')})
  data_dir = os.path.join(args.workdir, 'keywords')
  keywords.make_dataset(data_dir)
  run_dir = args.pretrain_run or os.path.join(args.workdir, 'pretrain')
  if not args.pretrain_run:
    pretrain(args, data_dir, run_dir, max(max(budgets), 1), budgets)
  shards = json.load(open(f'{run_dir}/config.json', encoding='utf-8'))['data']['shards_dir']
  manifest_path = os.path.join(shards or os.path.join(run_dir, 'shards'), 'train/manifest.json')
  manifest = json.load(open(manifest_path, encoding='utf-8'))
  train_x, train_y, val_x, val_y = probe_data(data_dir, manifest['mean'], manifest['std'])
  names = [f'block_{i + 1}' for i in range(args.depth)] + ['final_norm_avgtok', 'cls_tokens']
  results = {}
  for budget in budgets:
    settings, _, params = export.workdir_params(run_dir, budget)
    train_f = depth_features(settings, params, train_x)
    val_f = depth_features(settings, params, val_x)
    results[budget] = {name: probe.probe(None, train_f[i], train_y, val_f[i], val_y)['acc']
                       for i, name in enumerate(names)}
    print(budget, json.dumps(results[budget]), flush=True)
  report = {'settings': {**vars(args), 'budgets': budgets, 'model': 'tiny',
                         'objective': 'pretrain_joint', 'mask_mode': 'cluster',
                         'classes': len(keywords.KEYWORDS)},
            'probe_acc': results}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=1)
  print(json.dumps(report))


if __name__ == '__main__':
  main()
