"""The pretext losses of SSAST (SPEC section 5) as pure functions of the masks.

Masks are arguments, never drawn here, so every function can be checked against numbers
from the original and used unchanged inside the jitted training step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssast_jax.model import NUM_LEADING_TOKENS, SSAST

MPG_WEIGHT = 10.0  # joint loss = mpc + 10 * mpg, as the original


def gather_patches(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Rows `mask` `(B, M)` of per-patch `values` `(B, N, K)` -> `(B, M, K)`."""
  return jnp.take_along_axis(values, mask[..., None], axis=1)


def masked_outputs(encoded: jax.Array, mask: jax.Array) -> jax.Array:
  """Final-norm outputs at the masked patches (token index `mask + 2`)."""
  return gather_patches(encoded[:, NUM_LEADING_TOKENS:], mask)


def infonce(predictions: jax.Array, targets: jax.Array, paper_infonce: bool = False):
  """MPC InfoNCE loss and accuracy per clip, `(B,)` each, over its masked patches.

  With `S[a, b] = <target_a, prediction_b>` per clip, the original normalises each row
  (over predictions for a target); `paper_infonce=True` normalises each column instead, as
  the paper's equation (1) is written. Accuracy is the original's in both cases: softmax over
  rows, then for each column the argmax over rows must be the column's own index.
  Returns float32 `(loss, accuracy)`, each `(B,)`.
  """
  scores = jnp.einsum('bak,bck->bac', targets.astype(jnp.float32),
                      predictions.astype(jnp.float32))
  num_masked = scores.shape[-1]
  axis = -2 if paper_infonce else -1
  log_probs = jax.nn.log_softmax(scores, axis=axis)
  loss = -jnp.mean(jnp.diagonal(log_probs, axis1=-2, axis2=-1), axis=-1)
  # softmax's row normalisation changes which row wins a column, so argmax after it.
  best_target = jnp.argmax(jax.nn.softmax(scores, axis=-1), axis=-2)
  accuracy = jnp.mean(best_target == jnp.arange(num_masked), axis=-1)
  return loss, accuracy.astype(jnp.float32)


def mse(predictions: jax.Array, targets: jax.Array) -> jax.Array:
  """MPG loss per clip `(B,)`: mean squared error over its masked patches and values."""
  diff = predictions.astype(jnp.float32) - targets.astype(jnp.float32)
  return jnp.mean(diff * diff, axis=(-2, -1))


def mpc_loss(model: SSAST, x: jax.Array, mask: jax.Array, paper_infonce: bool = False):
  """Masked patch classification, one forward pass with `mask`: per-clip (loss, accuracy).

  Only the targets are constant: the loss trains the `cpred` head and, through it, the
  encoder (SPEC section 5).
  """
  hidden = masked_outputs(model.encode(x, mask), mask)
  return infonce(model.cpred(hidden), gather_patches(model.patches(x), mask), paper_infonce)


def mpg_loss(model: SSAST, x: jax.Array, mask: jax.Array) -> jax.Array:
  """Masked patch generation (reconstruction), one forward pass with `mask`: per clip."""
  hidden = masked_outputs(model.encode(x, mask), mask)
  return mse(model.gpred(hidden), gather_patches(model.patches(x), mask))


def joint_one_pass(model: SSAST, x: jax.Array, mask: jax.Array, paper_infonce: bool = False):
  """Both heads on one forward pass with one mask: a cheaper recipe than the original's.

  Returns per-clip (mpc_loss, mpc_accuracy, mpg_loss).
  """
  hidden = masked_outputs(model.encode(x, mask), mask)
  targets = gather_patches(model.patches(x), mask)
  nce, accuracy = infonce(model.cpred(hidden), targets, paper_infonce)
  return nce, accuracy, mse(model.gpred(hidden), targets)


def pretext_losses(model: SSAST, x: jax.Array, mpc_mask: jax.Array | None,
                   mpg_mask: jax.Array | None, *, task: str = 'pretrain_joint',
                   paper_infonce: bool = False, joint_passes: int = 2,
                   per_clip: bool = False) -> dict:
  """The losses of `task` on a normalised batch `x` `(B, T, F)`.

  `pretrain_joint` with `joint_passes=2` is the original: two forward passes with the two
  independent masks, `loss = mpc_loss + 10 * mpg_loss`. With `joint_passes=1` both heads
  read one pass with `mpc_mask`. Keys absent
  from a task are 0. Values are float32 means over the batch, or `(B,)` with `per_clip`
  (every clip has the same number of masked patches, so their mean is the batch value).
  """
  out = _per_clip_losses(model, x, mpc_mask, mpg_mask, task, paper_infonce, joint_passes)
  return out if per_clip else {k: jnp.mean(v) for k, v in out.items()}


def _per_clip_losses(model, x, mpc_mask, mpg_mask, task, paper_infonce, joint_passes) -> dict:
  zero = jnp.zeros((x.shape[0],), jnp.float32)
  if task == 'pretrain_mpc':
    nce, accuracy = mpc_loss(model, x, mpc_mask, paper_infonce)
    return {'loss': nce, 'mpc_loss': nce, 'mpc_acc': accuracy, 'mpg_loss': zero}
  if task == 'pretrain_mpg':
    mse_loss = mpg_loss(model, x, mpg_mask)
    return {'loss': mse_loss, 'mpc_loss': zero, 'mpc_acc': zero, 'mpg_loss': mse_loss}
  if task != 'pretrain_joint':
    raise ValueError(f'unknown task {task!r}')
  if joint_passes == 1:
    nce, accuracy, mse_loss = joint_one_pass(model, x, mpc_mask, paper_infonce)
  elif joint_passes == 2:
    nce, accuracy = mpc_loss(model, x, mpc_mask, paper_infonce)
    mse_loss = mpg_loss(model, x, mpg_mask)
  else:
    raise ValueError(f'joint_passes must be 1 or 2, got {joint_passes}')
  return {'loss': nce + MPG_WEIGHT * mse_loss, 'mpc_loss': nce, 'mpc_acc': accuracy,
          'mpg_loss': mse_loss}
