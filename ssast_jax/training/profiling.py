"""A `jax.profiler` trace of chosen training steps, for TensorBoard's or Perfetto's viewer.

The training trace goes to WORKDIR/profile (TensorBoard's `plugins/profile/RUN/*.xplane.pb`
layout); only process 0 traces.
"""

from __future__ import annotations

import os

import jax

PROFILE_DIR = 'profile'


class StepProfiler:
  """Traces training steps `first..last` of `steps` (numbered from 1, as logged), from
  before the first to the end of the last; `steps=None` or `enabled=False` traces nothing.
  """

  def __init__(self, steps: tuple[int, int] | None, workdir: str, enabled: bool = True):
    self._steps = steps if enabled else None
    self.log_dir = os.path.join(workdir, PROFILE_DIR)
    self._tracing = self._traced = False

  def before_step(self, number: int) -> None:
    """A run resumed inside the range traces the rest of it."""
    if (self._steps is not None and not self._traced
        and self._steps[0] <= number <= self._steps[1]):
      jax.profiler.start_trace(self.log_dir)
      self._tracing = self._traced = True

  def after_step(self, number: int, outputs) -> None:
    """`outputs` of the step are waited for, so the trace holds its whole execution."""
    if self._tracing and number == self._steps[1]:
      jax.block_until_ready(outputs)
      self.stop()

  def stop(self) -> None:
    if self._tracing:
      jax.profiler.stop_trace()
      self._tracing = False
