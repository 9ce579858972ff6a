"""Speech Commands V2 (35 classes) fine-tuning as the original's
`src/finetune/speechcommands_v2_35/run_sc.sh`: the frame model (SSAST-Base-Frame-400,
128 x 2 patches, strides 128 x 1) on 128 frames, BCE loss and accuracy, SpecAugment
48/48, mix-up 0.6, noise, lr 2.5e-4 with warm-up for 30 epochs, decayed by 0.85 after every
epoch from epoch 5, batch 128.

The original also evaluates the best model on the test split (`--data-eval`); run that
evaluation separately on the best checkpoint.
"""

from configs import finetune


def get_config():
  config = finetune.get_config()
  config.data.mean = -6.845978
  config.data.std = 5.5654526
  config.data.target_length = 128
  config.fstride = 128
  config.tstride = 1
  config.loss = 'bce'
  config.metrics = 'acc'
  config.batch_size = 128
  config.lr = 2.5e-4
  config.num_epochs = 30
  config.warmup = True
  config.lrscheduler_start = 5
  config.lrscheduler_step = 1
  config.lrscheduler_decay = 0.85
  config.freqm = 48
  config.timem = 48
  config.mixup = 0.6
  config.noise = True
  return config
