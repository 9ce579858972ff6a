"""Accelerator targets compiled for without being present: TPU slices and NVIDIA GPU nodes.

A target name says the chip and how many: TPU slices by their usual names (`v5e-8`,
`v6e-256`, `v5p-64`, `v4-32`; `2xv5e-256` for two slices) and GPUs as `h100` (one),
`h100x8` (one host of eight) or `h100:4x8` (four hosts of eight). `devices(target)` gives
the JAX devices of its topology, from libtpu for TPUs and from XLA's GPU target
description (`ssast_jax/target_specs/`) for GPUs; compiling for them needs the optional
backends of `requirements-compile.txt` and `JAX_PLATFORMS=cpu`.

The chip figures are the vendors' published ones (memory, dense peak FLOP/s, memory and
interconnect bandwidth); they feed the fit decision on GPUs (XLA does not check GPU memory
at compile time) and the roofline estimate. float32 matmuls run at XLA's default precision:
one bfloat16 pass on TPUs, TF32 tensor cores on A100 and newer, plain FP32 on the V100.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import sys

SPECS_DIR = os.path.join(os.path.dirname(__file__), 'target_specs')
# Where requirements-compile.txt is installed (`pip install --no-deps --target DIR`).
BACKENDS_DIR = os.environ.get('SSAST_COMPILE_BACKENDS') or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), '.compile-backends')
GiB = 2 ** 30


def use_compile_backends() -> None:
  """Puts the compile-only backends on this process's path and keeps JAX on the CPU (it
  must not start the absent accelerators' runtimes); to be called before JAX is imported.
  Only the plan and the tests do: other programs never see these backends."""
  if os.path.isdir(BACKENDS_DIR) and BACKENDS_DIR not in sys.path:
    sys.path.append(BACKENDS_DIR)
  os.environ['JAX_PLATFORMS'] = 'cpu'
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')  # no TPU VM to ask
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # compiling, never running


def cuda_compile_options() -> dict:
  """XLA options for compiling for NVIDIA GPUs without them: the CUDA 12 ptxas of
  requirements-compile.txt (nvidia-cuda-nvcc-cu12, matching the CUDA 12 plugin; CUDA 13's
  no longer assembles for the V100) where it is installed, else none (XLA looks for ptxas
  on PATH)."""
  try:
    spec = importlib.util.find_spec('nvidia.cuda_nvcc')
  except ImportError:
    spec = None
  for root in (spec.submodule_search_locations or []) if spec else []:
    if os.path.exists(os.path.join(root, 'bin', 'ptxas')):
      return {'xla_gpu_cuda_data_dir': root}
  return {}


@dataclasses.dataclass(frozen=True)
class Chip:
  """One chip kind: `memory_bytes` (HBM), dense peak FLOP/s by compute dtype, memory
  bandwidth and per-chip interconnect bandwidth (bytes/s)."""
  name: str
  platform: str  # 'tpu' or 'cuda'
  memory_bytes: int
  peak_flops: dict  # {'bfloat16': ..., 'float32': ...}; a dtype it lacks is absent
  memory_bandwidth: float
  interconnect_bandwidth: float
  topology_name: str = ''  # TPU: libtpu's generation prefix
  cores_per_chip_in_name: int = 1  # v4 and v5p names count TensorCores, two a chip
  spec_file: str = ''  # GPU: XLA's target description in SPECS_DIR

  @property
  def dtypes(self) -> tuple[str, ...]:
    return tuple(self.peak_flops)


CHIPS = {
    # TPUs (cloud.google.com/tpu/docs/system-architecture-tpu-vm).
    'v4': Chip('TPU v4', 'tpu', 32 * GiB, {'bfloat16': 275e12, 'float32': 275e12},
               1228e9, 300e9, 'v4', 2),
    'v5e': Chip('TPU v5e', 'tpu', 16 * GiB, {'bfloat16': 197e12, 'float32': 197e12},
                819e9, 200e9, 'v5e'),
    'v5p': Chip('TPU v5p', 'tpu', 95 * GiB, {'bfloat16': 459e12, 'float32': 459e12},
                2765e9, 600e9, 'v5', 2),
    'v6e': Chip('TPU v6e', 'tpu', 32 * GiB, {'bfloat16': 918e12, 'float32': 918e12},
                1640e9, 448e9, 'v6e'),
    # NVIDIA data sheets, SXM parts, dense tensor-core peaks (float32: TF32, V100: FP32).
    'v100': Chip('V100 32GB', 'cuda', 32 * GiB, {'float32': 15.7e12}, 900e9, 300e9,
                 spec_file='v100_32gb.txtpb'),
    'a100': Chip('A100 80GB', 'cuda', 85100068864, {'bfloat16': 312e12, 'float32': 156e12},
                 2039e9, 600e9, spec_file='a100_sxm_80.txtpb'),
    'h100': Chip('H100 80GB', 'cuda', 84942979072, {'bfloat16': 989e12, 'float32': 494.7e12},
                 3352e9, 900e9, spec_file='h100_sxm.txtpb'),
    'h200': Chip('H200 141GB', 'cuda', 151397597184, {'bfloat16': 989e12, 'float32': 494.7e12},
                 4800e9, 900e9, spec_file='h200.txtpb'),
    'b200': Chip('B200', 'cuda', 191514411008, {'bfloat16': 2250e12, 'float32': 1125e12},
                 7672e9, 1800e9, spec_file='b200.txtpb'),
}
TPU_ALIASES = {'v5litepod': 'v5e', 'v6litepod': 'v6e'}


class TargetError(ValueError):
  """A target name this tool cannot build."""


@dataclasses.dataclass(frozen=True)
class Target:
  """A named set of chips: `slices` x `hosts` x `per_host` (TPUs: `chips` per slice)."""
  name: str
  chip: Chip
  chips: int  # per slice (TPU) or in all (GPU)
  slices: int = 1
  hosts: int = 1

  @property
  def device_count(self) -> int:
    return self.chips * self.slices


def parse(name: str) -> Target:
  """The Target of a name (see the module docstring); TargetError names what is wrong."""
  text = name.strip().lower()
  gpu = re.fullmatch(r'([a-z]\d+)(?:x(\d+)|:(\d+)x(\d+))?', text)
  if gpu and gpu.group(1) in CHIPS and CHIPS[gpu.group(1)].platform == 'cuda':
    chip = CHIPS[gpu.group(1)]
    if gpu.group(3):
      hosts, per_host = int(gpu.group(3)), int(gpu.group(4))
    else:
      hosts, per_host = 1, int(gpu.group(2) or 1)
    if hosts < 1 or per_host < 1:
      raise TargetError(f'target {name!r}: host and GPU counts must be at least 1')
    return Target(name, chip, hosts * per_host, hosts=hosts)
  tpu = re.fullmatch(r'(?:(\d+)x)?([a-z0-9]+)-(\d+)', text)
  if tpu:
    kind = TPU_ALIASES.get(tpu.group(2), tpu.group(2))
    if kind in CHIPS and CHIPS[kind].platform == 'tpu':
      chip, size = CHIPS[kind], int(tpu.group(3))
      chips = size // chip.cores_per_chip_in_name
      if size % chip.cores_per_chip_in_name or not _tpu_shape(chip, chips):
        sizes = [chip.cores_per_chip_in_name * 2 ** i for i in range(8)
                 if _tpu_shape(chip, 2 ** i)][:4]
        raise TargetError(f'target {name!r}: no {chip.name} slice of that size (sizes are '
                          f'powers of two: {", ".join(f"{kind}-{n}" for n in sizes)}, ...)')
      return Target(name, chip, chips, slices=int(tpu.group(1) or 1))
  known = ', '.join(f'{k}-N' if c.platform == 'tpu' else f'{k}[xN|:HxN]'
                    for k, c in CHIPS.items())
  raise TargetError(f'unknown target {name!r}; known: {known} (e.g. v5e-8, v5p-64, 2xv6e-256, '
                    f'h100x8, h100:4x8)')


def _tpu_shape(chip: Chip, chips: int) -> tuple[int, ...] | None:
  """The slice's chip grid: 2-D for v5e/v6e, 3-D (doubling the smallest axis, the last on
  ties: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...) for v4/v5p; None for other counts."""
  if chips < 1 or chips & (chips - 1):
    return None
  if chip.cores_per_chip_in_name == 1:  # 1x1, 2x2, 2x4, 4x4, 4x8, ..., 16x16
    if chips == 2:
      return (1, 2)
    rows = 2 ** ((chips.bit_length() - 1) // 2)
    return (rows, chips // rows)
  if chips < 4:
    return None
  dims = [2, 2, 1]
  while dims[0] * dims[1] * dims[2] < chips:
    smallest = min(dims)
    index = max(i for i, d in enumerate(dims) if d == smallest)
    dims[index] *= 2
  return tuple(dims)


# Words of a JAX device_kind that name the chip (first match wins: 'v5 lite' before 'v5').
_KINDS = (('v5 lite', 'v5e'), ('v6 lite', 'v6e'), ('tpu v5', 'v5p'), ('tpu v4', 'v4'),
          ('v100', 'v100'), ('a100', 'a100'), ('h100', 'h100'), ('h200', 'h200'),
          ('b200', 'b200'))


def chip_of(device_kind: str) -> Chip | None:
  """The Chip of a real device's `device_kind` (e.g. 'NVIDIA H100 80GB HBM3'), or None."""
  kind = device_kind.lower()
  return next((CHIPS[name] for words, name in _KINDS if words in kind), None)


def spec_text(chip: Chip) -> str:
  """XLA's GPU target description of `chip` (a data file of this package)."""
  with open(os.path.join(SPECS_DIR, chip.spec_file)) as f:
    return f.read()


def devices(target: Target) -> list:
  """The JAX devices of the target's topology (compile-only: nothing runs on them)."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  chip = target.chip
  try:
    if chip.platform == 'cuda':
      per_host = target.chips // target.hosts
      topology = topologies.get_topology_desc(
          platform='cuda', target_config=spec_text(chip),
          topology=f'1x{target.hosts}x{per_host}')
    else:
      shape = 'x'.join(map(str, _tpu_shape(chip, target.chips)))
      options = {'chip_config_name': 'megacore'} if chip.cores_per_chip_in_name > 1 else {}
      if target.chips < 4:
        options['chips_per_host_bounds'] = _tpu_shape(chip, target.chips) + (1,) * (
            3 - len(_tpu_shape(chip, target.chips)))
      topology = topologies.get_topology_desc(
          platform='tpu', topology_name=f'{chip.topology_name}:{shape}',
          num_slices=target.slices, **options)
  except Exception as error:  # the plugin is missing or refuses the topology
    raise TargetError(f'target {target.name!r}: cannot build its topology ({error}); the '
                      f'compile-only backends come from requirements-compile.txt: pip install '
                      f'--no-deps --target {BACKENDS_DIR} -r requirements-compile.txt') from None
  return list(topology.devices)
