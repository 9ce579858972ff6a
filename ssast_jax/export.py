"""Export a training run's parameters in the original PyTorch layout.

python -m ssast_jax.export --workdir W --out model.pth [--which best|latest]
"""

from __future__ import annotations

import argparse

import jax

from ssast_jax import api
from ssast_jax.config.settings import resolve_saved
from ssast_jax.model import abstract_model
from ssast_jax.training import checkpoints
from ssast_jax.training.state import init_state


def workdir_params(workdir: str, which: str = 'latest'):
  """(settings, step, parameters) of the `which` ('best' or 'latest') checkpoint of a
  training run: the run's saved config and only the parameters (no optimiser state), on
  this process's first device whatever the run's mesh was."""
  settings = resolve_saved(checkpoints.read_config(workdir))
  mngr = checkpoints.manager(workdir, settings.objective.task, settings.run.keep_checkpoints)
  try:
    step = mngr.best_step() if which == 'best' else mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f'{checkpoints.checkpoint_dir(workdir)}: no checkpoint to load')
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract_params = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
        jax.eval_shape(lambda: init_state(settings.model, 0, settings.optim.lr))['params'])
    params = checkpoints.restore_params(mngr, step, abstract_params)
  finally:
    mngr.close()
  return settings, step, params


def export(workdir: str, out: str, which: str = 'best') -> int:
  """Writes the `which` checkpoint of `workdir` to `out`; returns its step."""
  settings, step, params = workdir_params(workdir, which)
  graphdef, _ = abstract_model(settings.model)
  api.to_pytorch(api.ModelHandle(settings.model, graphdef, params), out)
  return step


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog='python -m ssast_jax.export',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help='the training run directory')
  parser.add_argument('--out', required=True, help='the .pth file to write')
  parser.add_argument('--which', choices=('best', 'latest'), default='best',
                      help='best validation checkpoint (default) or the latest')
  args = parser.parse_args(argv)
  try:
    step = export(args.workdir, args.out, args.which)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f'error: {e}') from None
  print(f'wrote {args.out} from the {args.which} checkpoint (step {step}) of {args.workdir}')


if __name__ == '__main__':
  main()
