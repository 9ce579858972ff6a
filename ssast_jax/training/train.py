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
from ssast_jax.training import checkpoints, faults, metrics, probing, schedule, sharding
from ssast_jax.training.prefetch import DevicePrefetcher
from ssast_jax.training.profiling import StepProfiler
from ssast_jax.training.step import StepSetup, eval_step, step_setup


class TrainingError(RuntimeError):
  """The run cannot continue; the message says why and what was kept."""


# Errors in what the run was given (data, workdir, process count) that end it with their
# one-line message and exit code 2 (main.py prints them, no traceback); TrainingError is 1.
INPUT_ERRORS = (ConversionError, ManifestError, FileNotFoundError,
                checkpoints.ProcessCountError, probing.ProbeDataError)


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


def prepare_data(settings: Settings, workdir: str, verify_data: bool) -> DataSplits:
  """Shards for both splits, converting the `.pt` folders or the audio on first use (process
  0 converts, the others wait) and checked against their manifests (sizes; content hashes
  with `verify_data`), and the normalisation statistics (missing ones from the manifest)."""
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
        audio = d.train_audio and not d.demo
        convert_to_shards(json_path, None if audio else pt_dir, dirs[split], audio=audio,
                          audio_root=(d.audio_root or None) if audio else None,
                          dtype=d.shard_dtype, num_mel_bins=d.num_mel_bins)
  multihost_utils.sync_global_devices('ssast_jax: shards ready')
  for split_dir in dirs.values():
    data.check_shards(split_dir, verify_content=verify_data)
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


def evaluate(params, splits: DataSplits, setup: StepSetup, beat=lambda: None) -> dict:
  """Validation metrics over every validation clip exactly once; `beat` after each batch."""
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
    beat()
  totals = jax.device_get(totals)
  count = totals.pop('count')
  return {f'eval/{k}': float(v / count) for k, v in totals.items() if k != 'loss'}


def picture_drawer(settings: Settings, setup: StepSetup, workdir: str):
  """`draw(params, step, writer)`, sending one validation clip's figure (mask, MPG
  reconstruction, MPC hits) to TensorBoard; None where `eval_picture` is off or the job has
  several processes (the parameters are not all on this host)."""
  if not settings.run.eval_picture or jax.process_count() > 1:
    return None
  from ssast_jax import handles, visualize  # pylint: disable=import-outside-toplevel
  _, _, clips = visualize.normalised_clips(settings, workdir, 'val', 1)
  mask = visualize.draw_mask(settings, jax.random.key(settings.run.seed))

  def draw(params, step: int, writer: metrics.MetricsWriter) -> None:
    model = handles.ModelHandle(settings.model, setup.graphdef, params)
    writer.write_image(step, 'val/clip',
                       visualize.clip_figure_image(model, clips[0], mask, title=f'step {step}'))
  return draw


def validate_and_schedule(state: dict, meta: dict, step: int, splits: DataSplits,
                          setup: StepSetup, writer: metrics.MetricsWriter,
                          beat=lambda: None, draw=None):
  """Validation at `step`, then the plateau rule on its metric; returns (state, meta,
  validation metrics) with the learning rate halved in `state` when the rule says so.
  `draw` (picture_drawer) also sends the clip figure to TensorBoard."""
  s = setup.settings
  metric_name, higher_is_better = checkpoints.best_metric(s.objective.task)
  eval_metrics = evaluate(state['params'], splits, setup, beat)
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
  if draw is not None:
    draw(state['params'], step, writer)
  log(f'step {step}: ' + ', '.join(f'{k} {v:.4f}' for k, v in eval_metrics.items()))
  return state, meta, eval_metrics


def probe_and_log(probe: probing.PretrainingProbe | None, params, step: int,
                  writer: metrics.MetricsWriter, beat=lambda: None) -> None:
  """The linear probe of the encoder at `step` (training/probing.py), logged; a no-op
  without `probe.train_json`."""
  if probe is None:
    return
  row = probe(params, beat)
  writer.write(step, row)
  log(f'step {step}: ' + ', '.join(f'{k} {v:.4f}' for k, v in row.items()))


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


def last_complete(workdir: str) -> str:
  """'the last complete checkpoint is step S in DIR' (or that there is none), for messages."""
  steps = checkpoints.complete_steps(workdir)
  where = checkpoints.checkpoint_dir(workdir)
  return (f'the last complete checkpoint is step {steps[-1]} in {where}' if steps
          else f'there is no complete checkpoint in {where}')


def save(mngr, step: int, state: dict, meta: dict, data: checkpoints.DataPosition,
         settings: Settings, workdir: str, eval_metrics: dict | None = None) -> None:
  """Starts checkpointing `state`, `meta` and the data position at `step` (asynchronously),
  unless a step was not finite under nan_policy 'stop' (then TrainingError). A failure to
  write this or the previous checkpoint raises CheckpointWriteError."""
  check_finite(state, settings, mngr, workdir)
  metric_name, _ = checkpoints.best_metric(settings.objective.task)
  best = None if eval_metrics is None else {metric_name: eval_metrics[metric_name]}
  try:
    checkpoints.save(mngr, step, state, meta, data, best)
  except Exception as error:  # orbax surfaces the previous async save's failure here too
    raise _write_error(error, workdir) from error


def wait_for_saves(mngr, workdir: str) -> None:
  """Blocks until the last checkpoint is complete; CheckpointWriteError if it failed."""
  try:
    mngr.wait_until_finished()
  except Exception as error:
    raise _write_error(error, workdir) from error


def close_checkpoints(mngr, workdir: str) -> None:
  """Closes `mngr`, which finishes its pending metadata writes: one that fails (a full
  disk) is a CheckpointWriteError too, not a traceback that hides the first."""
  try:
    mngr.close()
  except Exception as error:
    raise _write_error(error, workdir) from error


def _write_error(error: Exception, workdir: str) -> faults.CheckpointWriteError:
  """The CheckpointWriteError of a failed save; a save that failed because a peer process
  is gone (a checkpoint barrier of a job of several processes) ends this process as a lost
  peer instead (`exit_if_peer_lost`)."""
  exit_if_peer_lost(error, workdir)
  reason = ' '.join(str(error).split())[:300] or type(error).__name__
  return faults.CheckpointWriteError(
      f'a checkpoint could not be written ({type(error).__name__}: {reason}); '
      f'{last_complete(workdir)}. Free space or fix the folder, then rerun to resume')


def log_window(pending: list, window_start: float, wait_ms: float, batch_size: int) -> dict:
  """The logged row of a window of steps: means of their metrics, throughput, input wait.

  The window's time runs from `window_start` (a `time.perf_counter()`) until its metrics
  reach the host: steps are dispatched asynchronously, so only then are they computed."""
  host = jax.device_get(pending)
  seconds = time.perf_counter() - window_start
  row = {f'train/{k}': float(np.mean([m[k] for m in host])) for k in host[0]}
  row['train/clips_per_s'] = len(host) * batch_size / seconds
  row['train/data_wait_ms'] = wait_ms / len(host)
  return row


def exit_if_peer_lost(error: Exception, workdir: str) -> None:
  """Ends the process in one line (EXIT_PEER_LOST) when `error` is a failed collective of a
  job of several processes: another process is gone."""
  if faults.is_peer_failure(error, jax.process_count()):
    faults.exit_now(f'a peer process stopped: a collective failed on process '
                    f'{jax.process_index()} ({" ".join(str(error).split())[:200]}). '
                    f'{last_complete(workdir)}; rerun the same command to resume',
                    faults.EXIT_PEER_LOST)


def train_and_evaluate(config, workdir: str, verify_data: bool = False) -> dict:
  """Trains per `config` in `workdir`, resuming from its latest checkpoint; returns the
  last validation metrics. Every shard's size is checked before step 0, and its content
  hash too with `verify_data`."""
  # ---- Settings, devices and the compiled step (before any work: fails fast).
  settings = resolve(config)
  setup = step_setup(settings)
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  optim, run = settings.optim, settings.run

  # ---- Data.
  splits = prepare_data(settings, workdir, verify_data)
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

  probe = None
  if settings.probe.enabled:
    probe = probing.PretrainingProbe(settings, setup.graphdef, setup.mesh, splits.mean,
                                     splits.std)
    log('probe: {} train and {} val clips from {}'.format(*probe.clip_counts,
                                                         settings.probe.train_json))

  # ---- Model and optimiser state: fresh, or restored from the latest checkpoint.
  mngr = checkpoints.manager(workdir, settings.objective.task, run.keep_checkpoints,
                             run.checkpoint_every_minutes)
  restored = checkpoints.restore_latest(mngr, setup.abstract_state,
                                        checkpoints.DataPosition(loader), jax.process_count())
  if restored is None:
    start, state, meta = 0, setup.init(), {'plateau': schedule.plateau_init()}
  else:
    start, state, meta = restored
    log(f'resuming from the checkpoint at step {start}')
  writer = metrics.MetricsWriter(workdir, task=settings.objective.task, enabled=is_main,
                                 resume_step=None if restored is None else start)
  position = checkpoints.DataPosition(loader, loader.get_state())
  draw = picture_drawer(settings, setup, workdir) if is_main else None
  eval_metrics = {}
  if restored is None:
    state, meta, eval_metrics = validate_and_schedule(state, meta, 0, splits, setup, writer,
                                                      draw=draw)
    probe_and_log(probe, state['params'], 0, writer)
    save(mngr, 0, state, meta, position, settings, workdir, eval_metrics)

  # ---- Training loop.
  several = jax.process_count() > 1
  sigterm = faults.SigtermFlag(install=not several)
  watchdog = faults.ProgressWatchdog(several, lambda: last_complete(workdir))
  progress = metrics.progress_bar(total_steps, initial_step=start, enabled=is_main)
  prefetch = DevicePrefetcher(loader, setup.batch_sharding)
  profiler = StepProfiler(run.profile_steps, workdir, enabled=is_main)
  pending, window_start, wait_ms, done, preempted = [], time.perf_counter(), 0.0, start, False
  try:
    for step in range(start, total_steps):
      (batch,), data_state, waited = next(prefetch)
      done = step + 1
      profiler.before_step(done)
      state, step_metrics = setup.step(state, batch)
      profiler.after_step(done, step_metrics)
      position = checkpoints.DataPosition(loader, data_state)
      pending.append(step_metrics)
      wait_ms += waited
      progress.update(1)
      watchdog.beat()
      logged = done % run.print_every_steps == 0 or done == total_steps
      if logged:
        row = log_window(pending, window_start, wait_ms, optim.batch_size)
        writer.write(done, row)
        check_finite(state, settings, mngr, workdir)
        progress.set_postfix(loss=f'{row["train/loss"]:.4f}', acc=f'{row["train/mpc_acc"]:.3f}')
        pending, window_start, wait_ms = [], time.perf_counter(), 0.0
      # Every process asks every step (the preemption sync point is collective, and local to
      # check); the time-based decision, a broadcast from process 0, only at logging steps.
      preempted = sigterm.requested or mngr.reached_preemption(done)
      if probing.is_due(settings, done, total_steps):
        probe_and_log(probe, state['params'], done, writer, watchdog.beat)
      if done % optim.epoch_iter == 0:
        state, meta, eval_metrics = validate_and_schedule(state, meta, done, splits, setup,
                                                          writer, watchdog.beat, draw)
        save(mngr, done, state, meta, position, settings, workdir, eval_metrics)
      elif (preempted or done == total_steps or done % run.checkpoint_every_steps == 0
            or (logged and mngr.should_save(done))):
        save(mngr, done, state, meta, position, settings, workdir)
      watchdog.beat()
      if preempted:
        break
  except jax.errors.JaxRuntimeError as error:
    exit_if_peer_lost(error, workdir)
    raise
  finally:
    watchdog.stop()
    profiler.stop()
    sigterm.restore()
    prefetch.close()
    progress.close()
    try:
      wait_for_saves(mngr, workdir)
    finally:
      best = mngr.best_step()
      writer.close()
      close_checkpoints(mngr, workdir)
  if preempted:
    raise faults.Preempted(f'preempted (SIGTERM): every process saved the checkpoint at step '
                           f'{done}; rerun the same command to resume')

  # ---- Summary.
  outcome = 'finished' if done == total_steps else 'stopped'
  log(f'{outcome} at step {done} of {total_steps}. Logs: {workdir}/metrics.jsonl, result.csv, '
      f'tensorboard/; checkpoints: {checkpoints.checkpoint_dir(workdir)} (best: step {best}). '
      f'For the original PyTorch code: python -m ssast_jax.export --workdir {workdir} '
      f'--out {workdir}/model.pth')
  return eval_metrics
