"""Run logs in the workdir: metrics.jsonl, TensorBoard scalars, result.csv, config.json.

Only process 0 writes (`enabled`). On resume the logs are cut back to the checkpoint's step
so that a killed-and-resumed run leaves the same metrics.jsonl as an uninterrupted one
(apart from the timing values `train/clips_per_s` and `train/data_wait_ms`), provided every
row of a step is written before that step's checkpoint.
"""

from __future__ import annotations

import io
import json
import os
import sys

import numpy as np
import tqdm

METRICS_FILE = 'metrics.jsonl'
RESULT_FILE = 'result.csv'
CONFIG_FILE = 'config.json'
TENSORBOARD_DIR = 'tensorboard'

# result.csv columns as the original's traintest_mask writes them: train acc, train loss,
# eval acc, eval loss, lr. Its train values are meters over the steps since the previous
# evaluation; here they are the most recent train/ values. Its "acc" and "loss" hold
# different quantities per task (for pretrain_joint the eval loss column is the MSE; for
# pretrain_mpg every column but lr is a loss), reproduced here.
RESULT_COLUMNS = {
    'pretrain_joint': ('train/mpc_acc', 'train/loss', 'eval/mpc_acc', 'eval/mpg_loss', 'train/lr'),
    'pretrain_mpc': ('train/mpc_acc', 'train/loss', 'eval/mpc_acc', 'eval/mpc_loss', 'train/lr'),
    'pretrain_mpg': ('train/loss', 'train/loss', 'eval/mpg_loss', 'eval/mpg_loss', 'train/lr'),
}


def _atomic_write(path: str, text: str) -> None:
  """Replaces `path` with `text` in one rename, so a crash leaves the old or the new file."""
  temporary = f'{path}.tmp'
  with open(temporary, 'w', encoding='utf-8') as f:
    f.write(text)
  os.replace(temporary, path)


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported with torch hidden.

  tensorboardX imports torch whenever it is installed, only to accept torch tensors; hiding
  it keeps torch (about a second and hundreds of MB) off the training path. If torch is
  already loaded nothing is hidden.
  """
  hide_torch = 'torch' not in sys.modules
  if hide_torch:
    sys.modules['torch'] = None  # makes `import torch` raise ImportError
  try:
    import tensorboardX  # pylint: disable=import-outside-toplevel
  finally:
    if hide_torch:
      del sys.modules['torch']
  return tensorboardX.SummaryWriter


def _kept_lines(path: str, resume_step: int) -> list[str]:
  """The lines of a metrics.jsonl with step <= resume_step; a torn last line is dropped."""
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    lines = f.readlines()
  if lines and not lines[-1].endswith('\n'):
    lines.pop()  # cut short by a kill mid-write
  kept = []
  for number, line in enumerate(lines, 1):
    try:
      step = json.loads(line)['step']
    except (json.JSONDecodeError, TypeError, KeyError):
      raise ValueError(f'{path}: line {number} is not a metrics row with a "step"; move the '
                       f'file away to resume without it') from None
    if step <= resume_step:
      kept.append(line)
  return kept


class MetricsWriter:
  """Appends metric rows to WORKDIR/metrics.jsonl, TensorBoard and result.csv.

  result.csv's columns are the metric names `columns`, or those of a pretraining `task`
  (RESULT_COLUMNS); give one of the two. `resume_step=None` starts new logs (existing ones
  are replaced); an integer keeps the rows with step <= resume_step, rebuilds result.csv
  from them and hides later TensorBoard events.
  """

  def __init__(self, workdir: str, *, task: str | None = None,
               columns: tuple[str, ...] | None = None, enabled: bool,
               resume_step: int | None = None):
    if (task is None) == (columns is None):
      raise ValueError('MetricsWriter needs one of task and columns')
    self._enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._columns = RESULT_COLUMNS[task] if columns is None else tuple(columns)
    self._result_path = os.path.join(workdir, RESULT_FILE)
    self._latest_train = {}
    self._result_rows = []
    metrics_path = os.path.join(workdir, METRICS_FILE)
    lines = [] if resume_step is None else _kept_lines(metrics_path, resume_step)
    for line in lines:
      self._track(json.loads(line))
    _atomic_write(metrics_path, ''.join(lines))
    self._write_result_csv()
    self._jsonl = open(metrics_path, 'a', encoding='utf-8')  # pylint: disable=consider-using-with
    # TensorBoard hides events at or after purge_step written by an earlier attempt. Event
    # files are named by the second they start in; the suffix keeps a quick restart from
    # overwriting the previous attempt's file.
    purge_step = 0 if resume_step is None else resume_step + 1
    self._tensorboard = _summary_writer_class()(
        os.path.join(workdir, TENSORBOARD_DIR), purge_step=purge_step,
        filename_suffix=f'.from_step_{purge_step}')

  def write(self, step: int, metrics: dict) -> None:
    """Logs one row: `step` and scalar metrics (Python, NumPy or JAX scalars)."""
    if not self._enabled:
      return
    row = {'step': int(step), **{key: float(metrics[key]) for key in sorted(metrics)}}
    self._jsonl.write(json.dumps(row) + '\n')
    self._jsonl.flush()
    for key, value in row.items():
      if key != 'step':
        self._tensorboard.add_scalar(key, value, row['step'])
    self._tensorboard.flush()
    if self._track(row):
      self._write_result_csv()

  def write_image(self, step: int, tag: str, image) -> None:
    """Sends an RGB image `(H, W, 3)` uint8 to TensorBoard."""
    if self._enabled:
      self._tensorboard.add_image(tag, image, int(step), dataformats='HWC')
      self._tensorboard.flush()

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._tensorboard.close()

  def _track(self, row: dict) -> bool:
    """Follows the latest train/ values; True when `row` adds a result.csv row.

    Every evaluation after step 0 adds one (the original evaluates only after training
    steps); a value not logged yet is NaN.
    """
    self._latest_train.update({k: v for k, v in row.items() if k.startswith('train/')})
    if row['step'] == 0 or not any(key.startswith('eval/') for key in row):
      return False
    values = {**self._latest_train, **row}
    self._result_rows.append([values.get(column, float('nan')) for column in self._columns])
    return True

  def _write_result_csv(self) -> None:
    if not self._result_rows:
      if os.path.exists(self._result_path):
        os.remove(self._result_path)
      return
    text = io.StringIO()
    np.savetxt(text, self._result_rows, delimiter=',')  # the original's format
    _atomic_write(self._result_path, text.getvalue())


def progress_bar(total_steps: int, *, initial_step: int = 0, enabled: bool) -> tqdm.tqdm:
  """A bar over training steps with rate and ETA; prints nothing when not `enabled`.

  Redraws at most every 30 s when stderr is not a terminal, so batch-job logs stay short.
  """
  return tqdm.tqdm(total=total_steps, initial=initial_step, unit='step', disable=not enabled,
                   dynamic_ncols=True, smoothing=0.05,
                   mininterval=0.5 if sys.stderr.isatty() else 30.0)


def save_config(workdir: str, config: dict) -> str:
  """Writes the run's config as WORKDIR/config.json and returns its path."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  _atomic_write(path, json.dumps(config, indent=2, sort_keys=True) + '\n')
  return path
