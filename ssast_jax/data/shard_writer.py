"""Converting one planned shard: read or compute its clips' features, write it atomically;
and the pool of worker processes that does it.

Runs in converter worker processes. A shard is two files, written to hidden temporary names
and renamed into place frames first, clip list last: the clip list's presence (with the plan
digest it records) is what marks the shard as finished for a resumed run. Each file's size
and sha256 are taken from the bytes as they are written, so that the manifest can record
them (for `shards.check_shards`) without reading the output again: the frames file's in the
clip list, the clip list's in the returned `ConvertedShard`.
"""

import contextlib
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np

from ssast_jax.data import pt_features
from ssast_jax.data import shards
from ssast_jax.data import sources

# The environment spawned workers start with: one BLAS thread (see worker_pool).
WORKER_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@dataclasses.dataclass(frozen=True)
class ShardTask:
  """One shard of the conversion plan: which JSON entries go into it, and how."""
  shard: int
  entries: tuple[tuple[str, str], ...]  # (wav, labels) in JSON order
  source_kind: str  # sources.PT or sources.AUDIO
  source_root: str  # the .pt folder, or the folder relative audio paths start from
  out_dir: str
  dtype: str
  num_mel_bins: int
  plan_digest: str


@dataclasses.dataclass(frozen=True)
class ConvertedShard:
  """A finished shard: its clip list (the content of its clips file) and that file's digest."""
  clip_list: dict
  clips_bytes: int
  clips_sha256: str


@contextlib.contextmanager
def worker_pool(processes: int, start_method: str):
  """A pool of `processes` converter workers, or None (convert in the calling process) for 0.

  Workers started afresh ("spawn") load numpy with `WORKER_ENV`: one BLAS thread each, as
  each worker is one core's worth of work. That makes audio features independent of the
  number of workers and of cores (OpenBLAS's threaded product, used by the mel filters,
  rounds differently: 1 ulp in 1.5% of the values), and faster where the workers fill the
  cores (1.8x for 10 s audio clips with 2 workers on 2 cores, back to back with threaded
  BLAS). Forked workers keep the caller's BLAS as it is.
  """
  if processes == 0:
    yield None
    return
  saved = {name: os.environ.get(name) for name in WORKER_ENV}
  os.environ.update(WORKER_ENV)  # read by the workers as they start
  try:
    pool = multiprocessing.get_context(start_method).Pool(processes)
  finally:
    for name, value in saved.items():
      if value is None:
        del os.environ[name]
      else:
        os.environ[name] = value
  with pool:
    yield pool


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


def write_atomically(path: Path, chunks) -> tuple[int, str]:
  """Writes the bytes-like `chunks` to a hidden temporary file, renames it to `path` and
  returns the file's size and sha256. The temporary is named after the process so that a
  straggler of a killed run cannot write into it."""
  temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  digest, size = hashlib.sha256(), 0
  with open(temporary, "wb") as f:
    for chunk in chunks:
      f.write(chunk)
      digest.update(chunk)
      size += memoryview(chunk).nbytes
  os.replace(temporary, path)
  return size, digest.hexdigest()


def _npy_header(dtype: str, shape: tuple[int, int]) -> bytes:
  """The .npy (version 1.0) header of a C-order array, written ahead of its data."""
  buffer = io.BytesIO()
  np.lib.format.write_array_header_1_0(buffer, {
      "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
      "shape": shape})
  return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
  """`array` as the content of a .npy file."""
  buffer = io.BytesIO()
  np.save(buffer, array)
  return buffer.getvalue()


def convert_shard(task: ShardTask) -> ConvertedShard:
  """Converts the clips of `task` and returns the shard's clip list (also written to disk)."""
  stored, wavs, labels, skipped, skip_details = [], [], [], [], []
  stats = (0, 0.0, 0.0)
  for wav, label in task.entries:
    path = sources.clip_path(task.source_kind, task.source_root, wav)
    try:
      fbank = sources.load_clip(task.source_kind, path, task.num_mel_bins)
      stored.append(_to_stored(fbank, task.dtype, path))
    except pt_features.SkippedClip as e:
      skipped.append({"wav": wav, "reason": e.reason})
      skip_details.append(e.detail)
      continue
    stats = merge_stats(stats, _clip_stats(fbank))
    wavs.append(wav)
    labels.append(label)
  out_dir = Path(task.out_dir)
  num_frames = sum(clip.shape[0] for clip in stored)
  frames_bytes, frames_sha256 = write_atomically(
      out_dir / shards.frames_name(task.shard),
      [_npy_header(task.dtype, (num_frames, task.num_mel_bins)), *stored])
  clip_list = {
      "format_version": shards.FORMAT_VERSION,
      "shard": task.shard,
      "plan_digest": task.plan_digest,
      "num_frames": num_frames,
      "frames_bytes": frames_bytes,
      "frames_sha256": frames_sha256,
      "clips": {"wav": wavs, "labels": labels, "length": [clip.shape[0] for clip in stored]},
      "skipped": skipped,
      "skip_details": skip_details,
      "stats": {"count": stats[0], "mean": stats[1], "m2": stats[2]},
  }
  encoded = json.dumps(clip_list).encode()
  clips_bytes, clips_sha256 = write_atomically(out_dir / shards.clips_name(task.shard),
                                               [encoded])
  return ConvertedShard(clip_list, clips_bytes, clips_sha256)


def finished_shard(task: ShardTask) -> ConvertedShard | None:
  """Returns the shard if an earlier run finished it with the same plan (its frames file of
  the size the clip list records; its content is not re-read)."""
  out_dir = Path(task.out_dir)
  try:
    encoded = (out_dir / shards.clips_name(task.shard)).read_bytes()
    clip_list = json.loads(encoded)
    if clip_list.get("plan_digest") != task.plan_digest:
      return None
    frames_path = out_dir / shards.frames_name(task.shard)
    shape, dtype, _ = shards.read_npy_header(frames_path)
    if (shape != (clip_list["num_frames"], task.num_mel_bins) or dtype != np.dtype(task.dtype)
        or os.path.getsize(frames_path) != clip_list["frames_bytes"]):
      return None
    return ConvertedShard(clip_list, len(encoded), hashlib.sha256(encoded).hexdigest())
  except (OSError, ValueError, KeyError, TypeError):
    return None
