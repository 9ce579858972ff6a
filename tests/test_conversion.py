"""PyTorch checkpoint import and export (SPEC section 9)."""

import collections

import jax
import numpy as np
import pytest
import torch

import ssast_jax
from ssast_jax import ModelConfig


def _torch_layout(meta):
  return [(key, tuple(shape), dtype) for key, (shape, dtype) in meta['state_dict'].items()]


def test_export_has_reference_layout_and_round_trips(tmp_path, reference):
  path, _, meta = reference
  out = tmp_path / 'exported.pth'
  ssast_jax.to_pytorch(ssast_jax.from_pytorch(path), out)
  written = torch.load(out, weights_only=True)
  original = torch.load(path, weights_only=True)
  assert isinstance(written, collections.OrderedDict)
  assert [(k, tuple(v.shape), str(v.dtype)) for k, v in written.items()] == _torch_layout(meta)
  for key, value in original.items():
    assert torch.equal(written[key], value), key


def test_export_satisfies_original_finetuning_loader(tmp_path):
  """The original reads fshape/tshape off the conv weight, the pretraining input size off
  p_input_fdim/p_input_tdim, and refuses keys without `module.`."""
  config = ModelConfig.from_size('small', depth=1, fshape=128, tshape=2, fstride=128, tstride=2,
                                 input_fdim=128, input_tdim=64)
  model = ssast_jax.create_model(config, seed=3)
  out = tmp_path / 'frame.pth'
  ssast_jax.to_pytorch(model, out)
  state = torch.load(out, weights_only=True)
  assert all(k.startswith('module.') for k in state)
  assert state['module.v.patch_embed.proj.weight'].shape[2:] == (128, 2)
  assert (int(state['module.p_input_fdim']), int(state['module.p_input_tdim'])) == (128, 64)
  assert state['module.v.pos_embed'].shape == (1, 32 + 2, 384)
  assert state['module.v.head.weight'].shape == (1000, 384)
  back = ssast_jax.from_pytorch(out)
  assert back.config == config
  jax.tree.map(np.testing.assert_array_equal, back.params, model.params)


def test_import_without_prefix_and_float16(tmp_path, reference):
  path = reference[0]
  original = torch.load(path, weights_only=True)
  stripped = {k[len('module.'):]: (v.half() if v.is_floating_point() else v)
              for k, v in original.items()}
  torch.save(stripped, tmp_path / 'half.pth')
  half = ssast_jax.from_pytorch(tmp_path / 'half.pth')
  full = ssast_jax.from_pytorch(path)
  assert half.config == full.config
  np.testing.assert_array_equal(
      half.params['pos_embed'],
      original['module.v.pos_embed'].half().float().numpy())
  assert half.params['pos_embed'].dtype == np.float32


def test_missing_and_misshaped_keys_are_listed(tmp_path, reference):
  original = torch.load(reference[0], weights_only=True)
  broken = dict(original)
  del broken['module.v.blocks.1.mlp.fc1.bias']
  del broken['module.gpredlayer.2.weight']
  broken['module.v.norm.weight'] = torch.zeros(7)
  torch.save(broken, tmp_path / 'broken.pth')
  with pytest.raises(ssast_jax.CheckpointError) as error:
    ssast_jax.from_pytorch(tmp_path / 'broken.pth')
  message = str(error.value)
  assert 'broken.pth' in message
  assert 'missing module.v.blocks.1.mlp.fc1.bias' in message
  assert 'missing module.gpredlayer.2.weight' in message
  assert 'module.v.norm.weight has shape (7,), expected (192,)' in message


def test_not_a_checkpoint(tmp_path):
  (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
  with pytest.raises(ssast_jax.CheckpointError, match='junk.pth: not a readable'):
    ssast_jax.from_pytorch(tmp_path / 'junk.pth')
  torch.save({'fc.weight': torch.zeros(2, 2)}, tmp_path / 'other.pth')
  with pytest.raises(ssast_jax.CheckpointError, match='missing module.v.cls_token'):
    ssast_jax.from_pytorch(tmp_path / 'other.pth')
  with pytest.raises(ssast_jax.CheckpointError, match='no such file'):
    ssast_jax.from_pytorch(tmp_path / 'absent.pth')


def test_export_is_atomic(tmp_path, monkeypatch):
  model = ssast_jax.create_model(ModelConfig.from_size('tiny', depth=1, input_tdim=32))
  def fail(*args, **kwargs):
    raise OSError('disk full')
  monkeypatch.setattr(torch, 'save', fail)
  with pytest.raises(OSError):
    ssast_jax.to_pytorch(model, tmp_path / 'model.pth')
  assert list(tmp_path.iterdir()) == []
