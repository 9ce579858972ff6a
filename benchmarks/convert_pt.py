"""`.pt` decoder benchmark: the converter with pt_features' decoder vs with `torch.load`.

  python benchmarks/convert_pt.py --data DIR [--clips 10000] [--rounds 3] [--workers 2] \
      [--out benchmarks/results/convert_pt.json]

Writes, once (reused when present), `--clips` float32 fbank clips of (T, 128), T in 998..1024,
each `torch.save(fbank, path)` as the original SSAST precomputes them, and the dataset JSON.
Then runs the real converter (`python -m ssast_jax.data.convert --json J --pt-dir D --out OUT
--workers W --dtype float16`) in fresh processes on two snapshots of the working tree's
`ssast_jax` package: "handwritten" as it is, "torch_load" with `pt_features.load_pt` redefined
as `torch.load(path, map_location="cpu", weights_only=True)` (the library has no switch). One
untimed run of each warms the page cache, then the two run in turns (handwritten, torch_load,
...), each into a fresh output folder. Prints per-run wall times (with the CPU time of the
converter's processes and of the host's other processes meanwhile) and, as its last line, a
JSON object with the medians and `speedup`, the median over rounds of the per-round ratio
torch_load time / handwritten time (drift of the host's speed cancels); also written to --out.
"""

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NUM_MEL_BINS = 128
VARIANTS = ("handwritten", "torch_load")

# Appended to the "torch_load" snapshot's pt_features.py: load_clip then reads every file so.
TORCH_LOAD_PT = '''

def load_pt(path):
  """torch.load(weights_only=True) in place of the hand-written decoder (benchmark only)."""
  import torch  # pylint: disable=import-outside-toplevel

  def to_numpy(value):
    if not isinstance(value, torch.Tensor):
      return value
    value = value.detach()
    return (value.float() if value.dtype == torch.bfloat16 else value).numpy()

  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
      return {key: to_numpy(value) for key, value in obj.items()}
    return to_numpy(obj)
  except FileNotFoundError:
    raise SkippedClip("missing", f"{path} does not exist") from None
  except Exception as e:  # pylint: disable=broad-except
    first_line = str(e).strip().partition("\\n")[0]
    raise SkippedClip("unreadable", f"{path}: {type(e).__name__}: {first_line}") from None
'''


def write_dataset(data_dir: Path, num_clips: int) -> Path:
  """Writes the clips and their JSON (last, so that its presence means complete)."""
  json_path = data_dir / "data.json"
  if json_path.exists() and len(json.loads(json_path.read_text())["data"]) == num_clips:
    return json_path
  import torch  # pylint: disable=import-outside-toplevel
  pt_dir = data_dir / "pt"
  pt_dir.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  entries = []
  for i in range(num_clips):
    frames = int(rng.integers(998, 1025))
    fbank = (rng.standard_normal((frames, NUM_MEL_BINS), np.float32) * 2.5 - 7).astype(np.float32)
    torch.save(torch.from_numpy(fbank), pt_dir / f"clip{i:05d}.pt")
    entries.append({"wav": f"/audio/clip{i:05d}.wav", "labels": "/m/09x0r"})
  json_path.write_text(json.dumps({"data": entries}))
  return json_path


def _snapshot(root: Path, variant: str) -> Path:
  shutil.copytree(REPO / "ssast_jax", root / "ssast_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  if variant == "torch_load":
    with open(root / "ssast_jax" / "data" / "pt_features.py", "a") as f:
      f.write(TORCH_LOAD_PT)
  return root


def _host_busy_s() -> float:
  """CPU seconds all processes of the host have used since boot (Linux /proc/stat)."""
  with open("/proc/stat") as f:
    ticks = [int(v) for v in f.readline().split()[1:]]
  user, nice, system, _, _, irq, softirq = ticks[:7]  # idle and iowait left out
  return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _convert(package_root: Path, json_path: Path, out: Path, workers: int,
             clips: int) -> tuple[float, float, float]:
  """Runs the converter; returns its wall time, the CPU time of its process tree and the CPU
  time other processes of the host used meanwhile (what the run competed with)."""
  command = [sys.executable, "-m", "ssast_jax.data.convert", "--json", str(json_path),
             "--pt-dir", str(json_path.parent / "pt"), "--out", str(out),
             "--workers", str(workers), "--dtype", "float16"]
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
  busy_before = _host_busy_s()
  started = time.perf_counter()
  done = subprocess.run(command, cwd=package_root, env=env, capture_output=True, text=True)
  seconds = time.perf_counter() - started
  cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime
  others = max(0.0, _host_busy_s() - busy_before - cpu)
  if done.returncode != 0:
    raise SystemExit(f"converter failed in {package_root}:\n{done.stderr[-2000:]}")
  converted = json.loads((out / "manifest.json").read_text())["num_clips"]
  if converted != clips:
    raise SystemExit(f"converter kept {converted} of {clips} clips in {package_root}")
  shutil.rmtree(out)
  os.sync()  # the next run does not pay for this one's writeback
  return seconds, cpu, others


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    return platform.machine()


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", required=True, type=Path, help="folder for the clips (reused)")
  parser.add_argument("--clips", type=int, default=10_000)
  parser.add_argument("--rounds", type=int, default=3, help="timed runs of each variant")
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/convert_pt.json")
  args = parser.parse_args(argv)
  json_path = write_dataset(args.data, args.clips)
  times, cpu_times, others_cpu = ({name: [] for name in VARIANTS} for _ in range(3))
  with tempfile.TemporaryDirectory(dir=args.data) as scratch:
    scratch = Path(scratch)
    roots = {name: _snapshot(scratch / name, name) for name in VARIANTS}
    for turn in range(args.rounds + 1):
      for name, root in roots.items():
        seconds, cpu, others = _convert(root, json_path, scratch / "out", args.workers,
                                        args.clips)
        label = f"round {turn}" if turn else "warm-up (untimed)"
        print(f"{label} {name}: {seconds:.2f} s ({cpu:.2f} s CPU; other processes "
              f"{others:.2f} s CPU)", flush=True)
        if turn:
          times[name].append(round(seconds, 3))
          cpu_times[name].append(round(cpu, 3))
          others_cpu[name].append(round(others, 2))
  ratios = [t / h for t, h in zip(times["torch_load"], times["handwritten"])]
  result = {
      "command": "python -m ssast_jax.data.convert --json J --pt-dir D --out OUT "
                 f"--workers {args.workers} --dtype float16",
      "clips": args.clips, "num_mel_bins": NUM_MEL_BINS, "frames": "998..1024",
      "times_s": times,
      "median_s": {name: round(statistics.median(t), 3) for name, t in times.items()},
      "round_ratios": [round(r, 4) for r in ratios],
      "speedup": round(statistics.median(ratios), 4),
      "cpu_times_s": cpu_times,
      "cpu_median_s": {name: round(statistics.median(t), 3) for name, t in cpu_times.items()},
      "other_processes_cpu_s": others_cpu,
      "machine": f"{_cpu_model()}, {os.cpu_count()} cores",
      "date": datetime.date.today().isoformat(),
  }
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(result, indent=1) + "\n")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
