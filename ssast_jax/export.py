"""Export a training run's parameters in the original PyTorch layout.

python -m ssast_jax.export --workdir W --out model.pth [--which best|latest|STEP]
"""

from __future__ import annotations

import argparse

import jax

from ssast_jax import api
from ssast_jax.config.settings import resolve_saved
from ssast_jax.model import abstract_model
from ssast_jax.training import checkpoints
from ssast_jax.training.state import init_state


def workdir_params(workdir: str, which: str | int = 'latest'):
  """(settings, step, parameters) of the `which` ('best', 'latest' or a step number)
  checkpoint of a training run: the run's saved config and only the parameters (no optimiser state), on
  this process's first device whatever the run's mesh was."""
  settings = resolve_saved(checkpoints.read_config(workdir))
  mngr = checkpoints.manager(workdir, settings.objective.task, settings.run.keep_checkpoints)
  try:
    if isinstance(which, int):
      step = which
      if step not in mngr.all_steps():
        raise FileNotFoundError(f'{checkpoints.checkpoint_dir(workdir)}: no checkpoint of step '
                                f'{step} (there are: {sorted(mngr.all_steps())})')
    else:
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


def export(workdir: str, out: str, which: str | int = 'best') -> int:
  """Writes the `which` checkpoint of `workdir` to `out`; returns its step."""
  settings, step, params = workdir_params(workdir, which)
  graphdef, _ = abstract_model(settings.model)
  api.to_pytorch(api.ModelHandle(settings.model, graphdef, params), out)
  return step


def _which(text: str) -> str | int:
  if text in ('best', 'latest'):
    return text
  if text.isdigit():
    return int(text)
  raise argparse.ArgumentTypeError(f"expected 'best', 'latest' or a step number, got {text!r}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog='python -m ssast_jax.export',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir', required=True, help='the training run directory')
  parser.add_argument('--out', required=True, help='the .pth file to write')
  parser.add_argument('--which', type=_which, default='best',
                      help='best validation checkpoint (default), the latest, or a step number')
  args = parser.parse_args(argv)
  try:
    step = export(args.workdir, args.out, args.which)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f'error: {e}') from None
  print(f'wrote {args.out} from the {args.which} checkpoint (step {step}) of {args.workdir}')


if __name__ == '__main__':
  main()
