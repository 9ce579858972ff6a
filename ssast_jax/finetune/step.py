"""The jitted fine-tuning step and evaluation forward pass.

The state is a pytree `{step, params, opt_state, loss_sum}`: the update count (the
original's `global_step`), the classifier's parameters, the two-group Adam state (whose
update counts drive the tabulated warm-up/MultiStepLR schedules of `lr_schedule`, so the
learning rate needs no host bookkeeping), and the sum of this epoch's step losses (the
original's `loss_meter`, reset by the loop after each epoch), and with `wa` the sum of the
parameters after the epochs wa_start..wa_end so far (`wa_sum`). With `adaptschedule`
(ReduceLROnPlateau, which depends on validation) the lr cannot be tabulated: the state
also holds `lr`, each group's float32 lr in force (`{'encoder', 'head'}`), which the step
warms up and the loop sets after each epoch's plateau step, and one Adam serves both
groups, the step scaling each group's update by its lr. Augmentation keys come from
(seed, step, example index in the global batch), so a step computes the same thing however
the batch is split over devices, and a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ssast_jax.config.finetune import FinetuneSettings
from ssast_jax.finetune import augment, lr_schedule
from ssast_jax.training import schedule, sharding


def schedules(settings: FinetuneSettings, steps_per_epoch: int):
  """(encoder lr, head lr) optax schedules of the whole run: warm-up and MultiStepLR."""
  milestones = lr_schedule.multistep_milestones(settings.lrscheduler_start,
                                                settings.lrscheduler_step)
  def make(base_lr):
    return lr_schedule.multistep_schedule(
        base_lr, steps_per_epoch=steps_per_epoch, n_epochs=settings.num_epochs,
        warmup=settings.warmup, milestones=milestones, gamma=settings.lrscheduler_decay)
  return make(settings.lr), make(settings.lr * settings.head_lr)


def base_lrs(settings: FinetuneSettings) -> dict:
  """Each group's initial lr (float64): `lr` and `lr * head_lr`, the original's `lr_list`
  (what warm-up scales)."""
  return {lr_schedule.ENCODER: settings.lr, lr_schedule.HEAD: settings.lr * settings.head_lr}


def per_clip_loss(logits, targets, loss: str):
  """`(B,)` losses: BCEWithLogits averaged over classes ('bce'), or cross-entropy against
  the targets' argmax ('ce', the original's `CrossEntropyLoss(out, argmax(labels))`)."""
  if loss == 'bce':
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, targets), axis=-1)
  return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.argmax(targets, -1))


def train_step(state: dict, fbank, labels, *, graphdef, settings: FinetuneSettings, tx,
               encoder_lr: Callable | None, mask_value: float,
               mesh=None) -> tuple[dict, dict]:
  """One update on the global batch `fbank` `(B, T, F)` (normalised) with multi-hot
  `labels` `(B, K)`: augmentation (mix-up, SpecAugment, noise), loss, two-group Adam.
  `encoder_lr` is the encoder's tabulated schedule, None when the lr is in the state."""
  step = state['step']
  keys = augment.example_keys(settings.seed, step, fbank.shape[0])
  x, y = augment.augment_batch(keys, fbank, labels, freqm=settings.freqm,
                               timem=settings.timem, mixup_rate=settings.mixup,
                               noise=settings.noise, mask_value=mask_value)
  x, y = sharding.shard_batch((x, y), mesh)

  def loss_fn(params):
    logits = nnx.merge(graphdef, params)(x, settings.pooling)
    return jnp.mean(per_clip_loss(logits, y, settings.loss))

  loss, grads = jax.value_and_grad(loss_fn)(state['params'])
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  new_state = {**state, 'step': step + 1, 'opt_state': opt_state,
               'loss_sum': state['loss_sum'] + loss}
  if encoder_lr is None:  # the lr in force is state: warmed up here, the plateau on the host
    lrs = {group: schedule.warmup_lr(step, state['lr'][group], base, settings.warmup)
           for group, base in base_lrs(settings).items()}
    updates = lr_schedule.apply_group_lr(updates, lrs[lr_schedule.ENCODER],
                                         lrs[lr_schedule.HEAD])
    new_state['lr'] = lrs
    lr = lrs[lr_schedule.ENCODER]
  else:
    lr = encoder_lr(step)
  new_state['params'] = optax.apply_updates(state['params'], updates)
  return new_state, {'loss': loss, 'lr': lr}


@functools.partial(jax.jit, donate_argnums=0)
def add_params(total, params):
  """`total + params` leaf by leaf (weight averaging's running sum; `total` donated)."""
  return jax.tree.map(jnp.add, total, params)


def eval_forward(params, fbank, labels, *, graphdef, settings: FinetuneSettings):
  """(`sigmoid(logits)` `(B, K)`, per-clip loss `(B,)`) of a normalised batch: the
  original evaluates sigmoid outputs for every loss."""
  logits = nnx.merge(graphdef, params)(fbank, settings.pooling)
  return jax.nn.sigmoid(logits), per_clip_loss(logits, labels, settings.loss)


@dataclasses.dataclass(frozen=True)
class FinetuneStep:
  """The compiled pieces of a run: mesh, fresh state, its abstract form, the jitted step
  `(state, fbank, labels) -> (state, metrics)` (state donated), evaluation, and the
  encoder's tabulated lr schedule (None with `adaptschedule`: the lr is in the state)."""
  mesh: jax.sharding.Mesh
  state: dict
  abstract_state: Any
  step: Callable
  evaluate: Callable
  encoder_lr: Callable | None

  @property
  def batch_sharding(self):
    return sharding.batch_sharding(self.mesh)

  def last_lr(self, state: dict) -> float:
    """The encoder's lr of the last step `state` has taken (what the original logs as the
    epoch's lr, `param_groups[0]['lr']`)."""
    if self.encoder_lr is None:
      return float(state['lr'][lr_schedule.ENCODER])
    return float(self.encoder_lr(int(state['step']) - 1))


def finetune_step(settings: FinetuneSettings, graphdef, params, steps_per_epoch: int,
                  mask_value: float, devices=None) -> FinetuneStep:
  """Everything replicated on every device (or on `devices`, a topology's, where `params`
  may be shape-dtype structs and `state` is then None), the batch split over them."""
  mesh = sharding.make_mesh(1, devices)
  replicated = sharding.replicated(mesh)
  if settings.adaptschedule:
    encoder_lr, tx = None, lr_schedule.adam_l2()
  else:
    encoder_lr, head_lr = schedules(settings, steps_per_epoch)
    tx = lr_schedule.finetune_optimizer(encoder_lr, head_lr)

  def fresh_state(params):
    state = {'step': jnp.zeros((), jnp.int32), 'params': params,
             'opt_state': tx.init(params), 'loss_sum': jnp.zeros((), jnp.float32)}
    if settings.adaptschedule:
      state['lr'] = {group: jnp.asarray(lr, jnp.float32)
                     for group, lr in base_lrs(settings).items()}
    if settings.wa:
      state['wa_sum'] = jax.tree.map(jnp.zeros_like, params)
    return state
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                          jax.eval_shape(fresh_state, params))
  concrete = not any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(params))
  state = jax.device_put(fresh_state(params), replicated) if concrete else None
  batch = sharding.batch_sharding(mesh)
  step = jax.jit(functools.partial(train_step, graphdef=graphdef, settings=settings, tx=tx,
                                   encoder_lr=encoder_lr, mask_value=mask_value, mesh=mesh),
                 in_shardings=(replicated, batch, batch),
                 out_shardings=(replicated, replicated), donate_argnums=0)
  evaluate = jax.jit(functools.partial(eval_forward, graphdef=graphdef, settings=settings),
                     in_shardings=(replicated, batch, batch),
                     out_shardings=(replicated, replicated))
  return FinetuneStep(mesh, state, abstract, step, evaluate, encoder_lr)
