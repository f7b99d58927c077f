"""Preemption: SIGTERM asks the run to save at the current step and stop.

Schedulers (SLURM, Kubernetes, TPU maintenance) send SIGTERM some seconds
before they kill a job. The training loop asks `PreemptionWatcher.reached`
after every step; once it says yes the loop saves a checkpoint at that step,
waits for it to be on disk and raises `Preempted`, which `vit_jax.main`
reports with one line and exit status `EXIT_CODE`. Rerunning the same command
resumes from that checkpoint.

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
  """The run saved a checkpoint at `step` and stopped on a SIGTERM."""

  def __init__(self, step: int, total_steps: int, checkpoint_dir: str):
    super().__init__(
        f'preempted (SIGTERM) at step {step}/{total_steps}: checkpoint saved '
        f'in {checkpoint_dir}; rerun the same command to resume')
    self.step = step


class PreemptionWatcher:
  """Tells the training loop when to save and stop because of a SIGTERM.

  Use as a context manager around the loop: on exit the previous SIGTERM
  handler is back, so a SIGTERM after training (during the final eval or
  results) ends the process as usual.
  """

  def __init__(self):
    self._signalled = threading.Event()
    self._previous: Optional[signal.Handlers] = None
    self._installed = False

  def __enter__(self) -> 'PreemptionWatcher':
    # Several processes: JAX's own handler feeds the sync service; a Python
    # handler would replace it. Python handlers only work in the main thread.
    if (jax.process_count() == 1 and
        threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
      self._installed = True
    return self

  def __exit__(self, *exc_info) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame  # Only the fact counts; the loop acts between steps.
    self._signalled.set()

  def reached(self, step: int) -> bool:
    """Whether to save at `step` (just completed) and stop.

    With several processes, must be called at every step by every process.
    """
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled.is_set()
