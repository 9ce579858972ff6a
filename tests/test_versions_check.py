"""benchmarks/versions_check.py: the first step of the GPU benchmark kit (docs/versions.md)."""

import os
import subprocess
import sys

from runs import ROOT

SCRIPT = os.path.join(ROOT, 'benchmarks', 'versions_check.py')


def _check(*args, prelude=''):
  code = (f'import runpy, sys; {prelude}sys.argv = [{SCRIPT!r}, *{list(args)!r}]; '
          f'runpy.run_path({SCRIPT!r}, run_name="__main__")')
  return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'), check=False)


def test_versions_check_passes_here_and_lists_versions_devices_and_modules():
  result = _check()
  assert result.returncode == 0, result.stdout + result.stderr
  lines = result.stdout.splitlines()
  for name in ('python', 'jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'grain',
               'ml_collections', 'numpy', 'jax backend', 'nnx state paths'):
    assert any(line.startswith(name + ' ') for line in lines), name
  assert "['kernel'].value" in result.stdout
  assert ' 0 failed, 0 without an optional package' in result.stdout
  assert lines[-1] == 'versions check: ok'


def test_versions_check_fails_on_a_missing_package_but_not_an_optional_one():
  hidden = "sys.modules['torch'] = None; "
  result = _check(prelude=hidden)
  assert result.returncode == 0, result.stdout + result.stderr
  assert 'optional  ssast_jax.hear: ModuleNotFoundError' in result.stdout
  assert _check('--strict', prelude=hidden).returncode == 1
  result = _check(prelude="sys.modules['tqdm'] = None; ")
  assert result.returncode == 1
  assert 'FAILED    ssast_jax.training.train: ModuleNotFoundError' in result.stdout
  assert result.stderr.splitlines()[-1] == 'versions check: FAILED'
