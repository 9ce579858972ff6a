"""Shared fixtures: the reference produced by the original PyTorch SSAST."""

import json
import pathlib

import numpy as np
import pytest

DATA = pathlib.Path(__file__).parent / 'data'


@pytest.fixture(scope='session')
def reference():
  """(checkpoint path, npz arrays, json metadata) of reference/tiny2_patch."""
  return (DATA / 'tiny2_patch.pth', dict(np.load(DATA / 'tiny2_patch.npz')),
          json.loads((DATA / 'tiny2_patch.json').read_text()))
