"""The linear probe inside pretraining: a curve of representation quality beside the pretext
metrics.

With `probe.train_json` and `probe.val_json` set (config/probing.py), the labelled clips are
read once before step 0, normalised with the run's own mean/std and cut or zero-padded to
its `data.target_length` (what the encoder sees in training), and kept in host memory
(N x target_length x mel bins float32). At step 0, every `probe_every` steps (0: at each
validation) and at the last step, `clip_features` embeds them with the current parameters
(the final-norm patch tokens' mean, `embed(...)['clip']`, in batches split over every device
like a training batch) and `ssast_jax.probe.probe` fits and scores the probe; the row
`probe/acc`, `probe/map` (when a val clip has a positive class) goes to the logs. Every
process fits the same probe on the same replicated features, so none waits on another. The
probe reads the parameters only: the run's state, keys and data order are untouched, so a
run computes the same steps with the probe on or off, and resumes exactly either way.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ssast_jax import probe as probe_lib
from ssast_jax.config.settings import Settings
from ssast_jax.data import convert, sources
from ssast_jax.finetune import labels
from ssast_jax.finetune.model import patch_tokens
from ssast_jax.training import sharding


class ProbeDataError(ValueError):
  """The probe's clips or labels cannot be used; the message names the file or clip."""


def is_due(settings: Settings, step: int, total_steps: int) -> bool:
  """Whether the probe runs after `step` training steps (step 0 included)."""
  if not settings.probe.enabled:
    return False
  every = settings.probe.every or settings.optim.epoch_iter
  return step % every == 0 or step == total_steps


def _clip_features(params, fbank, *, graphdef, mesh):
  """`embed(...)['clip']` of the current parameters, gathered from their sharding."""
  model = nnx.merge(graphdef, sharding.gather(params, mesh))
  return jnp.mean(patch_tokens(model, fbank), axis=1)


class PretrainingProbe:
  """The probe's clips, loaded once, and `__call__(params, step)` -> its logged metrics."""

  def __init__(self, settings: Settings, graphdef, mesh, mean: float, std: float):
    p = settings.probe
    self._settings = settings
    self._batch_sharding = sharding.batch_sharding(mesh)
    self._batch_size = settings.optim.micro_batch_size  # divides over the devices
    try:
      table = labels.load_label_table(p.label_csv)
    except labels.LabelError as error:
      raise ProbeDataError(f'probe label CSV {p.label_csv}: {error}') from None
    self._splits = [self._load(split, table, mean, std) for split in ('train', 'val')]
    self._features = jax.jit(
        functools.partial(_clip_features, graphdef=graphdef, mesh=mesh),
        out_shardings=sharding.replicated(mesh))

  def _load(self, split: str, table, mean: float, std: float):
    p, d = self._settings.probe, self._settings.data
    json_path = getattr(p, f'{split}_json')
    if p.audio:
      source, root = sources.AUDIO, p.audio_root or os.path.dirname(json_path)
    else:
      source, root = sources.PT, getattr(p, f'{split}_pt_dir')
    try:
      return probe_lib.load_split(f'probe.{split}_json', json_path, table, source, root,
                                  d.num_mel_bins, d.target_length, mean, std)
    except (ValueError, convert.ConversionError) as error:  # LabelError is a ValueError
      raise ProbeDataError(f'probe.{split}_json {json_path}: '
                           f'{" ".join(str(error).split())}') from None

  @property
  def clip_counts(self) -> tuple[int, int]:
    return len(self._splits[0][0]), len(self._splits[1][0])

  def clip_features(self, params, clips: np.ndarray, beat=lambda: None) -> np.ndarray:
    """`(N, D)` float32 features of normalised `clips`, `beat` after each batch."""
    size, out = self._batch_size, []
    for start in range(0, len(clips), size):
      batch = clips[start:start + size]
      padded = np.pad(batch, ((0, size - len(batch)), (0, 0), (0, 0)))
      fbank = jax.make_array_from_callback(padded.shape, self._batch_sharding,
                                           lambda index, padded=padded: padded[index])
      out.append(np.asarray(self._features(params, fbank))[:len(batch)])
      beat()
    return np.concatenate(out)

  def __call__(self, params, beat=lambda: None) -> dict:
    """`{'probe/acc': ..., 'probe/map': ...}` of the probe on the features of `params`
    (`probe/map` left out when no val clip has a positive class)."""
    (train_x, train_y), (val_x, val_y) = self._splits
    result = probe_lib.probe(None, self.clip_features(params, train_x, beat), train_y,
                             self.clip_features(params, val_x, beat), val_y,
                             kind=self._settings.probe.kind, seed=self._settings.run.seed)
    beat()
    logged = {'probe/acc': result['acc']}
    if result['mAP'] is not None:
      logged['probe/map'] = result['mAP']
    return logged

