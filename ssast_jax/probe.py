"""A linear probe of a frozen SSAST: how linearly separable its clip embeddings are.

  python -m ssast_jax.probe --model PATH --train_json J --val_json J --label_csv C \
      (--train_pt_dir D --val_pt_dir D | --audio [--audio_root R]) [--kind logistic|ridge] \
      [--target_length T] [--mean M --std S] [--batch_size 16] [--out probe.json]

What is computed, and why:

  input     each clip's fbank (`<pt_dir>/<stem of wav>.pt`, or computed from the audio as the
            original does, with the model's `input_fdim` mel bins), zero-padded at the end or
            cut to the model's `input_tdim` frames (which its positional embedding fixes, so
            `--target_length` may only repeat it), then normalised `(x - mean) / (2 * std)`:
            the original dataloader's order, so the padding gets the value the model saw.
            `mean`/`std`: a workdir's own (as `hear.load_model` finds them), else (a `.pth`
            records none) the AudioSet statistics -4.2677393 / 4.5689974 of the published
            models; `--mean`/`--std` override either.
  features  `embed(model, x)['clip']`, the mean of the final-norm patch tokens (what `avgtok`
            pooling feeds a classifier head), in fixed-size jitted batches, the last one
            padded (one compilation). Features are standardised with the train set's mean/std.
  logistic  (default) softmax regression, or per-class sigmoid when any clip has more than
            one label, fitted full-batch by L-BFGS (optax) from zero weights for at most
            LOGISTIC_MAX_STEPS steps (fewer once the gradient vanishes), minimising the mean
            cross-entropy plus LOGISTIC_L2 / 2 |W|^2: deterministic, no learning rate to tune.
  ridge     closed-form ridge regression to the multi-hot targets (with an intercept); the
            penalty is the one of RIDGE_LAMBDAS with the lowest squared error on a seeded
            held-out fifth of the train set, or RIDGE_DEFAULT_LAMBDA below RIDGE_MIN_SPLIT clips.
  metrics   on the val set: `acc` as `evaluation.accuracy` (argmax of target vs of score) and
            `mAP`, the mean of `evaluation.average_precision` over the classes that have a
            positive val clip (for the others AP is undefined, nan in the original's mean).

Clips whose features cannot be had (missing, unreadable, wrong shape) are skipped and counted
(the original's dataloader would stop); bad labels, files or flags end the command with one
line `error: ...` and exit code 2. The result JSON (printed, and written to `--out`) holds
`acc`, `mAP`, `kind`, `multi_label`, `l2` (the penalty used), `num_train`, `num_val`,
`feature_dim`, `skipped` (per split) and the `mean`, `std` used. Pretraining's probe
(`probe.train_json`, docs/training.md) uses `load_split` and `probe` of this module.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssast_jax import loading
from ssast_jax.data import convert, sources
from ssast_jax.finetune import embed, evaluation, labels, pretrained_from_workdir

KINDS = ('logistic', 'ridge')
LOGISTIC_L2 = 1e-3  # on the mean loss, features standardised
LOGISTIC_MAX_STEPS = 500
LOGISTIC_TOLERANCE = 1e-6  # gradient norm at which L-BFGS stops early
RIDGE_LAMBDAS = (0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)  # on the summed squared error
RIDGE_DEFAULT_LAMBDA = 1.0
RIDGE_MIN_SPLIT = 20  # train clips needed to choose lambda on a held-out split
DEFAULT_BATCH_SIZE = 16


def clip_embeddings(model, fbanks, batch_size: int = DEFAULT_BATCH_SIZE) -> np.ndarray:
  """`(N, D)` float32 clip features of normalised `fbanks` `(N, input_tdim, input_fdim)`
  for a ModelHandle or classifier, `batch_size` clips per call, the last batch padded."""
  fbanks = np.asarray(fbanks, np.float32)
  out = []
  for start in range(0, len(fbanks), batch_size):
    chunk = fbanks[start:start + batch_size]
    padded = np.pad(chunk, ((0, batch_size - len(chunk)), (0, 0), (0, 0)))
    out.append(np.asarray(embed(model, padded)['clip'][:len(chunk)], np.float32))
  dim = model.config.embed_dim
  return np.concatenate(out) if out else np.zeros((0, dim), np.float32)


def _ridge(x, y, lambdas):
  """(weights (D, K), bias (K,)) of ridge regression of `y` on `x` for each lambda, from
  one eigendecomposition of the centred Gram matrix, in float64."""
  x_mean, y_mean = x.mean(0), y.mean(0)
  xc = x - x_mean
  s, v = np.linalg.eigh(xc.T @ xc)
  projected = v.T @ (xc.T @ (y - y_mean))
  fits = []
  for lam in lambdas:
    w = v @ (projected / (s + lam)[:, None])
    fits.append((w, y_mean - x_mean @ w))
  return fits


def _fit_ridge(x, y, seed: int):
  """(val scoring function, lambda): lambda by held-out squared error, refitted on all."""
  lam = RIDGE_DEFAULT_LAMBDA
  if len(x) >= RIDGE_MIN_SPLIT:
    order = np.random.default_rng(seed).permutation(len(x))
    held, fit = order[:len(x) // 5], order[len(x) // 5:]
    errors = [np.mean((x[held] @ w + b - y[held]) ** 2)
              for w, b in _ridge(x[fit], y[fit], RIDGE_LAMBDAS)]
    lam = RIDGE_LAMBDAS[int(np.argmin(errors))]
  (w, b), = _ridge(x, y, [lam])
  return lambda z: z @ w + b, lam


@functools.partial(jax.jit, static_argnames='multi_label')
def _logistic_params(x, y, multi_label: bool):
  """Weights and bias minimising the mean softmax (or sigmoid) cross-entropy plus
  `LOGISTIC_L2 / 2 * |W|^2`, by L-BFGS from zeros (optax's while-loop recipe)."""

  def loss(p):
    logits = x @ p['w'] + p['b']
    if multi_label:
      data = optax.sigmoid_binary_cross_entropy(logits, y).mean()
    else:
      data = optax.softmax_cross_entropy(logits, y).mean()
    return data + 0.5 * LOGISTIC_L2 * jnp.sum(p['w'] ** 2)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=loss)
    return optax.apply_updates(params, updates), state

  def running(carry):
    count = optax.tree_utils.tree_get(carry[1], 'count')
    grad_norm = optax.tree_utils.tree_norm(optax.tree_utils.tree_get(carry[1], 'grad'))
    return (count == 0) | ((count < LOGISTIC_MAX_STEPS) & (grad_norm >= LOGISTIC_TOLERANCE))

  params = {'w': jnp.zeros((x.shape[1], y.shape[1])), 'b': jnp.zeros(y.shape[1])}
  return jax.lax.while_loop(running, step, (params, opt.init(params)))[0]


def _fit_logistic(x, y, multi_label: bool):
  with jax.default_matmul_precision('highest'):
    p = jax.tree.map(np.asarray, _logistic_params(
        jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), multi_label=multi_label))
  w, b = p['w'].astype(np.float64), p['b'].astype(np.float64)
  if multi_label:
    return lambda z: 1 / (1 + np.exp(-(z @ w + b)))
  def softmax(z):
    logits = z @ w + b
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)
  return softmax


def probe(model, train_x, train_y, val_x, val_y, kind: str = 'logistic', seed: int = 0,
          batch_size: int = DEFAULT_BATCH_SIZE) -> dict:
  """Fits a `kind` probe on the train clips and scores it on the val clips.

  `train_x`, `val_x`: normalised fbanks `(N, T, F)`, embedded by `model` (`clip_embeddings`),
  or, with `model` None, clip features `(N, D)` already. `train_y`, `val_y`: multi-hot
  targets `(N, K)`. `seed` draws ridge's held-out split. Returns `acc`, `mAP` (None if no
  class has a positive val clip), `kind`, `multi_label`, `l2`, `num_train`, `num_val`,
  `feature_dim` (see the module's docstring).
  """
  if kind not in KINDS:
    raise ValueError(f'probe: unknown kind {kind!r}; expected one of {KINDS}')
  if model is not None:
    train_x, val_x = (clip_embeddings(model, x, batch_size) for x in (train_x, val_x))
  train_x, val_x = np.asarray(train_x, np.float64), np.asarray(val_x, np.float64)
  train_y, val_y = np.asarray(train_y, np.float64), np.asarray(val_y, np.float64)
  if (train_x.ndim != 2 or val_x.shape[1:] != train_x.shape[1:] or train_y.ndim != 2
      or val_y.shape[1:] != train_y.shape[1:] or len(train_x) != len(train_y)
      or len(val_x) != len(val_y) or not len(train_x) or not len(val_x)):
    raise ValueError(f'probe: need features (N, D) and targets (N, K) for train and val, '
                     f'N >= 1, got {train_x.shape}, {train_y.shape}, {val_x.shape}, '
                     f'{val_y.shape}')
  if not (np.isfinite(train_x).all() and np.isfinite(val_x).all()):
    raise ValueError('probe: the features hold NaN or infinite values')
  mean, std = train_x.mean(0), train_x.std(0)
  std[std < 1e-8] = 1.0  # constant features stay 0
  train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
  multi_label = bool((train_y.sum(1) > 1).any() or (val_y.sum(1) > 1).any())
  if kind == 'ridge':
    score, l2 = _fit_ridge(train_x, train_y, seed)
  else:
    score, l2 = _fit_logistic(train_x, train_y, multi_label), LOGISTIC_L2
  scores = score(val_x)
  present = [k for k in range(val_y.shape[1]) if val_y[:, k].any()]
  aps = [evaluation.average_precision(val_y[:, k], scores[:, k]) for k in present]
  return {'acc': evaluation.accuracy(scores, val_y),
          'mAP': float(np.mean(aps)) if aps else None, 'kind': kind,
          'multi_label': multi_label, 'l2': float(l2), 'num_train': len(train_x),
          'num_val': len(val_x), 'feature_dim': int(train_x.shape[1])}


def normalised(fbank, length: int, mean: float, std: float) -> np.ndarray:
  """The original dataloader's input: zero frames appended or frames cut to `length`,
  then `(x - mean) / (2 * std)`."""
  fbank = np.pad(fbank[:length], ((0, max(0, length - len(fbank))), (0, 0)))
  return (fbank - mean) / (2 * std)


def labelled_entries(json_path, table: labels.LabelTable):
  """(entries `[(wav, labels)]`, multi-hot targets `(N, K)`) of a dataset JSON; a bad label
  raises `labels.LabelError` naming the clip."""
  entries = convert.read_entries(Path(json_path))
  return entries, labels.multi_hot_batch([lab for _, lab in entries],
                                         [wav for wav, _ in entries], table)


def split_clips(split: str, entries, source: str, root, num_mel_bins: int, length: int,
                mean: float, std: float):
  """Yields `(row, clip)`: each clip of `entries` that has features (`source` is
  `sources.PT` or `sources.AUDIO`, read from `root`), `normalised` to `length` frames, with
  its row in `entries`. At the end the clips skipped are reported on stderr; ValueError
  when none had features."""
  kept, skipped = 0, collections.Counter()
  for row, (wav, _) in enumerate(entries):
    try:
      fbank = sources.load_clip(source, sources.clip_path(source, root, wav), num_mel_bins)
    except sources.SkippedClip as e:
      skipped[e.reason] += 1
      continue
    kept += 1
    yield row, normalised(fbank, length, mean, std).astype(np.float32)
  if skipped:
    reasons = ', '.join(f'{n} {reason}' for reason, n in sorted(skipped.items()))
    print(f'{split}: skipped {sum(skipped.values())} of {len(entries)} clips ({reasons})',
          file=sys.stderr)
  if not kept:
    raise ValueError(f'{split}: none of the {len(entries)} clips has usable features in '
                     f'{root}')


def load_split(split: str, json_path, table: labels.LabelTable, source: str, root,
               num_mel_bins: int, length: int, mean: float, std: float):
  """(normalised clips `(N, length, num_mel_bins)` float32, targets `(N, K)`) of the clips
  of a dataset JSON that have features (`split_clips`), all in memory."""
  entries, targets = labelled_entries(json_path, table)
  rows, clips = zip(*split_clips(split, entries, source, root, num_mel_bins, length, mean,
                                 std))
  return np.stack(clips), targets[list(rows)]


def _split_features(model, split: str, entries, source: str, root, mean, std,
                    batch_size: int):
  """(clip features (N, D), the rows of `entries` they are of) of one split's clips that
  have features, embedded `batch_size` clips at a time."""
  config = model.config
  kept, clips, feats = [], [], []
  for row, clip in split_clips(split, entries, source, root, config.input_fdim,
                               config.input_tdim, mean, std):
    kept.append(row)
    clips.append(clip)
    if len(clips) == batch_size:
      feats.append(clip_embeddings(model, np.stack(clips), batch_size))
      clips = []
  if clips:
    feats.append(clip_embeddings(model, np.stack(clips), batch_size))
  return np.concatenate(feats), kept


def _load(args):
  """(model, mean, std) of `--model` and the normalisation flags."""
  from ssast_jax import hear  # imports torch; only the command needs it

  mean, std = hear.AUDIOSET_MEAN, hear.AUDIOSET_STD  # a .pth records no statistics
  if os.path.isdir(args.model):
    model = pretrained_from_workdir(args.model)
    if None in (args.mean, args.std):
      mean, std = hear._workdir_statistics(args.model)  # pylint: disable=protected-access
  elif os.path.isfile(args.model):
    model = loading.from_pytorch(args.model)
  else:
    raise FileNotFoundError(f'--model {args.model}: no such training workdir or .pth file')
  mean = mean if args.mean is None else args.mean
  std = std if args.std is None else args.std
  if not std > 0:
    raise ValueError(f'--std must be > 0, got {std}')
  tdim = model.config.input_tdim
  if args.target_length not in (None, tdim):
    raise ValueError(f'--target_length {args.target_length}: the model takes exactly '
                     f'{tdim} frames (its positional embedding fixes the input length)')
  return model, mean, std


def run(args) -> dict:
  """The probe of the command's arguments; the result also holds the clips skipped per
  split and the normalisation `mean`, `std` used."""
  if bool(args.audio) == (args.train_pt_dir is not None or args.val_pt_dir is not None):
    raise ValueError('give either --train_pt_dir and --val_pt_dir, or --audio')
  if not args.audio and None in (args.train_pt_dir, args.val_pt_dir):
    raise ValueError('give both --train_pt_dir and --val_pt_dir')
  if args.audio_root is not None and not args.audio:
    raise ValueError('--audio_root is only for --audio')
  if args.batch_size < 1:
    raise ValueError(f'--batch_size must be >= 1, got {args.batch_size}')
  table = labels.load_label_table(args.label_csv)
  splits = {split: labelled_entries(getattr(args, f'{split}_json'), table)
            for split in ('train', 'val')}
  model, mean, std = _load(args)
  data, skipped = [], {}
  for split, (entries, targets) in splits.items():
    if args.audio:
      source = sources.AUDIO
      root = args.audio_root or Path(getattr(args, f'{split}_json')).parent
    else:
      source, root = sources.PT, getattr(args, f'{split}_pt_dir')
    if not Path(root).is_dir():
      raise ValueError(f'{root} is not a directory')
    features, kept = _split_features(model, split, entries, source, root, mean, std,
                                     args.batch_size)
    data += [features, targets[kept]]
    skipped[split] = len(entries) - len(kept)
  result = probe(None, *data, kind=args.kind, seed=args.seed)
  result.update(skipped=skipped, mean=mean, std=std)
  return result


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog='python -m ssast_jax.probe',
                                   description=__doc__.split('\n\n')[0])
  def flag(name, **kwargs):
    parser.add_argument(f'--{name}', f'--{name.replace("_", "-")}', dest=name, **kwargs)
  flag('model', required=True, help='a training workdir (newest checkpoint) or a pretraining .pth')
  for split in ('train', 'val'):
    flag(f'{split}_json', required=True, help=f'the {split} dataset JSON')
    flag(f'{split}_pt_dir', help=f'the {split} clips\' .pt features')
  flag('label_csv', required=True, help='the index,mid,display_name CSV')
  flag('audio', action='store_true', help='compute the features from the audio files')
  flag('audio_root', help='where relative audio paths start (default: each JSON\'s folder)')
  flag('kind', choices=KINDS, default='logistic', help='the probe (default logistic)')
  flag('target_length', type=int, help='frames per clip; must be the model\'s input_tdim')
  flag('mean', type=float, help='normalisation mean (default: the workdir\'s, else AudioSet)')
  flag('std', type=float, help='normalisation std (default: the workdir\'s, else AudioSet)')
  flag('batch_size', type=int, default=DEFAULT_BATCH_SIZE, help='clips per encoder call')
  flag('seed', type=int, default=0, help='seed of ridge\'s held-out split')
  flag('out', default='probe.json', help='where the result JSON goes (default probe.json)')
  args = parser.parse_args(argv)
  try:
    result = run(args)
  except (OSError, ValueError, convert.ConversionError) as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    sys.exit(2)
  text = json.dumps(result)
  Path(args.out).write_text(text + '\n')
  print(text)


if __name__ == '__main__':
  main()
