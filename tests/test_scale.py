"""Scale features: FSDP, gradient accumulation, remat, bfloat16, profiling.

Steps are called directly on tiny models; whole runs on several meshes (FSDP included,
with a profile) are in test_train.py.
"""

import collections
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jax_core
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from ssast_jax.config.settings import ConfigError, check_devices, resolve
from ssast_jax.model import SSAST, ModelConfig, abstract_model
from ssast_jax.objective import losses
from ssast_jax.training import sharding
from ssast_jax.training.state import init_state
from ssast_jax.training.step import (MPC_PASS, MPG_PASS, batch_gradients, draw_masks,
                                     train_step, without_invariant_directions)
from runs import ROOT, tiny_config as _config

sys.path.insert(0, str(ROOT))
from benchmarks import accumulation  # noqa: E402
from benchmarks.accumulation import flat  # noqa: E402


def _settings(config):
  return resolve(config, check_data=False)


def _step_parts(config):
  settings = _settings(config)
  graphdef, _ = abstract_model(settings.model)
  return settings.model, graphdef, settings


def _batch(settings, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=settings.batch_shape)
                     .astype(np.float32))


def _masks(settings, step=0):
  return draw_masks(settings, step, (MPC_PASS, MPG_PASS), settings.objective.mask_patch,
                    settings.optim.batch_size)


def peak_memory_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


# --- FSDP -------------------------------------------------------------------------------

@pytest.mark.parametrize('shape, fsdp, spec', [
    ((192, 576), 4, P(None, 'fsdp')),  # the largest divisible dimension
    ((768, 192), 4, P('fsdp', None)),
    ((1, 514, 768), 4, P(None, None, 'fsdp')),  # 514 is not divisible by 4
    ((256, 192), 8, P('fsdp', None)),
    ((256, 192), 1, P()),  # no fsdp axis
    ((3072,), 4, P()),  # small: replicated
    ((129, 131), 4, P()),  # no divisible dimension
])
def test_fsdp_spec(shape, fsdp, spec):
  assert sharding.fsdp_spec(shape, fsdp) == spec


def test_adam_moments_are_sharded_like_their_parameters():
  mesh = AbstractMesh((2, 4), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 2)
  abstract = jax.eval_shape(lambda: init_state(_settings(_config()).model, 0, 1e-4))
  specs = jax.tree.map(lambda s: s.spec, sharding.state_shardings(abstract, mesh))
  adam = specs['opt_state'][1]
  assert jax.tree.leaves(adam.mu) == jax.tree.leaves(specs['params'])
  assert jax.tree.leaves(adam.nu) == jax.tree.leaves(specs['params'])
  assert adam.count == P()
  block = specs['params']['blocks'][0]
  assert (block['mlp']['fc1']['kernel'], block['mlp']['fc1']['bias']) == (
      P(None, 'fsdp'), P())
  sharded = [s for s in jax.tree.leaves(specs['params']) if s != P()]
  assert len(sharded) == 9  # the 2-D kernels of the blocks, the heads and the patch embedding


def test_fsdp_that_does_not_divide_the_devices_is_refused():
  with pytest.raises(ConfigError, match='fsdp is 3, which does not divide the 8 devices'):
    check_devices(_settings(_config(fsdp=3)), 8)


# --- gradient accumulation --------------------------------------------------------------

def test_accumulated_step_is_the_whole_batch_step():
  """grad_accum_steps=4 on a batch of 8 makes the step of one batch of 8, as training
  compiles it (`benchmarks/accumulation.py`, learning rate 1, Adam set so that an update is
  the gradient).

  The logged metrics agree to float32 rounding (the masks are the same). The update agrees
  to 5e-6 relative: the gradients themselves differ by ~1e-6 (1e-7 for the MPG head and
  encoder, 1e-6 for the MPC head, whose gradient is a sum of nearly cancelling terms
  because its loss ignores a shift of all of a clip's predictions), and a learning rate of
  1 keeps float32 rounding of `params + update` below that. A mean taken as a sum would
  be off by 300%, other masks by percents.
  """
  [gaps] = accumulation.step_gaps(_config(grad_accum_steps=4), 1, log=lambda message: None)
  assert 0 <= gaps.pop('update') < 5e-6
  assert sorted(gaps) == sorted(accumulation.METRICS)
  assert all(0 <= gap < 1e-6 for gap in gaps.values()), gaps


def test_accumulated_gradients_keep_each_clips_masks():
  """Micro-batches hold clips i, i + 4, ...: each keeps the mask its global index draws."""
  mcfg, graphdef, settings = _step_parts(_config(grad_accum_steps=4))
  params = init_state(mcfg, 0, 1e-4)['params']
  fbank = _batch(settings)
  masks = _masks(settings)
  grads_of = jax.jit(functools.partial(batch_gradients, graphdef=graphdef, settings=settings))
  metrics, _ = grads_of(params, fbank, *masks)
  model = nnx.merge(graphdef, params)
  per_clip = losses.pretext_losses(model, fbank, *masks, per_clip=True)
  np.testing.assert_allclose(metrics['mpg_loss'], np.mean(per_clip['mpg_loss']), rtol=1e-6)
  shuffled = [m[::-1] for m in masks]
  other, _ = grads_of(params, fbank, *shuffled)
  assert abs(float(other['mpg_loss']) / float(metrics['mpg_loss']) - 1) > 1e-3


def test_batch_must_split_into_micro_batches_over_the_devices():
  with pytest.raises(ConfigError,
                     match=r'batch_size / grad_accum_steps = 16 / 4 = 4 clips per micro-batch'
                           r'.*divisible by grad_accum_steps x device count = 32'):
    check_devices(_settings(_config(batch_size=16, grad_accum_steps=4)), 8)
  with pytest.raises(ConfigError, match='batch_size 8 is not divisible by grad_accum_steps 3'):
    _settings(_config(grad_accum_steps=3))


# --- remat ------------------------------------------------------------------------------

def test_remat_gives_the_same_gradients_with_less_memory():
  results = {}
  for remat, policy in ((False, 'nothing_saveable'), (True, 'nothing_saveable'),
                        (True, 'dots_with_no_batch_dims_saveable')):
    mcfg, graphdef, settings = _step_parts(_config(
        model__depth=4, data__target_length=256, batch_size=8, remat=remat,
        remat_policy=policy))
    fbank = _batch(settings)
    params = init_state(mcfg, 0, 1e-4)['params']
    masks = _masks(settings)
    compiled = jax.jit(functools.partial(batch_gradients, graphdef=graphdef,
                                         settings=settings)).lower(params, fbank, *masks).compile()
    metrics, grads = compiled(params, fbank, *masks)
    results[remat, policy] = float(metrics['loss']), flat(grads), peak_memory_bytes(compiled)
  plain_loss, plain_grads, plain_memory = results[False, 'nothing_saveable']
  for loss, grads, _ in results.values():
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
    np.testing.assert_allclose(grads, plain_grads, rtol=0, atol=2e-6 * np.abs(plain_grads).max())
  least = results[True, 'nothing_saveable'][2]
  some = results[True, 'dots_with_no_batch_dims_saveable'][2]
  assert least < some < plain_memory
  assert least < 0.8 * plain_memory  # measured 0.73; the saving grows with depth and tokens


# --- bfloat16 ---------------------------------------------------------------------------

def _equation_dtypes(jaxpr, counts=None):
  """(primitive, output dtype) -> count over `jaxpr` and the jaxprs nested in it."""
  counts = collections.Counter() if counts is None else counts
  for eqn in jaxpr.eqns:
    for value in eqn.params.values():
      if isinstance(value, jax_core.ClosedJaxpr):
        _equation_dtypes(value.jaxpr, counts)
      elif isinstance(value, jax_core.Jaxpr):
        _equation_dtypes(value, counts)
    counts[eqn.primitive.name, str(eqn.outvars[0].aval.dtype)] += 1
  return counts


def test_bfloat16_computes_in_bfloat16_but_keeps_statistics_in_float32():
  mcfg = ModelConfig.from_size('tiny', depth=1, input_fdim=64, input_tdim=64,
                               dtype='bfloat16')
  graphdef, params = nnx.split(SSAST(mcfg, nnx.Rngs(0)))
  fbank, mask = jnp.zeros((2, 64, 64)), jnp.tile(jnp.arange(6), (2, 1))

  def loss(params):
    return losses.pretext_losses(nnx.merge(graphdef, params), fbank, mask, mask)['loss']

  counts = _equation_dtypes(jax.make_jaxpr(jax.value_and_grad(loss))(params).jaxpr)
  assert counts['dot_general', 'bfloat16'] > 0  # the matmuls run in bfloat16
  # softmax maxima, log-softmax, LayerNorm's 1/sqrt(var): float32 only
  for primitive in ('reduce_max', 'log', 'rsqrt'):
    dtypes = {dtype for name, dtype in counts if name == primitive}
    assert dtypes == {'float32'}, (primitive, dtypes)


def test_bfloat16_training_follows_float32():
  """8 steps over 4 batches: the losses stay within 2% of float32's (measured: 0.1%);
  parameters and Adam's moments stay float32."""
  losses_by_dtype = {}
  for dtype in ('float32', 'bfloat16'):
    mcfg, graphdef, settings = _step_parts(_config(dtype=dtype, lr=1e-3, model__depth=2))
    state = init_state(mcfg, 0, 1e-3)
    step = jax.jit(functools.partial(train_step, graphdef=graphdef, settings=settings))
    batches = [_batch(settings, seed) for seed in range(4)]
    history = []
    for i in range(8):
      state, metrics = step(state, batches[i % 4])
      history.append([float(metrics[k]) for k in ('loss', 'mpc_loss', 'mpg_loss')])
    assert {str(x.dtype) for x in jax.tree.leaves((state['params'], state['opt_state']))
            } == {'float32', 'int32'}  # int32: Adam's step count
    losses_by_dtype[dtype] = np.array(history)
  np.testing.assert_allclose(losses_by_dtype['bfloat16'], losses_by_dtype['float32'], rtol=0.02)
  assert not np.array_equal(losses_by_dtype['bfloat16'], losses_by_dtype['float32'])


# --- profiling -----------------------------------------------------------------------------

@pytest.mark.parametrize('value, expected', [('', None), ('7', (7, 7)), ('10,15', (10, 15)),
                                             (' 2, 3', (2, 3))])
def test_profile_steps_parse(value, expected):
  assert _settings(_config(profile_steps=value)).run.profile_steps == expected


@pytest.mark.parametrize('value', ['0', '5,3', '1,2,3', 'ten'])
def test_bad_profile_steps_are_refused(value):
  with pytest.raises(ConfigError, match='profile_steps must be "FIRST,LAST"'):
    _settings(_config(profile_steps=value))


# --- directions no loss depends on ------------------------------------------------------

def test_invariant_directions_are_zeroed_and_no_loss_depends_on_them():
  """The key third of each qkv bias and the cpred output bias get a zero gradient; moving
  them leaves every loss as it was (to float rounding), and nothing else is zeroed."""
  mcfg, graphdef, settings = _step_parts(_config(model__depth=2))
  params = init_state(mcfg, 0, 1e-4)['params']
  ones = without_invariant_directions(jax.tree.map(jnp.ones_like, params))
  qkv_bias = np.asarray(ones['blocks'][1]['attn']['qkv']['bias'][...])
  assert qkv_bias[:192].all() and not qkv_bias[192:384].any() and qkv_bias[384:].all()
  assert not np.asarray(ones['cpred']['out']['bias'][...]).any()
  assert flat(ones).sum() == flat(params).size - 2 * 192 - 256

  fbank, masks = _batch(settings), _masks(settings)
  def all_losses(params):
    return losses.pretext_losses(nnx.merge(graphdef, params), fbank, *masks)
  shifted = jax.tree.map(lambda p, keep: p + 0.5 * (1 - keep), params, ones)
  before, after = all_losses(params), all_losses(shifted)
  for key in ('loss', 'mpc_loss', 'mpg_loss', 'mpc_acc'):
    np.testing.assert_allclose(float(after[key]), float(before[key]), rtol=1e-5, err_msg=key)
  moved = jax.tree.map(lambda p: p + 0.5, params)
  assert abs(float(all_losses(moved)['loss']) / float(before['loss']) - 1) > 1e-3
