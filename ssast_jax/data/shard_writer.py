"""Converting one planned shard: read its clips' `.pt` files, write the shard atomically.

Runs in converter worker processes. A shard is two files, written to hidden temporary names
and renamed into place frames first, clip list last: the clip list's presence (with the plan
digest it records) is what marks the shard as finished for a resumed run.
"""

import dataclasses
import json
import os
from pathlib import Path, PurePosixPath

import numpy as np

from ssast_jax.data import pt_features
from ssast_jax.data import shards


@dataclasses.dataclass(frozen=True)
class ShardTask:
  """One shard of the conversion plan: which JSON entries go into it, and how."""
  shard: int
  entries: tuple[tuple[str, str], ...]  # (wav, labels) in JSON order
  pt_dir: str
  out_dir: str
  dtype: str
  num_mel_bins: int
  plan_digest: str


def pt_path(pt_dir, wav: str) -> Path:
  """The feature file of a JSON entry: `<pt_dir>/<stem of wav>.pt`."""
  return Path(pt_dir) / f"{PurePosixPath(wav).stem}.pt"


def merge_stats(a: tuple[int, float, float], b: tuple[int, float, float]):
  """Combines (count, mean, sum of squared deviations) of two disjoint sets of values."""
  count = a[0] + b[0]
  if count == 0:
    return (0, 0.0, 0.0)
  delta = b[1] - a[1]
  return (count, a[1] + delta * b[0] / count, a[2] + b[2] + delta * delta * a[0] * b[0] / count)


def _clip_stats(fbank: np.ndarray) -> tuple[int, float, float]:
  mean = float(fbank.sum()) / fbank.size
  deviations = fbank - np.float32(mean)
  np.square(deviations, out=deviations)
  return (fbank.size, mean, float(deviations.sum()))


def _to_stored(fbank: np.ndarray, dtype: str, path: Path) -> np.ndarray:
  if dtype == "float32":
    return fbank
  if fbank.max() >= pt_features.FLOAT16_LIMIT or fbank.min() <= -pt_features.FLOAT16_LIMIT:
    raise pt_features.SkippedClip("non_finite", f"{path} has values beyond the float16 range")
  return fbank.astype(np.float16)


def write_atomically(path: Path, write) -> None:
  """Calls write(file) on a hidden temporary file, then renames it to `path`. The temporary
  is named after the process so that a straggler of a killed run cannot write into it."""
  temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  with open(temporary, "wb") as f:
    write(f)
  os.replace(temporary, path)


def _write_frames(path: Path, clips: list[np.ndarray], dtype: str, num_mel_bins: int) -> int:
  num_frames = sum(clip.shape[0] for clip in clips)
  header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
            "shape": (num_frames, num_mel_bins)}

  def write(f):
    np.lib.format.write_array_header_1_0(f, header)
    f.writelines(clips)

  write_atomically(path, write)
  return num_frames


def convert_shard(task: ShardTask) -> dict:
  """Converts the clips of `task` and returns the shard's clip list (also written to disk)."""
  stored, wavs, labels, skipped, skip_details = [], [], [], [], []
  stats = (0, 0.0, 0.0)
  for wav, label in task.entries:
    path = pt_path(task.pt_dir, wav)
    try:
      fbank = pt_features.load_clip(path, task.num_mel_bins)
      stored.append(_to_stored(fbank, task.dtype, path))
    except pt_features.SkippedClip as e:
      skipped.append({"wav": wav, "reason": e.reason})
      skip_details.append(e.detail)
      continue
    stats = merge_stats(stats, _clip_stats(fbank))
    wavs.append(wav)
    labels.append(label)
  out_dir = Path(task.out_dir)
  num_frames = _write_frames(out_dir / shards.frames_name(task.shard), stored, task.dtype,
                             task.num_mel_bins)
  clip_list = {
      "format_version": shards.FORMAT_VERSION,
      "shard": task.shard,
      "plan_digest": task.plan_digest,
      "num_frames": num_frames,
      "clips": {"wav": wavs, "labels": labels, "length": [clip.shape[0] for clip in stored]},
      "skipped": skipped,
      "skip_details": skip_details,
      "stats": {"count": stats[0], "mean": stats[1], "m2": stats[2]},
  }
  encoded = json.dumps(clip_list).encode()
  write_atomically(out_dir / shards.clips_name(task.shard), lambda f: f.write(encoded))
  return clip_list


def finished_shard(task: ShardTask) -> dict | None:
  """Returns the clip list of the shard if an earlier run finished it with the same plan."""
  out_dir = Path(task.out_dir)
  try:
    clip_list = json.loads((out_dir / shards.clips_name(task.shard)).read_text())
    if clip_list.get("plan_digest") != task.plan_digest:
      return None
    frames_path = out_dir / shards.frames_name(task.shard)
    shape, dtype, data_offset = shards.read_npy_header(frames_path)
    expected_shape = (clip_list["num_frames"], task.num_mel_bins)
    expected_size = data_offset + clip_list["num_frames"] * task.num_mel_bins * dtype.itemsize
    if (shape != expected_shape or dtype != np.dtype(task.dtype)
        or os.path.getsize(frames_path) != expected_size):
      return None
    return clip_list
  except (OSError, ValueError, KeyError, TypeError):
    return None
