"""Fine-tunes the demo's pretrained model on the demo set's labels: minutes on 2 CPU cores.

python main.py --config=configs/demo.py --workdir=/tmp/ssast_demo
python main.py --config=configs/demo_finetune.py --workdir=/tmp/ssast_demo_ft \
    --config.pretrained=/tmp/ssast_demo

The demo clips (WORKDIR/demo_data, the same generator and seed as the pretraining demo)
carry multi-label sound-type labels; the normalisation statistics come from the shard
manifest. Everything not set here is configs/finetune.py (the original's ft_avgtok, BCE and
mAP). What differs, and why: 256-frame inputs (the demo model's geometry) at stride 16 (no
patch overlap: a quarter of stride 10's tokens, the speed a CPU demo needs), batch 16, lr
1e-4 without the original's 1000-step warm-up (longer than the whole run), and 8 epochs.
"""

from ssast_jax.config import finetune


def get_config():
  config = finetune.default_config()
  config.data.demo = True
  config.data.mean = None
  config.data.std = None
  config.data.target_length = 256
  config.fstride = 16
  config.tstride = 16
  config.batch_size = 16
  config.lr = 1e-4
  config.warmup = False
  config.num_epochs = 8
  config.print_every_steps = 10
  return config
