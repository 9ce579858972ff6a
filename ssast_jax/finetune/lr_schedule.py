"""The original fine-tuning optimiser and learning rates (`src/traintest.py`, `train()`).

The original uses `torch.optim.Adam` with two parameter groups: the encoder (everything
but `mlp_head`) at `lr` and the head (`mlp_head.0`, `mlp_head.1`: LayerNorm and Linear) at
`lr * head_lr`; `betas=(0.95, 0.999)`, `eps=1e-8`, `weight_decay=5e-7` as PyTorch Adam's L2
term added to the gradient of every parameter of both groups (not AdamW). Three rules
write each group's learning rate (a Python float, so float64):

* warm-up (`--warmup`): at the start of every step with `global_step <= 1000` and
  `global_step % 50 == 0` the lr is set to `global_step / 1000 * lr_list[group]` (its
  initial lr): a staircase from 0 (steps 0-49 run at lr 0). It overwrites, so a decay made
  during the first 1000 steps is undone at the next stair (a quirk reproduced here).
* after every epoch, `MultiStepLR(milestones=range(lrscheduler_start, 1000,
  lrscheduler_step), gamma=lrscheduler_decay)`: after epoch `e` (1-based) with `e` a
  milestone, the lr in force is multiplied by `gamma` (chained, PyTorch's closed form is
  not used). The scheduler's construction is its step 0, so a milestone 0 decays at once.
* or, with `--adaptschedule`, `ReduceLROnPlateau(mode='max', factor=0.5,
  patience=lr_patience)` stepped after every epoch with the validation **mAP**, also when
  the main metric is accuracy (a quirk).

The pretraining rules live in `ssast_jax.training.schedule` and are reused: `warmup_lr`
(jitted, per step, from a float32 current lr) and `plateau_step` (host). This module adds
the per-epoch MultiStepLR, host helpers that keep each group's lr in float64 as the
original does, and `multistep_schedule`, a jit-able optax schedule of the whole run
tabulated from those helpers (`lr_segments`), bit-equal to the original's lr at every step.
The head group's schedule is the encoder's with `lr * head_lr` as the base (warm-up and
decays act alike on both; only ReduceLROnPlateau's 1e-8 skip differs, per group).

ReduceLROnPlateau depends on the validation mAP, so it cannot be tabulated: with it the
lr in force is part of the training state (a float32 per group, warmed up in the jitted
step, like pretraining's `state['lr']`), and the host keeps the float64 lrs and the
plateau state (`adaptive_init`, `adaptive_epoch_end`, JSON for the checkpoint) from which
it writes the state's lr after every epoch.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssast_jax.training import schedule, state

HEAD_NAME = 'mlp_head'  # top-level parameter name of the classification head
HEAD, ENCODER = 'head', 'encoder'
MILESTONE_STOP = 1000  # range(lrscheduler_start, 1000, lrscheduler_step)


def multistep_milestones(start: int, step: int, stop: int = MILESTONE_STOP) -> tuple:
  """The original's milestones `range(lrscheduler_start, 1000, lrscheduler_step)`."""
  return tuple(range(start, stop, step))


def multistep_step(epoch: int, current_lr: float, milestones: Sequence[int],
                   gamma: float) -> float:
  """`MultiStepLR.step()` moving its count to `epoch`: the lr after `epoch` epochs.

  `current_lr * gamma ** m` where `m` is how often `epoch` is a milestone (PyTorch's
  chainable form), float64. `epoch = 0` is the construction.
  """
  count = list(milestones).count(epoch)
  return float(current_lr) * float(gamma) ** count if count else float(current_lr)


def warmup_host(step: int, current_lr: float, base_lr: float, warmup: bool) -> float:
  """The lr (float64) the original uses at `global_step = step`, given the lr before it:
  `step / 1000 * base_lr` on a stair, else `current_lr`."""
  if warmup and step <= schedule.WARMUP_STEPS and step % schedule.WARMUP_EVERY == 0:
    return (step / schedule.WARMUP_STEPS) * base_lr
  return float(current_lr)


def lr_at_epoch_end(current_lr: float, first_step: int, num_steps: int, base_lr: float,
                    warmup: bool) -> float:
  """The lr (float64) in force after steps `first_step .. first_step + num_steps - 1`
  (what the original logs as the epoch's lr and what its scheduler then acts on)."""
  if warmup:
    last = min(first_step + num_steps - 1, schedule.WARMUP_STEPS)
    stair = last - last % schedule.WARMUP_EVERY
    if num_steps > 0 and stair >= first_step:
      return warmup_host(stair, current_lr, base_lr, warmup)
  return float(current_lr)


def plateau_epoch_end(plateau_state: dict, m_ap: float, lrs: dict, *,
                      patience: int, factor: float = 0.5) -> tuple[dict, dict]:
  """`ReduceLROnPlateau(mode='max').step(mAP)` on every group: `(state, lrs)`.

  One shared state (PyTorch's); each group's lr halves with its own 1e-8 skip.
  """
  new_state = None
  new_lrs = {}
  for group, lr in lrs.items():
    new_state, new_lrs[group] = schedule.plateau_step(plateau_state, m_ap, lr, mode='max',
                                                      patience=patience, factor=factor)
  return new_state, new_lrs


def adaptive_init(base_lrs: dict) -> dict:
  """The host state of `--adaptschedule` before the first epoch: the plateau state and
  each group's lr (float64) in force, its base lr (`{group: lr}`); strict JSON."""
  return {'plateau': schedule.plateau_init(), 'lr': {g: float(v) for g, v in base_lrs.items()}}


def adaptive_epoch_end(adaptive: dict, m_ap: float, *, first_step: int, num_steps: int,
                       base_lrs: dict, warmup: bool, patience: int) -> dict:
  """The host state after the epoch of steps `first_step .. first_step + num_steps - 1`
  and the original's `scheduler.step(mAP)`: each group's float64 lr is carried through
  the epoch's warm-up stairs from `adaptive['lr']` (the lr after the previous epoch), then
  `plateau_epoch_end` acts on all groups with the epoch's validation mAP."""
  lrs = {g: lr_at_epoch_end(adaptive['lr'][g], first_step, num_steps, base, warmup)
         for g, base in base_lrs.items()}
  plateau, lrs = plateau_epoch_end(adaptive['plateau'], m_ap, lrs, patience=patience)
  return {'plateau': plateau, 'lr': lrs}


def lr_segments(base_lr: float, *, steps_per_epoch: int, n_epochs: int, warmup: bool,
                milestones: Sequence[int], gamma: float) -> tuple[np.ndarray, np.ndarray]:
  """The whole run's lr of one group under warm-up and MultiStepLR, as a step function:
  `(starts, values)` with `values[i]` (float32, rounded once from float64) in force from
  step `starts[i]` until the next start. `starts[0] == 0`.

  Simulated event by event in the original's order: construction (milestone 0), then per
  epoch the warm-up stairs of its steps, then the epoch's `MultiStepLR.step()`.
  """
  if steps_per_epoch < 1 or n_epochs < 1:
    raise ValueError(f'need steps_per_epoch >= 1 and n_epochs >= 1, got {steps_per_epoch}, '
                     f'{n_epochs}')
  lr = multistep_step(0, base_lr, milestones, gamma)
  starts, values = [0], [lr]

  def set_from(step, value):
    if starts[-1] == step:
      values[-1] = value
    elif value != values[-1]:
      starts.append(step)
      values.append(value)

  for epoch in range(1, n_epochs + 1):
    first = (epoch - 1) * steps_per_epoch
    if warmup:
      for stair in range(first + (-first) % schedule.WARMUP_EVERY,
                         min(first + steps_per_epoch - 1, schedule.WARMUP_STEPS) + 1,
                         schedule.WARMUP_EVERY):
        lr = warmup_host(stair, lr, base_lr, warmup)
        set_from(stair, lr)
    lr = multistep_step(epoch, lr, milestones, gamma)
    if epoch < n_epochs:
      set_from(epoch * steps_per_epoch, lr)
  return np.asarray(starts, np.int32), np.asarray(values, np.float32)


def multistep_schedule(base_lr: float, *, steps_per_epoch: int, n_epochs: int, warmup: bool,
                       milestones: Sequence[int], gamma: float):
  """An optax schedule `count -> lr` (float32, jit-able) of one group; `count` is the
  0-based number of updates already made (the original's `global_step`)."""
  starts, values = lr_segments(base_lr, steps_per_epoch=steps_per_epoch, n_epochs=n_epochs,
                               warmup=warmup, milestones=milestones, gamma=gamma)
  starts, values = jnp.asarray(starts), jnp.asarray(values)

  def lr(count):
    return values[jnp.searchsorted(starts, count, side='right') - 1]

  return lr


def group_of(path) -> str:
  """`'head'` for a parameter under the top-level `mlp_head`, else `'encoder'` (the
  original's `mlp_list` holds exactly the head's LayerNorm and Linear tensors)."""
  first = path[0] if path else None
  name = getattr(first, 'key', getattr(first, 'name', None))
  return HEAD if name == HEAD_NAME else ENCODER


def param_labels(params):
  """The tree of `params` with each leaf replaced by its group (`optax.multi_transform`'s
  `param_labels`); works on nested dicts and `nnx.State`."""
  return jax.tree_util.tree_map_with_path(lambda path, _: group_of(path), params)


def apply_group_lr(updates, encoder_lr, head_lr):
  """`-lr * update` per leaf with the group's lr, for a step that applies the lr itself
  (as `ssast_jax.training.step` does with `state.optimizer()`)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, u: -(head_lr if group_of(path) == HEAD else encoder_lr) * u, updates)


def adam_l2() -> optax.GradientTransformation:
  """PyTorch Adam with `weight_decay=5e-7`, betas (0.95, 0.999), eps 1e-8, without lr:
  the pretraining optimiser of `ssast_jax.training.state`, which the fine-tuning shares."""
  return state.optimizer()


def finetune_optimizer(encoder_lr, head_lr) -> optax.GradientTransformation:
  """The original's two-group Adam: `encoder_lr` and `head_lr` (floats or optax
  schedules, e.g. `multistep_schedule(lr)` and `multistep_schedule(lr * head_lr)`)."""
  return optax.multi_transform(
      {ENCODER: optax.chain(adam_l2(), optax.scale_by_learning_rate(encoder_lr)),
       HEAD: optax.chain(adam_l2(), optax.scale_by_learning_rate(head_lr))},
      param_labels)
