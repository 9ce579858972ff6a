"""AudioSet balanced (20K) fine-tuning as the original's `src/finetune/audioset/run_as.sh`:
patch model, stride 10, 1024 frames, BCE loss and mAP, SpecAugment 48/192, mix-up 0.5, no
noise, lr 5e-5 for 25 epochs, halved every 5 epochs from epoch 10, batch 12.

The script passes `--warmup False` (its `warmup=True` variable is unused), so there is no
warm-up here either. The weights after epochs 6-25 are averaged and evaluated at the end
(`--wa`; wa_result.csv, wa_model.pth). The full set (`set=full`) uses lr 1e-5, 5 epochs and
balanced sampling.
"""

from configs import finetune


def get_config():
  config = finetune.get_config()
  config.data.mean = -4.2677393
  config.data.std = 4.5689974
  config.data.target_length = 1024
  config.fstride = 10
  config.tstride = 10
  config.loss = 'bce'
  config.metrics = 'mAP'
  config.batch_size = 12
  config.lr = 5e-5
  config.num_epochs = 25
  config.warmup = False
  config.lrscheduler_start = 10
  config.lrscheduler_step = 5
  config.lrscheduler_decay = 0.5
  config.freqm = 48
  config.timem = 192
  config.mixup = 0.5
  config.noise = False
  config.wa = True
  config.wa_start = 6
  config.wa_end = 25
  return config
