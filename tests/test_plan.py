"""`python -m ssast_jax.plan`: the run's own steps compiled for TPU and GPU targets this
machine does not have (the backends of requirements-compile.txt), their memory, FLOPs and
fit decisions, the search, and the one-line refusals."""

import json
import math
from unittest import mock
import re
import subprocess
import sys

import jax
import pytest

from ssast_jax import accelerators
from ssast_jax.config import defaults
from ssast_jax.config.finetune import default_config as finetune_defaults
from ssast_jax.config.settings import ConfigError
from ssast_jax.model import ModelConfig
from ssast_jax.plan import compile as plan_compile, search
from ssast_jax.training import sharding
from tests import runs

TINY = {'model.size': 'tiny', 'model.depth': 1, 'data.target_length': 64,
        'data.num_mel_bins': 64, 'mask_patch': 4, 'eval_mask_patch': 4, 'batch_size': 8}


def _config(**overrides):
  config = defaults.get_config()
  for key, value in {**TINY, **overrides}.items():
    *parents, name = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  return config


def _target(name):
  target = accelerators.parse(name)
  return target, accelerators.devices(target)


def _plan(config, name, **options):
  return plan_compile.plan_run(config, *_target(name), **options)


@pytest.mark.parametrize('name, kind, count', [('v5e-4', 'TPU v5 lite', 4),
                                               ('h100x2', 'NVIDIA H100 80GB HBM3', 2),
                                               ('v100x2', 'Tesla V100-SXM2-32GB', 2)])
def test_a_tiny_run_compiles_for_a_tpu_slice_and_gpus(name, kind, count):
  record = _plan(_config(), name, run_clips=8000)
  assert (record['device_kind'], record['devices'], record['batch_per_device']) == (
      kind, count, 8 / count)
  assert record['fits'] and record['eval']['fits']
  assert 0 < record['peak_bytes_per_device'] < record['capacity_bytes_per_device']
  memory = record['memory']
  assert record['peak_bytes_per_device'] == (memory['arguments'] + memory['outputs']
                                             - memory['aliased'] + memory['temporaries'])
  assert memory['aliased'] > 0.9 * (memory['params'] + memory['optimizer'])  # donated
  # Data parallelism: the gradients are all-reduced once a step, about their own size.
  assert record['collectives']['all-reduce']['bytes'] >= memory['params'] - 4096
  assert record['flops_per_device_per_step'] > 0
  step = record['estimated_step_s']
  assert step == max(record['roofline_s'].values()) > 0
  assert record['estimated_clips_per_s'] == pytest.approx(8 / step)
  assert record['estimated_run_hours'] == pytest.approx(8000 / (8 / step) / 3600)


def test_tpu_flops_per_device_add_up_to_the_global_step_on_the_cpu():
  """A model wide enough that XLA's TPU count of the exact GELU (a polynomial, where the
  CPU counts one transcendental) stays small: 1.5% measured."""
  config = _config(**{'model.size': 'base', 'data.target_length': 256,
                      'data.num_mel_bins': 128, 'mask_patch': 20, 'eval_mask_patch': 20})
  tpu = _plan(config, 'v5e-4', with_eval=False)
  built = plan_compile.build(config, jax.devices('cpu')[:1]).train
  cpu = plan_compile._cost(built.jitted.lower(*built.args).compile())  # pylint: disable=protected-access
  assert tpu['cost_source'] == 'target compile'
  assert tpu['flops_per_device_per_step'] * 4 == pytest.approx(cpu['flops'], rel=0.02)


def test_fsdp_divides_the_sharded_state_per_device():
  whole = _plan(_config(), 'v5e-4', with_eval=False)
  split = _plan(_config(fsdp=4), 'v5e-4', with_eval=False)
  abstract = plan_compile.build(_config(), jax.devices('cpu')[:1]).state['params']
  sharded = sum(math.prod(leaf.shape) * 4 for leaf in jax.tree.leaves(abstract)
                if sharding.fsdp_spec(leaf.shape, 4) != sharding.P())
  assert sharded > 0.5 * whole['memory']['params']
  assert split['memory']['params'] == whole['memory']['params'] - sharded * 3 // 4
  assert split['memory']['optimizer'] == whole['memory']['optimizer'] - 2 * sharded * 3 // 4
  # The compiled program's arguments (parameters and both Adam moments), in the TPU's
  # tiled layouts: 1.2% from the unpadded sizes here.
  saved = whole['memory']['arguments'] - split['memory']['arguments']
  assert saved == pytest.approx(3 * sharded * 3 / 4, rel=0.03)


@pytest.mark.parametrize('name, batch', [('v5e-1', 4096), ('h100', 16384)])
def test_an_oversized_run_does_not_fit(name, batch):
  """Attention over 258 tokens for thousands of clips: over 16 GiB (v5e) and over the
  H100's 60 GiB that JAX may use (119 GiB measured)."""
  record = _plan(_config(**{'data.target_length': 1024, 'batch_size': batch}), name,
                 with_eval=False)
  assert record['fits'] is False
  if name == 'h100':
    assert record['peak_bytes_per_device'] > record['capacity_bytes_per_device']
    assert record['margin_bytes'] < 0
  else:
    assert 'RESOURCE_EXHAUSTED' in record['compiler_error'] or 'memory' in record['compiler_error']


def test_a_fine_tuning_config_compiles_its_own_step():
  config = finetune_defaults()
  config.update_from_flattened_dict({'pretrained': '/not/here.pth', 'data.target_length': 64,
                                     'data.num_mel_bins': 64, 'fstride': 16, 'tstride': 16,
                                     'batch_size': 8})
  encoder = ModelConfig.from_size('tiny', depth=1)
  record = _plan(config, 'v5e-4', encoder=encoder, num_labels=10)
  assert (record['task'], record['fits'], record['batch_per_device']) == ('ft_avgtok', True, 2)
  assert record['memory']['params'] > 0 and record['eval']['fits']


def test_the_search_finds_the_largest_batch_that_fits():
  """On an H100 of which JAX may use 1/2000 (42 MB): the batch found fits and 1/16 more
  does not."""
  target, devices = _target('h100')
  options = dict(gpu_memory_fraction=5e-4)
  best = search.largest_batch(_config(), target, devices, **options)
  batch = int(best['batch_per_device'])
  assert best['fits'] and best['compiles'] <= 8 and batch > 8
  assert best['estimated_clips_per_s'] > 0  # the chosen batch, and only it, is estimated
  assert 'cost_source' in best
  above = search.with_setting(_config(), batch_per_device=batch + max(1, batch // 16),
                              devices=1)
  assert not plan_compile.plan_run(above, target, devices, with_eval=False, **options)['fits']


def test_the_search_reports_each_setting_as_found_and_marks_the_fastest():
  target, devices = _target('h100')
  speeds = iter([10.0, 30.0, 20.0, 5.0, 40.0, 1.0, 2.0, 3.0])
  found = []
  with mock.patch.object(search, 'largest_batch', side_effect=lambda config, *_, **__: {
      'fits': True, 'dtype': config.dtype, 'estimated_clips_per_s': next(speeds)}):
    rows = search.search(_config(), target, devices, progress=found.append)
  assert found == rows and len(rows) == 2 * len(search.remat_settings())
  assert [row['fastest'] for row in rows] == [False] * 4 + [True] + [False] * 3


def _cli(*args):
  return subprocess.run([sys.executable, '-m', 'ssast_jax.plan',
                         '--config=configs/pretrain_joint.py', *args] +
                        [f'--config.{k}={v}' for k, v in TINY.items() if f'--config.{k}=' not in
                         ' '.join(args)],
                        capture_output=True, text=True, cwd=runs.ROOT, timeout=600)


def test_the_command_prints_a_table_and_json():
  out = _cli('--target=h100x2', '--json', '--clips=800', '--no_eval')
  assert out.returncode == 0, out.stderr[-2000:]
  record = json.loads(out.stdout.strip().splitlines()[-1])
  for key in ('target', 'device_kind', 'devices', 'batch_per_device', 'fits',
              'peak_bytes_per_device', 'capacity_bytes_per_device',
              'flops_per_device_per_step', 'estimated_step_s', 'estimated_clips_per_s'):
    assert key in record
  assert record['target'] == 'h100x2' and record['fits'] is True
  assert 'compiler estimates, not measurements' in out.stdout


@pytest.mark.parametrize('args, message', [
    (('--target=v5e-4', '--config.batch_size=6'),
     r'batch_size must be divisible by grad_accum_steps x device count = 4'),
    (('--target=v5e-4', '--config.fsdp=3'), r'fsdp is 3, which does not divide the 4 devices'),
    (('--target=v100x2', '--config.dtype=bfloat16'), r'set --config.dtype=float32'),
    (('--target=v5e-6',), r"no TPU v5e slice of that size \(sizes are powers of two: "
                          r"v5e-1, v5e-2, v5e-4, v5e-8, ...\)"),
    (('--target=v5p-12',), r"sizes are powers of two: v5p-8, v5p-16, v5p-32, v5p-64, ...\)"),
])
def test_a_config_that_cannot_run_there_ends_in_one_line(args, message):
  out = _cli(*args)
  assert out.returncode == 2
  lines = [line for line in out.stderr.splitlines() if line.startswith('error: ')]
  assert len(lines) == 1
  assert re.search(message, lines[0]), lines[0]



def test_gpu_code_is_assembled_by_the_cuda_12_ptxas_of_the_compile_backends():
  """The V100 row above needs it (CUDA 13's ptxas dropped the V100); without an assembler
  for the GPU, one line says what to install; other errors of ptxas pass through."""
  root = accelerators.cuda_compile_options()['xla_gpu_cuda_data_dir']
  assert root.startswith(accelerators.BACKENDS_DIR)
  step = plan_compile.build(_config(), _target('v100x2')[1]).train
  error = RuntimeError('UNIMPLEMENTED: /usr/local/bin/ptxas ptxas too old. Falling back')
  with mock.patch.object(plan_compile, '_compile', side_effect=error), \
       pytest.raises(ConfigError, match=r'ptxas too old.*install requirements-compile.txt'):
    plan_compile.compile_step(step, 'cuda')
  other = RuntimeError('INTERNAL: ptxas exited with non-zero error code 9, output: killed')
  with mock.patch.object(plan_compile, '_compile', side_effect=other), \
       pytest.raises(RuntimeError, match='non-zero error code 9'):
    plan_compile.compile_step(step, 'cuda')


def test_remat_and_accumulation_are_counted_without_their_loops():
  """XLA counts a loop's body once: the FLOPs of a rematerialised or accumulated step are
  those of the same step without loops (compiled for the TPU), and the roofline adds
  remat's recomputation. Twice the clips is a little under twice the FLOPs (the optimiser
  update is counted once): 3% here."""
  name = 'v5e-4'
  plain = _plan(_config(), name, with_eval=False)
  remat = _plan(_config(remat=True), name, with_eval=False)
  accumulated = _plan(_config(grad_accum_steps=2, batch_size=16), name, with_eval=False)
  assert remat['flops_per_device_per_step'] == plain['flops_per_device_per_step']
  assert remat['recompute_factor'] == pytest.approx(4 / 3)
  assert 'without loops' in remat['cost_source']
  assert remat['roofline_s']['compute'] == pytest.approx(plain['roofline_s']['compute'] * 4 / 3)
  assert remat['roofline_s']['memory'] == pytest.approx(plain['roofline_s']['memory'] * 4 / 3)
  assert accumulated['recompute_factor'] == 1
  assert accumulated['flops_per_device_per_step'] == pytest.approx(
      2 * plain['flops_per_device_per_step'], rel=0.05)
  assert 'without loops' in accumulated['cost_source']


def test_a_loop_free_step_too_large_for_the_chip_is_costed_at_half_the_batch_and_scaled():
  """Remat exists for steps that do not fit without it: their FLOPs and bytes come from the
  largest halved batch per device whose loop-free step fits, scaled by the batches' ratio."""
  target, devices = _target('v5e-4')
  compile_step = plan_compile.compile_step
  compiled_batches = []

  def fits_up_to_4_clips(step, platform):
    batch = step.args[1].shape[0]
    compiled_batches.append(batch)
    if batch > 4:
      return {'exhausted': 'RESOURCE_EXHAUSTED: exceeds available HBM'}
    return compile_step(step, platform)

  config = _config(remat=True, batch_size=16)
  with mock.patch.object(plan_compile, 'compile_step', side_effect=fits_up_to_4_clips):
    cost = plan_compile._target_twin_cost('test halved', config, devices, None, 527)
  assert compiled_batches == [16, 8, 4]
  small = plan_compile.compile_step(
      plan_compile.build(_config(batch_size=4), devices).train, 'tpu')['cost']
  assert cost['scaled_from_batch'] == 4
  assert cost['flops'] == pytest.approx(4 * small['flops'])
  assert cost['bytes accessed'] == pytest.approx(4 * small['bytes accessed'])
  compiled_batches.clear()  # 3 clips per device: the twin of 1 (3 // 2), times 3
  with mock.patch.object(plan_compile, 'compile_step', side_effect=fits_up_to_4_clips):
    odd = plan_compile._target_twin_cost('test odd', _config(remat=True, batch_size=12),
                                         devices, None, 527)
  assert compiled_batches == [12, 4] and odd['scaled_from_batch'] == 4
  assert odd['flops'] == pytest.approx(3 * small['flops'])
  with mock.patch.object(plan_compile, 'compile_step', return_value={'exhausted': 'x'}):
    assert plan_compile._target_twin_cost('test none fits', config, devices, None,
                                          527) == {}
  # Remembered: the same step again compiles nothing.
  with mock.patch.object(plan_compile, 'compile_step', side_effect=AssertionError):
    assert plan_compile._target_twin_cost('test halved', config, devices, None, 527) == cost
