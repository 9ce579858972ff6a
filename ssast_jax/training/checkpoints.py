"""Training checkpoints under WORKDIR/checkpoints with orbax.

A checkpoint holds three items: `state` (parameters, optimiser state, step, learning rate,
the flag of the first non-finite step; arrays), `meta` (JSON: plateau scheduler state) and
`data` (every process's data-iterator position, one `process_I-of-N.json` each, written by
Grain's orbax handler). Saves are asynchronous and become visible only once complete (orbax
writes to a temporary folder and renames it). The loop saves every `checkpoint_every_steps`
steps, at every validation, at JAX's preemption sync point after a SIGTERM to any process
(`mngr.reached_preemption`), and once `every_minutes` have passed (orbax's continuous
checkpointing policy). Retention keeps the last `keep` checkpoints plus the best one by
validation metric.
"""

from __future__ import annotations

import json
import logging
import os
import re

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from ssast_jax.config import probing

CONFIG_FILE = 'config.json'
# Keys that may change between a run and its resumption: they change the run's length, its
# logging (the probe included), where the data are read from, or (like the device count)
# float rounding only.
RESUMABLE_CHANGES = frozenset({
    'max_steps', 'num_epochs', 'checkpoint_every_steps', 'keep_checkpoints',
    'print_every_steps', 'profile_steps', 'data.train_json', 'data.train_pt_dir',
    'data.val_json', 'data.val_pt_dir', 'data.label_csv', 'data.shards_dir', 'fsdp',
    'data.audio_root',
    'remat', 'remat_policy', 'grad_accum_steps', 'checkpoint_every_minutes', 'eval_picture',
    'probe_every', *(f'probe.{key}' for key in probing.default_config())})
_DATA_FILE = re.compile(r'process_(\d+)-of-(\d+)\.json')


class DataPosition:
  """A data iterator's state at one step, in the form Grain's orbax handler saves and
  restores (it calls `get_state`/`set_state` with JSON bytes, then `start_prefetch`).

  The loader runs ahead of training (prefetch), so the state saved is the one recorded after
  the last batch trained on, not the loader's live position.
  """

  def __init__(self, loader, state: dict | None = None):
    self._loader = loader
    self._state = state

  def get_state(self) -> bytes:
    return json.dumps(self._state).encode()

  def set_state(self, state: bytes) -> None:
    self._state = json.loads(state)
    self._loader.set_state(self._state)

  def start_prefetch(self) -> None:
    """Nothing to start: the loader prefetches once iterated."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def complete_steps(workdir: str) -> list[int]:
  """Steps of the finished checkpoints in `workdir`, ascending, from the folder names alone
  (orbax renames a checkpoint's temporary folder to its step once every file is written), so
  that it also answers when the checkpoint manager cannot (a peer is gone)."""
  folder = checkpoint_dir(workdir)
  names = os.listdir(folder) if os.path.isdir(folder) else []
  return sorted(int(name) for name in names if name.isdigit())


def best_metric(task: str) -> tuple[str, bool]:
  """(metric, higher_is_better) that picks the best checkpoint for `task`."""
  return ('eval/mpg_loss', False) if task == 'pretrain_mpg' else ('eval/mpc_acc', True)


def manager(workdir: str, task: str, keep: int, every_minutes: float = 30.0,
            best: tuple[str, bool] | None = None) -> ocp.CheckpointManager:
  """The run's checkpoint manager; `mngr.should_save(step)` is True once `every_minutes`
  have passed since the last checkpoint (decided on process 0, broadcast to all: the loop
  asks only at its logging steps, where it waits for the device anyway). The best
  checkpoint is kept by `best` = (metric, higher_is_better), by default `best_metric(task)`."""
  metric, higher = best or best_metric(task)
  preservation = policies.AnyPreservationPolicy([
      policies.LatestN(n=keep),
      policies.BestN(get_metric_fn=lambda m: m[metric], reverse=not higher, n=1,
                     keep_checkpoints_without_metrics=False)])
  decision = policies.ContinuousCheckpointingPolicy(
      minimum_interval_secs=int(every_minutes * 60))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=preservation, save_decision_policy=decision,
      enable_async_checkpointing=True, create=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=('state', 'meta', 'data'))


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict,
         data: DataPosition | None = None, metrics=None) -> None:
  """Starts saving a checkpoint at `step` (`data`: None for a checkpoint without a data
  position, as tools that write parameters only make)."""
  items = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
  if data is not None:
    items['data'] = grain.checkpoint.CheckpointSave(data)
  mngr.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def saved_process_count(mngr: ocp.CheckpointManager, step: int) -> int | None:
  """How many processes wrote the checkpoint at `step` (its data files say), or None."""
  folder = mngr.directory / str(step) / 'data'
  if not folder.is_dir():
    return None
  counts = {int(m.group(2)) for path in folder.iterdir()
            if (m := _DATA_FILE.fullmatch(path.name))}
  return counts.pop() if len(counts) == 1 else None


def restore_latest(mngr: ocp.CheckpointManager, abstract_state, data: DataPosition,
                   process_count: int):
  """(step, state, meta) of the newest checkpoint that restores, or None if there is none;
  `data`'s loader is set to that checkpoint's position for this process.

  A checkpoint that fails to restore (cut short by a crash on a file system without
  atomic renames, or damaged) is skipped with a warning in favour of the one before it, and
  moved to `WORKDIR/checkpoints_damaged/` (`set_aside`). A checkpoint written by another
  number of processes closes `mngr` (its threads would fail at interpreter shutdown) and
  raises ProcessCountError: each process's data position belongs to that process layout.
  """
  damaged, restored = [], None
  for step in sorted(mngr.all_steps(), reverse=True):
    saved = saved_process_count(mngr, step)
    if saved is not None and saved != process_count:
      mngr.close()
      raise ProcessCountError(
          f'the checkpoint at step {step} in {mngr.directory} was written by {saved} '
          f'processes and this job has {process_count}; restart with {saved} processes '
          f'(each holds its own position in the data), or use another --workdir')
    try:
      restored = (step, *restore(mngr, step, abstract_state, data))
      break
    except Exception as e:  # any failure means this checkpoint is unusable
      logging.warning('checkpoint at step %d is incomplete or damaged, skipping it: %s',
                      step, e)
      damaged.append(step)
  if damaged:
    set_aside(mngr, damaged, process_count)
  return restored


def set_aside(mngr: ocp.CheckpointManager, steps: list[int], process_count: int) -> None:
  """Moves the checkpoints of `steps` from the checkpoint folder to `checkpoints_damaged/`
  beside it (process 0 moves, every process waits): the resumed run saves those steps
  again (orbax refuses a step whose folder exists), and neither a later resume nor the
  "last complete checkpoint" of an error message counts them."""
  if process_count > 1:
    multihost_utils.sync_global_devices('checkpoints: damaged found')
  if jax.process_index() == 0:
    aside = mngr.directory.parent / 'checkpoints_damaged'
    aside.mkdir(exist_ok=True)
    for step in steps:
      target, copy = aside / str(step), 1
      while target.exists():
        target, copy = aside / f'{step}.{copy}', copy + 1
      (mngr.directory / str(step)).rename(target)
      logging.warning('moved the damaged checkpoint of step %d to %s', step, target)
  if process_count > 1:
    multihost_utils.sync_global_devices('checkpoints: damaged moved')
  mngr.reload()


class ProcessCountError(ValueError):
  """A checkpoint's process count differs from this job's."""


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state,
            data: DataPosition | None = None):
  """(state, meta) of the checkpoint at `step`; sets `data`, if given, to its position."""
  items = {'state': ocp.args.StandardRestore(abstract_state), 'meta': ocp.args.JsonRestore()}
  if data is not None:
    items['data'] = grain.checkpoint.CheckpointRestore(data)
  restored = mngr.restore(step, args=ocp.args.Composite(**items))
  return restored['state'], restored['meta']


def restore_params(mngr: ocp.CheckpointManager, step: int, abstract_params):
  """The parameters of the checkpoint at `step`, read without the optimiser state."""
  item = {'params': abstract_params}
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True)))
  return restored['state']['params']


def flatten_config(config: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in config.items():
    if isinstance(value, dict):
      flat.update(flatten_config(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def read_config(workdir: str) -> dict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: not found; is {workdir} a training workdir?')
  with open(path) as f:
    return json.load(f)


def incompatible_keys(saved: dict, current: dict) -> list[str]:
  """Config keys whose change would make a resumed run differ from the saved one."""
  old, new = flatten_config(saved), flatten_config(current)
  return sorted(k for k in set(old) | set(new)
                if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))
