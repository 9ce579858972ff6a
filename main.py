"""Pretrains SSAST: python main.py --config=configs/pretrain_joint.py --workdir=EXP, or
fine-tunes it: python main.py --config=configs/finetune.py --config.pretrained=PTH ... .

Keys of the config are overridden with --config.KEY=VALUE (docs/configuration.md lists them). Re-running
the same command resumes from the latest checkpoint in the workdir. In a job of several
processes (SLURM, Open MPI, Cloud TPU, Kubernetes, or the explicit --coordinator_address,
--num_processes and --process_id flags) jax.distributed is initialised first. Exit codes:
ssast_jax/training/faults.py and docs/training.md ("Faults").
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from ssast_jax.config import command_line
from ssast_jax.training import faults, host_allocator

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints and logs.')
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    'coordinator_address', None, 'host:port of process 0, for jax.distributed.initialize.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the job.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process: 0 .. num_processes-1.')
_TUNE_CPU_ALLOCATOR = flags.DEFINE_bool(
    'tune_cpu_allocator', True, 'On a CPU backend, restart once with glibc malloc tunables '
    'that make the step faster (ssast_jax/training/host_allocator.py).')
_VERIFY_DATA = flags.DEFINE_bool(
    'verify_data', False, "Before step 0, also check every shard's content hash against the "
    "manifest (the sizes are always checked).")
flags.mark_flags_as_required(['config', 'workdir'])


def _cluster_process_count() -> int:
  """Processes in the job according to JAX's own cluster detection; 1 outside a cluster.

  Mirrors `jax.distributed.initialize()`'s choice of environment in jax 0.10.2: SLURM
  (SLURM_NTASKS), Open MPI (OMPI_COMM_WORLD_SIZE), Cloud TPU VMs on GCE and GKE (the
  slice's worker list), Kubernetes Jobs. The private list is the only place JAX exposes it.
  It is unchanged up to jax 0.11.1's development tree; should a later jax move it, SLURM
  and Open MPI jobs are still recognised from their environment (docs/versions.md).
  """
  try:
    from jax._src import clusters  # pylint: disable=import-outside-toplevel
    cluster_types = clusters.ClusterEnv._cluster_types  # pylint: disable=protected-access
    found = next((env for env in cluster_types
                  if not env.opt_in_only_method and env.is_env_present()), None)
  except (ImportError, AttributeError):
    return _environment_process_count()
  return found.get_process_count() if found else 1


def _environment_process_count() -> int:
  """SLURM's and Open MPI's process count as jax's SlurmCluster and OmpiCluster read it; 1
  elsewhere (Cloud TPU and Kubernetes jobs then need --num_processes and the other flags)."""
  slurm = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
           'SLURM_LOCALID')
  if 'OMPI_MCA_orte_hnp_uri' in os.environ:
    return int(os.environ['OMPI_COMM_WORLD_SIZE'])
  if all(name in os.environ for name in slurm):
    return int(os.environ['SLURM_NTASKS'])
  logging.warning('jax has no cluster list where main.py looks for it (jax._src.clusters); '
                  'Cloud TPU and Kubernetes jobs are not detected: pass --num_processes, '
                  '--process_id and --coordinator_address')
  return 1


def _initialize_distributed(workdir: str) -> None:
  """jax.distributed.initialize when flags ask for it or the job spans several processes;
  then native logs go to WORKDIR/logs/process_I.log (faults.send_native_logs_to)."""
  import jax  # pylint: disable=import-outside-toplevel
  from ssast_jax.config.settings import ConfigError  # pylint: disable=import-outside-toplevel
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
  faults.send_native_logs_to(
      os.path.join(os.path.abspath(workdir), 'logs', f'process_{jax.process_index()}.log'))
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
  if _TUNE_CPU_ALLOCATOR.value:
    host_allocator.restart_with_tuned_allocator()
  # JAX and the model load only now, in the process that trains: a restart above replaces
  # this one, and pretraining configs load without them.
  # pylint: disable=import-outside-toplevel
  from ssast_jax.config.finetune import TASKS as FINETUNE_TASKS
  from ssast_jax.config.settings import ConfigError
  from ssast_jax.training.checkpoints import ProcessCountError
  config = _CONFIG.value
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO
  # Fine-tuning configs (configs/finetune*.py) set a fine-tuning task; the rest pretrain.
  if config.get('task') in FINETUNE_TASKS:
    from ssast_jax.finetune import train  # pylint: disable=import-outside-toplevel
  else:
    from ssast_jax.training import train  # pylint: disable=import-outside-toplevel
  try:
    _initialize_distributed(_WORKDIR.value)
    train.train_and_evaluate(config, _WORKDIR.value, verify_data=_VERIFY_DATA.value)
  except ConfigError as error:
    command_line.fail(str(error))
  except faults.Preempted as error:
    print(str(error), file=sys.stderr)
    sys.exit(faults.EXIT_PREEMPTED)
  except faults.CheckpointWriteError as error:  # exit at once: orbax's failed writes would
    faults.exit_now(str(error), faults.EXIT_CHECKPOINT_WRITE)  # log again at shutdown
  except ProcessCountError as error:  # exit at once: the checkpoint manager's threads can
    faults.exit_now(str(error), faults.EXIT_BAD_INPUT)  # still fail at interpreter shutdown
  except train.INPUT_ERRORS as error:
    command_line.fail(str(error))
  except train.TrainingError as error:
    command_line.fail(str(error), faults.EXIT_ERROR)


if __name__ == '__main__':
  app.run(main, flags_parser=command_line.parse_flags)
