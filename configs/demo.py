"""A tiny model on the built-in demo set: a few minutes on 2 CPU cores.

python main.py --config=configs/demo.py --workdir=/tmp/ssast_demo

train.py generates the demo clips (about 256 frames x 128 mel bins) under
WORKDIR/demo_data, converts them and fills in the data paths; the normalisation statistics
come from the shard manifest.
"""

from ssast_jax import config_defaults


def get_config():
  config = config_defaults.get_config()
  config.data.demo = True
  config.data.mean = None
  config.data.std = None
  config.data.target_length = 256  # 8 x 16 patches of 16 x 16

  config.model.size = 'tiny'
  config.model.depth = 2

  # 100 of 128 patches: the original's masked fraction (400 of 512).
  config.mask_patch = 100
  config.eval_mask_patch = 100
  config.batch_size = 16
  config.lr = 3e-4
  config.warmup = False  # the original's 1000-step warm-up is longer than the demo
  config.num_epochs = 25  # ~22 steps an epoch at 16 clips a batch: ~550 steps
  config.epoch_iter = 100
  config.lr_patience = 2

  config.checkpoint_every_steps = 100
  config.keep_checkpoints = 2
  config.print_every_steps = 10
  return config
