"""The paper's recipe on accelerators, as `ssast_jax.plan` estimates it: one compile per row.

python benchmarks/plan_table.py --out benchmarks/results/plan_table.jsonl [--targets h100x8,v5e-8]
    [--batches 12,24,48,96] [--clips 2250000 --epochs 10]

Rows: each mode (the original's two passes, `joint_passes=2`, on every target first, then
the one-pass mode) x target x dtype (float32; bfloat16 where the chip has it) x remat
(off; on with 'nothing_saveable') x batch per device. Each record is appended to --out as
it is made (a rerun skips the rows already there); a batch that does not fit skips the
larger ones. Prints the Markdown table of what --out holds, by target, mode, dtype, remat
and batch. Compiler estimates, not measurements.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
from ssast_jax import accelerators  # noqa: E402

accelerators.use_compile_backends()  # before JAX is imported

from ssast_jax.config import defaults  # noqa: E402
from ssast_jax.plan import compile as plan_compile, search  # noqa: E402

TARGETS = ('h100x8', 'v5e-8', 'a100x8', 'v100x8', 'v6e-8', 'v5p-64')
MODES = {'two passes': 2, 'one pass': 1}
GiB = 2 ** 30


def row_key(target, mode, dtype, remat, batch) -> str:
  return f'{target}|{mode}|{dtype}|{remat}|{batch}'


def rows(path) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return {r['key']: r for r in map(json.loads, f)}


def run(args) -> None:
  done = rows(args.out)
  targets = {name: accelerators.parse(name) for name in args.targets.split(',')}
  for mode, passes in MODES.items():  # the original's two passes on every target first
    for name, target in targets.items():
      devices = accelerators.devices(target)
      for dtype in ('float32', 'bfloat16'):
        if dtype not in target.chip.peak_flops:
          continue
        for remat in (False, True):
          for batch in map(int, args.batches.split(',')):
            key = row_key(name, mode, dtype, remat, batch)
            config = defaults.get_config()
            config.joint_passes = passes
            config.num_epochs = args.epochs
            config = search.with_setting(config, batch_per_device=batch, devices=len(devices),
                                         dtype=dtype, remat=(remat, 'nothing_saveable'))
            if key in done:
              _remember(target, config, done[key])
              if not done[key]['fits']:
                break
              continue
            record = plan_compile.plan_run(config, target, devices, with_eval=False,
                                           run_clips=args.clips * args.epochs)
            record.update(key=key, mode=mode, date=datetime.date.today().isoformat())
            with open(args.out, 'a') as f:
              f.write(json.dumps(record, default=str) + '\n')
            done[key] = record
            print(table_line(record), flush=True)
            if not record['fits']:
              break


def _remember(target, config, record: dict) -> None:
  """A recorded TPU row without remat gives its cost to the rows with remat at its batch
  (their loop-free step), as it would have in the process that made it."""
  if target.chip.platform != 'tpu' or record.get('remat'):
    return
  if not record['fits']:
    plan_compile.remember_target_cost(target.name, config, None)
  elif record.get('cost_source') == 'target compile':
    plan_compile.remember_target_cost(target.name, config, {
        'flops': record['flops_per_device_per_step'],
        'bytes accessed': record['bytes_accessed_per_device']})


def table_line(r: dict) -> str:
  remat = 'on' if r.get('remat') else 'off'
  peak = r.get('peak_bytes_per_device')
  gib = '-' if peak is None else f'{peak / GiB:.1f}'
  speed = r.get('estimated_clips_per_s_per_chip')
  hours = r.get('estimated_run_hours')
  return (f'| {r["target"]} | {r["mode"]} | {r["dtype"]} | {remat} | '
          f'{r["batch_per_device"]:g} | {"yes" if r["fits"] else "no"} | {gib} | '
          f'{"-" if speed is None or not r["fits"] else f"{speed:.0f}"} | '
          f'{"-" if hours is None or not r["fits"] else f"{hours:.1f}"} | '
          f'{_bound(r)} | {r["compile_s"]:.0f} |')


def _bound(r: dict) -> str:
  """The roofline's bound; '*' where the bytes moved are the buffer assignment's lower
  bound (GPUs)."""
  if not r['fits']:
    return '-'
  return r.get('bound', '-') + ('*' if 'lower bound' in r.get('cost_source', '') else '')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', default='benchmarks/results/plan_table.jsonl')
  parser.add_argument('--targets', default=','.join(TARGETS))
  parser.add_argument('--batches', default='12,24,48,96')
  parser.add_argument('--clips', type=int, default=2_250_000,
                      help='clips per epoch (AudioSet-2M + LibriSpeech-960: about 2.25 million)')
  parser.add_argument('--epochs', type=int, default=10)
  parser.add_argument('--table_only', action='store_true', help='print what --out holds')
  args = parser.parse_args(argv)
  if not args.table_only:
    run(args)
  print('| target | mode | dtype | remat | clips/device | fits | GiB/device | clips/s/chip '
        '| hours | bound | compile s |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  for record in sorted(rows(args.out).values(), key=_table_order):
    print(table_line(record))


def _table_order(r: dict) -> tuple:
  target = TARGETS.index(r['target']) if r['target'] in TARGETS else len(TARGETS)
  return (target, r['target'], list(MODES).index(r['mode']), r['dtype'] != 'float32',
          bool(r['remat']), r['batch_per_device'])


if __name__ == '__main__':
  main()
