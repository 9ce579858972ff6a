"""The jitted training and evaluation steps, and the training state they update.

The state is a pytree `{step, params, opt_state, lr, nonfinite_step}`. Masks are drawn
inside the step from keys derived from (seed, step, pass, global example index), so a step
computes the same thing however the batch is split over devices, processes and
gradient-accumulation micro-batches.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ssast_jax import losses, masking, schedule, sharding
from ssast_jax.model import SSAST, ModelConfig

ADAM_BETAS = (0.95, 0.999)
ADAM_EPS = 1e-8
WEIGHT_DECAY = 5e-7  # L2 added to the gradient (PyTorch Adam), not decoupled AdamW
# Purposes a mask key is drawn for; evaluation keys use the validation batch index as step.
MPC_PASS, MPG_PASS, EVAL_MPC_PASS, EVAL_MPG_PASS = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class StepSettings:
  """The static (hashable) part of the config that the jitted steps read."""
  seed: int
  task: str
  patch_grid: tuple[int, int]
  mask_patch: int
  eval_mask_patch: int
  mask_mode: str
  cluster_factor: int
  paper_infonce: bool
  joint_passes: int
  mpc_trains_encoder: bool
  lr: float
  warmup: bool
  grad_accum_steps: int = 1
  concurrent_parts: int = 1


def optimizer() -> optax.GradientTransformation:
  """PyTorch's Adam with weight decay, without the learning rate (applied by the step)."""
  return optax.chain(optax.add_decayed_weights(WEIGHT_DECAY),
                     optax.scale_by_adam(*ADAM_BETAS, eps=ADAM_EPS))


def init_state(model_config: ModelConfig, seed: int, lr: float) -> dict:
  """A fresh training state (call under jit/eval_shape to place or describe it)."""
  params = nnx.state(SSAST(model_config, nnx.Rngs(seed)), nnx.Param)
  return {'step': jnp.zeros((), jnp.int32), 'params': params,
          'opt_state': optimizer().init(params), 'lr': jnp.asarray(lr, jnp.float32),
          'nonfinite_step': jnp.full((), -1, jnp.int32)}


def example_keys(seed, step, purpose, batch_size: int) -> jax.Array:
  """One key per global example of a batch, from (seed, step, purpose, example index)."""
  base = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), step), purpose)
  return jax.vmap(jax.random.fold_in, (None, 0))(base, jnp.arange(batch_size))


def draw_masks(keys, patch_grid, num_masked, mode, cluster_factor):
  with jax.named_scope('masking'):
    return masking.masks_from_keys(keys, patch_grid, num_masked, mode, cluster_factor)


def micro_batches(tree, count: int):
  """Leaves `(B, ...)` -> `(count, B // count, ...)`; micro-batch i holds examples i,
  i + count, i + 2 * count, ... .

  A batch split into contiguous blocks over devices (B // count divisible by the device
  count) thus splits every micro-batch evenly over the devices, without moving data.
  """
  def split(x):
    return jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1)
  return jax.tree.map(split, tree)


def parts_of(tree, count: int) -> list:
  """The `count` micro-batches of `tree` (see `micro_batches`), as a list."""
  stacked = micro_batches(tree, count)
  return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(count)]


def accumulate(fn, inputs: tuple, count: int, mesh=None):
  """The mean of `fn(*micro_batch)` over `count` micro-batches of `inputs` (leaves with a
  leading batch dimension), computed one micro-batch at a time.

  `fn` returns a pytree of values that are means over its micro-batch (metrics, gradients);
  micro-batches are equal in size, so the result is the mean over the whole batch.
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


def batch_gradients(params, fbank, mpc_mask, mpg_mask, *, graphdef, settings, mesh=None):
  """(metrics, gradients) of the batch's mean loss, over `settings.grad_accum_steps`
  micro-batches; with a `mesh`, parameters are all-gathered for the computation and
  gradients reduce-scattered to the parameters' FSDP layout.

  Each micro-batch's losses are computed in `settings.concurrent_parts` interleaved parts:
  independent computations, each on fewer clips, that XLA:CPU can run side by side
  (training steps 1.03-1.15x faster on 2 CPU cores; README, Performance).
  """
  s = settings
  full_params = sharding.gather(params, mesh)

  def micro_batch_gradients(fbank, mpc_mask, mpg_mask):
    def loss_fn(params):
      model = nnx.merge(graphdef, params)
      per_clip = [losses.pretext_losses(
          model, *sharding.shard_batch(part, mesh), task=s.task,
          paper_infonce=s.paper_infonce, joint_passes=s.joint_passes,
          mpc_trains_encoder=s.mpc_trains_encoder, per_clip=True)
                  for part in parts_of((fbank, mpc_mask, mpg_mask), s.concurrent_parts)]
      out = {k: jnp.mean(jnp.concatenate([p[k] for p in per_clip])) for k in per_clip[0]}
      return out['loss'], out
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(full_params)
    return metrics, sharding.shard_like_state(grads, mesh)

  return accumulate(micro_batch_gradients, (fbank, mpc_mask, mpg_mask), s.grad_accum_steps,
                    mesh)


def train_step(state: dict, fbank: jax.Array, *, graphdef, settings, mesh=None
               ) -> tuple[dict, dict]:
  """One optimiser step on a global batch `fbank` `(B, T, F)`; returns (state, metrics).

  `settings` is a hashable `StepSettings`. The batch is processed in
  `settings.grad_accum_steps` micro-batches whose mean gradient makes one update; each
  clip's masks come from its index in the global batch, so the update is that of the whole
  batch at once (up to float summation order). `mesh`: see `batch_gradients`.

  A step whose loss or gradient is not finite leaves parameters and optimiser state
  unchanged and records its index in `nonfinite_step` (the first one), which the host
  checks.
  """
  s = settings
  step = state['step']
  batch = fbank.shape[0]
  mpc_mask, mpg_mask = (
      draw_masks(example_keys(s.seed, step, purpose, batch), s.patch_grid, s.mask_patch,
                 s.mask_mode, s.cluster_factor) for purpose in (MPC_PASS, MPG_PASS))
  metrics, grads = batch_gradients(state['params'], fbank, mpc_mask, mpg_mask,
                                   graphdef=graphdef, settings=settings, mesh=mesh)
  with jax.named_scope('optimizer'):
    lr = schedule.warmup_lr(step, state['lr'], s.lr, s.warmup)
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
  metrics = {**metrics, 'lr': lr, 'grad_norm': grad_norm}
  return new_state, metrics


# XLA:CPU hands fused element-wise operations and reductions to YNNPACK, which rounds a
# token's LayerNorm statistics differently in a batch of 2 clips and one of 8; handing it
# single matrix products only, a clip's forward pass rounds the same in any batch (at the
# reference geometry; matrix products of a few dozen rows still differ).
BATCH_INVARIANT_CPU_OPTIONS = {
    'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}


def jit_train_step(graphdef, settings: StepSettings, mesh, state_sharding,
                   batch_invariant: bool = False):
  """`train_step` compiled for `mesh`: the state (donated) stays in `state_sharding`, the
  batch is split over every device, metrics come back replicated. `batch_invariant`
  (CPU only) compiles with `BATCH_INVARIANT_CPU_OPTIONS`."""
  return jax.jit(
      functools.partial(train_step, graphdef=graphdef, settings=settings, mesh=mesh),
      in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
      out_shardings=(state_sharding, sharding.replicated(mesh)), donate_argnums=0,
      compiler_options=BATCH_INVARIANT_CPU_OPTIONS if batch_invariant else None)


@functools.partial(jax.jit, static_argnames=('graphdef', 'settings', 'mesh'))
def eval_step(params, fbank, valid, batch_index, *, graphdef, settings, mesh=None) -> dict:
  """Sums over the valid clips of a validation batch: MPC correct/loss, MPG loss, count.

  Masks come from a fixed key and the clip's position, so every evaluation of a run sees
  the same masks. With a `mesh`, parameters are all-gathered for the computation.
  """
  s = settings
  batch = fbank.shape[0]
  keys = [example_keys(s.seed, batch_index, purpose, batch)
          for purpose in (EVAL_MPC_PASS, EVAL_MPG_PASS)]
  mpc_mask, mpg_mask = (draw_masks(k, s.patch_grid, s.eval_mask_patch, s.mask_mode,
                                   s.cluster_factor) for k in keys)
  out = losses.pretext_losses(nnx.merge(graphdef, sharding.gather(params, mesh)), fbank,
                              mpc_mask, mpg_mask, task=s.task, paper_infonce=s.paper_infonce,
                              per_clip=True)
  weight = valid.astype(jnp.float32)
  sums = {k: jnp.sum(v * weight) for k, v in out.items()}
  sums['count'] = jnp.sum(weight)
  return sums
