"""The on-disk shard format, `ShardedFeatures` (its random-access reader) and `check_shards`.

A converted dataset is a directory holding
  manifest.json                 what is stored (see `ssast_jax.data.convert`), written last;
  index.npy                     int64 (num_clips, 3): shard, first frame in the shard, length;
  shard-NNNNN.frames.npy        the frames of many clips concatenated, (total_frames, F);
  shard-NNNNN.clips.json        the shard's clip `wav` ids, labels and lengths.
Clips are read with positioned reads into fresh arrays rather than through memory maps, so
the reading process's RSS stays flat however much of the dataset it touches. The manifest
records each file's size and sha256, which `check_shards` checks before training starts, so
that a truncated or damaged file is found then rather than when first read, hours later.
"""

import collections
import hashlib
import json
import math
import os
import shlex
import threading
from pathlib import Path
from typing import NamedTuple

import numpy as np

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
INDEX_NAME = "index.npy"
STORED_DTYPES = ("float16", "float32")
_MAX_OPEN_SHARDS = 64
_MAX_CACHED_CLIP_LISTS = 8


class ManifestError(Exception):
  """The shard directory is missing, incomplete or inconsistent."""


def frames_name(shard: int) -> str:
  return f"shard-{shard:05d}.frames.npy"


def clips_name(shard: int) -> str:
  return f"shard-{shard:05d}.clips.json"


def read_npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
  """Returns (shape, dtype, data offset) of a C-order .npy file without reading its data."""
  with open(path, "rb") as f:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
    else:
      shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
    if fortran_order:
      raise ValueError("array is stored in Fortran order")
    return shape, dtype, f.tell()


def read_manifest(shards_dir) -> dict:
  """Reads and checks `<shards_dir>/manifest.json`; raises ManifestError naming the problem."""
  path = Path(shards_dir) / MANIFEST_NAME
  try:
    manifest = json.loads(path.read_text())
  except FileNotFoundError:
    raise ManifestError(f"{path} does not exist; convert the dataset first "
                        "(python -m ssast_jax.data.convert)") from None
  except (OSError, ValueError) as e:
    raise ManifestError(f"{path} is not readable JSON: {e}") from None
  if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
    raise ManifestError(f"{path} has format_version {manifest.get('format_version')!r} "
                        f"(this code reads {FORMAT_VERSION})")
  for key in ("dtype", "num_mel_bins", "num_clips", "shards", "index_file", "mean", "std"):
    if key not in manifest:
      raise ManifestError(f"{path} lacks the key {key!r}")
  if manifest["dtype"] not in STORED_DTYPES:
    raise ManifestError(f"{path} has dtype {manifest['dtype']!r}, expected one of "
                        f"{STORED_DTYPES}")
  return manifest


class _StoredFile(NamedTuple):
  """A file of a converted directory and what the manifest says about it (None: not
  recorded; manifests written before content hashes record no size or hash)."""
  name: str
  size: int | None
  sha256: str | None
  npy_shape: tuple[int, int] | None  # for .npy files, to size them from their header
  npy_dtype: np.dtype | None


def _stored_files(manifest: dict) -> list[_StoredFile]:
  files = [_StoredFile(manifest["index_file"], manifest.get("index_bytes"),
                       manifest.get("index_sha256"), (manifest["num_clips"], 3),
                       np.dtype(np.int64))]
  for row in manifest["shards"]:
    files.append(_StoredFile(row["frames"], row.get("frames_bytes"), row.get("frames_sha256"),
                             (row["num_frames"], manifest["num_mel_bins"]),
                             np.dtype(manifest["dtype"])))
    files.append(_StoredFile(row["clips"], row.get("clips_bytes"), row.get("clips_sha256"),
                             None, None))
  return files


def _size_problem(path: Path, file: _StoredFile) -> str | None:
  """What is wrong with the size of `path` (stat only, or its .npy header when the manifest
  records no size), or None."""
  try:
    actual = os.stat(path).st_size
  except FileNotFoundError:
    return "missing"
  except OSError as e:
    return f"not readable: {e.strerror}"
  expected = file.size
  if expected is None:
    if file.npy_shape is None:
      return None
    try:
      shape, dtype, data_offset = read_npy_header(path)
    except (OSError, ValueError) as e:
      return f"not a readable .npy file: {e}"
    if shape != file.npy_shape or dtype != file.npy_dtype:
      return f"holds {dtype} {shape}, the manifest says {file.npy_dtype} {file.npy_shape}"
    expected = data_offset + math.prod(shape) * dtype.itemsize
  if actual < expected:
    return f"truncated: {actual} of {expected} bytes"
  if actual > expected:
    return f"{actual} bytes, expected {expected}"
  return None


def _content_problem(path: Path, file: _StoredFile) -> str | None:
  if file.sha256 is None:
    return None
  try:
    with open(path, "rb") as f:
      digest = hashlib.file_digest(f, "sha256").hexdigest()
  except OSError as e:
    return f"not readable: {e.strerror}"
  return "content hash mismatch" if digest != file.sha256 else None


def rebuild_command(manifest: dict, shards_dir) -> str:
  """The converter command that rebuilds `shards_dir` from the source and options its
  manifest records."""
  source, request = manifest.get("source") or {}, manifest.get("request") or {}
  words = ["python", "-m", "ssast_jax.data.convert", "--json", source.get("json") or "JSON"]
  if source.get("kind") == "audio":  # manifests before audio input record no kind: .pt
    words += ["--audio", "--audio-root", source.get("audio_root") or "AUDIO_ROOT"]
  else:
    words += ["--pt-dir", source.get("pt_dir") or "PT_DIR"]
  words += ["--out", str(Path(shards_dir).absolute()), "--dtype", manifest["dtype"]]
  for flag, value in (("--num-mel-bins", request.get("num_mel_bins")),
                      ("--clips-per-shard", request.get("clips_per_shard")),
                      ("--label-csv", source.get("label_csv"))):
    if value is not None:
      words += [flag, str(value)]
  return shlex.join(words + ["--overwrite"])


def check_shards(shards_dir, verify_content: bool = False) -> None:
  """Checks that every file of a converted directory is there, whole and, with
  `verify_content`, holds what was written, so that a damaged dataset is refused before
  training starts rather than when a batch first reads the bad file.

  By default only sizes are checked (one stat per file, against the sizes the manifest
  records, or for manifests without them the sizes the .npy headers imply). `verify_content`
  also reads every file and compares its sha256 with the manifest's. Raises ManifestError
  with one line naming the first bad file, what is wrong, and the command that rebuilds it.
  """
  shards_dir = Path(shards_dir)
  manifest = read_manifest(shards_dir)
  try:
    files = _stored_files(manifest)
  except (KeyError, TypeError, ValueError) as e:
    raise ManifestError(f"{shards_dir / MANIFEST_NAME} has a malformed file entry: "
                        f"{type(e).__name__}: {e}") from None
  checks = [_size_problem] + ([_content_problem] if verify_content else [])
  for check in checks:  # every size first: a truncated file is named before any hashing
    for file in files:
      problem = check(shards_dir / file.name, file)
      if problem:
        raise ManifestError(f"{shards_dir / file.name}: {problem}; rebuild with: "
                            f"{rebuild_command(manifest, shards_dir)}")


class ShardedFeatures:
  """Random access to the clips of a converted dataset.

  `ds[i]` is clip i as a (T_i, F) array in the stored dtype; `wav(i)` and `labels(i)` are its
  JSON fields. Shard files are opened on first use; the object pickles without open files so
  it can be sent to Grain worker processes.
  """

  def __init__(self, shards_dir):
    self.path = Path(shards_dir)
    self.manifest = read_manifest(self.path)
    self.dtype = np.dtype(self.manifest["dtype"])
    self.num_mel_bins = int(self.manifest["num_mel_bins"])
    self._shards = self.manifest["shards"]
    self._first_clip = np.cumsum([0] + [s["num_clips"] for s in self._shards])
    self._open_index()
    self._reset_caches()

  def _open_index(self):
    index_path = self.path / self.manifest["index_file"]
    try:
      self._index = np.load(index_path, mmap_mode="r")
    except (OSError, ValueError) as e:
      raise ManifestError(f"{index_path} is not readable: {e}") from None
    if self._index.shape != (self.manifest["num_clips"], 3):
      raise ManifestError(f"{index_path} has shape {self._index.shape}, expected "
                          f"({self.manifest['num_clips']}, 3)")

  def _reset_caches(self):
    self._lock = threading.Lock()
    self._open_shards = collections.OrderedDict()  # shard -> (file, data offset)
    self._clip_lists = collections.OrderedDict()  # shard -> (first clip, clips.json content)

  def __getstate__(self):
    state = dict(self.__dict__)
    for key in ("_index", "_lock", "_open_shards", "_clip_lists"):
      del state[key]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._open_index()
    self._reset_caches()

  def __len__(self) -> int:
    return self._index.shape[0]

  @property
  def lengths(self) -> np.ndarray:
    """Frames per clip, (num_clips,) int64."""
    return self._index[:, 2]

  def _check_index(self, i) -> int:
    i = int(i)
    if not -len(self) <= i < len(self):
      raise IndexError(f"clip {i} is out of range for {len(self)} clips")
    return i % len(self)

  def __getitem__(self, i) -> np.ndarray:
    i = self._check_index(i)
    out = np.empty((int(self._index[i, 2]), self.num_mel_bins), self.dtype)
    self.read_frames(i, 0, out)
    return out

  def read_frames(self, i: int, start: int, out: np.ndarray) -> None:
    """Fills the C-contiguous buffer `out` with the stored bytes of frames `start`,
    `start + 1`, ... of clip i (as many frames as `out` holds)."""
    shard, first, length = (int(v) for v in self._index[i])
    frame_bytes = self.num_mel_bins * self.dtype.itemsize
    if out.nbytes % frame_bytes or start < 0 or start + out.nbytes // frame_bytes > length:
      raise ValueError(f"cannot read {out.nbytes} bytes from frame {start} of clip {i} "
                       f"({length} frames)")
    file, data_offset = self._open(shard)
    position = data_offset + (first + start) * frame_bytes
    view = memoryview(out).cast("B")
    while view:
      done = os.preadv(file.fileno(), [view], position)
      if done == 0:
        raise ManifestError(f"{self.path / frames_name(shard)} is shorter than the manifest "
                            "says")
      view, position = view[done:], position + done

  def _open(self, shard: int):
    """Returns the open frames file of `shard` and the offset of its data."""
    with self._lock:
      if shard in self._open_shards:
        self._open_shards.move_to_end(shard)
        return self._open_shards[shard]
      path = self.path / self._shards[shard]["frames"]
      expected = (self._shards[shard]["num_frames"], self.num_mel_bins)
      try:
        shape, dtype, data_offset = read_npy_header(path)
      except (OSError, ValueError) as e:
        raise ManifestError(f"{path} is not a readable .npy file: {e}") from None
      if shape != expected or dtype != self.dtype:
        raise ManifestError(f"{path} holds {dtype} {shape}, the manifest says "
                            f"{self.dtype} {expected}")
      self._open_shards[shard] = (open(path, "rb", buffering=0), data_offset)
      if len(self._open_shards) > _MAX_OPEN_SHARDS:
        self._open_shards.popitem(last=False)[1][0].close()
      return self._open_shards[shard]

  def _clip_fields(self, i: int) -> tuple[dict, int]:
    """Returns the clips.json content of clip i's shard and i's position in it."""
    i = self._check_index(i)
    shard = int(self._index[i, 0])
    with self._lock:
      if shard not in self._clip_lists:
        path = self.path / self._shards[shard]["clips"]
        try:
          clips = json.loads(path.read_text())["clips"]
        except (OSError, ValueError, KeyError) as e:
          raise ManifestError(f"{path} is not a readable clip list: {e}") from None
        self._clip_lists[shard] = (int(self._first_clip[shard]), clips)
        if len(self._clip_lists) > _MAX_CACHED_CLIP_LISTS:
          self._clip_lists.popitem(last=False)
      first_clip, clips = self._clip_lists[shard]
    return clips, i - first_clip

  def wav(self, i: int) -> str:
    """The `wav` field of clip i in the source JSON."""
    clips, j = self._clip_fields(i)
    return clips["wav"][j]

  def labels(self, i: int) -> str:
    """The `labels` field of clip i in the source JSON (comma-separated label ids)."""
    clips, j = self._clip_fields(i)
    return clips["labels"][j]

  def close(self) -> None:
    """Closes the open shard files now rather than when the object is collected (they reopen
    on the next read)."""
    with self._lock:
      for file, _ in self._open_shards.values():
        file.close()
      self._open_shards.clear()
