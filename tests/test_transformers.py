"""Interchange with transformers' AST: exports load in transformers itself without missing
or unused weights and compute our outputs; transformers' own checkpoints (4.x and 5.x names)
import and compute transformers' outputs; round trips are exact; what cannot be exported
is refused in one line."""

import io
import json
import logging

import jax
import numpy as np
import pytest

import ssast_jax
from ssast_jax.config.finetune import default_config, resolve_finetune
from ssast_jax.finetune import pos_embed
from ssast_jax.finetune.train import build_classifier
from tests import runs

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
safetensors_torch = pytest.importorskip('safetensors.torch')

PRETRAINED = runs.ROOT / 'tests' / 'data' / 'tiny2_patch.pth'  # tiny, 2 blocks, 256 x 128
LABELS = ['dog', 'rain', 'speech', 'siren', 'bird']


def _batch(frames, bins=128, seed=0):
  return (np.random.default_rng(seed).standard_normal((2, frames, bins)) * 0.5).astype(
      np.float32)


def _relative_gap(ours, theirs) -> float:
  return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())


def _loading_messages(load):
  """(result of `load()`, transformers' log lines about missing/unused/new weights)."""
  stream = io.StringIO()
  handler = logging.StreamHandler(stream)
  logger = transformers.utils.logging.get_logger()
  logger.addHandler(handler)
  try:
    result = load()
  finally:
    logger.removeHandler(handler)
  words = ('missing', 'unexpected', 'not used', 'newly initialized', 'not initialized')
  return result, [line for line in stream.getvalue().splitlines()
                  if any(w in line.lower() for w in words)]


def _same_params(a, b) -> bool:
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope='module')
def cls_classifier():
  return ssast_jax.finetune_model(PRETRAINED, num_labels=5, fstride=10, tstride=12,
                                  input_tdim=160, pooling='cls', seed=3)


def test_ft_cls_loads_as_ast_classifier_with_our_logits(cls_classifier, tmp_path):
  out = tmp_path / 'cls'
  ssast_jax.to_transformers(cls_classifier, out, labels=LABELS, mean=-5.0, std=3.0)
  model, messages = _loading_messages(
      lambda: transformers.ASTForAudioClassification.from_pretrained(out).eval())
  assert messages == []
  x = _batch(160)
  with torch.no_grad():
    theirs = model(torch.from_numpy(x)).logits.numpy()
  # transformers' head LayerNorm uses the encoder's 1e-6 where ours uses 1e-5.
  assert _relative_gap(ssast_jax.classify(cls_classifier, x), theirs) < 1e-5
  config = json.loads((out / 'config.json').read_text())
  assert (config['max_length'], config['num_mel_bins'], config['frequency_stride'],
          config['time_stride'], config['patch_size']) == (160, 128, 10, 12, 16)
  assert config['id2label'] == {str(k): name for k, name in enumerate(LABELS)}
  assert config['architectures'] == ['ASTForAudioClassification']
  extractor = transformers.ASTFeatureExtractor.from_pretrained(out)
  assert (extractor.mean, extractor.std, extractor.max_length) == (-5.0, 3.0, 160)
  classifier = transformers.pipeline('audio-classification', model=str(out))
  scores = classifier(np.zeros(16000, np.float32), top_k=5)
  assert sorted(s['label'] for s in scores) == sorted(LABELS)
  card = (out / 'README.md').read_text()
  assert 'pooling `cls`' in card and 'siren' in card


def test_round_trip_through_transformers_is_exact(cls_classifier, tmp_path):
  ssast_jax.to_transformers(cls_classifier, tmp_path / 'cls', labels=LABELS)
  back = ssast_jax.load(tmp_path / 'cls')
  assert back.config == cls_classifier.config
  assert _same_params(back.params, cls_classifier.params)
  assert back.info['labels'] == LABELS
  encoder = ssast_jax.from_pytorch(PRETRAINED)
  ssast_jax.to_transformers(encoder, tmp_path / 'encoder')
  again = ssast_jax.load(tmp_path / 'encoder')
  assert again.config == encoder.config and _same_params(again.params, encoder.params)


def test_ft_avgtok_is_an_encoder_plus_head_never_an_ast_classifier(tmp_path):
  clf = ssast_jax.finetune_model(PRETRAINED, num_labels=3, fstride=16, tstride=10,
                                 input_tdim=128, seed=1)
  out = tmp_path / 'avgtok'
  ssast_jax.to_transformers(clf, out)
  config = json.loads((out / 'config.json').read_text())
  assert config['architectures'] == ['ASTModel'] and config['ssast_pooling'] == 'avgtok'
  encoder, messages = _loading_messages(
      lambda: transformers.ASTModel.from_pretrained(out).eval())
  assert messages == []
  head = safetensors_torch.load_file(out / 'ssast_head.safetensors')
  x = _batch(128, seed=1)
  with torch.no_grad():  # the two pooling lines of the model card
    tokens = encoder(torch.from_numpy(x)).last_hidden_state[:, 2:]
    clip = torch.nn.functional.layer_norm(
        tokens.mean(1), (192,), head['classifier.layernorm.weight'],
        head['classifier.layernorm.bias'], eps=1e-5)
    theirs = (clip @ head['classifier.dense.weight'].T + head['classifier.dense.bias']).numpy()
  assert _relative_gap(ssast_jax.classify(clf, x), theirs) < 1e-5
  # Loading it as a transformers classifier is never silent: its head would be untrained.
  _, messages = _loading_messages(
      lambda: transformers.ASTForAudioClassification.from_pretrained(out))
  assert any('classifier' in line for line in messages)
  assert 'ssast_head.safetensors' in (out / 'README.md').read_text()


def test_a_tensor_of_another_shape_than_config_json_says_is_named(tmp_path):
  ssast_jax.to_transformers(ssast_jax.from_pytorch(PRETRAINED), tmp_path / 'encoder')
  weights = tmp_path / 'encoder' / 'model.safetensors'
  arrays = safetensors_torch.load_file(weights)
  name = next(n for n in arrays if n.endswith('layernorm.weight') and 'layer.' not in n)
  arrays[name] = arrays[name][:-1].clone()
  del arrays[next(n for n in arrays if n.endswith('layer.1.output.dense.bias'))]
  safetensors_torch.save_file(arrays, weights, metadata={'format': 'pt'})
  with pytest.raises(ssast_jax.CheckpointError,
                     match=r'not a transformers AST checkpoint of the geometry of its '
                           r'config.json .*missing \S*layer.1.output.dense.bias.*'
                           r'layernorm.weight has shape \(191,\), expected \(192,\)'):
    ssast_jax.load(tmp_path / 'encoder')


def test_pretrained_encoder_exports_as_ast_model_with_equal_hidden_states(tmp_path):
  encoder = ssast_jax.from_pytorch(PRETRAINED)
  ssast_jax.to_transformers(encoder, tmp_path / 'encoder')
  model = transformers.ASTModel.from_pretrained(tmp_path / 'encoder').eval()
  x = _batch(256, seed=2)
  with torch.no_grad():
    theirs = model(torch.from_numpy(x)).last_hidden_state.numpy()
  assert np.abs(np.asarray(ssast_jax.encode(encoder, x)) - theirs).max() < 1e-4


def _hf_classifier(seed=0):
  """A transformers-made classifier with perturbed weights (its config's defaults for the
  epsilon: 1e-12 everywhere, head included) and overlapping non-square strides."""
  config = transformers.ASTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=256, max_length=100, num_mel_bins=64,
                                  frequency_stride=12, time_stride=10, num_labels=3)
  torch.manual_seed(seed)
  model = transformers.ASTForAudioClassification(config).eval()
  with torch.no_grad():
    for param in model.parameters():
      param.add_(torch.randn_like(param) * 0.05)
  return model


@pytest.mark.parametrize('names', ['4.x', '5.x'])
def test_transformers_checkpoints_compute_what_transformers_computes(names, tmp_path):
  model = _hf_classifier()
  model.save_pretrained(tmp_path)  # the 4.x names, as the Hub's checkpoints
  if names == '5.x':
    safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                tmp_path / 'model.safetensors', metadata={'format': 'pt'})
  x = _batch(100, bins=64)
  with torch.no_grad():
    theirs = model(torch.from_numpy(x)).logits.numpy()
  clf = ssast_jax.load(tmp_path)
  assert (clf.config.layer_norm_epsilon, clf.config.head_layer_norm_epsilon,
          clf.config.pooling) == (1e-12, 1e-12, 'cls')
  assert (clf.config.fstride, clf.config.tstride, clf.config.input_tdim) == (12, 10, 100)
  assert _relative_gap(ssast_jax.classify(clf, x), theirs) < 1e-5


def test_fine_tuning_from_a_transformers_checkpoint(tmp_path):
  """`--config.pretrained=DIR` and finetune_model: the checkpoint's encoder on the new
  grid with the .pth adaptation of its positional embedding, a fresh head."""
  _hf_classifier().save_pretrained(tmp_path / 'hf')
  source = ssast_jax.load(tmp_path / 'hf')
  config = default_config()
  config.pretrained = str(tmp_path / 'hf')
  config.data.target_length, config.data.num_mel_bins = 60, 64
  config.fstride, config.tstride = 12, 10
  settings = resolve_finetune(config, check_data=False)
  clf = build_classifier(settings, num_labels=7)
  assert (clf.config.num_labels, clf.config.pooling, clf.config.layer_norm_epsilon) == (
      7, 'avgtok', 1e-12)
  assert clf.config.patch_grid == (5, 5) and source.config.patch_grid == (5, 9)
  expected = pos_embed.adapt_pos_embed(np.asarray(source.params['pos_embed']), (5, 9), (5, 5))
  np.testing.assert_array_equal(np.asarray(clf.params['pos_embed']), expected)
  np.testing.assert_array_equal(np.asarray(clf.params['blocks'][1]['attn']['qkv']['kernel']),
                                np.asarray(source.params['blocks'][1]['attn']['qkv']['kernel']))


def test_what_cannot_be_exported_is_refused_in_one_line(tmp_path):
  frame = ssast_jax.create_model(ssast_jax.ModelConfig.from_size(
      'tiny', depth=1, fshape=128, tshape=2, fstride=128, tstride=2, input_tdim=64))
  with pytest.raises(ssast_jax.CheckpointError, match=r'square patches only .* 128x2; export '
                     r'it for the original code'):
    ssast_jax.to_transformers(frame, tmp_path / 'frame')
  assert not (tmp_path / 'frame').exists()
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'x').write_text('')
  with pytest.raises(FileExistsError, match='not an empty folder'):
    ssast_jax.to_transformers(ssast_jax.from_pytorch(PRETRAINED), tmp_path / 'full')


def test_training_and_the_api_do_not_import_transformers():
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  code = ('import sys, ssast_jax.training.train, ssast_jax.finetune.train, ssast_jax.api; '
          'print(sorted({m.split(".")[0] for m in sys.modules} '
          '& {"transformers", "safetensors", "torch"}))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       check=True, cwd=runs.ROOT)
  assert out.stdout.strip() == '[]'
