"""The training state and the optimiser that updates it.

The state is a pytree `{step, params, opt_state, lr, nonfinite_step}`: the update count,
the model's parameters, Adam's moments, the current learning rate (warm-up and plateau act
on it) and the first step whose loss or gradient was not finite (-1: none).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax
from flax import nnx

from ssast_jax.model import SSAST, ModelConfig

ADAM_BETAS = (0.95, 0.999)
ADAM_EPS = 1e-8
WEIGHT_DECAY = 5e-7  # L2 added to the gradient (PyTorch Adam), not decoupled AdamW


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
