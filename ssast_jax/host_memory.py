"""Host memory: keep what the CPU runtime frees for its next step.

XLA:CPU allocates a compiled program's temporaries (1.4 GB for the tiny model's batch-8
training step) with `malloc` at each execution and frees them at its end. glibc serves
allocations that large with `mmap` (an arena of one of XLA's worker threads cannot grow
past 64 MB, so a higher mmap threshold alone does not help) and returns them to the kernel
on `free`; the next step then faults every page in again and the kernel zeroes it. On the
2-core reference machine that is 358-368k page faults per step, system time 0.42-0.46 of
the wall time, and a fifth of the step time (README, Performance).

`reuse_freed_memory` makes glibc keep freed memory instead: one arena for all threads, no
`mmap` for large blocks, no trimming of the heap. It must run before JAX creates its CPU
client (its threads pick their arena at their first allocation), so the entry points call
it first. The process then keeps its peak heap for its lifetime, which a training or
benchmark process reaches on its first step anyway. Accelerator memory is not affected.
"""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt parameters, glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


def reuse_freed_memory() -> bool:
  """Sets glibc's malloc to keep freed memory in the process; True if it was set.

  Does nothing off glibc, or when GLIBC_TUNABLES already sets a `glibc.malloc` tunable
  (the user's own allocator settings win, and this is also how to opt out, e.g.
  `GLIBC_TUNABLES=glibc.malloc.arena_max=8`).
  """
  if platform.libc_ver()[0] != 'glibc' or 'glibc.malloc' in os.environ.get('GLIBC_TUNABLES', ''):
    return False
  libc = ctypes.CDLL(None)
  # -1 as M_TRIM_THRESHOLD's size_t is "never trim".
  return all(libc.mallopt(param, value) == 1 for param, value in
             ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
