"""Mask-sampling benchmark: `python -m ssast_jax.bench_masks [--batch 12] [--grid 8x64] [--masked 400]`.

Times `masking.sample_masks` after compilation for each mode and prints, as its last line,
a JSON object of median milliseconds per batch of masks.
"""

import argparse
import json
import statistics
import time

import jax

from ssast_jax import masking


def time_masks(batch: int, grid: tuple[int, int], masked: int, mode: str, repeats: int) -> float:
  sample = jax.jit(lambda key: masking.sample_masks(key, batch, grid, masked, mode))
  keys = [jax.random.key(i) for i in range(repeats + 1)]
  sample(keys[0]).block_until_ready()
  times = []
  for key in keys[1:]:
    start = time.perf_counter()
    sample(key).block_until_ready()
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def main():
  parser = argparse.ArgumentParser(prog='python -m ssast_jax.bench_masks',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('--batch', type=int, default=12)
  parser.add_argument('--grid', default='8x64', help='p_f x p_t')
  parser.add_argument('--masked', type=int, default=400)
  parser.add_argument('--repeats', type=int, default=200)
  args = parser.parse_args()
  grid = tuple(int(v) for v in args.grid.split('x'))
  result = {f'{mode}_ms': time_masks(args.batch, grid, args.masked, mode, args.repeats)
            for mode in masking.MASK_MODES}
  print(json.dumps(result))


if __name__ == '__main__':
  main()
