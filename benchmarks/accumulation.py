"""Gradient-accumulation check: how far the update and the logged metrics of
`grad_accum_steps` micro-batches are from those of the whole batch at once, on this machine.

python benchmarks/accumulation.py --config=configs/pretrain_joint.py \\
    --config.grad_accum_steps=4 [--config.KEY=VALUE ...] [--batches=8] [--out=PATH]

The training step of the config is compiled as training compiles it (`step_setup`), once
with `grad_accum_steps=1` and once with the config's value; each of `--batches` random
batches gets one step of both from the same fresh state. Adam's moments are set so that an
update is proportional to the gradient (a fresh Adam's first update is the gradient's
sign), and the learning rate is 1 without warm-up, so that float32 rounding of
`params + update` stays far below the gap. The last line printed is a JSON object with the
relative gaps of the update and of each metric per batch; progress goes to stderr.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from benchmarks.step import log_to_stderr, with_overrides, write_result  # noqa: E402
from ssast_jax.config.command_line import fail, parse_flags  # noqa: E402
from ssast_jax.config.settings import ConfigError, resolve  # noqa: E402
from ssast_jax.training.step import step_setup  # noqa: E402


def proportional_adam(state: dict) -> dict:
  """`state` with Adam's second moments at 1 and its bias corrections at 1, so that its
  next update is the gradient itself."""
  decay, adam = state['opt_state']
  adam = adam._replace(count=jnp.asarray(10 ** 6, adam.count.dtype),
                       nu=jax.tree.map(jnp.ones_like, adam.nu))
  return {**state, 'opt_state': (decay, adam)}


def flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(tree)])


def relative_gap(a: np.ndarray, b: np.ndarray) -> float:
  """|a - b| / |b|, and |a - b| where b is 0."""
  scale = np.linalg.norm(b)
  return float(np.linalg.norm(a - b) / (scale if scale else 1.0))


METRICS = ('loss', 'mpc_loss', 'mpg_loss', 'mpc_acc', 'grad_norm')


def step_gaps(config, batches: int, log=log_to_stderr) -> list[dict]:
  """For each of `batches` random batches (seeds 0, 1, ...) of the ConfigDict `config`,
  the relative gaps between the accumulated and the whole-batch step: {'update': gap of
  the parameter updates, METRIC: gap of that logged metric, ...}."""
  settings = resolve(config, check_data=False)
  accum = settings.optim.grad_accum_steps
  if batches < 1:
    raise ConfigError(f'--batches is {batches}; give 1 or more')
  if accum < 2:
    raise ConfigError(f'grad_accum_steps is {accum}; give 2 or more to compare with the '
                      f'whole batch')
  setups = []
  for steps in (1, accum):
    variant = with_overrides(config, {'grad_accum_steps': steps, 'lr': 1.0, 'warmup': False})
    log(f'compiling the step with grad_accum_steps={steps} ...')
    setups.append(step_setup(resolve(variant, check_data=False)))
  gaps = []
  for seed in range(batches):
    fbank = np.random.default_rng(seed).normal(size=settings.batch_shape).astype(np.float32)
    updates, metrics = [], []
    for setup in setups:
      state = proportional_adam(setup.init())
      before = flat(state['params'])
      new_state, step_metrics = setup.step(state, jax.device_put(fbank, setup.batch_sharding))
      updates.append(flat(new_state['params']) - before)
      metrics.append({key: float(step_metrics[key]) for key in METRICS})
    whole, accumulated = metrics
    gaps.append({'update': relative_gap(updates[1], updates[0]),
                 **{key: relative_gap(np.float64(accumulated[key]), np.float64(whole[key]))
                    for key in METRICS}})
    log(f'batch {seed + 1}/{batches}: relative gap of the update {gaps[-1]["update"]:.3g}, '
        f'of the metrics at most {max(gaps[-1][key] for key in METRICS):.3g}')
  return gaps


def main(argv):
  del argv
  f = flags.FLAGS
  try:
    gaps = step_gaps(f.config, f.batches)
  except ConfigError as error:
    fail(str(error))
  write_result({'max_update_gap': max(g['update'] for g in gaps),
                'max_metric_gap': max(g[key] for g in gaps for key in METRICS),
                'relative_gaps': gaps,
                'grad_accum_steps': f.config.grad_accum_steps,
                'batch_size': f.config.batch_size, 'platform': jax.devices()[0].platform},
               f.out)


if __name__ == '__main__':
  config_flags.DEFINE_config_file('config', None, 'Training config file.')
  flags.DEFINE_integer('batches', 8, 'Random batches to compare.')
  flags.DEFINE_string('out', '', 'Also write the JSON result to this file.')
  flags.mark_flags_as_required(['config'])
  app.run(main, flags_parser=parse_flags)
