"""Training-step benchmark: time, FLOPs, MFU and memory of the real compiled step.

python -m ssast_jax.bench --config=configs/pretrain_joint.py [--config.x=y ...] --steps=N

Synthetic batches, no data loading. FLOPs (the model work of the whole step on all devices;
see `model_flops`) and memory (per device) come from XLA's analysis of the compiled step;
the peak is a large matmul of the step's dtype timed between the timed steps of the same
run (median), for all devices together (see `devices_peak_flops`).
`page_faults_per_step` counts the process's minor page faults per timed step: near zero
when freed host memory is reused (`host_memory`), hundreds of thousands when it is not.
`--steps=0` compiles without running or allocating (memory of big configs).
`--breakdown` adds `time_by_scope`: milliseconds per step spent in each named scope of the
model, forward and backward, from a profiler trace of the timed steps (with a comparison,
one per compared step).
`--product_ceiling` adds `product_ceiling` (module `product_ceiling`): the step's matrix
products timed alone between the rounds of steps, their share of the step, and the MFU the
step would reach if it did nothing else.
`--compare_joint_passes` times both joint modes in one run, step by step in turns, and
adds the other mode's figures and `one_pass_speedup` (the median over the rounds of the
ratio of the two steps' times in the round); for a config whose MPC loss does not
train the encoder (the original's, whose MPC pass has no backward through it) it also
times two full passes (`mpc_trains_encoder=True`), the equal-work comparison.
`--compare_with=KEY=VALUE,...` does the same for the config with those overrides (e.g.
`batch_invariant=True`), under `compared` with `compared_speedup`. The last line printed
is a JSON object.
"""

from __future__ import annotations

import ast
import json
import resource
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ssast_jax import config_checks, host_memory, profiling
from ssast_jax import product_ceiling as product_ceiling_lib
from ssast_jax.train import batch_shape, step_setup

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps after warm-up; 0: compile only and '
                              'report FLOPs and memory.')
_WARMUP = flags.DEFINE_integer('warmup_steps', 2, 'Untimed steps after compilation.')
_BREAKDOWN = flags.DEFINE_bool('breakdown', False, 'Also trace the timed steps with '
                               'jax.profiler and report their time per named scope of the '
                               'model (attention, MLP, LayerNorm, ...), forward and backward.')
_PRODUCT_CEILING = flags.DEFINE_bool(
    'product_ceiling', False, "Also time each of the step's matrix products alone, between "
    "the rounds of steps, and report their total per step, its share of the step and the "
    "MFU ceiling it sets (the step's FLOPs over the products' time alone).")
_COMPARE = flags.DEFINE_bool(
    'compare_joint_passes', False, 'Also time the step with the other joint_passes (1 or 2), '
    'in turns with this one, and report the speed-up of one pass over two; with '
    'mpc_trains_encoder=False, also over two passes that both backpropagate through the '
    'encoder (mpc_trains_encoder=True).')
_COMPARE_WITH = flags.DEFINE_string(
    'compare_with', '', "Also time the step of the config with these overrides, "
    "'KEY=VALUE[,KEY=VALUE ...]' (e.g. 'batch_invariant=True' or "
    "'model.attention=dot_product_attention'), in turns with this one, and report the "
    "speed-up of this step over it.")
flags.mark_flags_as_required(['config'])
PEAK_SAMPLES_PER_ROUND = 3  # peak matmuls timed after each round of steps


def matmul_rate(dtype, size: int = 2048):
  """A function that runs one `size`^3 matmul of `dtype` on the default device and
  returns its FLOP/s (compiled and run once here, so every call is a measurement)."""
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()

  def rate() -> float:
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    return 2 * size ** 3 / (time.perf_counter() - start)
  return rate


def peak_memory_bytes(compiled) -> int:
  """Arguments + outputs + temporaries, less donated buffers reused as outputs."""
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def compile_step(config):
  """(setup, compiled step) of `config`, lowered from shapes only: nothing is allocated."""
  setup = step_setup(config)
  abstract_batch = jax.ShapeDtypeStruct(batch_shape(config), jnp.float32,
                                        sharding=setup.batch_sharding)
  return setup, setup.step.lower(setup.abstract_state, abstract_batch).compile()


def model_flops(config, compiled, log=print) -> float:
  """FLOPs of the whole step's model work on all devices: XLA's cost analysis of the
  compiled step (one device's program) times the device count.

  XLA counts a loop's body once, and remat (a loop over blocks) and gradient accumulation
  (a loop over micro-batches) compile to loops; for them the count is that of the same
  step compiled without either, which also leaves out remat's recomputation, as MFU
  should.
  """
  if config.remat or config.grad_accum_steps > 1:
    plain = config.copy_and_resolve_references()
    plain.remat, plain.grad_accum_steps = False, 1
    log('compiling the step without remat and accumulation to count its FLOPs ...')
    compiled = compile_step(plain)[1]
  return float(compiled.cost_analysis()['flops']) * jax.device_count()


def devices_peak_flops(one_device_rates: list[float]) -> float:
  """The matmul peak of all devices together from one device's measured rates (median):
  one device's times the device count, except on CPU, whose devices share the host's
  cores (one device's matmul already uses them all)."""
  peak = statistics.median(one_device_rates)
  return peak if jax.devices()[0].platform == 'cpu' else peak * jax.device_count()


def compiled_facts(config, log=print) -> tuple:
  """(setup, compiled step, facts about it that need no run: FLOPs, memory, layout)."""
  log('compiling the training step ...')
  start = time.perf_counter()
  setup, compiled = compile_step(config)
  compile_s = time.perf_counter() - start
  facts = {'flops_per_step': model_flops(config, compiled, log),
           'peak_memory_bytes': peak_memory_bytes(compiled), 'compile_s': compile_s,
           'batch_size': config.batch_size, 'joint_passes': config.joint_passes,
           'mpc_trains_encoder': config.mpc_trains_encoder,
           'grad_accum_steps': config.grad_accum_steps,
           'concurrent_parts': setup.settings.concurrent_parts,
           'batch_invariant': config.batch_invariant, 'remat': config.remat,
           'remat_policy': config.remat_policy if config.remat else None,
           'dtype': config.dtype, 'mesh': dict(setup.mesh.shape),
           'devices': jax.device_count(), 'platform': jax.devices()[0].platform}
  return setup, compiled, facts


def timed_steps(runs: list, steps: int, warmup_steps: int, log=print,
                after_round=None) -> tuple[list, list, list]:
  """(seconds of each of `steps` calls, the process's minor page faults during each, final
  state) of every `(compiled, state, batch)` in `runs` (whose states are donated), taking
  turns step by step so that changes in the machine's load affect all of them alike.
  `after_round()`, if given, runs after each round of timed steps, outside their times."""
  states = [state for _, state, _ in runs]
  for i, (compiled, _, batch) in enumerate(runs):
    for _ in range(warmup_steps):
      states[i], _ = compiled(states[i], batch)
  jax.block_until_ready(states)
  times, faults = [[] for _ in runs], [[] for _ in runs]
  for step in range(steps):
    for i, (compiled, _, batch) in enumerate(runs):
      faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      start = time.perf_counter()
      states[i], metrics = compiled(states[i], batch)
      jax.block_until_ready(metrics)
      times[i].append(time.perf_counter() - start)
      faults[i].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
    if after_round is not None:
      after_round()
    log(f'step {step + 1}/{steps}: ' + ', '.join(f'{t[-1]:.3f} s' for t in times))
  return times, faults, states


def paired_speedup(times: list, other_times: list) -> float:
  """How many times faster the step timed as `other_times` is than the one timed as `times`,
  both from `timed_steps`: the median over the rounds of the ratio of their times in the
  same round. Pairing by round cancels the drift of a shared host's speed, which a ratio
  of the two medians keeps."""
  return statistics.median(t / other for t, other in zip(times, other_times, strict=True))


def overridden(config, overrides: str):
  """A copy of `config` with `overrides` 'KEY=VALUE[,KEY=VALUE ...]' applied (values as
  Python literals, else strings), checked as a config."""
  other = config.copy_and_resolve_references()
  for item in overrides.split(','):
    key, equals, text = (part.strip() for part in item.partition('='))
    if not equals or not key:
      raise config_checks.ConfigError(f'--compare_with: {item!r} is not KEY=VALUE')
    *parents, name = key.split('.')
    node = other
    for parent in parents:
      node = node.get(parent)
      if not hasattr(node, 'keys'):
        break
    if not hasattr(node, 'keys') or name not in node:
      raise config_checks.ConfigError(f'--compare_with: the config has no key {key!r}')
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    try:
      node[name] = value
    except TypeError as error:
      raise config_checks.ConfigError(f'--compare_with: {key}={text}: {error}') from None
  config_checks.check_config(other, check_data=False)
  return other


def benchmark(config, steps: int, warmup_steps: int = 2, breakdown: bool = False,
              compare_joint_passes: bool = False, compare_with: str = '',
              product_ceiling: bool = False, log=print) -> dict:
  """Compiles the training step of `config` exactly as training does (mesh, shardings,
  accumulation, remat, dtype) and times `steps` steps; `steps=0` only compiles, without
  allocating the state, so the memory of configs too big to run can be read.
  `breakdown` then runs the `steps` again under the profiler (see module doc), for each
  compared mode.
  `compare_joint_passes` also times the step with the other `joint_passes`, in turns with
  this one, and reports it under `joint_passes_N` with `one_pass_speedup`, the two-pass
  step's time over the one-pass step's (`paired_speedup` of their `step_times_s`). When
  the MPC loss does not train the encoder (`mpc_trains_encoder=False`, the original's: its
  MPC pass has no backward through the encoder), it also times the two-pass step with
  `mpc_trains_encoder=True`, under `two_full_passes`, with
  `one_pass_speedup_vs_two_full_passes`: one pass against two of the same work each.
  `compare_with` (see `overridden`) likewise times the config with those overrides and
  reports it under `compared` with `compared_speedup`, this step's time over that one's
  (paired). `product_ceiling` times the config's step's matrix products alone after each
  round of steps and reports `product_ceiling` (see
  `product_ceiling_lib.ProductTimer.summary`).
  """
  config_checks.check_config(config, check_data=False)
  if breakdown and steps == 0:
    raise config_checks.ConfigError('--breakdown traces the timed steps; it needs --steps >= 1')
  if product_ceiling:
    _check_product_ceiling(config, steps)
  if compare_joint_passes and compare_with:
    raise config_checks.ConfigError(
        '--compare_joint_passes and --compare_with each add a second step; give one')
  configs, labels = [config], [f'joint_passes={config.joint_passes}']
  if compare_joint_passes:
    if config.task != 'pretrain_joint':
      raise config_checks.ConfigError(
          f'--compare_joint_passes needs task pretrain_joint; got {config.task!r}')
    other = config.copy_and_resolve_references()
    other.joint_passes = 3 - config.joint_passes
    configs.append(other)
    labels.append(f'joint_passes={other.joint_passes}')
    if not config.mpc_trains_encoder:
      full = config.copy_and_resolve_references()
      full.joint_passes, full.mpc_trains_encoder = 2, True
      configs.append(full)
      labels.append('joint_passes=2, mpc_trains_encoder=True')
  if compare_with:
    configs.append(overridden(config, compare_with))
    labels.append(compare_with)
  compiled = [compiled_facts(c, log) for c in configs]
  if steps == 0:
    return _with_comparison([facts for _, _, facts in compiled], compare_with)
  runs = []
  for c, (setup, step, _) in zip(configs, compiled):
    batch = jax.device_put(
        np.random.default_rng(0).normal(size=batch_shape(c)).astype(np.float32),
        setup.batch_sharding)
    runs.append((step, setup.init(), batch))
  # The peak is sampled between the rounds of steps, so that both see the machine in the
  # same state: on a shared host the speed of the cores drifts by tens of percent.
  matmul = matmul_rate(jnp.dtype(config.dtype))
  rates = []
  products = None
  if product_ceiling:
    log('compiling the step\'s matrix products alone ...')
    products = product_ceiling_lib.ProductTimer(
        product_ceiling_lib.step_products(compiled[0][1].as_text()))

  def after_round():
    rates.extend(matmul() for _ in range(PEAK_SAMPLES_PER_ROUND))
    if products is not None:
      products.time_each()
  times, faults, states = timed_steps(runs, steps, warmup_steps, log, after_round)
  peak = devices_peak_flops(rates)
  reports = []
  for c, (_, _, facts), t, f in zip(configs, compiled, times, faults):
    step_s = statistics.median(t)
    reports.append({'step_s': step_s, 'step_times_s': t, 'clips_per_s': c.batch_size / step_s,
                    'achieved_flops': facts['flops_per_step'] / step_s,
                    'matmul_peak_flops': peak, 'matmul_peak_samples': len(rates),
                    'mfu': facts['flops_per_step'] / step_s / peak,
                    'page_faults_per_step': statistics.median(f), **facts})
  if products is not None:
    reports[0]['product_ceiling'] = products.summary(
        reports[0]['step_s'], reports[0]['flops_per_step'], peak)
  result = _with_comparison(reports, compare_with)
  if compare_joint_passes:
    two, one = sorted(reports[:2], key=lambda r: -r['joint_passes'])
    result['one_pass_speedup'] = paired_speedup(two['step_times_s'], one['step_times_s'])
    if len(reports) > 2:
      result['one_pass_speedup_vs_two_full_passes'] = paired_speedup(
          reports[2]['step_times_s'], one['step_times_s'])
  if compare_with:
    result['compared_speedup'] = paired_speedup(reports[0]['step_times_s'],
                                                reports[1]['step_times_s'])
  if breakdown:
    for label, report, (compiled_step, _, batch), state in zip(labels, reports, runs, states):
      log(f'time by scope, {label}:')
      report['time_by_scope'] = traced_time_by_scope(compiled_step, state, batch, steps, log)
  return result


def _check_product_ceiling(config, steps: int) -> None:
  """Refuses what `--product_ceiling` cannot measure."""
  if steps == 0:
    raise config_checks.ConfigError('--product_ceiling times the products between timed '
                                    'steps; it needs --steps >= 1')
  if config.remat or config.grad_accum_steps > 1:
    raise config_checks.ConfigError(
        '--product_ceiling needs remat=False and grad_accum_steps=1: it counts the '
        'products of a step without loops over blocks or micro-batches')
  if jax.device_count() > 1:
    raise config_checks.ConfigError(
        f'--product_ceiling times the products on one device; this run has '
        f'{jax.device_count()}')


def _with_comparison(reports: list[dict], compare_with: str) -> dict:
  """The first report, with the compared steps' reports, if any, under their keys."""
  result = reports[0]
  if compare_with:
    reports[1]['overrides'] = compare_with
    result['compared'] = reports[1]
  elif len(reports) > 1:
    result[f'joint_passes_{reports[1]["joint_passes"]}'] = reports[1]
    if len(reports) > 2:
      result['two_full_passes'] = reports[2]
  return result


def traced_time_by_scope(compiled, state, batch, steps: int, log=print) -> dict:
  """`profiling.time_by_scope` of `steps` runs of the compiled step, logged as a table."""
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    for _ in range(steps):
      state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    jax.profiler.stop_trace()
    table = profiling.time_by_scope(trace_dir, compiled.as_text(), runs=steps)
  total = sum(t['forward'] + t['backward'] for t in table.values())
  log(f'{"scope":20s} {"forward ms":>11s} {"backward ms":>12s} {"share":>6s}')
  for scope, t in sorted(table.items(), key=lambda i: -i[1]['forward'] - i[1]['backward']):
    share = (t['forward'] + t['backward']) / total
    log(f'{scope:20s} {t["forward"]:11.1f} {t["backward"]:12.1f} {share:6.1%}')
  log(f'{"total":20s} {total:24.1f} ms of operations per step')
  return table


def main(argv):
  del argv
  host_memory.reuse_freed_memory()  # before JAX starts its CPU client
  try:
    result = benchmark(_CONFIG.value, _STEPS.value, _WARMUP.value, _BREAKDOWN.value,
                       _COMPARE.value, _COMPARE_WITH.value, _PRODUCT_CEILING.value,
                       log=lambda m: print(m, file=sys.stderr, flush=True))
  except config_checks.ConfigError as error:
    raise SystemExit(f'error: {error}') from None
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
