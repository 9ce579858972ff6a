"""Reading this project's training runs: the model of a pretraining or fine-tuning workdir.

A pretraining run's geometry is its saved config. A fine-tuning run's classifier takes its
encoder's geometry from the pretrained model, so the run records it in `WORKDIR/model.json`
(with the pooling, the label names and the normalisation) when it starts; every reader
takes it from there. Parameters are read from the orbax checkpoints alone, without the
optimiser state, onto this process's first device whatever the run's mesh was.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
from flax import nnx

from ssast_jax.config.settings import resolve_saved
from ssast_jax.handles import classifier_from_params, handle_from_params
from ssast_jax.model.classifier import ClassifierConfig, abstract_classifier
from ssast_jax.training import checkpoints, metrics
from ssast_jax.training.state import init_state

MODEL_FILE = 'model.json'
FINETUNE_TASKS = ('ft_avgtok', 'ft_cls')
RESULT_FILE = 'result.csv'


def is_run(path) -> bool:
  """Whether `path` is a training workdir of this project (its saved config is there)."""
  return os.path.isfile(os.path.join(path, checkpoints.CONFIG_FILE)) and os.path.isdir(
      checkpoints.checkpoint_dir(path))


def _step(mngr, workdir: str, which: str | int) -> int:
  """The checkpoint step `which` ('best' (the latest where no step has a metric),
  'latest' or a step number) names."""
  if isinstance(which, int):
    if which not in mngr.all_steps():
      raise FileNotFoundError(f'{checkpoints.checkpoint_dir(workdir)}: no checkpoint of step '
                              f'{which} (there are: {sorted(mngr.all_steps())})')
    return which
  if which not in ('best', 'latest'):
    raise ValueError(f"which must be 'best', 'latest' or a step number, not {which!r}")
  step = mngr.best_step() if which == 'best' else None
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'{checkpoints.checkpoint_dir(workdir)}: no checkpoint to load')
  return step


def _restore(workdir: str, which, task: str, keep: int, abstract_params, best=None):
  """(step, parameters) of the `which` checkpoint of `workdir`."""
  mngr = checkpoints.manager(workdir, task, keep, best=best)
  try:
    step = _step(mngr, workdir, which)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract_params)
    return step, checkpoints.restore_params(mngr, step, abstract)
  finally:
    mngr.close()


def workdir_params(workdir: str, which: str | int = 'latest'):
  """(settings, step, parameters) of the `which` ('best', 'latest' or a step number)
  checkpoint of a pretraining run."""
  settings = resolve_saved(checkpoints.read_config(workdir))
  abstract = jax.eval_shape(lambda: init_state(settings.model, 0, settings.optim.lr))['params']
  step, params = _restore(workdir, which, settings.objective.task,
                          settings.run.keep_checkpoints, abstract)
  return settings, step, params


def write_model_record(workdir: str, config: ClassifierConfig, labels, mean: float,
                       std: float) -> str:
  """Writes `WORKDIR/model.json`: the classifier's geometry and pooling, the label display
  names in index order and the input normalisation."""
  record = {'classifier': dataclasses.asdict(config), 'labels': list(labels),
            'mean': float(mean), 'std': float(std)}
  path = os.path.join(workdir, MODEL_FILE)
  metrics._atomic_write(path, json.dumps(record, indent=2) + '\n')  # pylint: disable=protected-access
  return path


def read_model_record(workdir: str) -> dict:
  path = os.path.join(workdir, MODEL_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: not found; fine-tuning runs write it when they start '
                            f'(rerun the run\'s main.py command once to add it)')
  with open(path) as f:
    return json.load(f)


def read_run(workdir: str, which: str | int = 'best'):
  """The handle of a training run's `which` checkpoint ('best' by the run's validation
  metric, 'latest', or a step number): a ModelHandle for a pretraining run, a
  ClassifierHandle (pooling, labels and normalisation as the run had them) for a
  fine-tuning one. `info` says where it came from."""
  workdir = os.path.abspath(workdir)
  saved = checkpoints.read_config(workdir)
  info = {'source': workdir, 'workdir': workdir, 'task': saved.get('task')}
  if saved.get('task') not in FINETUNE_TASKS:
    settings, step, params = workdir_params(workdir, which)
    data = saved.get('data', {})
    info.update(step=step, mean=data.get('mean'), std=data.get('std'))
    return handle_from_params(settings.model, _pure(params), info=info)
  record = read_model_record(workdir)
  config = ClassifierConfig(**record['classifier'])
  metric = f'eval/{saved.get("metrics", "mAP")}'
  step, params = _restore(workdir, which, saved['task'], saved.get('keep_checkpoints', 3),
                          abstract_classifier(config)[1], best=(metric, True))
  info.update(step=step, labels=record['labels'], mean=record['mean'], std=record['std'])
  return classifier_from_params(config, _pure(params), info=info)


def _pure(params) -> dict:
  """A restored parameter tree as the nested dict handles take."""
  return nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params

