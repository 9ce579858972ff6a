"""Classifiers fine-tuned from a pretrained SSAST, built as the original builds them, and
what users do with them: classify, embed.

The model itself (encoder on the fine-tuning grid plus the original's head) is
`ssast_jax.model.classifier`; its handles are `ssast_jax.handles`; this module builds one
from any pretrained source `ssast_jax.loading.load` reads.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssast_jax import loading
from ssast_jax.finetune import pos_embed as pos_embedding
from ssast_jax.handles import ClassifierHandle, ModelHandle, classifier_from_params
from ssast_jax.model import NUM_LEADING_TOKENS, ModelConfig
from ssast_jax.model.classifier import (HEAD_LAYER_NORM_EPSILON, POOLINGS, ClassificationHead,
                                        ClassifierConfig)

PRETEXT_PARAMS = ('mask_embed', 'cpred', 'gpred')  # pretraining-only, dropped on fine-tuning
HEAD_PARAMS = ('mlp_head',)  # a classifier source's head, replaced by a fresh one


def pretrained_from_workdir(workdir) -> ModelHandle:
  """The pretraining model of the newest checkpoint of a training run's `workdir`."""
  handle = loading.load(workdir, which='latest')
  if not isinstance(handle, ModelHandle):
    raise TypeError(f'{workdir}: a fine-tuning run, not a pretraining one')
  return handle


def _source_handle(pretrained):
  """The handle of `pretrained`: a handle, or a path `loading.load` reads (a training
  run's newest checkpoint)."""
  if isinstance(pretrained, (ModelHandle, ClassifierHandle)):
    return pretrained
  if isinstance(pretrained, (str, os.PathLike)):
    return loading.load(pretrained, which='latest')
  raise TypeError(f'finetune_model: pretrained must be a model handle, a .pth path, a '
                  f'training workdir or a transformers AST folder, not '
                  f'{type(pretrained).__name__}')


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
                   fix_pos_embed_crop: bool = False, pooling: str = 'avgtok') -> ClassifierHandle:
  """A classifier built from a pretrained model exactly as the original fine-tuning code
  builds it (SPEC section 10).

  `pretrained`: a handle, or what `ssast_jax.load` reads (an original or exported `.pth`,
  a training workdir: its newest checkpoint, a transformers AST folder or Hub snapshot).
  The patch shape is the pretrained one; the patch embedding's weights carry over to the
  new strides; the positional embedding is adapted from the source's grid to the new one
  (`pos_embed.adapt_pos_embed`, whose frequency crop reproduces the original's slice unless
  `fix_pos_embed_crop`); the head is freshly initialised from `seed`, its LayerNorm epsilon
  the original's 1e-5 (a classifier source's own, for one imported from transformers). A
  pretraining model's pretext heads and mask embedding, or a classifier's head, are
  dropped. `pooling` is the one `classify` uses: 'avgtok' (`ft_avgtok`) or 'cls'.
  """
  source = _source_handle(pretrained)
  if pooling not in POOLINGS:
    raise ValueError(f'finetune_model: unknown pooling {pooling!r}; expected one of {POOLINGS}')
  fields = {f.name: getattr(source.config, f.name) for f in dataclasses.fields(ModelConfig)}
  fields.update(fstride=fstride, tstride=tstride, input_fdim=input_fdim,
                input_tdim=input_tdim, num_labels=num_labels, pooling=pooling,
                head_layer_norm_epsilon=getattr(source.config, 'head_layer_norm_epsilon',
                                                HEAD_LAYER_NORM_EPSILON))
  config = ClassifierConfig(**fields)
  _check_geometry(config)
  params = {k: v for k, v in source.params.items() if k not in PRETEXT_PARAMS + HEAD_PARAMS}
  params['pos_embed'] = pos_embedding.adapt_pos_embed(
      np.asarray(params['pos_embed'], np.float32), source.config.patch_grid,
      config.patch_grid, fix_crop=fix_pos_embed_crop)
  params['mlp_head'] = nnx.to_pure_dict(
      nnx.state(ClassificationHead(config, nnx.Rngs(seed)), nnx.Param))
  return classifier_from_params(config, params, source.extras,
                                {k: v for k, v in source.info.items() if k == 'source'})


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


def classify(model: ClassifierHandle, x, pooling: str | None = None) -> jax.Array:
  """Logits `(B, num_labels)` of a normalised batch `x` `(B, input_tdim, input_fdim)`;
  `pooling` 'avgtok' (mean of the patch tokens, the original's `ft_avgtok`), 'cls' (mean
  of the two leading tokens, `ft_cls`) or None: the model's own (`config.pooling`)."""
  if not isinstance(model, ClassifierHandle):
    raise TypeError(f'classify: model must be a classifier (see finetune_model), not '
                    f'{type(model).__name__}')
  if pooling not in POOLINGS + (None,):
    raise ValueError(f'classify: unknown pooling {pooling!r}; expected one of {POOLINGS}')
  pooling = pooling or model.config.pooling
  x = _checked_batch(model.config, x, 'classify')
  return _classify(model.graphdef, model.state, x, pooling)


def patch_tokens(module, x) -> jax.Array:
  """Final-norm outputs `(B, N, D)` float32 of the patch tokens of an encoder `module`
  (pretraining or classifier) on a normalised batch: what `embed` returns and pools."""
  return module.encode(x)[:, NUM_LEADING_TOKENS:].astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _patch_tokens(graphdef, state, x):
  return patch_tokens(nnx.merge(graphdef, state), x)


def embed(model: ModelHandle | ClassifierHandle, x) -> dict:
  """Frozen features of a pretraining model or a classifier: `tokens` `(B, N, D)`, the
  final-norm outputs of the patch tokens (the two leading tokens left out), and `clip`
  `(B, D)`, their mean (the representation `avgtok` pooling feeds the head)."""
  if not isinstance(model, (ModelHandle, ClassifierHandle)):
    raise TypeError(f'embed: model must be a ModelHandle or a classifier, not '
                    f'{type(model).__name__}')
  tokens = _patch_tokens(model.graphdef, model.state, _checked_batch(model.config, x, 'embed'))
  return {'tokens': tokens, 'clip': jnp.mean(tokens, axis=1)}
