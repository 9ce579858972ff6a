"""Encoder geometry and initialisation (SPEC sections 2, 3 and 8)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import ssast_jax
from ssast_jax import ModelConfig
from ssast_jax.model import abstract_model, patchify
from ssast_jax.model.encoder import Mlp


def _param_count(config):
  _, state = abstract_model(config)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


@pytest.mark.parametrize('size, millions', [('tiny', 6), ('small', 23), ('base', 89)])
def test_parameter_counts(size, millions):
  """SPEC's counts are the original module's, which also holds timm's two unused heads."""
  config = ModelConfig.from_size(size)
  unused_heads = 2 * 1001 * config.embed_dim
  count = _param_count(config) + unused_heads
  assert abs(count / 1e6 - millions) < 0.5, count


@pytest.mark.parametrize('shape, stride', [((16, 16), (16, 16)), ((128, 2), (128, 2)),
                                           ((16, 16), (10, 10)), ((16, 16), (16, 12))])
def test_patchify_matches_torch_unfold(shape, stride):
  x = np.random.default_rng(0).normal(size=(2, 100, 128)).astype(np.float32)
  view = torch.from_numpy(x).unsqueeze(1).transpose(2, 3)  # (B, 1, F, T)
  expected = torch.nn.functional.unfold(view, shape, stride=stride).transpose(1, 2).numpy()
  got = np.asarray(patchify(jnp.asarray(x), *shape, *stride))
  np.testing.assert_allclose(got, expected, atol=1e-6)


def test_any_input_size_and_geometry():
  config = ModelConfig.from_size('tiny', depth=1, fshape=128, tshape=2, fstride=128,
                                 tstride=2, input_fdim=128, input_tdim=50)
  model = ssast_jax.create_model(config)
  x = np.zeros((2, 50, 128), np.float32)
  assert config.patch_grid == (1, 25)
  assert ssast_jax.encode(model, x).shape == (2, 27, 192)
  assert ssast_jax.encode(model, x, np.array([[0, 3], [5, 24]])).shape == (2, 27, 192)


def test_mask_token_substitution_before_position_embedding():
  """A masked patch's input is mask_embed + its position: the patch content is ignored."""
  config = ModelConfig.from_size('tiny', depth=1, input_tdim=64)
  model = ssast_jax.create_model(config)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(1, 64, 128)).astype(np.float32)
  y = x.copy()
  y[0, :16, :16] += 5.0  # changes patch 0 only (f=0, t=0)
  mask = np.array([[0, 7]])
  np.testing.assert_allclose(ssast_jax.encode(model, x, mask), ssast_jax.encode(model, y, mask),
                             atol=1e-6)
  assert not np.allclose(ssast_jax.encode(model, x), ssast_jax.encode(model, y), atol=1e-3)


def test_initialisation_statistics():
  config = ModelConfig.from_size('small', depth=2)
  params = ssast_jax.create_model(config, seed=0).params
  def std(a):
    return float(np.std(np.asarray(a)))
  d = config.embed_dim
  assert abs(std(params['pos_embed']) - 0.02) < 0.001
  for name in ('cls_token', 'dist_token'):
    assert abs(std(params[name]) - 0.02) < 0.004
  assert abs(std(params['mask_embed']) - d ** -0.5) < 0.15 * d ** -0.5
  block = params['blocks'][0]
  for layer in (block['attn']['qkv'], block['attn']['proj'], block['mlp']['fc1'],
                block['mlp']['fc2']):
    assert abs(std(layer['kernel']) - 0.02) < 0.001
    assert not np.any(np.asarray(layer['bias']))
  for norm in (block['norm1'], block['norm2'], params['norm']):
    assert np.all(np.asarray(norm['scale']) == 1) and not np.any(np.asarray(norm['bias']))
  uniform = [(params['patch_embed']['kernel'], 256), (params['patch_embed']['bias'], 256),
             (params['cpred']['hidden']['kernel'], d), (params['gpred']['out']['bias'], d),
             (params['cpred']['out']['kernel'], d)]
  for value, fan_in in uniform:
    value, bound = np.asarray(value), fan_in ** -0.5
    assert value.min() >= -bound and value.max() <= bound
    assert abs(value.std() - bound / np.sqrt(3)) < 0.1 * bound / np.sqrt(3)


def test_bfloat16_compute_keeps_float32_parameters():
  config = ModelConfig.from_size('tiny', depth=1, input_tdim=32, dtype='bfloat16')
  model = ssast_jax.create_model(config)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(model.state))
  f32 = ssast_jax.create_model(ModelConfig.from_size('tiny', depth=1, input_tdim=32))
  x = np.random.default_rng(0).normal(size=(2, 32, 128)).astype(np.float32)
  out = nnx.merge(model.graphdef, f32.state).encode(jnp.asarray(x))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32), ssast_jax.encode(f32, x), atol=0.1)


def test_mlp_is_torchs_with_exact_gelu():
  """fc1 -> exact (erf) GELU -> fc2, as the original's timm Mlp with nn.GELU()."""
  config = ModelConfig.from_size('tiny', depth=1)
  mlp = Mlp(config, nnx.Rngs(0))
  x = np.random.default_rng(3).normal(scale=3.0, size=(4, 192)).astype(np.float32)
  fc1, fc2 = torch.nn.Linear(192, 768), torch.nn.Linear(768, 192)
  with torch.no_grad():
    for layer, ours in ((fc1, mlp.fc1), (fc2, mlp.fc2)):
      layer.weight.copy_(torch.from_numpy(np.asarray(ours.kernel[...]).T))
      layer.bias.copy_(torch.from_numpy(np.asarray(ours.bias[...])))
    expected = fc2(torch.nn.functional.gelu(fc1(torch.from_numpy(x)))).numpy()
  np.testing.assert_allclose(np.asarray(mlp(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5)
