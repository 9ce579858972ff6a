"""Multi-head attention's core, `softmax(q k^T / sqrt(d)) v`: the one place that picks how.

`jax.nn.dot_product_attention` with its XLA implementation, which GPU and TPU compilers
fuse; the scores and softmax are computed in float32 whatever the compute dtype (SPEC
section 3 numerics under bfloat16).
"""

from __future__ import annotations

import jax


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Attention of `q, k, v` `(B, T, heads, d)` -> `(B, T, heads, d)`, scale `d ** -0.5`."""
  return jax.nn.dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5)
