"""Where measurements go: TensorBoard, `metrics.jsonl`, the console, results.

Only process 0 writes; every other process gets a logger that measures time
but writes nothing. `metrics.jsonl` is appended to, so a resumed run continues
the same file (steps between the last checkpoint and a crash appear twice;
the later line is the one that counts).
"""

import json
import math
import os
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np

from vit_jax import lazy_imports

# Loaded already by the input pipeline when a run starts logging.
tf = lazy_imports.LazyModule('tensorflow')

METRICS_FILE = 'metrics.jsonl'
RESULTS_FILE = 'results.json'
TENSORBOARD_DIR = 'tensorboard'


def non_finite(metrics: Mapping[str, Any]) -> list[str]:
  """Names of the measurements that are NaN or infinite."""
  return [name for name, value in metrics.items()
          if not np.all(np.isfinite(value))]


def format_duration(seconds: float) -> str:
  """'1h02m', '3m05s' or '42s'."""
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  if hours:
    return f'{hours}h{minutes:02d}m'
  if minutes:
    return f'{minutes}m{secs:02d}s'
  return f'{secs}s'


def progress_line(step: int, total_steps: int,
                  metrics: Mapping[str, float]) -> str:
  """One console line: step/total, loss, accuracy, lr, images/s, ETA."""
  parts = [f'step {step}/{total_steps} ({100 * step / total_steps:.0f}%)']
  for key, label, fmt in (('train/loss', 'loss', '.4f'),
                          ('train/accuracy', 'acc', '.3f'),
                          ('train/lr', 'lr', '.2e'),
                          ('train/img_per_sec', 'img/s', '.0f')):
    if key in metrics:
      parts.append(f'{label} {metrics[key]:{fmt}}')
  if 'train/eta_sec' in metrics:
    parts.append(f'ETA {format_duration(metrics["train/eta_sec"])}')
  return ' | '.join(parts)


def eval_line(step: int, metrics: Mapping[str, float]) -> str:
  """One console line with every split's accuracy and loss."""
  shown = ', '.join(f'{key} {value:.4f}' for key, value in sorted(
      metrics.items()) if key.endswith(('/accuracy', '/loss')))
  return f'eval at step {step}: {shown}'


def _read_best_accuracies(path: str) -> dict[str, float]:
  """The best '<split>/accuracy' of each split in an existing metrics file."""
  best = {}
  if not os.path.exists(path):
    return best
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # A line cut short by a crash.
      for key, value in record.items():
        if key.endswith('/accuracy') and not key.startswith('train/'):
          best[key] = max(best.get(key, -math.inf), value)
  return best


class ScalarEventWriter:
  """Writes scalars to a TensorBoard event file with TensorFlow's writer.

  Not tensorboardX: it imports torch whenever torch is installed, which
  adds 3-5 s to every run's start. `tf.summary.scalar` is defined by the
  tensorboard package, which tensorflow-cpu does not install; the record it
  writes is `tf.summary.write` of a float32 scalar tagged for the 'scalars'
  plugin, which is what this does.
  """

  def __init__(self, directory: str):
    # pylint: disable-next=g-import-not-at-top
    from tensorflow.core.framework import summary_pb2
    self._metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(
            plugin_name='scalars'))
    self._writer = tf.summary.create_file_writer(directory)

  def add_scalar(self, tag: str, value: float, step: int) -> None:
    with self._writer.as_default(step=step):
      tf.summary.write(tag, tf.constant(value, tf.float32),
                       metadata=self._metadata)

  def close(self) -> None:
    self._writer.close()


class MetricLogger:
  """Writes training and eval measurements, and times the training steps.

  Args:
    workdir: the run's directory.
    total_steps: length of the run, for progress and ETA.
    batch_size: global batch size, for images per second.
  """

  def __init__(self, workdir: str, *, total_steps: int, batch_size: int):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.is_main = jax.process_index() == 0
    self.best_accuracy: dict[str, float] = {}
    self.train_seconds = 0.0
    self.train_steps = 0
    self._window_start: Optional[tuple[int, float]] = None
    self._writer = None
    self._jsonl = None
    if self.is_main:
      metrics_path = os.path.join(workdir, METRICS_FILE)
      self.best_accuracy = _read_best_accuracies(metrics_path)
      self._writer = ScalarEventWriter(os.path.join(workdir, TENSORBOARD_DIR))
      self._jsonl = open(metrics_path, 'a')

  def start_window(self, step: int) -> None:
    """Starts timing training at `step` (after set-up, eval or a save)."""
    self._window_start = (step, time.perf_counter())

  def _close_window(self, step: int) -> dict[str, float]:
    """Timing measurements since `start_window`, and restarts the window."""
    start_step, start_time = self._window_start or (step, time.perf_counter())
    now = time.perf_counter()
    steps, seconds = step - start_step, now - start_time
    self._window_start = (step, now)
    if steps <= 0 or seconds <= 0:
      return {}
    self.train_seconds += seconds
    self.train_steps += steps
    step_time = seconds / steps
    return {
        'train/step_time_sec': step_time,
        'train/img_per_sec': self.batch_size / step_time,
        'train/eta_sec': step_time * (self.total_steps - step),
    }

  def log_train(self, step: int, metrics: Mapping[str, float]) -> dict:
    """Records averaged training metrics at a log step; returns all written."""
    record = {f'train/{key}': float(value) for key, value in metrics.items()}
    record.update(self._close_window(step))
    self._write(step, record)
    if self.is_main:
      print(progress_line(step, self.total_steps, record), flush=True)
    return record

  def log_eval(self, step: int, metrics: Mapping[str, float]) -> None:
    """Records eval metrics ('<split>/accuracy', '<split>/loss', ...)."""
    for key, value in metrics.items():
      if key.endswith('/accuracy'):
        self.best_accuracy[key] = max(self.best_accuracy.get(key, -math.inf),
                                      value)
    self._write(step, dict(metrics))
    if self.is_main:
      print(eval_line(step, metrics), flush=True)

  def _write(self, step: int, record: Mapping[str, float]) -> None:
    if not self.is_main:
      return
    for key, value in record.items():
      self._writer.add_scalar(key, value, step)
    self._jsonl.write(json.dumps({'step': step, **record}) + '\n')
    self._jsonl.flush()

  def throughput(self) -> float:
    """Training images per second over this process's timed windows."""
    if not self.train_seconds:
      return 0.0
    return self.train_steps * self.batch_size / self.train_seconds

  def close(self) -> None:
    """Flushes and closes the writers."""
    if self._writer is not None:
      self._writer.close()
      self._jsonl.close()
      self._writer = self._jsonl = None


def write_results(workdir: str, results: Mapping[str, Any]) -> None:
  """Writes `results.json` (process 0 only), atomically."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, RESULTS_FILE)
  with open(path + '.tmp', 'w') as f:
    json.dump(results, f, indent=2, sort_keys=True)
    f.write('\n')
  os.replace(path + '.tmp', path)
