"""The collectives of a compiled program and the bytes they move per step, per device.

Read off the optimised HLO text: every all-gather, all-reduce, reduce-scatter, all-to-all
and collective-permute (async `-start` forms included), its result's bytes, multiplied by
the trip count XLA records for each enclosing while loop (the layer scan of remat, the
micro-batch scan of gradient accumulation).
"""

from __future__ import annotations

import re

import numpy as np

KINDS = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'collective-permute')
_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2,
                'f32': 4, 's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8}
_COMPUTATION = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s(' + '|'.join(KINDS)
                          + r')(?:-start)?\(')
_SHAPE = re.compile(r'(\w+)\[([\d,]*)\]')
_WHILE = re.compile(r'\swhile\(.*body=%?([\w.\-]+)')
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CALLS = re.compile(r'(?:to_apply|calls|body|condition|branch_computations)=\{?%?([\w.\-, %]+)\}?')


def _bytes(shape_text: str) -> int:
  total = 0
  for dtype, dims in _SHAPE.findall(shape_text):
    if dtype in _DTYPE_BYTES:
      total += _DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(',') if d]))
  return total


def summary(hlo_text: str) -> dict:
  """{kind: {'count', 'bytes'}} per step and per device, plus 'total_bytes'."""
  computations, current, entry = {}, None, None
  for line in hlo_text.splitlines():
    match = _COMPUTATION.match(line)
    if match:
      current = match.group(1)
      computations[current] = []
      if line.startswith('ENTRY'):
        entry = current
    elif current is not None:
      computations[current].append(line)
  found = {kind: {'count': 0, 'bytes': 0} for kind in KINDS}

  def visit(name: str, times: int, depth: int = 0):
    if depth > 16 or name not in computations:
      return
    for line in computations[name]:
      op = _INSTRUCTION.search(line)
      if op and '-done(' not in line:
        found[op.group(2)]['count'] += times
        found[op.group(2)]['bytes'] += times * _bytes(op.group(1))
      loop = _WHILE.search(line)
      if loop:
        trip = _TRIP.search(line)
        visit(loop.group(1), times * (int(trip.group(1)) if trip else 1), depth + 1)
        continue
      for called in _CALLS.findall(line):
        for callee in called.replace('%', '').split(','):
          if callee.strip() and callee.strip() != name:
            visit(callee.strip(), times, depth + 1)

  if entry is not None:
    visit(entry, 1)
  out = {kind: value for kind, value in found.items() if value['count']}
  out['total_bytes'] = sum(value['bytes'] for value in out.values())
  return out
