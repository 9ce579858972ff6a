"""The largest batch per device that fits a target, per dtype and remat setting, in few
compiles.

Peak memory grows about linearly with the batch, so two compiles give the line and a third
checks its prediction; a prediction that does not fit steps down, then bisects. A model
whose state does not fit replicated at one clip per device is sharded over FSDP groups of
2, 4, ... devices until it does.
"""

from __future__ import annotations

import copy

from ssast_jax.config.settings import ConfigError
from ssast_jax.model import REMAT_POLICIES
from ssast_jax.plan import compile as plan_compile

PROBE_BATCH = 8  # clips per device of the first compile after one clip
MAX_BATCH_PER_DEVICE = 4096


def remat_settings() -> list[tuple[bool, str]]:
  """(remat, policy): off, then each REMAT_POLICIES entry."""
  return [(False, REMAT_POLICIES[0])] + [(True, policy) for policy in REMAT_POLICIES]


def with_setting(config, *, batch_per_device: int, devices: int, dtype=None, remat=None,
                 fsdp=None):
  """A copy of `config` with the global batch for `batch_per_device` (times the gradient
  accumulation steps) and the given dtype, remat and FSDP size."""
  config = copy.deepcopy(config)
  finetuning = 'model' not in config
  accumulation = 1 if finetuning else config.grad_accum_steps
  config.batch_size = batch_per_device * devices * accumulation
  if dtype is not None:
    config.dtype = dtype
  if remat is not None and not finetuning:
    config.remat, config.remat_policy = remat
  if fsdp is not None and not finetuning:
    config.fsdp = fsdp
  return config


class _Prober:
  """Compiles `config` at a batch per device and remembers each record."""

  def __init__(self, config, target, devices, options):
    self.config, self.target, self.devices, self.options = config, target, devices, options
    self.records = {}

  def __call__(self, batch: int, fsdp: int | None = None) -> dict:
    key = (batch, fsdp)
    if key not in self.records:
      self.records[key] = plan_compile.plan_run(
          self._config(batch, fsdp), self.target, self.devices, with_eval=False,
          with_estimate=False, **self.options)
    return self.records[key]

  def _config(self, batch: int, fsdp: int | None):
    return with_setting(self.config, batch_per_device=batch, devices=len(self.devices),
                        fsdp=fsdp)

  def estimated(self, record: dict, fsdp: int | None) -> dict:
    """`record` (one of the probes) with its estimate: only the chosen batch's, which
    for a looped TPU step costs a compile of the step without loops."""
    options = {k: v for k, v in self.options.items() if k != 'gpu_memory_fraction'}
    return plan_compile.add_estimate(
        dict(record), self._config(int(record['batch_per_device']), fsdp), self.target,
        self.devices, **options)


def _fsdp_sizes(count: int) -> list[int]:
  return [size for size in (2 ** k for k in range(1, count.bit_length())) if count % size == 0]


def largest_batch(config, target, devices, **options) -> dict:
  """The record of the largest batch per device that fits, to within 1/16 (with
  `fsdp_needed` where the model had to be sharded), or the failing record of one clip per
  device at the largest FSDP size."""
  probe = _Prober(config, target, devices, options)
  fsdp = None
  if not probe(1)['fits']:
    fsdp = next((size for size in _fsdp_sizes(len(devices)) if probe(1, size)['fits']), None)
    if fsdp is None:
      return {**probe(1, (_fsdp_sizes(len(devices)) or [None])[-1]),
              'compiles': len(probe.records)}
  fitting, failed, guess = [probe(1, fsdp)], None, PROBE_BATCH
  while guess is not None:
    record = probe(guess, fsdp)
    if record['fits']:
      fitting.append(record)
    else:
      failed = record
    guess = _next_guess(fitting, failed)
  return {**probe.estimated(fitting[-1], fsdp), 'fsdp_needed': fsdp,
          'compiles': len(probe.records)}


def _next_guess(fitting: list, failed: dict | None) -> int | None:
  """The next batch to compile, or None once the largest fitting batch is within 1/16 of
  the smallest failing one: where peak memory reaches the capacity on the line through the
  largest fitting record and the smallest failing one (through the two largest fitting
  ones before any fails); the midpoint where a failure has no peak (a TPU compile that ran
  out of memory)."""
  best = fitting[-1]
  low = int(best['batch_per_device'])
  high = MAX_BATCH_PER_DEVICE + 1 if failed is None else int(failed['batch_per_device'])
  if high - low <= max(1, high // 16) or low >= MAX_BATCH_PER_DEVICE:
    return None
  other = failed if failed is not None else fitting[-2]
  if other.get('peak_bytes_per_device') is None:
    return (low + high) // 2
  guess = _predicted(*sorted((best, other), key=lambda r: r['batch_per_device']))
  return min(high - 1, max(low + 1, guess))


def _predicted(low: dict, high: dict) -> int:
  """The batch where the line through the two records' peaks reaches the capacity."""
  slope = (high['peak_bytes_per_device'] - low['peak_bytes_per_device']) / (
      high['batch_per_device'] - low['batch_per_device'])
  room = low['capacity_bytes_per_device'] - low['peak_bytes_per_device']
  if slope <= 0:
    return MAX_BATCH_PER_DEVICE
  return int(low['batch_per_device'] + room // slope)


def search(config, target, devices, progress=None, **options) -> list[dict]:
  """One record per dtype the chip has (float32, bfloat16) and remat setting: the largest
  batch per device that fits; the fastest estimate is marked `fastest`. `progress` is
  called with each record as it is found (a search of base takes tens of compiles)."""
  if 'model' not in config:
    raise ConfigError('--search sweeps the pretraining keys (dtype, model.remat, fsdp); '
                      'for a fine-tuning config, give --config.batch_size and --config.dtype')
  rows = []
  for dtype in ('float32', 'bfloat16'):
    if dtype not in target.chip.peak_flops:
      continue
    for remat in remat_settings():
      setting = with_setting(config, batch_per_device=1, devices=len(devices), dtype=dtype,
                             remat=remat)
      rows.append(largest_batch(setting, target, devices, **options))
      if progress is not None:
        progress(rows[-1])
  speeds = [row.get('estimated_clips_per_s') or 0 for row in rows if row['fits']]
  if speeds:
    fastest = max(speeds)
    for row in rows:
      row['fastest'] = row['fits'] and (row.get('estimated_clips_per_s') or 0) == fastest
  return rows
