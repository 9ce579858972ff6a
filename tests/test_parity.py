"""Parity with numbers produced by the original PyTorch SSAST (tests/data/tiny2_patch.*)."""

import jax
import numpy as np
import pytest
from flax import nnx

import ssast_jax
from ssast_jax.interchange import pytorch as conversion
from ssast_jax.objective import losses


@pytest.fixture(scope='module')
def model(reference):
  return ssast_jax.from_pytorch(reference[0])


def test_inferred_config(model, reference):
  meta = reference[2]
  c = model.config
  assert (c.embed_dim, c.num_heads, c.depth) == (192, 3, meta['depth'])
  assert (c.fshape, c.tshape, c.input_fdim, c.input_tdim) == (16, 16, 128, 256)
  assert c.patch_grid == tuple(meta['patch_grid']) and c.size == 'tiny'


@pytest.mark.parametrize('mask_key, expected_key', [(None, 'encoded'),
                                                    ('mpc_mask', 'encoded_masked')])
def test_encoder_outputs(model, reference, mask_key, expected_key):
  arrays = reference[1]
  mask = None if mask_key is None else arrays[mask_key]
  out = np.asarray(ssast_jax.encode(model, arrays['x'], mask))
  assert out.shape == arrays[expected_key].shape == (3, 130, 192)
  np.testing.assert_allclose(out, arrays[expected_key], atol=1e-4, rtol=0)


def test_pretext_losses(model, reference):
  arrays = reference[1]
  out = ssast_jax.pretext_losses(model, arrays['x'], arrays['mpc_mask'], arrays['mpg_mask'])
  batch, masked = arrays['mpc_mask'].shape
  assert round(out['mpc_acc'] * batch * masked) == round(float(arrays['mpc_acc']) * batch * masked)
  for key in ('mpc_loss', 'mpg_loss', 'loss'):
    np.testing.assert_allclose(out[key], arrays[key], rtol=1e-5, err_msg=key)
  np.testing.assert_allclose(out['loss'], out['mpc_loss'] + 10 * out['mpg_loss'], rtol=1e-6)


def _torch_named_gradients(model, arrays, **loss_options):
  def loss(state):
    return losses.pretext_losses(nnx.merge(model.graphdef, state), arrays['x'],
                                 arrays['mpc_mask'], arrays['mpg_mask'], **loss_options)['loss']
  grads = nnx.to_pure_dict(jax.grad(loss)(model.state))
  named = conversion.state_dict_arrays(grads, model.config)
  return {key[len(conversion.PREFIX):]: value for key, value in named.items()}


def test_gradients(model, reference):
  arrays, meta = reference[1], reference[2]
  grads = _torch_named_gradients(model, arrays)
  assert len(meta['grads']) == 20
  for key in meta['grads']:
    expected = arrays[key]
    got = grads[key[len('grad/'):]]
    assert got.shape == expected.shape, key
    # 1e-4 of the tensor's norm; the absolute floor covers cpredlayer.2.bias, whose exact
    # gradient is 0 (a row-wise softmax ignores a shift shared by all predictions).
    assert np.linalg.norm(got - expected) <= 1e-4 * np.linalg.norm(expected) + 1e-6, key


def test_mpc_loss_trains_the_encoder(model, reference):
  """As in the original (SPEC section 5), the MPC loss reaches the encoder through cpred:
  the joint gradient of an encoder tensor is not 10x the MPG pass's alone."""
  arrays = reference[1]
  joint = _torch_named_gradients(model, arrays)
  mpg_only = _torch_named_gradients(model, arrays, task='pretrain_mpg')
  mpc_only = _torch_named_gradients(model, arrays, task='pretrain_mpc')
  for key in ('v.pos_embed', 'mask_embed', 'v.blocks.0.attn.qkv.weight'):
    assert np.linalg.norm(mpc_only[key]) > 0.1 * np.linalg.norm(joint[key]), key
    np.testing.assert_allclose(joint[key], mpc_only[key] + 10 * mpg_only[key], rtol=1e-4,
                               atol=1e-7, err_msg=key)
  np.testing.assert_allclose(np.linalg.norm(arrays['grad/v.pos_embed']), 0.467, rtol=0.01)


def _log_softmax(s, axis):
  s = s - s.max(axis=axis, keepdims=True)
  return s - np.log(np.exp(s).sum(axis=axis, keepdims=True))


def test_infonce_against_numpy():
  rng = np.random.default_rng(0)
  targets = rng.normal(size=(2, 7, 5)).astype(np.float32)
  preds = rng.normal(size=(2, 7, 5)).astype(np.float32)
  scores = np.einsum('bak,bck->bac', targets.astype(np.float64), preds)
  for paper, axis in ((False, 2), (True, 1)):
    loss, acc = (np.mean(v) for v in losses.infonce(preds, targets, paper_infonce=paper))
    expected = -np.mean(np.diagonal(_log_softmax(scores, axis), axis1=1, axis2=2))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    probs = np.exp(_log_softmax(scores, 2))
    np.testing.assert_allclose(float(acc), np.mean(probs.argmax(axis=1) == np.arange(7)))
  assert not np.allclose(losses.infonce(preds, targets, True)[0], losses.infonce(preds, targets)[0])


def test_one_pass_joint_equals_two_passes_with_one_mask(model, reference):
  arrays = reference[1]
  module = model.module
  two = losses.pretext_losses(module, arrays['x'], arrays['mpc_mask'], arrays['mpc_mask'])
  one = losses.pretext_losses(module, arrays['x'], arrays['mpc_mask'], None, joint_passes=1)
  for key in two:
    np.testing.assert_allclose(float(one[key]), float(two[key]), rtol=1e-6, err_msg=key)


def test_single_tasks(model, reference):
  arrays = reference[1]
  mpc = ssast_jax.pretext_losses(model, arrays['x'], arrays['mpc_mask'], arrays['mpg_mask'],
                                 task='pretrain_mpc')
  mpg = ssast_jax.pretext_losses(model, arrays['x'], arrays['mpc_mask'], arrays['mpg_mask'],
                                 task='pretrain_mpg')
  np.testing.assert_allclose(mpc['loss'], arrays['mpc_loss'], rtol=1e-5)
  np.testing.assert_allclose(mpg['loss'], arrays['mpg_loss'], rtol=1e-5)
  assert mpc['mpg_loss'] == 0 and mpg['mpc_acc'] == 0
