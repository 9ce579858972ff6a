"""The jitted training and evaluation steps.

Masks are drawn inside the step from keys derived from (seed, step, pass, global example
index), so a step computes the same thing however the batch is split over devices,
processes and gradient-accumulation micro-batches.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ssast_jax.config.settings import Settings, check_devices
from ssast_jax.model import abstract_model
from ssast_jax.objective import losses, masking
from ssast_jax.training import schedule, sharding
from ssast_jax.training.state import init_state, optimizer

# Purposes a mask key is drawn for; evaluation keys use the validation batch index as step.
MPC_PASS, MPG_PASS, EVAL_MPC_PASS, EVAL_MPG_PASS = 0, 1, 2, 3


def example_keys(seed, step, purpose, batch_size: int) -> jax.Array:
  """One key per global example of a batch, from (seed, step, purpose, example index)."""
  base = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), purpose)
  return jax.vmap(jax.random.fold_in, (None, 0))(base, jnp.arange(batch_size))


def draw_masks(settings: Settings, step, purposes, num_masked: int, batch_size: int):
  """One `(B, num_masked)` mask batch per purpose, for the global batch of `step`."""
  o = settings.objective
  return [masking.masks_from_keys(example_keys(settings.run.seed, step, purpose, batch_size),
                                  o.patch_grid, num_masked, o.mask_mode, o.cluster_factor)
          for purpose in purposes]


def micro_batches(tree, count: int):
  """Leaves `(B, ...)` -> `(count, B // count, ...)`; micro-batch i holds examples i,
  i + count, i + 2 * count, ... .

  A batch split into contiguous blocks over devices (B // count divisible by the device
  count) thus splits every micro-batch evenly over the devices, without moving data.
  """
  def split(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, tree)


def accumulate(fn, inputs: tuple, count: int, mesh=None):
  """The mean of `fn(*micro_batch)` over `count` micro-batches of `inputs` (leaves with a
  leading batch dimension), computed one micro-batch at a time in a `lax.scan`.

  `fn` returns a pytree of means over its micro-batch (metrics, gradients); micro-batches
  are equal in size, so the result is the mean over the whole batch.
  """
  if count == 1:
    return fn(*inputs)
  stacked = micro_batches(inputs, count)

  def add_micro_batch(total, micro):
    out = fn(*sharding.shard_batch(micro, mesh))
    return jax.tree.map(jnp.add, total, out), None

  shapes = jax.eval_shape(fn, *jax.tree.map(lambda x: x[0], stacked))
  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
  total, _ = jax.lax.scan(add_micro_batch, zeros, stacked)
  return jax.tree.map(lambda t: t / count, total)


def batch_gradients(params, fbank, mpc_mask, mpg_mask, *, graphdef, settings: Settings,
                    mesh=None):
  """(metrics, gradients) of the batch's mean loss over `grad_accum_steps` micro-batches;
  with a `mesh`, parameters are all-gathered for the computation and gradients
  reduce-scattered to the parameters' FSDP layout."""
  o = settings.objective
  full_params = sharding.gather(params, mesh)

  def micro_batch_gradients(fbank, mpc_mask, mpg_mask):
    def loss_fn(params):
      out = losses.pretext_losses(nnx.merge(graphdef, params), fbank, mpc_mask, mpg_mask,
                                  task=o.task, paper_infonce=o.paper_infonce,
                                  joint_passes=o.joint_passes)
      return out['loss'], out
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(full_params)
    return metrics, sharding.shard_like_state(grads, mesh)

  return accumulate(micro_batch_gradients, (fbank, mpc_mask, mpg_mask),
                    settings.optim.grad_accum_steps, mesh)


def without_invariant_directions(grads):
  """`grads` with the components that no loss can depend on set to exactly 0.

  A shift shared by all keys of an attention softmax cancels (the key third of every
  `qkv` bias), and so does a shift shared by all MPC predictions of a clip (the `cpred`
  output bias; SPEC section 5: the loss normalises over predictions). Their exact
  gradient is 0; the computed one is rounding noise, which Adam, dividing by its own
  magnitude, turns into steps of full learning-rate size and random sign. Left in, that
  noise makes runs on different device counts drift apart (1.7e-4 relative in the demo's
  tenth loss between 1 and 4 CPU devices; 6e-7 without it). The losses are unchanged.
  """
  def project(path, grad):
    names = [getattr(key, 'key', None) for key in path]
    if names[-3:-1] == ['qkv', 'bias']:
      third = grad.shape[-1] // 3
      return grad.at[..., third:2 * third].set(0)
    if names[:3] == ['cpred', 'out', 'bias']:
      return jnp.zeros_like(grad)
    return grad
  return jax.tree_util.tree_map_with_path(project, grads)


def train_step(state: dict, fbank: jax.Array, *, graphdef, settings: Settings, mesh=None
               ) -> tuple[dict, dict]:
  """One optimiser step on a global batch `fbank` `(B, T, F)`; returns (state, metrics).

  Each clip's masks come from its index in the global batch, so the update is that of the
  whole batch at once (up to float summation order) whatever the micro-batches.

  A step whose loss or gradient is not finite leaves parameters and optimiser state
  unchanged and records its index in `nonfinite_step` (the first one), which the host
  checks.
  """
  step = state['step']
  mpc_mask, mpg_mask = draw_masks(settings, step, (MPC_PASS, MPG_PASS),
                                  settings.objective.mask_patch, fbank.shape[0])
  metrics, grads = batch_gradients(state['params'], fbank, mpc_mask, mpg_mask,
                                   graphdef=graphdef, settings=settings, mesh=mesh)
  grads = without_invariant_directions(grads)
  lr = schedule.warmup_lr(step, state['lr'], settings.optim.lr, settings.optim.warmup)
  updates, opt_state = optimizer().update(grads, state['opt_state'], state['params'])
  params = jax.tree.map(lambda p, u: p - lr * u, state['params'], updates)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(grad_norm)
  keep_if_finite = functools.partial(jax.tree.map, lambda new, old: jnp.where(finite, new, old))
  new_state = {
      'step': step + 1,
      'params': keep_if_finite(params, state['params']),
      'opt_state': keep_if_finite(opt_state, state['opt_state']),
      'lr': lr,
      'nonfinite_step': jnp.where((state['nonfinite_step'] < 0) & ~finite, step,
                                  state['nonfinite_step'])}
  return new_state, {**metrics, 'lr': lr, 'grad_norm': grad_norm}


def jit_train_step(graphdef, settings: Settings, mesh, state_sharding):
  """`train_step` compiled for `mesh`: the state (donated) stays in `state_sharding`, the
  batch is split over every device, metrics come back replicated."""
  return jax.jit(
      functools.partial(train_step, graphdef=graphdef, settings=settings, mesh=mesh),
      in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
      out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0)


@functools.partial(jax.jit, static_argnames=('graphdef', 'settings', 'mesh'))
def eval_step(params, fbank, valid, batch_index, *, graphdef, settings: Settings,
              mesh=None) -> dict:
  """Sums over the valid clips of a validation batch: MPC correct/loss, MPG loss, count.

  Masks come from a fixed key and the clip's position, so every evaluation of a run sees
  the same masks. With a `mesh`, parameters are all-gathered for the computation.
  """
  o = settings.objective
  mpc_mask, mpg_mask = draw_masks(settings, batch_index, (EVAL_MPC_PASS, EVAL_MPG_PASS),
                                  o.eval_mask_patch, fbank.shape[0])
  out = losses.pretext_losses(nnx.merge(graphdef, sharding.gather(params, mesh)), fbank,
                              mpc_mask, mpg_mask, task=o.task, paper_infonce=o.paper_infonce,
                              per_clip=True)
  weight = valid.astype(jnp.float32)
  sums = {k: jnp.sum(v * weight) for k, v in out.items()}
  sums['count'] = jnp.sum(weight)
  return sums


@dataclasses.dataclass(frozen=True)
class StepSetup:
  """The compiled-step ingredients of a run, shared by training and the benchmarks."""
  mesh: jax.sharding.Mesh
  graphdef: Any
  settings: Settings
  abstract_state: Any  # shape-dtype structs carrying the state's shardings
  init: Callable[[], dict]  # a fresh state, placed in those shardings
  step: Callable  # (state, batch) -> (state, metrics), jitted; the state is donated

  @property
  def batch_sharding(self) -> jax.sharding.NamedSharding:
    return sharding.batch_sharding(self.mesh)


def step_setup(settings: Settings, devices=None) -> StepSetup:
  """Mesh, state layout and jitted step on all devices (or on `devices`, e.g. a topology's
  for compiling without them); raises ConfigError when `fsdp` or the batch do not split
  over them."""
  check_devices(settings, jax.device_count() if devices is None else len(devices))
  mesh = sharding.make_mesh(settings.run.fsdp, devices)
  fresh_state = functools.partial(init_state, settings.model, settings.run.seed,
                                  settings.optim.lr)
  abstract = jax.eval_shape(fresh_state)
  state_sharding = sharding.state_shardings(abstract, mesh)
  graphdef, _ = abstract_model(settings.model)
  return StepSetup(mesh, graphdef, settings, sharding.with_shardings(abstract, state_sharding),
                   jax.jit(fresh_state, out_shardings=state_sharding),
                   jit_train_step(graphdef, settings, mesh, state_sharding))
