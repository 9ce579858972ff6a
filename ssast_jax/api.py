"""The public entry points: loading any model (`load`), creating one, encoding, pretext
losses, and exports to the original PyTorch code and to transformers (fine-tuning:
`ssast_jax.finetune`). Nothing in the library imports this module."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from flax import nnx

from ssast_jax.handles import ClassifierHandle, ModelHandle, handle_from_params
from ssast_jax.interchange import finetuned, huggingface, model_card
from ssast_jax.interchange import pytorch as conversion
from ssast_jax.loading import from_pytorch, from_transformers, load
from ssast_jax.model import SSAST, ModelConfig
from ssast_jax.model.classifier import ClassifierConfig
from ssast_jax.objective import losses

__all__ = ['ModelHandle', 'create_model', 'encode', 'from_pytorch', 'from_transformers',
           'handle_from_params', 'load', 'pretext_losses', 'to_pytorch', 'to_transformers']

# The normalisation written for a model whose source recorded none: AudioSet's, the
# original's fine-tuning default.
DEFAULT_MEAN, DEFAULT_STD = -4.2677393, 4.5689974


def create_model(config: ModelConfig, seed: int = 0) -> ModelHandle:
  """A freshly initialised model (the original's initialisation, SPEC section 8)."""
  graphdef, state = nnx.split(SSAST(config, nnx.Rngs(seed)), nnx.Param)
  return ModelHandle(config, graphdef, state)


def to_pytorch(model, path) -> None:
  """Writes `model` in exactly the original's layout, loadable by the original code: a
  ModelHandle as its pretraining checkpoint (SPEC section 9), a classifier as its
  fine-tuned model's `DataParallel` state dict."""
  if isinstance(model, ClassifierHandle):
    finetuned.write_checkpoint(model.params, model.config, path, model.extras)
  else:
    conversion.write_checkpoint(model.params, model.config, path, model.extras)


def to_transformers(model, out, *, labels=None, mean=None, std=None) -> None:
  """Writes `model` (a handle or anything `load` reads) as a transformers AST folder `out`:
  config.json, model.safetensors, preprocessor_config.json for `ASTFeatureExtractor` and a
  README.md model card (`ssast_jax.interchange.huggingface` says which file holds what).
  `labels` (display names in index order), `mean` and `std` default to what the source
  recorded (a fine-tuning run records all three), else LABEL_k and AudioSet's statistics.
  Refuses, in one line, models transformers cannot hold (non-square patches)."""
  model = load(model)
  info = model.info
  labels = labels if labels is not None else info.get('labels')
  mean = next(v for v in (mean, info.get('mean'), DEFAULT_MEAN) if v is not None)
  std = next(v for v in (std, info.get('std'), DEFAULT_STD) if v is not None)
  huggingface.exportable(model.config)
  if isinstance(model.config, ClassifierConfig) and not labels:
    labels = [f'LABEL_{k}' for k in range(model.config.num_labels)]
  card = model_card.model_card(model.config, info, labels, mean, std, os.fspath(out))
  huggingface.write_directory(out, model.config, model.params, labels, mean, std, card)


@functools.partial(jax.jit, static_argnums=0)
def _encode(graphdef, state, x, mask):
  return nnx.merge(graphdef, state).encode(x, mask)


def encode(model: ModelHandle, x, mask=None) -> jax.Array:
  """Final-norm outputs `(B, N + 2, D)` of a normalised batch `x` `(B, T, F)`; `mask` is
  `(B, M)` patch indices or None."""
  mask = None if mask is None else jnp.asarray(mask, jnp.int32)
  return _encode(model.graphdef, model.state, jnp.asarray(x, jnp.float32), mask)


@functools.partial(jax.jit, static_argnums=0, static_argnames=('task', 'paper_infonce'))
def _pretext_losses(graphdef, state, x, mpc_mask, mpg_mask, task, paper_infonce):
  return losses.pretext_losses(nnx.merge(graphdef, state), x, mpc_mask, mpg_mask, task=task,
                               paper_infonce=paper_infonce)


def pretext_losses(model: ModelHandle, x, mpc_mask, mpg_mask, *, task='pretrain_joint',
                   paper_infonce=False) -> dict:
  """`mpc_acc`, `mpc_loss`, `mpg_loss` and `loss` (= mpc + 10 * mpg for the joint task)
  as Python floats, with the two masks given `(B, M)`."""
  out = _pretext_losses(model.graphdef, model.state, jnp.asarray(x, jnp.float32),
                        jnp.asarray(mpc_mask, jnp.int32), jnp.asarray(mpg_mask, jnp.int32),
                        task=task, paper_infonce=paper_infonce)
  return {k: float(v) for k, v in out.items()}
