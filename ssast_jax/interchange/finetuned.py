"""The original's fine-tuned checkpoint layout, both ways, and reading either layout.

`torch.nn.DataParallel(ASTModel(pretrain_stage=False)).state_dict()` holds the encoder
(`module.v.*`, with the adapted `pos_embed` and timm's unused `v.head*`), then
`module.mlp_head.0` (LayerNorm) and `module.mlp_head.1` (Linear); no `p_input_*`, mask
embedding or pretext heads. It does not record the patch strides or the input length,
so reading it needs them. The encoder tensors map as in the pretraining layout
(`pytorch._tensor_map`), so the two cannot drift apart.
"""

from __future__ import annotations

import collections
import re

import numpy as np

from ssast_jax.finetune.model import ClassifierConfig, abstract_classifier
from ssast_jax.interchange import pytorch
from ssast_jax.interchange.pytorch import PREFIX, CheckpointError
from ssast_jax.model import MODEL_SIZES, NUM_LEADING_TOKENS, patch_count

# timm's unused heads, in the order the original's state dict lists them.
UNUSED_HEAD_ORDER = ('v.head.weight', 'v.head.bias', 'v.head_dist.weight', 'v.head_dist.bias')
MARKER = 'mlp_head.1.weight'  # the tensor that tells a fine-tuned file from a pretraining one
DEFAULT_INPUT_FDIM = 128  # mel bins of every published setup


def _tensor_map(depth: int):
  """(encoder entries, head entries): (torch name without prefix, parameter path,
  transform) in the original's key order; the unused heads sit between the two."""
  encoder = [entry for entry in pytorch._tensor_map(depth) if entry[0] != 'mask_embed']
  head = [('mlp_head.0.weight', ('mlp_head', 'norm', 'scale'), 'copy'),
          ('mlp_head.0.bias', ('mlp_head', 'norm', 'bias'), 'copy'),
          ('mlp_head.1.weight', ('mlp_head', 'linear', 'kernel'), 'linear'),
          ('mlp_head.1.bias', ('mlp_head', 'linear', 'bias'), 'copy')]
  return encoder, head


def _expected_shapes(config: ClassifierConfig) -> dict[str, tuple]:
  """Torch tensor shapes of a fine-tuned checkpoint of `config`, from the model itself."""
  import jax
  from flax import nnx
  params = nnx.to_pure_dict(abstract_classifier(config)[1])
  encoder, head = _tensor_map(config.depth)
  shapes = {}
  for torch_name, path, transform in encoder + head:
    shapes[torch_name] = jax.eval_shape(
        lambda v: pytorch._to_torch(v, transform, config),
        jax.ShapeDtypeStruct(pytorch._get_path(params, path).shape, 'float32')).shape
  return shapes


def _infer_config(arrays, path, fstride, tstride, input_tdim, input_fdim) -> ClassifierConfig:
  """Size, depth, heads, patch shape and labels read off the tensors; strides and input
  size as given, checked against the positional embedding's length."""
  if None in (fstride, tstride, input_tdim):
    raise CheckpointError(f'{path}: a fine-tuned SSAST checkpoint does not record its patch '
                          f'strides and input length; pass fstride, tstride and input_tdim '
                          f'to from_pytorch')
  missing = [k for k in ('v.cls_token', 'v.pos_embed', 'v.patch_embed.proj.weight')
             if k not in arrays]
  if missing:
    raise CheckpointError(f'{path}: not an SSAST fine-tuned checkpoint; missing '
                          + ', '.join(PREFIX + k for k in missing))
  dim = int(arrays['v.cls_token'].shape[-1])
  depth = len({m.group(1) for k in arrays if (m := re.match(r'v\.blocks\.(\d+)\.', k))})
  conv = arrays['v.patch_embed.proj.weight']
  if conv.ndim != 4:
    raise CheckpointError(f'{path}: {PREFIX}v.patch_embed.proj.weight has shape '
                          f'{tuple(conv.shape)}, expected (D, 1, fshape, tshape)')
  fshape, tshape = int(conv.shape[2]), int(conv.shape[3])
  grid = (patch_count(input_fdim, fshape, fstride), patch_count(input_tdim, tshape, tstride))
  tokens = int(arrays['v.pos_embed'].shape[1])
  if tokens != grid[0] * grid[1] + NUM_LEADING_TOKENS:
    raise CheckpointError(
        f'{path}: {PREFIX}v.pos_embed holds {tokens} tokens, but fstride={fstride}, '
        f'tstride={tstride}, input_tdim={input_tdim}, input_fdim={input_fdim} give '
        f'{grid[0]} x {grid[1]} patches + {NUM_LEADING_TOKENS} = '
        f'{grid[0] * grid[1] + NUM_LEADING_TOKENS}')
  heads = {d: h for d, h in MODEL_SIZES.values()}.get(dim, max(dim // 64, 1))
  return ClassifierConfig(embed_dim=dim, num_heads=heads, depth=depth, fshape=fshape,
                          tshape=tshape, fstride=fstride, tstride=tstride,
                          input_fdim=input_fdim, input_tdim=input_tdim,
                          num_labels=int(arrays[MARKER].shape[0]))


def _check_tensors(arrays, config: ClassifierConfig, path) -> None:
  problems = []
  for name, shape in _expected_shapes(config).items():
    if name not in arrays:
      problems.append(f'missing {PREFIX}{name}')
    elif tuple(arrays[name].shape) != shape:
      problems.append(f'{PREFIX}{name} has shape {tuple(arrays[name].shape)}, expected {shape}')
  if problems:
    raise CheckpointError(f'{path}: not an SSAST fine-tuned checkpoint of the inferred '
                          f'geometry {config}: ' + '; '.join(problems))


def _read_finetuned(arrays, path, geometry):
  config = _infer_config(arrays, path, *geometry)
  _check_tensors(arrays, config, path)
  encoder, head = _tensor_map(config.depth)
  params = {}
  for torch_name, tree_path, transform in encoder + head:
    value = pytorch._to_jax(arrays[torch_name], transform, config)
    pytorch._set_path(params, tree_path, np.ascontiguousarray(value, dtype=np.float32))
  return config, params, _unused_heads(arrays, config)


def _unused_heads(arrays, config) -> dict:
  """timm's unused head tensors present with their expected shape, to be written back."""
  return {k: arrays[k] for k in UNUSED_HEAD_ORDER
          if k in arrays and arrays[k].shape == pytorch._unused_head_shape(k, config)}


def _read_pretraining(arrays, path):
  """What `pytorch.read_checkpoint` returns, from the tensors already loaded."""
  config = pytorch._infer_config(arrays, path)
  pytorch._check_tensors(arrays, config, path)
  return config, pytorch.params_from_state_dict(arrays, config), _unused_heads(arrays, config)


def read_any_checkpoint(path, fstride=None, tstride=None, input_tdim=None, input_fdim=None):
  """(config, params, extras) of an original checkpoint of either layout, read once: a
  ClassifierConfig for a fine-tuned file (which needs `fstride`, `tstride`, `input_tdim`;
  `input_fdim` None means 128, as in every published setup), a ModelConfig for a
  pretraining one (whose geometry the file holds, so all four must be left out)."""
  arrays = pytorch._load_state_dict(path)
  if MARKER in arrays:
    fdim = DEFAULT_INPUT_FDIM if input_fdim is None else input_fdim
    return _read_finetuned(arrays, path, (fstride, tstride, input_tdim, fdim))
  if (fstride, tstride, input_tdim, input_fdim) != (None, None, None, None):
    raise CheckpointError(f'{path}: a pretraining checkpoint records its own geometry; '
                          f'fstride, tstride, input_tdim and input_fdim are for fine-tuned '
                          f'ones (build a classifier from it with finetune_model)')
  return _read_pretraining(arrays, path)


def state_dict_arrays(params, config: ClassifierConfig, extras=None):
  """The original's fine-tuned state dict as numpy arrays (prefixed keys, its order);
  the unused heads from `extras`, else zeros of their shape."""
  extras = extras or {}
  encoder, head = _tensor_map(config.depth)
  out = collections.OrderedDict()

  def add(entries):
    for torch_name, path, transform in entries:
      value = np.asarray(pytorch._get_path(params, path), np.float32)
      out[PREFIX + torch_name] = np.ascontiguousarray(pytorch._to_torch(value, transform,
                                                                        config))

  add(encoder)
  for name in UNUSED_HEAD_ORDER:
    value = extras.get(name)
    out[PREFIX + name] = (np.asarray(value, np.float32) if value is not None
                          else np.zeros(pytorch._unused_head_shape(name, config), np.float32))
  add(head)
  return out


def write_checkpoint(params, config: ClassifierConfig, path, extras=None) -> None:
  """Writes the fine-tuned layout with torch.save; the file appears only when complete."""
  pytorch.save_state_dict(state_dict_arrays(params, config, extras), path)
