"""Input pipeline throughput benchmark: `python benchmarks/loader.py --shards DIR [...]`.

Runs the training loader (`ssast_jax.data.pipeline.train_loader`) over converted shards
(`python -m ssast_jax.data.convert`), discarding the batches. Progress goes to stderr; the
last line on stdout is a JSON object (`--out` also writes it) with `clips_per_s`,
`mb_per_s` (float32 batch bytes delivered per second, 1 MB = 1e6 bytes) and the resident
memory of the loader's process tree sampled during the run, so that flat memory can be
checked.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from ssast_jax.data import pipeline  # noqa: E402
from ssast_jax.data import shards  # noqa: E402


def _rss_bytes(pid: int) -> int:
  """Resident memory of process `pid` and its descendants (Linux /proc)."""
  total = 0
  try:
    with open(f"/proc/{pid}/status") as f:
      total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    for tid in os.listdir(f"/proc/{pid}/task"):
      with open(f"/proc/{pid}/task/{tid}/children") as f:
        total += sum(_rss_bytes(int(child)) for child in f.read().split())
  except (OSError, StopIteration):
    pass  # the process ended while being measured
  return total


def run(shards_dir, *, batch_size: int, target_length: int, steps: int, workers: int,
        threads: int, prefetch: int, warmup: int, seed: int, random_crop: bool) -> dict:
  """Times `steps` batches after `warmup` untimed ones and returns the measurements."""
  manifest = shards.read_manifest(shards_dir)
  loader = pipeline.train_loader(
      shards_dir, batch_size=batch_size, target_length=target_length,
      mean=manifest["mean"], std=manifest["std"], seed=seed, worker_count=workers,
      random_crop=random_crop, prefetch_buffer_size=prefetch, num_threads=threads)
  for _ in range(warmup):
    batch = next(loader)
  rss = [_rss_bytes(os.getpid())]
  report_every = max(1, steps // 10)
  started = time.perf_counter()
  for step in range(1, steps + 1):
    batch = next(loader)
    if step % report_every == 0 or step == steps:
      rss.append(_rss_bytes(os.getpid()))
      elapsed = time.perf_counter() - started
      print(f"step {step}/{steps}: {step * batch_size / elapsed:,.0f} clips/s, "
            f"rss {rss[-1] / 2**20:,.0f} MiB", file=sys.stderr, flush=True)
  elapsed = time.perf_counter() - started
  loader.close()
  clips = steps * batch["fbank"].shape[0]
  return {
      "clips_per_s": round(clips / elapsed, 1),
      "mb_per_s": round(clips * batch["fbank"][0].nbytes / elapsed / 1e6, 1),
      "batches": steps, "batch_size": batch_size, "target_length": target_length,
      "num_mel_bins": manifest["num_mel_bins"], "stored_dtype": manifest["dtype"],
      "workers": workers, "threads": threads, "seconds": round(elapsed, 3),
      "rss_mib_first": round(rss[0] / 2**20, 1), "rss_mib_last": round(rss[-1] / 2**20, 1),
      "rss_mib_max": round(max(rss) / 2**20, 1),
  }


def _fail(message: str):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python benchmarks/loader.py",
                                   description=__doc__.split("\n\n")[0])
  parser.error = _fail  # one line, no usage text
  parser.add_argument("--shards", required=True, type=Path, help="converted shard directory")
  parser.add_argument("--batch-size", type=int, default=12)
  parser.add_argument("--target-length", type=int, default=1024)
  parser.add_argument("--steps", type=int, default=300, help="timed batches")
  parser.add_argument("--workers", type=int, default=0, help="Grain worker processes")
  parser.add_argument("--threads", type=int, default=1, help="threads per process")
  parser.add_argument("--prefetch", type=int, default=4, help="batches prefetched")
  parser.add_argument("--warmup", type=int, default=10, help="untimed batches first")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--random-crop", action="store_true")
  parser.add_argument("--out", type=Path, help="also write the JSON result to this file")
  args = parser.parse_args(argv)
  if args.steps < 1 or args.warmup < 0 or args.batch_size < 1:
    _fail("--steps and --batch-size must be >= 1 and --warmup >= 0")
  if args.workers > 0:
    from absl import flags  # pylint: disable=import-outside-toplevel
    flags.FLAGS.mark_as_parsed()  # Grain's multiprocessing reads absl flags.
  try:
    result = run(args.shards, batch_size=args.batch_size, target_length=args.target_length,
                 steps=args.steps, workers=args.workers, threads=args.threads,
                 prefetch=args.prefetch, warmup=args.warmup, seed=args.seed,
                 random_crop=args.random_crop)
  except (shards.ManifestError, ValueError) as e:
    _fail(str(e))
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
