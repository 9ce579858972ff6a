"""How a run ends when something around it fails: exit codes, preemption, a lost peer.

Exit codes of `main.py` (docs/training.md, "Faults"):

  0   finished, or reached `max_steps`
  1   the run stopped itself (a non-finite loss under nan_policy=stop): fix, then rerun
  2   bad input: the one-line message names the option or file; rerunning does not help
  74  a checkpoint could not be written (full disk, unwritable folder); the last complete
      one is kept: free space, then rerun
  75  preempted: SIGTERM reached a process and every process saved the same step; requeue
  76  a peer process stopped (killed, crashed, its node lost); requeue: the rerun resumes
      from the last complete checkpoint

In a job of several processes a dead peer shows up in two ways: a collective fails with an
error (CPU/Gloo: "connection closed by peer"), or it waits forever (NCCL on GPUs) until JAX's
coordination service notices the missing heartbeats and aborts the process natively, after
`jax.distributed`'s heartbeat timeout (100 s) and a stack trace of hundreds of lines. Here the
first becomes `PeerLost`, and `ProgressWatchdog` ends the second sooner, after
`WATCHDOG_SECONDS` without progress; both exit at once with `os._exit`, without the atexit
shutdown of `jax.distributed`, which would wait on the dead peer and then abort. Native logs
of such a job go to `WORKDIR/logs/process_I.log` (`send_native_logs_to`), so that the user's
terminal keeps only the one-line messages.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_CHECKPOINT_WRITE = 74
EXIT_PREEMPTED = 75
EXIT_PEER_LOST = 76
# Seconds without a finished step (or evaluation batch, or save) after which a job of
# several processes is taken to have lost a peer: below the coordination service's 100 s
# heartbeat timeout, far above any step of these models on an accelerator.
WATCHDOG_SECONDS = 60.0
# Words of the runtime errors a failed collective or coordination call raises.
_PEER_ERROR_MARKS = ('gloo', 'connection closed', 'connection reset', 'heartbeat',
                     'coordination service', 'nccl', 'unavailable', 'broken pipe',
                     'barrier')


class Preempted(Exception):
  """Every process saved the step of the preemption sync point; exit EXIT_PREEMPTED."""


class PeerLost(RuntimeError):
  """A collective or the coordination service failed: another process is gone."""


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written; the message names the last complete one."""


def is_peer_failure(error: BaseException, process_count: int) -> bool:
  """Whether `error` (a JaxRuntimeError or the like) means a peer of a multi-process job
  is gone, rather than a failure of this process's own computation."""
  text = str(error).lower()
  return process_count > 1 and any(mark in text for mark in _PEER_ERROR_MARKS)


class SigtermFlag:
  """A single process's SIGTERM as a flag the loop checks between steps.

  With several processes JAX's preemption service owns SIGTERM instead (it installs its own
  handler in `jax.distributed.initialize`, and `reached_preemption_sync_point` tells every
  process the same step to save), so this flag is not installed there.
  """

  def __init__(self, install: bool):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle) if install else None

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def restore(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def exit_now(message: str, code: int) -> None:
  """Writes `error: message` as one line to the user's stderr and ends the process at once,
  skipping atexit handlers (jax.distributed's shutdown would wait on a dead peer). The line
  starts on a line of its own (a progress bar may have left one unfinished)."""
  print(f'\nerror: {message}', file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(code)  # pylint: disable=protected-access


class ProgressWatchdog:
  """Ends the process with EXIT_PEER_LOST when `beat()` was not called for `seconds`.

  The training loop beats after each step it dispatches, evaluation batch and save, so a
  silence that long means this process waits in a collective on a peer that is gone.
  `describe_last_checkpoint` gives the message its last part.
  """

  def __init__(self, enabled: bool, describe_last_checkpoint, seconds: float = WATCHDOG_SECONDS):
    self._seconds = seconds
    self._describe = describe_last_checkpoint
    self._last = time.monotonic()
    self._done = threading.Event()
    self._thread = None
    if enabled:
      self._thread = threading.Thread(target=self._watch, daemon=True, name='watchdog')
      self._thread.start()

  def beat(self) -> None:
    self._last = time.monotonic()

  def _watch(self) -> None:
    while not self._done.wait(min(5.0, self._seconds / 4)):
      silent = time.monotonic() - self._last
      if silent > self._seconds:
        exit_now(f'no progress for {silent:.0f} s: a peer process has stopped or hangs '
                 f'(this is process {_process_index()}). {self._describe()}; rerun the '
                 f'same command to resume', EXIT_PEER_LOST)

  def stop(self) -> None:
    self._done.set()


def _process_index() -> int:
  import jax  # pylint: disable=import-outside-toplevel
  return jax.process_index()


def send_native_logs_to(path: str) -> None:
  """Points file descriptor 2 (where C++ libraries log) at `path`, keeping Python's
  `sys.stderr` on the original stream for the one-line messages."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  user_stderr = os.dup(2)
  log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
  os.dup2(log, 2)
  os.close(log)
  sys.stderr = os.fdopen(user_stderr, 'w', buffering=1, encoding='utf-8', errors='replace')
