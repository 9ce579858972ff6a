"""Grain input pipelines over converted shards: training batches and one-pass evaluation.

A pipeline is a Grain MapDataset of batch numbers mapped to whole batches: the batch's clip
indices follow from the batch number alone (per-epoch permutation from the seed, this
process's rows of the global batch), and the batch is assembled with one positioned read
and one vectorised crop/pad/normalise per clip. Elements are therefore independent, so Grain's
thread and process prefetching parallelise them and the iterator state is just a position.

Preprocessing is SPEC section 1: clips longer than `target_length` keep their first frames
(or a random window with `random_crop`), shorter ones are padded at the end with zeros, then
x = (fbank - mean) / (2 * std), all in float32.
"""

import sys
import threading

import grain
import numpy as np

from ssast_jax.data import shards as shards_lib


def _manifest_of(shards_dir_or_manifest) -> dict:
  if isinstance(shards_dir_or_manifest, dict):
    return shards_dir_or_manifest
  return shards_lib.read_manifest(shards_dir_or_manifest)


def steps_per_epoch(shards_dir_or_manifest, batch_size: int) -> int:
  """Training batches per epoch for a global `batch_size` (the last partial batch dropped)."""
  return _manifest_of(shards_dir_or_manifest)["num_clips"] // batch_size


def num_eval_batches(shards_dir_or_manifest, batch_size: int) -> int:
  """Evaluation batches (each process yields this many) for a global `batch_size`."""
  return -(-_manifest_of(shards_dir_or_manifest)["num_clips"] // batch_size)


def _local_batch_size(batch_size: int, process_index: int, process_count: int) -> int:
  if batch_size < 1 or process_count < 1 or batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} must be a positive multiple of process_count "
                     f"{process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  return batch_size // process_count


class BatchAssembler:
  """Crops/pads clips to `target_length` and normalises them into a float32 batch."""

  def __init__(self, features: shards_lib.ShardedFeatures, target_length: int, mean: float,
               std: float):
    if target_length < 1 or not std > 0:
      raise ValueError(f"need target_length >= 1 and std > 0, got {target_length}, {std}")
    self.features = features
    self.target_length = target_length
    self._mean = np.float32(mean)
    self._scale = np.float32(2 * std)
    self._pad_value = (np.float32(0) - self._mean) / self._scale
    if features.dtype == np.float16:
      # Every float16 value, normalised exactly as (float32(x) - mean) / (2 * std) would be.
      table = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
      with np.errstate(invalid="ignore"):  # inf - inf for the infinities, never stored
        self._normalised = (table - self._mean) / self._scale
    self._scratch = threading.local()

  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_scratch"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._scratch = threading.local()

  def _float16_buffer(self, size: int) -> np.ndarray:
    buffer = getattr(self._scratch, "buffer", None)
    if buffer is None or buffer.size < size:
      buffer = self._scratch.buffer = np.empty(size, np.uint16)
    return buffer[:size]

  def __call__(self, clips: np.ndarray, starts: np.ndarray,
               counts: np.ndarray) -> np.ndarray:
    """Batch row b holds frames starts[b] .. starts[b] + counts[b] - 1 of clip clips[b],
    then padding; counts[b] == 0 gives a row of padding only."""
    num_bins = self.features.num_mel_bins
    batch = np.empty((len(clips), self.target_length, num_bins), np.float32)
    for row, clip, start, count in zip(batch, clips, starts, counts):
      frames = row[:count]
      if count and self.features.dtype == np.float16:
        stored = self._float16_buffer(count * num_bins)
        self.features.read_frames(clip, start, stored)
        np.take(self._normalised, stored, out=frames.reshape(-1), mode="wrap")
      elif count:
        self.features.read_frames(clip, start, frames)
        np.subtract(frames, self._mean, out=frames)
        np.divide(frames, self._scale, out=frames)
      row[count:] = self._pad_value
    return batch


def _with_targets(batch: dict, targets, clips: np.ndarray) -> dict:
  """`batch` plus "labels", the rows `clips` of the per-clip `targets`, when given."""
  if targets is not None:
    batch["labels"] = targets[clips]
  return batch


class _TrainBatch:
  """Maps a global batch number to this process's rows of that training batch."""

  def __init__(self, assembler: BatchAssembler, *, global_batch: int, local_batch: int,
               process_index: int, seed: int, random_crop: bool, targets=None,
               sample_weights=None):
    self.assembler = assembler
    self.targets = targets
    self.probabilities = (None if sample_weights is None
                          else np.asarray(sample_weights, np.float64) / np.sum(sample_weights))
    self.global_batch = global_batch
    self.local_batch = local_batch
    self.process_index = process_index
    self.seed = seed
    self.random_crop = random_crop
    self.num_clips = len(assembler.features)
    self.steps_per_epoch = self.num_clips // global_batch
    self._order = (None, None)  # (epoch, permutation), recomputed once per epoch

  def _permutation(self, epoch: int) -> np.ndarray:
    cached_epoch, order = self._order
    if cached_epoch != epoch:
      rng = np.random.default_rng([self.seed, 0, epoch])
      if self.probabilities is None:
        order = rng.permutation(self.num_clips)
      else:  # torch's WeightedRandomSampler(weights, num_clips, replacement=True)
        order = rng.choice(self.num_clips, self.num_clips, replace=True, p=self.probabilities)
      self._order = (epoch, order)
    return order

  def _crop_starts(self, epoch: int, clips: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    target = self.assembler.target_length
    starts = np.zeros(len(clips), np.int64)
    if self.random_crop:
      for b in np.flatnonzero(lengths > target):
        rng = np.random.default_rng([self.seed, 1, epoch, int(clips[b])])
        starts[b] = rng.integers(0, lengths[b] - target + 1)
    return starts

  def __call__(self, batch_number: int) -> dict:
    epoch, step = divmod(int(batch_number), self.steps_per_epoch)
    first = step * self.global_batch + self.process_index * self.local_batch
    clips = self._permutation(epoch)[first:first + self.local_batch]
    lengths = np.asarray(self.assembler.features.lengths[clips])
    counts = np.minimum(lengths, self.assembler.target_length)
    starts = self._crop_starts(epoch, clips, lengths)
    return _with_targets({"fbank": self.assembler(clips, starts, counts)}, self.targets,
                         clips)


class _EvalBatch:
  """Maps a batch number to this process's rows of that evaluation batch (padded at the end)."""

  def __init__(self, assembler: BatchAssembler, *, global_batch: int, local_batch: int,
               process_index: int, targets=None):
    self.assembler = assembler
    self.targets = targets
    self.global_batch = global_batch
    self.local_batch = local_batch
    self.process_index = process_index

  def __call__(self, batch_number: int) -> dict:
    features = self.assembler.features
    first = int(batch_number) * self.global_batch + self.process_index * self.local_batch
    positions = np.arange(first, first + self.local_batch)
    valid = positions < len(features)
    clips = np.where(valid, positions, 0)
    counts = np.where(valid, np.minimum(np.asarray(features.lengths[clips]),
                                        self.assembler.target_length), 0)
    batch = {"fbank": self.assembler(clips, np.zeros_like(clips), counts), "valid": valid}
    return _with_targets(batch, self.targets, clips)


class _CheckedStateIterDataset(grain.IterDataset):
  """Records the loader's settings in the iterator state and refuses restoring a state saved
  with other settings (a different worker count silently changes the batch order)."""

  def __init__(self, parent: grain.IterDataset, settings: dict):
    super().__init__(parent)
    self._settings = settings

  def __iter__(self):
    return _CheckedStateIterator(self._parent.__iter__(), self._settings)

  def __str__(self):
    return f"CheckedStateIterDataset({self._settings})"


class _CheckedStateIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, settings: dict):
    super().__init__(parent)
    self._settings = settings

  def __next__(self):
    return next(self._parent)

  def get_state(self) -> dict:
    return {"loader": dict(self._settings), "pipeline": self._parent.get_state()}

  def set_state(self, state: dict) -> None:
    saved = state.get("loader", {}) if isinstance(state, dict) else {}
    differing = sorted(k for k in self._settings if saved.get(k) != self._settings[k])
    if differing:
      details = ", ".join(f"{k}={saved.get(k)!r} (now {self._settings[k]!r})"
                          for k in differing)
      raise ValueError(f"cannot restore the data iterator: its state was saved with {details}")
    self._parent.set_state(state["pipeline"])

  def __str__(self):
    return "CheckedStateIterator"


def _iterate(batches: grain.MapDataset, settings: dict, worker_count: int, num_threads: int,
             prefetch_buffer_size: int) -> grain.DatasetIterator:
  if worker_count < 0 or num_threads < 0 or prefetch_buffer_size < 0:
    raise ValueError("worker_count, num_threads and prefetch_buffer_size must be >= 0")
  dataset = batches.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size))
  if worker_count > 0:
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=max(1, prefetch_buffer_size)))
  return iter(_CheckedStateIterDataset(dataset, settings))


def train_loader(shards_dir, *, batch_size: int, target_length: int, mean: float, std: float,
                 seed: int, num_epochs: int | None = None, process_index: int = 0,
                 process_count: int = 1, worker_count: int = 0, random_crop: bool = False,
                 prefetch_buffer_size: int = 4, num_threads: int = 1,
                 targets: np.ndarray | None = None,
                 sample_weights: np.ndarray | None = None) -> grain.DatasetIterator:
  """Iterator over training batches {"fbank": float32 (batch_size // process_count, T, F)}.

  Each epoch is a fresh permutation of all clips from `seed`; global batch k of an epoch is
  clips k * batch_size ... (k + 1) * batch_size - 1 of it, of which this process takes its
  contiguous share; the incomplete last batch is dropped. `num_epochs=None` repeats forever.
  Batches are assembled ahead by `num_threads` threads (one by default: the float16 path holds
  the GIL, so more threads only contend), in `worker_count` processes if that is > 0 (each
  batch then crosses to this process through shared memory). `get_state()`/`set_state()`
  save and restore the position exactly; a state only restores into a loader with the same
  batch size, seed, process layout and worker count. With `targets` (one row per clip,
  e.g. fine-tuning's multi-hot labels) each batch also holds "labels", its clips' rows.
  With `sample_weights` (one non-negative weight per clip) an epoch is instead as many
  clips drawn with replacement with probabilities proportional to the weights (balanced
  sampling).
  """
  local_batch = _local_batch_size(batch_size, process_index, process_count)
  features = shards_lib.ShardedFeatures(shards_dir)
  if len(features) < batch_size:
    raise ValueError(f"{shards_dir} holds {len(features)} clips, fewer than one batch of "
                     f"{batch_size}")
  make_batch = _TrainBatch(BatchAssembler(features, target_length, mean, std),
                           global_batch=batch_size, local_batch=local_batch,
                           process_index=process_index, seed=seed, random_crop=random_crop,
                           targets=targets, sample_weights=sample_weights)
  if num_epochs is None:
    num_batches = sys.maxsize
  else:
    num_batches = make_batch.steps_per_epoch * num_epochs
  settings = {"kind": "train", "num_clips": len(features), "batch_size": batch_size,
              "seed": seed, "process_index": process_index, "process_count": process_count,
              "worker_count": worker_count}
  return _iterate(grain.MapDataset.range(num_batches).map(make_batch), settings,
                  worker_count, num_threads, prefetch_buffer_size)


def eval_loader(shards_dir, *, batch_size: int, target_length: int, mean: float, std: float,
                process_index: int = 0, process_count: int = 1, worker_count: int = 0,
                prefetch_buffer_size: int = 4, num_threads: int = 1,
                targets: np.ndarray | None = None) -> grain.DatasetIterator:
  """Iterator over the whole set once, in order: {"fbank": float32 (B_local, T, F),
  "valid": bool (B_local,)} with B_local = batch_size // process_count.

  Global batch k holds clips k * batch_size ... (k + 1) * batch_size - 1; rows past the last
  clip are padding with valid=False. Every process yields `num_eval_batches` batches, and
  every clip is in exactly one valid row across all processes. With `targets` batches
  also hold "labels" (padding rows repeat clip 0's), as in `train_loader`.
  """
  local_batch = _local_batch_size(batch_size, process_index, process_count)
  features = shards_lib.ShardedFeatures(shards_dir)
  make_batch = _EvalBatch(BatchAssembler(features, target_length, mean, std),
                          global_batch=batch_size, local_batch=local_batch,
                          process_index=process_index, targets=targets)
  settings = {"kind": "eval", "num_clips": len(features), "batch_size": batch_size,
              "process_index": process_index, "process_count": process_count,
              "worker_count": worker_count}
  num_batches = num_eval_batches(features.manifest, batch_size)
  return _iterate(grain.MapDataset.range(num_batches).map(make_batch), settings,
                  worker_count, num_threads, prefetch_buffer_size)
