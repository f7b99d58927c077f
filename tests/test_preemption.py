"""Preemption and crashes: SIGTERM saves and stops; SIGKILL loses nothing.

Each test trains the digits demo model in subprocesses, interrupts them, and
resumes until the run finishes; the final parameters must equal those of an
uninterrupted run (the data order and dropout are functions of (seed, step)).
"""

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from vit_jax import preemption
from vit_jax import train_checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(REPO, 'configs', 'digits_pretrain.py')
TOTAL_STEPS = 120
FLAGS = [f'--config.total_steps={TOTAL_STEPS}', '--config.batch_size=32',
         '--config.warmup_steps=10', '--config.log_every=10',
         '--config.eval_every=0', '--config.keep_checkpoints=2']
TIMEOUT = 300  # Seconds for any one subprocess.

pytestmark = pytest.mark.slow


def command(workdir, *extra):
  return [sys.executable, '-m', 'vit_jax.main', f'--config={DIGITS}',
          f'--workdir={workdir}', *FLAGS, *extra]


def environment(tfds_dir):
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', TFDS_DATA_DIR=tfds_dir)


def run_to_end(workdir, tfds_dir, *extra):
  """Runs (or resumes) training to the end; returns its stdout."""
  done = subprocess.run(command(workdir, *extra), cwd=REPO,
                        env=environment(tfds_dir), capture_output=True,
                        text=True, timeout=TIMEOUT)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


def complete_steps(workdir):
  """Steps of the finished checkpoints (orbax's temporary folders left out)."""
  directory = train_checkpoints.checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def logged_lines(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return sum(1 for _ in f)


def wait_for(condition, process, timeout=TIMEOUT):
  """Polls `condition` until true; fails if `process` ends or time runs out."""
  deadline = time.time() + timeout
  while not condition():
    if process.poll() is not None:
      pytest.fail(f'training ended early with status {process.returncode}: '
                  f'{read(process.log)[-3000:]}')
    if time.time() > deadline:
      pytest.fail('training did not get far enough in time')
    time.sleep(0.02)


def read(path):
  with open(path) as f:
    return f.read()


# Runs argv[1:] with SIGINT at its default: a test run started as a
# background job inherits SIGINT ignored, which would hide Ctrl-C handling.
SIGINT_DEFAULT = [
    sys.executable, '-c',
    'import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); '
    'os.execv(sys.argv[1], sys.argv[1:])']


def start(workdir, tfds_dir, *extra):
  """Starts training; its stdout and stderr go to files (no pipe to fill)."""
  log = f'{workdir}.{time.time_ns()}.log'
  os.makedirs(os.path.dirname(log), exist_ok=True)
  with open(log + '.out', 'w') as out, open(log, 'w') as err:
    process = subprocess.Popen(SIGINT_DEFAULT + command(workdir, *extra),
                               cwd=REPO, env=environment(tfds_dir),
                               stdout=out, stderr=err)
  process.log = log  # stderr.
  return process


def stop(process):
  """Kills `process` if it still runs and reaps it."""
  if process.poll() is None:
    process.kill()
  process.wait(timeout=60)


def assert_same_params(workdir, reference):
  params, step = train_checkpoints.restore_params(workdir)
  assert step == TOTAL_STEPS
  expected, _ = train_checkpoints.restore_params(reference)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               params, expected)


@pytest.fixture(scope='module', name='straight')
def fixture_straight(tmp_path_factory):
  """An uninterrupted run: (its workdir, the tfds data dir)."""
  root = tmp_path_factory.mktemp('preemption')
  tfds_dir, workdir = str(root / 'tfds'), str(root / 'straight')
  run_to_end(workdir, tfds_dir)
  return workdir, tfds_dir


@pytest.mark.parametrize('signum, message', [
    (signal.SIGTERM, 'preempted (SIGTERM) at step'),
    (signal.SIGINT, 'interrupted (SIGINT) at step'),  # Ctrl-C.
])
def test_signal_saves_exits_and_resumes(straight, tmp_path, signum, message):
  reference, tfds_dir = straight
  workdir = str(tmp_path / 'run')
  # Checkpoints only at the end: the one found after the signal is its own.
  process = start(workdir, tfds_dir, '--config.checkpoint_every=0')
  try:
    wait_for(lambda: logged_lines(workdir) >= 1, process)  # Training.
    process.send_signal(signum)
    process.wait(timeout=TIMEOUT)
  finally:
    stop(process)
  stderr = read(process.log)
  assert process.returncode == preemption.EXIT_CODE, stderr[-3000:]
  lines = stderr.strip().splitlines()
  assert message in lines[-1], stderr[-3000:]
  assert 'Traceback' not in stderr
  steps = complete_steps(workdir)
  assert len(steps) == 1 and 10 <= steps[0] < TOTAL_STEPS, steps
  assert f'step {steps[0]}/' in lines[-1]

  output = run_to_end(workdir, tfds_dir, '--config.checkpoint_every=0')
  assert f'resuming from step {steps[0]}' in output
  assert_same_params(workdir, reference)


def test_sigkill_at_random_moments_resumes_from_a_complete_checkpoint(
    straight, tmp_path):
  reference, tfds_dir = straight
  workdir = str(tmp_path / 'run')
  rng = random.Random(0)
  extra = ('--config.checkpoint_every=1',)  # Nearly always mid-save.
  resumed_from = []
  for _ in range(3):
    # Some progress past the last checkpoint, then a kill at a random moment.
    target = max(complete_steps(workdir), default=0) + rng.randint(1, 20)
    process = start(workdir, tfds_dir, *extra)
    try:
      wait_for(lambda: max(complete_steps(workdir), default=0) >= target,
               process)
      time.sleep(rng.uniform(0.0, 0.3))
    finally:
      stop(process)
    assert process.returncode == -signal.SIGKILL, 'finished before the kill'
    resumed_from.append(max(complete_steps(workdir)))
  assert resumed_from == sorted(resumed_from)

  # The cadence does not change the parameters; fewer saves finish sooner.
  output = run_to_end(workdir, tfds_dir, '--config.checkpoint_every=0')
  assert f'resuming from step {resumed_from[-1]}' in output
  assert_same_params(workdir, reference)


@contextlib.contextmanager
def tmpfs(path, size):
  """A fresh tmpfs mounted at `path` (skips the test where mounting fails)."""
  os.makedirs(path)
  mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}',
                            'tmpfs', path], capture_output=True, check=False)
  if mounted.returncode:
    pytest.skip(f'cannot mount a tmpfs here: {mounted.stderr!r}')
  try:
    yield path
  finally:
    subprocess.run(['umount', path], check=True)


def digest(directory):
  """Every file's path and bytes below `directory`."""
  contents = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      contents[os.path.relpath(path, directory)] = read_bytes(path)
  return contents


def read_bytes(path):
  with open(path, 'rb') as f:
    return f.read()


def test_read_only_workdir_fails_cleanly_and_keeps_checkpoints(
    straight, tmp_path):
  reference, tfds_dir = straight
  with tmpfs(str(tmp_path / 'mount'), '64m') as mount:
    workdir = os.path.join(mount, 'run')
    shutil.copytree(reference, workdir)
    subprocess.run(['mount', '-o', 'remount,ro', mount], check=True)
    before = digest(workdir)
    done = subprocess.run(
        command(workdir, f'--config.total_steps={TOTAL_STEPS + 10}'),
        cwd=REPO, env=environment(tfds_dir), capture_output=True, text=True,
        timeout=TIMEOUT)
    assert digest(workdir) == before
  assert done.returncode == 1
  assert 'Traceback' not in done.stderr
  last = done.stderr.strip().splitlines()[-1]
  assert f'--workdir {workdir} is not writable: Read-only file system' in last


def test_full_disk_fails_cleanly_and_keeps_earlier_checkpoints(
    straight, tmp_path):
  _, tfds_dir = straight
  # Room for the config and two checkpoints of the demo model (~1.7 MB each).
  with tmpfs(str(tmp_path / 'mount'), '4m') as mount:
    workdir = os.path.join(mount, 'run')
    done = subprocess.run(command(workdir, '--config.checkpoint_every=1'),
                          cwd=REPO, env=environment(tfds_dir),
                          capture_output=True, text=True, timeout=TIMEOUT)
    steps = complete_steps(workdir)
    restored = train_checkpoints.restore_params(workdir)[1] if steps else None
  assert done.returncode == 1
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith('error: could not write a checkpoint in'), last
  assert 'No space left on device' in last
  assert f'complete checkpoints (steps {steps}) are untouched' in last
  assert steps and restored == steps[-1]
