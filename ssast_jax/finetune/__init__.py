"""Fine-tuning: a classifier built from a pretrained SSAST as the original builds it."""

from ssast_jax.finetune.model import (POOLINGS, ClassifierConfig, ClassifierHandle, classify,
                                      embed, finetune_model, pretrained_from_workdir)

__all__ = ['POOLINGS', 'ClassifierConfig', 'ClassifierHandle', 'classify', 'embed',
           'finetune_model', 'pretrained_from_workdir']
