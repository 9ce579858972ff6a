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

from ssast_jax.model import attention

# (embedding width, attention heads) of the published sizes; all have 12 blocks.
MODEL_SIZES = {'tiny': (192, 3), 'small': (384, 6), 'base': (768, 12)}
DEFAULT_DEPTH = 12
# jax.checkpoint_policies usable as `remat_policy`: keep nothing of a block but its input
# (least memory, one more forward pass of the encoder), every matmul output, or only the
# dense layers' outputs (matmuls without batch dimensions; attention's per-head matmuls and
# softmax are recomputed).
REMAT_POLICIES = ('nothing_saveable', 'dots_saveable', 'dots_with_no_batch_dims_saveable')
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
  still be kept (REMAT_POLICIES).
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
  layer_norm_epsilon: float = LAYER_NORM_EPSILON

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
  """An encoder block's dense layer: timm's init, compute in the model's dtype."""
  return nnx.Linear(in_features, out_features, kernel_init=VIT_LINEAR_INIT,
                    bias_init=nnx.initializers.zeros_init(), dtype=config.compute_dtype,
                    rngs=rngs)


def layer_norm(dim: int, config: ModelConfig, rngs: nnx.Rngs):
  """The encoder's LayerNorm: epsilon `config.layer_norm_epsilon`, statistics in float32."""
  return nnx.LayerNorm(dim, epsilon=config.layer_norm_epsilon, dtype=config.compute_dtype,
                       rngs=rngs)


class Attention(nnx.Module):
  """Multi-head self-attention with one fused qkv projection (timm layout)."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    dim = config.embed_dim
    if dim % config.num_heads:
      raise ValueError(f'embed_dim {dim} is not divisible by num_heads {config.num_heads}')
    self.num_heads = config.num_heads
    self.qkv = vit_linear(dim, 3 * dim, config, rngs)
    self.proj = vit_linear(dim, dim, config, rngs)

  def __call__(self, x):
    batch, tokens, dim = x.shape
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
    out = attention.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return self.proj(out.reshape(batch, tokens, dim))


class Mlp(nnx.Module):
  """fc1 (D -> 4D), exact GELU, fc2 (4D -> D)."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    dim = config.embed_dim
    self.fc1 = vit_linear(dim, 4 * dim, config, rngs)
    self.fc2 = vit_linear(4 * dim, dim, config, rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
  """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    self.norm1 = layer_norm(config.embed_dim, config, rngs)
    self.attn = Attention(config, rngs)
    self.norm2 = layer_norm(config.embed_dim, config, rngs)
    self.mlp = Mlp(config, rngs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


def patch_embedding(config: ModelConfig, rngs: nnx.Rngs) -> nnx.Linear:
  """The original's Conv2d patch embedding as a dense layer on non-overlapping patch
  vectors: `kernel[i * tshape + j, d]` is the PyTorch conv weight `[d, 0, i, j]`."""
  init = torch_default_uniform(config.pred_dim)
  return nnx.Linear(config.pred_dim, config.embed_dim, kernel_init=init, bias_init=init,
                    dtype=config.compute_dtype, rngs=rngs)


class PretextHead(nnx.Module):
  """`Linear(D, D) -> ReLU -> Linear(D, fshape * tshape)` with PyTorch's default init."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    dim = config.embed_dim
    init = torch_default_uniform(dim)
    self.hidden = nnx.Linear(dim, dim, kernel_init=init, bias_init=init,
                             dtype=config.compute_dtype, rngs=rngs)
    self.out = nnx.Linear(dim, config.pred_dim, kernel_init=init, bias_init=init,
                          dtype=config.compute_dtype, rngs=rngs)

  def __call__(self, h):
    return self.out(jax.nn.relu(self.hidden(h)))


class SSAST(nnx.Module):
  """Encoder plus the MPC (`cpred`) and MPG (`gpred`) heads of the pretraining model."""

  def __init__(self, config: ModelConfig, rngs: nnx.Rngs):
    dim = config.embed_dim
    self.config = config
    self.patch_embed = patch_embedding(config, rngs)
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
    return run_encoder(self.blocks, self.norm, self.embed(x, mask), self.config)

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
    return with_leading_tokens(tokens, self.cls_token, self.dist_token, self.pos_embed, dtype)


def with_leading_tokens(tokens, cls_token, dist_token, pos_embed, dtype) -> jax.Array:
  """The blocks' input: `[cls, dist, tokens]` plus the positional embedding, for patch
  embeddings `tokens` `(B, N, D)`; shared by the pretraining model and the classifier."""
  lead = jnp.concatenate([cls_token[...], dist_token[...]], axis=1).astype(dtype)
  lead = jnp.broadcast_to(lead, (tokens.shape[0],) + lead.shape[1:])
  return jnp.concatenate([lead, tokens], axis=1) + pos_embed[...].astype(dtype)


def run_encoder(blocks, norm, h: jax.Array, config: ModelConfig) -> jax.Array:
  """Final-norm outputs of the encoder `blocks` on embedded tokens `h` `(B, N + 2, D)`,
  rematerialised as `config` says; shared by the pretraining model and the classifier."""
  if config.remat:
    h = rematerialized_blocks(list(blocks), h,
                              getattr(jax.checkpoint_policies, config.remat_policy))
  else:
    for block in blocks:
      h = block(h)
  return norm(h)


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
