"""Gradient-accumulation check: how far the update of `grad_accum_steps` micro-batches is
from the update of the whole batch at once, on this machine.

python -m ssast_jax.check_accumulation --config=configs/pretrain_joint.py \\
    --config.grad_accum_steps=4 [--config.x=y ...] [--batches=8]

The training step of the config is compiled as training compiles it, once with
`grad_accum_steps=1` and once with the config's value; each of `--batches` random batches
gets one step of both from the same fresh state. Adam's moments are set so that an update
is proportional to the gradient (a fresh Adam's first update is the gradient's sign), the
learning rate is 1 without warm-up (so float32 rounding of `params + update` stays far
below the gap). The last line printed is a JSON object with the relative gap per batch.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from ssast_jax import config_checks
from ssast_jax.train import batch_shape, step_setup


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
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def update_gaps(config, batches: int, log=print) -> list[float]:
  """Relative gap between the accumulated and the whole-batch update for each of
  `batches` random batches (seeds 0, 1, ...) of `config`."""
  config_checks.check_config(config, check_data=False)
  if batches < 1:
    raise config_checks.ConfigError(f'--batches is {batches}; give 1 or more')
  if config.grad_accum_steps < 2:
    raise config_checks.ConfigError(
        f'grad_accum_steps is {config.grad_accum_steps}; give 2 or more to compare with '
        f'the whole batch')
  steps = []
  for accum in (1, config.grad_accum_steps):
    variant = config.copy_and_resolve_references()
    variant.grad_accum_steps, variant.lr, variant.warmup = accum, 1.0, False
    log(f'compiling the step with grad_accum_steps={accum} ...')
    steps.append(step_setup(variant))
  gaps = []
  for seed in range(batches):
    fbank = np.random.default_rng(seed).normal(size=batch_shape(config)).astype(np.float32)
    updates = []
    for setup in steps:
      state = proportional_adam(setup.init())
      before = flat(state['params'])
      new_state, _ = setup.step(state, jax.device_put(fbank, setup.batch_sharding))
      updates.append(flat(new_state['params']) - before)
    gaps.append(relative_gap(updates[1], updates[0]))
    log(f'batch {seed + 1}/{batches}: relative gap {gaps[-1]:.3g}')
  return gaps


def main(argv):
  del argv
  config = flags.FLAGS.config
  try:
    gaps = update_gaps(config, flags.FLAGS.batches,
                       log=lambda m: print(m, file=sys.stderr, flush=True))
  except config_checks.ConfigError as error:
    raise SystemExit(f'error: {error}') from None
  print(json.dumps({'grad_accum_steps': config.grad_accum_steps,
                    'batch_invariant': config.batch_invariant, 'relative_gaps': gaps,
                    'max_gap': max(gaps)}))


if __name__ == '__main__':
  # Defined here, not on import: the tests import this module beside the benchmark, which
  # defines its own --config.
  config_flags.DEFINE_config_file('config', None, 'Training config file.')
  flags.DEFINE_integer('batches', 8, 'Random batches to compare.')
  flags.mark_flags_as_required(['config'])
  app.run(main)
