"""ssast-jax: SSAST (Self-Supervised Audio Spectrogram Transformer) in JAX/Flax."""

from ssast_jax import masking
from ssast_jax.api import (ModelHandle, create_model, encode, from_pytorch, pretext_losses,
                           to_pytorch)
from ssast_jax.conversion import CheckpointError
from ssast_jax.model import ModelConfig

__all__ = ['CheckpointError', 'ModelConfig', 'ModelHandle', 'create_model', 'encode',
           'from_pytorch', 'masking', 'pretext_losses', 'to_pytorch']
