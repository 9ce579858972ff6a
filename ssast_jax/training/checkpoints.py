"""Training checkpoints under WORKDIR/checkpoints with orbax.

A checkpoint holds two items: `state` (parameters, optimiser state, step, learning rate,
the flag of the first non-finite step; arrays) and `meta` (JSON: plateau scheduler state,
data-iterator state, best validation value). Saves are asynchronous. Retention keeps the
last `keep` checkpoints plus the best one by validation metric.
"""

from __future__ import annotations

import json
import logging
import os

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

CONFIG_FILE = 'config.json'
# Keys that may change between a run and its resumption: they change the run's length, its
# logging, where the data are read from, or (like the device count) float rounding only.
RESUMABLE_CHANGES = frozenset({
    'max_steps', 'num_epochs', 'checkpoint_every_steps', 'keep_checkpoints',
    'print_every_steps', 'profile_steps', 'data.train_json', 'data.train_pt_dir',
    'data.val_json', 'data.val_pt_dir', 'data.label_csv', 'data.shards_dir', 'fsdp',
    'remat', 'remat_policy', 'grad_accum_steps'})


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def best_metric(task: str) -> tuple[str, bool]:
  """(metric, higher_is_better) that picks the best checkpoint for `task`."""
  return ('eval/mpg_loss', False) if task == 'pretrain_mpg' else ('eval/mpc_acc', True)


def manager(workdir: str, task: str, keep: int) -> ocp.CheckpointManager:
  metric, higher = best_metric(task)
  policy = policies.AnyPreservationPolicy([
      policies.LatestN(n=keep),
      policies.BestN(get_metric_fn=lambda m: m[metric], reverse=not higher, n=1,
                     keep_checkpoints_without_metrics=False)])
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policy, enable_async_checkpointing=True, create=True,
      cleanup_tmp_directories=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=('state', 'meta'))


def save(mngr: ocp.CheckpointManager, step: int, state, meta: dict, metrics=None) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)),
            metrics=metrics, force=True)


def restore_latest(mngr: ocp.CheckpointManager, abstract_state):
  """(step, state, meta) of the newest checkpoint that restores, or None if there is none.

  A checkpoint that fails to restore (cut short by a crash on a file system without
  atomic renames, or damaged) is skipped with a warning in favour of the one before it.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      return (step, *restore(mngr, step, abstract_state))
    except Exception as e:  # any failure means this checkpoint is unusable
      logging.warning('checkpoint at step %d is incomplete or damaged, skipping it: %s',
                      step, e)
  return None


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state):
  """(state, meta) of the checkpoint at `step`."""
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
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
