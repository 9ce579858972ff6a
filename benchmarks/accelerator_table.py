"""The table of benchmarks/accelerator.sh: python benchmarks/accelerator_table.py DIR

Reads DIR/step_<dtype>_b<batch>.json (each with its remat run under `compared`) and
DIR/loader_b<batch>.json, writes DIR/summary.json (one row per timed step) and DIR/table.txt,
and prints the table: per step the measured time, clips/s, MFU, memory, compile time, the
loader's clips/s at that batch, and `ssast_jax.plan`'s roofline estimate for the device with
measured / estimated (the factor that calibrates the plan's estimates on that device).
"""

from __future__ import annotations

import json
import pathlib
import re
import sys

GiB = 2 ** 30


def summary_rows(out: pathlib.Path) -> list[dict]:
  rows = []
  for path in sorted(out.glob('step_*_b*.json'),
                     key=lambda p: (p.stem.split('_')[1], int(p.stem.split('_b')[-1]))):
    step = json.loads(path.read_text())
    batch = int(re.search(r'_b(\d+)$', path.stem).group(1))
    loader_path = out / f'loader_b{batch}.json'
    loader = json.loads(loader_path.read_text()) if loader_path.exists() else {}
    for run in (step, step['compared']):
      estimate = run.get('plan_estimate_s')
      rows.append({'batch': run['batch_size'], 'remat': run['remat'], 'dtype': run['dtype'],
                   'step_ms': 1e3 * run['step_s'], 'clips_per_s': run['clips_per_s'],
                   'tflops': run['achieved_flops'] / 1e12, 'mfu': run['mfu'],
                   'peak_tflops': run['matmul_peak_flops'] / 1e12,
                   'memory_gib': run['peak_memory_bytes'] / GiB, 'compile_s': run['compile_s'],
                   'loader_clips_per_s': loader.get('clips_per_s'),
                   'plan_estimate_ms': None if estimate is None else 1e3 * estimate,
                   'plan_bound': run.get('plan_bound'),
                   'measured_over_plan': None if not estimate else run['step_s'] / estimate,
                   'platform': run['platform'], 'device_kind': run['device_kind']})
    rows[-1]['remat_speedup'] = step.get('compared_speedup')
  return rows


def _number(value, spec: str) -> str:
  return '-' if value is None else format(value, spec)


def table(rows: list[dict]) -> list[str]:
  lines = [f'{"batch":>5} {"remat":>5} {"dtype":>8} {"step ms":>9} {"clips/s":>8} '
           f'{"TFLOP/s":>8} {"MFU":>6} {"GiB":>6} {"compile s":>9} {"loader clips/s":>14} '
           f'{"plan ms":>8} {"meas/plan":>9}  device']
  for r in rows:
    lines.append(f'{r["batch"]:5d} {str(r["remat"]):>5} {r["dtype"]:>8} {r["step_ms"]:9.2f} '
                 f'{r["clips_per_s"]:8.1f} {r["tflops"]:8.2f} {r["mfu"]:6.3f} '
                 f'{r["memory_gib"]:6.2f} {r["compile_s"]:9.1f} '
                 f'{_number(r["loader_clips_per_s"], "14.1f"):>14} '
                 f'{_number(r["plan_estimate_ms"], "8.2f"):>8} '
                 f'{_number(r["measured_over_plan"], "9.2f"):>9}  {r["platform"]} '
                 f'{r["device_kind"]}')
  return lines


def main(argv) -> None:
  out = pathlib.Path(argv[1])
  rows = summary_rows(out)
  (out / 'summary.json').write_text(json.dumps(rows, indent=1) + '\n')
  lines = table(rows)
  (out / 'table.txt').write_text('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main(sys.argv)
