"""Encoder geometry and initialisation (SPEC sections 2, 3 and 8)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import ssast_jax
from ssast_jax import ModelConfig, linear
from ssast_jax import layer_norm as layer_norm_lib
from ssast_jax.model import (SSAST, abstract_model, exact_gelu, patchify,
                             resolved_attention)


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


def _encoder_loss_and_grads(config, x, mask):
  graphdef, params = nnx.split(SSAST(config, nnx.Rngs(0)))

  def loss(params):
    return jnp.mean(nnx.merge(graphdef, params).encode(x, mask).astype(jnp.float32) ** 2)
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize('dtype, rtol', [('float32', 2e-5), ('bfloat16', 3e-2)])
def test_attention_implementations_agree(dtype, rtol):
  """The explicit einsums (CPU) and jax.nn.dot_product_attention compute one attention:
  the same loss and gradients, to float rounding, in float32 and in bfloat16."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 64, 128)).astype(np.float32))
  mask = jnp.asarray([[0, 5, 9], [1, 2, 30]])
  results = {impl: _encoder_loss_and_grads(
      ModelConfig.from_size('tiny', depth=2, input_tdim=64, dtype=dtype, attention=impl),
      x, mask) for impl in ('explicit', 'dot_product_attention')}
  (loss_a, grads_a), (loss_b, grads_b) = results.values()
  np.testing.assert_allclose(loss_a, loss_b, rtol=rtol)
  flat_a, flat_b = (np.concatenate([np.ravel(np.asarray(g, np.float32))
                                     for g in jax.tree.leaves(t)]) for t in (grads_a, grads_b))
  # Over all parameters: the key bias's exact gradient is 0, so alone it is rounding noise.
  assert np.linalg.norm(flat_a - flat_b) <= rtol * np.linalg.norm(flat_b)


def test_auto_attention_is_explicit_on_cpu_only():
  assert jax.default_backend() == 'cpu'
  assert resolved_attention('auto') == 'explicit'
  assert resolved_attention('dot_product_attention') == 'dot_product_attention'
  with pytest.raises(ValueError, match="attention 'flash' is not one of"):
    SSAST(ModelConfig.from_size('tiny', depth=1, attention='flash'), nnx.Rngs(0))


def test_gelu_is_torchs_exact_gelu():
  x = np.linspace(-12, 12, 100_001, dtype=np.float32)
  expected = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(np.asarray(exact_gelu(jnp.asarray(x))), expected,
                             rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize('dtype, rtol, atol', [(jnp.float32, 1e-6, 1e-5),
                                               (jnp.bfloat16, 2e-2, 1e-1)])
def test_linear_matmul_derivative_is_jaxs(dtype, rtol, atol):
  """The hand-written derivative of `linear.matmul` gives JAX's own gradients of
  `x @ kernel`, for token batches of any rank, in the compute dtypes."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 5, 7, 12)), dtype)
  kernel = jnp.asarray(rng.normal(size=(12, 9)), dtype)
  weights = jnp.asarray(rng.normal(size=(2, 5, 7, 9)), dtype)

  def loss(product):
    return lambda x, kernel: jnp.sum(product(x, kernel).astype(jnp.float32) * weights)
  ours = jax.grad(loss(linear.matmul), argnums=(0, 1))(x, kernel)
  jaxs = jax.grad(loss(lambda a, b: a @ b), argnums=(0, 1))(x, kernel)
  for a, b in zip(ours, jaxs):
    assert a.dtype == b.dtype == dtype and a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=rtol, atol=atol)
  np.testing.assert_array_equal(linear.matmul(x, kernel), x @ kernel)


def test_linear_dot_general_refuses_what_it_does_not_compute():
  x, kernel = jnp.ones((3, 4)), jnp.ones((4, 5))
  layer = nnx.Linear(4, 5, dot_general=linear.dot_general, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(layer(x), x @ layer.kernel[...] + layer.bias[...], rtol=1e-6)
  with pytest.raises(NotImplementedError, match='x @ kernel only'):
    linear.dot_general(x, kernel.T, (((1,), (1,)), ((), ())))
  with pytest.raises(NotImplementedError, match="default options only.*'precision'"):
    linear.dot_general(x, kernel, (((1,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize('dtype, rtol, atol', [(jnp.float32, 1e-5, 1e-5),
                                               (jnp.bfloat16, 2e-2, 5e-2)])
def test_layer_norm_is_flaxs_with_the_same_gradients(dtype, rtol, atol):
  """`layer_norm.LayerNorm` computes flax's LayerNorm, and its hand-written derivative
  gives JAX's gradients of it, for the input, scale and bias, in both compute dtypes."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(1.5, 2.0, size=(3, 11, 48)), dtype)
  d_y = jnp.asarray(rng.normal(size=(3, 11, 48)), jnp.float32)
  ours = layer_norm_lib.LayerNorm(48, epsilon=1e-6, dtype=dtype, rngs=nnx.Rngs(0))
  flaxs = nnx.LayerNorm(48, epsilon=1e-6, dtype=dtype, rngs=nnx.Rngs(0))
  for layer in (ours, flaxs):
    layer.scale[...] = jnp.asarray(rng.normal(1.0, 0.3, size=48), jnp.float32)
    layer.bias[...] = jnp.asarray(rng.normal(size=48), jnp.float32)
  flaxs.scale[...], flaxs.bias[...] = ours.scale[...], ours.bias[...]

  def value_and_grads(layer):
    graphdef, params = nnx.split(layer)

    def loss(params, x):
      y = nnx.merge(graphdef, params)(x)
      return jnp.sum(y.astype(jnp.float32) * d_y), y
    (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, grads
  (y_ours, grads_ours), (y_flax, grads_flax) = value_and_grads(ours), value_and_grads(flaxs)
  assert y_ours.dtype == y_flax.dtype == dtype
  np.testing.assert_allclose(np.asarray(y_ours, np.float32), np.asarray(y_flax, np.float32),
                             rtol=1e-6, atol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_ours), jax.tree.leaves(grads_flax)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=rtol, atol=atol)
  with pytest.raises(NotImplementedError, match='no mask'):
    ours(x, mask=jnp.ones(x.shape, bool))
