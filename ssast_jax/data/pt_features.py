"""Reading one clip's fbank out of a torch-saved `.pt` file.

The converter reads hundreds of thousands of small files. Importing torch costs about a second
per process, so the layout `torch.save` writes (a zip archive holding a pickled tensor, or a
dict of tensors) is decoded here with a restricted unpickler that builds numpy arrays and
allows nothing but tensor reconstruction. Anything else (legacy format, parameters, unusual
storages) falls back to `torch.load(weights_only=True)`.

Kept by the project rule (only if the converter is at least 1.5x faster with it than with
`torch.load(weights_only=True)` alone, 10,000 clips, 2 workers, measured paired):
`python benchmarks/convert_pt.py --data DIR --rounds 15`, which times `python -m
ssast_jax.data.convert --json J --pt-dir D --out OUT --workers 2 --dtype float16` on 10,000
torch-saved float32 (998..1024, 128) clips in turns, measured it 1.62x faster (median of the
15 per-round ratios; 1.73x over the 7 rounds no other process ran: 3.1-3.5 s against 5.0-6.0 s
then) on AMD EPYC, 2 cores, 2026-12-02; see benchmarks/results/convert_pt.json.
"""

import collections
import dataclasses
import io
import pickle
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np

SKIP_REASONS = ("missing", "unreadable", "bad_shape", "non_finite")
FLOAT16_LIMIT = 65520.0  # float32 values at or beyond this magnitude round to inf in float16.

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "DoubleStorage": np.dtype("<f8"),
    "BFloat16Storage": np.dtype("<u2"),  # widened to float32 after striding
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTO = b"\x80"
_LOCAL_HEADER = struct.Struct("<4s22xHH")


class SkippedClip(Exception):
  """A clip that cannot be converted; `reason` is one of SKIP_REASONS."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason
    self.detail = detail


class _NeedsTorch(Exception):
  """The archive uses a construct only torch.load can decode."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
  name: str


@dataclasses.dataclass(frozen=True)
class _Bfloat16:
  """Marks a bfloat16 tensor held as its raw uint16 bits."""
  bits: np.ndarray


class _TensorUnpickler(pickle.Unpickler):
  """Unpickles `data.pkl` of a torch zip archive, building numpy arrays for tensors."""

  def __init__(self, archive: bytes, records: dict[str, tuple[int, int]], pickled: bytes):
    super().__init__(io.BytesIO(pickled))
    self._archive = archive
    self._records = records

  def find_class(self, module, name):
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_array
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    raise _NeedsTorch(f"{module}.{name}")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise _NeedsTorch(f"persistent id {pid!r}")
    _, storage_type, key, _, numel = pid
    dtype = _STORAGE_DTYPES[storage_type.name]
    offset, size = self._records.get(f"data/{key}", (0, -1))
    if size != numel * dtype.itemsize:
      raise pickle.UnpicklingError(f"storage {key} holds {size} bytes, expected {numel} values")
    storage = np.frombuffer(self._archive, dtype, count=numel, offset=offset)
    return _Bfloat16(storage) if storage_type.name == "BFloat16Storage" else storage


def _rebuild_array(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                   metadata=None):
  """numpy counterpart of torch._utils._rebuild_tensor_v2 (a strided view of a storage)."""
  del requires_grad
  if backward_hooks or metadata:
    raise _NeedsTorch("tensor with hooks or metadata")
  bits = storage.bits if isinstance(storage, _Bfloat16) else storage
  size, stride = tuple(size), tuple(stride)
  if len(size) != len(stride) or min(size + stride + (storage_offset,), default=0) < 0:
    raise pickle.UnpicklingError("tensor geometry is invalid")
  if 0 not in size:
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= bits.size:
      raise pickle.UnpicklingError("tensor extends past its storage")
  view = np.lib.stride_tricks.as_strided(
      bits[storage_offset:], shape=size,
      strides=tuple(s * bits.itemsize for s in stride), writeable=False)
  if isinstance(storage, _Bfloat16):
    return (view.astype(np.uint32) << 16).view(np.float32)
  return view


def _zip_records(archive: bytes) -> dict[str, tuple[int, int]]:
  """Maps record names (without the archive's top folder) to (data offset, size)."""
  records = {}
  with zipfile.ZipFile(io.BytesIO(archive)) as zf:
    for info in zf.infolist():
      if info.compress_type != zipfile.ZIP_STORED:
        raise _NeedsTorch("compressed record")
      magic, name_len, extra_len = _LOCAL_HEADER.unpack_from(archive, info.header_offset)
      if magic != _ZIP_MAGIC:
        raise zipfile.BadZipFile(f"bad local header for {info.filename}")
      start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
      if start + info.file_size > len(archive):
        raise zipfile.BadZipFile(f"record {info.filename} is truncated")
      records[info.filename.partition("/")[2]] = (start, info.file_size)
  return records


def _load_zip_archive(archive: bytes):
  records = _zip_records(archive)
  if "data.pkl" not in records:
    raise zipfile.BadZipFile("no data.pkl record")
  byteorder = records.get("byteorder")
  if byteorder and archive[byteorder[0]:byteorder[0] + byteorder[1]] != b"little":
    raise _NeedsTorch("big-endian archive")
  start, size = records["data.pkl"]
  return _TensorUnpickler(archive, records, archive[start:start + size]).load()


def _torch_load(path: Path):
  """Fallback for archives the restricted decoder does not handle; tensors become numpy."""
  import torch  # pylint: disable=import-outside-toplevel

  def to_numpy(value):
    if isinstance(value, torch.Tensor):
      value = value.detach().cpu()
      if value.dtype == torch.bfloat16:
        value = value.float()
      return value.numpy()
    return value

  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, dict):
    return {key: to_numpy(value) for key, value in obj.items()}
  return to_numpy(obj)


def load_pt(path: Path):
  """Returns the object saved in `path` with tensors as numpy arrays.

  Raises SkippedClip("missing") if there is no file and SkippedClip("unreadable") if it is
  not a loadable torch file.
  """
  try:
    with open(path, "rb") as f:
      archive = f.read()
  except FileNotFoundError:
    raise SkippedClip("missing", f"{path} does not exist") from None
  except OSError as e:
    raise SkippedClip("unreadable", f"{path}: {e.strerror}") from None
  try:
    if archive.startswith(_ZIP_MAGIC):
      try:
        return _load_zip_archive(archive)
      except _NeedsTorch:
        return _torch_load(path)
    if archive.startswith(_PICKLE_PROTO):  # torch's legacy (pre-1.6) format
      return _torch_load(path)
  except Exception as e:  # pylint: disable=broad-except
    first_line = str(e).strip().partition("\n")[0]
    raise SkippedClip("unreadable", f"{path}: {type(e).__name__}: {first_line}") from None
  raise SkippedClip("unreadable", f"{path} is not a torch-saved file")


def _select_fbank(obj, path: Path) -> np.ndarray:
  if isinstance(obj, dict):
    if "fbank" in obj:
      obj = obj["fbank"]
    else:
      arrays = [value for value in obj.values() if isinstance(value, np.ndarray)]
      if len(arrays) != 1:
        raise SkippedClip("bad_shape", f"{path} holds a dict with {len(arrays)} tensors and "
                          "no 'fbank' key")
      obj = arrays[0]
  if not isinstance(obj, np.ndarray):
    raise SkippedClip("bad_shape", f"{path} holds a {type(obj).__name__}, not a tensor")
  return obj


def load_clip(path: Path, num_mel_bins: int | None) -> np.ndarray:
  """Returns the fbank of `path` as a finite, C-contiguous float32 (T, F) array.

  Accepts a (T, F) or (1, T, F) floating tensor, or a dict holding one tensor or key 'fbank'.
  F must equal `num_mel_bins` when that is given. Raises SkippedClip naming the reason.
  """
  fbank = _select_fbank(load_pt(path), path)
  if fbank.dtype.kind != "f":
    raise SkippedClip("bad_shape", f"{path} holds a {fbank.dtype} tensor, not a float one")
  if fbank.ndim == 3 and fbank.shape[0] == 1:
    fbank = fbank[0]
  if fbank.ndim != 2 or 0 in fbank.shape:
    raise SkippedClip("bad_shape", f"{path} holds shape {fbank.shape}, expected (T, F) "
                      "or (1, T, F)")
  if num_mel_bins is not None and fbank.shape[1] != num_mel_bins:
    raise SkippedClip("bad_shape", f"{path} has {fbank.shape[1]} mel bins, expected "
                      f"{num_mel_bins}")
  fbank = np.ascontiguousarray(fbank, dtype=np.float32)
  if not np.isfinite(fbank.sum()) and not np.isfinite(fbank).all():
    raise SkippedClip("non_finite", f"{path} contains NaN or infinite values")
  return fbank
