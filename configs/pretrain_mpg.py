"""Generative (masked patch reconstruction) pretraining only, 16x16 patches.

The learning rate halves when the validation MSE stops improving; the best checkpoint is
the one with the lowest validation MSE.
"""

from ssast_jax.config import defaults


def get_config():
  config = defaults.get_config()
  config.task = 'pretrain_mpg'
  return config
