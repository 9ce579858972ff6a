"""Scale features: FSDP, gradient accumulation, remat, bfloat16, profiling, compile-only
benchmark.

Steps are called directly on tiny models; whole runs go through `main.py` in subprocesses
with forced CPU device counts, as in test_train.py.
"""

import base64
import collections
import dataclasses
import functools
import gzip
import json
import mmap
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jax_core
from jax.sharding import AbstractMesh, AxisType, PartitionSpec as P

from ssast_jax import config_checks, losses, profiling, sharding
from ssast_jax.check_accumulation import flat, proportional_adam, relative_gap, update_gaps
from ssast_jax.bench import (PEAK_SAMPLES_PER_ROUND, benchmark, devices_peak_flops,
                             peak_memory_bytes, timed_steps)
from ssast_jax.data.demo import write_demo_dataset
from ssast_jax.model import SSAST, ModelConfig
from ssast_jax.train import model_config, step_settings
from runs import ROOT, env, run_main, tiny_config as _config, tiny_run_flags, train_losses
from ssast_jax.train_step import (BATCH_INVARIANT_CPU_OPTIONS, MPC_PASS, MPG_PASS,
                                  batch_gradients, draw_masks, example_keys, init_state,
                                  train_step)


def _step_parts(config):
  mcfg = model_config(config)
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: SSAST(mcfg, nnx.Rngs(0))))
  return mcfg, graphdef, step_settings(config)


def _batch(config, seed=0):
  shape = (config.batch_size, config.data.target_length, config.data.num_mel_bins)
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


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
  abstract = jax.eval_shape(lambda: init_state(model_config(_config()), 0, 1e-4))
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


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  out = tmp_path_factory.mktemp('data')
  return write_demo_dataset(out, num_clips=40, seed=2, target_length=64, num_mel_bins=64)


def _flags(dataset, workdir, **overrides):
  return tiny_run_flags(dataset, workdir, **{
      'lr': 1e-3, 'num_epochs': 1, 'epoch_iter': 100, 'checkpoint_every_steps': 2,
      'max_steps': 4, **overrides})


@pytest.fixture(scope='module')
def data_parallel_run(dataset, tmp_path_factory):
  """8 devices, pure data parallelism, steps 2-3 profiled."""
  workdir = tmp_path_factory.mktemp('data_parallel')
  run_main(_flags(dataset, workdir, profile_steps='2,3'), devices=8)
  return workdir


def test_fsdp_matches_data_parallelism_and_resumes_on_another_mesh(dataset, data_parallel_run,
                                                                   tmp_path):
  """data=2 x fsdp=4 on 8 devices for 2 steps, then resumed as data=1 x fsdp=4 on 4 devices:
  the checkpoints hold FSDP-sharded arrays, restore into the new mesh, and the losses are
  those of data parallelism."""
  workdir = tmp_path / 'fsdp'
  run_main(_flags(dataset, workdir, fsdp=4, max_steps=2), devices=8)
  assert sorted(train_losses(workdir)) == [1, 2]
  result = run_main(_flags(dataset, workdir, fsdp=4), devices=4)
  assert 'resuming from the checkpoint at step 2' in result.stdout
  for step, mesh in ((2, [2, 4]), (4, [1, 4])):
    layout = _saved_layout(workdir, step)
    assert layout['params.blocks.0.mlp.fc1.kernel.value'] == (mesh, [None, 'fsdp'])
    assert layout['opt_state.1.nu.blocks.0.mlp.fc1.kernel.value'] == (mesh, [None, 'fsdp'])
    assert layout['params.blocks.0.mlp.fc1.bias.value'] == (mesh, [])
  expected, got = train_losses(data_parallel_run), train_losses(workdir)
  assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
  np.testing.assert_allclose([got[s] for s in range(1, 5)], [expected[s] for s in range(1, 5)],
                             rtol=1e-5)
  assert len(set(expected.values())) == 4  # the steps learn: the comparison is not vacuous


def _saved_layout(workdir, step):
  """{array name: (mesh shape, partition spec)} that orbax recorded for a checkpoint."""
  path = pathlib.Path(workdir, 'checkpoints', str(step), 'state', '_sharding')
  layout = {}
  for key, value in json.loads(path.read_text()).items():
    sharding_info = json.loads(value)
    layout[base64.b64decode(key).decode()] = (sharding_info['shape'],
                                              sharding_info['partition_spec'])
  return layout


def test_profile_steps_write_a_trace(data_parallel_run):
  traces = list(pathlib.Path(data_parallel_run, 'profile').rglob('*.xplane.pb'))
  assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_fsdp_that_does_not_divide_the_devices_is_refused():
  with pytest.raises(config_checks.ConfigError,
                     match='fsdp is 3, which does not divide the 8 devices'):
    config_checks.check_devices(_config(fsdp=3), 8)


# --- gradient accumulation --------------------------------------------------------------

def test_accumulated_step_is_the_whole_batch_step():
  """grad_accum_steps=4 on a batch of 8 makes the update of one batch of 8.

  The losses agree to float32 rounding (the masks are the same). The update agrees to
  5e-6 relative: the gradients themselves differ by ~1e-6 (1e-7 for the MPG head and
  encoder, 1e-6 for the MPC head, whose gradient is a sum of nearly cancelling terms
  because its loss ignores a shift of all of a clip's predictions), and a learning rate of
  1 keeps float32 rounding of `params + update` below that. A mean taken as a sum would
  be off by 300%, other masks by percents.
  """
  config = _config(lr=1.0)
  mcfg, graphdef, settings = _step_parts(config)
  state = proportional_adam(init_state(mcfg, config.seed, config.lr))
  fbank = _batch(config)
  results = {}
  for accum in (1, 4):
    step = jax.jit(functools.partial(
        train_step, graphdef=graphdef,
        settings=dataclasses.replace(settings, grad_accum_steps=accum)))
    results[accum] = step(state, fbank)
  (whole, whole_metrics), (accumulated, accumulated_metrics) = results[1], results[4]
  for key in ('loss', 'mpc_loss', 'mpg_loss', 'mpc_acc', 'grad_norm'):
    np.testing.assert_allclose(accumulated_metrics[key], whole_metrics[key], rtol=1e-6)
  before = flat(state['params'])
  update = flat(whole['params']) - before
  assert relative_gap(flat(accumulated['params']) - before, update) < 5e-6
  assert int(accumulated['step']) == 1


def _reference_geometry(**overrides):
  """The tiny model (one block unless overridden) on the reference input: 1024 x 128,
  16 x 16 patches, 400 masked, batch 8."""
  return _config(data__target_length=1024, data__num_mel_bins=128, mask_patch=400,
                 eval_mask_patch=400, **overrides)


def test_batch_invariant_accumulation_is_the_whole_batch_update():
  """With `batch_invariant`, grad_accum_steps=4 makes the whole batch's update within 1e-6
  through the step as training compiles it, two blocks at the reference geometry. The
  second batch is one where, without the switch, XLA:CPU rounds a 2-clip micro-batch's
  forward pass differently, a ReLU of the MPG head flips and the gap is 6e-5 (jax 0.10.2)."""
  gaps = update_gaps(_reference_geometry(model__depth=2, grad_accum_steps=4,
                                         batch_invariant=True), 2, log=lambda _: None)
  assert max(gaps) < 1e-6


def test_accumulation_check_needs_micro_batches():
  with pytest.raises(config_checks.ConfigError,
                     match='grad_accum_steps is 1; give 2 or more to compare'):
    update_gaps(_config(), 1)
  with pytest.raises(config_checks.ConfigError, match='--batches is 0; give 1 or more'):
    update_gaps(_config(grad_accum_steps=2), 0)


def test_batch_invariant_encodes_a_clip_alike_in_any_batch():
  """The encoder compiled with `batch_invariant`'s options, on clips 0-1 of a batch of 8
  and on those two alone: bitwise the same outputs (up to 1.8e-6 apart without them)."""
  config = _reference_geometry()
  mcfg, graphdef, _ = _step_parts(config)
  params = init_state(mcfg, 0, 1e-4)['params']
  fbank = _batch(config)
  mask = draw_masks(example_keys(0, 0, MPG_PASS, 8), (8, 64), 400, 'cluster', 3)
  encode = jax.jit(lambda p, x, m: nnx.merge(graphdef, p).encode(x, m),
                   compiler_options=BATCH_INVARIANT_CPU_OPTIONS)
  whole, alone = encode(params, fbank, mask), encode(params, fbank[:2], mask[:2])
  np.testing.assert_array_equal(np.asarray(whole)[:2], np.asarray(alone))


def test_batch_invariant_is_refused_off_the_cpu():
  with pytest.raises(config_checks.ConfigError,
                     match='batch_invariant is an XLA:CPU setting; the devices here are gpu'):
    config_checks.check_devices(_config(batch_invariant=True), 1, 'gpu')
  with pytest.raises(config_checks.ConfigError, match="batch_invariant must be True or False"):
    config_checks.check_config(_config(batch_invariant=None), check_data=False)


def test_accumulated_gradients_keep_each_clips_masks():
  """Micro-batches hold clips i, i + 4, ...: each keeps the mask its global index draws."""
  config = _config(grad_accum_steps=4)
  mcfg, graphdef, settings = _step_parts(config)
  params = init_state(mcfg, 0, 1e-4)['params']
  fbank = _batch(config)
  masks = [draw_masks(example_keys(config.seed, 0, purpose, 8), settings.patch_grid, 6,
                      settings.mask_mode, settings.cluster_factor)
           for purpose in (MPC_PASS, MPG_PASS)]
  grads_of = jax.jit(functools.partial(batch_gradients, graphdef=graphdef, settings=settings))
  metrics, _ = grads_of(params, fbank, *masks)
  model = nnx.merge(graphdef, params)
  per_clip = losses.pretext_losses(model, fbank, *masks, per_clip=True)
  np.testing.assert_allclose(metrics['mpg_loss'], np.mean(per_clip['mpg_loss']), rtol=1e-6)
  shuffled = [m[::-1] for m in masks]
  other, _ = grads_of(params, fbank, *shuffled)
  assert abs(float(other['mpg_loss']) / float(metrics['mpg_loss']) - 1) > 1e-3


def test_batch_must_split_into_micro_batches_over_the_devices():
  with pytest.raises(config_checks.ConfigError,
                     match=r'batch_size / grad_accum_steps = 16 / 4 = 4 clips per micro-batch'
                           r'.*divisible by grad_accum_steps x device count = 32'):
    config_checks.check_devices(_config(batch_size=16, grad_accum_steps=4), 8)
  with pytest.raises(config_checks.ConfigError,
                     match='batch_size 8 is not divisible by grad_accum_steps 3'):
    config_checks.check_config(_config(grad_accum_steps=3), check_data=False)


# --- concurrent parts -------------------------------------------------------------------

def test_concurrent_parts_make_the_whole_batch_step():
  """A batch of 8 computed as 2 or 4 independent parts makes the one-computation update.

  The gradients are the same per-clip gradients summed in another order, so losses agree
  to float32 rounding and the update to 5e-6 relative, as with accumulation; a part given
  other clips' masks would be off by percents (test_accumulated_gradients_keep_each_clips
  _masks)."""
  config = _config(lr=1.0)
  mcfg, graphdef, settings = _step_parts(config)
  state = proportional_adam(init_state(mcfg, config.seed, config.lr))
  fbank = _batch(config)
  results = {}
  for parts in (1, 2, 4):
    step = jax.jit(functools.partial(
        train_step, graphdef=graphdef,
        settings=dataclasses.replace(settings, concurrent_parts=parts)))
    results[parts] = step(state, fbank)
  whole, whole_metrics = results[1]
  before = flat(state['params'])
  for parts in (2, 4):
    split, split_metrics = results[parts]
    for key in ('loss', 'mpc_loss', 'mpg_loss', 'mpc_acc', 'grad_norm'):
      np.testing.assert_allclose(split_metrics[key], whole_metrics[key], rtol=1e-6)
    assert relative_gap(flat(split['params']) - before, flat(whole['params']) - before) < 5e-6


@pytest.mark.parametrize('overrides, devices, platform, expected', [
    ({}, 1, 'cpu', 2),  # auto: 2 on CPU
    ({}, 8, 'cpu', 1),  # one clip per device: nothing to split
    ({'grad_accum_steps': 4}, 2, 'cpu', 1),  # 2 clips per micro-batch on 2 devices
    ({'batch_size': 32, 'grad_accum_steps': 2}, 8, 'cpu', 2),
    ({}, 1, 'gpu', 1),  # accelerators: one computation per step
    ({'concurrent_parts': 4}, 1, 'gpu', 4),  # as given
])
def test_concurrent_parts_auto(overrides, devices, platform, expected):
  assert config_checks.resolved_concurrent_parts(_config(**overrides), devices,
                                                 platform) == expected


def test_concurrent_parts_must_split_over_the_devices():
  with pytest.raises(config_checks.ConfigError,
                     match=r'concurrent_parts is 4: the 8 clips per micro-batch .* do not '
                           r'split into 4 parts shared evenly by the 4 devices; .* = 16'):
    config_checks.check_devices(_config(concurrent_parts=4), 4)
  config_checks.check_devices(_config(concurrent_parts=4), 2)
  with pytest.raises(config_checks.ConfigError,
                     match='concurrent_parts must be an integer >= 0; got -1'):
    config_checks.check_config(_config(concurrent_parts=-1), check_data=False)


# --- remat ------------------------------------------------------------------------------

def test_remat_gives_the_same_gradients_with_less_memory():
  config = _config(model__depth=4, data__target_length=256, batch_size=8)
  fbank = _batch(config)
  results = {}
  for remat, policy in ((False, 'nothing_saveable'), (True, 'nothing_saveable'),
                        (True, 'dots_with_no_batch_dims_saveable')):
    config.remat, config.remat_policy = remat, policy
    mcfg, graphdef, settings = _step_parts(config)
    params = init_state(mcfg, 0, 1e-4)['params']
    masks = [draw_masks(example_keys(0, 0, purpose, 8), settings.patch_grid, 6,
                        settings.mask_mode, settings.cluster_factor)
             for purpose in (MPC_PASS, MPG_PASS)]
    compiled = jax.jit(functools.partial(batch_gradients, graphdef=graphdef,
                                         settings=settings)).lower(params, fbank, *masks).compile()
    metrics, grads = compiled(params, fbank, *masks)
    results[remat, policy] = float(metrics['loss']), flat(grads), peak_memory_bytes(compiled)
  plain_loss, plain_grads, plain_memory = results[False, 'nothing_saveable']
  for loss, grads, _ in results.values():
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
    np.testing.assert_allclose(grads, plain_grads, rtol=0, atol=1e-6 * np.abs(plain_grads).max())
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
    config = _config(dtype=dtype, lr=1e-3, model__depth=2)
    mcfg, graphdef, settings = _step_parts(config)
    state = init_state(mcfg, 0, config.lr)
    step = jax.jit(functools.partial(train_step, graphdef=graphdef, settings=settings))
    batches = [_batch(config, seed) for seed in range(4)]
    history = []
    for i in range(8):
      state, metrics = step(state, batches[i % 4])
      history.append([float(metrics[k]) for k in ('loss', 'mpc_loss', 'mpg_loss')])
    assert {str(x.dtype) for x in jax.tree.leaves((state['params'], state['opt_state']))
            } == {'float32', 'int32'}  # int32: Adam's step count
    losses_by_dtype[dtype] = np.array(history)
  np.testing.assert_allclose(losses_by_dtype['bfloat16'], losses_by_dtype['float32'], rtol=0.02)
  assert not np.array_equal(losses_by_dtype['bfloat16'], losses_by_dtype['float32'])


# --- profiling and the benchmark --------------------------------------------------------

@pytest.mark.parametrize('value, expected', [('', None), ('7', (7, 7)), ('10,15', (10, 15)),
                                             (' 2, 3', (2, 3))])
def test_profile_steps_parse(value, expected):
  assert config_checks.profile_range(_config(profile_steps=value)) == expected


@pytest.mark.parametrize('value', ['0', '5,3', '1,2,3', 'ten'])
def test_bad_profile_steps_are_refused(value):
  with pytest.raises(config_checks.ConfigError, match='profile_steps must be "FIRST,LAST"'):
    config_checks.check_config(_config(profile_steps=value), check_data=False)


HLO_LINES = '\n'.join([
    '  %ynn_fusion.3 = f32[8,3,514,514]{3,2,1,0} fusion(%a), kind=kCustom, metadata={op_name='
    '"jit(train_step)/jvp(attention_core)/reduce_max" stack_frame_id=3}',
    '  ROOT %dot.2 = f32[192,768]{1,0} dot(%b, %c), metadata={op_name='
    '"jit(train_step)/transpose(jvp(mlp_fc1))/transpose"}',
    '  %add.1 = f32[8]{0} add(%d, %e), metadata={op_name="jit(train_step)/jvp()/add"}',
    '  %param.0 = f32[] parameter(0)'])


def test_instruction_scopes_come_from_op_names():
  assert profiling.instruction_scopes(HLO_LINES) == {
      'ynn_fusion.3': ('attention_core', 'forward'), 'dot.2': ('mlp_fc1', 'backward'),
      'add.1': ('other', 'forward')}


def test_time_by_scope_sums_trace_events_per_run(tmp_path):
  events = [{'ph': 'X', 'name': 'ynn_fusion.3', 'dur': 3000}, {'ph': 'X', 'name': 'dot.2',
            'dur': 1000}, {'ph': 'X', 'name': 'ynn_fusion.3', 'dur': 5000},
            {'ph': 'X', 'name': 'ThunkExecutor::Execute', 'dur': 9000},
            {'ph': 'i', 'name': 'add.1', 'dur': 7000}]
  run_dir = tmp_path / 'plugins' / 'profile' / 'run'
  run_dir.mkdir(parents=True)
  with gzip.open(run_dir / 'host.perfetto_trace.json.gz', 'wt') as f:
    json.dump({'traceEvents': events}, f)
  assert profiling.time_by_scope(str(tmp_path), HLO_LINES, runs=2) == {
      'attention_core': {'forward': 4.0, 'backward': 0.0},
      'mlp_fc1': {'forward': 0.0, 'backward': 0.5}}


def test_benchmark_breakdown_covers_every_part_of_the_encoder_in_both_joint_modes():
  """`breakdown` traces the timed steps of each compared mode, each from its own trace:
  every encoder scope shows up forward and backward, masking and the optimiser forward
  only, and each mode's table is logged under its own header."""
  logged = []
  result = benchmark(_config(model__depth=2, mpc_trains_encoder=True), steps=1,
                     warmup_steps=1, breakdown=True, compare_joint_passes=True,
                     log=logged.append)
  two, one = result['time_by_scope'], result['joint_passes_1']['time_by_scope']
  for table in (two, one):
    for scope in ('attention_core', 'qkv_proj', 'attention_out_proj', 'mlp_fc1', 'gelu',
                  'mlp_fc2', 'layer_norm', 'patch_embed', 'pretext_heads', 'pretext_losses'):
      assert table[scope]['forward'] > 0 and table[scope]['backward'] > 0, scope
    for scope in ('masking', 'optimizer'):
      assert table[scope]['forward'] > 0 and table[scope]['backward'] == 0, scope
  assert two != one
  assert [line for line in logged if line.startswith('time by scope')] == [
      'time by scope, joint_passes=2:', 'time by scope, joint_passes=1:']
  assert sum(line.startswith('attention_core ') for line in logged) == 2
  assert result['mfu'] == pytest.approx(result['achieved_flops'] / result['matmul_peak_flops'])


def test_benchmark_compares_joint_passes_in_one_run():
  """Both joint modes are timed in turns, and, as the original's MPC pass has no backward
  through the encoder, so are two full passes (`mpc_trains_encoder=True`). The one-pass
  step does about half the work of two full passes (one encoder forward and backward
  instead of two) and 3/4 of the original's two passes (its MPC pass only runs forward);
  each speed-up is the median over the rounds of the ratio of the two steps' times in the
  round, so that a drift of the host's speed between rounds cancels."""
  logged = []
  result = benchmark(_config(model__depth=1), steps=3, warmup_steps=1,
                     compare_joint_passes=True, log=logged.append)
  one, full = result['joint_passes_1'], result['two_full_passes']
  assert [(r['joint_passes'], r['mpc_trains_encoder']) for r in (result, one, full)] == [
      (2, False), (1, False), (2, True)]
  assert 0.4 < one['flops_per_step'] / full['flops_per_step'] < 0.6
  assert 0.65 < one['flops_per_step'] / result['flops_per_step'] < 0.85
  times = [r['step_times_s'] for r in (result, one, full)]
  assert [len(t) for t in times] == [3, 3, 3]
  assert [r['step_s'] for r in (result, one, full)] == [sorted(t)[1] for t in times]
  assert result['one_pass_speedup'] == sorted(
      two / single for two, single in zip(times[0], times[1]))[1]
  assert result['one_pass_speedup_vs_two_full_passes'] == sorted(
      two / single for two, single in zip(times[2], times[1]))[1]
  assert one['matmul_peak_flops'] == full['matmul_peak_flops'] == result['matmul_peak_flops']
  assert result['matmul_peak_samples'] == 3 * PEAK_SAMPLES_PER_ROUND
  assert logged[-1].startswith('step 3/3: ') and logged[-1].count(' s') == 3


def test_benchmark_compares_config_overrides_in_one_run():
  """`compare_with` times the config with its overrides in turns with the config itself;
  values are Python literals (`True`) or strings (`bfloat16`)."""
  result = benchmark(_config(model__depth=1), steps=2, warmup_steps=1,
                     compare_with='batch_invariant=True, dtype=bfloat16', log=lambda m: None)
  compared = result['compared']
  assert (result['batch_invariant'], result['dtype']) == (False, 'float32')
  assert (compared['batch_invariant'], compared['dtype']) == (True, 'bfloat16')
  assert compared['overrides'] == 'batch_invariant=True, dtype=bfloat16'
  assert result['compared_speedup'] == pytest.approx(sum(
      this / that for this, that in zip(result['step_times_s'], compared['step_times_s'])) / 2)
  assert compared['matmul_peak_flops'] == result['matmul_peak_flops'] > 0


@pytest.mark.parametrize('overrides, message', [
    ('batch_invariant', "'batch_invariant' is not KEY=VALUE"),
    ('model.nope=1', "the config has no key 'model.nope'"),
    ('nope.depth=1', "the config has no key 'nope.depth'"),
    ('batch_invariant=yes', 'batch_invariant=yes: Could not override'),
    ('grad_accum_steps=3', 'batch_size 8 is not divisible by grad_accum_steps 3'),
])
def test_bad_comparison_overrides_are_refused(overrides, message):
  with pytest.raises(config_checks.ConfigError, match=message):
    benchmark(_config(), steps=1, compare_with=overrides)


def test_one_comparison_per_run():
  with pytest.raises(config_checks.ConfigError,
                     match='--compare_joint_passes and --compare_with each add a second step'):
    benchmark(_config(), steps=1, compare_joint_passes=True, compare_with='remat=True')


def test_timed_steps_count_each_steps_page_faults_and_run_between_rounds():
  """A 'step' that writes 8 MiB of freshly mapped memory faults in at least its 2,048 pages
  each time (`page_faults_per_step` shows whether freed memory is reused); `after_round`
  runs once after each timed round (the peak matmul samples), not after warm-up steps."""
  def step_on_fresh_pages(state, batch):
    with mmap.mmap(-1, 8 << 20) as fresh:
      fresh.write(b'x' * (8 << 20))
    return state + 1, batch

  rounds_done = []
  times, faults, states = timed_steps([(step_on_fresh_pages, 0, np.zeros(1))], steps=3,
                                      warmup_steps=1, log=lambda m: None,
                                      after_round=lambda: rounds_done.append(1))
  assert len(times[0]) == 3 and states == [4] and len(rounds_done) == 3
  assert all(count >= 2048 for count in faults[0]), faults


def test_peak_is_the_median_of_the_samples_taken_between_steps():
  """On CPU the devices share the cores, so the peak is one device's median rate, not
  times the device count; one slow or fast sample does not move it."""
  assert jax.devices()[0].platform == 'cpu'
  assert devices_peak_flops([3.0, 1.0, 100.0, 2.0, 4.0]) == 3.0


def test_compile_only_comparison_reports_both_joint_modes():
  result = benchmark(_config(model__depth=1, mpc_trains_encoder=True), steps=0,
                     compare_joint_passes=True, log=lambda m: None)
  one = result['joint_passes_1']
  assert 'step_s' not in result and (result['joint_passes'], one['joint_passes']) == (2, 1)
  assert 0.4 < one['flops_per_step'] / result['flops_per_step'] < 0.6


def test_benchmark_counts_the_whole_steps_flops_on_any_device_count():
  """`flops_per_step` is the work of the whole step, not one device's share (which would
  halve it on 2 devices). Every data-parallel device repeats the optimiser update and
  sums gradients, 4% of this one-block model's step (0.1% of the reference step)."""
  def compiled_flops(devices):
    config = ['--config.model.size=tiny', '--config.model.depth=1',
              '--config.data.target_length=64', '--config.data.num_mel_bins=64',
              '--config.mask_patch=6', '--config.eval_mask_patch=6', '--config.batch_size=8']
    run = subprocess.run(
        [sys.executable, '-m', 'ssast_jax.bench', '--config', str(ROOT / 'configs' /
         'pretrain_joint.py'), *config, '--steps=0'], env=env(devices), capture_output=True,
        text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result['devices'] == devices
    return result['flops_per_step']

  assert compiled_flops(2) == pytest.approx(compiled_flops(1), rel=0.05)


def test_breakdown_needs_timed_steps():
  with pytest.raises(config_checks.ConfigError,
                     match='--breakdown traces the timed steps; it needs --steps >= 1'):
    benchmark(_config(), steps=0, breakdown=True)


def test_joint_pass_comparison_needs_the_joint_task():
  with pytest.raises(config_checks.ConfigError, match="--compare_joint_passes needs task "
                     "pretrain_joint; got 'pretrain_mpg'"):
    benchmark(_config(task='pretrain_mpg'), steps=1, compare_joint_passes=True)


def test_compile_only_benchmark_reports_memory_and_model_flops():
  """`steps=0` compiles without running; with remat and accumulation it still reports the
  FLOPs of the plain step (XLA counts a loop's body once)."""
  logged = []
  plain = benchmark(_config(model__depth=2), steps=0, log=logged.append)
  scaled = benchmark(_config(model__depth=2, remat=True, grad_accum_steps=2), steps=0,
                     log=logged.append)
  assert 'step_s' not in plain and 'mfu' not in plain
  assert scaled['flops_per_step'] == plain['flops_per_step'] > 0
  assert plain['peak_memory_bytes'] > 0 and scaled['peak_memory_bytes'] > 0
  assert (plain['mesh'], scaled['grad_accum_steps'], scaled['remat']) == (
      {'data': 1, 'fsdp': 1}, 2, True)
  assert plain['concurrent_parts'] == scaled['concurrent_parts'] == 2  # auto, on one CPU
  assert logged.count('compiling the step without remat and accumulation to count its '
                      'FLOPs ...') == 1
