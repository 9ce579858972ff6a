"""The HEAR 2021 API (`ssast_jax.hear`) on a tiny 1-block model with 64 mel bins and
64-frame inputs: a 4 x 4 grid of 16 x 16 patches, so 4 columns per window, 768-wide
column embeddings (4 bands x 192)."""

import json
import os
import warnings

import numpy as np
import pytest
import torch

import ssast_jax
from ssast_jax import hear
from ssast_jax.config.settings import resolve
from ssast_jax.data import shards
from ssast_jax.features import fbank
from ssast_jax.training import checkpoints, metrics
from ssast_jax.training.state import init_state
from runs import tiny_config

CONFIG = ssast_jax.ModelConfig.from_size('tiny', depth=1, input_tdim=64, input_fdim=64)
RATE = 16000


@pytest.fixture(scope='module')
def pth(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('hear') / 'tiny.pth')
  ssast_jax.to_pytorch(ssast_jax.create_model(CONFIG, seed=3), path)
  return path


@pytest.fixture(scope='module')
def model(pth):
  return hear.load_model(pth, batch_size=4)


def noise(n_sounds, seconds, seed=0):
  generator = torch.Generator().manual_seed(seed)
  return torch.rand((n_sounds, int(seconds * RATE)), generator=generator) * 2 - 1


def expected_columns(model, clip, first_frame):
  """Column embeddings of the window starting at `first_frame`, computed independently:
  numpy fbank of the whole clip, zero frames appended, normalised, one encoder call."""
  features = fbank(clip.numpy(), RATE, 64)
  features = np.pad(features, ((0, max(0, first_frame + 64 - len(features))), (0, 0)))
  x = (features[first_frame:first_frame + 64] - model.mean) / (2 * model.std)
  tokens = np.asarray(ssast_jax.embed(model.handle, x[None])['tokens'])[0]
  return tokens.reshape(4, 4, 192).transpose(1, 0, 2).reshape(4, 768)  # (column, band * D)


def test_attributes(model):
  assert isinstance(model, torch.nn.Module)
  assert (model.sample_rate, model.scene_embedding_size, model.timestamp_embedding_size,
          model.hop_ms) == (16000, 768, 768, 160.0)
  assert type(model.scene_embedding_size) is int and type(model.timestamp_embedding_size) is int
  assert (model.mean, model.std) == (-4.2677393, 4.5689974)


def test_short_clip_is_padded_then_normalised(model):
  """0.5 s: 48 frames, covered by 3 columns of 16 frames; the fourth, all padding, dropped."""
  audio = noise(2, 0.5)
  embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
  assert embeddings.shape == (2, 3, 768) and timestamps.shape == (2, 3)
  assert embeddings.dtype == timestamps.dtype == torch.float32
  np.testing.assert_array_equal(timestamps, [[87.5, 247.5, 407.5]] * 2)
  for row in range(2):
    np.testing.assert_allclose(embeddings[row], expected_columns(model, audio[row], 0)[:3],
                               atol=2e-4, rtol=0)
  tiny, timestamps = hear.get_timestamp_embeddings(audio[:, :100], model)  # under a frame
  assert tiny.shape == (2, 1, 768) and timestamps.tolist() == [[87.5], [87.5]]
  padded = torch.nn.functional.pad(audio[:1, :100], (0, 300))
  np.testing.assert_array_equal(tiny[:1], hear.get_timestamp_embeddings(padded, model)[0])


def test_timestamps_are_centred_on_the_columns(model):
  """Column j covers frames 16 j .. 16 j + 15, i.e. [160 j, 160 j + 175] ms."""
  _, timestamps = hear.get_timestamp_embeddings(noise(1, 1.0), model)
  j = np.arange(7)  # 98 frames: 6 whole columns and one reaching into the padding
  np.testing.assert_array_equal(timestamps[0], (160 * j + (160 * j + 175)) / 2)


def test_long_clip_is_windowed(model):
  """2 s: 198 frames, 13 columns, in 4 windows of 64 frames, 64 apart; the last holds one
  column with 6 clip frames and 10 padding ones."""
  audio = noise(1, 2.0, seed=1)
  embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
  assert embeddings.shape == (1, 13, 768)
  np.testing.assert_allclose(np.diff(timestamps[0]), 160.0)
  assert timestamps[0, 0] == 87.5 and timestamps[0, -1] == 87.5 + 12 * 160
  for window in range(4):
    columns = expected_columns(model, audio[0], 64 * window)
    np.testing.assert_allclose(embeddings[0, 4 * window:4 * window + 4],
                               columns[:len(embeddings[0, 4 * window:4 * window + 4])],
                               atol=2e-4, rtol=0)


def test_equal_audio_gives_equal_embeddings(model):
  """Rows 0 and 2 are equal; their windows fall in different chunks of 4 (3 x 4 windows)."""
  audio = noise(3, 2.0, seed=2)
  audio[2] = audio[0]
  embeddings, _ = hear.get_timestamp_embeddings(audio, model)
  np.testing.assert_array_equal(embeddings[0], embeddings[2])
  assert (embeddings[0] - embeddings[1]).abs().max() > 1e-2
  alone, _ = hear.get_timestamp_embeddings(audio[:1], model)
  np.testing.assert_array_equal(alone[0], embeddings[0])


def test_scene_is_the_mean_of_the_timestamp_embeddings(model):
  audio = noise(2, 1.3, seed=4)
  scene = hear.get_scene_embeddings(audio, model)
  embeddings, _ = hear.get_timestamp_embeddings(audio, model)
  assert scene.shape == (2, 768) and scene.dtype == torch.float32
  np.testing.assert_allclose(scene, embeddings.mean(dim=1), atol=1e-6, rtol=0)


def test_a_fine_tuned_file_with_overlapping_patches(model, tmp_path):
  """tstride 10: 5 columns per 64-frame window, windows 50 frames apart, 100 ms steps."""
  classifier = ssast_jax.finetune_model(model.handle, num_labels=3, fstride=16, tstride=10,
                                        input_tdim=64, input_fdim=64)
  path = str(tmp_path / 'ft.pth')
  ssast_jax.to_pytorch(classifier, path)
  tuned = hear.load_model(path, fstride=16, tstride=10, input_tdim=64, input_fdim=64)
  assert (tuned.timestamp_embedding_size, tuned.hop_ms) == (768, 100.0)
  audio = noise(1, 1.0, seed=5)  # 98 frames: 10 columns, as 80..95 leaves 96, 97 to 90..105
  embeddings, timestamps = hear.get_timestamp_embeddings(audio, tuned)
  assert embeddings.shape == (1, 10, 768)
  np.testing.assert_array_equal(timestamps[0], 87.5 + 100 * np.arange(10))
  features = np.pad(fbank(audio[0].numpy(), RATE, 64), ((0, 16), (0, 0)))
  x = (features[50:114] - tuned.mean) / (2 * tuned.std)
  tokens = np.asarray(ssast_jax.embed(tuned.handle, x[None])['tokens'])[0]
  np.testing.assert_allclose(embeddings[0, 5], tokens.reshape(4, 5, 192)[:, 0].reshape(768),
                             atol=2e-4, rtol=0)


def test_a_training_workdir_and_its_statistics(tmp_path):
  """mean/std None in the config: the run took them from its training shards' manifest;
  without the manifest, the AudioSet statistics with a warning; keywords win."""
  settings = resolve(tiny_config(data__mean=None, data__std=None), check_data=False)
  metrics.save_config(str(tmp_path), settings.config_dict())
  mngr = checkpoints.manager(str(tmp_path), settings.objective.task, 2)
  checkpoints.save(mngr, 7, init_state(settings.model, 5, settings.optim.lr), {})
  mngr.wait_until_finished()
  mngr.close()
  manifest = tmp_path / 'shards' / 'train' / 'manifest.json'
  manifest.parent.mkdir(parents=True)
  manifest.write_text(json.dumps({
      'format_version': shards.FORMAT_VERSION, 'dtype': 'float16', 'num_mel_bins': 64,
      'num_clips': 0, 'shards': [], 'index_file': 'index.npy', 'mean': -6.5, 'std': 3.25}))
  model = hear.load_model(str(tmp_path))
  assert (model.mean, model.std, model.timestamp_embedding_size) == (-6.5, 3.25, 768)
  embeddings, _ = hear.get_timestamp_embeddings(noise(1, 0.5), model)
  assert embeddings.shape == (1, 3, 768) and np.isfinite(embeddings.numpy()).all()
  os.remove(manifest)
  with pytest.warns(UserWarning, match='using the AudioSet statistics'):
    fallback = hear.load_model(str(tmp_path))
  assert (fallback.mean, fallback.std) == (-4.2677393, 4.5689974)
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # both given: the manifest is not looked for
    chosen = hear.load_model(str(tmp_path), mean=-1.0, std=2.0)
  assert (chosen.mean, chosen.std) == (-1.0, 2.0)
  with pytest.raises(ValueError, match='is a training workdir, whose config fixes'):
    hear.load_model(str(tmp_path), tstride=10)


def test_wrong_input_is_refused(model):
  with pytest.raises(ValueError, match=r'^audio must be 2-D \[n_sounds, n_samples\] '
                     r'\(mono, 16000 Hz\), got shape \(16000,\)$'):
    hear.get_timestamp_embeddings(noise(1, 1.0)[0], model)
  with pytest.raises(ValueError, match=r'got shape \(1, 2, 16000\)$'):
    hear.get_scene_embeddings(noise(2, 1.0)[None], model)
  with pytest.raises(ValueError, match=r'^audio must be a float tensor .*, got torch.int16$'):
    hear.get_scene_embeddings(torch.zeros((1, 16000), dtype=torch.int16), model)
  with pytest.raises(TypeError, match=r'^audio must be a torch.Tensor .*, not ndarray$'):
    hear.get_scene_embeddings(np.zeros((1, 16000), np.float32), model)
  with pytest.raises(ValueError, match=r'^audio has 1 NaN or infinite samples$'):
    hear.get_scene_embeddings(torch.tensor([[0.0] * 15999 + [float('inf')]]), model)
  with pytest.raises(TypeError, match='model must come from ssast_jax.hear.load_model'):
    hear.get_scene_embeddings(noise(1, 1.0), model.handle)
  with pytest.raises(ValueError, match='no model_file_path; ssast_jax ships no weights'):
    hear.load_model()
