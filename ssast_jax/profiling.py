"""Profiles of the training step: a `jax.profiler` trace of chosen training steps, for
TensorBoard's or Perfetto's viewer, and the step's time split by the model's named scopes.

The training trace goes to WORKDIR/profile (TensorBoard's `plugins/profile/RUN/*.xplane.pb`
layout); only process 0 traces.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

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


# Named scopes of the step (model.py, losses.py, train_step.py); the innermost one counts.
STEP_SCOPES = ('attention_core', 'qkv_proj', 'attention_out_proj', 'mlp_fc1', 'gelu',
               'mlp_fc2', 'layer_norm', 'patch_embed', 'pretext_heads', 'pretext_losses',
               'masking', 'optimizer')
OTHER_SCOPE = 'other'  # residual adds, gradient sums, layout changes outside the scopes


def instruction_scopes(hlo_text: str) -> dict[str, tuple[str, str]]:
  """HLO instruction name -> (scope, 'forward' | 'backward') from its op_name metadata;
  an instruction in a backward pass has `transpose(` in its op_name."""
  scopes = {}
  for line in hlo_text.splitlines():
    name = re.match(r'\s*(?:ROOT )?%([\w.\-]+) = ', line)
    op_name = re.search(r'op_name="([^"]*)"', line)
    if not (name and op_name):
      continue
    # 'jit(train_step)/transpose(jvp(attention_core))/dot_general' -> attention_core
    path = [re.sub(r'^(\w+\()+|\)+$', '', part) for part in op_name.group(1).split('/')]
    scope = next((part for part in reversed(path) if part in STEP_SCOPES), OTHER_SCOPE)
    direction = 'backward' if 'transpose(' in op_name.group(1) else 'forward'
    scopes[name.group(1)] = (scope, direction)
  return scopes


def time_by_scope(trace_dir: str, hlo_text: str, runs: int = 1) -> dict:
  """Milliseconds per scope and direction of the operations a Perfetto trace in
  `trace_dir` holds for the program `hlo_text`, divided by `runs`.

  Operations are matched to the compiled program's instructions by name (XLA:CPU records
  one trace event per instruction); times add up over threads, so their sum can exceed
  the wall time when XLA runs independent operations concurrently.
  """
  paths = glob.glob(os.path.join(trace_dir, '**', '*perfetto_trace.json.gz'), recursive=True)
  if not paths:
    raise FileNotFoundError(f'no perfetto trace under {trace_dir}')
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    events = json.load(f)['traceEvents']
  scopes = instruction_scopes(hlo_text)
  totals = collections.defaultdict(float)
  for event in events:
    if event.get('ph') == 'X' and event.get('name') in scopes:
      totals[scopes[event['name']]] += event['dur'] / 1e3 / runs
  table = {s: {d: round(totals[(s, d)], 2) for d in ('forward', 'backward')}
           for s in STEP_SCOPES + (OTHER_SCOPE,)}
  return {s: t for s, t in table.items() if t['forward'] or t['backward']}
