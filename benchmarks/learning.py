"""What pretraining is worth: frozen-feature probes and short fine-tunings of a tiny model
after a few pretraining budgets.

  python benchmarks/learning.py --workdir DIR [--budgets 0,1000,3000] [--depth 4]
      [--batch_size 16] [--lr 5e-4] [--mask_patch 40] [--ft_epochs 10] [--ft_lr 1e-4]
      [--seed 0] [--no_finetune] [--pretrain_run DIR] [--out PATH]

Makes the spoken-keyword set of benchmarks/keywords.py in DIR/keywords (espeak-ng), pretrains
a tiny model (`pretrain_joint`, the original's objective, cluster masking) on every word
with `main.py` for the largest budget, checkpointing at each budget, and for each budget's
checkpoint fits `ssast_jax.probe.probe` (logistic) on the labelled training voices' clip
features and scores it on the held-out voices (10 keywords, chance 0.10). Features are
probed at every depth: the mean over patch tokens of each block's output, of the final norm
(`embed`'s `clip`, what `avgtok` fine-tuning pools), and of the two leading tokens (what
`cls` pools). Prints and writes (`--out`, default benchmarks/results/learning.json) the
accuracies per budget and feature, with the settings used, and a PNG of them beside it.

Then each budget's checkpoint is fine-tuned (`configs/finetune.py` through `main.py`:
avgtok, stride 16, cross-entropy, lr `--ft_lr` without warm-up, `--ft_epochs` epochs) on
the same labelled training voices and scored on the held-out ones after every epoch;
budget 0 is the untrained encoder, i.e. fine-tuning the same architecture from scratch with
the same fine-tuning budget. `--no_finetune` skips this half. `--pretrain_run` uses the
checkpoints of an earlier run of this script (DIR/pretrain) instead of pretraining again.
`--seed` seeds the pretraining (initial weights, masks, data order) and the fine-tunings;
the keyword set and the probe do not depend on it.
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
from ssast_jax.interchange import workdir as run_record  # pylint: disable=wrong-import-position
from ssast_jax.data import sources  # pylint: disable=wrong-import-position
from ssast_jax.finetune import labels  # pylint: disable=wrong-import-position
from ssast_jax.model import abstract_model  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET_LENGTH = 128  # frames: keywords.CLIP_SECONDS
# The pretraining config: the defaults with the normalisation statistics of the keyword
# set's own shard manifest (None, which only a config file can set).
PRETRAIN_CONFIG = '''from ssast_jax.config import defaults


def get_config():
  config = defaults.get_config()
  config.data.mean = None
  config.data.std = None
  return config
'''


def pretrain(args, data_dir: str, workdir: str, steps: int, budgets) -> None:
  """Runs main.py to `steps` steps, a checkpoint at each of `budgets` (every 250 steps)."""
  every = int(np.gcd.reduce([b for b in budgets if b] + [250]))
  flags = {
      'data.train_json': f'{data_dir}/pretrain_train.json',
      'data.val_json': f'{data_dir}/pretrain_val.json', 'data.train_audio': True,
      'data.audio_root': data_dir,
      'data.target_length': TARGET_LENGTH, 'model.size': 'tiny', 'model.depth': args.depth,
      'mask_patch': args.mask_patch, 'eval_mask_patch': args.mask_patch,
      'batch_size': args.batch_size, 'lr': args.lr, 'warmup': False, 'num_epochs': 1000,
      'max_steps': steps, 'epoch_iter': 500, 'checkpoint_every_steps': every,
      'keep_checkpoints': 1000, 'print_every_steps': 50, 'eval_picture': False,
      'seed': args.seed}
  os.makedirs(workdir, exist_ok=True)
  config_path = os.path.join(workdir, 'learning_config.py')
  with open(config_path, 'w', encoding='utf-8') as f:
    f.write(PRETRAIN_CONFIG)
  command = [sys.executable, os.path.join(ROOT, 'main.py'), f'--config={config_path}',
             f'--workdir={workdir}']
  command += [f'--config.{k}={v}' for k, v in flags.items()]
  subprocess.run(command, check=True)


def finetune(args, data_dir: str, run_dir: str, budget: int, mean: float,
             std: float) -> dict:
  """Fine-tunes the `budget`-step checkpoint of `run_dir` (`configs/finetune.py`, CE and
  accuracy, `--ft_epochs` epochs) with `main.py`; its per-epoch validation accuracies."""
  workdir = os.path.join(args.workdir, 'finetune', str(budget))
  os.makedirs(workdir, exist_ok=True)
  pretrained = os.path.join(workdir, 'pretrained.pth')
  export.export(run_dir, pretrained, budget)
  flags = {
      'pretrained': pretrained, 'data.train_json': f'{data_dir}/train.json',
      'data.val_json': f'{data_dir}/val.json', 'data.train_audio': True,
      'data.audio_root': data_dir, 'data.label_csv': f'{data_dir}/labels.csv',
      'data.shards_dir': os.path.join(args.workdir, 'finetune', 'shards'),
      'data.target_length': TARGET_LENGTH, 'data.mean': mean, 'data.std': std,
      'fstride': 16, 'tstride': 16, 'loss': 'ce', 'metrics': 'acc',
      'batch_size': args.batch_size, 'lr': args.ft_lr, 'warmup': False,
      'num_epochs': args.ft_epochs, 'print_every_steps': 50,
      'checkpoint_every_steps': 100000, 'keep_checkpoints': 1, 'seed': args.seed}
  command = [sys.executable, os.path.join(ROOT, 'main.py'),
             f'--config={os.path.join(ROOT, "configs/finetune.py")}',
             f'--workdir={os.path.join(workdir, "run")}']
  subprocess.run(command + [f'--config.{k}={v}' for k, v in flags.items()], check=True)
  with open(os.path.join(workdir, 'run', 'metrics.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  return {'epoch_acc': [round(r['eval/acc'], 4) for r in rows if 'eval/acc' in r]}


def probe_data(data_dir: str, mean: float, std: float):
  """Normalised fbanks and multi-hot targets of the labelled train and val clips."""
  table = labels.load_label_table(f'{data_dir}/labels.csv')
  out = []
  for split in ('train', 'val'):
    out += probe.load_split(split, f'{data_dir}/{split}.json', table, sources.AUDIO,
                            data_dir, 128, TARGET_LENGTH, mean, std)
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


def plot(report: dict, path: str) -> None:
  """The probe and fine-tuning accuracies against the pretraining budget, as a PNG."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=import-outside-toplevel
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  budgets = report['settings']['budgets']
  figure = Figure(figsize=(6, 4), dpi=120)
  axes = figure.add_subplot()
  probes = report['probe_acc']
  for name, label in (('final_norm_avgtok', 'probe: final norm (avgtok)'),
                      (f'block_{report["settings"]["depth"]}', 'probe: last block'),
                      ('cls_tokens', 'probe: leading tokens (cls)')):
    axes.plot(budgets, [probes[b][name] for b in budgets], 'o-', label=label)
  if report['finetune_acc']:
    epochs = report['settings']['ft_epochs']
    axes.plot(budgets, [report['finetune_acc'][b]['epoch_acc'][-1] for b in budgets], 's-k',
              label=f'fine-tuned {epochs} epochs (0 steps: from scratch)')
  axes.axhline(1 / report['settings']['classes'], color='grey', ls=':', label='chance')
  axes.set(xlabel='pretraining steps', ylabel='held-out voices: accuracy', ylim=(0, 1))
  axes.legend(fontsize=8, loc='lower right')
  figure.tight_layout()
  FigureCanvasAgg(figure).print_png(path)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--budgets', default='0,1000,3000')
  parser.add_argument('--depth', type=int, default=4)
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--lr', type=float, default=5e-4)
  parser.add_argument('--mask_patch', type=int, default=40)
  parser.add_argument('--ft_epochs', type=int, default=10)
  parser.add_argument('--ft_lr', type=float, default=1e-4)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--no_finetune', action='store_true', help='probes only')
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
    settings, _, params = run_record.workdir_params(run_dir, budget)
    train_f = depth_features(settings, params, train_x)
    val_f = depth_features(settings, params, val_x)
    results[budget] = {name: probe.probe(None, train_f[i], train_y, val_f[i], val_y)['acc']
                       for i, name in enumerate(names)}
    print(budget, json.dumps(results[budget]), flush=True)
  finetuned = {} if args.no_finetune else {
      budget: finetune(args, data_dir, run_dir, budget, manifest['mean'], manifest['std'])
      for budget in budgets}
  report = {'settings': {**vars(args), 'budgets': budgets, 'model': 'tiny',
                         'objective': 'pretrain_joint', 'mask_mode': 'cluster',
                         'classes': len(keywords.KEYWORDS)},
            'probe_acc': results, 'finetune_acc': finetuned}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, 'w', encoding='utf-8') as f:
    json.dump(report, f, indent=1)
  plot(report, os.path.splitext(args.out)[0] + '.png')
  print(json.dumps(report))


if __name__ == '__main__':
  main()
