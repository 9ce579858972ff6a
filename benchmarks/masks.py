"""Mask-sampling benchmark: `python benchmarks/masks.py [--batch 12] [--grid 8x64] [--masked 400]`.

Times `masking.sample_masks` after compilation for each mode (the median wall time of one
jitted call, `block_until_ready` included, over `--repeats` fresh keys) and prints, as its
last line, a JSON object: `<mode>_ms` median milliseconds per batch of masks, the settings
and the command, plus `machine` / `date` when given. `--out PATH` also writes it to a file.
The requirement it checks: a batch of 12 on 8 x 64 with M = 400 in under 1 ms.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

from ssast_jax.objective import masking  # noqa: E402


def time_masks(batch: int, grid: tuple[int, int], masked: int, mode: str, repeats: int) -> float:
  """Median milliseconds of one compiled `sample_masks` call, result ready."""
  sample = jax.jit(lambda key: masking.sample_masks(key, batch, grid, masked, mode))
  keys = [jax.random.key(i) for i in range(repeats + 1)]
  jax.block_until_ready(keys)
  sample(keys[0]).block_until_ready()  # compile
  times = []
  for key in keys[1:]:
    start = time.perf_counter()
    sample(key).block_until_ready()
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def main():
  parser = argparse.ArgumentParser(prog='python benchmarks/masks.py',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('--batch', type=int, default=12)
  parser.add_argument('--grid', default='8x64', help='p_f x p_t')
  parser.add_argument('--masked', type=int, default=400)
  parser.add_argument('--repeats', type=int, default=200)
  parser.add_argument('--out', default=None, help='also write the JSON object here')
  parser.add_argument('--machine', default=None,
                      help='recorded in the JSON, e.g. "AMD EPYC, 2 cores"')
  parser.add_argument('--date', default=None, help='recorded in the JSON')
  args = parser.parse_args()
  grid = tuple(int(v) for v in args.grid.split('x'))
  result = {f'{mode}_ms': round(time_masks(args.batch, grid, args.masked, mode, args.repeats), 4)
            for mode in masking.MASK_MODES}
  result.update(batch=args.batch, grid=args.grid, masked=args.masked, repeats=args.repeats,
                statistic='median ms per jitted call after compilation, result ready',
                jax=jax.__version__, backend=jax.default_backend(),
                command='python ' + shlex.join(sys.argv))
  result.update({k: v for k, v in (('machine', args.machine), ('date', args.date)) if v})
  line = json.dumps(result)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(line + '\n')
  print(line)


if __name__ == '__main__':
  main()
