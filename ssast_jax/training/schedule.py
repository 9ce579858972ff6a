"""The original pretraining loop's learning rate: staircase warm-up and halving on plateau.

SPEC section 6. One learning-rate value, `current_lr`, is acted on by both rules, as in the
original, where both write the optimiser's `param_group['lr']`:

* `warmup_lr` runs at the start of every training step, inside the jitted step. At steps
  `0, 50, ..., 1000` it overwrites the learning rate with `step / 1000 * lr`; in between
  the learning rate is left as it is. A plateau halving made during warm-up therefore
  lasts only until the next stair step, as in the original.
* `plateau_step` runs on the host after each validation. It reproduces
  `torch.optim.lr_scheduler.ReduceLROnPlateau` with the original's settings
  (`factor=0.5`, threshold `1e-4` relative, no cooldown, `min_lr=0`, `eps=1e-8`); its
  state is a small JSON-serialisable dict to be checkpointed with the run.

Before the first step the learning rate is `lr` (the config's base value); with warm-up on,
step 0 sets it to 0, so steps 0 to 49 run at learning rate 0.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

WARMUP_STEPS = 1000  # the original's warm-up length and stair width
WARMUP_EVERY = 50
PLATEAU_THRESHOLD = 1e-4  # ReduceLROnPlateau defaults, which the original keeps
PLATEAU_EPS = 1e-8
PLATEAU_MIN_LR = 0.0


def warmup_stairs(base_lr: float, warmup_steps: int = WARMUP_STEPS,
                  every: int = WARMUP_EVERY) -> np.ndarray:
  """Learning rates the warm-up sets at steps 0, every, 2 * every, ... <= warmup_steps.

  Computed as the original does, `(step / warmup_steps) * base_lr` in Python (float64)
  arithmetic, then rounded once to float32. Computing the same product in float32 rounds
  twice and differs in the last bit for some steps, so the values are tabulated here.
  """
  return np.asarray([(step / warmup_steps) * base_lr
                     for step in range(0, warmup_steps + 1, every)], np.float32)


def warmup_lr(step, current_lr, base_lr: float, warmup: bool = True,
              warmup_steps: int = WARMUP_STEPS, every: int = WARMUP_EVERY):
  """The learning rate for training step `step` (0-based count of updates already made).

  At a step `<= warmup_steps` divisible by `every` it returns
  `float32((step / warmup_steps) * base_lr)` with the product taken in float64, exactly the
  value the original writes into its optimiser (a Python float) rounded to float32; at any
  other step, or when `warmup` is False, it returns `current_lr` unchanged. (PyTorch's Adam
  then folds its float64 learning rate into `lr / bias_correction1` before rounding to
  float32, which a float32 optimiser cannot repeat bit for bit; the learning rate itself
  is identical.)

  Works under `jax.jit` with a traced int32 `step` and float32 `current_lr`; `base_lr`,
  `warmup`, `warmup_steps` and `every` are static Python values.
  """
  if not warmup:
    return current_lr
  stairs = jnp.asarray(warmup_stairs(base_lr, warmup_steps, every))
  on_stair = (step <= warmup_steps) & (step % every == 0)
  stair = jnp.clip(step // every, 0, stairs.shape[0] - 1)
  return jnp.where(on_stair, stairs[stair], current_lr).astype(jnp.float32)


def plateau_init() -> dict:
  """Plateau state before any validation: no best value yet, no bad evaluations.

  `best` is None until the first evaluation (ReduceLROnPlateau's `mode_worse`, i.e. -inf
  for mode max and +inf for mode min), which keeps the state strict JSON.
  """
  return {'best': None, 'num_bad_evals': 0}


def _is_better(value: float, best: float | None, mode: str) -> bool:
  if mode == 'max':
    return value > (-math.inf if best is None else best) * (1.0 + PLATEAU_THRESHOLD)
  return value < (math.inf if best is None else best) * (1.0 - PLATEAU_THRESHOLD)


def plateau_step(state: dict, metric: float, current_lr: float, *, mode: str,
                 patience: int, factor: float = 0.5) -> tuple[dict, float]:
  """One `ReduceLROnPlateau.step(metric)`: the new state and the learning rate to use.

  The learning rate is multiplied by `factor` once the metric has not improved (by more
  than 1e-4 relative) for more than `patience` consecutive evaluations; the reduction is
  skipped when it would change the learning rate by at most 1e-8, as PyTorch does.
  `current_lr` is the learning rate in force (after any warm-up), as the original's
  scheduler reads it from the optimiser.
  """
  if mode not in ('max', 'min'):
    raise ValueError(f"plateau mode must be 'max' or 'min', got {mode!r}")
  metric = float(metric)
  current_lr = float(current_lr)
  if _is_better(metric, state['best'], mode):
    best, num_bad = metric, 0
  else:
    best, num_bad = state['best'], state['num_bad_evals'] + 1
  new_lr = current_lr
  if num_bad > patience:
    reduced = max(current_lr * factor, PLATEAU_MIN_LR)
    if current_lr - reduced > PLATEAU_EPS:
      new_lr = reduced
    num_bad = 0
  return {'best': best, 'num_bad_evals': num_bad}, new_lr
