"""Pretrains SSAST: python main.py --config=configs/pretrain_joint.py --workdir=EXP.

Keys of the config are overridden with --config.KEY=VALUE (docs/configuration.md lists them). Re-running
the same command resumes from the latest checkpoint in the workdir. In a job of several
processes (SLURM, Open MPI, Cloud TPU, Kubernetes, or the explicit --coordinator_address,
--num_processes and --process_id flags) jax.distributed is initialised first.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ssast_jax.config.settings import ConfigError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, for jax.distributed.initialize.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process: 0 .. num_processes-1.')
flags.mark_flags_as_required(['config', 'workdir'])


def _fail(message: str):
  """Ends the program with one line on stderr and exit code 2."""
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _parse_flags(argv):
  """absl's flag parsing; a --config.KEY the config does not have ends in one line."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as error:  # ml_collections: AttributeError(KeyError(msg))
    cause = error.args[0] if error.args else error
    detail = cause.args[0] if isinstance(cause, KeyError) and cause.args else str(cause)
    _fail('--config: unknown config key ' + ' '.join(str(detail).split()))


def _cluster_process_count() -> int:
  """Processes in the job according to JAX's own cluster detection; 1 outside a cluster.

  Mirrors `jax.distributed.initialize()`'s choice of environment in jax 0.10.2: SLURM
  (SLURM_NTASKS), Open MPI (OMPI_COMM_WORLD_SIZE), Cloud TPU VMs on GCE and GKE (the
  slice's worker list), Kubernetes Jobs. The private list is the only place JAX exposes it.
  """
  from jax._src import clusters  # pylint: disable=import-outside-toplevel
  for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if not env.opt_in_only_method and env.is_env_present():
      return env.get_process_count()
  return 1


def _initialize_distributed() -> None:
  """jax.distributed.initialize when flags ask for it or the job spans several processes."""
  import jax  # pylint: disable=import-outside-toplevel
  explicit = {'coordinator_address': _COORDINATOR_ADDRESS.value,
              'num_processes': _NUM_PROCESSES.value, 'process_id': _PROCESS_ID.value}
  if any(value is not None for value in explicit.values()):
    try:
      jax.distributed.initialize(**explicit)  # unset ones are auto-detected
    except (ValueError, TypeError) as error:
      raise ConfigError(f'--coordinator_address/--num_processes/--process_id: {error}') from None
  elif _cluster_process_count() > 1:
    jax.distributed.initialize()
  else:
    return
  if jax.process_index() != 0:
    # Only process 0 reports progress; the others keep stderr for errors. Standard output
    # is closed at the file-descriptor level, where collective libraries (gloo) print.
    logging.set_verbosity(logging.ERROR)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
  logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config_path = config_flags.get_config_filename(flags.FLAGS['config'])
  if not os.path.isfile(config_path):
    _fail(f'--config: file not found: {config_path}')
  config = _CONFIG.value
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO
  from ssast_jax.training import train  # pylint: disable=import-outside-toplevel
  try:
    _initialize_distributed()
    train.train_and_evaluate(config, _WORKDIR.value)
  except ConfigError as error:
    _fail(str(error))
  except train.RUN_ERRORS as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
