"""Shared fixtures: the reference produced by the original PyTorch SSAST; the compilation
cache of the test session."""

import atexit
import json
import os
import pathlib
import shutil
import tempfile

# The tests compile the same small programs many times, in this process and in the
# `main.py` subprocesses (which inherit the variable): a persistent compilation cache for
# this worker's session compiles each once. Set before JAX is imported, which reads it.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='ssast_jax_tests_cache_')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)

# The tests run on the CPU; the compile-only TPU and CUDA backends (requirements-compile.txt)
# must not try to start runtimes that this machine lacks.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import numpy as np  # noqa: E402
import pytest  # noqa: E402

DATA = pathlib.Path(__file__).parent / 'data'


@pytest.fixture(scope='session')
def reference():
  """(checkpoint path, npz arrays, json metadata) of reference/tiny2_patch."""
  return (DATA / 'tiny2_patch.pth', dict(np.load(DATA / 'tiny2_patch.npz')),
          json.loads((DATA / 'tiny2_patch.json').read_text()))
