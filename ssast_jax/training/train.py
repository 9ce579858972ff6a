"""Pretraining: `train_and_evaluate(config, workdir)`, the users' `run.py` in one call.

The config is resolved into typed settings first (`config.settings.resolve`). Data are
converted to shards on first use, the jitted step runs over a ('data', 'fsdp') mesh (batch
split over every device, parameters and optimiser state split over 'fsdp'; see
sharding.py), validation runs at step 0 and every `epoch_iter` steps, and orbax
checkpoints make the run resumable: re-running the same command continues from the latest
checkpoint (restored into the current mesh's layout) and reproduces an uninterrupted run
bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tqdm
from jax.experimental import multihost_utils

from ssast_jax import data
from ssast_jax.config.settings import ConfigError, Settings, resolve, split_shards_dir
from ssast_jax.data import ManifestError
from ssast_jax.data.convert import ConversionError, convert as convert_to_shards
from ssast_jax.data.demo import write_demo_dataset
from ssast_jax.training import checkpoints, metrics, schedule, sharding
from ssast_jax.training.prefetch import DevicePrefetcher
from ssast_jax.training.profiling import StepProfiler
from ssast_jax.training.step import StepSetup, eval_step, step_setup


class TrainingError(RuntimeError):
  """The run cannot continue; the message says why and what was kept."""


# Errors that end a run with their one-line message (main.py prints them, no traceback).
RUN_ERRORS = (TrainingError, ConversionError, ManifestError, FileNotFoundError)


@dataclasses.dataclass(frozen=True)
class DataSplits:
  """Converted shards of both splits and the normalisation statistics used."""
  train_dir: str
  val_dir: str
  mean: float
  std: float


def log(message: str) -> None:
  """Progress messages come from process 0 only; they do not break the progress bar."""
  if jax.process_index() == 0:
    tqdm.tqdm.write(message, file=sys.stdout)


def prepare_data(settings: Settings, workdir: str) -> DataSplits:
  """Shards for both splits, converting the `.pt` folders on first use (process 0 converts,
  the others wait), and the normalisation statistics (missing ones from the manifest)."""
  d = settings.data
  shards_root = d.shards_dir or os.path.join(workdir, 'shards')
  dirs = {s: split_shards_dir(shards_root, s) for s in ('train', 'val')}
  if jax.process_index() == 0:
    sources = {'train': (d.train_json, d.train_pt_dir), 'val': (d.val_json, d.val_pt_dir)}
    if d.demo:
      demo = write_demo_dataset(os.path.join(workdir, 'demo_data'),
                                target_length=d.target_length, num_mel_bins=d.num_mel_bins)
      sources = {'train': (demo['train_json'], demo['train_pt_dir']),
                 'val': (demo['val_json'], demo['val_pt_dir'])}
    for split, (json_path, pt_dir) in sources.items():
      if json_path:
        convert_to_shards(json_path, pt_dir, dirs[split], dtype=d.shard_dtype,
                          num_mel_bins=d.num_mel_bins)
  multihost_utils.sync_global_devices('ssast_jax: shards ready')
  manifest = data.ShardedFeatures(dirs['train']).manifest
  mean = manifest['mean'] if d.mean is None else d.mean
  std = manifest['std'] if d.std is None else d.std
  if d.mean is None or d.std is None:
    log(f'normalisation from {dirs["train"]}/manifest.json: mean {mean:.4f}, std {std:.4f}')
  return DataSplits(dirs['train'], dirs['val'], float(mean), float(std))


def check_resumable(settings: Settings, workdir: str) -> None:
  """Refuses to resume a workdir whose checkpoints were written with a different config."""
  saved_path = os.path.join(workdir, checkpoints.CONFIG_FILE)
  ckpt_dir = checkpoints.checkpoint_dir(workdir)
  if not (os.path.exists(saved_path) and os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir)):
    return
  differing = checkpoints.incompatible_keys(checkpoints.read_config(workdir),
                                            settings.config_dict())
  if differing:
    raise ConfigError(
        f'{workdir} holds checkpoints of a run with a different config; differing keys: '
        + ', '.join(differing) + '. Use another --workdir or the saved config.')


def evaluate(params, splits: DataSplits, setup: StepSetup) -> dict:
  """Validation metrics over every validation clip exactly once."""
  s = setup.settings
  loader = data.eval_loader(
      splits.val_dir, batch_size=s.optim.batch_size, target_length=s.data.target_length,
      mean=splits.mean, std=splits.std, process_index=jax.process_index(),
      process_count=jax.process_count())
  totals = None
  for batch_index, batch in enumerate(loader):
    fbank, valid = (jax.make_array_from_process_local_data(setup.batch_sharding, batch[k])
                    for k in ('fbank', 'valid'))
    sums = eval_step(params, fbank, valid, batch_index, graphdef=setup.graphdef,
                     settings=s, mesh=setup.mesh)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = totals.pop('count')
  return {f'eval/{k}': float(v / count) for k, v in totals.items() if k != 'loss'}


def validate_and_schedule(state: dict, meta: dict, step: int, splits: DataSplits,
                          setup: StepSetup, writer: metrics.MetricsWriter):
  """Validation at `step`, then the plateau rule on its metric; returns (state, meta,
  validation metrics) with the learning rate halved in `state` when the rule says so."""
  s = setup.settings
  metric_name, higher_is_better = checkpoints.best_metric(s.objective.task)
  eval_metrics = evaluate(state['params'], splits, setup)
  if step > 0:
    lr = float(state['lr'])
    plateau, new_lr = schedule.plateau_step(
        meta['plateau'], eval_metrics[metric_name], lr,
        mode='max' if higher_is_better else 'min', patience=s.optim.lr_patience)
    meta = {**meta, 'plateau': plateau}
    if new_lr != lr:
      log(f'step {step}: validation {metric_name} has not improved for '
          f'{s.optim.lr_patience + 1} evaluations; learning rate {lr:.3g} -> {new_lr:.3g}')
      state = {**state, 'lr': jax.device_put(jnp.float32(new_lr),
                                             sharding.replicated(setup.mesh))}
  writer.write(step, eval_metrics)
  log(f'step {step}: ' + ', '.join(f'{k} {v:.4f}' for k, v in eval_metrics.items()))
  return state, meta, eval_metrics


def check_finite(state: dict, settings: Settings, mngr: ocp.CheckpointManager,
                 workdir: str) -> None:
  """Raises TrainingError when a step was not finite and `nan_policy` is 'stop'."""
  bad = int(state['nonfinite_step'])
  if bad >= 0 and settings.run.nan_policy == 'stop':
    kept = mngr.latest_step()
    raise TrainingError(
        f'non-finite loss or gradient at step {bad}; training stopped (nan_policy=stop). '
        f'The last good checkpoint is {"step " + str(kept) if kept is not None else "none"}'
        f' in {checkpoints.checkpoint_dir(workdir)}; set nan_policy=skip to skip such steps.')


def save(mngr, step: int, state: dict, meta: dict, settings: Settings, workdir: str,
         eval_metrics: dict | None = None) -> None:
  """Checkpoints `state` and `meta` at `step` (asynchronously), unless a step was not
  finite under nan_policy 'stop' (then TrainingError)."""
  check_finite(state, settings, mngr, workdir)
  metric_name, _ = checkpoints.best_metric(settings.objective.task)
  best = None if eval_metrics is None else {metric_name: eval_metrics[metric_name]}
  checkpoints.save(mngr, step, state, meta, best)


def log_window(pending: list, seconds: float, wait_ms: float, batch_size: int) -> dict:
  """The logged row of a window of steps: means of their metrics, throughput, input wait."""
  host = jax.device_get(pending)
  row = {f'train/{k}': float(np.mean([m[k] for m in host])) for k in host[0]}
  row['train/clips_per_s'] = len(host) * batch_size / seconds
  row['train/data_wait_ms'] = wait_ms / len(host)
  return row


class _StopRequest:
  """Turns SIGTERM into a flag the loop checks between steps."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains per `config` in `workdir`, resuming from its latest checkpoint; returns the
  last validation metrics."""
  # ---- Settings, devices and the compiled step (before any work: fails fast).
  settings = resolve(config)
  setup = step_setup(settings)
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  optim, run = settings.optim, settings.run

  # ---- Data.
  splits = prepare_data(settings, workdir)
  check_resumable(settings, workdir)
  if is_main:
    metrics.save_config(workdir, settings.config_dict())
  loader = data.train_loader(
      splits.train_dir, batch_size=optim.batch_size, target_length=settings.data.target_length,
      mean=splits.mean, std=splits.std, seed=run.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), worker_count=settings.data.workers,
      random_crop=settings.data.random_crop)
  total_steps = optim.num_epochs * data.steps_per_epoch(splits.train_dir, optim.batch_size)
  if optim.max_steps is not None:
    total_steps = min(total_steps, optim.max_steps)

  # ---- Model and optimiser state: fresh, or restored from the latest checkpoint.
  mngr = checkpoints.manager(workdir, settings.objective.task, run.keep_checkpoints)
  restored = checkpoints.restore_latest(mngr, setup.abstract_state)
  if restored is None:
    start, state, meta = 0, setup.init(), {'plateau': schedule.plateau_init()}
  else:
    start, state, meta = restored
    loader.set_state(meta['data_state'])
    log(f'resuming from the checkpoint at step {start}')
  writer = metrics.MetricsWriter(workdir, task=settings.objective.task, enabled=is_main,
                                 resume_step=None if restored is None else start)
  meta = {**meta, 'data_state': loader.get_state()}
  eval_metrics = {}
  if restored is None:
    state, meta, eval_metrics = validate_and_schedule(state, meta, 0, splits, setup, writer)
    save(mngr, 0, state, meta, settings, workdir, eval_metrics)

  # ---- Training loop.
  stop = _StopRequest()
  progress = metrics.progress_bar(total_steps, initial_step=start, enabled=is_main)
  prefetch = DevicePrefetcher(loader, setup.batch_sharding)
  profiler = StepProfiler(run.profile_steps, workdir, enabled=is_main)
  pending, window_start, wait_ms, done = [], time.perf_counter(), 0.0, start
  try:
    for step in range(start, total_steps):
      batch, data_state, waited = next(prefetch)
      done = step + 1
      profiler.before_step(done)
      state, step_metrics = setup.step(state, batch)
      profiler.after_step(done, step_metrics)
      meta = {**meta, 'data_state': data_state}
      pending.append(step_metrics)
      wait_ms += waited
      progress.update(1)
      if done % run.print_every_steps == 0 or done == total_steps:
        row = log_window(pending, time.perf_counter() - window_start, wait_ms,
                         optim.batch_size)
        writer.write(done, row)
        check_finite(state, settings, mngr, workdir)
        progress.set_postfix(loss=f'{row["train/loss"]:.4f}', acc=f'{row["train/mpc_acc"]:.3f}')
        pending, window_start, wait_ms = [], time.perf_counter(), 0.0
      if done % optim.epoch_iter == 0:
        state, meta, eval_metrics = validate_and_schedule(state, meta, done, splits, setup,
                                                          writer)
        save(mngr, done, state, meta, settings, workdir, eval_metrics)
      elif done % run.checkpoint_every_steps == 0 or done == total_steps or stop.requested:
        save(mngr, done, state, meta, settings, workdir)
      if stop.requested:
        log(f'SIGTERM: saved the checkpoint at step {done}; exiting')
        break
  finally:
    profiler.stop()
    stop.restore()
    prefetch.close()
    progress.close()
    mngr.wait_until_finished()
    best = mngr.best_step()
    mngr.close()
    writer.close()

  # ---- Summary.
  outcome = 'finished' if done == total_steps else 'stopped'
  log(f'{outcome} at step {done} of {total_steps}. Logs: {workdir}/metrics.jsonl, result.csv, '
      f'tensorboard/; checkpoints: {checkpoints.checkpoint_dir(workdir)} (best: step {best}). '
      f'For the original PyTorch code: python -m ssast_jax.export --workdir {workdir} '
      f'--out {workdir}/model.pth')
  return eval_metrics
