"""Pretraining: `train_and_evaluate(config, workdir)`, the users' `run.py` in one call.

Data are converted to shards on first use, the jitted step runs over a ('data', 'fsdp')
mesh (batch split over every device, parameters and optimiser state split over 'fsdp'; see
sharding.py), validation runs at step 0 and every `epoch_iter` steps, and orbax checkpoints
make the run resumable: re-running the same command continues from the latest checkpoint
(restored into the current mesh's layout) and reproduces an uninterrupted run bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from ssast_jax import checkpoints, config_checks, data, metrics, schedule, sharding
from ssast_jax.data import ManifestError
from ssast_jax.data.convert import ConversionError, convert as convert_to_shards
from ssast_jax.data.demo import write_demo_dataset
from ssast_jax.device_prefetch import DevicePrefetcher
from ssast_jax.model import ModelConfig, abstract_model
from ssast_jax.profiling import StepProfiler
from ssast_jax.train_step import StepSettings, eval_step, init_state, jit_train_step


class TrainingError(RuntimeError):
  """The run cannot continue; the message says why and what was kept."""


# Errors that end a run with their one-line message (main.py prints them, no traceback).
RUN_ERRORS = (TrainingError, ConversionError, ManifestError, FileNotFoundError)


def model_config(config) -> ModelConfig:
  m = config.model
  return ModelConfig.from_size(
      m.size, depth=m.depth, fshape=m.fshape, tshape=m.tshape, fstride=m.fstride,
      tstride=m.tstride, input_fdim=config.data.num_mel_bins,
      input_tdim=config.data.target_length, dtype=config.dtype,
      remat=config.get('remat', False),
      remat_policy=config.get('remat_policy', 'nothing_saveable'),
      attention=m.get('attention', 'auto'))


def step_settings(config) -> StepSettings:
  return StepSettings(
      seed=config.seed, task=config.task, patch_grid=config_checks.patch_grid(config),
      mask_patch=config.mask_patch, eval_mask_patch=config.eval_mask_patch,
      mask_mode=config_checks.resolved_mask_mode(config),
      cluster_factor=config.cluster_factor, paper_infonce=config.paper_infonce,
      joint_passes=config.joint_passes,
      mpc_trains_encoder=config.get('mpc_trains_encoder', False), lr=config.lr,
      warmup=config.warmup, grad_accum_steps=config.get('grad_accum_steps', 1),
      concurrent_parts=config_checks.resolved_concurrent_parts(
          config, jax.device_count(), jax.default_backend()))


@dataclasses.dataclass(frozen=True)
class StepSetup:
  """The compiled-step ingredients of a config, shared by training and the benchmark."""
  mesh: jax.sharding.Mesh
  graphdef: Any
  settings: StepSettings
  abstract_state: Any  # shape-dtype structs carrying the state's shardings
  init: Callable[[], dict]  # a fresh state, placed in those shardings
  step: Callable  # (state, batch) -> (state, metrics), jitted; the state is donated

  @property
  def batch_sharding(self) -> jax.sharding.NamedSharding:
    return sharding.batch_sharding(self.mesh)


def batch_shape(config) -> tuple[int, int, int]:
  """The global batch of log-mel features one training step takes: (clips, frames, bins)."""
  return (config.batch_size, config.data.target_length, config.data.num_mel_bins)


def step_setup(config) -> StepSetup:
  """Mesh, state layout and jitted step for `config` on all devices; raises ConfigError
  when `fsdp` or the batch do not split over them, or `batch_invariant` is set off the
  CPU."""
  config_checks.check_devices(config, jax.device_count(), jax.default_backend())
  mcfg, settings = model_config(config), step_settings(config)
  mesh = sharding.make_mesh(config.fsdp)

  def fresh_state():
    return init_state(mcfg, config.seed, config.lr)

  abstract = jax.eval_shape(fresh_state)
  state_sharding = sharding.state_shardings(abstract, mesh)
  graphdef, _ = abstract_model(mcfg)
  return StepSetup(mesh, graphdef, settings, sharding.with_shardings(abstract, state_sharding),
                   jax.jit(fresh_state, out_shardings=state_sharding),
                   jit_train_step(graphdef, settings, mesh, state_sharding,
                                  config.get('batch_invariant', False)))


@dataclasses.dataclass
class DataSplits:
  train_dir: str
  val_dir: str
  mean: float
  std: float


def prepare_data(config, workdir: str) -> DataSplits:
  """Shards for both splits, converting the `.pt` folders on first use (process 0 converts,
  the others wait), and the normalisation statistics."""
  d = config.data
  shards_root = d.shards_dir or os.path.join(workdir, 'shards')
  dirs = {s: config_checks.split_shards_dir(shards_root, s) for s in ('train', 'val')}
  if jax.process_index() == 0:
    sources = {'train': (d.train_json, d.train_pt_dir), 'val': (d.val_json, d.val_pt_dir)}
    if d.demo:
      demo = write_demo_dataset(os.path.join(workdir, 'demo_data'),
                                     target_length=d.target_length,
                                     num_mel_bins=d.num_mel_bins)
      sources = {'train': (demo['train_json'], demo['train_pt_dir']),
                 'val': (demo['val_json'], demo['val_pt_dir'])}
    for split, (json_path, pt_dir) in sources.items():
      if json_path:
        convert_to_shards(json_path, pt_dir, dirs[split], dtype=d.shard_dtype,
                     num_mel_bins=d.num_mel_bins)
  multihost_utils.sync_global_devices('ssast_jax: shards ready')
  manifest = data.ShardedFeatures(dirs['train']).manifest
  mean, std = d.mean, d.std
  if mean is None or std is None:
    mean = manifest['mean'] if mean is None else mean
    std = manifest['std'] if std is None else std
    log(f'normalisation from {dirs["train"]}/manifest.json: mean {mean:.4f}, std {std:.4f}')
  return DataSplits(dirs['train'], dirs['val'], float(mean), float(std))


def log(message: str) -> None:
  """Progress messages come from process 0 only; they do not break the progress bar."""
  if jax.process_index() == 0:
    tqdm.tqdm.write(message, file=sys.stdout)


def evaluate(params, splits: DataSplits, config, setup: StepSetup) -> dict:
  """Validation metrics over every validation clip exactly once."""
  loader = data.eval_loader(
      splits.val_dir, batch_size=config.batch_size, target_length=config.data.target_length,
      mean=splits.mean, std=splits.std, process_index=jax.process_index(),
      process_count=jax.process_count())
  totals = None
  for batch_index, batch in enumerate(loader):
    fbank, valid = (jax.make_array_from_process_local_data(setup.batch_sharding, batch[k])
                    for k in ('fbank', 'valid'))
    sums = eval_step(params, fbank, valid, batch_index, graphdef=setup.graphdef,
                     settings=setup.settings, mesh=setup.mesh)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = totals.pop('count')
  return {f'eval/{k}': float(v / count) for k, v in totals.items() if k != 'loss'}


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
  config_checks.check_config(config)
  setup = step_setup(config)  # before any work: checks that the devices fit the config
  replicated = sharding.replicated(setup.mesh)
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  splits = prepare_data(config, workdir)
  check_resumable(config, workdir)
  if is_main:
    metrics.save_config(workdir, config)

  mngr = checkpoints.manager(workdir, config.task, config.keep_checkpoints)
  restored = checkpoints.restore_latest(mngr, setup.abstract_state)
  loader = data.train_loader(
      splits.train_dir, batch_size=config.batch_size, target_length=config.data.target_length,
      mean=splits.mean, std=splits.std, seed=config.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), worker_count=config.data.workers,
      random_crop=config.data.random_crop)
  if restored is None:
    state, meta, start = setup.init(), {'plateau': schedule.plateau_init()}, 0
  else:
    start, state, meta = restored
    loader.set_state(meta['data_state'])
    log(f'resuming from the checkpoint at step {start}')
  steps_per_epoch = data.steps_per_epoch(splits.train_dir, config.batch_size)
  total_steps = config.num_epochs * steps_per_epoch
  if config.max_steps is not None:
    total_steps = min(total_steps, config.max_steps)
  writer = metrics.MetricsWriter(workdir, task=config.task, enabled=is_main,
                                 resume_step=None if restored is None else start)
  metric_name, higher_is_better = checkpoints.best_metric(config.task)
  mode = 'max' if higher_is_better else 'min'

  def save(step, eval_metrics=None):
    check_finite(state)
    meta['data_state'] = data_state
    checkpoints.save(mngr, step, state, meta, eval_metrics)

  def run_evaluation(step):
    nonlocal state
    eval_metrics = evaluate(state['params'], splits, config, setup)
    if step > 0:
      lr = float(state['lr'])
      meta['plateau'], new_lr = schedule.plateau_step(
          meta['plateau'], eval_metrics[metric_name], lr, mode=mode,
          patience=config.lr_patience)
      if new_lr != lr:
        log(f'step {step}: validation {metric_name} has not improved for '
            f'{config.lr_patience + 1} evaluations; learning rate {lr:.3g} -> {new_lr:.3g}')
        state = {**state, 'lr': jax.device_put(jnp.float32(new_lr), replicated)}
    writer.write(step, eval_metrics)
    log(f'step {step}: ' + ', '.join(f'{k} {v:.4f}' for k, v in eval_metrics.items()))
    return eval_metrics

  def check_finite(state):
    bad = int(state['nonfinite_step'])
    if bad >= 0 and config.nan_policy == 'stop':
      kept = mngr.latest_step()
      raise TrainingError(
          f'non-finite loss or gradient at step {bad}; training stopped (nan_policy=stop). '
          f'The last good checkpoint is {"step " + str(kept) if kept is not None else "none"}'
          f' in {checkpoints.checkpoint_dir(workdir)}; set nan_policy=skip to skip such steps.')

  data_state = loader.get_state()
  eval_metrics = {}
  if restored is None:
    eval_metrics = run_evaluation(0)
    save(0, {metric_name: eval_metrics[metric_name]})
  stop = _StopRequest()
  progress = metrics.progress_bar(total_steps, initial_step=start, enabled=is_main)
  prefetch = DevicePrefetcher(loader, setup.batch_sharding)
  profiler = StepProfiler(config_checks.profile_range(config), workdir, enabled=is_main)
  pending, window_start, wait_ms = [], time.perf_counter(), 0.0
  done = start
  try:
    for step in range(start, total_steps):
      batch, data_state, waited = next(prefetch)
      wait_ms += waited
      done = step + 1
      profiler.before_step(done)
      state, step_metrics = setup.step(state, batch)
      profiler.after_step(done, step_metrics)
      pending.append(step_metrics)
      progress.update(1)
      if done % config.print_every_steps == 0 or done == total_steps:
        host = jax.device_get(pending)
        elapsed = time.perf_counter() - window_start
        row = {f'train/{k}': float(np.mean([m[k] for m in host])) for k in host[0]}
        row['train/clips_per_s'] = len(host) * config.batch_size / elapsed
        row['train/data_wait_ms'] = wait_ms / len(host)
        writer.write(done, row)
        check_finite(state)
        progress.set_postfix(loss=f'{row["train/loss"]:.4f}', acc=f'{row["train/mpc_acc"]:.3f}')
        pending, window_start, wait_ms = [], time.perf_counter(), 0.0
      if done % config.epoch_iter == 0:
        eval_metrics = run_evaluation(done)
        save(done, {metric_name: eval_metrics[metric_name]})
      elif done % config.checkpoint_every_steps == 0 or done == total_steps:
        save(done)
      if stop.requested:
        if done % config.checkpoint_every_steps and done % config.epoch_iter:
          save(done)
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
  outcome = 'finished' if done == total_steps else 'stopped'
  log(f'{outcome} at step {done} of {total_steps}. Logs: {workdir}/metrics.jsonl, result.csv, '
      f'tensorboard/; checkpoints: {checkpoints.checkpoint_dir(workdir)} (best: step {best}). '
      f'For the original PyTorch code: python -m ssast_jax.export --workdir {workdir} '
      f'--out {workdir}/model.pth')
  return eval_metrics


def check_resumable(config, workdir: str) -> None:
  """Refuses to resume a workdir whose checkpoints were written with a different config."""
  saved_path = os.path.join(workdir, checkpoints.CONFIG_FILE)
  if not (os.path.exists(saved_path) and os.path.isdir(checkpoints.checkpoint_dir(workdir))
          and os.listdir(checkpoints.checkpoint_dir(workdir))):
    return
  differing = checkpoints.incompatible_keys(checkpoints.read_config(workdir),
                                            json.loads(config.to_json_best_effort()))
  if differing:
    raise config_checks.ConfigError(
        f'{workdir} holds checkpoints of a run with a different config; differing keys: '
        + ', '.join(differing) + '. Use another --workdir or the saved config.')
