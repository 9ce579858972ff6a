"""The SSAST model: a DeiT-style ViT encoder over spectrogram patches and two pretext heads."""

from ssast_jax.model.encoder import (MODEL_SIZES, NUM_LEADING_TOKENS, REMAT_POLICIES, SSAST,
                                     ModelConfig, abstract_model, patch_count, patchify)

__all__ = ['MODEL_SIZES', 'NUM_LEADING_TOKENS', 'REMAT_POLICIES', 'SSAST', 'ModelConfig',
           'abstract_model', 'patch_count', 'patchify']
