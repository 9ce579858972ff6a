"""ssast-jax: SSAST (Self-Supervised Audio Spectrogram Transformer) in JAX/Flax.

The public names are imported on first use, so that `python -m ssast_jax.data.*` tools and
their worker processes start without loading JAX.
"""

import importlib

_PUBLIC = {
    'CheckpointError': 'ssast_jax.interchange.pytorch',
    'ClassifierHandle': 'ssast_jax.handles',
    'ModelConfig': 'ssast_jax.model',
    'ModelHandle': 'ssast_jax.handles',
    'classify': 'ssast_jax.finetune',
    'create_model': 'ssast_jax.api',
    'embed': 'ssast_jax.finetune',
    'encode': 'ssast_jax.api',
    'finetune_model': 'ssast_jax.finetune',
    'from_pytorch': 'ssast_jax.api',
    'from_transformers': 'ssast_jax.api',
    'load': 'ssast_jax.api',
    'pretext_losses': 'ssast_jax.api',
    'to_pytorch': 'ssast_jax.api',
    'to_transformers': 'ssast_jax.api',
}

__all__ = sorted(_PUBLIC) + ['masking']


def __getattr__(name):
  if name == 'masking':
    return importlib.import_module('ssast_jax.objective.masking')
  if name in _PUBLIC:
    return getattr(importlib.import_module(_PUBLIC[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
