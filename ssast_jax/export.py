"""Export a training run's parameters in the original PyTorch layout.

python -m ssast_jax.export --workdir W --out model.pth [--which best|latest]
"""

from __future__ import annotations

import argparse

import jax
import ml_collections

from ssast_jax import api
from ssast_jax.config.settings import resolve
from ssast_jax.model import abstract_model
from ssast_jax.training import checkpoints
from ssast_jax.training.state import init_state


def export(workdir: str, out: str, which: str = 'best') -> int:
  """Writes the `which` checkpoint of `workdir` to `out`; returns its step."""
  settings = resolve(ml_collections.ConfigDict(checkpoints.read_config(workdir)),
                     check_data=False, allow_unknown=True)
  mcfg = settings.model
  mngr = checkpoints.manager(workdir, settings.objective.task, settings.run.keep_checkpoints)
  try:
    step = mngr.best_step() if which == 'best' else mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f'{checkpoints.checkpoint_dir(workdir)}: no checkpoint to export')
    # Only the parameters, onto this process's first device, whatever the run's mesh was.
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract_params = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
        jax.eval_shape(lambda: init_state(mcfg, 0, settings.optim.lr))['params'])
    params = checkpoints.restore_params(mngr, step, abstract_params)
  finally:
    mngr.close()
  graphdef, _ = abstract_model(mcfg)
  api.to_pytorch(api.ModelHandle(mcfg, graphdef, params), out)
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
