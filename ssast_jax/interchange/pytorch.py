"""Import and export of the original PyTorch checkpoints (SPEC section 9).

The mapping is one table, `_tensor_map`, read in both directions, so import and export
cannot drift apart. torch is imported only inside the functions that read or write files.
"""

from __future__ import annotations

import collections
import os
import re
import tempfile

import numpy as np

from ssast_jax.model import MODEL_SIZES, ModelConfig, abstract_model

PREFIX = 'module.'
UNUSED_HEAD_CLASSES = 1000  # timm's ImageNet heads v.head / v.head_dist, unused by SSAST


class CheckpointError(ValueError):
  """The file is not an SSAST pretraining checkpoint this project can read."""


def _linear(torch_name, path):
  return [(f'{torch_name}.weight', path + ('kernel',), 'linear'),
          (f'{torch_name}.bias', path + ('bias',), 'copy')]


def _layer_norm(torch_name, path):
  return [(f'{torch_name}.weight', path + ('scale',), 'copy'),
          (f'{torch_name}.bias', path + ('bias',), 'copy')]


def _tensor_map(depth: int):
  """(torch name without prefix, parameter path, transform), in the original's key order."""
  entries = [('mask_embed', ('mask_embed',), 'copy'),
             ('v.cls_token', ('cls_token',), 'copy'),
             ('v.pos_embed', ('pos_embed',), 'copy'),
             ('v.dist_token', ('dist_token',), 'copy'),
             ('v.patch_embed.proj.weight', ('patch_embed', 'kernel'), 'conv'),
             ('v.patch_embed.proj.bias', ('patch_embed', 'bias'), 'copy')]
  for i in range(depth):
    block = ('blocks', i)
    entries += (_layer_norm(f'v.blocks.{i}.norm1', block + ('norm1',))
                + _linear(f'v.blocks.{i}.attn.qkv', block + ('attn', 'qkv'))
                + _linear(f'v.blocks.{i}.attn.proj', block + ('attn', 'proj'))
                + _layer_norm(f'v.blocks.{i}.norm2', block + ('norm2',))
                + _linear(f'v.blocks.{i}.mlp.fc1', block + ('mlp', 'fc1'))
                + _linear(f'v.blocks.{i}.mlp.fc2', block + ('mlp', 'fc2')))
  entries += _layer_norm('v.norm', ('norm',))
  return entries


def _head_map():
  """The pretext heads' entries; the original writes them after the unused timm heads."""
  return [entry for torch_head, jax_head in (('cpredlayer', 'cpred'), ('gpredlayer', 'gpred'))
          for layer, part in (('0', 'hidden'), ('2', 'out'))
          for entry in _linear(f'{torch_head}.{layer}', (jax_head, part))]


_UNUSED_HEADS = {f'{head}.{part}' for head in ('v.head', 'v.head_dist')
                 for part in ('weight', 'bias')}


def _unused_head_shape(name: str, config: ModelConfig) -> tuple:
  return ((UNUSED_HEAD_CLASSES, config.embed_dim) if name.endswith('weight')
          else (UNUSED_HEAD_CLASSES,))


def _expected_shapes(config: ModelConfig) -> dict[str, tuple]:
  """Torch tensor shapes of a checkpoint of `config`, derived from the model itself."""
  from flax import nnx
  import jax
  params = nnx.to_pure_dict(abstract_model(config)[1])
  shapes = {'p_input_fdim': (), 'p_input_tdim': ()}
  for torch_name, path, transform in _tensor_map(config.depth) + _head_map():
    shape = _get_path(params, path).shape
    shapes[torch_name] = jax.eval_shape(
        lambda v: _to_torch(v, transform, config), jax.ShapeDtypeStruct(shape, 'float32')).shape
  return shapes


def _load_state_dict(path) -> dict[str, np.ndarray]:
  import torch  # only here: reading a PyTorch file
  try:
    state = torch.load(os.fspath(path), map_location='cpu', weights_only=True)
  except FileNotFoundError:
    raise CheckpointError(f'{path}: no such file') from None
  except Exception as e:  # pickle, zip or torch errors: the file is not a state dict
    raise CheckpointError(f'{path}: not a readable PyTorch checkpoint ({e})') from None
  if isinstance(state, dict) and isinstance(state.get('state_dict'), dict):
    state = state['state_dict']
  if not isinstance(state, dict):
    raise CheckpointError(f'{path}: expected a state dict, found {type(state).__name__}')
  arrays = {}
  for key, value in state.items():
    if isinstance(value, torch.Tensor):
      name = key[len(PREFIX):] if key.startswith(PREFIX) else key
      arrays[name] = value.detach().to(torch.float32 if value.is_floating_point()
                                       else value.dtype).numpy()
  return arrays


def _infer_config(arrays: dict[str, np.ndarray], path) -> ModelConfig:
  """Size, depth, heads, patch shape and pretraining input size, read off the tensors."""
  needed = ('v.cls_token', 'v.patch_embed.proj.weight', 'p_input_fdim', 'p_input_tdim')
  missing = [k for k in needed if k not in arrays]
  if missing:
    raise CheckpointError(f'{path}: not an SSAST pretraining checkpoint; missing '
                          + ', '.join(PREFIX + k for k in missing))
  dim = int(arrays['v.cls_token'].shape[-1])
  depth = len({m.group(1) for k in arrays if (m := re.match(r'v\.blocks\.(\d+)\.', k))})
  conv = arrays['v.patch_embed.proj.weight']
  if conv.ndim != 4:
    raise CheckpointError(f'{path}: {PREFIX}v.patch_embed.proj.weight has shape '
                          f'{tuple(conv.shape)}, expected (D, 1, fshape, tshape)')
  fshape, tshape = int(conv.shape[2]), int(conv.shape[3])
  heads = {d: h for d, h in MODEL_SIZES.values()}.get(dim, max(dim // 64, 1))
  return ModelConfig(embed_dim=dim, num_heads=heads, depth=depth, fshape=fshape,
                     tshape=tshape, fstride=fshape, tstride=tshape,
                     input_fdim=int(arrays['p_input_fdim']),
                     input_tdim=int(arrays['p_input_tdim']))


def _check_tensors(arrays, config: ModelConfig, path) -> None:
  problems = []
  for name, shape in _expected_shapes(config).items():
    if name not in arrays:
      problems.append(f'missing {PREFIX}{name}')
    elif tuple(arrays[name].shape) != shape:
      problems.append(f'{PREFIX}{name} has shape {tuple(arrays[name].shape)}, expected {shape}')
  if problems:
    raise CheckpointError(f'{path}: not an SSAST pretraining checkpoint of the inferred '
                          f'geometry {config}: ' + '; '.join(problems))


def _to_jax(value: np.ndarray, transform: str, config: ModelConfig) -> np.ndarray:
  if transform == 'linear':
    return value.T
  if transform == 'conv':
    return value.reshape(config.embed_dim, config.pred_dim).T
  return value


def _to_torch(value: np.ndarray, transform: str, config: ModelConfig) -> np.ndarray:
  if transform == 'linear':
    return value.T
  if transform == 'conv':
    return value.T.reshape(config.embed_dim, 1, config.fshape, config.tshape)
  return value


def _set_path(tree: dict, path, value):
  for part in path[:-1]:
    tree = tree.setdefault(part, {})
  tree[path[-1]] = value


def _get_path(tree, path):
  for part in path:
    tree = tree[part]
  return tree


def params_from_state_dict(arrays: dict[str, np.ndarray], config: ModelConfig) -> dict:
  """Nested parameter dict (the layout of `nnx.to_pure_dict`) from unprefixed tensors."""
  params = {}
  for torch_name, path, transform in _tensor_map(config.depth) + _head_map():
    value = _to_jax(arrays[torch_name], transform, config)
    _set_path(params, path, np.ascontiguousarray(value, dtype=np.float32))
  return params


def read_checkpoint(path):
  """(config, params, unused-head tensors) of an original SSAST pretraining checkpoint."""
  arrays = _load_state_dict(path)
  config = _infer_config(arrays, path)
  _check_tensors(arrays, config, path)
  extras = {k: arrays[k] for k in _UNUSED_HEADS
            if k in arrays and arrays[k].shape == _unused_head_shape(k, config)}
  return config, params_from_state_dict(arrays, config), extras


def state_dict_arrays(params, config: ModelConfig, extras=None) -> 'collections.OrderedDict':
  """The original's state dict as numpy arrays (prefixed keys, original order and dtypes)."""
  extras = extras or {}
  out = collections.OrderedDict()
  out[PREFIX + 'p_input_fdim'] = np.asarray(config.input_fdim, np.int64)
  out[PREFIX + 'p_input_tdim'] = np.asarray(config.input_tdim, np.int64)
  def add(entries):
    for torch_name, path, transform in entries:
      value = np.asarray(_get_path(params, path), np.float32)
      out[PREFIX + torch_name] = np.ascontiguousarray(_to_torch(value, transform, config))

  add(_tensor_map(config.depth))
  for name in sorted(_UNUSED_HEADS, key=lambda n: (n.count('dist'), n.endswith('bias'))):
    value = extras.get(name)
    out[PREFIX + name] = (np.asarray(value, np.float32) if value is not None
                          else np.zeros(_unused_head_shape(name, config), np.float32))
  add(_head_map())
  return out


def write_checkpoint(params, config: ModelConfig, path, extras=None) -> None:
  """Writes the original layout with torch.save; the file appears only when complete."""
  save_state_dict(state_dict_arrays(params, config, extras), path)


def save_state_dict(arrays: dict, path) -> None:
  """`torch.save` of the arrays as tensors, in their order, to a temporary file renamed to
  `path` once written (a crash never leaves a partial file under that name)."""
  import torch  # only here: writing a PyTorch file
  state = collections.OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in arrays.items())
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, suffix='.tmp')
  os.close(fd)
  try:
    torch.save(state, tmp)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise
