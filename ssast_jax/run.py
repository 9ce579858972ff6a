"""`python -m ssast_jax.run`: the users' `python src/run.py ...` scripts, run by main.py.

Replacing `python src/run.py` by `python -m ssast_jax.run` in a script is all it takes: the
original SSAST `run.py`'s flags are parsed as it parses them (either spelling, `--data-train`
or `--data_train`; abbreviations as the original's argparse allows them, e.g. `--pretrain`
for `--pretrained_mdl_path`), mapped by the table of `ssast_jax/config/run_flags.py` onto a
config file (`configs/pretrain_*.py` for pretraining, `configs/finetune.py` for
fine-tuning) and the `--config.KEY=VALUE` overrides that differ from it, and the equivalent
`python main.py ...` command is printed and run in this process's place (same exit code).
`--dry-run` only prints it.

A flag left out takes the original's default, as it would there. A flag the original
accepts and ignores in that task is accepted and ignored; a flag this implementation cannot
honour ends in one line naming it (`error: ...`, exit code 2) and nothing runs.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import os
import pathlib
import shlex
import sys

from ssast_jax.config.run_flags import FLAGS, KEEP, Ignored, Key, OffOnly, Refused

REPO = pathlib.Path(__file__).resolve().parents[1]
PRETRAIN_CONFIGS = {'pretrain_joint': 'configs/pretrain_joint.py',
                    'pretrain_mpc': 'configs/pretrain_mpc.py',
                    'pretrain_mpg': 'configs/pretrain_mpg.py'}
# The frame model's joint recipe: 128 x 2 patches on 128 mel bins, frame masking (which is
# what the original picks when num_mel_bins == fshape).
FRAME_CONFIG = 'configs/pretrain_joint_frame.py'
FINETUNE_CONFIG = 'configs/finetune.py'
EXIT_REFUSED = 2
DRY_RUN = '--dry-run'


class RunError(ValueError):
  """A command line that cannot be run; the one-line message names the flag."""


class _Parser(argparse.ArgumentParser):
  """argparse whose errors are RunError (one line) rather than usage and SystemExit."""

  def error(self, message):
    raise RunError(message)


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a run.py command line becomes: main.py's config file (relative to the repository),
  the workdir, the value of every config key the flags decide, and notes to print."""
  config_file: str
  workdir: str
  values: dict
  notes: tuple[str, ...]


def _describe(rule) -> str:
  if isinstance(rule, Key):
    return ', '.join(f'config.{k}' for k in rule.keys)
  if isinstance(rule, Ignored):
    return f'unused ({rule.why})'
  if isinstance(rule, OffOnly):
    return f'off only ({rule.why})'
  if isinstance(rule, Refused):
    return f'refused ({rule.why})'
  return 'see docs/configuration.md'


def parser() -> argparse.ArgumentParser:
  """The original's flags with its spellings, none with a default (the parsed namespace
  holds the given flags only); `_normalise` resolves other spellings and abbreviations."""
  result = _Parser(prog='python -m ssast_jax.run', description=__doc__.split('\n\n')[1],
                   formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
  for flag in FLAGS:
    result.add_argument(*flag.names, dest=flag.dest, type=flag.parse, choices=flag.choices,
                        default=argparse.SUPPRESS,
                        help=f'pretraining: {_describe(flag.pretrain)}; '
                             f'fine-tuning: {_describe(flag.finetune)}')
  result.add_argument(DRY_RUN, action='store_true',
                      help='print the main.py command without running it')
  return result


def _canonical(name: str) -> str:
  return name.replace('_', '-')


# Every long option, by its name with `_` as `-`: (argparse dest, the original's spelling).
_SPELLINGS = {_canonical(n): (f.dest, n) for f in FLAGS for n in f.names if n[1] == '-'}
_SPELLINGS[_canonical(DRY_RUN)] = ('dry_run', DRY_RUN)


def _spelling(name: str) -> str:
  """The original's spelling of an option name given with either of `-` and `_`, or as an
  unambiguous abbreviation (as the original's argparse allows: `--pretrain` is
  `--pretrained_mdl_path`); other names are returned as they are, for argparse to refuse."""
  wanted = _canonical(name)
  if wanted in _SPELLINGS:
    return _SPELLINGS[wanted][1]
  matches = {dest: n for c, (dest, n) in _SPELLINGS.items() if c.startswith(wanted)}
  if len(matches) > 1:
    raise RunError(f'ambiguous option: {name} could match {", ".join(matches.values())}')
  return matches.popitem()[1] if matches else name


def _normalise(argv: list[str]) -> list[str]:
  """Option names in the original's spelling (`--data_train` -> `--data-train`), values
  untouched; everything after a bare `--` is left alone."""
  words = []
  for index, word in enumerate(argv):
    if word == '--':
      return words + argv[index:]
    if word.startswith('--'):
      name, sep, value = word.partition('=')
      word = _spelling(name) + sep + value
    words.append(word)
  return words


def _label_rows(path: str) -> int | None:
  """Classes in the label CSV as the original counts them (rows), or None if unreadable."""
  try:
    with open(path, newline='', encoding='utf-8') as f:
      return sum(1 for _ in csv.DictReader(f))
  except (OSError, UnicodeDecodeError, csv.Error):
    return None


def _data_source(given: dict) -> dict:
  """Where the clips come from: the forks' `.pt` folders (`--data_dir`, `--data_val_dir`,
  which `--dataset precomputed` reads), or else, as the original's dataloader, the audio
  files the JSONs' `wav` fields name, relative ones from the working directory."""
  folders = [name for name in ('data_dir', 'data_val_dir') if name in given]
  if given.get('dataset') == 'precomputed' and len(folders) < 2:
    raise RunError('--dataset precomputed: needs --data_dir and --data_val_dir, the '
                   'folders of the training and validation .pt files')
  if len(folders) == 1:
    missing = ({'data_dir', 'data_val_dir'} - set(folders)).pop()
    raise RunError(f'--{missing}: missing: --data_dir and --data_val_dir go together '
                   '(both splits are read the same way)')
  if folders:
    return {'data.train_audio': False}
  return {'data.train_audio': True, 'data.audio_root': os.getcwd()}


def _check_finetune(given: dict, task: str) -> None:
  """What fine-tuning needs beyond the table: a pretrained model, and `--n_class` (when
  given) equal to the label CSV's classes, which size the classifier here."""
  if not given.get('pretrained_mdl_path'):
    raise RunError(f'--pretrained_mdl_path: missing: --task {task} fine-tunes a pretrained '
                   'model (.pth or pretraining workdir)')
  if 'n_class' in given and given.get('label_csv'):
    rows = _label_rows(given['label_csv'])
    if rows is not None and rows != given['n_class']:
      raise RunError(f"--n_class {given['n_class']}: --label-csv {given['label_csv']} has "
                     f'{rows} classes, and the classifier has one output per class')


def _config_file(task: str, values: dict) -> str:
  """main.py's config file for the task (and, for joint pretraining, the patch shape)."""
  if not task.startswith('pretrain'):
    return FINETUNE_CONFIG
  frame = (values.get('model.fshape'), values.get('model.tshape'),
           values['data.num_mel_bins']) == (128, 2, 128)
  return FRAME_CONFIG if task == 'pretrain_joint' and frame else PRETRAIN_CONFIGS[task]


def plan(argv: list[str]) -> tuple[Plan, bool]:
  """(the plan, whether `--dry-run` was given) of a run.py command line; RunError names the
  first flag that cannot be run."""
  given = vars(parser().parse_args(_normalise(argv)))
  dry_run = given.pop('dry_run')
  task = given.get('task', 'ft_cls')
  pretraining = task.startswith('pretrain')
  values, notes = {}, []
  for flag in FLAGS:
    rule, name = (flag.pretrain if pretraining else flag.finetune), flag.name
    value = given.get(flag.dest, flag.default)
    if flag.dest not in given and not isinstance(rule, Key):
      continue
    if isinstance(rule, Refused):
      raise RunError(f'{name}: {rule.why}')
    if isinstance(rule, OffOnly) and value:
      raise RunError(f'{name} must be off (0, False, none) for --task {task}: {rule.why}')
    if isinstance(rule, Ignored) and rule.surprise(value, given):
      notes.append(f'{name} {value} is unused: {rule.why}')
    if isinstance(rule, Key) and value is not KEEP:
      why = rule.refuse(value)
      if why:
        raise RunError(f'{name} {value}: {why}')
      values.update(dict.fromkeys(rule.keys, rule.convert(value)))
  values.update(_data_source(given))
  if not pretraining:
    _check_finetune(given, task)
    values['task'] = task
  if not given.get('exp_dir'):
    raise RunError("--exp-dir: missing: give the experiment directory (main.py's --workdir)")
  return Plan(_config_file(task, values), given['exp_dir'], values, tuple(notes)), dry_run


def load_config(config_file: str):
  """`get_config()` of a config file under the repository, as main.py's --config loads it."""
  path = REPO / config_file
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _config_value(config, dotted_key: str):
  for part in dotted_key.split('.'):
    config = config[part]
  return config


def overrides(run_plan: Plan) -> list[tuple[str, object]]:
  """The (key, value) pairs of the plan that differ from its config file, in table order."""
  config = load_config(run_plan.config_file)
  return [(k, v) for k, v in run_plan.values.items() if _config_value(config, k) != v]


def _text(value) -> str:
  return repr(value) if isinstance(value, float) else str(value)


def _shown(path: pathlib.Path) -> str:
  """`path` relative to the working directory when under it, else absolute."""
  relative = os.path.relpath(path)
  return str(path) if relative.startswith(os.pardir) else relative


def command(run_plan: Plan) -> list[str]:
  """main.py's command line, `python` first: config file, workdir, overrides."""
  main_py = REPO / 'main.py'
  if not main_py.is_file():
    raise RunError(f'{main_py} not found: run ssast_jax from its repository checkout')
  return ['python', _shown(main_py), f'--config={_shown(REPO / run_plan.config_file)}',
          f'--workdir={run_plan.workdir}',
          *(f'--config.{k}={_text(v)}' for k, v in overrides(run_plan))]


def shell_text(words: list[str]) -> str:
  """The command shell-quoted, one override a line."""
  return ' \\\n    '.join([shlex.join(words[:4]), *map(shlex.quote, words[4:])])


def main(argv: list[str] | None = None) -> int:
  """Prints the plan's notes and main.py command, then becomes main.py (unless dry run)."""
  try:
    run_plan, dry_run = plan(sys.argv[1:] if argv is None else argv)
    words = command(run_plan)
  except RunError as error:
    print(f'error: {error}', file=sys.stderr)
    return EXIT_REFUSED
  for note in run_plan.notes:
    print(f'# {note}')
  print(shell_text(words), flush=True)
  if dry_run:
    return 0
  os.execv(sys.executable, [sys.executable, *words[1:]])


if __name__ == '__main__':
  sys.exit(main())
