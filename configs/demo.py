"""A tiny model on the built-in demo set: a few minutes on 2 CPU cores.

python main.py --config=configs/demo.py --workdir=/tmp/ssast_demo

train.py generates the demo clips (about 256 frames x 128 mel bins) under
WORKDIR/demo_data, converts them and fills in the data paths; the normalisation statistics
come from the shard manifest.

Two settings differ from the original's recipe so that a 2-block model learns visibly in a
few hundred steps: frame (uniform) masking, which leaves every masked patch visible
neighbours, and `mpc_trains_encoder=True`. With the faithful settings the same model's
validation MPC accuracy only doubles in this time.
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

  config.mask_patch = 40
  config.eval_mask_patch = 40
  config.mask_mode = 'frame'
  config.mpc_trains_encoder = True
  config.batch_size = 16
  config.lr = 1e-3
  config.warmup = False  # the original's 1000-step warm-up is longer than the demo
  config.num_epochs = 28  # 22 steps an epoch at 16 clips a batch: 616 steps
  config.epoch_iter = 88  # 4 epochs; the last validation falls on the last step
  config.lr_patience = 2

  config.checkpoint_every_steps = 100
  config.keep_checkpoints = 2
  config.print_every_steps = 10
  return config
