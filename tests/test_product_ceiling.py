"""The step's matrix products read from its HLO and timed alone (`bench --product_ceiling`)."""

import collections
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from ssast_jax import config_checks
from ssast_jax.bench import benchmark
from ssast_jax.product_ceiling import Product, ProductTimer, step_products
from runs import ROOT, env, tiny_config


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
  result = benchmark(tiny_config(), steps=2, warmup_steps=1, product_ceiling=True,
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
  with pytest.raises(config_checks.ConfigError, match=message):
    benchmark(tiny_config(**overrides), steps=steps, product_ceiling=True)


def test_product_ceiling_refuses_several_devices():
  """The products are timed on one device; the refusal comes before any compilation."""
  run = subprocess.run(
      [sys.executable, '-m', 'ssast_jax.bench', '--config', str(ROOT / 'configs' /
       'pretrain_joint.py'), '--config.model.size=tiny', '--steps=1', '--product_ceiling'],
      env=env(devices=2), capture_output=True, text=True, timeout=120)
  assert run.returncode == 1
  assert run.stderr.strip().splitlines()[-1] == (
      'error: --product_ceiling times the products on one device; this run has 2')
