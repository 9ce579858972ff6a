"""The run's own jitted steps compiled for a target's devices, and what the compiler says.

`plan_run(config, target)` builds exactly what main.py would run (the settings, the mesh
over the target's devices, the state's FSDP layout, the donated jitted training step,
dtype, remat, accumulation), compiles it and the evaluation step for those devices without
them, and returns one record per target: memory per device against the chip, FLOPs and
bytes per device, the collectives, and a roofline estimate of the step's time. Figures
are compiler estimates, not measurements.

Per device, memory is what XLA's buffer assignment reports: arguments + outputs - aliased
(the donated state) + temporaries. TPUs refuse at compile time a program larger than HBM;
for GPUs, which XLA does not check, the fit is that peak against the memory JAX may use
(`gpu_memory_fraction` of the card, 0.75 by default as in JAX).

TPU compiles report their FLOPs and bytes accessed, but XLA counts a loop's body once
(remat scans the blocks, accumulation the micro-batches): for such a step they are those
of the same step without loops, compiled for the target (where that does not fit, at the
largest batch per device halved, rounded down, that does, scaled up), and remat's
recomputation multiplies both. GPU compiles without a device report neither: FLOPs are
those of the same global step without loops lowered for the CPU, divided by the device
count, and the bytes moved a lower bound from the buffer assignment (arguments + outputs +
every temporary written and read once).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from ssast_jax import accelerators
from ssast_jax.config import finetune as finetune_config
from ssast_jax.config.settings import ConfigError, resolve
from ssast_jax.plan import collectives, roofline

JAX_GPU_MEMORY_FRACTION = 0.75  # XLA_PYTHON_CLIENT_MEM_FRACTION's default
# Retried with on a GPU compile that fails for lack of autotuning (no device to tune on).
NO_TRITON_GEMM = {'xla_gpu_enable_triton_gemm': False}


@dataclasses.dataclass
class Step:
  """One jitted step and the abstract arguments to compile it with."""
  jitted: object
  args: tuple
  kwargs: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Build:
  """The run's steps for a set of devices: training and evaluation, the global batch,
  the state (for its per-device bytes) and the compute dtype."""
  train: Step
  evaluate: Step
  batch_size: int
  state: object
  dtype: str
  task: str
  model: object  # the ModelConfig (or ClassifierConfig) compiled


def _struct(shape, dtype, sharding):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def pretraining_build(settings, devices) -> Build:
  """main.py's pretraining step (`training.step.step_setup`) on `devices`."""
  from ssast_jax.training.step import eval_step, step_setup  # pylint: disable=import-outside-toplevel
  setup = step_setup(settings, devices)
  batch = _struct(settings.batch_shape, jnp.float32, setup.batch_sharding)
  eval_args = (setup.abstract_state['params'], batch,
               _struct(batch.shape[:1], jnp.bool_, setup.batch_sharding),
               _struct((), jnp.int32, jax.sharding.NamedSharding(setup.mesh, P())))
  return Build(Step(setup.step, (setup.abstract_state, batch)),
               Step(eval_step, eval_args, dict(graphdef=setup.graphdef, settings=settings,
                                               mesh=setup.mesh)),
               settings.optim.batch_size, setup.abstract_state, settings.model.dtype,
               settings.objective.task, settings.model)


def finetuning_build(settings, devices, encoder, num_labels: int) -> Build:
  """The fine-tuning step (`finetune.step.finetune_step`) of a classifier on `encoder`'s
  geometry (a ModelConfig) with `num_labels` outputs, on `devices`."""
  from ssast_jax.finetune.step import finetune_step  # pylint: disable=import-outside-toplevel
  from ssast_jax.model.classifier import ClassifierConfig, abstract_classifier  # pylint: disable=import-outside-toplevel
  finetune_config.check_devices(settings, len(devices))
  fields = {f.name: getattr(encoder, f.name) for f in dataclasses.fields(encoder)
            if f.name in ('embed_dim', 'num_heads', 'depth', 'fshape', 'tshape',
                          'layer_norm_epsilon')}
  config = ClassifierConfig(**fields, fstride=settings.fstride, tstride=settings.tstride,
                            input_fdim=settings.data.num_mel_bins,
                            input_tdim=settings.data.target_length, num_labels=num_labels,
                            dtype=settings.dtype, pooling=settings.pooling)
  graphdef, params = abstract_classifier(config)
  setup = finetune_step(settings, graphdef, params, steps_per_epoch=1000, mask_value=0.0,
                        devices=devices)
  shape = (settings.batch_size, settings.data.target_length, settings.data.num_mel_bins)
  batch = _struct(shape, jnp.float32, setup.batch_sharding)
  labels = _struct((settings.batch_size, num_labels), jnp.float32, setup.batch_sharding)
  return Build(Step(setup.step, (setup.abstract_state, batch, labels)),
               Step(setup.evaluate, (setup.abstract_state['params'], batch, labels)),
               settings.batch_size, setup.abstract_state, settings.dtype, settings.task, config)


def resolve_any(config):
  """(settings, is_finetuning) of a pretraining or fine-tuning config, without data checks."""
  if config.get('task') in finetune_config.TASKS:
    if not config.pretrained:  # the plan reads no weights: the encoder is given apart
      config = copy.deepcopy(config)
      config.pretrained = '(not read by the plan)'
    return finetune_config.resolve_finetune(config, check_data=False), True
  return resolve(config, check_data=False), False


def build(config, devices, encoder=None, num_labels: int = 527) -> Build:
  settings, finetuning = resolve_any(config)
  if finetuning:
    return finetuning_build(settings, devices, encoder, num_labels)
  return pretraining_build(settings, devices)


def _compile(step: Step, options=None):
  """Compiled without JAX's persistent cache, which cannot hold programs for devices that
  are not present (it fails to read them back, and only warns)."""
  try:  # private; present in jax 0.10.2 (docs/versions.md)
    from jax._src.config import enable_compilation_cache  # pylint: disable=import-outside-toplevel
    no_cache = enable_compilation_cache(False)
  except (ImportError, AttributeError, TypeError):
    no_cache = contextlib.nullcontext()
  with no_cache:
    return step.jitted.lower(*step.args, **step.kwargs).compile(compiler_options=options)


def _memory(compiled) -> dict:
  stats = compiled.memory_analysis()
  arguments, outputs = stats.argument_size_in_bytes, stats.output_size_in_bytes
  aliased, temporaries = stats.alias_size_in_bytes, stats.temp_size_in_bytes
  return {'arguments': arguments, 'outputs': outputs, 'aliased': aliased,
          'temporaries': temporaries, 'code': stats.generated_code_size_in_bytes,
          'peak': arguments + outputs - aliased + temporaries}


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return dict(cost or {})


def state_bytes(state) -> dict:
  """Bytes per device of the state's parameters, optimiser state and the rest, from the
  arrays' shapes and shardings (the largest shard)."""
  totals = {'params': 0, 'optimizer': 0, 'other': 0}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    shard = leaf.sharding.shard_shape(leaf.shape)
    size = math.prod(shard) * np.dtype(leaf.dtype).itemsize
    top = getattr(path[0], 'key', None)
    group = ('params' if top == 'params' else 'optimizer' if top == 'opt_state' else 'other')
    totals[group] += size
  return totals


def _exhausted(error: Exception) -> bool:
  text = str(error)
  return 'RESOURCE_EXHAUSTED' in text or 'Ran out of memory' in text


# What XLA says when no ptxas here assembles for the GPU: none found, or one too old or too
# new for its compute capability (CUDA 13's dropped the V100).
_NO_PTXAS = ('ptxas too old', 'suitable version of ptxas', 'ptxas does not support')


def compile_step(step: Step, platform: str) -> dict:
  """Compiles `step`; {'compiled', 'memory', 'cost', 'compile_s', 'xla_options'} or, for a
  TPU program larger than HBM, {'exhausted': message}. `xla_options`: those a GPU compile
  needed without a device to autotune on."""
  start, retry = time.perf_counter(), {}
  base = accelerators.cuda_compile_options() if platform == 'cuda' else {}
  try:
    compiled = _compile(step, base or None)
  except Exception as error:  # pylint: disable=broad-except
    if platform == 'tpu' and _exhausted(error):
      return {'exhausted': str(error).splitlines()[0][:300],
              'compile_s': time.perf_counter() - start}
    if platform == 'cuda' and any(sign in str(error) for sign in _NO_PTXAS):
      raise ConfigError(f'no ptxas here assembles for this GPU ({str(error).splitlines()[0]}):'
                        ' install requirements-compile.txt, whose CUDA 12 ptxas does') from None
    if platform != 'cuda' or 'tile sizes' not in str(error):
      raise
    retry = NO_TRITON_GEMM
    compiled = _compile(step, {**base, **retry})
  return {'compiled': compiled, 'memory': _memory(compiled), 'cost': _cost(compiled),
          'compile_s': time.perf_counter() - start, 'xla_options': retry}


def without_loops(config):
  """`config` with remat off and one micro-batch: the same step's mathematics without the
  loops (the block scan of remat, the micro-batch scan of accumulation), whose bodies XLA's
  cost analysis counts once."""
  if 'model' not in config:
    return config
  config = copy.deepcopy(config)
  config.remat, config.grad_accum_steps = False, 1
  return config


def cpu_flops(config, encoder=None, num_labels: int = 527) -> float:
  """FLOPs of the same global training step without loops, lowered for one CPU device
  (the program before optimisation: no compile). Remembered per loop-free config: remat
  on and off share it."""
  twin = without_loops(config)
  key = (twin.to_json_best_effort(sort_keys=True), encoder, num_labels)
  if key not in _CPU_FLOPS:
    train = build(twin, jax.devices('cpu')[:1], encoder, num_labels).train
    cost = train.jitted.lower(*train.args, **train.kwargs).cost_analysis()
    _CPU_FLOPS[key] = float(dict(cost[0] if isinstance(cost, (list, tuple)) else cost)['flops'])
  return _CPU_FLOPS[key]


_CPU_FLOPS = {}
_TARGET_COSTS = {}  # (target, loop-free config) -> its TPU cost analysis; None: too large


def remember_target_cost(target_name: str, config, cost: dict | None) -> None:
  """Records the cost analysis of `config`'s loop-free step on the target (None: it does
  not fit there), so that plans of the same step with loops compile it no more."""
  _TARGET_COSTS[_cost_key(target_name, config)] = cost


def _cost_key(target_name: str, config) -> tuple:
  return target_name, without_loops(config).to_json_best_effort(sort_keys=True)


def _target_twin_cost(target_name, config, devices, encoder, num_labels) -> dict:
  """The TPU cost analysis of `config`'s step without loops, compiled for the target unless
  it was already. Where that does not fit (remat and accumulation exist for that), it is
  the cost at half the batch per device (rounded down), scaled by the batches' ratio
  ('scaled_from_batch' says from which global batch); empty where no batch fits."""
  twin, key = without_loops(config), _cost_key(target_name, config)
  if key not in _TARGET_COSTS:
    compiled = compile_step(build(twin, devices, encoder, num_labels).train, 'tpu')
    _TARGET_COSTS[key] = None if 'exhausted' in compiled else compiled['cost']
  if _TARGET_COSTS[key] is not None:
    return _TARGET_COSTS[key]
  per_device = twin.batch_size // len(devices) // 2
  if per_device < 1:
    return {}
  smaller = copy.deepcopy(twin)
  smaller.batch_size = per_device * len(devices)
  cost = _target_twin_cost(target_name, smaller, devices, encoder, num_labels)
  if not cost.get('flops'):
    return {}
  scale = twin.batch_size / smaller.batch_size
  return {'flops': scale * cost['flops'], 'bytes accessed': scale * cost['bytes accessed'],
          'scaled_from_batch': cost.get('scaled_from_batch', smaller.batch_size)}


def plan_run(config, target: accelerators.Target, devices, *, encoder=None,
             num_labels: int = 527, gpu_memory_fraction: float = JAX_GPU_MEMORY_FRACTION,
             run_clips: int | None = None, with_eval: bool = True,
             with_estimate: bool = True) -> dict:
  """The record of `config` on `target` (see the module docstring); ConfigError in one
  line where the config cannot run there. `with_estimate=False` leaves out the FLOPs,
  bytes and time (`add_estimate` adds them), which for a looped TPU step cost another
  compile."""
  chip = target.chip
  built = build(config, devices, encoder, num_labels)
  if built.dtype not in chip.peak_flops:
    raise ConfigError(f'dtype {built.dtype} is not supported by the {chip.name} '
                      f'(it has {", ".join(chip.dtypes)}): set --config.dtype=float32')
  capacity = chip.memory_bytes if chip.platform == 'tpu' else int(
      chip.memory_bytes * gpu_memory_fraction)
  count = len(devices)
  record = {'target': target.name, 'device_kind': devices[0].device_kind, 'devices': count,
            'hosts': target.hosts, 'slices': target.slices, 'task': built.task,
            'dtype': built.dtype, 'batch_size': built.batch_size,
            'batch_per_device': built.batch_size / count,
            'capacity_bytes_per_device': capacity}
  record.update(_settings_summary(config))
  looped = _looped(config)
  train = compile_step(built.train, chip.platform)
  record['compile_s'] = round(train['compile_s'], 1)
  state = state_bytes(built.state)
  record['memory'] = {**state, 'batch': _batch_bytes(built)}
  if 'exhausted' in train:
    if chip.platform == 'tpu' and not looped:
      remember_target_cost(target.name, config, None)
    record.update(fits=False, peak_bytes_per_device=None, margin_bytes=None,
                  compiler_error=train['exhausted'])
    return record
  memory = train['memory']
  record['memory'].update(temporaries=memory['temporaries'], arguments=memory['arguments'],
                          outputs=memory['outputs'], aliased=memory['aliased'])
  record.update(peak_bytes_per_device=memory['peak'], fits=memory['peak'] <= capacity,
                margin_bytes=capacity - memory['peak'], xla_options=train['xla_options'])
  record['collectives'] = collectives.summary(train['compiled'].as_text())
  if not looped and train['cost'].get('flops'):
    remember_target_cost(target.name, config, train['cost'])
  if with_estimate:
    add_estimate(record, config, target, devices, encoder=encoder, num_labels=num_labels,
                 run_clips=run_clips)
  if with_eval:
    evaluation = compile_step(built.evaluate, chip.platform)
    if 'exhausted' in evaluation:
      record['eval'] = {'fits': False, 'peak_bytes_per_device': None}
    else:
      peak = evaluation['memory']['peak']
      record['eval'] = {'fits': peak <= capacity, 'peak_bytes_per_device': peak,
                        'compile_s': round(evaluation['compile_s'], 1)}
    record['fits'] = record['fits'] and record['eval']['fits']
  return record


def _batch_bytes(built: Build) -> int:
  batch = built.train.args[1]
  return math.prod(batch.sharding.shard_shape(batch.shape)) * 4


def _settings_summary(config) -> dict:
  keys = ('remat', 'remat_policy', 'fsdp', 'grad_accum_steps', 'joint_passes')
  out = {}
  for key in keys:
    for node in (config, config.get('model', {})):
      if key in node:
        out[key] = node[key]
  return out


def _looped(config) -> bool:
  return 'model' in config and bool(config.remat or config.grad_accum_steps > 1)


def add_estimate(record: dict, config, target: accelerators.Target, devices, *,
                 encoder=None, num_labels: int = 527, run_clips: int | None = None) -> dict:
  """Adds to `config`'s compiled `record` its FLOPs and bytes per device, where they come
  from (`cost_source`), the recomputation factor and the roofline estimate; returns it."""
  chip, count, looped = target.chip, len(devices), _looped(config)
  cost = (_target_twin_cost(target.name, config, devices, encoder, num_labels)
          if chip.platform == 'tpu' else {})
  compiled_cost = bool(cost.get('flops'))  # the target compile's, for the whole step
  if not compiled_cost:
    # A GPU compile without a device counts nothing.
    memory = record['memory']
    cost = {'flops': cpu_flops(config, encoder, num_labels) / count,
            'bytes accessed': memory['arguments'] + memory['outputs']
                              + 2 * memory['temporaries']}
    record['cost_source'] = ('FLOPs: the step without loops lowered for the CPU / devices; '
                             'bytes: arguments + outputs + twice the temporaries (a lower bound)')
  else:
    scaled = cost.get('scaled_from_batch')
    record['cost_source'] = (
        'target compile' if not looped else 'target compile of the step without loops'
        + (f' at batch {scaled}, scaled to {record["batch_size"]}' if scaled else ''))
    optimal = cost.get('optimal_seconds')
    record['tpu_cost_model_s'] = optimal if optimal and optimal > 0 else None
  remat = looped and config.remat
  factor = roofline.recompute_factor(
      remat, config.get('remat_policy', ''), resolve_any(config)[0].model if remat else None)
  record['recompute_factor'] = factor
  record.update(roofline.estimate(chip, record['dtype'], cost,
                                  record['collectives']['total_bytes'], record['batch_size'],
                                  count, run_clips, factor,
                                  bytes_recompute=factor if compiled_cost else 1.0))
  return record
