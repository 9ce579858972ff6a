"""metrics.jsonl, result.csv and TensorBoard contents, and their truncation on resume."""

import glob
import io
import json
import os
import struct
import sys

import numpy as np
import pytest

from ssast_jax.config import defaults
from ssast_jax.config.settings import resolve
from ssast_jax.training import metrics

TIMING = {'train/clips_per_s': 10.0, 'train/data_wait_ms': 1.0}


def _train(step):
  return {'train/loss': 5.0 - step / 100, 'train/mpc_loss': 4.0, 'train/mpg_loss': 0.1,
          'train/mpc_acc': np.float32(step / 1000), 'train/lr': np.float32(1e-4),
          'train/grad_norm': 2.0, **TIMING}


def _eval(step):
  return {'eval/mpc_acc': step / 500, 'eval/mpc_loss': 3.0 - step / 1000,
          'eval/mpg_loss': 0.5 + step / 1000}


def _rows(steps, print_every=10, eval_every=30):
  """(step, metrics) in the order a training loop writes them."""
  rows = [(0, _eval(0))]
  for step in steps:
    if step % print_every == 0:
      rows.append((step, _train(step)))
    if step % eval_every == 0:
      rows.append((step, _eval(step)))
  return rows


def _write_all(workdir, rows, task='pretrain_joint', resume_step=None):
  writer = metrics.MetricsWriter(workdir, task=task, enabled=True, resume_step=resume_step)
  for step, values in rows:
    writer.write(step, values)
  writer.close()


def _read(path):
  with open(path, encoding='utf-8') as f:
    return f.read()


def test_jsonl_rows(tmp_path):
  _write_all(str(tmp_path), [(0, _eval(0)), (10, _train(10))])
  lines = _read(tmp_path / 'metrics.jsonl').splitlines()
  assert [json.loads(line) for line in lines] == [
      {'step': 0, 'eval/mpc_acc': 0.0, 'eval/mpc_loss': 3.0, 'eval/mpg_loss': 0.5},
      {'step': 10, 'train/clips_per_s': 10.0, 'train/data_wait_ms': 1.0,
       'train/grad_norm': 2.0, 'train/loss': 5.0 - 0.1, 'train/lr': float(np.float32(1e-4)),
       'train/mpc_acc': float(np.float32(0.01)), 'train/mpc_loss': 4.0,
       'train/mpg_loss': 0.1}]
  assert list(json.loads(lines[1])) == ['step'] + sorted(_train(10))  # deterministic order


def _expected_csv(rows):
  text = io.StringIO()
  np.savetxt(text, rows, delimiter=',')
  return text.getvalue()


@pytest.mark.parametrize('task, columns', [
    ('pretrain_joint', lambda t, e: [t['train/mpc_acc'], t['train/loss'], e['eval/mpc_acc'],
                                     e['eval/mpg_loss'], t['train/lr']]),
    ('pretrain_mpc', lambda t, e: [t['train/mpc_acc'], t['train/loss'], e['eval/mpc_acc'],
                                   e['eval/mpc_loss'], t['train/lr']]),
    ('pretrain_mpg', lambda t, e: [t['train/loss'], t['train/loss'], e['eval/mpg_loss'],
                                   e['eval/mpg_loss'], t['train/lr']]),
])
def test_result_csv_has_the_originals_columns(tmp_path, task, columns):
  _write_all(str(tmp_path), _rows(range(1, 61)), task=task)
  # Evaluations at 30 and 60 (not 0); the latest train row is the one of the same step.
  expected = [[float(v) for v in columns(_train(s), _eval(s))] for s in (30, 60)]
  assert _read(tmp_path / 'result.csv') == _expected_csv(expected)
  loaded = np.loadtxt(tmp_path / 'result.csv', delimiter=',')
  assert loaded.shape == (2, 5)


def test_result_csv_uses_latest_train_values_and_nan_when_missing(tmp_path):
  _write_all(str(tmp_path), [(5, _eval(5)), (10, _train(10)), (15, _eval(15))])
  train, eval5, eval15 = _train(10), _eval(5), _eval(15)
  expected = [[np.nan, np.nan, eval5['eval/mpc_acc'], eval5['eval/mpg_loss'], np.nan],
              [float(train['train/mpc_acc']), train['train/loss'], eval15['eval/mpc_acc'],
               eval15['eval/mpg_loss'], float(train['train/lr'])]]
  assert _read(tmp_path / 'result.csv') == _expected_csv(expected)


def test_result_csv_with_given_columns(tmp_path):
  """`columns=` (as fine-tuning passes its own) instead of a pretraining task's."""
  writer = metrics.MetricsWriter(str(tmp_path), columns=('eval/acc', 'train/loss', 'eval/x'),
                                 enabled=True)
  for step, values in [(10, {'train/loss': 2.0}), (10, {'eval/acc': 0.25}),
                       (20, {'train/loss': 1.5}), (20, {'eval/acc': 0.5, 'eval/x': 3.0})]:
    writer.write(step, values)
  writer.close()
  assert _read(tmp_path / 'result.csv') == _expected_csv([[0.25, 2.0, np.nan],
                                                          [0.5, 1.5, 3.0]])


@pytest.mark.parametrize('kwargs', [{}, {'task': 'pretrain_mpc', 'columns': ('train/lr',)}])
def test_writer_needs_one_of_task_and_columns(tmp_path, kwargs):
  with pytest.raises(ValueError, match='MetricsWriter needs one of task and columns'):
    metrics.MetricsWriter(str(tmp_path), enabled=True, **kwargs)


def _strip_timing(text):
  rows = [json.loads(line) for line in text.splitlines()]
  return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


def test_resume_truncates_to_the_checkpoint_step(tmp_path):
  full, killed = str(tmp_path / 'full'), str(tmp_path / 'killed')
  rows = _rows(range(1, 121))
  _write_all(full, rows)

  # Killed at step 100 after a checkpoint at step 60, with a torn last line.
  _write_all(killed, [(s, m) for s, m in rows if s <= 100])
  with open(os.path.join(killed, 'metrics.jsonl'), 'a', encoding='utf-8') as f:
    f.write('{"step": 101, "train/lo')
  assert len(_read(os.path.join(killed, 'result.csv')).splitlines()) == 3
  resumed = [(s, {**m, 'train/clips_per_s': 99.0} if 'train/loss' in m else m)
             for s, m in rows if s > 60]
  _write_all(killed, resumed, resume_step=60)

  assert _strip_timing(_read(os.path.join(killed, 'metrics.jsonl'))) == \
      _strip_timing(_read(os.path.join(full, 'metrics.jsonl')))
  assert _read(os.path.join(killed, 'result.csv')) == _read(os.path.join(full, 'result.csv'))


def test_resume_rebuilds_result_csv_before_new_rows(tmp_path):
  rows = _rows(range(1, 100))
  _write_all(str(tmp_path), rows)
  writer = metrics.MetricsWriter(str(tmp_path), task='pretrain_joint', enabled=True,
                                 resume_step=45)
  writer.close()
  kept = [json.loads(line)['step'] for line in _read(tmp_path / 'metrics.jsonl').splitlines()]
  assert kept == [0, 10, 20, 30, 30, 40]
  train, evaluation = _train(30), _eval(30)
  assert _read(tmp_path / 'result.csv') == _expected_csv(
      [[float(train['train/mpc_acc']), train['train/loss'], evaluation['eval/mpc_acc'],
        evaluation['eval/mpg_loss'], float(train['train/lr'])]])


def test_fresh_start_replaces_old_logs(tmp_path):
  _write_all(str(tmp_path), _rows(range(1, 61)))
  _write_all(str(tmp_path), [(0, _eval(0))])
  assert len(_read(tmp_path / 'metrics.jsonl').splitlines()) == 1
  assert not os.path.exists(tmp_path / 'result.csv')


def test_corrupt_metrics_line_is_reported(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 0}\nnot json\n{"step": 5}\n')
  with pytest.raises(ValueError, match=r'metrics.jsonl: line 2 is not a metrics row'):
    metrics.MetricsWriter(str(tmp_path), task='pretrain_joint', enabled=True, resume_step=3)


def test_disabled_writer_writes_nothing(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path / 'w'), task='pretrain_joint', enabled=False)
  writer.write(1, _train(1))
  writer.close()
  assert not os.path.exists(tmp_path / 'w')


def _tensorboard_events(workdir):
  """(file index, step, tag or 'session_log', value) of the events, files in name order."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  events = []
  files = sorted(glob.glob(os.path.join(workdir, 'tensorboard', 'events.out.tfevents.*')))
  for index, path in enumerate(files):
    with open(path, 'rb') as f:
      data = f.read()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack('<Q', data[offset:offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 12 + length + 4
      for value in event.summary.value:
        events.append((index, event.step, value.tag, value.simple_value))
      if event.HasField('session_log'):
        events.append((index, event.step, 'session_log', event.session_log.status))
  return events


def test_tensorboard_scalars_and_purge_on_resume(tmp_path):
  workdir = str(tmp_path)
  _write_all(workdir, [(10, {'train/loss': 1.5}), (20, {'train/loss': 1.25})])
  _write_all(workdir, [(20, {'train/loss': 1.0})], resume_step=10)
  events = _tensorboard_events(workdir)
  assert events == [(0, 0, 'session_log', 1), (0, 10, 'train/loss', 1.5),
                    (0, 20, 'train/loss', 1.25),
                    (1, 11, 'session_log', 1), (1, 20, 'train/loss', 1.0)]


def test_tensorboard_is_loaded_without_torch(tmp_path):
  import subprocess  # pylint: disable=import-outside-toplevel
  code = ('import sys; from ssast_jax.training import metrics; '
          f'w = metrics.MetricsWriter({str(tmp_path)!r}, task="pretrain_mpc", enabled=True); '
          'w.write(1, {"train/loss": 1.0}); w.close(); '
          'print(sorted(m for m in sys.modules if m.split(".")[0] == "torch"))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                       check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.stdout.strip() == '[]'


def test_save_config_writes_resolved_json(tmp_path):
  config = defaults.get_config()
  path = metrics.save_config(str(tmp_path / 'run'), resolve(config, check_data=False)
                             .config_dict())
  saved = json.loads(_read(path))
  assert path == str(tmp_path / 'run' / 'config.json')
  assert saved['data']['mean'] == -7.4482 and saved['max_steps'] is None
  assert saved['model'] == {'size': 'base', 'depth': None, 'fshape': 16, 'tshape': 16,
                            'fstride': 16, 'tstride': 16}
  assert saved == json.loads(config.to_json())


def test_progress_bar():
  bar = metrics.progress_bar(100, initial_step=40, enabled=False)
  assert bar.disable
  bar.close()
  bar = metrics.progress_bar(100, initial_step=40, enabled=True)
  assert (bar.total, bar.n, bar.disable) == (100, 40, False)
  bar.close()


def test_a_windows_throughput_counts_the_steps_until_their_metrics_arrive(monkeypatch):
  """Steps run asynchronously: a window's time ends once its metrics reach the host, not
  when the last step was dispatched (which would report thousands of clips per second)."""
  from ssast_jax.training import train  # pylint: disable=import-outside-toplevel
  clock = {'now': 100.0}
  monkeypatch.setattr(train.time, 'perf_counter', lambda: clock['now'])

  def device_get(tree):  # the two steps compute while the host waits: 4 s
    clock['now'] += 4.0
    return tree
  monkeypatch.setattr(train.jax, 'device_get', device_get)
  pending = [{'loss': np.float32(2.0)}, {'loss': np.float32(4.0)}]
  row = train.log_window(pending, window_start=99.0, wait_ms=6.0, batch_size=8)
  assert row == {'train/loss': 3.0, 'train/clips_per_s': 16 / 5.0, 'train/data_wait_ms': 3.0}
