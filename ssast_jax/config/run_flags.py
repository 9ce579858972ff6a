"""The original SSAST `src/run.py`'s flags and what `python -m ssast_jax.run` does with each.

One row per flag of the original's parser (and the two of the users' forks, `--data_dir`
and `--data_val_dir`), with its spellings, its parser and default as the original has
them, and one rule per kind of task: pretraining (`pretrain_*`, `traintest_mask.py`) or
fine-tuning (`ft_*`, `traintest.py`). The rules say what the original does with the flag
in that task, so a user's script means here what it meant there:

- `Key`: the value is the config key (`configs/pretrain_*.py` or `configs/finetune.py`); a
  flag the script leaves out takes the original's default, unless that is `KEEP`.
- `Ignored`: the original accepts the flag and does nothing with it in that task.
- `OffOnly`: the original applies it, we cannot: its off value is accepted, any other
  value is refused.
- `Refused`: refused whenever given.
- `SPECIAL`: `ssast_jax/run.py` handles it (task, data source, workdir, label count).

docs/configuration.md ("From `run.py` to `main.py`") is this table in prose.
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any, Callable

KEEP = object()  # no default worth copying (the original has none, or it is machine-bound)
TASKS = ('ft_avgtok', 'ft_cls', 'pretrain_mpc', 'pretrain_mpg', 'pretrain_joint')
MODEL_SIZES = ('tiny', 'small', 'base')  # ssast_jax.model's, without importing JAX


def literal(text: str) -> bool:
  """The original's `type=ast.literal_eval` flags, as it tests them (`args.x == True`)."""
  try:
    return ast.literal_eval(text) == True  # noqa: E712 -- 1 counts, as in the original
  except (ValueError, SyntaxError):
    raise ValueError(text) from None


def bal(text: str) -> bool:
  """`--bal`: balanced sampling only for the word `bal` (`none`, `None`, ... are off)."""
  return text == 'bal'


@dataclasses.dataclass(frozen=True)
class Key:
  """The flag's value, through `convert`, goes to each config key of `keys`; `refuse`
  returns why a value cannot be run (or None)."""
  keys: tuple[str, ...]
  convert: Callable[[Any], Any] = lambda value: value
  refuse: Callable[[Any], str | None] = lambda value: None


@dataclasses.dataclass(frozen=True)
class Ignored:
  """Unused in this task by the original too; `surprise(value, given)` says when to print
  `why` (a value the user may expect an effect from); `given` holds every given flag."""
  why: str
  surprise: Callable[[Any, dict], bool] = lambda value, given: False


@dataclasses.dataclass(frozen=True)
class OffOnly:
  """Applied by the original and not supported here: only the off value passes."""
  why: str


@dataclasses.dataclass(frozen=True)
class Refused:
  """Not implemented here in any form: refused whenever given, saying `why`."""
  why: str


SPECIAL = 'special'


def key(*keys: str, **kwargs) -> Key:
  """A `Key` rule to the config keys `keys`."""
  return Key(tuple(keys), **kwargs)


def _pretrain_size(value: str) -> str | None:
  """Why `--model_size value` cannot be pretrained here, or None (model.MODEL_SIZES)."""
  if value in MODEL_SIZES:
    return None
  if value == 'base_nokd':
    return ("the original's base_nokd (DeiT-B without its distillation token) is not "
            'implemented; use tiny, small or base')
  return 'not a size the original pretrains (tiny, small, base, base_nokd); use tiny, small or base'


@dataclasses.dataclass(frozen=True)
class Flag:
  """A flag of the original's parser: spellings (the first long one names it), parser,
  default when left out, choices, and the rule for pretraining and for fine-tuning."""
  names: tuple[str, ...]
  parse: Callable[[str], Any]
  default: Any
  pretrain: Any
  finetune: Any
  choices: tuple[str, ...] | None = None

  @property
  def name(self) -> str:
    """The original's long spelling, as messages name the flag."""
    return next(n for n in self.names if n.startswith('--'))

  @property
  def dest(self) -> str:
    return self.name[2:].replace('-', '_')


NO_HEAD = Ignored('pretraining has no classifier')
FINETUNE_ONLY = Ignored('used by fine-tuning only')
PRETRAIN_ONLY = Ignored('used by pretraining only')
NOT_IN_PRETRAINING = 'is not supported in pretraining (the original applies it there too)'
OPTIM = Ignored('the original always uses Adam whatever --optim says, and so does this run',
                lambda value, given: value != 'adam')
# The original reads --save_model only to delete per-epoch models after weight averaging.
SAVE_MODEL = Ignored('no per-epoch models are written')

FLAGS = (
    Flag(('--data-train',), str, KEEP, key('data.train_json'), key('data.train_json')),
    Flag(('--data-val',), str, KEEP, key('data.val_json'), key('data.val_json')),
    Flag(('--data-eval',), str, KEEP,
         Refused("the original's pretraining cannot evaluate it (its run.py fails there "
                 'after training); drop it'),
         Ignored('the test split is not evaluated after fine-tuning here: evaluate the best '
                 'checkpoint afterwards (ssast_jax.load(WORKDIR) and ssast_jax.classify)',
                 surprise=lambda value, given: True)),
    Flag(('--label-csv',), str, KEEP, key('data.label_csv'), key('data.label_csv')),
    Flag(('--n_class',), int, 527, NO_HEAD, SPECIAL),
    Flag(('--dataset',), str, KEEP, SPECIAL, SPECIAL),
    Flag(('--dataset_mean',), float, KEEP, key('data.mean'), key('data.mean')),
    Flag(('--dataset_std',), float, KEEP, key('data.std'), key('data.std')),
    Flag(('--target_length',), int, KEEP, key('data.target_length'),
         key('data.target_length')),
    Flag(('--num_mel_bins',), int, 128, key('data.num_mel_bins'), key('data.num_mel_bins')),
    Flag(('--exp-dir',), str, KEEP, SPECIAL, SPECIAL),
    Flag(('--lr', '--learning-rate'), float, 0.001, key('lr'), key('lr')),
    Flag(('--warmup',), literal, True,
         Ignored("the original's pretraining always warms up (traintest_mask.py), and so "
                 'does this run (main.py: --config.warmup=False turns it off)',
                 lambda value, given: not value),
         key('warmup')),
    Flag(('--optim',), str, 'adam', OPTIM, OPTIM, choices=('sgd', 'adam')),
    Flag(('-b', '--batch-size'), int, 12, key('batch_size'), key('batch_size')),
    # Grain workers reading converted shards, not the original's 16 fbank-computing
    # DataLoader workers: its default is not copied.
    Flag(('-w', '--num-workers'), int, KEEP, key('data.workers'), key('data.workers')),
    Flag(('--n-epochs',), int, 1, key('num_epochs'), key('num_epochs')),
    Flag(('--lr_patience',), int, 1, key('lr_patience'), key('lr_patience')),
    Flag(('--adaptschedule',), literal, False,
         Ignored("the original's pretraining always halves the lr on a plateau, and so "
                 'does this run', lambda value, given: not value),
         key('adaptschedule')),
    Flag(('--n-print-steps',), int, 100, key('print_every_steps'), key('print_every_steps')),
    Flag(('--save_model',), literal, KEEP, SAVE_MODEL, SAVE_MODEL),
    Flag(('--freqm',), int, 0, OffOnly('SpecAugment ' + NOT_IN_PRETRAINING), key('freqm')),
    Flag(('--timem',), int, 0, OffOnly('SpecAugment ' + NOT_IN_PRETRAINING), key('timem')),
    Flag(('--mixup',), float, 0.0, OffOnly('mix-up ' + NOT_IN_PRETRAINING), key('mixup')),
    Flag(('--bal',), bal, False, OffOnly('balanced sampling ' + NOT_IN_PRETRAINING),
         key('bal')),
    # The original pretrains with stride = shape whatever --fstride/--tstride say.
    Flag(('--fstride',), int, KEEP,
         Ignored("the original's pretraining uses stride = --fshape (no overlap), and so "
                 'does this run', lambda value, given: value != given.get('fshape', value)),
         key('fstride')),
    Flag(('--tstride',), int, KEEP,
         Ignored("the original's pretraining uses stride = --tshape (no overlap), and so "
                 'does this run', lambda value, given: value != given.get('tshape', value)),
         key('tstride')),
    Flag(('--fshape',), int, KEEP, key('model.fshape', 'model.fstride'),
         Ignored("the patch shape is the pretrained model's")),
    Flag(('--tshape',), int, KEEP, key('model.tshape', 'model.tstride'),
         Ignored("the patch shape is the pretrained model's")),
    Flag(('--model_size',), str, KEEP, key('model.size', refuse=_pretrain_size),
         Ignored("the model size is the pretrained model's")),
    Flag(('--task',), str, 'ft_cls', SPECIAL, SPECIAL, choices=TASKS),
    Flag(('--mask_patch',), int, 400, key('mask_patch'), PRETRAIN_ONLY),
    Flag(('--cluster_factor',), int, 3, key('cluster_factor'), PRETRAIN_ONLY),
    Flag(('--epoch_iter',), int, 2000, key('epoch_iter'), PRETRAIN_ONLY),
    Flag(('--pretrained_mdl_path',), str, KEEP,
         Ignored('pretraining starts from scratch'), key('pretrained')),
    Flag(('--head_lr',), int, 1, NO_HEAD, key('head_lr', convert=float)),
    Flag(('--noise',), literal, False, OffOnly('noise augmentation ' + NOT_IN_PRETRAINING),
         key('noise')),
    Flag(('--metrics',), str, 'mAP', FINETUNE_ONLY, key('metrics'), choices=('mAP', 'acc')),
    Flag(('--lrscheduler_start',), int, 10, FINETUNE_ONLY, key('lrscheduler_start')),
    Flag(('--lrscheduler_step',), int, 5, FINETUNE_ONLY, key('lrscheduler_step')),
    Flag(('--lrscheduler_decay',), float, 0.5, FINETUNE_ONLY, key('lrscheduler_decay')),
    Flag(('--wa',), literal, False, FINETUNE_ONLY, key('wa')),
    Flag(('--wa_start',), int, 16, FINETUNE_ONLY, key('wa_start')),
    Flag(('--wa_end',), int, 30, FINETUNE_ONLY, key('wa_end')),
    Flag(('--loss',), str, 'BCE', FINETUNE_ONLY, key('loss', convert=str.lower),
         choices=('BCE', 'CE')),
    # The users' forks: folders of precomputed fbank .pt files, <stem of wav>.pt.
    Flag(('--data_dir',), str, KEEP, key('data.train_pt_dir'), key('data.train_pt_dir')),
    Flag(('--data_val_dir',), str, KEEP, key('data.val_pt_dir'), key('data.val_pt_dir')),
)
