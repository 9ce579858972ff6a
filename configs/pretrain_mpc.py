"""Discriminative (masked patch classification) pretraining only, 16x16 patches."""

from ssast_jax import config_defaults


def get_config():
  config = config_defaults.get_config()
  config.task = 'pretrain_mpc'
  return config
