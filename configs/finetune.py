"""Fine-tuning a pretrained SSAST (the original's `run.py --task ft_avgtok`): patch model,
stride 10, BCE and mAP. Give `pretrained`, the data JSONs and .pt folders and
`data.label_csv` on the command line; the recipes below start from this config."""

from ssast_jax.config import finetune


def get_config():
  return finetune.default_config()
