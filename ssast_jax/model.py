"""The SSAST encoder and its two pretext heads, in Flax NNX.

A DeiT-style ViT (timm 0.4.5) over spectrogram patches with two leading tokens, as the
original `ASTModel(pretrain_stage=True)`: see SPEC sections 2-4 and 8. Compute can run in
bfloat16 (`ModelConfig.dtype`); parameters stay float32 and LayerNorm statistics, softmax
and the losses are computed in float32.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ssast_jax import layer_norm as layer_norm_lib
from ssast_jax import linear

# (embedding width, attention heads) of the published sizes; all have 12 blocks.
MODEL_SIZES = {'tiny': (192, 3), 'small': (384, 6), 'base': (768, 12)}
DEFAULT_DEPTH = 12
# jax.checkpoint_policies usable as `remat_policy`: keep nothing of a block but its input
# (least memory, one more forward pass of the encoder), every matmul output, or only the
# dense layers' outputs (matmuls without batch dimensions; attention's per-head matmuls and
# softmax are recomputed).
REMAT_POLICIES = ('nothing_saveable', 'dots_saveable', 'dots_with_no_batch_dims_saveable')
# How attention is computed: 'dot_product_attention' (jax.nn.dot_product_attention, which
# accelerators lower to fused kernels), 'explicit' (the same softmax(q k^T / sqrt(d)) v as
# heads-major einsums, whose forward pass XLA:CPU runs 3x faster), 'auto': explicit on CPU,
# dot_product_attention elsewhere. All agree to float rounding.
ATTENTION_IMPLS = ('auto', 'dot_product_attention', 'explicit')
LAYER_NORM_EPSILON = 1e-6
NUM_LEADING_TOKENS = 2  # cls and dist


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Geometry and size of an SSAST model.

  `input_fdim` x `input_tdim` is the pretraining input (mel bins x frames); it fixes the
  patch grid and so the positional embedding's length. `pred_dim` is the pretext heads'
  output width, `fshape * tshape` (256 in the original, where it is hard-coded).
  `remat` recomputes each block's activations in the backward pass instead of keeping
  them; `remat_policy` names the `jax.checkpoint_policies` entry saying which of them may
  still be kept (REMAT_POLICIES). `attention` is one of ATTENTION_IMPLS.
  """
  embed_dim: int
  num_heads: int
  depth: int = DEFAULT_DEPTH
  fshape: int = 16
  tshape: int = 16
  fstride: int = 16
  tstride: int = 16
  input_fdim: int = 128
  input_tdim: int = 1024
  dtype: str = 'float32'
  remat: bool = False
  remat_policy: str = 'nothing_saveable'
  attention: str = 'auto'

  def __post_init__(self):
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(f'attention {self.attention!r} is not one of {ATTENTION_IMPLS}')

  @classmethod
  def from_size(cls, size: str, depth: int | None = None, **kwargs) -> 'ModelConfig':
    if size not in MODEL_SIZES:
      raise ValueError(f'unknown model size {size!r}; expected one of {sorted(MODEL_SIZES)}')
    embed_dim, num_heads = MODEL_SIZES[size]
    return cls(embed_dim=embed_dim, num_heads=num_heads,
               depth=DEFAULT_DEPTH if depth is None else depth, **kwargs)

  @property
  def size(self) -> str | None:
    """The published size name with this width, or None."""
    for name, (dim, heads) in MODEL_SIZES.items():
      if (dim, heads) == (self.embed_dim, self.num_heads):
        return name
    return None

  @property
  def patch_grid(self) -> tuple[int, int]:
    """(p_f, p_t): patches along frequency and time for the pretraining input."""
    return (patch_count(self.input_fdim, self.fshape, self.fstride),
            patch_count(self.input_tdim, self.tshape, self.tstride))

  @property
  def num_patches(self) -> int:
    p_f, p_t = self.patch_grid
    return p_f * p_t

  @property
  def pred_dim(self) -> int:
    return self.fshape * self.tshape

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)


def patch_count(length: int, shape: int, stride: int) -> int:
  return (length - shape) // stride + 1


def patchify(x: jax.Array, fshape: int, tshape: int, fstride: int, tstride: int) -> jax.Array:
  """Cuts a batch `(B, T, F)` into patch vectors `(B, N, fshape * tshape)`.

  Patches are numbered frequency-major (`n = f * p_t + t`) and each vector lists its values
  frequency-major (`i * tshape + j`), as `nn.Unfold` on the original's `(B, 1, F, T)` view.
  Non-overlapping patches are a pure reshape; overlapping ones (fine-tuning strides) use
  XLA's patch extraction.
  """
  batch, frames, bins = x.shape
  p_f, p_t = patch_count(bins, fshape, fstride), patch_count(frames, tshape, tstride)
  image = jnp.swapaxes(x, 1, 2)  # (B, F, T)
  if (fstride, tstride) == (fshape, tshape):
    image = image[:, :p_f * fshape, :p_t * tshape]
    blocks = image.reshape(batch, p_f, fshape, p_t, tshape).transpose(0, 1, 3, 2, 4)
    return blocks.reshape(batch, p_f * p_t, fshape * tshape)
  patches = jax.lax.conv_general_dilated_patches(
      image[:, None], (fshape, tshape), (fstride, tstride), 'VALID',
      precision=jax.lax.Precision.HIGHEST)  # (B, fshape * tshape, p_f, p_t)
  return patches.reshape(batch, fshape * tshape, p_f * p_t).transpose(0, 2, 1)


def torch_default_uniform(fan_in: int):
  """PyTorch's default Linear/Conv2d init for weight and bias: U(-1/sqrt(fan_in), +)."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


VIT_LINEAR_INIT = nnx.initializers.normal(0.02)  # timm: trunc_normal(std=.02), never truncates


def vit_linear(in_features: int, out_features: int, config: ModelConfig, rngs: nnx.Rngs):
  """An encoder block's dense layer. With remat its product stays JAX's own
  `dot_general`, whose outputs the `remat_policy` can name and keep; `linear.dot_general`
  would hide them inside its derivative."""
  return nnx.Linear(in_features, out_features, kernel_init=VIT_LINEAR_INIT,
                    bias_init=nnx.initializers.zeros_init(), dtype=config.compute_dtype,
                    dot_general=jax.lax.dot_general if config.remat else linear.dot_general,
                    rngs=rngs)


def layer_norm(dim: int, config: ModelConfig, rngs: nnx.Rngs):
  return layer_norm_lib.LayerNorm(dim, epsilon=LAYER_NORM_EPSILON, dtype=config.compute_dtype,
                                  rngs=rngs)


def explicit_attention(qkv: jax.Array) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v of `qkv` `(B, T, 3, heads, d)`, as `(B, T, heads, d)`.

  Heads-major einsums with the scores and softmax in float32, the numerics of
  `jax.nn.dot_product_attention`'s XLA path, which XLA:CPU lays out far better, and a
  hand-written derivative (`heads_attention`).
  """
  q, k, v = (jnp.swapaxes(qkv[:, :, i], 1, 2) for i in range(3))  # (B, heads, T, d)
  return jnp.swapaxes(heads_attention(q * q.shape[-1] ** -0.5, k, v), 1, 2)


@jax.custom_vjp
def heads_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """softmax(q k^T) v per head, all `(B, heads, T, d)`.

  The derivative is the textbook one, with the softmax's row term taken as
  `sum(d_out * out)` over d rather than over T keys; XLA's own derivative of the forward
  runs about 12% slower per training step on CPU.
  """
  return _heads_attention_forward(q, k, v)[0]


def _heads_attention_forward(q, k, v):
  scores = jnp.einsum('bnth,bnsh->bnts', q, k, preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum('bnts,bnsh->bnth', probs, v)
  return out, (q, k, v, probs, out)


def _heads_attention_backward(residuals, d_out):
  q, k, v, probs, out = residuals
  f32 = jnp.float32
  # Key and value gradients are computed with (d, T) outputs, transposed after: XLA:CPU
  # runs these products about 1.3x faster than with (T, d) outputs.
  d_v = jnp.swapaxes(jnp.einsum('bnth,bnts->bnhs', d_out, probs), -1, -2)
  d_probs = jnp.einsum('bnth,bnsh->bnts', d_out, v, preferred_element_type=f32)
  row_term = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True)
  d_scores = (probs.astype(f32) * (d_probs - row_term)).astype(q.dtype)
  return (jnp.einsum('bnts,bnsh->bnth', d_scores, k),
          jnp.swapaxes(jnp.einsum('bnth,bnts->bnhs', q, d_scores), -1, -2), d_v)


heads_attention.defvjp(_heads_attention_forward, _heads_attention_backward)


def resolved_attention(attention: str) -> str:
  """The implementation 'auto' stands for on the default backend."""
  if attention != 'auto':
    return attention
  return 'explicit' if jax.default_backend() == 'cpu' else 'dot_product_attention'


class Attention(nnx.Module):
  """Multi-head self-attention with one fused qkv projection (timm layout)."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    dim = config.embed_dim
    if dim % config.num_heads:
      raise ValueError(f'embed_dim {dim} is not divisible by num_heads {config.num_heads}')
    self.num_heads = config.num_heads
    self.attention = config.attention
    self.qkv = vit_linear(dim, 3 * dim, config, rngs)
    self.proj = vit_linear(dim, dim, config, rngs)

  def __call__(self, x):
    batch, tokens, dim = x.shape
    head_dim = dim // self.num_heads
    with jax.named_scope('qkv_proj'):
      qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, head_dim)
    with jax.named_scope('attention_core'):
      if resolved_attention(self.attention) == 'explicit':
        out = explicit_attention(qkv)
      else:
        out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                           scale=head_dim ** -0.5)
    with jax.named_scope('attention_out_proj'):
      return self.proj(out.reshape(batch, tokens, dim))


class Mlp(nnx.Module):
  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    dim = config.embed_dim
    self.fc1 = vit_linear(dim, 4 * dim, config, rngs)
    self.fc2 = vit_linear(4 * dim, dim, config, rngs)

  def __call__(self, x):
    with jax.named_scope('mlp_fc1'):
      h = self.fc1(x)
    with jax.named_scope('gelu'):
      h = exact_gelu(h)
    with jax.named_scope('mlp_fc2'):
      return self.fc2(h)


def exact_gelu(x: jax.Array) -> jax.Array:
  """x * Phi(x) in PyTorch's form, 0.5 x (1 + erf(x / sqrt 2)): the original's
  `nn.GELU()`; XLA:CPU evaluates it 2.7x faster than `jax.nn.gelu`'s erfc form."""
  return 0.5 * x * (1 + jax.lax.erf(x * (0.5 ** 0.5)))


class Block(nnx.Module):
  """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    self.norm1 = layer_norm(config.embed_dim, config, rngs)
    self.attn = Attention(config, rngs)
    self.norm2 = layer_norm(config.embed_dim, config, rngs)
    self.mlp = Mlp(config, rngs)

  def __call__(self, x):
    with jax.named_scope('layer_norm'):
      normed = self.norm1(x)
    x = x + self.attn(normed)
    with jax.named_scope('layer_norm'):
      normed = self.norm2(x)
    return x + self.mlp(normed)


class PatchEmbed(nnx.Module):
  """The original's Conv2d patch embedding, applied as a dense layer on patch vectors.

  `kernel[i * tshape + j, d]` is the PyTorch conv weight `[d, 0, i, j]`.
  """

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    init = torch_default_uniform(config.pred_dim)
    self.kernel = nnx.Param(init(rngs.params(), (config.pred_dim, config.embed_dim)))
    self.bias = nnx.Param(init(rngs.params(), (config.embed_dim,)))
    self.dtype = config.compute_dtype

  def __call__(self, patches):
    kernel = self.kernel[...].astype(self.dtype)
    return linear.matmul(patches.astype(self.dtype), kernel) + self.bias[...].astype(self.dtype)


class PretextHead(nnx.Module):
  """`Linear(D, D) -> ReLU -> Linear(D, fshape * tshape)` with PyTorch's default init."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    dim = config.embed_dim
    init = torch_default_uniform(dim)
    self.hidden = nnx.Linear(dim, dim, kernel_init=init, bias_init=init,
                             dtype=config.compute_dtype, dot_general=linear.dot_general,
                             rngs=rngs)
    self.out = nnx.Linear(dim, config.pred_dim, kernel_init=init, bias_init=init,
                          dtype=config.compute_dtype, dot_general=linear.dot_general,
                          rngs=rngs)

  def __call__(self, h):
    with jax.named_scope('pretext_heads'):
      return self.out(jax.nn.relu(self.hidden(h)))


class SSAST(nnx.Module):
  """Encoder plus the MPC (`cpred`) and MPG (`gpred`) heads of the pretraining model."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    dim = config.embed_dim
    self.config = config
    self.patch_embed = PatchEmbed(config, rngs)
    token_init = nnx.initializers.normal(0.02)
    self.cls_token = nnx.Param(token_init(rngs.params(), (1, 1, dim)))
    self.dist_token = nnx.Param(token_init(rngs.params(), (1, 1, dim)))
    self.pos_embed = nnx.Param(
        token_init(rngs.params(), (1, config.num_patches + NUM_LEADING_TOKENS, dim)))
    # Xavier normal on a (1, 1, D) tensor: fan_in = fan_out = D, so std = 1/sqrt(D).
    self.mask_embed = nnx.Param(
        jax.random.normal(rngs.params(), (1, 1, dim)) / math.sqrt(dim))
    self.blocks = nnx.List([Block(config, rngs) for _ in range(config.depth)])
    self.norm = layer_norm(dim, config, rngs)
    self.cpred = PretextHead(config, rngs)
    self.gpred = PretextHead(config, rngs)

  def patches(self, x):
    """Patch vectors `(B, N, fshape * tshape)` of a normalised batch `(B, T, F)`."""
    c = self.config
    return patchify(x, c.fshape, c.tshape, c.fstride, c.tstride)

  def encode(self, x, mask=None):
    """Final-norm token outputs `(B, N + 2, D)`; `mask` `(B, M)` patch indices or None."""
    with jax.named_scope('patch_embed'):
      h = self.embed(x, mask)
    if self.config.remat:
      h = rematerialized_blocks(list(self.blocks), h,
                                getattr(jax.checkpoint_policies, self.config.remat_policy))
    else:
      for block in self.blocks:
        h = block(h)
    with jax.named_scope('layer_norm'):
      return self.norm(h)

  def embed(self, x, mask):
    """Block input: patch embeddings, masked ones replaced, after the two leading
    tokens, plus the positional embedding."""
    dtype = self.config.compute_dtype
    tokens = self.patch_embed(self.patches(x))
    if mask is not None:
      batch, num_patches = tokens.shape[:2]
      is_masked = jnp.zeros((batch, num_patches), bool).at[
          jnp.arange(batch)[:, None], mask].set(True)
      tokens = jnp.where(is_masked[..., None], self.mask_embed[...].astype(dtype), tokens)
    lead = jnp.concatenate([self.cls_token[...], self.dist_token[...]], axis=1).astype(dtype)
    lead = jnp.broadcast_to(lead, (tokens.shape[0],) + lead.shape[1:])
    return jnp.concatenate([lead, tokens], axis=1) + self.pos_embed[...].astype(dtype)


def rematerialized_blocks(blocks: list[Block], h: jax.Array, policy) -> jax.Array:
  """`blocks` applied in turn, keeping for the backward pass only what `policy` saves
  of each (at least its input): one `lax.scan` over the blocks' stacked parameters with a
  `jax.checkpoint`ed step.

  The loop is what makes the saving hold on every backend: with the blocks unrolled, XLA
  (on CPU at least) drops the rematerialisation barriers and schedules the recomputation
  early, so peak memory goes up rather than down.
  """
  graphdef, _ = nnx.split(blocks[0])
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *(nnx.state(b) for b in blocks))

  def apply_block(h, state):
    return nnx.merge(graphdef, state)(h), None

  h, _ = jax.lax.scan(jax.checkpoint(apply_block, policy=policy), h, stacked)
  return h


def abstract_model(config: ModelConfig):
  """(graphdef, abstract parameter state) of `config`, without allocating parameters."""
  return nnx.split(nnx.eval_shape(lambda: SSAST(config, nnx.Rngs(0))), nnx.Param)
