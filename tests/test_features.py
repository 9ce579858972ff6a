"""Kaldi log-mel features (`ssast_jax.features`) against the original's torchaudio output.

data/fbank/ is a copy of shared/reference/fbank: a 16 kHz 16-bit speech clip and the
(474, 128) features torchaudio.compliance.kaldi.fbank gives for it with the original's settings.
"""

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile

from ssast_jax import features

DATA = pathlib.Path(__file__).parent / 'data' / 'fbank'
SPEECH = DATA / 'speech16k.wav'
LOG_EPS = np.log(np.float32(np.finfo(np.float32).eps))


@pytest.fixture(scope='module')
def speech():
  samples, rate = features.read_audio(SPEECH)
  assert samples.shape == (1, 76080) and samples.dtype == np.float32 and rate == 16000
  return samples[0]


def _resampled(signal, rate, seconds=1.5):
  """A crude stand-in for speech at another rate (linear interpolation of the 16 kHz clip)."""
  times = np.arange(int(rate * seconds)) * (16000 / rate)
  return np.interp(times, np.arange(len(signal)), signal).astype(np.float32)


def test_matches_the_original_on_the_reference_clip():
  expected = np.load(DATA / 'speech16k_fbank.npz')['fbank']
  got = features.clip_features(SPEECH)
  assert got.shape == expected.shape == (474, 128) and got.dtype == np.float32
  diff = np.abs(got - expected)
  # Measured 5.7e-4 max, 2.9e-6 mean: torch's own float32 (MKL) FFT rounding in the frames'
  # quietest bins; with every other step bit-identical to torch the maximum is the same.
  assert diff.max() <= 1e-3 and diff.mean() <= 1e-5


def test_the_empty_mel_bin_is_log_eps(speech):
  expected = np.load(DATA / 'speech16k_fbank.npz')['fbank']
  got = features.fbank(speech, 16000)
  assert list(features.empty_mel_bins(16000)) == [3]
  assert (got[:, 3] == LOG_EPS).all() and (expected[:, 3] == LOG_EPS).all()
  assert LOG_EPS == pytest.approx(-15.942385)
  assert (np.delete(got, 3, axis=1).max(axis=0) > LOG_EPS + 8).all()


def test_frame_geometry_and_count():
  assert features.frame_geometry(16000) == (400, 160, 512)
  assert features.frame_geometry(44100) == (1102, 441, 2048)
  assert features.frame_geometry(8000) == (200, 80, 256)
  assert [features.num_frames(n, 16000) for n in (0, 399, 400, 559, 560, 76080)] == [
      0, 0, 1, 1, 2, 474]


@pytest.mark.parametrize('rate', [8000, 16000, 44100])
def test_window_and_mel_banks_follow_kaldi(rate):
  size, _, fft_size = features.frame_geometry(rate)
  window = features.hanning_window(size)
  j = np.arange(size)
  np.testing.assert_allclose(window, 0.5 - 0.5 * np.cos(2 * np.pi * j / (size - 1)), atol=3e-7)
  # Kaldi's MelBanks, written per bin in float64.
  mel = lambda f: 1127.0 * math.log(1.0 + f / 700.0)
  low, high, bins = mel(20.0), mel(rate / 2), 128
  delta = (high - low) / (bins + 1)
  point_mels = [mel(k * rate / fft_size) for k in range(fft_size // 2)]
  expected = np.zeros((fft_size // 2 + 1, bins))
  for b in range(bins):
    left, centre, right = low + b * delta, low + (b + 1) * delta, low + (b + 2) * delta
    for k, m in enumerate(point_mels):
      if left < m <= centre:
        expected[k, b] = (m - left) / (centre - left)
      elif centre < m < right:
        expected[k, b] = (right - m) / (right - centre)
  got = features.mel_banks(rate, bins, fft_size)
  assert got.shape == expected.shape and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, atol=1e-4)
  assert ((got > 0) == (expected > 0)).all()
  assert list(features.empty_mel_bins(rate)) == list(np.flatnonzero(~expected.any(axis=0)))


@pytest.mark.parametrize('rate', [16000, 44100, 8000])
def test_jax_matches_numpy(speech, rate):
  rng = np.random.default_rng(rate)
  clip = speech[:24000] if rate == 16000 else _resampled(speech, rate)
  batch = np.stack([clip, 0.05 * rng.standard_normal(len(clip)), 0.3 * clip[::-1] + 0.2])
  batch = batch.astype(np.float32)
  got = np.asarray(jax.jit(features.fbank_jax, static_argnums=(1, 2))(jnp.asarray(batch), rate))
  expected = np.stack([features.fbank(clip_, rate) for clip_ in batch])
  assert got.shape == expected.shape == (3, features.num_frames(len(clip), rate), 128)
  diff = np.abs(got - expected)
  # XLA's float32 FFT against numpy's: measured up to 6e-4, mean 3e-6.
  assert diff.max() <= 2e-3 and diff.mean() <= 1e-5
  assert (got[:, :, features.empty_mel_bins(rate)] == LOG_EPS).all()


def test_stereo_uses_channel_0_after_the_all_channel_mean(speech):
  quiet = 1e-3 * speech[:16000]
  other = np.float32(1.0) + 0.1 * speech[16000:32000]
  stereo = np.stack([quiet, other])
  got = features.fbank(stereo, 16000)
  mean = stereo.mean(dtype=np.float64).astype(np.float32)
  assert mean == pytest.approx(0.5, abs=1e-3)
  # The all-channel mean, subtracted in float32, quantises the quiet channel 0 to steps of
  # ulp(0.5) = 6e-8, as in the original; subtracting channel 0's own mean would not.
  # Measured: 1.9e-6 from `centred`, 3.8e-3 (mean 7e-5) from `own_mean`.
  centred = features.fbank((quiet - mean)[None], 16000)
  own_mean = features.fbank(quiet, 16000)
  assert (got > LOG_EPS).mean() > 0.2
  assert np.abs(got - centred).max() <= 1e-4
  assert np.abs(got - own_mean).max() > 1e-3
  assert np.abs(got - own_mean).mean() < 1e-3  # still channel 0's signal
  assert np.abs(got - features.fbank(other, 16000)).mean() > 1
  assert np.abs(got - features.fbank(stereo.mean(axis=0), 16000)).mean() > 1


def test_wav_formats_and_flac_agree(speech, tmp_path):
  ints = np.round(speech[:20000] * 32767).astype(np.int16)
  stereo = np.stack([ints, ints[::-1]], axis=1)
  paths = {}
  for name, subtype, fmt in [('pcm16.wav', 'PCM_16', 'WAV'), ('float.wav', 'FLOAT', 'WAV'),
                             ('double.wav', 'DOUBLE', 'WAV'), ('pcm16.flac', 'PCM_16', 'FLAC')]:
    paths[name] = tmp_path / name
    data = stereo if subtype == 'PCM_16' else stereo / np.float32(32768)
    soundfile.write(paths[name], data, 16000, subtype=subtype, format=fmt)
  for path in paths.values():
    samples, rate = features.read_audio(path)
    assert rate == 16000 and samples.dtype == np.float32 and samples.shape == (2, 20000)
    assert np.array_equal(samples, stereo.T / np.float32(32768))
  reference = features.clip_features(paths['pcm16.wav'])
  for path in paths.values():
    assert np.abs(features.clip_features(path) - reference).max() <= 1e-4


@pytest.mark.parametrize('subtype,fmt,bits', [('PCM_24', 'WAV', 24), ('PCM_24', 'FLAC', 24),
                                              ('PCM_32', 'WAV', 32), ('PCM_U8', 'WAV', 8)])
def test_integer_pcm_scales_like_torchaudio(tmp_path, subtype, fmt, bits):
  rng = np.random.default_rng(bits)
  values = rng.integers(-2**(bits - 1), 2**(bits - 1), 4000, dtype=np.int64)
  path = tmp_path / f'clip.{fmt.lower()}'
  soundfile.write(path, (values << (32 - bits)).astype(np.int32), 8000, subtype=subtype,
                  format=fmt)
  samples, rate = features.read_audio(path)
  assert rate == 8000
  assert np.array_equal(samples[0], values.astype(np.float32) / np.float32(2**(bits - 1)))


def _write(path, data, rate, subtype='FLOAT'):
  soundfile.write(path, np.asarray(data, np.float32), rate, subtype=subtype)
  return path


def _raises(path, reason):
  with pytest.raises(features.AudioError) as caught:
    features.clip_features(path)
  error = caught.value
  assert isinstance(error, ValueError) and error.reason == reason
  assert error.reason in features.AUDIO_ERROR_REASONS
  assert str(path) in str(error) and '\n' not in str(error)
  return error


def test_bad_audio_raises_audio_error_with_its_reason(tmp_path, speech):
  garbage = tmp_path / 'garbage.wav'
  garbage.write_bytes(b'RIFF\x00\x00\x00\x00WAVEnot audio at all' * 4)
  _raises(garbage, 'unreadable')
  _raises(tmp_path, 'unreadable')  # a directory
  _raises(_write(tmp_path / 'empty.wav', np.zeros(0), 16000), 'empty')
  short = _raises(_write(tmp_path / 'short.wav', speech[:399], 16000), 'empty')
  assert '399 samples' in str(short) and '400 samples' in str(short)
  assert features.clip_features(_write(tmp_path / 'one.wav', speech[:400], 16000)).shape == (
      1, 128)
  nan = speech[:4000].copy()
  nan[123] = np.nan
  _raises(_write(tmp_path / 'nan.wav', nan, 16000), 'non_finite')
  inf_in_channel_1 = np.stack([speech[:4000], speech[:4000]], axis=1)
  inf_in_channel_1[7, 1] = np.inf
  _raises(_write(tmp_path / 'inf.wav', inf_in_channel_1, 16000), 'non_finite')
  _raises(_write(tmp_path / 'rate99.wav', speech[:4000], 99), 'bad_rate')
  with pytest.raises(FileNotFoundError):
    features.clip_features(tmp_path / 'missing.wav')


def test_sample_rate_rule_mirrors_torchaudio(speech):
  for rate in (0, 50, 99):
    with pytest.raises(features.AudioError) as caught:
      features.fbank(speech[:4000], rate)
    assert caught.value.reason == 'bad_rate'
  # 100 Hz is the lowest rate torchaudio accepts (a 1-sample shift, 2-sample frames): with a
  # 2-point FFT every mel bin is empty, and so is every value, as in the original.
  assert features.frame_geometry(100) == (2, 1, 2)
  assert (features.fbank(speech[:300], 100) == LOG_EPS).all()
  assert len(features.empty_mel_bins(8000)) == 4
  assert len(features.empty_mel_bins(11025)) == 0


def test_jax_checks_rate_and_length_while_tracing():
  with pytest.raises(features.AudioError) as caught:
    features.fbank_jax(jnp.zeros((2, 399)), 16000)
  assert caught.value.reason == 'empty'
  with pytest.raises(features.AudioError) as caught:
    features.fbank_jax(jnp.zeros((2, 4000)), 99)
  assert caught.value.reason == 'bad_rate'
  with pytest.raises(ValueError):
    features.fbank(np.zeros(4000), 16000, num_mel_bins=3)
