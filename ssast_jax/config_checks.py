"""Validation of a pretraining config before anything heavy starts.

`check_config` raises `ConfigError` with one message naming the offending key, so that a
mistyped option fails in a second rather than after data conversion or compilation.

Converted shards live in `SHARDS_DIR/train` and `SHARDS_DIR/val` (`split_shards_dir`), each
with its own `manifest.json`. `data.shards_dir` alone reads shards converted earlier; with
the JSON and .pt keys also given it is where they are converted to (and reused from).
"""

from __future__ import annotations

import json
import math
import os

from ssast_jax import masking
from ssast_jax.data.shards import MANIFEST_NAME, STORED_DTYPES
from ssast_jax.model import ATTENTION_IMPLS, MODEL_SIZES, REMAT_POLICIES, patch_count

TASKS = ('pretrain_joint', 'pretrain_mpc', 'pretrain_mpg')
PRED_DIM = 256  # the original's pretext heads output 256 values per patch
NAN_POLICIES = ('stop', 'skip')
DTYPES = ('float32', 'bfloat16')
JOINT_PASSES = (1, 2)
SPLITS = {'train': 'training', 'val': 'validation'}


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


def split_shards_dir(shards_dir: str, split: str) -> str:
  """Where the converted shards of `split` ('train' or 'val') live under `data.shards_dir`."""
  return os.path.join(shards_dir, split)


def patch_grid(config) -> tuple[int, int]:
  """(p_f, p_t): patches along frequency and time for the configured input."""
  return (patch_count(config.data.num_mel_bins, config.model.fshape, config.model.fstride),
          patch_count(config.data.target_length, config.model.tshape, config.model.tstride))


def resolved_mask_mode(config) -> str:
  """`mask_mode`, with '' resolved as the original: frame for frame models, else cluster."""
  return config.mask_mode or masking.default_mode(config.data.num_mel_bins,
                                                   config.model.fshape)


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def _require_choice(key: str, value, choices) -> None:
  _require(value in choices, f'{key} must be one of {", ".join(map(repr, choices))}; '
           f'got {value!r}')


def _require_int(key: str, value, minimum: int, optional: bool = False) -> None:
  if optional and value is None:
    return
  _require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
           f'{key} must be an integer >= {minimum}; got {value!r}')


def _is_finite_number(value) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def _require_positive(key: str, value, optional: bool = False) -> None:
  if optional and value is None:
    return
  _require(_is_finite_number(value) and value > 0,
           f'{key} must be a positive number; got {value!r}')


def _check_model(config) -> None:
  model, data = config.model, config.data
  _require_choice('task', config.task, TASKS)
  _require_choice('model.size', model.size, tuple(MODEL_SIZES))
  _require_choice('model.attention', model.attention, ATTENTION_IMPLS)
  _require_int('model.depth', model.depth, 1, optional=True)
  _require_int('data.num_mel_bins', data.num_mel_bins, 1)
  _require_int('data.target_length', data.target_length, 1)
  for name in ('fshape', 'tshape', 'fstride', 'tstride'):
    _require_int(f'model.{name}', model[name], 1)
  for stride, shape in (('fstride', 'fshape'), ('tstride', 'tshape')):
    _require(model[stride] == model[shape],
             f'model.{stride} is {model[stride]} but pretraining needs it equal to '
             f'model.{shape} ({model[shape]}): patches must not overlap')
  _require(model.fshape <= data.num_mel_bins,
           f'model.fshape {model.fshape} is larger than the input: '
           f'data.num_mel_bins is {data.num_mel_bins}')
  _require(model.tshape <= data.target_length,
           f'model.tshape {model.tshape} is larger than the input: '
           f'data.target_length is {data.target_length}')
  _require(model.fshape * model.tshape == PRED_DIM,
           f'model.fshape x model.tshape is {model.fshape} x {model.tshape} = '
           f'{model.fshape * model.tshape}, but the pretext heads output {PRED_DIM} values '
           f'per patch, so it must be {PRED_DIM} (e.g. 16 x 16 or 128 x 2)')
  _require_choice('dtype', config.dtype, DTYPES)


def _check_masking(config) -> None:
  _require_choice('mask_mode', config.mask_mode, ('',) + masking.MASK_MODES)
  _require_int('cluster_factor', config.cluster_factor, 1)
  _require(config.paper_infonce in (True, False),
           f'paper_infonce must be True or False; got {config.paper_infonce!r}')
  _require_choice('joint_passes', config.joint_passes, JOINT_PASSES)
  grid, mode = patch_grid(config), resolved_mask_mode(config)
  for key in ('mask_patch', 'eval_mask_patch'):
    _require_int(key, config[key], 1)
    try:
      masking.check_mask_size(grid, config[key], mode)
    except ValueError as error:
      raise ConfigError(f'{key} is {config[key]}: {error}') from None


def _check_training(config) -> None:
  _require_int('batch_size', config.batch_size, 1)
  _require_positive('lr', config.lr)
  _require_int('num_epochs', config.num_epochs, 1)
  _require_int('epoch_iter', config.epoch_iter, 1)
  _require_int('lr_patience', config.lr_patience, 0)
  _require(config.warmup in (True, False),
           f'warmup must be True or False; got {config.warmup!r}')
  _require_int('max_steps', config.max_steps, 1, optional=True)
  _require_int('checkpoint_every_steps', config.checkpoint_every_steps, 1)
  _require_int('keep_checkpoints', config.keep_checkpoints, 1)
  _require_int('print_every_steps', config.print_every_steps, 1)
  _require_int('seed', config.seed, 0)
  _require_choice('nan_policy', config.nan_policy, NAN_POLICIES)


def _check_scale(config) -> None:
  _require(config.remat in (True, False), f'remat must be True or False; got {config.remat!r}')
  _require_choice('remat_policy', config.remat_policy, REMAT_POLICIES)
  _require_int('fsdp', config.fsdp, 1)
  _require_int('grad_accum_steps', config.grad_accum_steps, 1)
  _require(config.batch_size % config.grad_accum_steps == 0,
           f'batch_size {config.batch_size} is not divisible by grad_accum_steps '
           f'{config.grad_accum_steps}')
  _require_int('concurrent_parts', config.concurrent_parts, 0)
  _require(config.batch_invariant in (True, False),
           f'batch_invariant must be True or False; got {config.batch_invariant!r}')
  profile_range(config)


def profile_range(config) -> tuple[int, int] | None:
  """(first, last) training steps to trace from `profile_steps` 'FIRST,LAST' or 'STEP'
  (steps numbered from 1, as logged), or None when it is empty."""
  text = config.profile_steps
  _require(isinstance(text, str), f'profile_steps must be a string such as "10,15"; '
           f'got {text!r}')
  if not text.strip():
    return None
  parts = text.split(',')
  message = (f'profile_steps must be "FIRST,LAST" or "STEP" with 1 <= FIRST <= LAST; '
             f'got {text!r}')
  _require(len(parts) in (1, 2) and all(p.strip().isdigit() for p in parts), message)
  first, last = int(parts[0]), int(parts[-1])
  _require(1 <= first <= last, message)
  return first, last


def micro_batch_size(config) -> int:
  """Clips per micro-batch: `batch_size / grad_accum_steps`."""
  return config.batch_size // config.grad_accum_steps


def resolved_concurrent_parts(config, device_count: int, platform: str) -> int:
  """`concurrent_parts`, with 0 (auto) resolved: 2 on CPU when each device's share of a
  micro-batch splits into 2 parts, else 1 (GPU/TPU run one kernel after another, where
  parts would only make each kernel smaller)."""
  parts = config.get('concurrent_parts', 0)
  if parts:
    return parts
  micro_batch = micro_batch_size(config)
  return 2 if platform == 'cpu' and micro_batch % (2 * device_count) == 0 else 1


def check_devices(config, device_count: int, platform: str = 'cpu') -> None:
  """Raises ConfigError when `fsdp`, the batch or its `concurrent_parts` do not split over
  `device_count` devices, or `batch_invariant` is asked for on another platform than the
  CPU."""
  _require(not config.get('batch_invariant', False) or platform == 'cpu',
           f'batch_invariant is an XLA:CPU setting; the devices here are {platform}')
  _require(device_count % config.fsdp == 0,
           f'fsdp is {config.fsdp}, which does not divide the {device_count} devices')
  micro_batch = micro_batch_size(config)
  _require(micro_batch % device_count == 0,
           f'batch_size / grad_accum_steps = {config.batch_size} / {config.grad_accum_steps}'
           f' = {micro_batch} clips per micro-batch, which the {device_count} devices cannot '
           f'share evenly: batch_size must be divisible by grad_accum_steps x device count '
           f'= {config.grad_accum_steps * device_count}')
  parts = config.get('concurrent_parts', 0)
  _require(not parts or micro_batch % (parts * device_count) == 0,
           f'concurrent_parts is {parts}: the {micro_batch} clips per micro-batch '
           f'(batch_size / grad_accum_steps) do not split into {parts} parts shared evenly '
           f'by the {device_count} devices; batch_size must be divisible by '
           f'grad_accum_steps x concurrent_parts x device count = '
           f'{config.grad_accum_steps * parts * device_count} (or set concurrent_parts=0, '
           f'auto)')


def _check_manifest_json(key: str, path: str) -> None:
  """The original's data JSON: {"data": [{"wav": ...}, ...]} with at least one clip."""
  _require(os.path.isfile(path), f'{key}: file not found: {path}')
  try:
    with open(path, encoding='utf-8') as f:
      manifest = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
    raise ConfigError(f'{key}: cannot read {path} as JSON: {error}') from None
  clips = manifest.get('data') if isinstance(manifest, dict) else None
  _require(isinstance(clips, list),
           f'{key}: {path} has no "data" list (expected {{"data": [{{"wav": ...}}, ...]}})')
  _require(len(clips) > 0, f'{key}: {path} lists no clips ("data" is empty)')
  for index, clip in enumerate(clips):
    _require(isinstance(clip, dict) and isinstance(clip.get('wav'), str),
             f'{key}: {path}: entry {index} of "data" is not an object with a "wav" string')


def _check_data(config) -> None:
  data = config.data
  _require(data.demo in (True, False), f'data.demo must be True or False; got {data.demo!r}')
  _require(data.mean is None or _is_finite_number(data.mean),
           f'data.mean must be a finite number or None; got {data.mean!r}')
  _require_positive('data.std', data.std, optional=True)
  _require_choice('data.shard_dtype', data.shard_dtype, STORED_DTYPES)
  _require_int('data.workers', data.workers, 0)
  _require(data.random_crop in (True, False),
           f'data.random_crop must be True or False; got {data.random_crop!r}')
  if data.demo:
    return
  if data.label_csv:
    _require(os.path.isfile(data.label_csv),
             f'data.label_csv: file not found: {data.label_csv}')
  sources_given = any(data[key] for key in ('train_json', 'train_pt_dir', 'val_json',
                                             'val_pt_dir'))
  if data.shards_dir and not sources_given:
    for split, name in SPLITS.items():
      manifest = os.path.join(split_shards_dir(data.shards_dir, split), MANIFEST_NAME)
      _require(os.path.isfile(manifest),
               f'data.shards_dir: no converted {name} shards: {manifest} does not exist '
               f'(give data.train_json and the other source keys to convert them there)')
    return
  for split, name in SPLITS.items():
    json_key, pt_key = f'data.{split}_json', f'data.{split}_pt_dir'
    _require(bool(data[f'{split}_json']),
             f'{json_key} is empty: give the {name} JSON and {pt_key} (or data.shards_dir)')
    _require(bool(data[f'{split}_pt_dir']),
             f'{pt_key} is empty: give the folder of {name} .pt files')
    _require(os.path.isdir(data[f'{split}_pt_dir']),
             f'{pt_key}: not a directory: {data[f"{split}_pt_dir"]}')
    _check_manifest_json(json_key, data[f'{split}_json'])


def check_config(config, check_data: bool = True) -> None:
  """Raises ConfigError naming the first key whose value cannot work; returns None if fine.

  `check_data=False` skips the data paths (the step benchmark uses synthetic batches).
  """
  _check_model(config)
  _check_masking(config)
  _check_training(config)
  _check_scale(config)
  if check_data:
    _check_data(config)
