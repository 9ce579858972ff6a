"""Import and export of the original PyTorch checkpoints (SPEC section 9).

The mapping is one table, `tensor_map`, read in both directions, so import and export
cannot drift apart. torch is imported only inside the functions that read or write files.
The public helpers below the table (geometry, shape checks, the conversion loops) are
shared with the fine-tuned layout (`finetuned`), whose encoder maps the same way.
"""

from __future__ import annotations

import collections
import functools
import os
import re
import tempfile

import numpy as np

from ssast_jax.model import MODEL_SIZES, ModelConfig, abstract_model

PREFIX = 'module.'
UNUSED_HEAD_CLASSES = 1000  # timm's ImageNet heads v.head / v.head_dist, unused by SSAST
# Their tensors, in the order the original's state dicts (of either layout) list them.
UNUSED_HEADS = ('v.head.weight', 'v.head.bias', 'v.head_dist.weight', 'v.head_dist.bias')


class CheckpointError(ValueError):
  """The file is not an SSAST pretraining checkpoint this project can read."""


def _linear(torch_name, path):
  return [(f'{torch_name}.weight', path + ('kernel',), 'linear'),
          (f'{torch_name}.bias', path + ('bias',), 'copy')]


def _layer_norm(torch_name, path):
  return [(f'{torch_name}.weight', path + ('scale',), 'copy'),
          (f'{torch_name}.bias', path + ('bias',), 'copy')]


def tensor_map(depth: int):
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


def _unused_head_shape(name: str, config) -> tuple:
  return ((UNUSED_HEAD_CLASSES, config.embed_dim) if name.endswith('weight')
          else (UNUSED_HEAD_CLASSES,))


def unused_heads(arrays: dict, config) -> dict:
  """timm's unused head tensors present with their expected shape, to be written back."""
  return {k: arrays[k] for k in UNUSED_HEADS
          if k in arrays and arrays[k].shape == _unused_head_shape(k, config)}


def unused_head_arrays(extras: dict, config) -> 'collections.OrderedDict':
  """The unused heads' prefixed state-dict entries: from `extras`, else zeros."""
  out = collections.OrderedDict()
  for name in UNUSED_HEADS:
    value = extras.get(name)
    out[PREFIX + name] = (np.asarray(value, np.float32) if value is not None
                          else np.zeros(_unused_head_shape(name, config), np.float32))
  return out


def torch_shapes(entries, params, config, to_file=None) -> dict[str, tuple]:
  """{torch name: shape} of the tensor-map `entries` for the parameter tree `params` of
  `config` (abstract arrays suffice): the shapes derived from the model itself. `to_file`
  is the layout's `(value, transform, config)` conversion, `to_torch` by default."""
  import jax
  shapes = {}
  for torch_name, path, transform in entries:
    convert = functools.partial(to_file or to_torch, transform=transform, config=config)
    shapes[torch_name] = jax.eval_shape(
        convert, jax.ShapeDtypeStruct(get_path(params, path).shape, 'float32')).shape
  return shapes


def _expected_shapes(config: ModelConfig) -> dict[str, tuple]:
  """Torch tensor shapes of a checkpoint of `config`, derived from the model itself."""
  from flax import nnx
  params = nnx.to_pure_dict(abstract_model(config)[1])
  return {'p_input_fdim': (), 'p_input_tdim': (),
          **torch_shapes(tensor_map(config.depth) + _head_map(), params, config)}


def load_state_dict(path) -> dict[str, np.ndarray]:
  """The tensors of a PyTorch state dict file as numpy arrays, `module.` stripped."""
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


def encoder_geometry(arrays: dict[str, np.ndarray], path, needed, layout: str) -> dict:
  """Width, heads, depth and patch shape read off the encoder tensors (ModelConfig
  keywords). `needed`: the tensors the layout cannot do without (the class token and the
  patch conv among them); `layout` names it in the CheckpointError."""
  missing = [k for k in needed if k not in arrays]
  if missing:
    raise CheckpointError(f'{path}: not an SSAST {layout} checkpoint; missing '
                          + ', '.join(PREFIX + k for k in missing))
  dim = int(arrays['v.cls_token'].shape[-1])
  depth = len({m.group(1) for k in arrays if (m := re.match(r'v\.blocks\.(\d+)\.', k))})
  conv = arrays['v.patch_embed.proj.weight']
  if conv.ndim != 4:
    raise CheckpointError(f'{path}: {PREFIX}v.patch_embed.proj.weight has shape '
                          f'{tuple(conv.shape)}, expected (D, 1, fshape, tshape)')
  heads = {d: h for d, h in MODEL_SIZES.values()}.get(dim, max(dim // 64, 1))
  return dict(embed_dim=dim, num_heads=heads, depth=depth, fshape=int(conv.shape[2]),
              tshape=int(conv.shape[3]))


def _infer_config(arrays: dict[str, np.ndarray], path) -> ModelConfig:
  """Size, depth, heads, patch shape and pretraining input size, read off the tensors."""
  geometry = encoder_geometry(
      arrays, path, ('v.cls_token', 'v.patch_embed.proj.weight', 'p_input_fdim',
                     'p_input_tdim'), 'pretraining')
  return ModelConfig(**geometry, fstride=geometry['fshape'], tstride=geometry['tshape'],
                     input_fdim=int(arrays['p_input_fdim']),
                     input_tdim=int(arrays['p_input_tdim']))


def shape_problems(arrays, shapes: dict[str, tuple], prefix: str = '') -> list[str]:
  """One phrase per tensor of `shapes` that `arrays` lacks or holds in another shape, named
  with `prefix` as the checkpoint names it."""
  return [f'missing {prefix}{name}' if name not in arrays else
          f'{prefix}{name} has shape {tuple(arrays[name].shape)}, expected {tuple(shape)}'
          for name, shape in shapes.items()
          if name not in arrays or tuple(arrays[name].shape) != tuple(shape)]


def check_tensors(arrays, shapes: dict[str, tuple], path, layout: str, config) -> None:
  """CheckpointError listing every tensor of `shapes` that `arrays` lacks or has in
  another shape; `layout` and the inferred `config` are named in the message."""
  problems = shape_problems(arrays, shapes, PREFIX)
  if problems:
    raise CheckpointError(f'{path}: not an SSAST {layout} checkpoint of the inferred '
                          f'geometry {config}: ' + '; '.join(problems))


def to_jax(value: np.ndarray, transform: str, config: ModelConfig) -> np.ndarray:
  if transform == 'linear':
    return value.T
  if transform == 'conv':
    return value.reshape(config.embed_dim, config.pred_dim).T
  return value


def to_torch(value: np.ndarray, transform: str, config: ModelConfig) -> np.ndarray:
  if transform == 'linear':
    return value.T
  if transform == 'conv':
    return value.T.reshape(config.embed_dim, 1, config.fshape, config.tshape)
  return value


def set_path(tree: dict, path, value):
  for part in path[:-1]:
    tree = tree.setdefault(part, {})
  tree[path[-1]] = value


def get_path(tree, path):
  for part in path:
    tree = tree[part]
  return tree


def params_from_arrays(arrays: dict[str, np.ndarray], entries, config) -> dict:
  """Nested parameter dict (the layout of `nnx.to_pure_dict`) of the tensor-map `entries`
  from unprefixed tensors, float32."""
  params = {}
  for torch_name, path, transform in entries:
    value = to_jax(arrays[torch_name], transform, config)
    set_path(params, path, np.ascontiguousarray(value, dtype=np.float32))
  return params


def torch_arrays(params, entries, config) -> 'collections.OrderedDict':
  """The prefixed state-dict entries of the tensor-map `entries`, in their order, float32."""
  out = collections.OrderedDict()
  for torch_name, path, transform in entries:
    value = np.asarray(get_path(params, path), np.float32)
    out[PREFIX + torch_name] = np.ascontiguousarray(to_torch(value, transform, config))
  return out


def params_from_state_dict(arrays: dict[str, np.ndarray], config: ModelConfig) -> dict:
  """Nested parameter dict (the layout of `nnx.to_pure_dict`) from unprefixed tensors."""
  return params_from_arrays(arrays, tensor_map(config.depth) + _head_map(), config)


def read_state_dict(arrays: dict[str, np.ndarray], path):
  """(config, params, unused-head tensors) of the tensors of a pretraining checkpoint
  (`load_state_dict`), checked against the geometry they imply; `path` for messages."""
  config = _infer_config(arrays, path)
  check_tensors(arrays, _expected_shapes(config), path, 'pretraining', config)
  return config, params_from_state_dict(arrays, config), unused_heads(arrays, config)


def read_checkpoint(path):
  """(config, params, unused-head tensors) of an original SSAST pretraining checkpoint."""
  return read_state_dict(load_state_dict(path), path)


def state_dict_arrays(params, config: ModelConfig, extras=None) -> 'collections.OrderedDict':
  """The original's state dict as numpy arrays (prefixed keys, original order and dtypes)."""
  out = collections.OrderedDict()
  out[PREFIX + 'p_input_fdim'] = np.asarray(config.input_fdim, np.int64)
  out[PREFIX + 'p_input_tdim'] = np.asarray(config.input_tdim, np.int64)
  out.update(torch_arrays(params, tensor_map(config.depth), config))
  out.update(unused_head_arrays(extras or {}, config))
  out.update(torch_arrays(params, _head_map(), config))
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
