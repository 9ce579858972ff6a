"""The first step of a benchmark run on a new machine: versions, devices, and every module.

python benchmarks/versions_check.py [--strict]

Prints the versions of Python, jax, jaxlib (and any jax plugins), flax, optax,
orbax-checkpoint, grain, ml_collections and numpy, the JAX backend and its devices, the key
paths an `nnx.State` gives its parameters (they name the arrays in checkpoints), then
imports every ssast_jax module (not `ssast_jax.plan.__main__`, which pins JAX to the CPU)
and reports each import error with its last line. Exit status 1 when an import failed, so
that an incompatibility with the machine's packages (docs/versions.md) costs seconds, not a
compiled run. A module that fails only because an optional package of its own is missing
(torch, transformers, safetensors: the PyTorch and transformers interchange and HEAR) is
reported but does not fail the check unless --strict. Takes a few seconds; runs nothing on
the devices.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import pkgutil
import platform
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DISTRIBUTIONS = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain',
                 'ml_collections', 'numpy')
PLUGIN_PREFIXES = ('jax-cuda', 'jax_cuda', 'jax-rocm', 'jax_rocm', 'libtpu')
# Only these may be missing without failing the check (requirements.txt: torch reads and
# writes .pt/.pth files, transformers and safetensors serve the transformers interchange).
OPTIONAL_PACKAGES = frozenset({'torch', 'transformers', 'safetensors'})
SKIPPED_MODULES = frozenset({'ssast_jax.plan.__main__'})


def distribution_version(name: str) -> str:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return 'not installed'


def plugin_versions() -> list[str]:
  """'name version' of the installed jax plugins (CUDA, ROCm) and libtpu."""
  found = set()
  for dist in importlib.metadata.distributions():
    name = dist.metadata['Name'] or ''
    if name.lower().startswith(PLUGIN_PREFIXES):
      found.add(f'{name} {dist.version}')
  return sorted(found)


def print_versions() -> None:
  print(f'python            {platform.python_version()} ({sys.executable})')
  for name in DISTRIBUTIONS:
    print(f'{name:<17} {distribution_version(name)}')
  plugins = plugin_versions()
  print(f'{"jax plugins":<17} {", ".join(plugins) if plugins else "none"}')


def print_backend() -> bool:
  """The backend and devices; False where JAX cannot import or start a backend."""
  try:
    import jax  # pylint: disable=import-outside-toplevel
    devices = jax.devices()
  except Exception:  # pylint: disable=broad-except
    print('jax backend       FAILED')
    traceback.print_exc(limit=3)
    return False
  kinds = sorted({d.device_kind for d in devices})
  print(f'jax backend       {jax.default_backend()}: {len(devices)} device(s) '
        f'({", ".join(kinds)}); {jax.process_count()} process(es)')
  print(f'jax devices       {", ".join(str(d) for d in devices[:8])}'
        f'{" ..." if len(devices) > 8 else ""}')
  return True


def print_state_layout() -> None:
  """The key path of a parameter in an `nnx.State`, which names the arrays of the orbax
  checkpoints (`['kernel'].value` with flax 0.12.8): a change means checkpoints written with
  one flax may not restore with the other (docs/versions.md). Shapes only, no device work."""
  try:
    import jax  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel
    state = nnx.state(nnx.eval_shape(lambda: nnx.Linear(2, 3, rngs=nnx.Rngs(0))), nnx.Param)
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(state)]
  except Exception as error:  # pylint: disable=broad-except
    paths = [f'FAILED: {type(error).__name__}: {error}']
  print(f'{"nnx state paths":<17} {", ".join(paths)}')


def module_names() -> list[str]:
  """ssast_jax and its modules, from the source tree (a package that fails to import is
  listed, its modules not: its own import reports the error)."""
  names = ['ssast_jax'] + [info.name for info in pkgutil.walk_packages(
      [os.path.join(ROOT, 'ssast_jax')], 'ssast_jax.', onerror=lambda name: None)]
  return [name for name in names if name not in SKIPPED_MODULES]


def import_all() -> tuple[list[str], list[str], list[str]]:
  """(imported, failed, optional-only) module names, each failure printed."""
  imported, failed, optional = [], [], []
  for name in module_names():
    try:
      importlib.import_module(name)
    except Exception as error:  # pylint: disable=broad-except
      missing = getattr(error, 'name', None) if isinstance(error, ModuleNotFoundError) else None
      last = traceback.format_exception_only(type(error), error)[-1].strip()
      if missing and missing.split('.')[0] in OPTIONAL_PACKAGES:
        optional.append(name)
        print(f'  optional  {name}: {last}')
      else:
        failed.append(name)
        print(f'  FAILED    {name}: {last}')
    else:
      imported.append(name)
  return imported, failed, optional


def main(argv: list[str]) -> int:
  strict = '--strict' in argv[1:]
  unknown = [arg for arg in argv[1:] if arg != '--strict']
  if unknown:
    print(f'usage: {argv[0]} [--strict]; unknown: {" ".join(unknown)}', file=sys.stderr)
    return 2
  start = time.perf_counter()
  print_versions()
  backend_ok = print_backend()
  if backend_ok:
    print_state_layout()
  print('importing the ssast_jax modules:')
  imported, failed, optional = import_all()
  failing = failed + (optional if strict else [])
  print(f'{len(imported)} imported, {len(failed)} failed, {len(optional)} without an optional '
        f'package; {time.perf_counter() - start:.1f} s')
  if not backend_ok or failing:
    print('versions check: FAILED', file=sys.stderr)
    return 1
  print('versions check: ok')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv))
