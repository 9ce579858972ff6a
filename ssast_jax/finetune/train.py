"""Fine-tuning: `train_and_evaluate(config, workdir)`, the original's `run.py --task
ft_avgtok|ft_cls` and `traintest.train` in one call.

The config (configs/finetune*.py) is resolved into `FinetuneSettings` first. The clip lists
are converted to shards as for pretraining, each clip's `labels` becomes a multi-hot target
through the label CSV (a bad label ends the run naming the clip), the classifier is built
from the pretrained model (`finetune_model`), and the jitted step trains it on batches the
device prefetcher (`training.prefetch`) has already placed on the devices. After every
epoch the validation set gives mAP, mAUC, accuracy (`evaluation`), and the running mean of
the epochs' predictions (the original's checkpoint ensemble) gives the `cum_` values;
metrics go to metrics.jsonl, TensorBoard and result.csv (the original's columns). Then the
lr steps: MultiStepLR is tabulated in the step; with `adaptschedule`, ReduceLROnPlateau on
the mAP runs here (`adapt_lr`) and its state goes into the checkpoint's meta. Orbax
checkpoints (the pretraining module's) keep the latest ones and the best by the main
metric; re-running the same command resumes from the latest and repeats an uninterrupted
run step for step.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import time

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from ssast_jax import data
from ssast_jax.config.finetune import FinetuneSettings, check_devices, resolve_finetune
from ssast_jax.config.settings import ConfigError
from ssast_jax.data import convert
from ssast_jax.finetune import augment, evaluation, labels as labels_lib, lr_schedule
from ssast_jax.finetune.model import finetune_model
from ssast_jax.finetune.step import FinetuneStep, add_params, base_lrs, finetune_step
from ssast_jax.handles import ClassifierHandle, classifier_from_params
from ssast_jax.interchange import finetuned, workdir as run_record
from ssast_jax.training import checkpoints, faults, metrics
from ssast_jax.training import train as pretrain
from ssast_jax.training.prefetch import DevicePrefetcher
from ssast_jax.training.train import TrainingError, log, log_window

INPUT_ERRORS = pretrain.INPUT_ERRORS + (labels_lib.LabelError,)
PREDICTIONS_DIR = 'predictions'
__all__ = ['INPUT_ERRORS', 'TrainingError', 'train_and_evaluate']


def result_columns(main_metric: str) -> tuple[str, ...]:
  """result.csv's columns, as the original's `train()` fills `result[epoch - 1]`: main
  metric (mAP or acc), mAUC, average precision, average recall, d-prime, the epoch's mean
  training loss, validation loss, the ensemble's main metric and mAUC, the encoder lr."""
  return (f'eval/{main_metric}', 'eval/mAUC', 'eval/average_precision',
          'eval/average_recall', 'eval/d_prime', 'train/epoch_loss', 'eval/loss',
          f'eval/cum_{main_metric}', 'eval/cum_mAUC', 'train/lr')


def clip_targets(shards_dir: str, table: labels_lib.LabelTable) -> np.ndarray:
  """Multi-hot targets `(N, K)` of a split's clips from the `labels` of its clip lists;
  LabelError names the first clip whose labels the CSV cannot map."""
  features = data.ShardedFeatures(shards_dir)
  count = len(features)
  return labels_lib.multi_hot_batch([features.labels(i) for i in range(count)],
                                    [features.wav(i) for i in range(count)], table)


def clip_weights(settings: FinetuneSettings, shards_dir: str) -> np.ndarray | None:
  """The sampling weight of each converted training clip (`bal`), or None.

  The weights CSV has one value per entry of the training JSON; the shards keep the JSON
  order without the entries the converter skipped, so clips are matched to entries in
  order by their wav id."""
  if not settings.bal:
    return None
  path, json_path = settings.train_weights, settings.data.train_json
  try:
    weights = np.atleast_1d(np.loadtxt(path, delimiter=',', dtype=np.float64))
  except (OSError, ValueError) as error:
    raise ConfigError(f'data.train_weights: cannot read {path}: {error}') from None
  entries = [wav for wav, _ in convert.read_entries(pathlib.Path(json_path))]
  if weights.ndim != 1 or len(weights) != len(entries):
    raise ConfigError(f'data.train_weights: {path} holds {weights.size} weights for the '
                      f'{len(entries)} entries of {json_path}')
  if not (np.all(np.isfinite(weights)) and np.all(weights >= 0) and np.any(weights > 0)):
    raise ConfigError(f'data.train_weights: {path} needs finite weights >= 0, not all 0')
  features, per_clip, entry = data.ShardedFeatures(shards_dir), [], 0
  for clip in range(len(features)):
    wav = features.wav(clip)
    while entry < len(entries) and entries[entry] != wav:  # entries the converter skipped
      entry += 1
    if entry == len(entries):
      raise ConfigError(f'data.train_weights: clip {wav!r} of {shards_dir} is not in '
                        f'{json_path} (in order): were the shards converted from it?')
    per_clip.append(weights[entry])
    entry += 1
  return np.asarray(per_clip)


def label_csv_path(settings: FinetuneSettings, workdir: str) -> str:
  """The label CSV: `data.label_csv`, or the demo set's own."""
  if settings.data.demo:
    return os.path.join(workdir, 'demo_data', 'labels.csv')
  return settings.data.label_csv


def build_classifier(settings: FinetuneSettings, num_labels: int) -> ClassifierHandle:
  """The classifier from the pretrained model, on this run's grid, in its compute dtype."""
  try:
    handle = finetune_model(settings.pretrained, num_labels=num_labels,
                            fstride=settings.fstride, tstride=settings.tstride,
                            input_tdim=settings.data.target_length,
                            input_fdim=settings.data.num_mel_bins, seed=settings.seed,
                            pooling=settings.pooling)
  except (ValueError, TypeError) as error:
    raise ConfigError(f'pretrained: {settings.pretrained}: {error}') from None
  if handle.config.dtype != settings.dtype:
    handle = classifier_from_params(dataclasses.replace(handle.config, dtype=settings.dtype),
                                    handle.params, handle.extras)
  return handle


def predict(params, splits, settings: FinetuneSettings, setup: FinetuneStep,
            targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(sigmoid outputs `(N, K)`, per-clip losses `(N,)`) of every validation clip, in order,
  on every process: each process reads its rows of each global batch, the step's outputs
  are replicated, and the padding rows, all after the last clip, are cut off."""
  loader = data.eval_loader(splits.val_dir, batch_size=settings.batch_size,
                            target_length=settings.data.target_length, mean=splits.mean,
                            std=splits.std, process_index=jax.process_index(),
                            process_count=jax.process_count(), targets=targets)
  outputs, losses = [], []
  for batch in loader:
    fbank, batch_labels = (jax.make_array_from_process_local_data(setup.batch_sharding, batch[k])
                           for k in ('fbank', 'labels'))
    probs, loss = multihost_utils.process_allgather(
        setup.evaluate(params, fbank, batch_labels), tiled=True)
    outputs.append(probs)
    losses.append(loss)
  return np.concatenate(outputs)[:len(targets)], np.concatenate(losses)[:len(targets)]


def ensemble(workdir: str, predictions: np.ndarray, epoch: int) -> np.ndarray:
  """The mean prediction of epochs 1..`epoch` (`validate_ensemble`), kept per epoch under
  WORKDIR/predictions so that redoing an epoch after a resume reads the previous one. Process
  0 writes them; every process reads them (the workdir is shared, as for checkpoints)."""
  folder = os.path.join(workdir, PREDICTIONS_DIR)
  path = lambda e: os.path.join(folder, f'cum_predictions_{e}.npy')  # noqa: E731
  previous = np.load(path(epoch - 1)) if epoch > 1 else None
  cumulative = evaluation.ensemble_update(previous, predictions, epoch)
  if jax.process_index() == 0:
    os.makedirs(folder, exist_ok=True)
    np.save(path(epoch), cumulative)
    if os.path.exists(path(epoch - 2)):
      os.remove(path(epoch - 2))
  if jax.process_count() > 1:  # written before any process reads it
    multihost_utils.sync_global_devices(f'cum_predictions_{epoch}')
  return cumulative


def validate(state: dict, epoch: int, splits, settings: FinetuneSettings,
             setup: FinetuneStep, targets: np.ndarray, workdir: str) -> dict:
  """The epoch's eval/ metrics: the model's and its predictions' running mean's."""
  outputs, losses = predict(state['params'], splits, settings, setup, targets)
  stats = evaluation.evaluate(outputs, targets)
  cum = evaluation.evaluate(ensemble(workdir, outputs, epoch), targets)
  row = {f'eval/{k}': v for k, v in stats.items()}
  row.update({'eval/loss': float(np.mean(losses)), 'eval/cum_mAP': cum['mAP'],
              'eval/cum_mAUC': cum['mAUC'], 'eval/cum_acc': cum['acc']})
  return row


def weight_average(state: dict, handle: ClassifierHandle, splits,
                   settings: FinetuneSettings, setup: FinetuneStep, targets: np.ndarray,
                   workdir: str) -> dict:
  """`validate_wa`: the mean of the parameters after epochs wa_start..wa_end, evaluated
  (WORKDIR/wa_result.csv: mAP, mAUC, average precision, average recall, d-prime, one per
  line as the original writes it) and exported as the original's fine-tuned model
  (WORKDIR/wa_model.pth)."""
  count = settings.wa_end - settings.wa_start + 1
  averaged = jax.tree.map(lambda total: total / count, state['wa_sum'])
  outputs, _ = predict(averaged, splits, settings, setup, targets)
  stats = evaluation.evaluate(outputs, targets)
  averaged = multihost_utils.process_allgather(averaged, tiled=True)
  if jax.process_index() != 0:
    return stats
  np.savetxt(os.path.join(workdir, 'wa_result.csv'),
             [stats[k] for k in ('mAP', 'mAUC', 'average_precision', 'average_recall',
                                 'd_prime')])
  finetuned.write_checkpoint(nnx.to_pure_dict(averaged) if isinstance(averaged, nnx.State)
                             else averaged, handle.config,
                             os.path.join(workdir, 'wa_model.pth'), handle.extras)
  log(f'weight average of epochs {settings.wa_start}-{settings.wa_end}: ' +
      ', '.join(f'{k} {stats[k]:.4f}' for k in ('acc', 'mAP', 'mAUC')))
  return stats


def adapt_lr(state: dict, meta: dict, m_ap: float, epoch: int, settings: FinetuneSettings,
             steps_per_epoch: int) -> tuple[dict, dict]:
  """`--adaptschedule`: the original's `scheduler.step(mAP)` after `epoch` (1-based) on the
  float64 lrs of `meta`; returns (state, meta) with the lrs in force for the next epoch in
  both (the state's as float32)."""
  adaptive = lr_schedule.adaptive_epoch_end(
      meta['adaptive'], m_ap, first_step=(epoch - 1) * steps_per_epoch,
      num_steps=steps_per_epoch, base_lrs=base_lrs(settings), warmup=settings.warmup,
      patience=settings.lr_patience)
  lrs = {group: jax.device_put(np.float32(lr), state['lr'][group].sharding)
         for group, lr in adaptive['lr'].items()}
  return {**state, 'lr': lrs}, {**meta, 'adaptive': adaptive}


def save(mngr, step: int, state: dict, meta: dict, position, workdir: str,
         best=None) -> None:
  """Starts checkpointing at `step`; CheckpointWriteError when this or the last save fails."""
  try:
    checkpoints.save(mngr, step, state, meta, position, best)
  except Exception as error:  # orbax surfaces the previous async save's failure here too
    raise pretrain._write_error(error, workdir) from error  # pylint: disable=protected-access


def train_and_evaluate(config, workdir: str, verify_data: bool = False) -> dict:
  """Fine-tunes per `config` in `workdir`, resuming from its latest checkpoint; returns the
  last epoch's validation metrics."""
  # ---- Settings, data and labels (before any compilation: fails fast).
  settings = resolve_finetune(config)
  check_devices(settings, jax.device_count())
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  splits = pretrain.prepare_data(settings, workdir, verify_data)
  table = labels_lib.load_label_table(label_csv_path(settings, workdir))
  train_targets = clip_targets(splits.train_dir, table)
  val_targets = clip_targets(splits.val_dir, table)
  pretrain.check_resumable(settings, workdir)
  if is_main:
    metrics.save_config(workdir, settings.config_dict())
  steps_per_epoch = data.steps_per_epoch(splits.train_dir, settings.batch_size)
  if steps_per_epoch < 1:
    raise ConfigError(f'batch_size {settings.batch_size} is larger than the training set')
  total_steps = settings.num_epochs * steps_per_epoch
  if settings.max_steps is not None:
    total_steps = min(total_steps, settings.max_steps)
  loader = data.train_loader(
      splits.train_dir, batch_size=settings.batch_size,
      target_length=settings.data.target_length, mean=splits.mean, std=splits.std,
      seed=settings.seed, process_index=jax.process_index(),
      process_count=jax.process_count(), worker_count=settings.data.workers,
      random_crop=settings.data.random_crop, targets=train_targets,
      sample_weights=clip_weights(settings, splits.train_dir))

  # ---- Classifier and optimiser state: fresh, or restored from the latest checkpoint.
  handle = build_classifier(settings, table.num_labels)
  if is_main:
    run_record.write_model_record(workdir, handle.config, table.display_names, splits.mean,
                                  splits.std)
  setup = finetune_step(settings, handle.graphdef, handle.state, steps_per_epoch,
                        float(augment.normalised_zero(splits.mean, splits.std)))
  mngr = checkpoints.manager(workdir, settings.task, settings.keep_checkpoints,
                             settings.checkpoint_every_minutes,
                             best=(settings.best_metric, True))
  restored = checkpoints.restore_latest(mngr, setup.abstract_state,
                                        checkpoints.DataPosition(loader), jax.process_count())
  # meta (JSON): with adaptschedule, the plateau state and the float64 lrs after the
  # last epoch (`lr_schedule.adaptive_init`); nothing otherwise.
  start, state = 0, setup.state
  meta = ({'adaptive': lr_schedule.adaptive_init(base_lrs(settings))}
          if settings.adaptschedule else {})
  if restored is not None:
    start, state, meta = restored
    log(f'resuming from the checkpoint at step {start}')
  writer = metrics.MetricsWriter(workdir, columns=result_columns(settings.metrics),
                                 enabled=is_main, resume_step=None if restored is None else start)
  log(f'fine-tuning {settings.task} on {table.num_labels} classes: {steps_per_epoch} steps '
      f'per epoch, {total_steps} steps')

  # ---- Training loop: an evaluation and a checkpoint after every epoch.
  several = jax.process_count() > 1
  sigterm = faults.SigtermFlag(install=not several)
  watchdog = faults.ProgressWatchdog(several, lambda: pretrain.last_complete(workdir))
  progress = metrics.progress_bar(total_steps, initial_step=start, enabled=is_main)
  prefetch = DevicePrefetcher(loader, setup.batch_sharding, keys=('fbank', 'labels'))
  pending, window_start, wait_ms, done, preempted = [], time.perf_counter(), 0.0, start, False
  eval_metrics = {}
  try:
    for step in range(start, total_steps):
      (fbank, batch_labels), data_state, waited = next(prefetch)
      position = checkpoints.DataPosition(loader, data_state)
      wait_ms += waited
      state, step_metrics = setup.step(state, fbank, batch_labels)
      done = step + 1
      pending.append(step_metrics)
      progress.update(1)
      watchdog.beat()
      logged = done % settings.print_every_steps == 0 or done == total_steps
      if logged:
        row = log_window(pending, window_start, wait_ms, settings.batch_size)
        if not math.isfinite(row['train/loss']):
          raise TrainingError(f'the training loss is not finite at step {done}; '
                              f'{pretrain.last_complete(workdir)}')
        writer.write(done, row)
        progress.set_postfix(loss=f'{row["train/loss"]:.4f}')
        pending, window_start, wait_ms = [], time.perf_counter(), 0.0
      preempted = sigterm.requested or mngr.reached_preemption(done)
      if done % steps_per_epoch == 0:
        epoch = done // steps_per_epoch
        eval_metrics = validate(state, epoch, splits, settings, setup, val_targets, workdir)
        eval_metrics['train/epoch_loss'] = float(state['loss_sum']) / steps_per_epoch
        eval_metrics['train/lr'] = setup.last_lr(state)
        state = {**state, 'loss_sum': jax.device_put(np.float32(0), state['loss_sum'].sharding)}
        if settings.wa and settings.wa_start <= epoch <= settings.wa_end:
          state['wa_sum'] = add_params(state['wa_sum'], state['params'])
        writer.write(done, eval_metrics)
        log(f'epoch {epoch} (step {done}): ' + ', '.join(
            f'{k[5:]} {eval_metrics[k]:.4f}' for k in ('eval/acc', 'eval/mAP', 'eval/mAUC',
                                                       'eval/loss')))
        if settings.adaptschedule:  # on the mAP whatever the main metric, as the original
          state, meta = adapt_lr(state, meta, eval_metrics['eval/mAP'], epoch, settings,
                                 steps_per_epoch)
          if setup.last_lr(state) != eval_metrics['train/lr']:
            log(f'ReduceLROnPlateau after epoch {epoch}: encoder lr '
                f'{setup.last_lr(state):.4g}')
        best = eval_metrics[settings.best_metric]
        save(mngr, done, state, meta, position, workdir,
             {settings.best_metric: best} if math.isfinite(best) else None)
      elif (preempted or done == total_steps or done % settings.checkpoint_every_steps == 0
            or (logged and mngr.should_save(done))):
        save(mngr, done, state, meta, position, workdir)
      watchdog.beat()
      if preempted:
        break
  except jax.errors.JaxRuntimeError as error:
    pretrain.exit_if_peer_lost(error, workdir)
    raise
  finally:
    watchdog.stop()
    sigterm.restore()
    prefetch.close()
    progress.close()
    try:
      pretrain.wait_for_saves(mngr, workdir)
    finally:
      best_step = mngr.best_step()
      mngr.close()
      writer.close()
  if preempted:
    raise faults.Preempted(f'preempted (SIGTERM): saved the checkpoint at step {done}; '
                           f'rerun the same command to resume')
  if settings.wa and done == settings.num_epochs * steps_per_epoch:
    weight_average(state, handle, splits, settings, setup, val_targets, workdir)
  outcome = 'finished' if done == total_steps else 'stopped'
  log(f'{outcome} at step {done} of {total_steps}. Logs: {workdir}/metrics.jsonl, '
      f'result.csv, tensorboard/; checkpoints: {checkpoints.checkpoint_dir(workdir)} '
      f'(best by {settings.best_metric}: step {best_step})')
  return eval_metrics
