"""ESC-50 fine-tuning as the original's `src/finetune/esc50/run_esc_patch.sh`: 512 frames,
CE loss and accuracy, SpecAugment 24/96, noise, no mix-up, lr 1e-4 without warm-up for 50
epochs, decayed by 0.85 after every epoch from epoch 6, batch 48.

ESC-50 is evaluated by 5-fold cross-validation: run once per fold (train and val JSON of
fold k, one --workdir each) and average the folds' final accuracies, as `get_esc_result.py`
does. For the frame model (SSAST-Base-Frame-400, `run_esc_frame.sh`) add
--config.fstride=128 --config.tstride=1.
"""

from configs import finetune


def get_config():
  config = finetune.get_config()
  config.data.mean = -6.6268077
  config.data.std = 5.358466
  config.data.target_length = 512
  config.loss = 'ce'
  config.metrics = 'acc'
  config.batch_size = 48
  config.lr = 1e-4
  config.num_epochs = 50
  config.warmup = False
  config.lrscheduler_start = 6
  config.lrscheduler_step = 1
  config.lrscheduler_decay = 0.85
  config.freqm = 24
  config.timem = 96
  config.noise = True
  return config
