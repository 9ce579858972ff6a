"""Warm-up staircase and plateau halving against the original (PyTorch) behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ssast_jax.training import schedule

BASE_LR = 1e-4
_jitted_warmup = jax.jit(schedule.warmup_lr, static_argnames=('base_lr', 'warmup'))


def _warmup(step, current_lr, base_lr=BASE_LR, warmup=True):
  return _jitted_warmup(jnp.int32(step), jnp.float32(current_lr), base_lr=base_lr,
                        warmup=warmup)


@pytest.mark.parametrize('step, current, expected', [
    (0, BASE_LR, 0.0),  # step 0 sets 0 whatever came before
    (49, 0.0, 0.0),  # between stairs: unchanged
    (49, 0.123, 0.123),
    (50, 0.0, np.float32(50 / 1000 * BASE_LR)),
    (150, 0.0, np.float32(150 / 1000 * BASE_LR)),
    (999, 0.5, 0.5),
    (1000, 0.0, np.float32(BASE_LR)),
    (1001, 0.25, 0.25),
    (1050, 0.25, 0.25),  # past warm-up, stair-aligned steps no longer reset
])
def test_warmup_staircase_values(step, current, expected):
  lr = _warmup(step, current)
  assert lr.dtype == jnp.float32
  assert lr == np.float32(expected)


def test_warmup_rounds_the_float64_product_once():
  """Step 150 at lr 1e-4 is a case where float32 arithmetic lands on a different value."""
  float32_product = np.float32(150) / np.float32(1000) * np.float32(BASE_LR)
  assert np.float32(150 / 1000 * BASE_LR) != float32_product
  assert _warmup(150, 0.0) == np.float32(150 / 1000 * BASE_LR)


def test_warmup_disabled_keeps_current_lr():
  assert _warmup(0, BASE_LR, warmup=False) == np.float32(BASE_LR)
  assert _warmup(500, 0.3, warmup=False) == np.float32(0.3)


def test_warmup_stairs_table():
  stairs = schedule.warmup_stairs(1e-3)
  assert stairs.shape == (21,) and stairs.dtype == np.float32
  assert stairs[0] == 0.0 and stairs[-1] == np.float32(1e-3)
  assert stairs[7] == np.float32(350 / 1000 * 1e-3)


def _metric_sequences(rng, length):
  """Random, plateauing and tiny-improvement metric sequences (around 0.1-0.9)."""
  random = rng.uniform(0.1, 0.9, length)
  plateau = np.repeat(rng.uniform(0.1, 0.9, length // 4 + 1), 4)[:length]
  creeping = 0.5 * np.cumprod(1 + rng.choice([-2e-4, 5e-5, 0.0, 2e-4], length))
  rising_then_flat = np.minimum(np.linspace(0.05, 0.6, length), 0.4)
  return [random, plateau, creeping, rising_then_flat]


def _torch_plateau(mode, patience, initial_lr):
  param = torch.nn.Parameter(torch.zeros(1))
  optimizer = torch.optim.Adam([param], initial_lr)
  scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=0.5,
                                                         patience=patience)
  return optimizer, scheduler


@pytest.mark.parametrize('mode', ['max', 'min'])
@pytest.mark.parametrize('patience', [1, 2])
@pytest.mark.parametrize('initial_lr', [1e-4, 1e-6])  # 1e-6 runs into the 1e-8 eps floor
def test_plateau_matches_torch(mode, patience, initial_lr):
  rng = np.random.default_rng(patience * 10 + (mode == 'max'))
  for metrics in _metric_sequences(rng, 120):
    optimizer, scheduler = _torch_plateau(mode, patience, initial_lr)
    state, lr = schedule.plateau_init(), initial_lr
    for metric in metrics:
      scheduler.step(float(metric))
      state, lr = schedule.plateau_step(state, float(metric), lr, mode=mode,
                                        patience=patience)
      assert lr == optimizer.param_groups[0]['lr']
      assert state['num_bad_evals'] == scheduler.num_bad_epochs
      assert state['best'] == scheduler.best
    assert lr < initial_lr


def test_plateau_reduces_at_eps_floor_only_when_change_exceeds_eps():
  state, lr = schedule.plateau_init(), 3e-8
  for metric in (0.5, 0.5, 0.5):
    state, lr = schedule.plateau_step(state, metric, lr, mode='max', patience=1)
  assert lr == 1.5e-8  # 3e-8 - 1.5e-8 > 1e-8: reduced
  for metric in (0.5, 0.5):
    state, lr = schedule.plateau_step(state, metric, lr, mode='max', patience=1)
  assert lr == 1.5e-8  # 1.5e-8 - 7.5e-9 <= 1e-8: kept
  assert state == {'best': 0.5, 'num_bad_evals': 0}


def test_plateau_rejects_unknown_mode():
  with pytest.raises(ValueError, match="plateau mode must be 'max' or 'min', got 'up'"):
    schedule.plateau_step(schedule.plateau_init(), 0.1, 1e-4, mode='up', patience=1)


def _monitored(task, evals):
  """SPEC section 6: validation accuracy (mode max), or the MSE for pretrain_mpg (min)."""
  return (evals['eval/mpg_loss'], 'min') if task == 'pretrain_mpg' else (
      evals['eval/mpc_acc'], 'max')


@pytest.mark.parametrize('task', ['pretrain_joint', 'pretrain_mpg'])
def test_warmup_and_plateau_together_match_the_original_loop(task):
  """The original's loop (traintest_mask) with a real torch optimiser and scheduler.

  Evaluations every 70 steps fall inside the warm-up, so halvings made there are
  overwritten at the next stair step; afterwards they stick.
  """
  epoch_iter, num_steps, patience = 70, 2100, 1
  rng = np.random.default_rng(3)
  evals = [{'eval/mpc_acc': a, 'eval/mpg_loss': m}
           for a, m in zip(rng.uniform(0.1, 0.2, 40), rng.uniform(0.4, 0.5, 40))]

  mode = _monitored(task, evals[0])[1]
  optimizer, scheduler = _torch_plateau(mode, patience, BASE_LR)  # as the original
  torch_lrs = []
  for global_step in range(num_steps):
    if global_step <= 1000 and global_step % 50 == 0:
      for group in optimizer.param_groups:
        group['lr'] = (global_step / 1000) * BASE_LR
    torch_lrs.append(np.float32(optimizer.param_groups[0]['lr']))
    if (global_step + 1) % epoch_iter == 0:
      scheduler.step(_monitored(task, evals[(global_step + 1) // epoch_iter])[0])

  state, lr, lrs = schedule.plateau_init(), np.float32(BASE_LR), []
  for step in range(num_steps):
    lr = _warmup(step, lr)
    lrs.append(np.float32(lr))
    if (step + 1) % epoch_iter == 0:
      metric = _monitored(task, evals[(step + 1) // epoch_iter])[0]
      state, new_lr = schedule.plateau_step(state, metric, float(lr), mode=mode,
                                            patience=patience)
      lr = np.float32(new_lr)

  assert lrs == torch_lrs
  stairs = set(schedule.warmup_stairs(BASE_LR).tolist())
  assert any(lr not in stairs for lr in torch_lrs[:1000])  # a halving inside the warm-up
  assert len(set(torch_lrs[1001:])) > 1  # and halvings after it
