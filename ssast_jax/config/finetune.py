"""The fine-tuning config (the original's `run.py` with `--task ft_avgtok|ft_cls`) and its
resolution into typed, frozen `FinetuneSettings`.

`default_config()` holds every fine-tuning key once (configs/finetune*.py start from it);
`resolve_finetune(config)` validates them all before any work and raises `ConfigError`
with one line naming the first bad key, as `settings.resolve` does for pretraining. The
`data` group has the pretraining keys (its checks are reused) and needs `data.label_csv`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections
from ml_collections import config_dict

from ssast_jax.config import defaults
from ssast_jax.config.settings import (DTYPES, ConfigError, DataSettings, _bool, _choice,
                                       _data_settings, _flat_keys, _int, _positive,
                                       _require)

TASKS = ('ft_avgtok', 'ft_cls')
LOSSES = ('bce', 'ce')
METRICS = ('mAP', 'acc')

__all__ = ['ConfigError', 'FinetuneSettings', 'TASKS', 'default_config', 'resolve_finetune']


def default_config() -> ml_collections.ConfigDict:
  """Fine-tuning defaults: the original's `run.py` defaults for a patch model (stride 10),
  AudioSet-like BCE/mAP, no augmentation; the recipes in configs/ change what differs."""
  config = ml_collections.ConfigDict()
  config.data = defaults.get_config().data  # the same data keys as pretraining
  config.data.label_csv = ''  # required: index,mid,display_name
  # Per-clip sampling weights of the training JSON for `bal`: one number per JSON entry,
  # in order; '': TRAIN_JSON without '.json' plus '_weight.csv', as the original.
  config.data.train_weights = ''
  config.data.mean = config_dict.FieldReference(-4.2677393, field_type=float)
  config.data.std = config_dict.FieldReference(4.5689974, field_type=float)

  config.task = 'ft_avgtok'  # 'ft_avgtok' (mean of patch tokens) or 'ft_cls'
  # The pretraining model: an original/exported .pth, or a pretraining workdir.
  config.pretrained = ''
  config.fstride = 10  # fine-tuning strides; the patch shape is the pretrained one
  config.tstride = 10
  config.loss = 'bce'  # 'bce' (BCEWithLogitsLoss) or 'ce' (CrossEntropyLoss on argmax)
  config.metrics = 'mAP'  # the main metric: best checkpoint and result.csv's first column

  config.batch_size = 12  # global
  config.lr = 5e-5
  config.head_lr = 1.0  # the head's lr is lr * head_lr
  config.num_epochs = 25
  config.warmup = True
  config.lrscheduler_start = 10  # MultiStepLR(range(start, 1000, step), gamma=decay)
  config.lrscheduler_step = 5
  config.lrscheduler_decay = 0.5
  # The original's --adaptschedule: instead of MultiStepLR, ReduceLROnPlateau on the
  # validation mAP (also when `metrics` is 'acc'): both groups' lrs halve once the mAP has
  # not improved for more than `lr_patience` epochs in a row; warm-up still applies.
  config.adaptschedule = False
  config.lr_patience = 1  # epochs; the original's --lr_patience (run.py's default 1)
  config.max_steps = config_dict.placeholder(int)

  config.freqm = 0  # SpecAugment frequency / time mask widths (0: off)
  config.timem = 0
  config.mixup = 0.0  # probability of mixing a clip with a partner
  config.noise = False  # uniform noise and a random time roll
  # Balanced sampling (the original's --bal bal): an epoch draws as many clips as the
  # training set holds, with replacement, in proportion to data.train_weights.
  config.bal = False
  # Weight averaging (the original's --wa): after the last epoch, the mean of the
  # parameters after epochs wa_start..wa_end (1-based) is evaluated and exported.
  config.wa = False
  config.wa_start = 1
  config.wa_end = 5

  config.checkpoint_every_steps = 1000
  config.checkpoint_every_minutes = 30.0
  config.keep_checkpoints = 3
  config.print_every_steps = 50
  config.seed = 0
  config.dtype = 'float32'
  return config


@dataclasses.dataclass(frozen=True)
class FinetuneSettings:
  """Everything a fine-tuning run reads; `config_json` is the config as given."""
  data: DataSettings
  task: str
  pretrained: str
  fstride: int
  tstride: int
  loss: str
  metrics: str
  batch_size: int
  lr: float
  head_lr: float
  num_epochs: int
  warmup: bool
  lrscheduler_start: int
  lrscheduler_step: int
  lrscheduler_decay: float
  adaptschedule: bool
  lr_patience: int
  max_steps: int | None
  freqm: int
  timem: int
  mixup: float
  noise: bool
  bal: bool
  train_weights: str  # resolved path; '' without `bal`
  wa: bool
  wa_start: int
  wa_end: int
  checkpoint_every_steps: int
  checkpoint_every_minutes: float
  keep_checkpoints: int
  print_every_steps: int
  seed: int
  dtype: str
  config_json: str = dataclasses.field(compare=False, repr=False)

  @property
  def pooling(self) -> str:
    """The classifier's pooling: 'avgtok' or 'cls'."""
    return self.task[len('ft_'):]

  @property
  def best_metric(self) -> str:
    """The logged metric that picks the best checkpoint (higher is better)."""
    return f'eval/{self.metrics}'

  def config_dict(self) -> dict:
    return json.loads(self.config_json)


def resolve_finetune(config, check_data: bool = True) -> FinetuneSettings:
  """`config` validated and resolved; raises ConfigError naming the first bad key."""
  unknown = sorted(set(_flat_keys(config)) - set(_flat_keys(default_config())))
  if unknown:
    raise ConfigError(f'unknown config key {unknown[0]}: not a fine-tuning key of '
                      f'ssast_jax/config/finetune.py')
  _choice('task', config.task, TASKS)
  _require(isinstance(config.pretrained, str) and bool(config.pretrained),
           'pretrained is empty: give the pretraining model (.pth or pretraining workdir)')
  if check_data:
    _require(os.path.exists(config.pretrained), f'pretrained: not found: {config.pretrained}')
  _require(not check_data or config.data.demo or bool(config.data.label_csv),
           'data.label_csv is empty: fine-tuning needs the index,mid,display_name CSV')
  data = _data_settings(config, check_data)
  _int('data.target_length', data.target_length, 1)
  _int('data.num_mel_bins', data.num_mel_bins, 1)
  freqm = _int('freqm', config.freqm, 0)
  timem = _int('timem', config.timem, 0)
  _require(freqm <= data.num_mel_bins,
           f'freqm {freqm} exceeds data.num_mel_bins {data.num_mel_bins}')
  _require(timem <= data.target_length,
           f'timem {timem} exceeds data.target_length {data.target_length}')
  mixup = config.mixup
  _require(isinstance(mixup, (int, float)) and not isinstance(mixup, bool)
           and 0 <= mixup <= 1, f'mixup must be a probability in [0, 1]; got {mixup!r}')
  decay = _positive('lrscheduler_decay', config.lrscheduler_decay)
  num_epochs = _int('num_epochs', config.num_epochs, 1)
  bal, train_weights = _bool('bal', config.bal), ''
  if bal:
    _require(bool(config.data.train_json), 'bal needs data.train_json: the weights are '
             'per entry of the training JSON')
    train_weights = config.data.train_weights or (
        config.data.train_json[:-len('.json')] + '_weight.csv'
        if config.data.train_json.endswith('.json') else '')
    _require(bool(train_weights), 'data.train_weights is empty: bal needs the per-clip '
             'weights CSV (or a data.train_json ending in .json to derive it from)')
    _require(not check_data or os.path.isfile(train_weights),
             f'data.train_weights: file not found: {train_weights} (needed by bal)')
  wa, wa_start = _bool('wa', config.wa), _int('wa_start', config.wa_start, 1)
  wa_end = _int('wa_end', config.wa_end, 1)
  if wa:
    _require(wa_start <= wa_end <= num_epochs,
             f'wa_end must be in wa_start .. num_epochs ({wa_start} .. {num_epochs}); '
             f'got {wa_end}')
  return FinetuneSettings(
      data=data, task=config.task, pretrained=config.pretrained,
      fstride=_int('fstride', config.fstride, 1), tstride=_int('tstride', config.tstride, 1),
      loss=_choice('loss', config.loss, LOSSES),
      metrics=_choice('metrics', config.metrics, METRICS),
      batch_size=_int('batch_size', config.batch_size, 1), lr=_positive('lr', config.lr),
      head_lr=_positive('head_lr', config.head_lr),
      num_epochs=num_epochs,
      warmup=_bool('warmup', config.warmup),
      lrscheduler_start=_int('lrscheduler_start', config.lrscheduler_start, 0),
      lrscheduler_step=_int('lrscheduler_step', config.lrscheduler_step, 1),
      lrscheduler_decay=decay,
      adaptschedule=_bool('adaptschedule', config.adaptschedule),
      lr_patience=_int('lr_patience', config.lr_patience, 0),
      max_steps=_int('max_steps', config.max_steps, 1, optional=True),
      freqm=freqm, timem=timem, mixup=float(mixup), noise=_bool('noise', config.noise),
      bal=bal, train_weights=train_weights, wa=wa, wa_start=wa_start, wa_end=wa_end,
      checkpoint_every_steps=_int('checkpoint_every_steps', config.checkpoint_every_steps, 1),
      checkpoint_every_minutes=_positive('checkpoint_every_minutes',
                                         config.checkpoint_every_minutes),
      keep_checkpoints=_int('keep_checkpoints', config.keep_checkpoints, 1),
      print_every_steps=_int('print_every_steps', config.print_every_steps, 1),
      seed=_int('seed', config.seed, 0), dtype=_choice('dtype', config.dtype, DTYPES),
      config_json=config.to_json_best_effort(sort_keys=True))


def check_devices(settings: FinetuneSettings, device_count: int) -> None:
  """Raises ConfigError when the batch does not split over the devices."""
  _require(settings.batch_size % device_count == 0,
           f'batch_size {settings.batch_size} is not divisible by the {device_count} devices')
