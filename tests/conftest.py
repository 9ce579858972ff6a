"""Shared fixtures: the reference produced by the original PyTorch SSAST."""

import json
import pathlib

import numpy as np
import pytest

from ssast_jax import host_memory

host_memory.reuse_freed_memory()  # as the entry points do, before JAX's CPU client starts

DATA = pathlib.Path(__file__).parent / 'data'


@pytest.fixture(scope='session')
def reference():
  """(checkpoint path, npz arrays, json metadata) of reference/tiny2_patch."""
  return (DATA / 'tiny2_patch.pth', dict(np.load(DATA / 'tiny2_patch.npz')),
          json.loads((DATA / 'tiny2_patch.json').read_text()))
