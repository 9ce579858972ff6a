"""Faults of cluster jobs, on CPU with two processes: kills and preemption followed by
the rerun, a dead peer, a bad shard, a full disk. Each rerun must reproduce the per-step
losses of an uninterrupted run of the same process count."""

import pathlib
import signal
import subprocess
import sys
import time

import pytest

from ssast_jax.config.settings import split_shards_dir
from ssast_jax.data.convert import convert
from ssast_jax.data.demo import write_demo_dataset
from ssast_jax.training import faults
from runs import (ROOT, assert_same_run, env, metric_rows, run_main, start_processes,
                  tiny_run_flags, train_losses, wait_for_steps)

TOTAL_STEPS = 18  # tiny_run_flags: 2 epochs of 9 steps


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  out = tmp_path_factory.mktemp('data')
  return write_demo_dataset(out, num_clips=80, seed=1, target_length=64, num_mel_bins=64)


def _finish(processes, timeout=600):
  """(returncode, stderr) of each process once it ends."""
  results = []
  for process in processes:
    _, err = process.communicate(timeout=timeout)
    results.append((process.returncode, err))
  return results


def _run_two(args):
  for code, err in _finish(start_processes(args)):
    assert code == 0, err[-4000:]


def _last_line(err: str) -> str:
  return err.strip().splitlines()[-1]


@pytest.fixture(scope='module')
def one_process_run(dataset, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('one')
  run_main(tiny_run_flags(dataset, workdir))
  return workdir


@pytest.fixture(scope='module')
def two_process_run(dataset, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('two')
  processes = start_processes(tiny_run_flags(dataset, workdir))
  outputs = [p.communicate(timeout=600) for p in processes]
  for p, (_, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-4000:]
  assert outputs[1][0] == ''  # only process 0 prints
  return workdir


def test_two_processes_match_one(two_process_run, one_process_run, tmp_path):
  assert_same_run(two_process_run, one_process_run, tmp_path)


def test_other_process_count_is_refused_in_one_line(dataset, two_process_run):
  result = run_main(tiny_run_flags(dataset, two_process_run, max_steps=TOTAL_STEPS + 2),
                    check=False)
  assert result.returncode == faults.EXIT_BAD_INPUT, result.stderr[-3000:]
  assert _last_line(result.stderr).startswith(
      f'error: the checkpoint at step {TOTAL_STEPS} in ')
  assert 'written by 2 processes and this job has 1' in _last_line(result.stderr)


def test_two_processes_resume_exactly_after_a_preemption_and_a_dead_peer(
    dataset, two_process_run, tmp_path):
  """One workdir through a preemption and a dead peer in turn, each rerun resuming from the
  last complete checkpoint: the end is the uninterrupted run, row for row."""
  workdir = tmp_path / 'interrupted'
  args = tiny_run_flags(dataset, workdir)

  # SIGTERM to process 1 only: every process saves the same step and exits 75.
  processes = start_processes(args)
  wait_for_steps(workdir, 5)
  processes[1].send_signal(signal.SIGTERM)
  results = _finish(processes, timeout=300)
  for code, err in results:
    assert code == faults.EXIT_PREEMPTED, err[-3000:]
  lines = [_last_line(err) for _, err in results]
  assert lines[0] == lines[1]
  saved = int(lines[0].split('saved the checkpoint at step ')[1].split(';')[0])
  assert 5 <= saved < TOTAL_STEPS and (workdir / 'checkpoints' / str(saved)).is_dir()

  # A dead peer (SIGKILL): the survivor ends in one line, soon, and names the checkpoint
  # to rerun; the rerun drops the rows logged after that checkpoint.
  processes = start_processes(args)
  wait_for_steps(workdir, saved + 2)
  processes[1].send_signal(signal.SIGKILL)
  killed = time.monotonic()
  (code, err), _ = _finish(processes, timeout=300)
  assert time.monotonic() - killed < 120
  assert code == faults.EXIT_PEER_LOST, err[-3000:]
  line = _last_line(err)
  assert line.startswith('error: ') and 'peer process' in line
  assert 'the last complete checkpoint is step ' in line and 'rerun' in line
  assert len(err.splitlines()) < 40, err  # native logs went to logs/process_0.log
  assert (workdir / 'logs' / 'process_0.log').is_file()
  assert len(train_losses(workdir)) < TOTAL_STEPS, 'the run finished before the kill'

  _run_two(args)
  assert metric_rows(workdir) == metric_rows(two_process_run)


def _shard_files(shards_dir, suffix):
  return sorted(pathlib.Path(shards_dir, 'train').glob(f'shard-*{suffix}'))


def _converted(dataset, shards_dir):
  """Both splits of `dataset` converted into `shards_dir`, as main.py converts them."""
  for split in ('train', 'val'):
    convert(dataset[f'{split}_json'], dataset[f'{split}_pt_dir'],
            split_shards_dir(str(shards_dir), split), num_mel_bins=64, verbose=False)
  return shards_dir


def test_a_truncated_shard_is_refused_before_step_0(dataset, tmp_path):
  workdir = tmp_path / 'truncated'
  args = tiny_run_flags(dataset, workdir, max_steps=1,
                        **{'data.shards_dir': str(_converted(dataset, tmp_path / 'shards'))})
  frames = _shard_files(tmp_path / 'shards', '.frames.npy')[0]
  frames.write_bytes(frames.read_bytes()[:-100])
  result = run_main(args, check=False)
  assert result.returncode == faults.EXIT_BAD_INPUT, result.stderr[-3000:]
  line = _last_line(result.stderr)
  assert line.startswith('error: ') and frames.name in line and 'truncated' in line
  assert 'python -m ssast_jax.data.convert' in line


def test_a_corrupted_shard_is_found_by_verify_data(dataset, tmp_path):
  workdir = tmp_path / 'corrupted'
  args = tiny_run_flags(dataset, workdir, max_steps=1,
                        **{'data.shards_dir': str(_converted(dataset, tmp_path / 'shards'))})
  frames = _shard_files(tmp_path / 'shards', '.frames.npy')[0]
  content = bytearray(frames.read_bytes())
  content[-10:] = bytes(b ^ 0xFF for b in content[-10:])
  frames.write_bytes(bytes(content))
  assert run_main(args, check=False).returncode == 0  # same size: only hashes tell
  result = run_main(args + ['--verify_data'], check=False)
  assert result.returncode == faults.EXIT_BAD_INPUT, result.stderr[-3000:]
  line = _last_line(result.stderr)
  assert frames.name in line and 'hash' in line


def _mount_tmpfs(path, size):
  path.mkdir(parents=True)
  result = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)],
                          capture_output=True, check=False)
  if result.returncode:
    pytest.skip(f'cannot mount a small file system here: {result.stderr.decode().strip()}')


def test_a_full_disk_keeps_the_last_complete_checkpoint(dataset, one_process_run, tmp_path):
  workdir = tmp_path / 'full'
  checkpoints_dir = workdir / 'checkpoints'
  _mount_tmpfs(checkpoints_dir, '64m')
  filler = checkpoints_dir / 'filler'
  try:
    args = tiny_run_flags(dataset, workdir)
    process = subprocess.Popen([sys.executable, str(ROOT / 'main.py')] + args, env=env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(workdir, 4)
    with open(filler, 'wb', buffering=0) as f:  # fill the file system (unbuffered: close
      try:                                         # has nothing left to flush)
        while True:
          f.write(b'\0' * (1 << 20))
          f.flush()
      except OSError:
        pass
    _, err = process.communicate(timeout=300)
    assert process.returncode == faults.EXIT_CHECKPOINT_WRITE, err[-3000:]
    line = _last_line(err)
    assert line.startswith('error: a checkpoint could not be written')
    assert 'the last complete checkpoint is step ' in line
    kept = int(line.split('the last complete checkpoint is step ')[1].split()[0])
    assert (checkpoints_dir / str(kept)).is_dir()
    filler.unlink()
    run_main(args)
    assert metric_rows(workdir) == metric_rows(one_process_run)
  finally:
    subprocess.run(['umount', '-l', str(checkpoints_dir)], check=False)


def test_time_based_checkpoints_are_written_between_step_intervals(dataset, tmp_path):
  workdir = tmp_path / 'timed'
  run_main(tiny_run_flags(dataset, workdir, max_steps=7, print_every_steps=2,
                          checkpoint_every_steps=1000, checkpoint_every_minutes=1e-4,
                          keep_checkpoints=10))
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps[0] == 0 and steps[-1] == 7
  assert set(steps[1:-1]) and set(steps[1:-1]) <= {2, 4, 6}, steps  # at logging steps only


def test_the_watchdog_ends_a_process_waiting_on_a_lost_peer_in_one_line():
  # A collective that waits forever on a dead peer (NCCL) never returns: the watchdog ends
  # the process before the coordination service's native abort.
  code = ('import time\nfrom ssast_jax.training import faults\n'
          "faults.ProgressWatchdog(True, lambda: 'the last complete checkpoint is step 3 in D',"
          ' seconds=1)\ntime.sleep(60)\n')
  started = time.monotonic()
  result = subprocess.run([sys.executable, '-c', code], env=env(), capture_output=True,
                          text=True, timeout=120)
  assert time.monotonic() - started < 30
  assert result.returncode == faults.EXIT_PEER_LOST
  assert _last_line(result.stderr).startswith('error: no progress for ')
  assert 'the last complete checkpoint is step 3 in D; rerun' in _last_line(result.stderr)


class _FailingSaves:
  """A checkpoint manager whose pending save failed with `error`."""

  def __init__(self, error):
    self._error = error

  def wait_until_finished(self):
    raise self._error


class _FailingClose:
  def close(self):
    raise OSError(28, 'No space left on device')


def test_a_write_that_fails_while_closing_the_checkpoints_is_a_write_error(tmp_path):
  """Closing the manager finishes its metadata writes; on a full disk that failure ends
  the run as a checkpoint write error (exit 74) naming the last complete checkpoint."""
  from ssast_jax.training import train  # pylint: disable=import-outside-toplevel
  (tmp_path / 'checkpoints' / '4').mkdir(parents=True)
  with pytest.raises(faults.CheckpointWriteError,
                     match=r'could not be written \(OSError: .*No space left on device\).*'
                           r'the last complete checkpoint is step 4 in '):
    train.close_checkpoints(_FailingClose(), str(tmp_path))


@pytest.mark.parametrize('process_count, code', [(2, faults.EXIT_PEER_LOST), (1, None)])
def test_a_save_failed_in_a_barrier_is_a_lost_peer_with_several_processes(
    process_count, code, monkeypatch, tmp_path):
  """A peer killed while the processes wait in a checkpoint's barrier fails the save: that
  is a lost peer (exit 76, rerun) in a job of several processes, not a full disk (74)."""
  from ssast_jax.training import train  # pylint: disable=import-outside-toplevel

  def exit_now(message, code):
    raise SystemExit((code, message))
  monkeypatch.setattr(faults, 'exit_now', exit_now)
  monkeypatch.setattr(train.jax, 'process_count', lambda: process_count)
  (tmp_path / 'checkpoints' / '6').mkdir(parents=True)
  error = RuntimeError('DEADLINE_EXCEEDED: Barrier timed out. Id: OrbaxCheckpointManagerSave')
  if code is None:
    with pytest.raises(faults.CheckpointWriteError,
                       match=r'could not be written \(RuntimeError: DEADLINE_EXCEEDED.*'
                             r'the last complete checkpoint is step 6 in '):
      train.wait_for_saves(_FailingSaves(error), str(tmp_path))
    return
  with pytest.raises(SystemExit) as ended:
    train.wait_for_saves(_FailingSaves(error), str(tmp_path))
  got_code, message = ended.value.code
  assert got_code == code
  assert message.startswith('a peer process stopped: a collective failed on process 0 ')
  assert 'Barrier timed out' in message
  assert 'the last complete checkpoint is step 6 in ' in message and 'rerun' in message
