"""The scripts under benchmarks/: the step benchmark (and its --compare and
--product_ceiling), the accumulation check's options and the accelerator script, on tiny
configs (test_scale.py checks gradient accumulation through the accumulation check)."""

import collections
import json
import os
import statistics
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import pytest

from runs import ROOT, env, tiny_config

sys.path.insert(0, str(ROOT))
from benchmarks import accumulation, step  # noqa: E402
from benchmarks.product_ceiling import Product, ProductTimer, step_products  # noqa: E402
from ssast_jax.config.settings import ConfigError, resolve  # noqa: E402

CONFIG = str(ROOT / 'configs' / 'pretrain_joint.py')
# tiny_config() as flags, so that the subprocesses compile the same steps (and find them
# in the session's compilation cache).
TINY_FLAGS = ['--config.model.size=tiny', '--config.model.depth=1',
              '--config.data.target_length=64', '--config.data.num_mel_bins=64',
              '--config.mask_patch=6', '--config.eval_mask_patch=6', '--config.batch_size=8',
              '--config.warmup=False']


def _env(devices=1, **variables):
  """`runs.env`; on one device with this process's XLA_FLAGS, so that the steps compiled
  here and in the subprocesses share the compilation cache."""
  environment = dict(env(devices), **variables)
  if devices == 1:
    del environment['XLA_FLAGS']
    if 'XLA_FLAGS' in os.environ:
      environment['XLA_FLAGS'] = os.environ['XLA_FLAGS']
  return environment


def _step_py(*args, devices=1):
  return subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'step.py'), '--config',
                         CONFIG, *TINY_FLAGS, *args], env=_env(devices), capture_output=True,
                        text=True, timeout=300)


def _check_timed_report(report, batch_size):
  """Keys and values every timed report has, consistent with each other."""
  times = report['step_times_s']
  assert report['step_s'] == statistics.median(times) > 0
  assert report['clips_per_s'] == pytest.approx(batch_size / report['step_s'])
  assert report['flops_per_step'] > 1e8 and report['matmul_peak_flops'] > 1e9
  assert report['mfu'] == pytest.approx(
      report['flops_per_step'] / report['step_s'] / report['matmul_peak_flops'])
  assert report['achieved_flops'] == pytest.approx(report['flops_per_step'] / report['step_s'])
  assert 0 < report['mfu'] < 1.5  # a step far beyond the measured peak means a wrong count
  assert report['peak_memory_bytes'] > 1e6 and report['compile_s'] > 0
  assert (report['platform'], report['devices'], report['batch_size']) == ('cpu', 1, batch_size)


@pytest.fixture(scope='module')
def joint_passes_run():
  """step.py on the tiny config, compared with one joint pass: its JSON last line."""
  run = _step_py('--steps=3', '--warmup_steps=1', '--compare=joint_passes=1')
  assert run.returncode == 0, run.stderr[-3000:]
  return json.loads(run.stdout.strip().splitlines()[-1]), run.stderr


def test_step_benchmark_reports_both_steps_timed_in_turns(joint_passes_run):
  """The last line is the JSON report; the compared step is timed in the same rounds, and
  the speed-up is the median over the rounds of the ratio of the two steps' times. One
  pass does one encoder forward and backward instead of two: about half the FLOPs."""
  result, stderr = joint_passes_run
  compared = result['compared']
  for report in (result, compared):
    _check_timed_report(report, 8)
    assert len(report['step_times_s']) == 3
    assert (report['dtype'], report['remat'], report['grad_accum_steps']) == (
        'float32', False, 1)
  assert (result['joint_passes'], compared['joint_passes']) == (2, 1)
  assert compared['overrides'] == 'joint_passes=1'
  assert compared['matmul_peak_flops'] == result['matmul_peak_flops']
  assert result['matmul_peak_samples'] == 3 * step.PEAK_SAMPLES_PER_ROUND
  assert result['compared_speedup'] == statistics.median(
      this / that for this, that in zip(result['step_times_s'], compared['step_times_s']))
  assert 0.4 < compared['flops_per_step'] / result['flops_per_step'] < 0.65
  assert stderr.strip().splitlines()[-1].startswith('step 3/3: ')


def test_step_benchmark_counts_the_whole_steps_flops_on_any_device_count(joint_passes_run):
  """`flops_per_step` is the work of the whole step, not one device's share (which would
  halve it on 2 devices); every data-parallel device repeats the optimiser update, a few
  percent of this one-block model's step. --steps=0 only compiles, and --out writes the
  JSON printed."""
  run = _step_py('--steps=0', devices=2)
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(run.stdout.strip().splitlines()[-1])
  assert result['devices'] == 2 and result['mesh'] == {'data': 2, 'fsdp': 1}
  assert 'step_s' not in result and 'mfu' not in result and result['peak_memory_bytes'] > 0
  assert result['flops_per_step'] == pytest.approx(
      joint_passes_run[0]['flops_per_step'], rel=0.05)


@pytest.mark.parametrize('args, message', [
    (['--compare=model.nope=1'], "error: --compare: the config has no key 'model.nope'"),
    (['--config.nope=1'], "error: --config: unknown config key 'nope'"),
])
def test_bad_options_end_in_one_error_line(args, message):
  run = _step_py('--steps=1', *args)
  assert run.returncode == 2 and run.stdout == ''
  assert run.stderr.strip().splitlines() == [message]


@pytest.mark.parametrize('overrides, message', [
    ('joint_passes', "--compare: 'joint_passes' is not KEY=VALUE"),
    ('nope.depth=1', "--compare: the config has no key 'nope.depth'"),
    ('model=1', "--compare: 'model' is a group of keys"),
    ('remat=yes', "--compare: remat='yes': Could not override"),
    ('joint_passes=3', '--compare=joint_passes=3: joint_passes must be one of 1, 2; got 3'),
    ('grad_accum_steps=3', 'batch_size 8 is not divisible by grad_accum_steps 3'),
])
def test_bad_comparison_overrides_are_refused(overrides, message):
  with pytest.raises(ConfigError, match=message):
    step.benchmark(tiny_config(), steps=1, compare=overrides)


def test_overrides_are_literals_or_strings():
  assert step.parse_overrides('remat=True, dtype=bfloat16,model.depth=2') == {
      'remat': True, 'dtype': 'bfloat16', 'model.depth': 2}
  config = step.with_overrides(tiny_config(), {'model.depth': 2, 'dtype': 'bfloat16'})
  assert (config.model.depth, config.dtype, tiny_config().model.depth) == (2, 'bfloat16', 1)


def test_paired_speedup_is_the_median_of_the_rounds_ratios():
  """A round where the host slowed both steps alike does not move it."""
  assert step.paired_speedup([2.0, 20.0, 3.0], [1.0, 10.0, 1.0]) == 2.0
  assert step.devices_peak_flops([3.0, 1.0, 100.0, 2.0, 4.0]) == 3.0  # CPU: not x devices


# --- the accelerator script, tiny ---------------------------------------------------------

@pytest.fixture(scope='module')
def accelerator_run(tmp_path_factory):
  out = tmp_path_factory.mktemp('accelerator')
  run = subprocess.run(
      ['bash', str(ROOT / 'benchmarks' / 'accelerator.sh'), str(out)],
      env=_env(SSAST_BENCH_TINY='1', SSAST_BENCH_BATCHES='8',
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ['PATH']),
      capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-4000:]
  return out, run.stdout


def test_accelerator_script_times_both_dtypes_with_and_without_remat(accelerator_run):
  """Per dtype and batch size (one here), a step report with remat compared; remat's FLOPs
  are counted without its recomputation, so both count the same work. The versions check
  ran first."""
  out, _ = accelerator_run
  assert 'versions check: ok' in (out / 'versions.txt').read_text()
  for dtype in ('bfloat16', 'float32'):
    result = json.loads((out / f'step_{dtype}_b8.json').read_text())
    remat = result['compared']
    for report in (result, remat):
      _check_timed_report(report, 8)
      assert (report['dtype'], report['model_size'], report['depth']) == (dtype, 'tiny', 1)
      assert 'plan_estimate_s' not in report  # a CPU: not one of the plan's chips
    assert (result['remat'], remat['remat'], remat['overrides']) == (False, True, 'remat=True')
    assert remat['flops_per_step'] == result['flops_per_step']
    assert result['compared_speedup'] == statistics.median(
        a / b for a, b in zip(result['step_times_s'], remat['step_times_s']))


def test_accelerator_script_times_the_loader_and_prints_a_table(accelerator_run):
  out, stdout = accelerator_run
  loader = json.loads((out / 'loader_b8.json').read_text())
  assert loader['clips_per_s'] > 0 and loader['batches'] == 5
  assert (loader['batch_size'], loader['target_length'], loader['num_mel_bins']) == (8, 64, 64)
  rows = json.loads((out / 'summary.json').read_text())
  assert [(r['batch'], r['remat'], r['dtype']) for r in rows] == [
      (8, False, 'bfloat16'), (8, True, 'bfloat16'), (8, False, 'float32'), (8, True, 'float32')]
  lines = stdout.strip().splitlines()
  assert lines == (out / 'table.txt').read_text().strip().splitlines()
  assert len(lines) == 5 and lines[0].split()[:3] == ['batch', 'remat', 'dtype']
  assert lines[2].split()[:3] == ['8', 'True', 'bfloat16']
  assert float(lines[2].split()[6]) == pytest.approx(rows[1]['mfu'], abs=1e-3)
  assert lines[2].split()[10:12] == ['-', '-']  # no plan estimate for a CPU


def test_the_plan_estimate_beside_a_measured_step_uses_the_devices_chip():
  """On an H100 (a device kind the plan knows), bfloat16, remat on: the roofline of the
  step's own FLOPs (times the recomputation) and bytes."""
  config = tiny_config()
  config.dtype, config.remat = 'bfloat16', True
  settings = resolve(config, check_data=False)
  report = {'flops_per_step': 989e12 * 0.03, 'bytes_accessed_per_step': 3352e9 * 0.01}
  with mock.patch.object(jax, 'devices', return_value=[mock.Mock(
      device_kind='NVIDIA H100 80GB HBM3')]), mock.patch.object(jax, 'device_count',
                                                                return_value=1):
    estimate = step.plan_estimate(settings, report)
  assert estimate['plan_bound'] == 'compute' and estimate['plan_chip'] == 'H100 80GB'
  assert estimate['plan_estimate_s'] == pytest.approx(0.03 * 4 / 3)


# --- the product ceiling ------------------------------------------------------------------

def _hlo(function, *shapes):
  arguments = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
  compiled = jax.jit(function).lower(*arguments).compile()
  return compiled.as_text(), compiled.cost_analysis()['flops']


def test_products_are_counted_with_their_shapes_and_flops():
  """Products at the top level and inside fusions (the relu fuses with its product) are
  found with their operand shapes and dimensions, counted per run, and their FLOPs add
  up to XLA's count."""
  def products_only(a, b, c, q, k, q2, k2):
    return (jnp.maximum(a @ b, 0.0) @ c, jnp.einsum('bth,bsh->bts', q, k),
            jnp.einsum('bth,bsh->bts', q2, k2))

  text, xla_flops = _hlo(products_only, (32, 16), (16, 48), (48, 8),
                         *[(2, 10, 4), (2, 12, 4)] * 2)
  products = step_products(text)
  attention_like = Product(('f32', (2, 10, 4)), ('f32', (2, 12, 4)), 'f32', ((2,), (2,)),
                           ((0,), (0,)))
  assert products[attention_like] == 2
  assert attention_like.flops == 2 * 2 * 10 * 12 * 4
  assert sorted(p.lhs[1] for p in products.elements()) == [
      (2, 10, 4), (2, 10, 4), (32, 16), (32, 48)]
  # XLA's count also has the relu's 32 x 48 maximums.
  assert sum(p.flops * n for p, n in products.items()) == xla_flops - 32 * 48


def test_products_in_loops_are_refused():
  def looped(a, b):
    return jax.lax.fori_loop(0, 3, lambda i, x: jnp.tanh(x @ b), a)

  text, _ = _hlo(looped, (16, 16), (16, 16))
  with pytest.raises(ValueError, match='matrix products in a loop; only loop-free'):
    step_products(text)


def test_products_of_types_without_random_operands_are_refused():
  product = Product(('s32', (4, 4)), ('s32', (4, 4)), 's32', ((1,), (0,)), ((), ()))
  with pytest.raises(ValueError, match=r'cannot time s32\[4, 4\] x s32\[4, 4\].*: no '
                     'random operands of type s32'):
    ProductTimer(collections.Counter({product: 1}))


def test_summary_weights_each_products_median_by_its_count():
  product = Product(('f32', (64, 32)), ('f32', (32, 16)), 'f32', ((1,), (0,)), ((), ()))
  timer = ProductTimer(collections.Counter({product: 3}))
  timer._seconds = [[0.004, 0.001, 0.002]]  # one time per round, as time_each() records
  summary = timer.summary(step_s=0.012, step_flops=1e9, peak_flops=1e11)
  assert summary['products_s'] == pytest.approx(0.006)
  assert summary['share_of_step'] == pytest.approx(0.5)
  assert summary['products_flops'] == 3 * 2 * 64 * 32 * 16
  assert summary['mfu_ceiling'] == pytest.approx(1e9 / 0.006 / 1e11)
  [row] = summary['products']
  assert (row['per_step'], row['total_ms']) == (3, pytest.approx(6.0))
  assert row['gflops_alone'] == pytest.approx(2 * 64 * 32 * 16 / 0.002 / 1e9)


def test_benchmark_reports_the_ceiling_of_the_real_step():
  """Every product of the step is timed: their FLOPs are nearly all of the step's (the
  rest is element-wise work), and their share of the step and the ceiling follow from
  their summed time."""
  result = step.benchmark(tiny_config(), steps=2, warmup_steps=1, product_ceiling=True,
                          log=lambda m: None)
  ceiling = result['product_ceiling']
  assert 0.8 < ceiling['products_flops'] / result['flops_per_step'] <= 1
  assert 0 < ceiling['share_of_step'] == ceiling['products_s'] / result['step_s']
  assert ceiling['mfu_ceiling'] == pytest.approx(
      result['flops_per_step'] / ceiling['products_s'] / result['matmul_peak_flops'])
  totals = [p['total_ms'] for p in ceiling['products']]
  assert totals == sorted(totals, reverse=True)
  assert sum(p['per_step'] for p in ceiling['products']) >= 20


@pytest.mark.parametrize('overrides, steps, message', [
    ({}, 0, 'it needs --steps >= 1'),
    ({'remat': True}, 1, 'needs remat=False and grad_accum_steps=1'),
    ({'grad_accum_steps': 2}, 1, 'needs remat=False and grad_accum_steps=1'),
])
def test_product_ceiling_refuses_what_it_cannot_measure(overrides, steps, message):
  with pytest.raises(ConfigError, match=message):
    step.benchmark(tiny_config(**overrides), steps=steps, product_ceiling=True)


def test_product_ceiling_refuses_several_devices():
  """The products are timed on one device; the refusal comes before any compilation."""
  run = _step_py('--steps=1', '--product_ceiling', devices=2)
  assert run.returncode == 2
  assert run.stderr.strip().splitlines() == [
      'error: --product_ceiling times the products on one device; this run has 2']


# --- the accumulation check ---------------------------------------------------------------

def test_accumulation_check_needs_micro_batches():
  with pytest.raises(ConfigError, match='grad_accum_steps is 1; give 2 or more to compare'):
    accumulation.step_gaps(tiny_config(), 1)
  with pytest.raises(ConfigError, match='--batches is 0; give 1 or more'):
    accumulation.step_gaps(tiny_config(grad_accum_steps=2), 0)
