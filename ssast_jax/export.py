"""Export a model for the original PyTorch code or for transformers.

python -m ssast_jax.export --workdir W --out model.pth [--which best|latest|STEP]
python -m ssast_jax.export --workdir FT --format=transformers --out DIR
python -m ssast_jax.export --model SSAST-Base-Patch-400.pth --format=transformers --out DIR
"""

from __future__ import annotations

import argparse
import time

from ssast_jax import api
from ssast_jax.interchange.pytorch import CheckpointError

FORMATS = ('pytorch', 'transformers')


def export(workdir: str, out: str, which: str | int = 'best', fmt: str = 'pytorch',
           **geometry):
  """Writes the `which` checkpoint of `workdir` (or the model file or folder `workdir`
  names; `geometry`: fstride, tstride, input_tdim for an original fine-tuned `.pth`) to
  `out` in format `fmt`; returns the handle written."""
  handle = api.load(workdir, which, **geometry)
  if fmt == 'transformers':
    api.to_transformers(handle, out)
  else:
    api.to_pytorch(handle, out)
  return handle


def _which(text: str) -> str | int:
  if text in ('best', 'latest'):
    return text
  if text.isdigit():
    return int(text)
  raise argparse.ArgumentTypeError(f"expected 'best', 'latest' or a step number, got {text!r}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog='python -m ssast_jax.export',
                                   description=__doc__.split('\n\n')[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument('--workdir', help='a training run directory (pretraining or fine-tuning)')
  source.add_argument('--model', help='a model file or folder: an original .pth or a '
                      'transformers AST folder')
  parser.add_argument('--out', required=True,
                      help='the .pth file (pytorch) or the folder (transformers) to write')
  parser.add_argument('--format', choices=FORMATS, default='pytorch',
                      help='pytorch: the original SSAST layout (default); transformers: '
                      'ASTModel / ASTForAudioClassification with a model card')
  parser.add_argument('--which', type=_which, default='best',
                      help='best validation checkpoint (default), the latest, or a step number')
  for name in ('fstride', 'tstride', 'input_tdim'):
    parser.add_argument(f'--{name}', type=int,
                        help=f'{name} of an original fine-tuned .pth (it does not record it)')
  args = parser.parse_args(argv)
  geometry = {k: getattr(args, k) for k in ('fstride', 'tstride', 'input_tdim')
              if getattr(args, k) is not None}
  start = time.perf_counter()
  try:
    handle = export(args.workdir or args.model, args.out, args.which, args.format, **geometry)
  except (FileNotFoundError, FileExistsError, ValueError, CheckpointError) as e:
    raise SystemExit(f'error: {e}') from None
  step = handle.info.get('step')
  origin = (f'the {args.which} checkpoint (step {step}) of {args.workdir}' if args.workdir
            else args.model)
  print(f'wrote {args.out} ({args.format}) from {origin} in {time.perf_counter() - start:.1f} s')


if __name__ == '__main__':
  main()
