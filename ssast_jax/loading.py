"""One loader for every model a user holds: `load(PATH)` gives the right handle.

- a training workdir of this project (pretraining or fine-tuning): its best checkpoint
  by default, geometry, pooling, labels and normalisation read from the run;
- an original SSAST `.pth` (pretraining, or fine-tuned with the strides and input length
  that such a file does not record);
- a transformers AST folder or Hub snapshot (`config.json` of model type
  `audio-spectrogram-transformer`), with its own geometry and epsilons.
"""

from __future__ import annotations

import os

from ssast_jax.handles import ClassifierHandle, ModelHandle, from_params, handle_from_params
from ssast_jax.interchange import finetuned, huggingface, workdir
from ssast_jax.interchange.pytorch import CheckpointError
from ssast_jax.model import SSAST


def from_pytorch(path, fstride=None, tstride=None, input_tdim=None, input_fdim=None):
  """Reads an original SSAST checkpoint (`.pth`, float32 or float16, with or without the
  `module.` prefix) of either kind.

  A pretraining checkpoint gives a ModelHandle, its geometry inferred from the tensors. A
  fine-tuned one (the original's `ASTModel(pretrain_stage=False)`) gives a classifier
  handle; the file does not record the patch strides and the input length, so `fstride`,
  `tstride` and `input_tdim` (and `input_fdim` where it is not 128) must be given; a
  pretraining file takes none of them.
  """
  config, params, extras = finetuned.read_any_checkpoint(path, fstride, tstride, input_tdim,
                                                         input_fdim)
  return from_params(config, params, extras, {'source': os.path.abspath(path)})


def from_transformers(path, seed: int = 0):
  """Reads a transformers AST folder: an `ASTForAudioClassification` checkpoint gives a
  classifier (pooling 'cls', the checkpoint's epsilon for every LayerNorm, labels from
  `id2label`), an `ASTModel` one a ModelHandle. An encoder that this project did not export
  has no pretext heads or mask embedding: they are initialised from `seed` as a fresh
  model's (continued pretraining starts them from scratch)."""
  config, params, info = huggingface.read(path)
  if not info.pop('pretext_from_file', True):  # an encoder without our pretext file
    from flax import nnx  # pylint: disable=import-outside-toplevel
    fresh = nnx.to_pure_dict(nnx.state(SSAST(config, nnx.Rngs(seed)), nnx.Param))
    params.update({k: fresh[k] for k in huggingface.PRETEXT_PARAMS})
    return handle_from_params(config, params, info=info)
  return from_params(config, params, info=info)


def load(path, which: str | int = 'best', *, fstride=None, tstride=None, input_tdim=None,
         input_fdim=None):
  """The handle of `path` (a ModelHandle or a ClassifierHandle; a handle is returned as
  it is). `which` picks a training run's checkpoint: 'best' (by its validation metric;
  the latest where none has one), 'latest' or a step number. The geometry keywords are
  for original fine-tuned `.pth` files only."""
  if isinstance(path, (ModelHandle, ClassifierHandle)):
    return path
  path = os.fspath(path)
  if os.path.isdir(path):
    if huggingface.is_transformers_dir(path):
      return from_transformers(path)
    if workdir.is_run(path):
      return workdir.read_run(path, which)
    raise CheckpointError(f'{path}: neither a training workdir (config.json and '
                          f'checkpoints/) nor a transformers AST folder (config.json of '
                          f'model_type {huggingface.MODEL_TYPE!r})')
  if not os.path.exists(path):
    raise CheckpointError(f'{path}: no such file or folder')
  return from_pytorch(path, fstride, tstride, input_tdim, input_fdim)
