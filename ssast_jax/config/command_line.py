"""Flag parsing shared by the programs that take a `--config` file (main.py,
`python -m ssast_jax.plan`, the benchmarks): a mistyped flag, a `--config.KEY` the config
does not have, a config file that is not there or a stray argument ends in one line on
stderr and exit code 2, before anything is built (no usage text, no traceback)."""

from __future__ import annotations

import os
import re
import sys
from typing import NoReturn

from absl import flags
from ml_collections import config_flags

from ssast_jax.training.faults import EXIT_BAD_INPUT


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
  """Ends the program with `error: message` on stderr and exit code `code`."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing of `argv` (pass as `app.run(main, flags_parser=parse_flags)`); the
  program must define a `config` flag with `config_flags.DEFINE_config_file`."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as error:
    fail(_config_file_error(str(error)) or ' '.join(str(error).split()))
  except SyntaxError as error:  # in the config file
    fail(f'--config: {error.filename} line {error.lineno}: SyntaxError: {error.msg}')
  except OSError as error:  # ml_collections: an override of a config file that did not load
    missing = re.search(r"No such file or directory: '([^']*)'", str(error))
    fail(f'--config: file not found: {missing.group(1)}' if missing else
         '--config: ' + ' '.join(str(error).split()))
  except (AttributeError, KeyError) as error:  # ml_collections: AttributeError(KeyError(msg))
    cause = error.args[0] if error.args else error
    detail = cause.args[0] if isinstance(cause, KeyError) and cause.args else str(cause)
    fail('--config: unknown config key ' + ' '.join(str(detail).split()))
  if len(rest) > 1:
    fail(f'unexpected arguments: {" ".join(rest[1:])}')
  if flags.FLAGS['config'].present:
    path = config_flags.get_config_filename(flags.FLAGS['config'])
    if not os.path.isfile(path):
      fail(f'--config: file not found: {path}')
  return rest


def _config_file_error(message: str) -> str | None:
  """`--config: FILE line N: the exception` for a config file that raised while loading
  (ml_collections puts the whole traceback in the flag error); None for other errors."""
  lines = message.strip().splitlines()
  frames = re.findall(r'File "([^"]+)", line (\d+)', message)
  if 'Traceback (most recent call last)' not in message or not frames:
    return None
  path, line = frames[-1]
  return f'--config: {path} line {line}: {lines[-1].strip()}'
