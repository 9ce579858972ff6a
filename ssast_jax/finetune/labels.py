"""Fine-tuning targets: the label table of a `index,mid,display_name` CSV and the multi-hot
vector of a clip's `labels` field, as the original's `src/dataloader.py` builds them.

The original (`make_index_dict`, `AudioDataset.__getitem__` without mix-up) maps each mid of
`datum['labels'].split(',')` to its CSV index and sets that entry of a zero vector of
length K (the number of mids in the CSV) to 1.0. The multi-hot vector here is the same, in
float32. Mix-up's weighted targets are built from these vectors by
`ssast_jax.finetune.augment.mixup` (`lam * y_a + (1 - lam) * y_b`).

Differences from the original, all on inputs it cannot handle:

* A mid missing from the CSV, an empty `labels` field and an empty item (`"a,,b"`, a
  trailing comma) raise `LabelError` naming the clip's wav id; the original stops with a
  bare `KeyError` from `index_dict[label_str]` (`''.split(',')` is `['']`).
* Whitespace around each mid is stripped (the original does not strip, so `"a, b"` is a
  `KeyError` there); `ssast_jax.data.convert` checks labels the same stripped way.
* A mid listed twice in one clip gives 1.0 (the original sets, not adds, without mix-up;
  with mix-up it adds, giving `2 * lam`; see `augment.mixup`).

There is no label smoothing in the original fine-tuning (`dataloader.py` has none), so
there is none here.

The CSV is read by `ssast_jax.data.convert.read_label_csv`, which requires indices
`0..K-1`, unique non-empty mids and the three columns (the original's `csv.DictReader`
lookup accepts anything and keeps the last of duplicated mids).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from ssast_jax.data import convert


class LabelError(ValueError):
  """A label CSV or a clip's labels cannot give a target; the message names the clip."""


@dataclasses.dataclass(frozen=True)
class LabelTable:
  """The classes of a label CSV in index order: `mids[k]`, `display_names[k]`."""
  mids: tuple[str, ...]
  display_names: tuple[str, ...]

  def __post_init__(self):
    if len(self.mids) != len(self.display_names) or not self.mids:
      raise LabelError('a label table needs one display name per mid and at least one mid')
    if len(set(self.mids)) != len(self.mids):
      raise LabelError('a label table lists a mid twice')
    object.__setattr__(self, '_index', {mid: k for k, mid in enumerate(self.mids)})

  @property
  def num_labels(self) -> int:
    """K, the length of a target vector (the original's `label_num`)."""
    return len(self.mids)

  def index(self, mid: str) -> int:
    """The CSV index of `mid` (KeyError if absent)."""
    return self._index[mid]

  def __contains__(self, mid: str) -> bool:
    return mid in self._index


def load_label_table(csv_path) -> LabelTable:
  """The `LabelTable` of an `index,mid,display_name` CSV (the original's `--label-csv`).

  Raises `LabelError` (with `convert.read_label_csv`'s message) when the file is missing,
  unreadable or malformed.
  """
  try:
    table = convert.read_label_csv(Path(csv_path))
  except convert.ConversionError as e:
    raise LabelError(str(e)) from None
  return LabelTable(tuple(table['mids']), tuple(table['display_names']))


def parse_labels(labels: str, table: LabelTable, *, wav: str) -> list[int]:
  """The CSV indices of a clip's comma-separated `labels`, in the order listed.

  `wav` (the clip's id in the dataset JSON) only names the clip in the error message.
  """
  if not isinstance(labels, str) or not labels.strip():
    raise LabelError(f'clip {wav!r} has no labels; every clip of a labelled fine-tuning '
                     f'task needs at least one mid of the label CSV')
  indices = []
  for item in labels.split(','):
    mid = item.strip()
    if not mid:
      raise LabelError(f'clip {wav!r}: labels {labels!r} contain an empty item')
    if mid not in table:
      raise LabelError(f'clip {wav!r}: label {mid!r} is not a mid of the label CSV '
                       f'({table.num_labels} classes)')
    indices.append(table.index(mid))
  return indices


def multi_hot(labels: str, table: LabelTable, *, wav: str) -> np.ndarray:
  """A clip's target: float32 `(K,)`, 1.0 at each listed class and 0.0 elsewhere.

  Reproduces the non-mix-up branch of `AudioDataset.__getitem__` in `src/dataloader.py`.
  """
  target = np.zeros(table.num_labels, np.float32)
  target[parse_labels(labels, table, wav=wav)] = 1.0
  return target


def multi_hot_batch(labels: Sequence[str], wavs: Sequence[str],
                    table: LabelTable) -> np.ndarray:
  """Targets `(N, K)` float32 of N clips, given their `labels` fields and wav ids.

  All clips are checked; the error names the first bad clip and how many are bad.
  """
  if len(labels) != len(wavs):
    raise ValueError(f'{len(labels)} label fields for {len(wavs)} wav ids')
  targets = np.zeros((len(labels), table.num_labels), np.float32)
  errors = []
  for row, (field, wav) in enumerate(zip(labels, wavs)):
    try:
      targets[row, parse_labels(field, table, wav=wav)] = 1.0
    except LabelError as e:
      errors.append(str(e))
  if errors:
    more = f' (and {len(errors) - 1} more clips with bad labels)' if len(errors) > 1 else ''
    raise LabelError(errors[0] + more)
  return targets
