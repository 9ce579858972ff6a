"""Kaldi-compatible log-mel filterbank features, computed as the original SSAST computes them.

The original prepares every clip with

  waveform, sr = torchaudio.load(path)
  waveform = waveform - waveform.mean()
  torchaudio.compliance.kaldi.fbank(waveform, htk_compat=True, sample_frequency=sr,
      use_energy=False, window_type='hanning', num_mel_bins=128, dither=0.0, frame_shift=10)

torchaudio is not a dependency of this project, so the same computation is done here in numpy
(`fbank`, `clip_features`) and in JAX (`fbank_jax`, batched and jit-able). The settings, the
fixed ones and kaldi.fbank's defaults that the call leaves alone:

  frames        25 ms long, 10 ms apart (int(rate * ms * 0.001) samples, as torchaudio rounds),
                snip_edges: only frames that fit, 1 + (n - size) // shift of them;
  per frame     its mean removed, pre-emphasis 0.97 (x[j] -= 0.97 x[j-1], the first sample
                its own predecessor, which the window's zero at j = 0 then removes anyway),
                Kaldi's 'hanning' window 0.5 - 0.5 cos(2 pi j / (N - 1)), zero-padded to the
                next power of two for the FFT;
  spectrum      power (use_power), triangular mel bins between 20 Hz and Nyquist (low_freq 20,
                high_freq 0 = Nyquist), Kaldi's mel scale 1127 ln(1 + f / 700), no VTLN;
  output        log, floored at float32 epsilon (use_log_fbank), no energy column
                (use_energy=False; htk_compat only moves that column to the end, so with no
                energy column it changes nothing), only channel 0 (kaldi.fbank's channel=-1
                selects channel 0), after subtracting the mean over all channels.

Everything is float32 in the order torchaudio computes it; the mel weights too, so that which
FFT points fall inside a narrow low-frequency triangle is decided as torchaudio decides it
(the same zero pattern at every rate tried, 100 Hz to 192 kHz). On the reference clip the
features differ from torchaudio's by at most 5.7e-4 (mean 3e-6), in the quietest bins of
frames: that is torch's float32 (MKL) FFT rounding, which numpy's more accurate FFT does not
share; computing everything in float64 instead gives the same 5.5e-4. XLA's float32 FFT
(`fbank_jax`) differs from numpy's by a similar amount.

At 16 kHz and 128 bins one triangle (bin 3) holds no FFT point: its weights are all zero and
its value is log(eps) = -15.94 in every frame, as in the original. Lower rates leave more bins
empty (`empty_mel_bins`: 4 at 8 kHz, 21 at 4 kHz, all 128 at 100 Hz); the original accepts
them, and so does this module.

Sample rates (`AudioError` reason 'bad_rate'): torchaudio asserts, for these settings, a frame
shift of at least one sample, a frame of at least two samples, and 0 <= low_freq (20 Hz) <
Nyquist; the mel bins' edges then increase strictly. These asserts are mirrored exactly, and
every rate that passes them is accepted; for integer rates the rule is rate >= 100 Hz.
"""

import errno
import functools
import os

import numpy as np
import soundfile

AUDIO_ERROR_REASONS = ('unreadable', 'empty', 'non_finite', 'bad_rate')
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
PREEMPHASIS = 0.97
LOW_FREQ = 20.0
EPSILON = np.finfo(np.float32).eps


class AudioError(ValueError):
  """A clip that has no features; `reason` is one of AUDIO_ERROR_REASONS, `source` names it."""

  def __init__(self, source: str, reason: str, detail: str):
    super().__init__(f'{source}: {detail} ({reason})')
    self.source = source
    self.reason = reason
    self.detail = detail


def frame_geometry(sample_rate: float) -> tuple[int, int, int]:
  """(frame length, frame shift, FFT size) in samples at `sample_rate`, as torchaudio rounds."""
  size = int(sample_rate * FRAME_LENGTH_MS * 0.001)
  shift = int(sample_rate * FRAME_SHIFT_MS * 0.001)
  return size, shift, 1 << max(size - 1, 0).bit_length()


def num_frames(num_samples: int, sample_rate: float) -> int:
  """Frames of a clip of `num_samples` samples (snip_edges: only frames that fit)."""
  size, shift, _ = frame_geometry(sample_rate)
  return 0 if num_samples < size else 1 + (num_samples - size) // shift


def _mel(freq):
  return 1127.0 * np.log(1.0 + freq / 700.0)


@functools.lru_cache(maxsize=None)
def hanning_window(size: int) -> np.ndarray:
  """Kaldi's symmetric 'hanning' window of `size` samples, float32 (read-only, cached)."""
  angle = np.arange(size, dtype=np.float32) * np.float32(2.0 * np.pi / (size - 1))
  window = np.float32(0.5) - np.float32(0.5) * np.cos(angle)
  window.flags.writeable = False
  return window


@functools.lru_cache(maxsize=None)
def mel_banks(sample_rate: float, num_mel_bins: int, fft_size: int) -> np.ndarray:
  """(fft_size // 2 + 1, num_mel_bins) float32 triangular weights (read-only, cached).

  Bin b rises from mel edge b to edge b + 1 and falls to edge b + 2, the num_mel_bins + 2
  edges equally spaced in mel from 20 Hz to Nyquist. Computed in float32 with torchaudio's
  order of operations; the Nyquist FFT point has weight zero in every bin, as in Kaldi.
  """
  if num_mel_bins <= 3:
    raise ValueError(f'num_mel_bins must be > 3 (as in Kaldi), got {num_mel_bins}')
  f32 = np.float32
  mel_low, mel_high = _mel(LOW_FREQ), _mel(0.5 * sample_rate)
  delta = (mel_high - mel_low) / (num_mel_bins + 1)
  edges = f32(mel_low) + np.arange(num_mel_bins + 2, dtype=f32) * f32(delta)
  left, centre, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
  points = np.arange(fft_size // 2, dtype=f32) * f32(sample_rate / fft_size)
  mel = f32(1127.0) * np.log(f32(1.0) + points / f32(700.0))
  rising = (mel - left) / (centre - left)
  falling = (right - mel) / (right - centre)
  weights = np.maximum(f32(0.0), np.minimum(rising, falling))
  banks = np.zeros((fft_size // 2 + 1, num_mel_bins), f32)
  banks[:-1] = weights.T
  banks.flags.writeable = False
  return banks


def empty_mel_bins(sample_rate: float, num_mel_bins: int = 128) -> np.ndarray:
  """Indices of the mel bins whose weights are all zero (their value is always log(eps))."""
  _check_rate(sample_rate, 'sample rate')
  banks = mel_banks(sample_rate, num_mel_bins, frame_geometry(sample_rate)[2])
  return np.flatnonzero(~banks.any(axis=0))


def _check_rate(sample_rate, source: str) -> None:
  """Mirrors the asserts torchaudio's fbank makes on the sample rate, as reason 'bad_rate'."""
  size, shift, _ = frame_geometry(sample_rate)
  if not (shift >= 1 and size >= 2 and 0.0 <= LOW_FREQ < 0.5 * sample_rate):
    raise AudioError(source, 'bad_rate',
                     f'sample rate {sample_rate} Hz gives a {FRAME_SHIFT_MS:g} ms shift of '
                     f'{shift} samples and a {FRAME_LENGTH_MS:g} ms frame of {size} samples '
                     f'(needs >= 1 and >= 2, and Nyquist above {LOW_FREQ:g} Hz); use >= 100 Hz')


def _check_length(num_samples: int, sample_rate, source: str) -> None:
  size = frame_geometry(sample_rate)[0]
  if num_samples < size:
    raise AudioError(source, 'empty',
                     f'{num_samples} samples, fewer than one {FRAME_LENGTH_MS:g} ms frame '
                     f'({size} samples at {sample_rate} Hz)')


def _check(samples: np.ndarray, sample_rate, source: str) -> np.ndarray:
  """`samples` as float32 (channels, samples), checked for every AudioError reason but
  'unreadable'."""
  samples = np.asarray(samples, np.float32)
  if samples.ndim == 1:
    samples = samples[None]
  if samples.ndim != 2:
    raise ValueError(f'{source}: waveform must be (channels, samples) or (samples,), '
                     f'got shape {samples.shape}')
  _check_rate(sample_rate, source)
  _check_length(samples.shape[1] if samples.shape[0] else 0, sample_rate, source)
  if not np.isfinite(samples).all():
    raise AudioError(source, 'non_finite',
                     f'{np.count_nonzero(~np.isfinite(samples))} NaN or infinite samples')
  return samples


def _log_mel(samples: np.ndarray, sample_rate, num_mel_bins: int) -> np.ndarray:
  """The features of checked float32 (channels, samples) audio."""
  size, shift, fft_size = frame_geometry(sample_rate)
  signal = samples[0] - samples.mean(dtype=np.float64).astype(np.float32)
  frames = np.lib.stride_tricks.sliding_window_view(signal, size)[::shift]
  frames = frames - frames.mean(axis=1, keepdims=True)
  previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
  frames = (frames - np.float32(PREEMPHASIS) * previous) * hanning_window(size)
  power = np.square(np.abs(np.fft.rfft(frames, n=fft_size)))
  energies = power @ mel_banks(sample_rate, num_mel_bins, fft_size)
  return np.log(np.maximum(energies, EPSILON))


def fbank(waveform: np.ndarray, sample_rate: int, num_mel_bins: int = 128) -> np.ndarray:
  """(frames, num_mel_bins) float32 log-mel features of `waveform`, as the original's.

  `waveform` is (channels, samples) or (samples,) in [-1, 1]; the mean over all channels and
  samples is subtracted and channel 0 is used. Raises AudioError ('bad_rate', 'empty' when
  there is not one whole frame, 'non_finite' for NaN or inf in any channel; `source` is
  'waveform'), and ValueError for another shape or num_mel_bins <= 3.
  """
  return _log_mel(_check(waveform, sample_rate, 'waveform'), sample_rate, num_mel_bins)


def fbank_jax(waveforms, sample_rate: int, num_mel_bins: int = 128):
  """(batch, frames, num_mel_bins) float32 features of (batch, samples) mono waveforms.

  The same computation as `fbank`, each clip's own mean subtracted, for clips of one length.
  Traceable: `jax.jit(fbank_jax, static_argnums=(1, 2))`; `sample_rate`, `num_mel_bins` and
  the shape are static, so the rate and length checks raise AudioError while tracing, but
  finiteness is not checked. The window and mel weights are the cached numpy constants of
  `fbank`. JAX is imported on the first call, so that the converter's worker processes,
  which use only the numpy path, start without loading it.
  """
  import jax
  import jax.numpy as jnp

  if waveforms.ndim != 2:
    raise ValueError(f'waveforms must be (batch, samples), got shape {waveforms.shape}')
  _check_rate(sample_rate, 'waveforms')
  _check_length(waveforms.shape[1], sample_rate, 'waveforms')
  size, shift, fft_size = frame_geometry(sample_rate)
  starts = np.arange(num_frames(waveforms.shape[1], sample_rate)) * shift
  signal = jnp.asarray(waveforms, jnp.float32)
  signal = signal - signal.mean(axis=1, keepdims=True)
  frames = signal[:, starts[:, None] + np.arange(size)]
  frames = frames - frames.mean(axis=2, keepdims=True)
  previous = jnp.concatenate([frames[..., :1], frames[..., :-1]], axis=2)
  frames = (frames - PREEMPHASIS * previous) * hanning_window(size)
  power = jnp.square(jnp.abs(jnp.fft.rfft(frames, n=fft_size)))
  energies = jnp.matmul(power, mel_banks(sample_rate, num_mel_bins, fft_size),
                        precision=jax.lax.Precision.HIGHEST)
  return jnp.log(jnp.maximum(energies, EPSILON))


def read_audio(path) -> tuple[np.ndarray, int]:
  """(float32 (channels, samples) in [-1, 1], sample rate) of an audio file, as torchaudio.load.

  libsndfile scales integer PCM by 2^-(bits - 1), wav or flac: int16 / 32768, and 24 and
  32 bit likewise (float32(int32) / 2^31), exactly torchaudio's normalisation; unsigned 8 bit
  becomes (x - 128) / 128; float files are returned as stored. A missing file (or a dangling
  link) raises FileNotFoundError, so that the caller decides what a missing clip means;
  anything else soundfile cannot open or decode raises AudioError 'unreadable'.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
  try:
    data, sample_rate = soundfile.read(path, dtype='float32', always_2d=True)
  except (soundfile.SoundFileError, RuntimeError, OSError) as e:
    raise AudioError(path, 'unreadable', ' '.join(str(e).split())) from None
  return np.ascontiguousarray(data.T), sample_rate


def clip_features(path, num_mel_bins: int = 128) -> np.ndarray:
  """(frames, num_mel_bins) float32 features of the audio file at `path`, as the original's.

  Raises FileNotFoundError for a missing file and AudioError (any of AUDIO_ERROR_REASONS,
  the message naming the file) for audio that has no features.
  """
  samples, sample_rate = read_audio(path)
  return _log_mel(_check(samples, sample_rate, os.fspath(path)), sample_rate, num_mel_bins)
