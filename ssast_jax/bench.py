"""Training-step benchmark: time, FLOPs, MFU and memory of the real compiled step.

python -m ssast_jax.bench --config=configs/pretrain_joint.py [--config.x=y ...] --steps=N

Synthetic batches, no data loading. FLOPs and memory come from XLA's analysis of the
compiled step; the peak is a large matmul of the step's dtype measured in the same run.
The last line printed is a JSON object.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from flax import nnx

from ssast_jax import config_checks
from ssast_jax.model import SSAST
from ssast_jax.train import make_mesh, model_config, step_settings
from ssast_jax.train_step import init_state, train_step

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps after warm-up.')
_WARMUP = flags.DEFINE_integer('warmup_steps', 2, 'Untimed steps after compilation.')
flags.mark_flags_as_required(['config'])


def matmul_peak_flops(dtype, size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a large square matmul in `dtype` on the default device (median)."""
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  b = jax.random.normal(jax.random.key(1), (size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2 * size ** 3 / statistics.median(times)


def peak_memory_bytes(compiled) -> int:
  """Arguments + outputs + temporaries, less donated buffers reused as outputs."""
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def benchmark(config, steps: int, warmup_steps: int = 2, log=print) -> dict:
  config_checks.check_config(config, check_data=False)
  mcfg, settings = model_config(config), step_settings(config)
  mesh = make_mesh()
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: SSAST(mcfg, nnx.Rngs(0))))
  state = jax.jit(lambda: init_state(mcfg, config.seed, config.lr), out_shardings=replicated)()
  shape = (config.batch_size, config.data.target_length, config.data.num_mel_bins)
  batch = jax.device_put(np.random.default_rng(0).normal(size=shape).astype(np.float32),
                         batch_sharding)
  step = jax.jit(train_step.__wrapped__, static_argnames=('graphdef', 'settings'),
                 donate_argnums=0)
  log('compiling the training step ...')
  start = time.perf_counter()
  compiled = step.lower(state, batch, graphdef=graphdef, settings=settings).compile()
  compile_s = time.perf_counter() - start
  flops = float(compiled.cost_analysis()['flops'])
  for _ in range(warmup_steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for i in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
    log(f'step {i + 1}/{steps}: {times[-1]:.3f} s')
  step_s = statistics.median(times)
  peak = matmul_peak_flops(jnp.dtype(config.dtype))
  return {'step_s': step_s, 'clips_per_s': config.batch_size / step_s,
          'flops_per_step': flops, 'achieved_flops': flops / step_s,
          'matmul_peak_flops': peak, 'mfu': flops / step_s / peak,
          'peak_memory_bytes': peak_memory_bytes(compiled), 'compile_s': compile_s,
          'batch_size': config.batch_size, 'devices': jax.device_count(),
          'platform': jax.devices()[0].platform}


def main(argv):
  del argv
  result = benchmark(_CONFIG.value, _STEPS.value, _WARMUP.value,
                     log=lambda m: print(m, file=sys.stderr, flush=True))
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
