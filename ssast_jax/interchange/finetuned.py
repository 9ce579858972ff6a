"""The original's fine-tuned checkpoint layout, both ways, and reading either layout.

`torch.nn.DataParallel(ASTModel(pretrain_stage=False)).state_dict()` holds the encoder
(`module.v.*`, with the adapted `pos_embed` and timm's unused `v.head*`), then
`module.mlp_head.0` (LayerNorm) and `module.mlp_head.1` (Linear); no `p_input_*`, mask
embedding or pretext heads. It does not record the patch strides or the input length,
so reading it needs them. The encoder tensors map as in the pretraining layout
(`pytorch.tensor_map`), and the geometry, shape checks and conversion loops are that
module's, so the two cannot drift apart.
"""

from __future__ import annotations

import collections

from ssast_jax.model.classifier import ClassifierConfig, abstract_classifier
from ssast_jax.interchange import pytorch
from ssast_jax.interchange.pytorch import PREFIX, CheckpointError
from ssast_jax.model import NUM_LEADING_TOKENS, patch_count

MARKER = 'mlp_head.1.weight'  # the tensor that tells a fine-tuned file from a pretraining one
DEFAULT_INPUT_FDIM = 128  # mel bins of every published setup
LAYOUT = 'fine-tuned'


def _tensor_map(depth: int):
  """(encoder entries, head entries): (torch name without prefix, parameter path,
  transform) in the original's key order; the unused heads sit between the two."""
  encoder = [entry for entry in pytorch.tensor_map(depth) if entry[0] != 'mask_embed']
  head = [('mlp_head.0.weight', ('mlp_head', 'norm', 'scale'), 'copy'),
          ('mlp_head.0.bias', ('mlp_head', 'norm', 'bias'), 'copy'),
          ('mlp_head.1.weight', ('mlp_head', 'linear', 'kernel'), 'linear'),
          ('mlp_head.1.bias', ('mlp_head', 'linear', 'bias'), 'copy')]
  return encoder, head


def _expected_shapes(config: ClassifierConfig) -> dict[str, tuple]:
  """Torch tensor shapes of a fine-tuned checkpoint of `config`, from the model itself."""
  from flax import nnx
  encoder, head = _tensor_map(config.depth)
  return pytorch.torch_shapes(encoder + head, nnx.to_pure_dict(abstract_classifier(config)[1]),
                              config)


def _infer_config(arrays, path, fstride, tstride, input_tdim, input_fdim) -> ClassifierConfig:
  """Size, depth, heads, patch shape and labels read off the tensors; strides and input
  size as given, checked against the positional embedding's length."""
  if None in (fstride, tstride, input_tdim):
    raise CheckpointError(f'{path}: a fine-tuned SSAST checkpoint does not record its patch '
                          f'strides and input length; pass fstride, tstride and input_tdim '
                          f'to from_pytorch')
  geometry = pytorch.encoder_geometry(
      arrays, path, ('v.cls_token', 'v.pos_embed', 'v.patch_embed.proj.weight'), LAYOUT)
  grid = (patch_count(input_fdim, geometry['fshape'], fstride),
          patch_count(input_tdim, geometry['tshape'], tstride))
  tokens = int(arrays['v.pos_embed'].shape[1])
  if tokens != grid[0] * grid[1] + NUM_LEADING_TOKENS:
    raise CheckpointError(
        f'{path}: {PREFIX}v.pos_embed holds {tokens} tokens, but fstride={fstride}, '
        f'tstride={tstride}, input_tdim={input_tdim}, input_fdim={input_fdim} give '
        f'{grid[0]} x {grid[1]} patches + {NUM_LEADING_TOKENS} = '
        f'{grid[0] * grid[1] + NUM_LEADING_TOKENS}')
  return ClassifierConfig(**geometry, fstride=fstride, tstride=tstride,
                          input_fdim=input_fdim, input_tdim=input_tdim,
                          num_labels=int(arrays[MARKER].shape[0]))


def _read_finetuned(arrays, path, geometry):
  config = _infer_config(arrays, path, *geometry)
  pytorch.check_tensors(arrays, _expected_shapes(config), path, LAYOUT, config)
  encoder, head = _tensor_map(config.depth)
  return (config, pytorch.params_from_arrays(arrays, encoder + head, config),
          pytorch.unused_heads(arrays, config))


def read_any_checkpoint(path, fstride=None, tstride=None, input_tdim=None, input_fdim=None):
  """(config, params, extras) of an original checkpoint of either layout, read once: a
  ClassifierConfig for a fine-tuned file (which needs `fstride`, `tstride`, `input_tdim`;
  `input_fdim` None means 128, as in every published setup), a ModelConfig for a
  pretraining one (whose geometry the file holds, so all four must be left out)."""
  arrays = pytorch.load_state_dict(path)
  if MARKER in arrays:
    fdim = DEFAULT_INPUT_FDIM if input_fdim is None else input_fdim
    return _read_finetuned(arrays, path, (fstride, tstride, input_tdim, fdim))
  if (fstride, tstride, input_tdim, input_fdim) != (None, None, None, None):
    raise CheckpointError(f'{path}: a pretraining checkpoint records its own geometry; '
                          f'fstride, tstride, input_tdim and input_fdim are for fine-tuned '
                          f'ones (build a classifier from it with finetune_model)')
  return pytorch.read_state_dict(arrays, path)


def state_dict_arrays(params, config: ClassifierConfig, extras=None):
  """The original's fine-tuned state dict as numpy arrays (prefixed keys, its order);
  the unused heads from `extras`, else zeros of their shape."""
  encoder, head = _tensor_map(config.depth)
  out = collections.OrderedDict()
  out.update(pytorch.torch_arrays(params, encoder, config))
  out.update(pytorch.unused_head_arrays(extras or {}, config))
  out.update(pytorch.torch_arrays(params, head, config))
  return out


def write_checkpoint(params, config: ClassifierConfig, path, extras=None) -> None:
  """Writes the fine-tuned layout with torch.save; the file appears only when complete."""
  pytorch.save_state_dict(state_dict_arrays(params, config, extras), path)
