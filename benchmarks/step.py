"""Training-step benchmark: time, FLOPs, MFU and memory of the real compiled step.

python benchmarks/step.py --config=configs/pretrain_joint.py [--config.KEY=VALUE ...]
    [--steps=10] [--warmup_steps=2] [--compare=KEY=VALUE,...] [--product_ceiling] [--out=PATH]

Compiles the jitted, state-donating step of `ssast_jax.training.step.step_setup` (mesh,
shardings, accumulation, remat and dtype as training has them) and times it on one
synthetic batch, without data loading.

- `flops_per_step`: XLA's cost analysis of the compiled step (one device's program) times
  the device count. XLA counts a loop's body once, and remat (a scan over the blocks) and
  gradient accumulation (a scan over micro-batches) are loops, so for them it is the count
  of the same step without either; remat's recomputation is thus left out, as MFU should.
- `peak_memory_bytes`: per device, arguments + outputs + temporaries - donated buffers.
- `matmul_peak_flops`: a large matmul of the step's dtype, timed after every round of
  steps so that both see the machine alike (median), for all devices together.
- `mfu`: flops_per_step / step_s / matmul_peak_flops; `step_s` is the median step time.

`--compare=KEY=VALUE,...` also times the config with those overrides, step by step in turns
with this one, and reports it under `compared`, with `compared_speedup`: the median over
the rounds of this step's time / the compared step's (> 1: the compared config is faster).
Pairing by round cancels the drift of a shared host's speed, which a ratio of medians keeps.
`--steps=0` only compiles (nothing is allocated): FLOPs and memory of configs too big to run.
`--product_ceiling` adds `product_ceiling` (benchmarks/product_ceiling.py).
Progress goes to stderr; the last line on stdout is the JSON object (`--out` also writes it).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ast  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks import product_ceiling as product_ceiling_lib  # noqa: E402
from ssast_jax import accelerators  # noqa: E402
from ssast_jax.config.command_line import fail, parse_flags  # noqa: E402
from ssast_jax.config.settings import ConfigError, resolve  # noqa: E402
from ssast_jax.plan import roofline as plan_roofline  # noqa: E402
from ssast_jax.training.step import step_setup  # noqa: E402
from ssast_jax.training import host_allocator  # noqa: E402

PEAK_SAMPLES_PER_ROUND = 3  # peak matmuls timed after each round of steps
FIRST_KEYS = ('step_s', 'clips_per_s', 'mfu', 'flops_per_step', 'achieved_flops',
              'matmul_peak_flops', 'peak_memory_bytes', 'compile_s')  # the report's order


def log_to_stderr(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


# --- configs ------------------------------------------------------------------------------

def parse_overrides(text: str, option: str = '--compare') -> dict:
  """'KEY=VALUE[,KEY=VALUE ...]' -> {key: value}; values are Python literals, else strings."""
  overrides = {}
  for item in text.split(','):
    key, equals, value = (part.strip() for part in item.partition('='))
    if not equals or not key:
      raise ConfigError(f'{option}: {item.strip()!r} is not KEY=VALUE')
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value
  return overrides


def with_overrides(config, overrides: dict, option: str = '--compare'):
  """A copy of the ConfigDict `config` with `overrides` set; a key it lacks or a value of the
  wrong type raises ConfigError naming `option` and the key."""
  config = config.copy_and_resolve_references()
  for key, value in overrides.items():
    *parents, name = key.split('.')
    node = config
    for parent in parents:
      node = node.get(parent) if hasattr(node, 'keys') else None
    if not hasattr(node, 'keys') or name not in node:
      raise ConfigError(f'{option}: the config has no key {key!r}')
    if hasattr(node[name], 'keys'):
      raise ConfigError(f'{option}: {key!r} is a group of keys; set one of them')
    try:
      node[name] = value
    except TypeError as error:
      raise ConfigError(f'{option}: {key}={value!r}: {error}') from None
  return config


def without_loops(settings):
  """`settings` without remat and accumulation: the step whose FLOPs XLA counts in full."""
  return dataclasses.replace(
      settings, model=dataclasses.replace(settings.model, remat=False,
                                          remat_policy='nothing_saveable'),
      optim=dataclasses.replace(settings.optim, grad_accum_steps=1))


# --- measurements -------------------------------------------------------------------------

def compile_step(settings):
  """(setup, compiled step) of `settings`, lowered from shapes only: nothing is allocated."""
  setup = step_setup(settings)
  batch = jax.ShapeDtypeStruct(settings.batch_shape, jnp.float32, sharding=setup.batch_sharding)
  return setup, setup.step.lower(setup.abstract_state, batch).compile()


def peak_memory_bytes(compiled) -> int:
  """Arguments + outputs + temporaries, less donated buffers reused as outputs."""
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def matmul_rate(dtype, size: int):
  """A function timing one `size`^3 matmul of `dtype` on the default device, returning its
  FLOP/s (compiled and run once here, so that every call is a measurement)."""
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()

  def rate() -> float:
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    return 2 * size ** 3 / (time.perf_counter() - start)
  return rate


def devices_peak_flops(one_device_rates: list[float]) -> float:
  """The peak of all devices from one device's measured rates (median): times the device
  count, except on CPU, whose devices share the host's cores (one matmul uses them all)."""
  peak = statistics.median(one_device_rates)
  return peak if jax.devices()[0].platform == 'cpu' else peak * jax.device_count()


def timed_steps(runs: list, steps: int, warmup_steps: int, log=log_to_stderr,
                after_round=None) -> tuple[list, list]:
  """(seconds of each of `steps` calls of every `(step, state, batch)` in `runs`, final
  states), taking turns step by step so that changes in the machine's load affect all
  alike; states are donated. `after_round()` runs after each round, outside the times."""
  states = [state for _, state, _ in runs]
  for i, (step, _, batch) in enumerate(runs):
    for _ in range(warmup_steps):
      states[i], _ = step(states[i], batch)
  jax.block_until_ready(states)
  times = [[] for _ in runs]
  for n in range(steps):
    for i, (step, _, batch) in enumerate(runs):
      start = time.perf_counter()
      states[i], metrics = step(states[i], batch)
      jax.block_until_ready(metrics)
      times[i].append(time.perf_counter() - start)
    if after_round is not None:
      after_round()
    log(f'step {n + 1}/{steps}: ' + ', '.join(f'{t[-1]:.4f} s' for t in times))
  return times, states


def paired_speedup(times: list[float], other_times: list[float]) -> float:
  """The median over the rounds of `times[i] / other_times[i]`: > 1 when the other is faster."""
  return statistics.median(t / other for t, other in zip(times, other_times, strict=True))


def step_cost(compiled) -> tuple[float, float]:
  """(FLOPs, bytes accessed) of a compiled step, over all devices."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return (float(cost['flops']) * jax.device_count(),
          float(cost.get('bytes accessed', 0.0)) * jax.device_count())


def plan_estimate(settings, report) -> dict:
  """`ssast_jax.plan`'s roofline for this step on this device (`plan_estimate_s`, its
  `plan_bound`), from the loop-free step's FLOPs and bytes, both times remat's
  recomputation, as the plan computes them for a TPU; empty
  where the device is not one of `ssast_jax.accelerators.CHIPS`. One device: no
  collectives. Compared with the measured `step_s`, it calibrates the plan's estimates."""
  chip = accelerators.chip_of(jax.devices()[0].device_kind)
  if chip is None or settings.model.dtype not in chip.peak_flops:
    return {}
  count = jax.device_count()
  factor = plan_roofline.recompute_factor(settings.model.remat, settings.model.remat_policy,
                                          settings.model)
  bounds = plan_roofline.roofline(chip, settings.model.dtype,
                                  report['flops_per_step'] / count * factor,
                                  report['bytes_accessed_per_step'] / count * factor, 0)
  bound = max(bounds, key=bounds.get)
  return {'plan_estimate_s': bounds[bound], 'plan_bound': bound, 'plan_chip': chip.name}


def describe(settings, setup) -> dict:
  """What was compiled, and where."""
  m, o, opt = settings.model, settings.objective, settings.optim
  return {'task': o.task, 'model_size': m.size, 'depth': m.depth,
          'input_frames': m.input_tdim, 'num_mel_bins': m.input_fdim,
          'mask_patch': o.mask_patch, 'batch_size': opt.batch_size,
          'grad_accum_steps': opt.grad_accum_steps, 'joint_passes': o.joint_passes,
          'remat': m.remat, 'remat_policy': m.remat_policy if m.remat else None,
          'dtype': m.dtype, 'fsdp': settings.run.fsdp, 'mesh': dict(setup.mesh.shape),
          'devices': jax.device_count(), 'platform': jax.devices()[0].platform,
          'device_kind': jax.devices()[0].device_kind,
          'glibc_tunables': os.environ.get('GLIBC_TUNABLES', '')}


def _check_product_ceiling(settings, steps: int) -> None:
  """Refuses what `--product_ceiling` cannot measure, before anything is compiled."""
  if steps == 0:
    raise ConfigError('--product_ceiling times the products between timed steps; '
                      'it needs --steps >= 1')
  if settings.model.remat or settings.optim.grad_accum_steps > 1:
    raise ConfigError('--product_ceiling needs remat=False and grad_accum_steps=1: it counts '
                      'the products of a step without loops over blocks or micro-batches')
  if jax.device_count() > 1:
    raise ConfigError('--product_ceiling times the products on one device; this run has '
                      f'{jax.device_count()}')


def benchmark(config, steps: int, warmup_steps: int = 2, compare: str = '',
              product_ceiling: bool = False, log=log_to_stderr) -> dict:
  """The report of `config`'s step (module doc); raises ConfigError for a bad config, bad
  `compare` overrides ('KEY=VALUE,...') or options that cannot work together."""
  if steps < 0 or warmup_steps < 0:
    raise ConfigError(f'--steps and --warmup_steps must be >= 0; got {steps}, {warmup_steps}')
  settings = [resolve(config, check_data=False)]
  if compare:
    try:
      settings.append(resolve(with_overrides(config, parse_overrides(compare)),
                              check_data=False))
    except ConfigError as error:
      message = str(error)
      raise ConfigError(message if message.startswith('--compare') else
                        f'--compare={compare}: {message}') from None
  if product_ceiling:
    _check_product_ceiling(settings[0], steps)
  compiled, reports, flops_by_step = [], [], {}
  for s in settings:
    log(f'compiling the training step ({s.model.size} x {s.model.depth}, batch '
        f'{s.optim.batch_size}, {s.model.dtype}, remat={s.model.remat}) ...')
    start = time.perf_counter()
    setup, step = compile_step(s)
    compiled.append((setup, step))
    if without_loops(s) == s:
      flops_by_step[s] = step_cost(step)
    reports.append({'compile_s': time.perf_counter() - start,
                    'peak_memory_bytes': peak_memory_bytes(step), **describe(s, setup)})
  for s, report in zip(settings, reports):
    plain = without_loops(s)
    if plain not in flops_by_step:
      log('compiling the step without remat and accumulation to count its FLOPs ...')
      flops_by_step[plain] = step_cost(compile_step(plain)[1])
    report['flops_per_step'], report['bytes_accessed_per_step'] = flops_by_step[plain]
    report.update(plan_estimate(s, report))
  if steps:
    _time(settings, compiled, reports, steps, warmup_steps, product_ceiling, log)
  reports = [{k: r[k] for k in FIRST_KEYS if k in r} | r for r in reports]
  result = reports[0]
  if compare:
    result['compared'] = {'overrides': compare, **reports[1]}
    if steps:
      result['compared_speedup'] = paired_speedup(result['step_times_s'],
                                                  reports[1]['step_times_s'])
  stats = jax.devices()[0].memory_stats()
  result['device_peak_bytes_in_use'] = stats.get('peak_bytes_in_use') if stats else None
  return result


def _time(settings, compiled, reports, steps, warmup_steps, product_ceiling, log) -> None:
  """Times the compiled steps in turns and adds the times, MFU and the rest to `reports`."""
  products = None
  if product_ceiling:
    found = product_ceiling_lib.step_products(compiled[0][1].as_text())
    if not found:
      raise ConfigError('--product_ceiling: the compiled step has no dot instructions to '
                        f'time on {jax.devices()[0].platform} (its products are library '
                        'calls); it reads CPU steps')
    log("compiling the step's matrix products alone ...")
    products = product_ceiling_lib.ProductTimer(found)
  runs = []
  for s, (setup, step) in zip(settings, compiled):
    fbank = np.random.default_rng(0).normal(size=s.batch_shape).astype(np.float32)
    runs.append((step, setup.init(), jax.device_put(fbank, setup.batch_sharding)))
  on_cpu = jax.devices()[0].platform == 'cpu'
  matmul = matmul_rate(jnp.dtype(settings[0].model.dtype), 2048 if on_cpu else 8192)
  rates = []

  def after_round():
    rates.extend(matmul() for _ in range(PEAK_SAMPLES_PER_ROUND))
    if products is not None:
      products.time_each()

  times, _ = timed_steps(runs, steps, warmup_steps, log, after_round)
  peak = devices_peak_flops(rates)
  for s, report, t in zip(settings, reports, times):
    step_s = statistics.median(t)
    report.update({'step_s': step_s, 'step_times_s': t,
                   'clips_per_s': s.optim.batch_size / step_s,
                   'achieved_flops': report['flops_per_step'] / step_s,
                   'matmul_peak_flops': peak, 'matmul_peak_samples': len(rates),
                   'mfu': report['flops_per_step'] / step_s / peak})
  if products is not None:
    reports[0]['product_ceiling'] = products.summary(
        reports[0]['step_s'], reports[0]['flops_per_step'], peak)


# --- command line -------------------------------------------------------------------------

def write_result(result: dict, out: str) -> None:
  """Prints `result` as the last line on stdout and, if `out`, writes it there too."""
  text = json.dumps(result)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, 'w', encoding='utf-8') as f:
      f.write(json.dumps(result, indent=1) + '\n')
  print(text, flush=True)


def define_flags() -> None:
  """This script's flags (defined only when run, so that others can import it)."""
  config_flags.DEFINE_config_file('config', None, 'Training config file.')
  flags.DEFINE_integer('steps', 10, 'Timed steps after warm-up; 0: compile only and report '
                       'FLOPs and memory.')
  flags.DEFINE_integer('warmup_steps', 2, 'Untimed steps after compilation.')
  flags.DEFINE_string('compare', '', "Also time the config with these overrides, "
                      "'KEY=VALUE[,KEY=VALUE ...]' (e.g. 'joint_passes=1' or "
                      "'remat=True'), in turns with this one, and report the speed-up.")
  flags.DEFINE_bool('product_ceiling', False, "Also time the step's matrix products alone "
                    "and report the MFU ceiling they set (CPU, one device).")
  flags.DEFINE_string('out', '', 'Also write the JSON result to this file.')
  flags.DEFINE_bool('tune_cpu_allocator', True, 'As main.py: on a CPU backend, restart once '
                    'with the glibc malloc tunables of ssast_jax/training/host_allocator.py.')
  flags.mark_flags_as_required(['config'])


def main(argv):
  del argv
  f = flags.FLAGS
  if f.tune_cpu_allocator:
    host_allocator.restart_with_tuned_allocator()
  try:
    result = benchmark(f.config, f.steps, f.warmup_steps, f.compare, f.product_ceiling)
  except ConfigError as error:
    fail(str(error))
  write_result(result, f.out)


if __name__ == '__main__':
  define_flags()
  app.run(main, flags_parser=parse_flags)
