"""The public entry points: model handles, encoding, pretext losses, PyTorch interchange
(fine-tuning: `ssast_jax.finetune`)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import nnx

from ssast_jax.interchange import pytorch as conversion
from ssast_jax.model import SSAST, ModelConfig, abstract_model
from ssast_jax.objective import losses


@dataclasses.dataclass
class ModelHandle:
  """A model: its `config`, the NNX `graphdef` and parameter `state`, and `extras` (the
  unused timm head tensors of an imported checkpoint, written back on export)."""
  config: ModelConfig
  graphdef: nnx.GraphDef
  state: nnx.State
  extras: dict = dataclasses.field(default_factory=dict)

  @property
  def params(self) -> dict:
    """Parameters as a nested dict of arrays (the layout `conversion` reads and writes)."""
    return nnx.to_pure_dict(self.state)

  @property
  def module(self) -> SSAST:
    return nnx.merge(self.graphdef, self.state)


def create_model(config: ModelConfig, seed: int = 0) -> ModelHandle:
  """A freshly initialised model (the original's initialisation, SPEC section 8)."""
  graphdef, state = nnx.split(SSAST(config, nnx.Rngs(seed)), nnx.Param)
  return ModelHandle(config, graphdef, state)


def handle_from_params(config: ModelConfig, params: dict, extras=None) -> ModelHandle:
  graphdef, state = abstract_model(config)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
  return ModelHandle(config, graphdef, state, dict(extras or {}))


def from_pytorch(path, fstride=None, tstride=None, input_tdim=None, input_fdim=None):
  """Reads an original SSAST checkpoint (`.pth`, float32 or float16, with or without the
  `module.` prefix) of either kind.

  A pretraining checkpoint gives a ModelHandle, its geometry inferred from the tensors. A
  fine-tuned one (the original's `ASTModel(pretrain_stage=False)`) gives a classifier
  handle; the file does not record the patch strides and the input length, so `fstride`,
  `tstride` and `input_tdim` (and `input_fdim` where it is not 128) must be given; a
  pretraining file takes none of them.
  """
  # Imported here: the fine-tuning modules build on this one.
  from ssast_jax.finetune import model as finetune
  from ssast_jax.interchange import finetuned
  config, params, extras = finetuned.read_any_checkpoint(path, fstride, tstride, input_tdim,
                                                         input_fdim)
  if isinstance(config, finetune.ClassifierConfig):
    return finetune.classifier_from_params(config, params, extras)
  return handle_from_params(config, params, extras)


def to_pytorch(model, path) -> None:
  """Writes `model` in exactly the original's layout, loadable by the original code: a
  ModelHandle as its pretraining checkpoint (SPEC section 9), a classifier as its
  fine-tuned model's `DataParallel` state dict."""
  # Imported here: the fine-tuning modules build on this one.
  from ssast_jax.finetune import model as finetune
  from ssast_jax.interchange import finetuned
  if isinstance(model, finetune.ClassifierHandle):
    finetuned.write_checkpoint(model.params, model.config, path, model.extras)
  else:
    conversion.write_checkpoint(model.params, model.config, path, model.extras)


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
