"""LayerNorm over the last axis with a hand-written derivative.

The forward pass is flax's `nnx.LayerNorm` (statistics in float32, variance as
`max(0, E[x^2] - E[x]^2)`, eps inside the square root); the parameters are the same
`scale` and `bias`, so checkpoints do not change. Instead of JAX's derivative of that
forward pass, which differentiates both moments, the textbook derivative of the
normalisation: training steps about 1.02-1.05x faster on CPU. Gradients agree with JAX's
to float rounding (test).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
               dtype) -> jax.Array:
  """`(x - mean) / sqrt(var + epsilon) * scale + bias` over the last axis, as `dtype`."""
  return _forward(x, scale, bias, epsilon, dtype)[0]


def _forward(x, scale, bias, epsilon, dtype):
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  mean_of_squares = jnp.mean(x32 * x32, axis=-1, keepdims=True)
  inverse_std = jax.lax.rsqrt(jnp.maximum(0.0, mean_of_squares - mean * mean) + epsilon)
  y = (x32 - mean) * (inverse_std * scale) + bias
  return y.astype(dtype), (x, mean, inverse_std, scale)


def _backward(epsilon, dtype, residuals, d_y):
  del epsilon, dtype
  x, mean, inverse_std, scale = residuals
  d_y = d_y.astype(jnp.float32)
  normed = (x.astype(jnp.float32) - mean) * inverse_std
  d_normed = d_y * scale
  d_x = inverse_std * (d_normed - jnp.mean(d_normed, axis=-1, keepdims=True)
                       - normed * jnp.mean(d_normed * normed, axis=-1, keepdims=True))
  token_axes = tuple(range(d_y.ndim - 1))
  return (d_x.astype(x.dtype), jnp.sum(d_y * normed, axis=token_axes).astype(scale.dtype),
          jnp.sum(d_y, axis=token_axes).astype(scale.dtype))


layer_norm.defvjp(_forward, _backward)


class LayerNorm(nnx.LayerNorm):
  """`nnx.LayerNorm` over the last axis, with scale and bias, computed by `layer_norm`."""

  def __call__(self, x, *, mask=None):
    if mask is not None:
      raise NotImplementedError('LayerNorm here normalises whole feature vectors; no mask')
    x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)
    return layer_norm(x, scale, bias, self.epsilon, self.dtype or jnp.result_type(x, scale, bias))
