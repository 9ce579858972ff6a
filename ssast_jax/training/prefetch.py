"""Batches placed on devices ahead of the step, so input overlaps compute.

A background thread reads the host iterator, records the iterator state after each batch
(the state to checkpoint once that batch has been trained on) and transfers the batch into
a global array sharded along the batch. The training loop only takes finished batches.
"""

from __future__ import annotations

import queue
import threading
import time

import jax

_END = object()


class DevicePrefetcher:
  """Iterates `(device_arrays, iterator_state_after_them, wait_ms)` over a Grain iterator
  yielding dicts of per-process batches (`{'fbank': (B_local, T, F), ...}`): one global
  array per name in `keys`, in that order; `depth` batches are kept ready."""

  def __init__(self, iterator, sharding, keys=('fbank',), depth: int = 2):
    self._iterator = iterator
    self._sharding = sharding
    self._keys = tuple(keys)
    self._queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._fill, daemon=True, name='device-prefetch')
    self._thread.start()

  def _fill(self):
    try:
      for batch in self._iterator:
        state = self._iterator.get_state()
        arrays = tuple(jax.make_array_from_process_local_data(self._sharding, batch[key])
                       for key in self._keys)
        while not self._stop.is_set():
          try:
            self._queue.put((arrays, state), timeout=0.1)
            break
          except queue.Full:
            continue
        if self._stop.is_set():
          return
      self._queue.put(_END)
    except BaseException as e:  # surfaced in the training thread by __next__
      self._queue.put(e)

  def __iter__(self):
    return self

  def __next__(self):
    start = time.perf_counter()
    item = self._queue.get()
    waited_ms = (time.perf_counter() - start) * 1e3
    if item is _END:
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    arrays, state = item
    return arrays, state, waited_ms

  def close(self):
    self._stop.set()
    self._thread.join(timeout=10)
