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

# The tests run on the CPU, with the compile-only TPU and CUDA backends of
# requirements-compile.txt on this process's path (tests/test_plan.py), not the main.py
# subprocesses'.
from ssast_jax import accelerators  # noqa: E402

accelerators.use_compile_backends()

import numpy as np  # noqa: E402
import pytest  # noqa: E402

DATA = pathlib.Path(__file__).parent / 'data'


@pytest.fixture(scope='session')
def reference():
  """(checkpoint path, npz arrays, json metadata) of reference/tiny2_patch."""
  return (DATA / 'tiny2_patch.pth', dict(np.load(DATA / 'tiny2_patch.npz')),
          json.loads((DATA / 'tiny2_patch.json').read_text()))
