"""glibc's allocator tuned for training on a CPU host: the one CPU-only setting.

XLA's CPU runtime allocates a step's large temporaries with `malloc` and frees them when the
step ends. With glibc's defaults those blocks are fresh `mmap`s given back with `munmap`,
freed heap tops are trimmed, and XLA's worker threads each get an arena, so every step pays
again for page faults on zeroed pages. `GLIBC_TUNABLES=glibc.malloc.arena_max=1:
glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295` keeps freed memory in one
heap for the next step. glibc reads tunables only at process start (the same settings made
later with `mallopt` did not speed the step up here), so `restart_with_tuned_allocator`
re-executes the program once with them set, before JAX starts.

Switch: `--tune_cpu_allocator` of `main.py` and `benchmarks/step.py` (default true). It acts
only on Linux with glibc, when JAX will run on the CPU (`JAX_PLATFORMS` starts with `cpu`, or
it is unset and no GPU/TPU plugin is installed), and never overrides a `GLIBC_TUNABLES` that
already sets malloc tunables. Its cost: the process's resident memory does not shrink after a
peak. Measured on the 2-core AMD EPYC machine, 2026-12-02, the default training step (tiny
model, batch 8, 1024 x 128, joint, two passes; `benchmarks/step.py`, processes with and
without it in turns, 4 rounds): 4.24-4.73 s without, 2.45-3.07 s with, 1.5x
(docs/performance.md).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import sys

TUNABLES = ('glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:'
            'glibc.malloc.trim_threshold=4294967295')


def _jax_runs_on_cpu() -> bool:
  """Whether JAX's default backend will be the CPU, decided without starting JAX."""
  platforms = os.environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip() == 'cpu'
  if importlib.metadata.entry_points(group='jax_plugins'):
    return False  # a GPU or TPU PJRT plugin (jax[cuda12], jax[tpu]) is installed
  return importlib.util.find_spec('libtpu') is None


def wanted() -> bool:
  """Whether this process should run with TUNABLES and does not yet."""
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return False
  if 'glibc.malloc.' in os.environ.get('GLIBC_TUNABLES', ''):
    return False  # already set: by the restart below, or by the user
  return _jax_runs_on_cpu()


def restart_with_tuned_allocator() -> None:
  """Replaces this process by the same command with TUNABLES set, where `wanted()`.

  Call it first thing in a program's main, before JAX or any thread starts: the new process
  runs the same `sys.argv` (same PID, so job schedulers see no change).
  """
  if not wanted():
    return
  existing = os.environ.get('GLIBC_TUNABLES', '')
  os.environ['GLIBC_TUNABLES'] = f'{existing}:{TUNABLES}' if existing else TUNABLES
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable] + sys.orig_argv[1:])
