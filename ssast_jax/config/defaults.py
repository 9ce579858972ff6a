"""Default pretraining config: the users' `run.py --task pretrain_joint` command.

The files under configs/ start from `get_config()` and change what differs, so every
default lives here once. docs/configuration.md maps each `run.py` flag to its key and describes
every key; `settings.resolve` validates them.
"""

import ml_collections
from ml_collections import config_dict

from ssast_jax.config import probing


def get_config() -> ml_collections.ConfigDict:
  """SSAST-Base-Patch-400 joint pretraining with the seed run's data statistics."""
  config = ml_collections.ConfigDict()

  config.data = ml_collections.ConfigDict()
  config.data.demo = False  # True: generate the built-in demo set under WORKDIR/demo_data
  # The original's inputs: JSON manifests {"data": [{"wav": ...}, ...]} and .pt folders,
  # converted to shards on first use ...
  config.data.train_json = ''
  config.data.train_pt_dir = ''
  config.data.val_json = ''
  config.data.val_pt_dir = ''
  config.data.label_csv = ''  # accepted for run.py parity; pretraining uses no labels
  # True: the JSON `wav` fields are audio files (wav, flac), their fbank computed as the
  # original's dataloader does, instead of reading .pt folders; relative paths are taken
  # from data.audio_root (or each JSON's folder when empty).
  config.data.train_audio = False
  config.data.audio_root = ''
  # ... or shards converted earlier: SHARDS_DIR/train and SHARDS_DIR/val.
  config.data.shards_dir = ''
  config.data.shard_dtype = 'float16'
  # Normalisation (fbank - mean) / (2 * std); None takes the value from the shard manifest.
  config.data.mean = config_dict.FieldReference(-7.4482, field_type=float)
  config.data.std = config_dict.FieldReference(2.4689, field_type=float)
  config.data.target_length = 1024
  config.data.num_mel_bins = 128
  config.data.random_crop = False
  # Grain worker processes; 0 loads in the training process, which keeps up because JAX
  # dispatches steps asynchronously and a batch is only a few MB read from the shards.
  config.data.workers = 0

  config.model = ml_collections.ConfigDict()
  config.model.size = 'base'
  config.model.depth = config_dict.placeholder(int)  # None: the size's 12 blocks
  config.model.fshape = 16
  config.model.tshape = 16
  config.model.fstride = 16
  config.model.tstride = 16

  config.task = 'pretrain_joint'
  config.mask_patch = 400
  config.mask_mode = ''  # '': frame masking when num_mel_bins == fshape, else cluster
  config.cluster_factor = 3
  config.eval_mask_patch = 400
  config.paper_infonce = False
  config.joint_passes = 2

  config.batch_size = 12  # global, over all devices and processes
  config.lr = 1e-4
  config.num_epochs = 20
  config.epoch_iter = 2000
  config.lr_patience = 1
  config.warmup = True
  config.max_steps = config_dict.placeholder(int)

  config.checkpoint_every_steps = 1000
  # Also save when this long has passed since the last checkpoint, so that a fault loses at
  # most this much work (docs/training.md, "Faults").
  config.checkpoint_every_minutes = 30.0
  config.keep_checkpoints = 3
  config.print_every_steps = 50
  # At each validation, draw one validation clip's mask, reconstruction and MPC hits to
  # TensorBoard (`val/clip`; single-process runs).
  config.eval_picture = True
  # A linear probe of the frozen encoder on labelled clips, logged as probe/acc and
  # probe/map at step 0, every probe_every steps (0: at each validation) and at the end;
  # off while probe.train_json is empty (config/probing.py, docs/training.md).
  config.probe = probing.default_config()
  config.probe_every = 0
  config.seed = 0
  config.nan_policy = 'stop'

  # Speed and scale; none of these changes what a step computes beyond float rounding,
  # except dtype.
  # Compute dtype, 'float32' or 'bfloat16'; parameters and optimiser state stay float32,
  # softmax, LayerNorm statistics and the losses are computed in float32.
  config.dtype = 'float32'
  # Recompute each encoder block's activations in the backward pass (less memory, more
  # FLOPs); remat_policy: what may still be kept, see model.encoder.REMAT_POLICIES.
  config.remat = False
  config.remat_policy = 'nothing_saveable'
  # Devices sharing one copy of the parameters and optimiser state (the mesh's 'fsdp'
  # axis); the 'data' axis is device_count // fsdp. 1: pure data parallelism.
  config.fsdp = 1
  # Micro-batches per step: batch_size clips are processed batch_size / grad_accum_steps
  # at a time and make one optimiser update.
  config.grad_accum_steps = 1
  # 'FIRST,LAST' (or 'STEP'): write a jax.profiler trace of those training steps (as
  # numbered in the logs) to WORKDIR/profile. '': no trace.
  config.profile_steps = ''
  return config
