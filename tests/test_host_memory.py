"""Host memory: freed temporaries are reused, not faulted in again at every execution.

Each case runs in its own process, because the setting must precede JAX's CPU client.
"""

import subprocess
import sys

from runs import ROOT, env

# Page faults per execution of a program whose temporaries (sin, cos and the matmul's
# packing buffers of 3072 x 3072 floats) are allocated and freed at every call.
_FAULTS_PER_CALL = """
import resource
from ssast_jax import host_memory
print(host_memory.reuse_freed_memory())
import jax, jax.numpy as jnp
program = jax.jit(lambda x: (jnp.sin(x) @ jnp.cos(x)).sum())
x = jnp.ones((3072, 3072))
program(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  program(x).block_until_ready()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""


def _faults_per_call(glibc_tunables=None) -> tuple[str, float]:
  run_env = env()
  run_env.pop('GLIBC_TUNABLES', None)
  if glibc_tunables:
    run_env['GLIBC_TUNABLES'] = glibc_tunables
  out = subprocess.run([sys.executable, '-c', _FAULTS_PER_CALL], env=run_env, cwd=ROOT,
                       capture_output=True, text=True, check=True, timeout=300).stdout.split()
  return out[0], float(out[1])


def test_freed_memory_is_reused_unless_glibc_tunables_say_otherwise():
  set_here, reused = _faults_per_call()
  # An explicit malloc tunable (here glibc's own default arena count) opts out.
  set_by_user, returned = _faults_per_call('glibc.malloc.arena_max=16')
  assert (set_here, set_by_user) == ('True', 'False')
  # Returned to the kernel, the temporaries (9.2k pages per 3072^2 array) fault in again.
  assert returned > 20 * reused, (returned, reused)
  assert returned > 100_000
