"""Pictures of a pretraining run: what the model makes of masked clips, and its curves.

python -m ssast_jax.visualize --workdir W [--split val] [--clips 4] [--out DIR] [--seed 0]

writes DIR (default W/pictures)/metrics.png, every numeric series of W/metrics.jsonl against
step, and clip-NNNNN.png (NNNNN: the clip's index in the split's shards) for a few clips:
the newest checkpoint's view in four panels after the original's `visualize_mask` probe:
the normalised input, the mask on it, the MPG reconstruction pasted into it, and which
masked patches MPC classified correctly. One mask drives both heads in one forward pass
(as `losses.joint_one_pass`), so the panels show the same patches. Bad input ends in one
line `error: ...` and exit code 2. `clip_figure_image` gives the clip figure as an RGB
array, for TensorBoard. Figures are drawn on matplotlib's Agg canvas directly (no pyplot,
no display, no global backend change).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from matplotlib import image as mpl_image
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PatchCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from ssast_jax.handles import ModelHandle
from ssast_jax.config.settings import ConfigError, Settings, resolve_saved, split_shards_dir
from ssast_jax.data import ManifestError, ShardedFeatures, read_manifest
from ssast_jax.data.pipeline import BatchAssembler
from ssast_jax.finetune.model import pretrained_from_workdir
from ssast_jax.model import ModelConfig
from ssast_jax.objective import losses, masking
from ssast_jax.training import checkpoints, metrics

DPI = 100
CLIP_FIGURE_WIDTH = 10.0  # inches; each panel's height follows the clip's aspect
CURVE_PANEL_SIZE = (5.0, 2.4)  # inches per (split, metric group) panel of metrics.png


# ----------------------------------------------------------------------------- model side


def pretext_predictions(model, x: jax.Array, mask: jax.Array) -> dict:
  """Per-patch pretext outputs of an SSAST `model` on a normalised batch `x` `(B, T, F)`
  with one mask `(B, M)` read by both heads: `reconstruction` `(B, M, P)` (the MPG head's
  patches) and `correct` `(B, M)` bool (MPC picked the patch's own target among the clip's
  masked patches). Computed as `losses.joint_one_pass` computes its per-clip means:
  `mean(correct)` is its accuracy and the MSE of `reconstruction` its MPG loss."""
  hidden = losses.masked_outputs(model.encode(x, mask), mask)
  targets = losses.gather_patches(model.patches(x), mask).astype(jnp.float32)
  scores = jnp.einsum('bak,bck->bac', targets, model.cpred(hidden).astype(jnp.float32))
  best_target = jnp.argmax(jax.nn.softmax(scores, axis=-1), axis=-2)  # as losses.infonce
  return {'reconstruction': model.gpred(hidden).astype(jnp.float32),
          'correct': best_target == jnp.arange(mask.shape[-1])}


@functools.partial(jax.jit, static_argnums=0)
def _predict(graphdef, state, x, mask):
  return pretext_predictions(nnx.merge(graphdef, state), x, mask)


def draw_mask(settings: Settings, key: jax.Array, mode: str | None = None) -> np.ndarray:
  """One validation-sized mask `(eval_mask_patch,)` int32 of the run's mask mode (or
  `mode`) from a PRNG `key`; the same key gives the same mask at every evaluation."""
  o = settings.objective
  return np.asarray(masking.masks_from_keys(key[None], o.patch_grid, o.eval_mask_patch,
                                            mode or o.mask_mode, o.cluster_factor)[0])


def clip_figure_image(model: ModelHandle, clip, mask, *, title: str = '') -> np.ndarray:
  """The clip figure of `model` as an RGB image `(H, W, 3)` uint8 (TensorBoard's HWC).

  `clip`: one normalised clip `(input_tdim, input_fdim)`, as the input pipeline gives it;
  `mask`: `(M,)` patch indices (`draw_mask`). Pure apart from compiling once per model
  geometry; the parameters may be any single-process placement, FSDP-sharded included.
  """
  c = model.config
  clip = np.asarray(clip, np.float32)
  if clip.shape != (c.input_tdim, c.input_fdim):
    raise ValueError(f'clip has shape {clip.shape}, expected ({c.input_tdim}, '
                     f'{c.input_fdim}): frames x mel bins of the model input')
  mask = np.asarray(mask, np.int32)
  out = jax.device_get(_predict(model.graphdef, model.state, jnp.asarray(clip)[None],
                                jnp.asarray(mask)[None]))
  return render(clip_figure(clip, mask, out['reconstruction'][0], out['correct'][0], c,
                            title))


# ----------------------------------------------------------------------------- drawing


def render(figure: Figure) -> np.ndarray:
  """A figure's pixels, `(H, W, 3)` uint8, drawn on an Agg canvas."""
  canvas = FigureCanvasAgg(figure)
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def paste_patches(clip: np.ndarray, mask: np.ndarray, values: np.ndarray,
                  config: ModelConfig) -> np.ndarray:
  """The clip as an image `(F, T)` with patches `mask` `(M,)` replaced by `values`
  `(M, fshape * tshape)`, laid out as `patchify` reads them (frequency-major)."""
  image = np.array(clip, np.float32).T
  fs, ts = config.fshape, config.tshape
  rows = (mask // config.patch_grid[1])[:, None, None] * fs + np.arange(fs)[None, :, None]
  cols = (mask % config.patch_grid[1])[:, None, None] * ts + np.arange(ts)[None, None, :]
  image[rows, cols] = np.asarray(values).reshape(-1, fs, ts)
  return image


def _fixed_grid(figure: Figure, rows: int, columns: int, sharex: bool = False,
                gaps=(0.7, 0.9), margins=(0.75, 0.2, 0.6, 0.5)):
  """A `rows x columns` array of axes `gaps` (vertical, horizontal) inches apart, within
  `margins` (left, right, top, bottom) inches: room for titles and tick labels without
  matplotlib's constrained layout, which takes seconds per figure."""
  width, height = figure.get_size_inches()
  left, right, top, bottom = margins
  axes_width = (width - left - right - (columns - 1) * gaps[1]) / columns
  axes_height = (height - top - bottom - (rows - 1) * gaps[0]) / rows
  return figure.subplots(rows, columns, squeeze=False, sharex=sharex, gridspec_kw={
      'left': left / width, 'right': 1 - right / width, 'top': 1 - top / height,
      'bottom': bottom / height, 'wspace': gaps[1] / axes_width,
      'hspace': gaps[0] / axes_height})


def _patch_boxes(mask, config: ModelConfig, **style) -> PatchCollection:
  """The masked patches as rectangles in image coordinates (pixel centres at integers)."""
  p_t, fs, ts = config.patch_grid[1], config.fshape, config.tshape
  boxes = [Rectangle((t * ts - 0.5, f * fs - 0.5), ts, fs)
           for f, t in zip(mask // p_t, mask % p_t)]
  return PatchCollection(boxes, **style)


def clip_figure(clip, mask, reconstruction, correct, config: ModelConfig,
                title: str = '') -> Figure:
  """The four panels of one clip (time on x, mel bins on y, origin lower) from the model's
  per-patch outputs (`pretext_predictions` for one clip)."""
  clip, mask, correct = np.asarray(clip, np.float32), np.asarray(mask), np.asarray(correct)
  frames, bins = clip.shape
  panel_height = min(max(CLIP_FIGURE_WIDTH * bins / frames, 1.2), 3.6) + 0.45
  figure = Figure(figsize=(CLIP_FIGURE_WIDTH, 4 * panel_height + 0.6), dpi=DPI)
  axes = _fixed_grid(figure, 4, 1, sharex=True, gaps=(0.45, 0))[:, 0]
  shown = {'origin': 'lower', 'aspect': 'auto', 'interpolation': 'nearest',
           'vmin': float(clip.min()), 'vmax': float(clip.max())}
  pasted = paste_patches(clip, mask, reconstruction, config)
  # Patches do not overlap in pretraining: the pasted image differs from the input only
  # inside the masked patches, so this is the MPG loss of the clip.
  mse = float(np.sum((pasted - clip.T) ** 2) / (len(mask) * config.pred_dim))
  hits = [(0.1, 0.8, 0.2, 0.75) if c else (0.9, 0.1, 0.1, 0.75) for c in correct]
  panels = [
      ('normalised input', clip.T, 'magma', None),
      (f'mask: {len(mask)} patches', clip.T, 'magma',
       {'facecolor': (1, 1, 1, 0.45), 'edgecolor': 'cyan', 'linewidth': 0.6}),
      (f'MPG reconstruction of the masked patches (MSE {mse:.4f})', pasted, 'magma',
       {'facecolor': 'none', 'edgecolor': 'cyan', 'linewidth': 0.4}),
      (f'MPC hits: {int(correct.sum())} of {len(mask)} ({correct.mean():.0%}) correct '
       '(green), the others wrong (red)', clip.T, 'gray',
       {'facecolor': hits, 'edgecolor': 'black', 'linewidth': 0.3})]
  for ax, (name, image, cmap, boxes) in zip(axes, panels):
    ax.imshow(image, cmap=cmap, **shown)
    if boxes is not None:
      ax.add_collection(_patch_boxes(mask, config, **boxes))
    ax.set_title(name, fontsize=9, loc='left')
    ax.set_ylabel('mel bin')
  axes[-1].set_xlabel('frame')
  figure.suptitle(title, fontsize=10)
  return figure


# ----------------------------------------------------------------------------- curves


def read_metrics(path: str) -> list[dict]:
  """The rows of a metrics.jsonl that are JSON objects with a numeric `step`; other lines
  (a last line torn by a kill) are skipped."""
  with open(path, encoding='utf-8') as f:
    rows = [_json_or_none(line) for line in f]
  return [r for r in rows if isinstance(r, dict) and _is_number(r.get('step'))]


def _json_or_none(line: str):
  try:
    return json.loads(line)
  except json.JSONDecodeError:
    return None


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_group(name: str) -> str:
  """The panel a metric (its name after the split prefix) is drawn in: 'loss', 'accuracy'
  (accuracies, mAP, AUC, ...), 'learning rate', or its own name (throughput, norms)."""
  lower = name.lower()
  if lower == 'lr' or 'learning_rate' in lower:
    return 'learning rate'
  if 'loss' in lower:
    return 'loss'
  if any(word in lower for word in ('acc', 'map', 'auc', 'precision', 'recall', 'f1')):
    return 'accuracy'
  return name


def metric_series(rows: list[dict]) -> dict:
  """{(split, group): {key: (steps, values)}} of every finite numeric value in `rows`.

  The split is a key's prefix before '/' ('train', 'eval', ...; '' for none), so train and
  validation are drawn apart whatever metrics a run logs (pretraining or fine-tuning).
  """
  series = {}
  for row in rows:
    for key, value in row.items():
      if key == 'step' or not _is_number(value):
        continue
      split, _, name = key.rpartition('/')
      steps, values = series.setdefault((split, metric_group(name)), {}).setdefault(
          key, ([], []))
      steps.append(row['step'])
      values.append(value)
  return series


def metrics_figure(rows: list[dict], title: str = '') -> Figure:
  """Curves against step: one column per split (train first, then eval), one row per
  metric group (loss, accuracy, learning rate, then the rest). Raises ValueError when
  `rows` hold no numeric metric."""
  series = metric_series(rows)
  if not series:
    raise ValueError('no numeric metrics')
  splits = sorted({s for s, _ in series}, key=lambda s: ({'train': 0, 'eval': 1}.get(s, 2), s))
  groups = sorted({g for _, g in series},
                  key=lambda g: ({'loss': 0, 'accuracy': 1, 'learning rate': 2}.get(g, 3), g))
  width, height = CURVE_PANEL_SIZE
  figure = Figure(figsize=(width * len(splits), height * len(groups) + 0.4), dpi=DPI)
  axes = _fixed_grid(figure, len(groups), len(splits))
  for row, group in enumerate(groups):
    for column, split in enumerate(splits):
      ax = axes[row][column]
      if (split, group) not in series:
        ax.set_visible(False)
        continue
      lines = sorted(series[split, group].items())
      for key, (steps, values) in lines:
        ax.plot(steps, values, marker='.', markersize=4, linewidth=1, label=key)
      if group == 'learning rate' and all(min(values) > 0 for _, (_, values) in lines):
        ax.set_yscale('log')  # plateau halvings as equal steps
      ax.xaxis.set_major_locator(MaxNLocator(integer=True))
      ax.set_title(f'{split or "other"}: {group}', fontsize=9, loc='left')
      ax.legend(fontsize=7)
      ax.grid(alpha=0.3)
      ax.set_xlabel('step', fontsize=8)
  figure.suptitle(title, fontsize=10)
  return figure


# ----------------------------------------------------------------------------- the run


def _latest_step(workdir: str) -> int:
  """The newest checkpoint's step (orbax names each checkpoint's folder by its step)."""
  ckpt_dir = checkpoints.checkpoint_dir(workdir)
  names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else ()
  if not any(n.isdigit() for n in names):
    raise FileNotFoundError(f'{ckpt_dir}: no checkpoint')
  return max(int(n) for n in names if n.isdigit())


def normalised_clips(settings: Settings, workdir: str, split: str, count: int):
  """(clip indices, wav ids, normalised clips `(count, T, F)`) of `count` clips spread evenly
  over the split's shards, prepared as validation prepares them (first `target_length`
  frames, padding, the run's normalisation)."""
  d = settings.data
  root = d.shards_dir or os.path.join(workdir, 'shards')
  features = ShardedFeatures(split_shards_dir(root, split))
  train_manifest = read_manifest(split_shards_dir(root, 'train'))
  mean = train_manifest['mean'] if d.mean is None else d.mean
  std = train_manifest['std'] if d.std is None else d.std
  indices = np.unique(np.linspace(0, len(features) - 1, min(count, len(features))).round()
                      .astype(np.int64))
  counts = np.minimum(features.lengths[indices], d.target_length)
  batch = BatchAssembler(features, d.target_length, mean, std)(
      indices, np.zeros_like(indices), counts)
  return indices, [features.wav(i) for i in indices], batch


def write_pictures(workdir: str, out: str | None = None, split: str = 'val', clips: int = 4,
                   seed: int = 0, mask_mode: str | None = None) -> list[str]:
  """Writes metrics.png and `clips` clip figures of `split` under `out` (default
  WORKDIR/pictures); returns their paths. Raises FileNotFoundError naming what is missing
  (workdir, config.json, metrics, checkpoint), ManifestError (shards), ConfigError or
  ValueError (a mask the geometry cannot hold)."""
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'{workdir}: no such workdir')
  config = checkpoints.read_config(workdir)  # FileNotFoundError naming config.json
  metrics_path = os.path.join(workdir, metrics.METRICS_FILE)
  if not os.path.isfile(metrics_path):
    raise FileNotFoundError(f'{metrics_path}: not found')
  rows = read_metrics(metrics_path)
  if not metric_series(rows):
    raise FileNotFoundError(f'{metrics_path}: no numeric metric rows')
  step = _latest_step(workdir)
  settings = resolve_saved(config)
  indices, wavs, batch = normalised_clips(settings, workdir, split, clips) if clips else (
      (), (), ())
  out = out or os.path.join(workdir, 'pictures')
  os.makedirs(out, exist_ok=True)
  written = [os.path.join(out, 'metrics.png')]
  mpl_image.imsave(written[0], render(metrics_figure(rows, title=workdir)))
  model = pretrained_from_workdir(workdir) if clips else None
  for index, wav, clip in zip(indices, wavs, batch):
    mask = draw_mask(settings, jax.random.fold_in(jax.random.key(seed), index), mask_mode)
    written.append(os.path.join(out, f'clip-{index:05d}.png'))
    mpl_image.imsave(written[-1], clip_figure_image(
        model, clip, mask, title=f'{split} clip {index} ({wav}), checkpoint step {step}'))
  return written


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog='python -m ssast_jax.visualize',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help='the training run directory')
  parser.add_argument('--split', choices=('train', 'val'), default='val',
                      help='the shards the clips come from (default val)')
  parser.add_argument('--clips', type=int, default=4, help='clip figures (default 4)')
  parser.add_argument('--out', help='where the PNGs go (default WORKDIR/pictures)')
  parser.add_argument('--seed', type=int, default=0, help='seed of the masks (default 0)')
  parser.add_argument('--mask-mode', choices=masking.MASK_MODES,
                      help="the masks' mode (default: the run's)")
  args = parser.parse_args(argv)
  if args.clips < 0:
    parser.error('--clips must be >= 0')
  try:
    written = write_pictures(args.workdir, args.out, args.split, args.clips, args.seed,
                             args.mask_mode)
  except (FileNotFoundError, ManifestError, ConfigError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'wrote {len(written)} pictures to {os.path.dirname(written[0])}')


if __name__ == '__main__':
  main()
