"""Fine-tuning learning rates and optimiser against the original `traintest.py` run in
PyTorch (its warm-up code, MultiStepLR, ReduceLROnPlateau and two-group Adam)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ssast_jax.finetune import lr_schedule as ls
from ssast_jax.training import schedule

torch = pytest.importorskip('torch')
# _torch_run steps the schedulers without optimiser steps, which PyTorch warns about
pytestmark = pytest.mark.filterwarnings('ignore:Detected call of `lr_scheduler.step')


def _torch_run(lr, head_lr, *, steps_per_epoch, n_epochs, warmup, milestones=None,
               gamma=None, plateau_metrics=None, patience=1):
  """Per step, the two groups' lrs of the original's train() loop (no model: lr only)."""
  params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
  optimizer = torch.optim.Adam([{'params': params[:1], 'lr': lr},
                                {'params': params[1:], 'lr': lr * head_lr}],
                               weight_decay=5e-7, betas=(0.95, 0.999))
  lr_list = [lr, optimizer.param_groups[1]['lr']]
  if plateau_metrics is None:
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(milestones), gamma=gamma)
  else:
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode='max', factor=0.5,
                                                           patience=patience)
  lrs, epoch_end, after_step, global_step = [], [], [], 0
  for epoch in range(1, n_epochs + 1):
    for _ in range(steps_per_epoch):
      if global_step <= 1000 and global_step % 50 == 0 and warmup:
        for group_id, group in enumerate(optimizer.param_groups):
          group['lr'] = (global_step / 1000) * lr_list[group_id]
      lrs.append([g['lr'] for g in optimizer.param_groups])
      global_step += 1
    epoch_end.append([g['lr'] for g in optimizer.param_groups])
    if plateau_metrics is None:
      scheduler.step()
    else:
      scheduler.step(plateau_metrics[epoch - 1])
    after_step.append([g['lr'] for g in optimizer.param_groups])
  return np.asarray(lrs), np.asarray(epoch_end), np.asarray(after_step)


def test_milestones():
  assert ls.multistep_milestones(10, 5) == tuple(range(10, 1000, 5))
  assert ls.multistep_milestones(5, 1)[:3] == (5, 6, 7) and ls.multistep_milestones(5, 1)[-1] == 999


@pytest.mark.parametrize('case', [
    # speech commands recipe (warm-up on, decays every epoch from 5) with short epochs, so
    # decays fall inside the warm-up and are undone by its stairs
    dict(lr=2.5e-4, head_lr=1, steps_per_epoch=130, n_epochs=12, warmup=True,
         milestones=ls.multistep_milestones(5, 1), gamma=0.85),
    # balanced AudioSet recipe (no warm-up), head 3x
    dict(lr=5e-5, head_lr=3, steps_per_epoch=7, n_epochs=25, warmup=False,
         milestones=ls.multistep_milestones(10, 5), gamma=0.5),
    # epoch boundaries on stairs; a milestone 0 decays at construction
    dict(lr=1e-4, head_lr=2, steps_per_epoch=100, n_epochs=14, warmup=True,
         milestones=ls.multistep_milestones(0, 3), gamma=0.7),
])
def test_multistep_schedule_equals_the_original_at_every_step(case):
  lr, head_lr = case.pop('lr'), case.pop('head_lr')
  expected, epoch_end, _ = _torch_run(lr, head_lr, **case)
  counts = jnp.arange(expected.shape[0])
  for group, base in enumerate([lr, lr * head_lr]):
    schedule_fn = jax.jit(ls.multistep_schedule(base, **case))
    np.testing.assert_array_equal(np.asarray(schedule_fn(counts)),
                                  expected[:, group].astype(np.float32))
  # the host helpers step the float64 lr through the epochs exactly as PyTorch does
  milestones, gamma, spe = case['milestones'], case['gamma'], case['steps_per_epoch']
  current = ls.multistep_step(0, lr, milestones, gamma)
  for epoch in range(1, case['n_epochs'] + 1):
    current = ls.lr_at_epoch_end(current, (epoch - 1) * spe, spe, lr, case['warmup'])
    assert current == epoch_end[epoch - 1, 0]
    current = ls.multistep_step(epoch, current, milestones, gamma)


def test_in_jit_warmup_with_host_epoch_ends_equals_the_original():
  """The pretraining-style loop: float32 lr in the state, warm-up per step, host decays."""
  lr, spe, n_epochs, milestones, gamma = 1e-4, 130, 10, ls.multistep_milestones(2, 1), 0.85
  expected, _, _ = _torch_run(lr, 1, steps_per_epoch=spe, n_epochs=n_epochs, warmup=True,
                              milestones=milestones, gamma=gamma)
  warm = jax.jit(lambda step, current: schedule.warmup_lr(step, current, lr, True))
  host = ls.multistep_step(0, lr, milestones, gamma)
  got = []
  for epoch in range(1, n_epochs + 1):
    current = jnp.float32(host)
    for step in range((epoch - 1) * spe, epoch * spe):
      current = warm(jnp.int32(step), current)
      got.append(current)
    host = ls.lr_at_epoch_end(host, (epoch - 1) * spe, spe, lr, True)
    host = ls.multistep_step(epoch, host, milestones, gamma)
  np.testing.assert_array_equal(np.asarray(got), expected[:, 0].astype(np.float32))


def test_plateau_epoch_end_equals_torch_on_map():
  m_aps = [0.1, 0.2, 0.2, 0.19, 0.25, 0.25, 0.25, 0.25, 0.3, 0.1]
  spe, n_epochs, lr, head_lr = 150, len(m_aps), 1e-4, 5
  expected, epoch_end, _ = _torch_run(lr, head_lr, steps_per_epoch=spe, n_epochs=n_epochs,
                                      warmup=True, plateau_metrics=m_aps, patience=1)
  state, lrs = schedule.plateau_init(), {ls.ENCODER: lr, ls.HEAD: lr * head_lr}
  for epoch, m_ap in enumerate(m_aps, start=1):
    first = (epoch - 1) * spe
    lrs = {g: ls.lr_at_epoch_end(v, first, spe, b, True)
           for (g, v), b in zip(lrs.items(), [lr, lr * head_lr])}
    assert [lrs[ls.ENCODER], lrs[ls.HEAD]] == list(epoch_end[epoch - 1])
    state, lrs = ls.plateau_epoch_end(state, m_ap, lrs, patience=1)
    if epoch < n_epochs:  # the next epoch's first step, before any stair
      next_lr = expected[epoch * spe]
      if epoch * spe > 1000 or (epoch * spe) % 50:
        assert [lrs[ls.ENCODER], lrs[ls.HEAD]] == list(next_lr)
  assert lrs[ls.ENCODER] < lr  # it did reduce


def test_adaptive_epoch_end_by_hand():
  """ReduceLROnPlateau(mode='max', factor=0.5) worked out by hand: a halving skipped once
  it would change the lr by at most 1e-8 (per group), and the warm-up's stairs."""
  bases = {ls.ENCODER: 3e-8, ls.HEAD: 1e-4}
  adaptive = ls.adaptive_init(bases)
  assert adaptive == {'plateau': {'best': None, 'num_bad_evals': 0},
                      'lr': {ls.ENCODER: 3e-8, ls.HEAD: 1e-4}}
  kwargs = dict(num_steps=10, base_lrs=bases, warmup=False, patience=0)
  got = []
  for epoch, m_ap in enumerate([0.5, 0.5, 0.50001, 0.6]):  # 0.50001: below the 1e-4 rel
    adaptive = ls.adaptive_epoch_end(adaptive, m_ap, first_step=10 * epoch, **kwargs)
    got.append(adaptive['lr'])
    assert json.loads(json.dumps(adaptive)) == adaptive  # the checkpoint's meta
  assert got == [{ls.ENCODER: 3e-8, ls.HEAD: 1e-4},  # the first mAP is the best
                 {ls.ENCODER: 1.5e-8, ls.HEAD: 5e-5},  # 3e-8 - 1.5e-8 > 1e-8
                 {ls.ENCODER: 1.5e-8, ls.HEAD: 2.5e-5},  # 1.5e-8 - 7.5e-9 <= 1e-8: kept
                 {ls.ENCODER: 1.5e-8, ls.HEAD: 2.5e-5}]  # improved
  assert adaptive['plateau'] == {'best': 0.6, 'num_bad_evals': 0}

  # With warm-up the epoch's last stair sets the lr first (steps 0-99: stair 50, 100-199:
  # stair 150), and the halving after epoch 2 acts on it.
  bases = {ls.ENCODER: 1e-4, ls.HEAD: 3e-4}
  adaptive = ls.adaptive_init(bases)
  kwargs = dict(num_steps=100, base_lrs=bases, warmup=True, patience=0)
  adaptive = ls.adaptive_epoch_end(adaptive, 0.5, first_step=0, **kwargs)
  assert adaptive['lr'] == {g: (50 / 1000) * b for g, b in bases.items()}
  adaptive = ls.adaptive_epoch_end(adaptive, 0.4, first_step=100, **kwargs)
  assert adaptive['lr'] == {g: (150 / 1000) * b * 0.5 for g, b in bases.items()}


@functools.partial(jax.jit, static_argnames=('base_lr', 'warmup', 'num_steps'))
def _device_epoch(first_step, current, *, base_lr, warmup, num_steps):
  """The lrs the fine-tuning step uses over one epoch, from the state's float32 lr."""
  def body(lr, step):
    lr = schedule.warmup_lr(step, lr, base_lr, warmup)
    return lr, lr
  return jax.lax.scan(body, current, first_step + jnp.arange(num_steps))[1]


@pytest.mark.parametrize('warmup, spe', [(True, 130), (False, 7)])
def test_adaptschedule_equals_torch_reduce_lr_on_plateau(warmup, spe):
  """The fine-tuning loop's lr with adaptschedule (float32 state lr warmed up per step,
  host float64 plateau rule after each epoch) against the original's loop with
  `ReduceLROnPlateau(mode='max', factor=0.5, patience=1)`: two groups of different lrs,
  the encoder's small enough that later halvings fall under the 1e-8 skip."""
  m_aps = [0.1, 0.2, 0.2, 0.2, 0.3, 0.30002, 0.3, float('nan'), 0.29, 0.3, 0.31, 0.31,
           0.31, 0.2, 0.2, 0.2, 0.2, 0.2]
  lr, head_lr = 1e-7, 50
  expected, epoch_end, after_step = _torch_run(
      lr, head_lr, steps_per_epoch=spe, n_epochs=len(m_aps), warmup=warmup,
      plateau_metrics=m_aps, patience=1)
  bases = {ls.ENCODER: lr, ls.HEAD: lr * head_lr}
  adaptive = ls.adaptive_init(bases)
  device = {g: jnp.float32(b) for g, b in bases.items()}
  got = {g: [] for g in bases}
  for epoch, m_ap in enumerate(m_aps):
    for g in bases:
      got[g].append(_device_epoch(epoch * spe, device[g], base_lr=bases[g], warmup=warmup,
                                  num_steps=spe))
      assert got[g][-1][-1] == np.float32(ls.lr_at_epoch_end(
          adaptive['lr'][g], epoch * spe, spe, bases[g], warmup))  # host and device agree
    adaptive = ls.adaptive_epoch_end(adaptive, m_ap, first_step=epoch * spe, num_steps=spe,
                                     base_lrs=bases, warmup=warmup, patience=1)
    assert [adaptive['lr'][ls.ENCODER], adaptive['lr'][ls.HEAD]] == list(after_step[epoch])
    device = {g: jnp.float32(v) for g, v in adaptive['lr'].items()}
  for column, g in enumerate([ls.ENCODER, ls.HEAD]):
    np.testing.assert_array_equal(np.concatenate(got[g]),
                                  expected[:, column].astype(np.float32))
  ratio = after_step / epoch_end  # 0.5 where the scheduler halved a group's lr
  assert np.any((ratio[:, 1] == 0.5) & (ratio[:, 0] == 1))  # the encoder's halving skipped
  assert after_step[-1, 0] == lr / 8  # 1.25e-8: halving it would change it by 6.25e-9


class _Tiny(nnx.Module):
  def __init__(self, rngs):
    self.blocks = nnx.List([nnx.Linear(3, 3, rngs=rngs)])
    self.norm = nnx.LayerNorm(3, rngs=rngs)
    self.mlp_head = nnx.Sequential(nnx.LayerNorm(3, rngs=rngs), nnx.Linear(3, 2, rngs=rngs))


def test_param_labels_split_head_from_encoder():
  labels = ls.param_labels({'mlp_head': {'linear': {'kernel': 1}}, 'norm': {'scale': 2},
                            'pos_embed': 3})
  assert labels == {'mlp_head': {'linear': {'kernel': 'head'}}, 'norm': {'scale': 'encoder'},
                    'pos_embed': 'encoder'}
  state = nnx.state(_Tiny(nnx.Rngs(0)), nnx.Param)
  flat = jax.tree_util.tree_flatten_with_path(ls.param_labels(state))[0]
  heads = {jax.tree_util.keystr(p) for p, label in flat if label == 'head'}
  assert len(heads) == 4 and all("'mlp_head'" in h for h in heads)
  assert len(flat) - len(heads) == 4


def test_two_group_adam_equals_torch_adam_with_l2():
  rng = np.random.default_rng(0)
  shapes = {'mlp_head': {'w': (3, 2), 'b': (2,)}, 'blocks': {'w': (4, 3)}, 'pos': (1, 5)}
  params = jax.tree.map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
                        is_leaf=lambda s: isinstance(s, tuple))
  grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
           for _ in range(60)]
  lr, head_lr, spe = 1e-2, 4, 20
  kwargs = dict(steps_per_epoch=spe, n_epochs=3, warmup=True,
                milestones=ls.multistep_milestones(1, 1), gamma=0.5)
  tx = ls.finetune_optimizer(ls.multistep_schedule(lr, **kwargs),
                             ls.multistep_schedule(lr * head_lr, **kwargs))

  leaves, treedef = jax.tree.flatten(params)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  torch_params = [torch.nn.Parameter(torch.from_numpy(np.array(x))) for x in leaves]
  head = [p for p, name in zip(torch_params, paths) if 'mlp_head' in name]
  base = [p for p, name in zip(torch_params, paths) if 'mlp_head' not in name]
  optimizer = torch.optim.Adam([{'params': base, 'lr': lr}, {'params': head, 'lr': lr * head_lr}],
                               weight_decay=5e-7, betas=(0.95, 0.999))
  scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(kwargs['milestones']), 0.5)
  lr_list = [lr, lr * head_lr]

  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  # the same Adam through apply_group_lr, with the lr given by the host
  adam = ls.adam_l2()
  adam_state = adam.init(params)
  params_b = params
  for step, g in enumerate(grads):
    if step <= 1000 and step % 50 == 0:
      for group_id, group in enumerate(optimizer.param_groups):
        group['lr'] = (step / 1000) * lr_list[group_id]
    for p, x in zip(torch_params, jax.tree.leaves(g)):
      p.grad = torch.from_numpy(np.array(x))
    optimizer.step()
    lrs = [grp['lr'] for grp in optimizer.param_groups]
    updates, opt_state = update(g, opt_state, params)
    params = optax.apply_updates(params, updates)
    raw, adam_state = adam.update(g, adam_state, params_b)
    params_b = jax.tree.map(lambda p, u: p + u, params_b,
                            ls.apply_group_lr(raw, np.float32(lrs[0]), np.float32(lrs[1])))
    if (step + 1) % spe == 0:
      scheduler.step()
  expected = jax.tree.unflatten(treedef, [p.detach().numpy() for p in torch_params])
  for got in (params, params_b):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7),
                 got, expected)
  assert not np.allclose(params['mlp_head']['w'], grads[0]['mlp_head']['w'])
