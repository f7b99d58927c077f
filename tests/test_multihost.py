"""Two JAX processes on 127.0.0.1 train, checkpoint and resume the demo.

Each process runs `python -m vit_jax.main` with 2 CPU devices and gloo
collectives (set through JAX's environment variables), so the mesh spans 4
devices in 2 processes and each process reads its own half of every batch.
The reference is one process whose input iterator concatenates the two
processes' shards in process order, i.e. the same global batches: the train
losses and final parameters must agree within float tolerance.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import digits_pretrain
from vit_jax import input_pipeline
from vit_jax import preemption
from vit_jax import train
from vit_jax import train_checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(REPO, 'configs', 'digits_pretrain.py')
PROCESSES = 2
# A constant learning rate does not depend on total_steps, so 4 steps then a
# resume to 8 is the same run as 8 straight steps.
OVERRIDES = {'batch_size': 32, 'warmup_steps': 0, 'schedule': 'constant',
             'log_every': 1, 'eval_every': 0, 'checkpoint_every': 2}
TIMEOUT = 300

pytestmark = pytest.mark.slow


def free_port():
  with contextlib.closing(socket.socket()) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(workdir, tfds_dir, total_steps, port, log_dir, *extra):
  """Starts the processes; each writes its output to its own log file."""
  processes = []
  for index in range(PROCESSES):
    flags = [f'--config.{key}={value}' for key, value in OVERRIDES.items()]
    flags += list(extra)
    command = [
        sys.executable, '-m', 'vit_jax.main', f'--config={DIGITS}',
        f'--workdir={workdir}', f'--config.total_steps={total_steps}', *flags,
        '--config.multihost.initialize=True',
        f'--config.multihost.coordinator_address=127.0.0.1:{port}',
        f'--config.multihost.num_processes={PROCESSES}',
        f'--config.multihost.process_id={index}']
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', TFDS_DATA_DIR=tfds_dir,
               JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='2',
               JAX_CPU_COLLECTIVES_IMPLEMENTATION='gloo')
    log = os.path.join(log_dir, f'process_{index}_{total_steps}.log')
    with open(log, 'w') as out:
      processes.append((subprocess.Popen(
          command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT),
                        log))
  return processes


def run_processes(workdir, tfds_dir, total_steps, log_dir):
  """Runs all processes to the end; kills every one of them on any failure."""
  processes = launch(workdir, tfds_dir, total_steps, free_port(), log_dir)
  try:
    for process, log in processes:
      process.wait(timeout=TIMEOUT)
      with open(log) as f:
        output = f.read()
      assert process.returncode == 0, output[-3000:]
  finally:
    for process, _ in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
  return [open(log).read() for _, log in processes]


def shard_concatenating_iterator(make_iterator):
  """A train iterator yielding both processes' shards, process 0 first."""
  def make(config, *, global_batch_size, **kwargs):
    kwargs.pop('process_index', None)
    kwargs.pop('process_count', None)
    shards = [make_iterator(config, global_batch_size=global_batch_size,
                            process_index=index, process_count=PROCESSES,
                            **kwargs) for index in range(PROCESSES)]
    for parts in zip(*shards):
      yield {key: np.concatenate([part[key] for part in parts])
             for key in parts[0]}
  return make


def train_losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  return {r['step']: r['train/loss'] for r in records if 'train/loss' in r}


def test_two_processes_train_checkpoint_resume_like_one(tmp_path,
                                                         monkeypatch):
  tfds_dir = str(tmp_path / 'tfds')
  # The reference first: it also prepares the digits for the processes.
  config = digits_pretrain.get_config()
  config.update_from_flattened_dict({**OVERRIDES, 'total_steps': 8,
                                     'data_dir': tfds_dir})
  monkeypatch.setattr(input_pipeline, 'make_train_iterator',
                      shard_concatenating_iterator(
                          input_pipeline.make_train_iterator))
  reference = str(tmp_path / 'reference')
  train.train_and_evaluate(config, reference)

  workdir = str(tmp_path / 'multihost')
  first = run_processes(workdir, tfds_dir, 4, str(tmp_path))
  assert 'step 4/4' in first[0]
  # Console output from process 0 only.
  assert 'step 4/4' not in first[1] and 'done:' not in first[1]
  assert train_checkpoints.restore_params(workdir)[1] == 4
  second = run_processes(workdir, tfds_dir, 8, str(tmp_path))
  assert 'resuming from step 4' in second[0]

  losses, expected = train_losses(workdir), train_losses(reference)
  assert sorted(losses) == list(range(1, 9))
  np.testing.assert_allclose([losses[s] for s in range(1, 9)],
                             [expected[s] for s in range(1, 9)], rtol=1e-5)
  params, step = train_checkpoints.restore_params(workdir)
  assert step == 8
  # Adam moves a parameter whose gradient is ~0 (cls token, zero-initialised
  # head) by up to lr = 1e-3 per step in the direction of the rounding noise
  # of that gradient (sums over 4 vs 8 devices): 1e-4 is a tenth of a step.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-4),
               params, train_checkpoints.restore_params(reference)[0])


def wait_for_logged_steps(workdir, count, processes):
  """Polls metrics.jsonl until `count` steps are logged; fails if a process ends."""
  path = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + TIMEOUT
  while not (os.path.exists(path) and len(train_losses(workdir)) >= count):
    for process, log in processes:
      if process.poll() is not None:
        with open(log) as f:
          pytest.fail(f'a process ended early with status '
                      f'{process.returncode}: {f.read()[-3000:]}')
    if time.time() > deadline:
      pytest.fail('training did not get far enough in time')
    time.sleep(0.05)


def test_sigterm_to_one_process_saves_every_process_at_one_step(tmp_path):
  """A scheduler's SIGTERM to one host: all save the same step, then resume."""
  tfds_dir = str(tmp_path / 'tfds')
  workdir = str(tmp_path / 'multihost')
  log_dir = str(tmp_path)
  # Far more steps than the test waits for; checkpoints only on preemption.
  processes = launch(workdir, tfds_dir, 5000, free_port(), log_dir,
                     '--config.checkpoint_every=0')
  try:
    wait_for_logged_steps(workdir, 2, processes)
    # Not the coordinator: the signal must travel from process 1 to process 0.
    processes[1][0].send_signal(signal.SIGTERM)
    for process, _ in processes:
      process.wait(timeout=TIMEOUT)
  finally:
    for process, _ in processes:
      if process.poll() is None:
        process.kill()
        process.wait()
  outputs = []
  for process, log in processes:
    with open(log) as f:
      outputs.append(f.read())
    assert process.returncode == preemption.EXIT_CODE, outputs[-1][-3000:]
    assert 'Traceback' not in outputs[-1]
  directory = train_checkpoints.checkpoint_dir(workdir)
  (step,) = [int(name) for name in os.listdir(directory) if name.isdigit()]
  assert 2 <= step < 5000
  for output in outputs:
    assert f'preempted (SIGTERM) at step {step}/5000' in output, output[-3000:]

  resumed = run_processes(workdir, tfds_dir, step + 2, log_dir)
  assert f'resuming from step {step}' in resumed[0]
  assert train_checkpoints.restore_params(workdir)[1] == step + 2
  assert sorted(train_losses(workdir))[-1] == step + 2
