"""Discriminative (masked patch classification) pretraining only, 16x16 patches."""

from ssast_jax.config import defaults


def get_config():
  config = defaults.get_config()
  config.task = 'pretrain_mpc'
  return config
