"""python -m ssast_jax.plan: will this run fit that accelerator, and how long will it take?

python -m ssast_jax.plan --config=configs/pretrain_joint.py --target=v5e-8 [--target=h100x8]
    [--config.KEY=VALUE ...] [--clips=N] [--search] [--json]

Compiles the run's own training and evaluation steps (as main.py would build them from the
same config and overrides) for each target's devices without them, and prints per device:
memory against the chip's, FLOPs, the collectives, a roofline estimate of the step, clips/s
and the run's hours. Nothing is read: data paths are not needed. These are compiler
estimates, not measurements (docs/performance.md).
"""

from __future__ import annotations

import json
import os

from ssast_jax import accelerators

accelerators.use_compile_backends()  # before JAX is imported

from absl import app, flags  # noqa: E402  pylint: disable=wrong-import-position
from ml_collections import config_flags  # noqa: E402  pylint: disable=wrong-import-position

from ssast_jax.config import command_line  # noqa: E402  pylint: disable=wrong-import-position

_CONFIG = config_flags.DEFINE_config_file('config', None, 'The run config file.',
                                          lock_config=True)
_TARGETS = flags.DEFINE_multi_string('target', None, 'Targets: v5e-8, v5p-64, 2xv6e-256, '
                                     'h100, h100x8, h100:4x8, v100x8, a100x8, h200x8, b200x8.')
_CLIPS = flags.DEFINE_integer('clips', None, 'Clips in the training set (default: counted '
                              'from data.train_json where it exists).')
_SEARCH = flags.DEFINE_bool('search', False, 'Find the largest batch per device per dtype and '
                            'remat setting, and the FSDP size a model needs.')
_JSON = flags.DEFINE_bool('json', False, 'End stdout with the records as one JSON line.')
_ENCODER = flags.DEFINE_string('encoder', None, 'Fine-tuning: the pretrained encoder as '
                               'SIZE[:FxT], e.g. base:16x16, when config.pretrained is not at hand.')
_NUM_LABELS = flags.DEFINE_integer('num_labels', None, 'Fine-tuning: the classes (default: '
                                   'the label CSV\'s rows where it exists, else 527).')
_GPU_FRACTION = flags.DEFINE_float('gpu_memory_fraction', 0.75, 'Share of a GPU\'s memory JAX '
                                   'may use (XLA_PYTHON_CLIENT_MEM_FRACTION; JAX\'s default).')
_NO_EVAL = flags.DEFINE_bool('no_eval', False, 'Compile the training step only.')
flags.mark_flags_as_required(['config', 'target'])

GiB = 2 ** 30


def _run_clips(config) -> int | None:
  """Clips the configured run trains on: --clips (or data.train_json's entries) x epochs."""
  clips = _CLIPS.value
  path = config.data.get('train_json', '')
  if clips is None and path and os.path.isfile(path):
    with open(path) as f:
      clips = len(json.load(f)['data'])
  return None if clips is None else clips * config.num_epochs


def _finetune_inputs(config):
  """(encoder ModelConfig, label count) of a fine-tuning config, without its data."""
  from ssast_jax import loading  # pylint: disable=import-outside-toplevel
  from ssast_jax.model import ModelConfig  # pylint: disable=import-outside-toplevel
  if _ENCODER.value:
    size, _, patch = _ENCODER.value.partition(':')
    fshape, tshape = (int(v) for v in (patch or '16x16').split('x'))
    encoder = ModelConfig.from_size(size, fshape=fshape, tshape=tshape)
  elif config.pretrained and os.path.exists(config.pretrained):
    encoder = loading.load(config.pretrained, 'latest').config
  else:
    encoder = ModelConfig.from_size('base')
    print('# fine-tuning: config.pretrained is not at hand; assuming the base encoder with '
          '16x16 patches (--encoder=SIZE:FxT to say otherwise)')
  labels = _NUM_LABELS.value
  if labels is None and config.data.label_csv and os.path.isfile(config.data.label_csv):
    with open(config.data.label_csv) as f:
      labels = sum(1 for line in f if line.strip()) - 1
  return encoder, labels or 527


def _gib(value) -> str:
  return '-' if value is None else f'{value / GiB:.1f}'


def _line(r: dict) -> str:
  remat = r.get('remat_policy', '-') if r.get('remat') else 'off'
  fits = 'yes' if r['fits'] else 'NO'
  margin = '' if r.get('margin_bytes') is None else f' ({_gib(r["margin_bytes"])} free)'
  speed = r.get('estimated_clips_per_s_per_chip')
  hours = r.get('estimated_run_hours')
  return (f'{r["target"]:>10} {r["device_kind"][:22]:>22} {r["dtype"]:>8} {remat:>32} '
          f'{r.get("fsdp", 1):>4} {r["batch_per_device"]:>6g} {fits:>4}{margin:>13} '
          f'{_gib(r.get("peak_bytes_per_device")):>6}/{_gib(r["capacity_bytes_per_device"]):<5} '
          f'{(r.get("flops_per_device_per_step") or 0) / 1e12:>8.2f} '
          f'{"-" if speed is None else f"{speed:.1f}":>9} {r.get("bound", "-"):>11} '
          f'{"-" if hours is None else f"{hours:.1f}":>7}')


HEADER = (f'{"target":>10} {"device":>22} {"dtype":>8} {"remat":>32} {"fsdp":>4} '
          f'{"b/dev":>6} {"fits":>4}{"":>13} {"GiB/dev":>12} {"TFLOP/dev":>8} '
          f'{"clips/s/chip":>9} {"bound":>11} {"hours":>7}')


def _details(r: dict) -> str:
  memory = r.get('memory', {})
  parts = [f'  memory per device: parameters {_gib(memory.get("params"))} GiB, optimiser '
           f'{_gib(memory.get("optimizer"))}, batch {_gib(memory.get("batch"))}, temporaries '
           f'{_gib(memory.get("temporaries"))}; compile {r.get("compile_s")} s']
  if r.get('compiler_error'):
    parts.append(f'  compiler: {r["compiler_error"]}')
  if 'roofline_s' in r:
    bounds = ', '.join(f'{k} {v * 1e3:.1f} ms' for k, v in r['roofline_s'].items())
    parts.append(f'  roofline: {bounds} -> {r["bound"]}-bound, {r["estimated_step_s"] * 1e3:.1f}'
                 f' ms a step, {r["estimated_clips_per_s"]:.1f} clips/s for the job'
                 + (f'; TPU cost model {r["tpu_cost_model_s"] * 1e3:.1f} ms'
                    if r.get('tpu_cost_model_s') else ''))
    comms = {k: v for k, v in r.get('collectives', {}).items() if k != 'total_bytes'}
    if comms:
      parts.append('  collectives per step: ' + ', '.join(
          f'{k} x{v["count"]} {v["bytes"] / 2 ** 20:.1f} MiB' for k, v in comms.items()))
  if r.get('eval'):
    parts.append(f'  evaluation step: {_gib(r["eval"].get("peak_bytes_per_device"))} GiB, '
                 f'fits: {r["eval"]["fits"]}')
  return '\n'.join(parts)


def _print_found(record: dict) -> None:
  print(f'# found: {_line(record)}', flush=True)


def main(argv):
  del argv
  # pylint: disable=import-outside-toplevel
  from ssast_jax.config.settings import ConfigError
  from ssast_jax.plan import compile as plan_compile, search
  config = _CONFIG.value
  finetuning = 'model' not in config
  encoder, num_labels = _finetune_inputs(config) if finetuning else (None, 527)
  options = dict(encoder=encoder, num_labels=num_labels,
                 gpu_memory_fraction=_GPU_FRACTION.value, run_clips=_run_clips(config))
  records = []
  try:
    for name in _TARGETS.value:
      target = accelerators.parse(name)
      devices = accelerators.devices(target)
      print(f'# {name}: {len(devices)} x {devices[0].device_kind}, compiling ...', flush=True)
      if _SEARCH.value:
        records += search.search(config, target, devices, progress=_print_found, **options)
      else:
        records.append(plan_compile.plan_run(config, target, devices,
                                             with_eval=not _NO_EVAL.value, **options))
  except (ConfigError, accelerators.TargetError) as error:
    command_line.fail(str(error))
  print(HEADER)
  for record in records:
    print(_line(record) + (' <- fastest' if record.get('fastest') else ''))
    if not _SEARCH.value:
      print(_details(record))
  print('# compiler estimates, not measurements: memory from XLA\'s buffer assignment, time '
        'from a roofline at the chip\'s published peaks')
  if _JSON.value:
    print(json.dumps(records[0] if len(records) == 1 and not _SEARCH.value else records,
                     default=str))


if __name__ == '__main__':
  app.run(main, flags_parser=command_line.parse_flags)
