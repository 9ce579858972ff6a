"""Input pipeline throughput benchmark (`python -m ssast_jax.data.bench --shards DIR`).

Runs the training loader over converted shards, discarding the batches, and prints progress
lines then, as its last line, a JSON object with `clips_per_s`, `mb_per_s` (float32 batch
bytes delivered per second, 1 MB = 1e6 bytes) and the resident memory of the loader's process
tree sampled during the run, so that flat memory can be checked.
"""

import argparse
import json
import os
import time
from pathlib import Path

from ssast_jax.data import pipeline
from ssast_jax.data import shards


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
            f"rss {rss[-1] / 2**20:,.0f} MiB", flush=True)
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


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m ssast_jax.data.bench",
                                   description=__doc__.split("\n\n")[0])
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
  args = parser.parse_args(argv)
  if args.workers > 0:
    from absl import flags  # pylint: disable=import-outside-toplevel
    flags.FLAGS.mark_as_parsed()  # Grain's multiprocessing reads absl flags.
  try:
    result = run(args.shards, batch_size=args.batch_size, target_length=args.target_length,
                 steps=args.steps, workers=args.workers, threads=args.threads,
                 prefetch=args.prefetch, warmup=args.warmup, seed=args.seed,
                 random_crop=args.random_crop)
  except (shards.ManifestError, ValueError) as e:
    raise SystemExit(f"error: {e}") from None
  print(json.dumps(result))


if __name__ == "__main__":
  main()
