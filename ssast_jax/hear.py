"""The HEAR 2021 API (hearbenchmark.com/hear-api.html) for SSAST models: `load_model`,
`get_timestamp_embeddings`, `get_scene_embeddings`.

    from ssast_jax import hear
    model = hear.load_model('ssast-base-patch-400.pth')
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)  # audio: [n, samples]

What is computed, and why:

  input        16 kHz mono audio -> the original's Kaldi fbank (`features.fbank_jax`, each
               clip's own mean removed, on the device), zero-padded at the end and then
               normalised as `(fbank - mean) / (2 * std)`, the original's order (SPEC 1), so
               padded frames get the value the model saw in training.
  resolution   one embedding per patch column: the model's `tstride` frames, i.e. 160 ms for
               the published 16 x 16 patch models and 20 ms for the 128 x 2 frame models.
               Finer steps would need a model with a smaller time stride (a fine-tuned
               file, see `load_model`); the encoder has no per-frame output to offer.
  one column   the final-norm tokens of the column's `p_f` frequency patches, concatenated
               from the lowest band up (`timestamp_embedding_size = p_f * D`): averaging them
               would discard where in frequency the energy lies, which the pitch and note
               tasks of HEAR need; the frame models have p_f = 1 and give D.
  timestamp    the centre, in ms, of the frames the column's patch covers (frame i spans
               [10 i, 10 i + 25] ms): column j at `10 tstride j + (10 (tshape - 1) + 25) / 2`,
               87.5 ms + 160 ms j for 16 x 16 patches.
  length       the columns kept are the fewest that cover every frame of the clip (at
               least one), so the last may reach into the padding and its centre lie up to
               `5 tshape - 17.5` ms (62.5 ms) past the clip's end; a clip shorter than one
               25 ms frame is zero-padded to one. A clip longer than the model's
               `input_tdim` frames is cut into windows of `input_tdim` frames that start
               `p_t * tstride` frames apart (the frames the window's `p_t` columns step
               over), encoded independently: the columns of consecutive windows then
               continue one regular grid (with 16 x 16 patches and 1024 frames the windows
               do not overlap; with overlapping patches they share the `tshape - tstride`
               frames the patches share). The last window is padded.
  scene        the mean over time of the clip's timestamp embeddings, so also p_f * D wide.

Every sound is computed alone at a fixed shape: the fbank per row (one compilation per
audio length), the encoder on chunks of `batch_size` windows, the last chunk padded with
zero windows (one compilation per model). Results thus do not depend on what else is in
the batch: equal audio gives equal embeddings, in float32, without gradients. Torch is used
only at the edges: tensors in and out, and `Model` is a parameterless `torch.nn.Module`
because the HEAR tools accept only torch or TensorFlow modules (they call `.to(device)`).
"""

from __future__ import annotations

import functools
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import torch

from ssast_jax import loading
from ssast_jax.config.settings import resolve_saved, split_shards_dir
from ssast_jax.data.shards import ManifestError, read_manifest
from ssast_jax.features import FRAME_LENGTH_MS, FRAME_SHIFT_MS, fbank_jax, frame_geometry
from ssast_jax.features import num_frames
from ssast_jax.finetune import embed, pretrained_from_workdir
from ssast_jax.training import checkpoints

SAMPLE_RATE = 16000
AUDIOSET_MEAN = -4.2677393  # the statistics of the published AudioSet + LibriSpeech models
AUDIOSET_STD = 4.5689974
DEFAULT_BATCH_SIZE = 16  # windows per encoder call


class Model(torch.nn.Module):
  """An SSAST model (`handle`: a ModelHandle or ClassifierHandle) with the normalisation its
  inputs need, and the HEAR attributes `sample_rate`, `scene_embedding_size`,
  `timestamp_embedding_size`; `hop_ms` is the step between timestamp embeddings."""

  def __init__(self, handle, mean: float, std: float, batch_size: int = DEFAULT_BATCH_SIZE):
    super().__init__()
    if not std > 0 or batch_size < 1:
      raise ValueError(f'load_model: need std > 0 and batch_size >= 1, got {std}, '
                       f'{batch_size}')
    config = handle.config
    self.handle = handle
    self.mean, self.std, self.batch_size = float(mean), float(std), int(batch_size)
    self.sample_rate = SAMPLE_RATE
    self.timestamp_embedding_size = config.patch_grid[0] * config.embed_dim
    self.scene_embedding_size = self.timestamp_embedding_size
    self.hop_ms = FRAME_SHIFT_MS * config.tstride

  def extra_repr(self) -> str:
    c = self.handle.config
    return (f'{type(self.handle).__name__}: D={c.embed_dim}, depth={c.depth}, patch '
            f'{c.fshape}x{c.tshape}, stride {c.fstride}x{c.tstride}, input {c.input_tdim}x'
            f'{c.input_fdim}; mean {self.mean:g}, std {self.std:g}')


def load_model(model_file_path: str = '', *, mean: float | None = None,
               std: float | None = None, fstride: int | None = None,
               tstride: int | None = None, input_tdim: int | None = None,
               input_fdim: int | None = None,
               batch_size: int = DEFAULT_BATCH_SIZE) -> Model:
  """A HEAR model from a training workdir (its newest checkpoint), a `.pth` exported by
  this project, or an original SSAST `.pth` (pretraining or fine-tuned layout).

  `mean`, `std`: the normalisation; by default a workdir's own (its saved config's
  `data.mean` / `data.std`, or, where those are None, its training shards' manifest, the
  statistics the run used) and for a `.pth`, which records none, the AudioSet statistics
  of the published models (-4.2677393, 4.5689974). `fstride`, `tstride`, `input_tdim`
  (and `input_fdim` if not 128) are needed for a fine-tuned `.pth` only, which does not
  record them (`ssast_jax.from_pytorch`). `batch_size`: windows per encoder call.
  """
  path = os.fspath(model_file_path)
  if not path:
    raise ValueError('load_model: no model_file_path; ssast_jax ships no weights: give a '
                     'training workdir, an exported .pth or an original SSAST .pth')
  if os.path.isdir(path):
    strides = {'fstride': fstride, 'tstride': tstride, 'input_tdim': input_tdim,
               'input_fdim': input_fdim}
    given = [k for k, v in strides.items() if v is not None]
    if given:
      raise ValueError(f'load_model: {path} is a training workdir, whose config fixes the '
                       f'geometry; {", ".join(given)} are for fine-tuned .pth files')
    handle = pretrained_from_workdir(path)
    statistics = (mean, std) if None not in (mean, std) else _workdir_statistics(path)
  else:
    handle = loading.from_pytorch(path, fstride, tstride, input_tdim, input_fdim)
    statistics = AUDIOSET_MEAN, AUDIOSET_STD
  return Model(handle, statistics[0] if mean is None else mean,
               statistics[1] if std is None else std, batch_size)


def _workdir_statistics(workdir: str) -> tuple[float, float]:
  """(mean, std) a training run normalised with: its config's, else its training shards'
  manifest's (where `prepare_data` takes them); if that manifest is gone, the AudioSet
  statistics, with a warning. A relative `data.shards_dir` is taken from the current
  directory, as the run took it."""
  settings = resolve_saved(checkpoints.read_config(workdir))
  data = settings.data
  if data.mean is not None and data.std is not None:
    return data.mean, data.std
  shards = split_shards_dir(data.shards_dir or os.path.join(workdir, 'shards'), 'train')
  try:
    manifest = read_manifest(shards)
  except ManifestError as e:
    warnings.warn(f'load_model: {workdir} took mean/std from its shard manifest, which '
                  f'cannot be read ({e}); using the AudioSet statistics {AUDIOSET_MEAN}, '
                  f'{AUDIOSET_STD} instead (pass mean= and std= to choose)')
    manifest = {'mean': AUDIOSET_MEAN, 'std': AUDIOSET_STD}
  return (float(manifest['mean'] if data.mean is None else data.mean),
          float(manifest['std'] if data.std is None else data.std))


def _layout(config, num_samples: int) -> tuple[int, int, int]:
  """(columns, windows, hop in frames) for a clip of `num_samples` samples: the fewest
  columns covering all its frames, the windows holding them, the frames between windows."""
  frames = num_frames(num_samples, SAMPLE_RATE)
  columns = max(1, -(-(frames - config.tshape) // config.tstride) + 1)
  p_t = config.patch_grid[1]
  return columns, -(-columns // p_t), p_t * config.tstride


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _windows(waveform, num_mel_bins, windows, hop, length, mean, std):
  """(windows, length, num_mel_bins) normalised model inputs of one (1, samples) clip:
  fbank, zeros appended to fill the last window, then normalised, then windowed."""
  fbank = fbank_jax(waveform, SAMPLE_RATE, num_mel_bins)[0]
  total = (windows - 1) * hop + length
  fbank = jnp.pad(fbank, ((0, total - fbank.shape[0]), (0, 0)))
  x = (fbank - mean) / (2 * std)
  return x[np.arange(windows)[:, None] * hop + np.arange(length)]


def _checked_audio(audio) -> np.ndarray:
  """`audio` as a float32 (n_sounds, n_samples) numpy array, or a one-line error."""
  if not isinstance(audio, torch.Tensor):
    raise TypeError(f'audio must be a torch.Tensor [n_sounds, n_samples], not '
                    f'{type(audio).__name__}')
  if audio.ndim != 2:
    raise ValueError(f'audio must be 2-D [n_sounds, n_samples] (mono, {SAMPLE_RATE} Hz), '
                     f'got shape {tuple(audio.shape)}')
  if not audio.is_floating_point():
    raise ValueError(f'audio must be a float tensor (samples in [-1, 1]), got {audio.dtype}')
  if audio.numel() == 0:
    raise ValueError(f'audio is empty: shape {tuple(audio.shape)}')
  samples = audio.detach().to('cpu', torch.float32).numpy()
  if not np.isfinite(samples).all():
    raise ValueError(f'audio has {np.count_nonzero(~np.isfinite(samples))} NaN or infinite '
                     f'samples')
  return samples


def _column_embeddings(model: Model, audio) -> np.ndarray:
  """(n_sounds, columns, p_f * D) float32 embeddings of the clip's patch columns."""
  if not isinstance(model, Model):
    raise TypeError(f'model must come from ssast_jax.hear.load_model, not '
                    f'{type(model).__name__}')
  samples = _checked_audio(audio)
  config = model.handle.config
  size = frame_geometry(SAMPLE_RATE)[0]
  if samples.shape[1] < size:  # less than one fbank frame: pad to one
    samples = np.pad(samples, ((0, 0), (0, size - samples.shape[1])))
  columns, windows, hop = _layout(config, samples.shape[1])
  inputs = jnp.concatenate([
      _windows(row[None], config.input_fdim, windows, hop, config.input_tdim, model.mean,
               model.std) for row in samples])
  chunks = []
  for start in range(0, inputs.shape[0], model.batch_size):
    chunk = inputs[start:start + model.batch_size]
    count = chunk.shape[0]
    chunk = jnp.pad(chunk, ((0, model.batch_size - count), (0, 0), (0, 0)))
    chunks.append(np.asarray(embed(model.handle, chunk)['tokens'][:count]))
  p_f, p_t = config.patch_grid
  tokens = np.concatenate(chunks).reshape(len(samples), windows, p_f, p_t, config.embed_dim)
  tokens = tokens.transpose(0, 1, 3, 2, 4).reshape(len(samples), windows * p_t, -1)
  return np.ascontiguousarray(tokens[:, :columns], np.float32)


def get_timestamp_embeddings(audio: torch.Tensor, model: Model):
  """(embeddings `[n_sounds, n_timestamps, timestamp_embedding_size]`, timestamps
  `[n_sounds, n_timestamps]` in ms), float32 torch tensors on the CPU, of `audio`
  `[n_sounds, n_samples]` (16 kHz mono, in [-1, 1]): one embedding per patch column,
  centred on the frames it covers, every `model.hop_ms` ms (see the module's docstring)."""
  embeddings = _column_embeddings(model, audio)
  c = model.handle.config
  first = (FRAME_SHIFT_MS * (c.tshape - 1) + FRAME_LENGTH_MS) / 2
  centres = first + model.hop_ms * np.arange(embeddings.shape[1], dtype=np.float32)
  timestamps = np.broadcast_to(centres, embeddings.shape[:2]).astype(np.float32)
  return torch.from_numpy(embeddings), torch.from_numpy(timestamps)


def get_scene_embeddings(audio: torch.Tensor, model: Model) -> torch.Tensor:
  """`[n_sounds, scene_embedding_size]` float32: each clip's timestamp embeddings averaged
  over time (the columns covering the clip only, none of the padding beyond them)."""
  return torch.from_numpy(_column_embeddings(model, audio).mean(axis=1, dtype=np.float32))
