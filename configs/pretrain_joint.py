"""Joint MPC + MPG pretraining, 16x16 patches: the users' run.py --task pretrain_joint.

python main.py --config=configs/pretrain_joint.py --workdir=EXP \
  --config.data.train_json=train.json --config.data.train_pt_dir=PT_TRAIN \
  --config.data.val_json=test.json --config.data.val_pt_dir=PT_VAL
"""

from ssast_jax.config import defaults


def get_config():
  return defaults.get_config()
