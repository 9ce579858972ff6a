"""Where the converter reads a JSON entry's features from: its `.pt` file or its audio.

`pt`: the original's precomputed features, `<pt_dir>/<stem of wav>.pt` (`pt_features`).
`audio`: the entry's `wav` file itself, absolute or relative to the audio root, its features
computed here as the original computes them (`ssast_jax.features.clip_features`).
Both kinds turn an entry into a finite float32 (T, F) array or raise
`pt_features.SkippedClip` with one of the kind's `SKIP_REASONS`, so that the converter, its
manifest and its summary treat them alike.
"""

from pathlib import Path, PurePosixPath

import numpy as np

from ssast_jax import features
from ssast_jax.data import pt_features
from ssast_jax.data.pt_features import SkippedClip

PT = "pt"
AUDIO = "audio"
SKIP_REASONS = {PT: pt_features.SKIP_REASONS,
                AUDIO: ("missing",) + features.AUDIO_ERROR_REASONS}
AUDIO_NUM_MEL_BINS = 128  # the original's, used for audio input unless --num-mel-bins is given


def clip_path(kind: str, root, wav: str) -> Path:
  """The file holding an entry's features: `<root>/<stem of wav>.pt` for .pt input; for
  audio `wav` itself if absolute, else `<root>/<wav>`."""
  if kind == PT:
    return Path(root) / f"{PurePosixPath(wav).stem}.pt"
  return Path(root) / wav


def _load_audio(path: Path, num_mel_bins: int) -> np.ndarray:
  try:
    fbank = features.clip_features(path, num_mel_bins)
  except FileNotFoundError:
    raise SkippedClip("missing", f"{path} does not exist") from None
  except features.AudioError as e:
    raise SkippedClip(e.reason, str(e)) from None
  # Finite samples can still overflow the power spectrum (float files far beyond [-1, 1]).
  if not np.isfinite(fbank.sum()) and not np.isfinite(fbank).all():
    raise SkippedClip("non_finite", f"{path} gives NaN or infinite features")
  return np.ascontiguousarray(fbank)


def load_clip(kind: str, path: Path, num_mel_bins: int | None) -> np.ndarray:
  """The float32 (T, F) features stored at `path` (`kind` PT) or computed from the audio
  file `path` (`kind` AUDIO, where `num_mel_bins` is required). Raises SkippedClip."""
  if kind == PT:
    return pt_features.load_clip(path, num_mel_bins)
  return _load_audio(path, num_mel_bins)
