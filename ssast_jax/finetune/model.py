"""A classifier fine-tuned from a pretrained SSAST, as the original's fine-tuning model.

The original `ASTModel(pretrain_stage=False)` (SPEC section 10) keeps the pretrained
encoder, lets the patch strides and the input length change (the patch shape may not),
adapts the positional embedding to the new patch grid, and adds a head
`LayerNorm(D, eps=1e-5) -> Linear(D, K)` on a pooled clip representation: the mean of the
final-norm patch tokens (`ft_avgtok`, SSAST's default) or of the two leading tokens
(`ft_cls`). The encoder's blocks, patch embedding and token layout are the pretraining
model's own (`ssast_jax.model.encoder`); only the head and the pooling are new here.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssast_jax import api, export
from ssast_jax.finetune import pos_embed as pos_embedding
from ssast_jax.model import NUM_LEADING_TOKENS, ModelConfig, abstract_model
from ssast_jax.model import encoder

POOLINGS = ('avgtok', 'cls')
HEAD_LAYER_NORM_EPSILON = 1e-5  # torch.nn.LayerNorm's default; the encoder uses 1e-6
PRETEXT_PARAMS = ('mask_embed', 'cpred', 'gpred')  # pretraining-only, dropped on fine-tuning


@dataclasses.dataclass(frozen=True, kw_only=True)
class ClassifierConfig(ModelConfig):
  """A classifier's geometry: the pretrained encoder's size and patch shape, the
  fine-tuning `fstride`, `tstride`, `input_fdim`, `input_tdim` (so `patch_grid` is the
  fine-tuning grid, which may overlap), and the number of output labels."""
  num_labels: int


class ClassificationHead(nnx.Module):
  """The original's `mlp_head`: LayerNorm (epsilon 1e-5, scale 1, bias 0) then a Linear
  layer with PyTorch's default init (kaiming-uniform weight, i.e. U(+-1/sqrt(D)), and the
  same bound for the bias)."""

  def __init__(self, config: ClassifierConfig, rngs: nnx.Rngs):
    dim = config.embed_dim
    init = encoder.torch_default_uniform(dim)
    self.norm = nnx.LayerNorm(dim, epsilon=HEAD_LAYER_NORM_EPSILON,
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

  def __call__(self, x, pooling: str = 'avgtok'):
    """Logits `(B, num_labels)`, float32; `pooling` is one of POOLINGS."""
    h = self.encode(x)
    if pooling == 'avgtok':
      clip = jnp.mean(h[:, NUM_LEADING_TOKENS:], axis=1)
    else:
      clip = jnp.mean(h[:, :NUM_LEADING_TOKENS], axis=1)
    return self.mlp_head(clip).astype(jnp.float32)


@dataclasses.dataclass
class ClassifierHandle:
  """A classifier: its `config`, the NNX `graphdef` and parameter `state`, and `extras`
  (timm's unused `v.head*` tensors of the source checkpoint, written back on export)."""
  config: ClassifierConfig
  graphdef: nnx.GraphDef
  state: nnx.State
  extras: dict = dataclasses.field(default_factory=dict)

  @property
  def params(self) -> dict:
    """Parameters as a nested dict of arrays (the layout the interchange reads, writes)."""
    return nnx.to_pure_dict(self.state)

  @property
  def module(self) -> Classifier:
    return nnx.merge(self.graphdef, self.state)


def abstract_classifier(config: ClassifierConfig):
  """(graphdef, abstract parameter state) of `config`, without allocating parameters."""
  return nnx.split(nnx.eval_shape(lambda: Classifier(config, nnx.Rngs(0))), nnx.Param)


def classifier_from_params(config: ClassifierConfig, params: dict,
                           extras=None) -> ClassifierHandle:
  """A handle holding `params` (nested dict in the layout of `ClassifierHandle.params`)."""
  graphdef, state = abstract_classifier(config)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return ClassifierHandle(config, graphdef, state, dict(extras or {}))


def pretrained_from_workdir(workdir) -> api.ModelHandle:
  """The pretraining model of the newest checkpoint of a training run's `workdir`."""
  settings, _, params = export.workdir_params(workdir, 'latest')
  return api.ModelHandle(settings.model, abstract_model(settings.model)[0], params)


def _pretrained_handle(pretrained) -> api.ModelHandle:
  if isinstance(pretrained, api.ModelHandle):
    return pretrained
  if isinstance(pretrained, ClassifierHandle):
    raise TypeError('finetune_model: pretrained is already a classifier; pass the '
                    'pretraining model (a ModelHandle, a .pth file or a training workdir)')
  if isinstance(pretrained, (str, os.PathLike)):
    if os.path.isdir(pretrained):
      return pretrained_from_workdir(pretrained)
    return api.from_pytorch(pretrained)
  raise TypeError(f'finetune_model: pretrained must be a ModelHandle, a .pth path or a '
                  f'training workdir, not {type(pretrained).__name__}')


def _check_geometry(config: ClassifierConfig) -> None:
  if config.num_labels < 1:
    raise ValueError(f'finetune_model: num_labels is {config.num_labels}; need at least 1')
  for stride in ('fstride', 'tstride'):
    if getattr(config, stride) < 1:
      raise ValueError(f'finetune_model: {stride} is {getattr(config, stride)}; need >= 1')
  for shape, size in (('fshape', 'input_fdim'), ('tshape', 'input_tdim')):
    if getattr(config, shape) > getattr(config, size):
      raise ValueError(f'finetune_model: {size}={getattr(config, size)} is smaller than the '
                       f'pretrained patch {shape}={getattr(config, shape)}')


def finetune_model(pretrained, *, num_labels: int, fstride: int, tstride: int,
                   input_tdim: int, input_fdim: int = 128, seed: int = 0,
                   fix_pos_embed_crop: bool = False) -> ClassifierHandle:
  """A classifier built from a pretraining model exactly as the original fine-tuning code
  builds it (SPEC section 10).

  `pretrained`: a ModelHandle, an original (or exported) pretraining `.pth`, or a training
  workdir (its newest checkpoint). The patch shape is the pretrained one; the patch
  embedding's weights carry over to the new strides; the positional embedding is adapted
  to the new grid (`pos_embed.adapt_pos_embed`, whose frequency crop reproduces the
  original's slice unless `fix_pos_embed_crop`); the head is freshly initialised from
  `seed`. The pretext heads and the mask embedding are dropped.
  """
  source = _pretrained_handle(pretrained)
  fields = {f.name: getattr(source.config, f.name) for f in dataclasses.fields(ModelConfig)}
  fields.update(fstride=fstride, tstride=tstride, input_fdim=input_fdim,
                input_tdim=input_tdim, num_labels=num_labels)
  config = ClassifierConfig(**fields)
  _check_geometry(config)
  params = {k: v for k, v in source.params.items() if k not in PRETEXT_PARAMS}
  params['pos_embed'] = pos_embedding.adapt_pos_embed(
      np.asarray(params['pos_embed'], np.float32), source.config.patch_grid,
      config.patch_grid, fix_crop=fix_pos_embed_crop)
  params['mlp_head'] = nnx.to_pure_dict(
      nnx.state(ClassificationHead(config, nnx.Rngs(seed)), nnx.Param))
  return classifier_from_params(config, params, source.extras)


def _checked_batch(config: ModelConfig, x, caller: str) -> jax.Array:
  """`x` as float32 after checking it is `(B, input_tdim, input_fdim)`: the positional
  embedding fixes the patch count, so the model takes only that input size."""
  x = jnp.asarray(x, jnp.float32)
  expected = (config.input_tdim, config.input_fdim)
  if x.ndim != 3 or tuple(x.shape[1:]) != expected:
    raise ValueError(f'{caller}: x has shape {tuple(x.shape)}, expected (B, {expected[0]}, '
                     f'{expected[1]}): the model takes input_tdim={expected[0]} frames of '
                     f'input_fdim={expected[1]} mel bins')
  return x


@functools.partial(jax.jit, static_argnums=(0, 3))
def _classify(graphdef, state, x, pooling):
  return nnx.merge(graphdef, state)(x, pooling)


def classify(model: ClassifierHandle, x, pooling: str = 'avgtok') -> jax.Array:
  """Logits `(B, num_labels)` of a normalised batch `x` `(B, input_tdim, input_fdim)`;
  `pooling` 'avgtok' (mean of the patch tokens, the original's `ft_avgtok`) or 'cls' (mean
  of the two leading tokens, `ft_cls`)."""
  if not isinstance(model, ClassifierHandle):
    raise TypeError(f'classify: model must be a classifier (see finetune_model), not '
                    f'{type(model).__name__}')
  if pooling not in POOLINGS:
    raise ValueError(f'classify: unknown pooling {pooling!r}; expected one of {POOLINGS}')
  x = _checked_batch(model.config, x, 'classify')
  return _classify(model.graphdef, model.state, x, pooling)


def patch_tokens(module, x) -> jax.Array:
  """Final-norm outputs `(B, N, D)` float32 of the patch tokens of an encoder `module`
  (pretraining or classifier) on a normalised batch: what `embed` returns and pools."""
  return module.encode(x)[:, NUM_LEADING_TOKENS:].astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _patch_tokens(graphdef, state, x):
  return patch_tokens(nnx.merge(graphdef, state), x)


def embed(model: api.ModelHandle | ClassifierHandle, x) -> dict:
  """Frozen features of a pretraining model or a classifier: `tokens` `(B, N, D)`, the
  final-norm outputs of the patch tokens (the two leading tokens left out), and `clip`
  `(B, D)`, their mean (the representation `avgtok` pooling feeds the head)."""
  if not isinstance(model, (api.ModelHandle, ClassifierHandle)):
    raise TypeError(f'embed: model must be a ModelHandle or a classifier, not '
                    f'{type(model).__name__}')
  tokens = _patch_tokens(model.graphdef, model.state, _checked_batch(model.config, x, 'embed'))
  return {'tokens': tokens, 'clip': jnp.mean(tokens, axis=1)}
