"""The fine-tuning model: the pretrained encoder on a fine-tuning patch grid plus the
original's classification head.

The original `ASTModel(pretrain_stage=False)` (SPEC section 10) keeps the pretrained
encoder, lets the patch strides and the input length change (the patch shape may not),
and adds a head `LayerNorm(D, eps=1e-5) -> Linear(D, K)` on a pooled clip representation:
the mean of the final-norm patch tokens (`avgtok`, SSAST's `ft_avgtok`) or of the two
leading tokens (`cls`, `ft_cls`). The blocks, patch embedding and token layout are the
pretraining model's own (`encoder`); only the head and the pooling are new here.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from flax import nnx

from ssast_jax.model import encoder
from ssast_jax.model.encoder import NUM_LEADING_TOKENS, ModelConfig

POOLINGS = ('avgtok', 'cls')
HEAD_LAYER_NORM_EPSILON = 1e-5  # torch.nn.LayerNorm's default; the encoder uses 1e-6


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClassifierConfig(ModelConfig):
  """A classifier's geometry: the pretrained encoder's size and patch shape, the
  fine-tuning `fstride`, `tstride`, `input_fdim`, `input_tdim` (so `patch_grid` is the
  fine-tuning grid, which may overlap), the number of output labels, the head's LayerNorm
  epsilon and the `pooling` (one of POOLINGS) that `classify` uses unless told otherwise."""
  num_labels: int
  head_layer_norm_epsilon: float = HEAD_LAYER_NORM_EPSILON
  pooling: str = 'avgtok'


class ClassificationHead(nnx.Module):
  """The original's `mlp_head`: LayerNorm (scale 1, bias 0) then a Linear layer with
  PyTorch's default init (kaiming-uniform weight, i.e. U(+-1/sqrt(D)), and the same bound
  for the bias)."""

  def __init__(self, config: ClassifierConfig, rngs: nnx.Rngs):
    dim = config.embed_dim
    init = encoder.torch_default_uniform(dim)
    self.norm = nnx.LayerNorm(dim, epsilon=config.head_layer_norm_epsilon,
                              dtype=config.compute_dtype, rngs=rngs)
    self.linear = nnx.Linear(dim, config.num_labels, kernel_init=init, bias_init=init,
                             dtype=config.compute_dtype, rngs=rngs)

  def __call__(self, clip):
    return self.linear(self.norm(clip))


class Classifier(nnx.Module):
  """The pretrained encoder on the fine-tuning patch grid plus the classification head.

  The encoder parameters have the pretraining model's names and shapes (only
  `pos_embed`'s length follows the grid), so they are built abstractly here and always
  filled from a pretrained or fine-tuned model.
  """

  def __init__(self, config: ClassifierConfig, rngs: nnx.Rngs):
    dim = config.embed_dim
    self.config = config
    self.patch_embed = encoder.patch_embedding(config, rngs)
    self.cls_token = nnx.Param(jnp.zeros((1, 1, dim)))
    self.dist_token = nnx.Param(jnp.zeros((1, 1, dim)))
    self.pos_embed = nnx.Param(jnp.zeros((1, config.num_patches + NUM_LEADING_TOKENS, dim)))
    self.blocks = nnx.List([encoder.Block(config, rngs) for _ in range(config.depth)])
    self.norm = encoder.layer_norm(dim, config, rngs)
    self.mlp_head = ClassificationHead(config, rngs)

  def encode(self, x):
    """Final-norm token outputs `(B, N + 2, D)` of a normalised batch `(B, T, F)`."""
    c = self.config
    tokens = self.patch_embed(encoder.patchify(x, c.fshape, c.tshape, c.fstride, c.tstride))
    h = encoder.with_leading_tokens(tokens, self.cls_token, self.dist_token, self.pos_embed,
                                    c.compute_dtype)
    return encoder.run_encoder(self.blocks, self.norm, h, c)

  def __call__(self, x, pooling: str | None = None):
    """Logits `(B, num_labels)`, float32; `pooling` is one of POOLINGS (None: the
    config's)."""
    h = self.encode(x)
    if (pooling or self.config.pooling) == 'avgtok':
      clip = jnp.mean(h[:, NUM_LEADING_TOKENS:], axis=1)
    else:
      clip = jnp.mean(h[:, :NUM_LEADING_TOKENS], axis=1)
    return self.mlp_head(clip).astype(jnp.float32)


def abstract_classifier(config: ClassifierConfig):
  """(graphdef, abstract parameter state) of `config`, without allocating parameters."""
  return nnx.split(nnx.eval_shape(lambda: Classifier(config, nnx.Rngs(0))), nnx.Param)
