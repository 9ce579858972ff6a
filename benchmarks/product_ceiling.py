"""The MFU a compiled step could reach if it did nothing but its matrix products, each at
the speed XLA reaches for that product alone.

The step's products are read from its optimised HLO (inside fusions too); each distinct
product (operand shapes and dtypes, contraction and batch dimensions) is compiled alone as
`lax.dot_general` on random operands and timed. Their time summed over the step is a floor
under the step's time on this machine and its kernels: what is left of the step above it
is everything else (softmax, LayerNorm, GELU, residual adds, layout changes, optimiser),
and the MFU ceiling is the step's FLOPs over that floor, against the same peak.
"""

from __future__ import annotations

import collections
import re
import statistics
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%[\w.\-]+ = ')
_ARRAY = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%([\w.\-]+) ')
_DOT = re.compile(r' dot\(%([\w.\-]+), %([\w.\-]+)\)')
_CALLS = re.compile(r'calls=%([\w.\-]+)')
_LOOPS = re.compile(r'(?:body|condition)=%([\w.\-]+)')


class Product(NamedTuple):
  """One matrix product of the step: operand and output types and shapes, dimensions."""
  lhs: tuple[str, tuple[int, ...]]
  rhs: tuple[str, tuple[int, ...]]
  out_dtype: str
  contracting: tuple[tuple[int, ...], tuple[int, ...]]
  batch: tuple[tuple[int, ...], tuple[int, ...]]

  @property
  def flops(self) -> int:
    lhs_shape, rhs_shape = self.lhs[1], self.rhs[1]
    batch = [lhs_shape[i] for i in self.batch[0]]
    contracted = [lhs_shape[i] for i in self.contracting[0]]
    lhs_free = [n for i, n in enumerate(lhs_shape)
                if i not in self.contracting[0] + self.batch[0]]
    rhs_free = [n for i, n in enumerate(rhs_shape)
                if i not in self.contracting[1] + self.batch[1]]
    size = 1
    for n in batch + contracted + lhs_free + rhs_free:
      size *= n
    return 2 * size

  def describe(self) -> str:
    (lt, ls), (rt, rs) = self.lhs, self.rhs
    return (f'{lt}{list(ls)} x {rt}{list(rs)}, contracting {list(self.contracting[0])} x '
            f'{list(self.contracting[1])}, batch {list(self.batch[0])} x {list(self.batch[1])}')


def _dims(line: str, name: str) -> tuple[int, ...]:
  found = re.search(name + r'=\{([\d,]*)\}', line)
  return tuple(int(d) for d in found.group(1).split(',') if d) if found else ()


def step_products(hlo_text: str) -> collections.Counter:
  """Product -> how many times one run of the HLO module `hlo_text` computes it: the dots
  of the entry computation and of the fusions it calls, transitively. Raises ValueError
  for a module with products in loops, which this count does not cover.
  """
  shapes, bodies, current = {}, collections.defaultdict(list), None
  for line in hlo_text.splitlines():
    computation = _COMPUTATION.match(line)
    if computation and line.rstrip().endswith('{'):
      current = 'ENTRY' if line.startswith('ENTRY') else computation.group(1)
      continue
    if _INSTRUCTION.match(line):
      bodies[current].append(line)
    array = _ARRAY.match(line)
    if array:
      name, dtype, dims = array.groups()
      shapes[name] = (dtype, tuple(int(d) for d in dims.split(',') if d))
  if 'ENTRY' not in bodies:
    raise ValueError('no ENTRY computation in the HLO text')

  def dots(computation: str) -> list[str]:
    found = []
    for line in bodies[computation]:
      found += [line] if _DOT.search(line) else []
      for called in _CALLS.findall(line):
        found += dots(called)
      if any(dots(looped) for looped in _LOOPS.findall(line)):
        raise ValueError('the program computes matrix products in a loop; only loop-free '
                         'programs are supported')
    return found

  products = collections.Counter()
  for line in dots('ENTRY'):
    lhs, rhs = _DOT.search(line).groups()
    products[Product(shapes[lhs], shapes[rhs], _ARRAY.match(line).group(2),
                     (_dims(line, 'lhs_contracting_dims'), _dims(line, 'rhs_contracting_dims')),
                     (_dims(line, 'lhs_batch_dims'), _dims(line, 'rhs_batch_dims')))] += 1
  return products


_DTYPES = {'f32': jnp.float32, 'bf16': jnp.bfloat16, 'f16': jnp.float16, 'f64': jnp.float64}


class ProductTimer:
  """Compiles every product of `products` alone on the default device; `time_each()`
  times each, as the fastest of `CALLS` calls in a row (call it between the rounds of the
  step, so that both see the machine in the same state); `summary()` sums their medians
  over the rounds, weighted by their counts in the step."""

  CALLS = 3

  def __init__(self, products: collections.Counter):
    self._runs = []
    for index, product in enumerate(products):
      unknown = {product.lhs[0], product.rhs[0], product.out_dtype} - set(_DTYPES)
      if unknown:
        raise ValueError(f'cannot time {product.describe()}: no random operands of type '
                         f'{", ".join(sorted(unknown))}')
      # NumPy draws the operands: a JAX draw would compile a program per shape.
      rng = np.random.default_rng(index)
      operands = [jax.device_put(rng.standard_normal(shape, np.float32).astype(_DTYPES[dtype]))
                  for dtype, shape in (product.lhs, product.rhs)]
      dot = jax.jit(lambda a, b, p=product: jax.lax.dot_general(
          a, b, (p.contracting, p.batch), preferred_element_type=_DTYPES[p.out_dtype]))
      dot(*operands).block_until_ready()
      self._runs.append((product, products[product], dot, operands))
    self._seconds = [[] for _ in self._runs]

  def time_each(self) -> None:
    for seconds, (_, _, dot, operands) in zip(self._seconds, self._runs):
      calls = []
      for _ in range(self.CALLS):
        start = time.perf_counter()
        dot(*operands).block_until_ready()
        calls.append(time.perf_counter() - start)
      seconds.append(min(calls))

  def summary(self, step_s: float, step_flops: float, peak_flops: float) -> dict:
    """`products_s` (all products of one step, each at its median time alone), its share
    of `step_s`, the products' FLOPs (`products_flops`, against the step's `step_flops`),
    the MFU ceiling `step_flops / products_s / peak_flops`, and the products by total
    time, with their count per step and rate alone."""
    by_product = []
    for seconds, (product, count, _, _) in zip(self._seconds, self._runs):
      median = statistics.median(seconds)
      by_product.append({'product': product.describe(), 'per_step': count,
                         'total_ms': count * median * 1e3,
                         'gflops_alone': product.flops / median / 1e9})
    by_product.sort(key=lambda p: -p['total_ms'])
    products_s = sum(p['total_ms'] for p in by_product) / 1e3
    return {'products_s': products_s, 'share_of_step': products_s / step_s,
            'products_flops': sum(p.flops * count for p, count, _, _ in self._runs),
            'mfu_ceiling': step_flops / products_s / peak_flops, 'products': by_product}
