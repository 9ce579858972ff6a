"""Joint pretraining of a frame model (SSAST-Base-Frame-400): 128x2 patches, frame masking.

Each patch spans all 128 mel bins and 2 frames, so a 1024-frame clip has 1 x 512 patches
and masking draws 400 of them uniformly without replacement.
"""

from ssast_jax.config import defaults


def get_config():
  config = defaults.get_config()
  config.model.fshape = config.model.fstride = 128
  config.model.tshape = config.model.tstride = 2
  config.mask_mode = 'frame'
  return config
