"""The fine-tuning classifier against the original's (SPEC section 10):
tests/data/ft_tiny2_s10_t160.* were produced by the original `ASTModel(pretrain_stage=False)`
built from tests/data/tiny2_patch.pth with fstride = tstride = 10, input_tdim = 160."""

import json
import math

import jax
import numpy as np
import pytest
import torch
from flax import nnx

import ssast_jax
from ssast_jax.config.settings import resolve
from ssast_jax.finetune import model as finetune
from ssast_jax.finetune.pos_embed import bilinear_resize
from ssast_jax.training import checkpoints, metrics
from ssast_jax.training.state import init_state
from conftest import DATA
from runs import tiny_config

PRETRAINED = DATA / 'tiny2_patch.pth'
GEOMETRY = dict(fstride=10, tstride=10, input_tdim=160)
TOLERANCE = 2e-4  # the reference's, ft_tiny2_s10_t160 in shared/reference/README.md


@pytest.fixture(scope='module')
def expected():
  """(npz arrays, json metadata) of the original's fine-tuning model."""
  return (dict(np.load(DATA / 'ft_tiny2_s10_t160.npz')),
          json.loads((DATA / 'ft_tiny2_s10_t160.json').read_text()))


@pytest.fixture(scope='module')
def built():
  return ssast_jax.finetune_model(PRETRAINED, num_labels=7, **GEOMETRY)


@pytest.fixture(scope='module')
def classifier(built, expected):
  """`built` with the reference's head (perturbed after construction in the original)."""
  arrays = expected[0]
  params = built.params
  params['mlp_head'] = {
      'norm': {'scale': arrays['expected/mlp_head.0.weight'],
               'bias': arrays['expected/mlp_head.0.bias']},
      'linear': {'kernel': arrays['expected/mlp_head.1.weight'].T,
                 'bias': arrays['expected/mlp_head.1.bias']}}
  return finetune.classifier_from_params(built.config, params, built.extras)


def _pretrained_grid(model):
  """The pretrained patch positional embeddings as (p_f, p_t, D)."""
  p_f, p_t = model.config.patch_grid
  return np.asarray(model.params['pos_embed'])[0, 2:].reshape(p_f, p_t, -1)


def test_geometry(built, expected):
  meta = expected[1]
  c = built.config
  assert (c.fshape, c.tshape, c.fstride, c.tstride, c.input_tdim, c.num_labels) == (
      meta['fshape'], meta['tshape'], meta['fstride'], meta['tstride'], meta['input_tdim'],
      meta['num_labels'])
  assert c.patch_grid == (12, 15) and c.input_fdim == 128
  assert built.params['pos_embed'].shape == tuple(meta['pos_embed_shape'])


def test_adapted_pos_embed_and_patch_embedding(built, expected):
  arrays = expected[0]
  params = built.params
  np.testing.assert_allclose(params['pos_embed'], arrays['expected/v.pos_embed'],
                             atol=TOLERANCE, rtol=0)
  conv = arrays['expected/v.patch_embed.proj.weight']
  np.testing.assert_allclose(params['patch_embed']['kernel'], conv.reshape(192, 256).T,
                             atol=TOLERANCE, rtol=0)
  np.testing.assert_allclose(params['patch_embed']['bias'],
                             arrays['expected/v.patch_embed.proj.bias'], atol=TOLERANCE, rtol=0)


def test_head_initialisation(built):
  """LayerNorm ones and zeros; Linear weight and bias U(+-1/sqrt(D)) as torch.nn.Linear;
  a function of the seed."""
  head = built.params['mlp_head']
  np.testing.assert_array_equal(head['norm']['scale'], np.ones(192))
  np.testing.assert_array_equal(head['norm']['bias'], np.zeros(192))
  bound = 1 / math.sqrt(192)
  for name in ('kernel', 'bias'):
    values = np.asarray(head['linear'][name])
    assert np.abs(values).max() <= bound and np.abs(values).max() > 0.9 * bound
  assert head['linear']['kernel'].shape == (192, 7)
  again = ssast_jax.finetune_model(PRETRAINED, num_labels=7, seed=0, **GEOMETRY)
  other = ssast_jax.finetune_model(PRETRAINED, num_labels=7, seed=1, **GEOMETRY)
  np.testing.assert_array_equal(again.params['mlp_head']['linear']['kernel'],
                                head['linear']['kernel'])
  assert not np.array_equal(other.params['mlp_head']['linear']['kernel'],
                            head['linear']['kernel'])


@pytest.mark.parametrize('pooling, key', [('avgtok', 'ft_avgtok'), ('cls', 'ft_cls')])
def test_logits_match_the_original(classifier, expected, pooling, key):
  arrays = expected[0]
  logits = np.asarray(ssast_jax.classify(classifier, arrays['x'], pooling))
  assert logits.shape == (2, 7) and logits.dtype == np.float32
  np.testing.assert_allclose(logits, arrays[key], atol=TOLERANCE, rtol=0)


def test_export_has_the_original_layout_and_round_trips(classifier, expected, tmp_path):
  arrays, meta = expected
  out = tmp_path / 'finetuned.pth'
  ssast_jax.to_pytorch(classifier, out)
  written = torch.load(out, weights_only=True)
  assert [(k, list(v.shape), str(v.dtype)) for k, v in written.items()] == [
      (k, shape, dtype) for k, (shape, dtype) in meta['state_dict'].items()]
  source = torch.load(PRETRAINED, weights_only=True)
  for name in ('module.v.head.weight', 'module.v.head_dist.bias', 'module.v.norm.weight'):
    assert torch.equal(written[name], source[name]), name
  back = ssast_jax.from_pytorch(out, **GEOMETRY)
  assert isinstance(back, ssast_jax.ClassifierHandle) and back.config == classifier.config
  jax.tree.map(np.testing.assert_array_equal, back.params, classifier.params)
  for pooling in finetune.POOLINGS:
    np.testing.assert_array_equal(ssast_jax.classify(back, arrays['x'], pooling),
                                  ssast_jax.classify(classifier, arrays['x'], pooling))


def test_fine_tuned_file_needs_consistent_geometry(classifier, tmp_path):
  out = tmp_path / 'finetuned.pth'
  ssast_jax.to_pytorch(classifier, out)
  with pytest.raises(ssast_jax.CheckpointError, match=(
      r'finetuned.pth: a fine-tuned SSAST checkpoint does not record its patch strides and '
      r'input length; pass fstride, tstride and input_tdim to from_pytorch$')):
    ssast_jax.from_pytorch(out)
  with pytest.raises(ssast_jax.CheckpointError, match=(
      r'module.v.pos_embed holds 182 tokens, but fstride=10, tstride=16, input_tdim=160, '
      r'input_fdim=128 give 12 x 10 patches \+ 2 = 122$')):
    ssast_jax.from_pytorch(out, fstride=10, tstride=16, input_tdim=160)
  with pytest.raises(ssast_jax.CheckpointError, match='a pretraining checkpoint records its '
                     'own geometry'):
    ssast_jax.from_pytorch(PRETRAINED, **GEOMETRY)


def test_frequency_crop_quirk_and_its_fix():
  """64 bins at stride 16: the frequency axis is cropped 8 -> 4 rows from row 2. With 256
  frames (16 columns, kept) the original slices t_dim = 16 rows, 6 remain, and it fails;
  the fix takes rows 2..5. With 64 frames (4 columns) t_dim = f_dim: both are the crop."""
  pretrained = ssast_jax.from_pytorch(PRETRAINED)
  grid = _pretrained_grid(pretrained)
  lead = np.asarray(pretrained.params['pos_embed'])[:, :2]
  geometry = dict(num_labels=3, fstride=16, tstride=16, input_fdim=64)
  with pytest.raises(ValueError, match=(
      r'cropping the frequency axis from 8 to 4 patches \(grid 4 x 16\) leaves 6 rows; the '
      r'original slices t_dim rows where f_dim are meant and fails here as well: pass '
      r'fix_pos_embed_crop=True for the corrected slice$')):
    ssast_jax.finetune_model(pretrained, input_tdim=256, **geometry)
  fixed = ssast_jax.finetune_model(pretrained, input_tdim=256, fix_pos_embed_crop=True,
                                   **geometry)
  corrected = np.concatenate([lead, grid[2:6].reshape(1, 64, 192)], axis=1)
  np.testing.assert_array_equal(fixed.params['pos_embed'], corrected)
  square = [ssast_jax.finetune_model(pretrained, input_tdim=64, fix_pos_embed_crop=fix,
                                     **geometry).params['pos_embed'] for fix in (False, True)]
  cropped = np.concatenate([lead, grid[2:6, 6:10].reshape(1, 16, 192)], axis=1)
  np.testing.assert_array_equal(square[0], cropped)
  np.testing.assert_array_equal(square[1], cropped)


@pytest.mark.parametrize('size, new_size', [((8, 15), (12, 15)), ((8, 16), (8, 37)),
                                            ((12, 25), (5, 7)), ((1, 4), (8, 4))])
def test_bilinear_resize_is_torchs(size, new_size):
  image = np.random.default_rng(0).normal(size=(3,) + size).astype(np.float32)
  expected = torch.nn.functional.interpolate(torch.from_numpy(image)[None], size=new_size,
                                             mode='bilinear', align_corners=False)[0].numpy()
  np.testing.assert_allclose(bilinear_resize(image, new_size), expected, atol=2e-6, rtol=0)


def test_embed_pretraining_model_and_classifier(classifier, expected, reference):
  pretrained = ssast_jax.from_pytorch(reference[0])
  features = ssast_jax.embed(pretrained, reference[1]['x'])
  assert features['tokens'].shape == (3, 128, 192) and features['clip'].shape == (3, 192)
  np.testing.assert_allclose(features['tokens'], reference[1]['encoded'][:, 2:], atol=1e-4,
                             rtol=0)
  np.testing.assert_allclose(features['clip'], np.mean(features['tokens'], axis=1), atol=1e-6)
  x = expected[0]['x']
  features = ssast_jax.embed(classifier, x)
  assert features['tokens'].shape == (2, 180, 192) and features['clip'].shape == (2, 192)
  np.testing.assert_allclose(features['clip'], np.mean(features['tokens'], axis=1), atol=1e-6)
  head = nnx.merge(classifier.graphdef, classifier.state).mlp_head
  np.testing.assert_allclose(head(features['clip']), ssast_jax.classify(classifier, x),
                             atol=1e-5, rtol=0)


def test_wrong_input_is_refused(classifier, expected):
  x = expected[0]['x']
  with pytest.raises(ValueError, match=(
      r'^classify: x has shape \(2, 150, 128\), expected \(B, 160, 128\): the model takes '
      r'input_tdim=160 frames of input_fdim=128 mel bins$')):
    ssast_jax.classify(classifier, x[:, :150])
  with pytest.raises(ValueError, match=r"unknown pooling 'max'; expected one of"):
    ssast_jax.classify(classifier, x, pooling='max')
  with pytest.raises(TypeError, match='classify: model must be a classifier'):
    ssast_jax.classify(ssast_jax.from_pytorch(PRETRAINED), x)


def test_from_a_training_workdir(tmp_path):
  """The newest checkpoint of a run: the encoder parameters it holds, pretext ones dropped.
  Its 64-bin grid has p_f = 4 rows, so even at the pretraining geometry the original's
  hard-coded time resize to 8 rows (then back to 4) changes the positional embedding."""
  settings = resolve(tiny_config(), check_data=False)
  metrics.save_config(str(tmp_path), settings.config_dict())
  state = init_state(settings.model, 5, settings.optim.lr)
  mngr = checkpoints.manager(str(tmp_path), settings.objective.task, 2)
  checkpoints.save(mngr, 7, state, {})
  mngr.wait_until_finished()
  mngr.close()
  clf = ssast_jax.finetune_model(str(tmp_path), num_labels=2, fstride=16, tstride=16,
                                 input_tdim=64, input_fdim=64)
  saved = nnx.to_pure_dict(state['params'])
  assert set(clf.params) == set(saved) - {'mask_embed', 'cpred', 'gpred'} | {'mlp_head'}
  for name in ('patch_embed', 'blocks', 'norm', 'cls_token', 'dist_token'):
    jax.tree.map(np.testing.assert_array_equal, clf.params[name], saved[name])
  grid = np.asarray(saved['pos_embed'])[0, 2:].reshape(4, 4, 192).transpose(2, 0, 1)
  through_8_rows = bilinear_resize(bilinear_resize(grid, (8, 4)), (4, 4))
  assert np.abs(through_8_rows - grid).max() > 1e-3
  np.testing.assert_array_equal(clf.params['pos_embed'][0, :2], saved['pos_embed'][0, :2])
  np.testing.assert_allclose(clf.params['pos_embed'][0, 2:],
                             through_8_rows.reshape(192, 16).T, atol=1e-7, rtol=0)
