"""Preemption: SIGTERM (or Ctrl-C) asks the run to save at this step and stop.

Schedulers (SLURM, Kubernetes, TPU maintenance) send SIGTERM some seconds
before they kill a job. The training loop asks `PreemptionWatcher.reached`
after every step; once it says yes the loop saves a checkpoint at that step,
waits for it to be on disk and raises `Preempted`, which `vit_jax.main`
reports with one line and exit status `EXIT_CODE`. Rerunning the same command
resumes from that checkpoint. A single-process run treats its first Ctrl-C
(SIGINT) the same way; a second Ctrl-C interrupts at once.

With one process a Python signal handler records the signal. With several
processes every process must save at the same step, whichever of them got
the signal: JAX's preemption sync service (started by
`jax.distributed.initialize`, which installs its own SIGTERM handler) agrees
on that step, and `multihost_utils.reached_preemption_sync_point` says when
it is reached.
"""

import signal
import threading
from typing import Optional

import jax
from jax.experimental import multihost_utils

# EX_TEMPFAIL from sysexits.h: the job stopped early on purpose and a rerun
# resumes it. Distinct from 0 (finished) and 1 (a user error), so a wrapper
# or the sweep runner does not record a preempted run as finished.
EXIT_CODE = 75


class Preempted(Exception):
  """The run saved a checkpoint at `step` and stopped on a signal."""

  def __init__(self, step: int, total_steps: int, checkpoint_dir: str,
               signal_name: str = 'SIGTERM'):
    what = 'interrupted' if signal_name == 'SIGINT' else 'preempted'
    super().__init__(
        f'{what} ({signal_name}) at step {step}/{total_steps}: checkpoint '
        f'saved in {checkpoint_dir}; rerun the same command to resume')
    self.step = step


# Signals that ask a single-process run to save and stop.
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionWatcher:
  """Tells the training loop when to save and stop because of a signal.

  Use as a context manager around the loop: on exit the previous handlers
  are back, so a signal after training (during the final eval or results)
  acts as usual.
  """

  def __init__(self):
    self._signalled = threading.Event()
    self._previous: dict[int, signal.Handlers] = {}
    self.signal_name = 'SIGTERM'

  def __enter__(self) -> 'PreemptionWatcher':
    # Several processes: JAX's own handler feeds the sync service; a Python
    # handler would replace it. Python handlers only work in the main thread.
    if (jax.process_count() == 1 and
        threading.current_thread() is threading.main_thread()):
      for signum in _SIGNALS:
        previous = signal.signal(signum, self._on_signal)
        if signum == signal.SIGINT and previous == signal.SIG_IGN:
          signal.signal(signum, previous)  # e.g. a background job: keep so.
        self._previous[signum] = previous
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def _on_signal(self, signum, frame) -> None:
    del frame  # The loop acts between steps.
    self.signal_name = signal.Signals(signum).name
    self._signalled.set()
    if signum == signal.SIGINT:  # A second Ctrl-C interrupts at once.
      signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

  def reached(self, step: int) -> bool:
    """Whether to save at `step` (just completed) and stop.

    With several processes, must be called at every step by every process.
    """
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled.is_set()
