"""Fine-tuning: a classifier built from a pretrained SSAST as the original builds it."""

from ssast_jax.finetune.model import classify, embed, finetune_model, pretrained_from_workdir
from ssast_jax.handles import ClassifierHandle
from ssast_jax.model.classifier import POOLINGS, ClassifierConfig

__all__ = ['POOLINGS', 'ClassifierConfig', 'ClassifierHandle', 'classify', 'embed',
           'finetune_model', 'pretrained_from_workdir']
