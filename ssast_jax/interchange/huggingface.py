"""Interchange with Hugging Face transformers' Audio Spectrogram Transformer, both ways.

transformers' `ASTModel` is this encoder: the same patch convolution on the `(B, 1, F, T)`
view, two leading tokens, pre-norm blocks and a final LayerNorm. Its checkpoints differ in
names (q, k and v are three Linear layers where timm fuses them, rows in that order), in
having one `layer_norm_eps` for every LayerNorm (the classification head's included), square
patches only and one pooling, `(h[:, 0] + h[:, 1]) / 2` (`ft_cls`).

So an export writes:
- a pretraining model as `ASTModel` (the pretext heads and the mask embedding, which
  transformers has no place for, in `ssast_pretext.safetensors` beside it, for the way back);
- an `ft_cls` classifier as `ASTForAudioClassification`, with `layer_norm_eps` the encoder's
  (1e-6): transformers then computes the head's LayerNorm with 1e-6 where the original uses
  1e-5 (the logits move by about 1e-6 of their scale); `ssast_head_layer_norm_eps` in
  config.json keeps the original's value for the way back;
- an `ft_avgtok` classifier as `ASTModel` plus its head in `ssast_head.safetensors`: a
  transformers classifier cannot pool the patch tokens, so no file of it is written that
  would load as `ASTForAudioClassification` and compute something else.
Frame models (128x2 patches) have no transformers counterpart and are refused.

Reading takes the names of transformers 4.x (those of the Hub's checkpoints and of
`save_pretrained`, which 5.x still writes) and 5.x's in-memory ones, geometry and epsilons
from config.json. torch and safetensors are imported only where files are read or written.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from ssast_jax.interchange import pytorch
from ssast_jax.interchange.pytorch import CheckpointError
from ssast_jax.model import ModelConfig
from ssast_jax.model.classifier import ClassifierConfig

MODEL_TYPE = 'audio-spectrogram-transformer'
BASE_PREFIX = 'audio_spectrogram_transformer.'
WEIGHTS_FILE = 'model.safetensors'
HEAD_FILE = 'ssast_head.safetensors'  # an avgtok classifier's head
PRETEXT_FILE = 'ssast_pretext.safetensors'  # a pretraining model's mask embedding, heads
POOLING_KEY = 'ssast_pooling'
HEAD_EPS_KEY = 'ssast_head_layer_norm_eps'
PRETEXT_PARAMS = ('mask_embed', 'cpred', 'gpred')
# transformers 5.x in-memory names -> the 4.x names (after the base prefix is stripped).
_MODERN_NAMES = [
    (r'^layers\.(\d+)\.attention\.q_proj\.', r'encoder.layer.\1.attention.attention.query.'),
    (r'^layers\.(\d+)\.attention\.k_proj\.', r'encoder.layer.\1.attention.attention.key.'),
    (r'^layers\.(\d+)\.attention\.v_proj\.', r'encoder.layer.\1.attention.attention.value.'),
    (r'^layers\.(\d+)\.attention\.o_proj\.', r'encoder.layer.\1.attention.output.dense.'),
    (r'^layers\.(\d+)\.mlp\.fc1\.', r'encoder.layer.\1.intermediate.dense.'),
    (r'^layers\.(\d+)\.mlp\.fc2\.', r'encoder.layer.\1.output.dense.'),
    (r'^layers\.(\d+)\.', r'encoder.layer.\1.')]
_QKV = {'query': 0, 'key': 1, 'value': 2}


def _pair(name, path, weight='linear'):
  return [(f'{name}.weight', path + (('kernel',) if weight != 'copy' else ('scale',)), weight),
          (f'{name}.bias', path + ('bias',), 'copy')]


def encoder_map(depth: int):
  """(transformers 4.x name without the base prefix, parameter path, transform) of the
  encoder; `qkv:I` takes part I of the fused qkv layer."""
  entries = [('embeddings.cls_token', ('cls_token',), 'copy'),
             ('embeddings.distillation_token', ('dist_token',), 'copy'),
             ('embeddings.position_embeddings', ('pos_embed',), 'copy'),
             ('embeddings.patch_embeddings.projection.weight', ('patch_embed', 'kernel'), 'conv'),
             ('embeddings.patch_embeddings.projection.bias', ('patch_embed', 'bias'), 'copy')]
  for i in range(depth):
    layer, block = f'encoder.layer.{i}.', ('blocks', i)
    entries += _pair(layer + 'layernorm_before', block + ('norm1',), 'copy')
    for part, index in _QKV.items():
      entries += [(f'{layer}attention.attention.{part}.weight',
                   block + ('attn', 'qkv', 'kernel'), f'qkv:{index}'),
                  (f'{layer}attention.attention.{part}.bias',
                   block + ('attn', 'qkv', 'bias'), f'qkv:{index}')]
    entries += (_pair(layer + 'attention.output.dense', block + ('attn', 'proj'))
                + _pair(layer + 'layernorm_after', block + ('norm2',), 'copy')
                + _pair(layer + 'intermediate.dense', block + ('mlp', 'fc1'))
                + _pair(layer + 'output.dense', block + ('mlp', 'fc2')))
  return entries + _pair('layernorm', ('norm',), 'copy')


HEAD_MAP = (_pair('classifier.layernorm', ('mlp_head', 'norm'), 'copy')
            + _pair('classifier.dense', ('mlp_head', 'linear')))


def _to_hf(value: np.ndarray, transform: str, config: ModelConfig) -> np.ndarray:
  if transform.startswith('qkv:'):
    dim, index = config.embed_dim, int(transform[4:])
    part = value[..., index * dim:(index + 1) * dim]
    return part.T if part.ndim == 2 else part
  return pytorch.to_torch(value, transform, config)


def hf_arrays(params: dict, entries, config: ModelConfig, prefix: str = '') -> dict:
  """{transformers name: float32 array} of the `entries` of `params`."""
  return {prefix + name: np.ascontiguousarray(
      _to_hf(np.asarray(pytorch.get_path(params, path), np.float32), transform, config))
          for name, path, transform in entries}


def params_from_hf(arrays: dict, entries, config: ModelConfig) -> dict:
  """The nested parameter dict of `entries` from 4.x-named arrays (q, k, v fused back)."""
  params, fused = {}, {}
  for name, path, transform in entries:
    value = np.asarray(arrays[name], np.float32)
    if transform.startswith('qkv:'):
      fused.setdefault(path, [None] * 3)[int(transform[4:])] = value.T if value.ndim == 2 else value
      if all(part is not None for part in fused[path]):
        pytorch.set_path(params, path, np.concatenate(fused.pop(path), axis=-1))
    else:
      pytorch.set_path(params, path, np.ascontiguousarray(
          pytorch.to_jax(value, transform, config), np.float32))
  return params


def canonical_names(arrays: dict) -> dict:
  """`arrays` with the base prefix stripped and 5.x names turned into 4.x ones."""
  out = {}
  for name, value in arrays.items():
    name = name[len(BASE_PREFIX):] if name.startswith(BASE_PREFIX) else name
    for pattern, replacement in _MODERN_NAMES:
      name, count = re.subn(pattern, replacement, name)
      if count:
        break
    out[name] = value
  return out


# ---- Reading.

def is_transformers_dir(path) -> bool:
  """Whether `path` is a folder holding a transformers AST `config.json`."""
  config = os.path.join(path, 'config.json')
  if not os.path.isfile(config):
    return False
  try:
    with open(config) as f:
      return json.load(f).get('model_type') == MODEL_TYPE
  except (OSError, ValueError):
    return False


def _load_tensors(path) -> dict:
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  return load_file(path)


def _weights(directory) -> dict:
  """Every tensor of the folder's weights: model.safetensors, its sharded index, or
  pytorch_model.bin; plus our head and pretext files where present."""
  single = os.path.join(directory, WEIGHTS_FILE)
  index = single + '.index.json'
  binary = os.path.join(directory, 'pytorch_model.bin')
  if os.path.isfile(single):
    arrays = _load_tensors(single)
  elif os.path.isfile(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)['weight_map'].values()))
    arrays = {k: v for shard in shards
              for k, v in _load_tensors(os.path.join(directory, shard)).items()}
  elif os.path.isfile(binary):
    arrays = pytorch.load_state_dict(binary)
  else:
    raise CheckpointError(f'{directory}: no {WEIGHTS_FILE}, {WEIGHTS_FILE}.index.json or '
                          f'pytorch_model.bin')
  for extra in (HEAD_FILE, PRETEXT_FILE):
    if os.path.isfile(os.path.join(directory, extra)):
      arrays.update(_load_tensors(os.path.join(directory, extra)))
  return {k: np.asarray(v, np.float32) for k, v in arrays.items()}


def _geometry(hf: dict, directory) -> dict:
  """ModelConfig keywords of a transformers AST config, refusing what this model is not."""
  def get(key, default):
    return hf.get(key, default)
  dim, heads, patch = get('hidden_size', 768), get('num_attention_heads', 12), get('patch_size', 16)
  if isinstance(patch, (list, tuple)):
    if len(set(patch)) != 1:
      raise CheckpointError(f'{directory}/config.json: patch_size {patch} is not square')
    patch = patch[0]
  problems = []
  if get('intermediate_size', 3072) != 4 * dim:
    problems.append(f'intermediate_size {get("intermediate_size", 3072)} is not 4 x '
                    f'hidden_size {dim}')
  if get('hidden_act', 'gelu') != 'gelu':
    problems.append(f'hidden_act {get("hidden_act", "gelu")!r} is not the exact gelu')
  if not get('qkv_bias', True):
    problems.append('qkv_bias is false')
  if dim % heads:
    problems.append(f'hidden_size {dim} is not divisible by num_attention_heads {heads}')
  if problems:
    raise CheckpointError(f'{directory}/config.json: not an SSAST-compatible AST: '
                          + '; '.join(problems))
  return dict(embed_dim=dim, num_heads=heads, depth=get('num_hidden_layers', 12),
              fshape=patch, tshape=patch, fstride=get('frequency_stride', 10),
              tstride=get('time_stride', 10), input_fdim=get('num_mel_bins', 128),
              input_tdim=get('max_length', 1024), layer_norm_epsilon=get('layer_norm_eps', 1e-12))


def _check_shapes(arrays: dict, expected: dict, directory, config) -> None:
  problems = pytorch.shape_problems(arrays, expected)
  if problems:
    raise CheckpointError(f'{directory}: not a transformers AST checkpoint of the geometry '
                          f'of its config.json ({config}): ' + '; '.join(problems[:5]))


def read(directory):
  """(config, params, info) of a transformers AST folder: a ClassifierConfig when it holds
  a classification head, else a ModelConfig (the pretext heads and mask embedding from
  `ssast_pretext.safetensors` if present, else None in `params`: freshly initialised by
  the caller)."""
  with open(os.path.join(directory, 'config.json')) as f:
    hf = json.load(f)
  geometry = _geometry(hf, directory)
  arrays = canonical_names(_weights(directory))
  labels = [label for _, label in sorted(
      (int(k), v) for k, v in (hf.get('id2label') or {}).items())]
  info = {'source': os.path.abspath(directory), 'labels': labels or None}
  info.update(_normalisation(directory))
  entries = encoder_map(geometry['depth'])
  if 'classifier.dense.weight' in arrays:
    config = ClassifierConfig(
        **geometry, num_labels=int(arrays['classifier.dense.weight'].shape[0]),
        head_layer_norm_epsilon=hf.get(HEAD_EPS_KEY, geometry['layer_norm_epsilon']),
        pooling=hf.get(POOLING_KEY, 'cls'))
    entries = entries + HEAD_MAP
  else:
    config = ModelConfig(**geometry)
  _check_shapes(arrays, _expected(config, entries), directory, config)
  params = params_from_hf(arrays, entries, config)
  if not isinstance(config, ClassifierConfig):
    pretext = {k[len('ssast.'):]: v for k, v in arrays.items() if k.startswith('ssast.')}
    for name, value in pretext.items():
      pytorch.set_path(params, tuple(int(p) if p.isdigit() else p
                                      for p in name.split('.')), value)
    info['pretext_from_file'] = bool(pretext)
  return config, params, info


def _expected(config, entries) -> dict:
  """{name: shape} of `entries` for `config`, derived from the model itself."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from ssast_jax.model import abstract_model  # pylint: disable=import-outside-toplevel
  from ssast_jax.model.classifier import abstract_classifier  # pylint: disable=import-outside-toplevel
  build = abstract_classifier if isinstance(config, ClassifierConfig) else abstract_model
  return pytorch.torch_shapes(entries, nnx.to_pure_dict(build(config)[1]), config,
                              to_file=_to_hf)


def _normalisation(directory) -> dict:
  path = os.path.join(directory, 'preprocessor_config.json')
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    pre = json.load(f)
  return {k: pre[k] for k in ('mean', 'std') if k in pre}


# ---- Writing.

def exportable(config: ModelConfig) -> None:
  """CheckpointError in one line where transformers' AST cannot hold `config`."""
  if config.fshape != config.tshape:
    raise CheckpointError(
        f'cannot export to transformers: its AST takes square patches only (one patch_size) '
        f'and this model\'s are {config.fshape}x{config.tshape}; export it for the original '
        f'code instead (--format=pytorch, or ssast_jax.to_pytorch)')


def hf_config(config: ModelConfig, labels=None) -> dict:
  """config.json of `config`: geometry, epsilon, and for a classifier labels, pooling and
  the head's epsilon (ours: transformers keeps the extra keys as attributes)."""
  out = {'architectures': ['ASTModel'], 'model_type': MODEL_TYPE,
         'hidden_size': config.embed_dim, 'num_hidden_layers': config.depth,
         'num_attention_heads': config.num_heads, 'intermediate_size': 4 * config.embed_dim,
         'hidden_act': 'gelu', 'hidden_dropout_prob': 0.0,
         'attention_probs_dropout_prob': 0.0, 'initializer_range': 0.02,
         'layer_norm_eps': config.layer_norm_epsilon, 'patch_size': config.fshape,
         'qkv_bias': True, 'frequency_stride': config.fstride, 'time_stride': config.tstride,
         'max_length': config.input_tdim, 'num_mel_bins': config.input_fdim,
         'dtype': 'float32'}
  if isinstance(config, ClassifierConfig):
    names = list(labels) if labels else [f'LABEL_{k}' for k in range(config.num_labels)]
    if len(names) != config.num_labels:
      raise ValueError(f'{len(names)} label names for a classifier of {config.num_labels} '
                       f'outputs')
    out['id2label'] = {str(k): name for k, name in enumerate(names)}
    out['label2id'] = {name: k for k, name in enumerate(names)}
    out[POOLING_KEY] = config.pooling
    out[HEAD_EPS_KEY] = config.head_layer_norm_epsilon
    if config.pooling == 'cls':
      out['architectures'] = ['ASTForAudioClassification']
  return out


def weight_files(config: ModelConfig, params: dict) -> dict:
  """{file name: {tensor name: float32 array}} of the export of `config` (see the module
  docstring for which file holds what)."""
  encoder = encoder_map(config.depth)
  if not isinstance(config, ClassifierConfig):
    pretext = {}
    for name in PRETEXT_PARAMS:
      for path, value in _flat(params[name], (name,)):
        pretext['ssast.' + '.'.join(map(str, path))] = np.asarray(value, np.float32)
    return {WEIGHTS_FILE: hf_arrays(params, encoder, config), PRETEXT_FILE: pretext}
  if config.pooling == 'cls':
    return {WEIGHTS_FILE: hf_arrays(params, encoder + HEAD_MAP, config, BASE_PREFIX)}
  return {WEIGHTS_FILE: hf_arrays(params, encoder, config),
          HEAD_FILE: hf_arrays(params, HEAD_MAP, config)}


def _flat(tree, path):
  if isinstance(tree, dict):
    for key, value in tree.items():
      yield from _flat(value, path + (key,))
  else:
    yield path, tree


def preprocessor_config(config: ModelConfig, mean: float, std: float) -> dict:
  """`ASTFeatureExtractor`'s preprocessor_config.json for the model's input and the run's
  normalisation (`(fbank - mean) / (2 * std)`, as SSAST's)."""
  return {'feature_extractor_type': 'ASTFeatureExtractor', 'feature_size': 1,
          'sampling_rate': 16000, 'num_mel_bins': config.input_fdim,
          'max_length': config.input_tdim, 'padding_value': 0.0, 'padding_side': 'right',
          'do_normalize': True, 'mean': float(mean), 'std': float(std),
          'return_attention_mask': False}


def write_directory(out, config: ModelConfig, params: dict, labels, mean: float, std: float,
                    card: str) -> None:
  """Writes the export into the folder `out` (which must not exist or be empty): built in a
  temporary folder beside it and renamed, so a failure leaves nothing under `out`."""
  import tempfile  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  exportable(config)
  out = os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise FileExistsError(f'{out}: exists and is not an empty folder; choose another --out')
  texts = {'config.json': hf_config(config, labels),
           'preprocessor_config.json': preprocessor_config(config, mean, std)}
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = tempfile.mkdtemp(dir=os.path.dirname(out), prefix='.export-')
  try:
    for name, arrays in weight_files(config, params).items():
      save_file(arrays, os.path.join(tmp, name), metadata={'format': 'pt'})
    for name, value in texts.items():
      with open(os.path.join(tmp, name), 'w') as f:
        f.write(json.dumps(value, indent=2, sort_keys=True) + '\n')
    with open(os.path.join(tmp, 'README.md'), 'w') as f:
      f.write(card)
    if os.path.isdir(out):
      os.rmdir(out)
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
