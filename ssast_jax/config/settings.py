"""The run's config resolved once into typed, frozen settings, and validated in one place.

`resolve(config)` reads an `ml_collections.ConfigDict` (configs/*.py, overridden with
--config.KEY=VALUE) and returns `Settings`, or raises `ConfigError` with one message naming
the first key whose value cannot work, so a mistyped option fails in a second rather than
after data conversion or compilation. Everything after it reads the settings only.

Converted shards live in `SHARDS_DIR/train` and `SHARDS_DIR/val` (`split_shards_dir`), each
with its own `manifest.json`. `data.shards_dir` alone reads shards converted earlier; with
the JSON and .pt keys also given it is where they are converted to (and reused from).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from ssast_jax.config import defaults, probing
from ssast_jax.data.shards import MANIFEST_NAME, STORED_DTYPES
from ssast_jax.model import MODEL_SIZES, REMAT_POLICIES, ModelConfig, patch_count
from ssast_jax.objective import masking

TASKS = ('pretrain_joint', 'pretrain_mpc', 'pretrain_mpg')
PRED_DIM = 256  # the original's pretext heads output 256 values per patch
NAN_POLICIES = ('stop', 'skip')
DTYPES = ('float32', 'bfloat16')
JOINT_PASSES = (1, 2)
SPLITS = {'train': 'training', 'val': 'validation'}


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key."""


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """Where the clips come from and how a batch is made of them (SPEC section 1)."""
  demo: bool
  train_json: str
  train_pt_dir: str
  val_json: str
  val_pt_dir: str
  label_csv: str
  train_audio: bool
  audio_root: str
  shards_dir: str
  shard_dtype: str
  mean: float | None  # None: from the training shards' manifest
  std: float | None
  target_length: int
  num_mel_bins: int
  random_crop: bool
  workers: int


@dataclasses.dataclass(frozen=True)
class ObjectiveSettings:
  """The pretext task: masks and losses (SPEC sections 4-5); `mask_mode` is resolved."""
  task: str
  patch_grid: tuple[int, int]
  mask_patch: int
  eval_mask_patch: int
  mask_mode: str
  cluster_factor: int
  paper_infonce: bool
  joint_passes: int


@dataclasses.dataclass(frozen=True)
class OptimSettings:
  """Adam, warm-up and plateau halving (SPEC section 6), and the global batch."""
  batch_size: int
  grad_accum_steps: int
  lr: float
  warmup: bool
  num_epochs: int
  max_steps: int | None
  epoch_iter: int
  lr_patience: int

  @property
  def micro_batch_size(self) -> int:
    return self.batch_size // self.grad_accum_steps


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """Seeds, devices, checkpoints and logs: how the run is carried out."""
  seed: int
  fsdp: int
  checkpoint_every_steps: int
  checkpoint_every_minutes: float
  keep_checkpoints: int
  print_every_steps: int
  eval_picture: bool
  nan_policy: str
  profile_steps: tuple[int, int] | None


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything a run reads; `config_json` is the config as given, saved in the workdir."""
  model: ModelConfig
  data: DataSettings
  objective: ObjectiveSettings
  optim: OptimSettings
  run: RunSettings
  probe: probing.ProbeSettings
  config_json: str = dataclasses.field(compare=False, repr=False)

  @property
  def batch_shape(self) -> tuple[int, int, int]:
    """The global batch of one training step: (clips, frames, mel bins)."""
    return (self.optim.batch_size, self.data.target_length, self.data.num_mel_bins)

  def config_dict(self) -> dict:
    return json.loads(self.config_json)


def _flat_keys(config, prefix: str = '') -> list[str]:
  keys = []
  for key, value in config.items():
    if hasattr(value, 'items'):
      keys += _flat_keys(value, f'{prefix}{key}.')
    else:
      keys.append(prefix + key)
  return keys


def split_shards_dir(shards_dir: str, split: str) -> str:
  """Where the converted shards of `split` ('train' or 'val') live under `data.shards_dir`."""
  return os.path.join(shards_dir, split)


def resolve(config, check_data: bool = True, allow_unknown: bool = False) -> Settings:
  """`config` validated and resolved; raises ConfigError naming the first bad key.

  A key the defaults do not have is an error (a config file written for another version
  would otherwise be silently ignored), unless `allow_unknown` (reading a saved run's
  config). `check_data=False` skips the data paths (the step benchmark uses synthetic
  batches).
  """
  if not allow_unknown:
    unknown = sorted(set(_flat_keys(config)) - set(_flat_keys(defaults.get_config())))
    if unknown:
      raise ConfigError(f'unknown config key {unknown[0]}: not a key of '
                        f'ssast_jax/config/defaults.py (docs/configuration.md lists them)')
  model = _model_settings(config)
  objective = _objective_settings(config, model)
  optim, run = _optim_settings(config), _run_settings(config)
  data = _data_settings(config, check_data)
  probe = probing.probe_settings(config, check_data, _require)
  return Settings(model, data, objective, optim, run, probe,
                  config.to_json_best_effort(sort_keys=True))


def resolve_saved(saved: dict) -> Settings:
  """The settings of a run from its saved `config.json` (as a dict), without data checks.

  Keys added to the defaults since the run was saved take their default; keys the defaults
  no longer have are ignored.
  """
  config = defaults.get_config()
  for key in set(_flat_keys(config)) & set(_flat_keys(saved)):
    *parents, name = key.split('.')
    node, value = config, saved
    for parent in parents:
      node, value = node[parent], value[parent]
    node[name] = value[name]
  return resolve(config, check_data=False)


def check_devices(settings: Settings, device_count: int) -> None:
  """Raises ConfigError when `fsdp` or the micro-batches do not split over the devices."""
  fsdp, optim = settings.run.fsdp, settings.optim
  _require(device_count % fsdp == 0,
           f'fsdp is {fsdp}, which does not divide the {device_count} devices')
  _require(optim.micro_batch_size % device_count == 0,
           f'batch_size / grad_accum_steps = {optim.batch_size} / {optim.grad_accum_steps}'
           f' = {optim.micro_batch_size} clips per micro-batch, which the {device_count} '
           f'devices cannot share evenly: batch_size must be divisible by grad_accum_steps '
           f'x device count = {optim.grad_accum_steps * device_count}')


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def _choice(key: str, value, choices):
  _require(value in choices, f'{key} must be one of {", ".join(map(repr, choices))}; '
           f'got {value!r}')
  return value


def _bool(key: str, value) -> bool:
  _require(isinstance(value, bool), f'{key} must be True or False; got {value!r}')
  return value


def _int(key: str, value, minimum: int, optional: bool = False):
  if optional and value is None:
    return None
  _require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
           f'{key} must be an integer >= {minimum}; got {value!r}')
  return value


def _is_finite_number(value) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def _positive(key: str, value, optional: bool = False):
  if optional and value is None:
    return None
  _require(_is_finite_number(value) and value > 0,
           f'{key} must be a positive number; got {value!r}')
  return float(value)


def _model_settings(config) -> ModelConfig:
  model, data = config.model, config.data
  _choice('model.size', model.size, tuple(MODEL_SIZES))
  depth = _int('model.depth', model.depth, 1, optional=True)
  bins = _int('data.num_mel_bins', data.num_mel_bins, 1)
  frames = _int('data.target_length', data.target_length, 1)
  for name in ('fshape', 'tshape', 'fstride', 'tstride'):
    _int(f'model.{name}', model[name], 1)
  for stride, shape in (('fstride', 'fshape'), ('tstride', 'tshape')):
    _require(model[stride] == model[shape],
             f'model.{stride} is {model[stride]} but pretraining needs it equal to '
             f'model.{shape} ({model[shape]}): patches must not overlap')
  _require(model.fshape <= bins, f'model.fshape {model.fshape} is larger than the input: '
           f'data.num_mel_bins is {bins}')
  _require(model.tshape <= frames, f'model.tshape {model.tshape} is larger than the input: '
           f'data.target_length is {frames}')
  _require(model.fshape * model.tshape == PRED_DIM,
           f'model.fshape x model.tshape is {model.fshape} x {model.tshape} = '
           f'{model.fshape * model.tshape}, but the pretext heads output {PRED_DIM} values '
           f'per patch, so it must be {PRED_DIM} (e.g. 16 x 16 or 128 x 2)')
  return ModelConfig.from_size(
      model.size, depth=depth, fshape=model.fshape, tshape=model.tshape,
      fstride=model.fstride, tstride=model.tstride, input_fdim=bins, input_tdim=frames,
      dtype=_choice('dtype', config.dtype, DTYPES), remat=_bool('remat', config.remat),
      remat_policy=_choice('remat_policy', config.remat_policy, REMAT_POLICIES))


def _objective_settings(config, model: ModelConfig) -> ObjectiveSettings:
  _choice('task', config.task, TASKS)
  _choice('mask_mode', config.mask_mode, ('',) + masking.MASK_MODES)
  mode = config.mask_mode or masking.default_mode(model.input_fdim, model.fshape)
  grid = (patch_count(model.input_fdim, model.fshape, model.fstride),
          patch_count(model.input_tdim, model.tshape, model.tstride))
  for key in ('mask_patch', 'eval_mask_patch'):
    _int(key, config[key], 1)
    try:
      masking.check_mask_size(grid, config[key], mode)
    except ValueError as error:
      raise ConfigError(f'{key} is {config[key]}: {error}') from None
  return ObjectiveSettings(
      task=config.task, patch_grid=grid, mask_patch=config.mask_patch,
      eval_mask_patch=config.eval_mask_patch, mask_mode=mode,
      cluster_factor=_int('cluster_factor', config.cluster_factor, 1),
      paper_infonce=_bool('paper_infonce', config.paper_infonce),
      joint_passes=_choice('joint_passes', config.joint_passes, JOINT_PASSES))


def _optim_settings(config) -> OptimSettings:
  batch_size = _int('batch_size', config.batch_size, 1)
  accum = _int('grad_accum_steps', config.grad_accum_steps, 1)
  _require(batch_size % accum == 0,
           f'batch_size {batch_size} is not divisible by grad_accum_steps {accum}')
  return OptimSettings(
      batch_size=batch_size, grad_accum_steps=accum, lr=_positive('lr', config.lr),
      warmup=_bool('warmup', config.warmup),
      num_epochs=_int('num_epochs', config.num_epochs, 1),
      max_steps=_int('max_steps', config.max_steps, 1, optional=True),
      epoch_iter=_int('epoch_iter', config.epoch_iter, 1),
      lr_patience=_int('lr_patience', config.lr_patience, 0))


def _run_settings(config) -> RunSettings:
  return RunSettings(
      seed=_int('seed', config.seed, 0), fsdp=_int('fsdp', config.fsdp, 1),
      checkpoint_every_steps=_int('checkpoint_every_steps', config.checkpoint_every_steps, 1),
      checkpoint_every_minutes=_positive('checkpoint_every_minutes',
                                         config.checkpoint_every_minutes),
      keep_checkpoints=_int('keep_checkpoints', config.keep_checkpoints, 1),
      print_every_steps=_int('print_every_steps', config.print_every_steps, 1),
      eval_picture=_bool('eval_picture', config.eval_picture),
      nan_policy=_choice('nan_policy', config.nan_policy, NAN_POLICIES),
      profile_steps=_profile_range(config.profile_steps))


def _profile_range(text) -> tuple[int, int] | None:
  """(first, last) training steps to trace from 'FIRST,LAST' or 'STEP' (steps numbered
  from 1, as logged), or None when empty."""
  _require(isinstance(text, str),
           f'profile_steps must be a string such as "10,15"; got {text!r}')
  if not text.strip():
    return None
  parts = text.split(',')
  message = (f'profile_steps must be "FIRST,LAST" or "STEP" with 1 <= FIRST <= LAST; '
             f'got {text!r}')
  _require(len(parts) in (1, 2) and all(p.strip().isdigit() for p in parts), message)
  first, last = int(parts[0]), int(parts[-1])
  _require(1 <= first <= last, message)
  return first, last


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


def _data_settings(config, check_paths: bool) -> DataSettings:
  data = config.data
  _require(data.mean is None or _is_finite_number(data.mean),
           f'data.mean must be a finite number or None; got {data.mean!r}')
  settings = DataSettings(
      demo=_bool('data.demo', data.demo), train_json=data.train_json,
      train_pt_dir=data.train_pt_dir, val_json=data.val_json, val_pt_dir=data.val_pt_dir,
      label_csv=data.label_csv, train_audio=_bool('data.train_audio', data.train_audio),
      audio_root=data.audio_root, shards_dir=data.shards_dir,
      shard_dtype=_choice('data.shard_dtype', data.shard_dtype, STORED_DTYPES),
      mean=None if data.mean is None else float(data.mean),
      std=_positive('data.std', data.std, optional=True),
      target_length=data.target_length, num_mel_bins=data.num_mel_bins,
      random_crop=_bool('data.random_crop', data.random_crop),
      workers=_int('data.workers', data.workers, 0))
  if check_paths and not settings.demo:
    _check_data_paths(settings)
  return settings


def _check_data_paths(data: DataSettings) -> None:
  if data.audio_root:
    _require(os.path.isdir(data.audio_root), f'data.audio_root: not a directory: '
             f'{data.audio_root}')
  if data.label_csv:
    _require(os.path.isfile(data.label_csv),
             f'data.label_csv: file not found: {data.label_csv}')
  sources = {'train': (data.train_json, data.train_pt_dir),
             'val': (data.val_json, data.val_pt_dir)}
  if data.shards_dir and not any(any(pair) for pair in sources.values()):
    for split, name in SPLITS.items():
      manifest = os.path.join(split_shards_dir(data.shards_dir, split), MANIFEST_NAME)
      _require(os.path.isfile(manifest),
               f'data.shards_dir: no converted {name} shards: {manifest} does not exist '
               f'(give data.train_json and the other source keys to convert them there)')
    return
  for split, name in SPLITS.items():
    json_path, pt_dir = sources[split]
    json_key, pt_key = f'data.{split}_json', f'data.{split}_pt_dir'
    _require(bool(json_path),
             f'{json_key} is empty: give the {name} JSON and {pt_key} (or data.shards_dir)')
    _check_manifest_json(json_key, json_path)
    if data.train_audio:
      _require(not pt_dir, f'{pt_key} is set with data.train_audio=True: the audio paths are '
               f"the JSON's wav fields; leave {pt_key} empty")
      continue
    _require(bool(pt_dir), f'{pt_key} is empty: give the folder of {name} .pt files '
             f'(or data.train_audio=True when the wav fields are audio files)')
    _require(os.path.isdir(pt_dir), f'{pt_key}: not a directory: {pt_dir}')
