"""The TensorBoard event file and metrics.jsonl that a run's logger writes."""

import glob
import json
import os

import numpy as np

from vit_jax import metrics


def read_events(directory):
  """(tag, step, value, plugin) of every summary value in `directory`."""
  # pylint: disable=g-import-not-at-top
  import tensorflow as tf
  from tensorflow.core.util import event_pb2
  # pylint: enable=g-import-not-at-top
  (path,) = glob.glob(os.path.join(directory, 'events.out.tfevents.*'))
  found = []
  for record in tf.data.TFRecordDataset(path):
    event = event_pb2.Event.FromString(record.numpy())
    for value in event.summary.value:
      found.append((value.tag, event.step,
                    float(tf.make_ndarray(value.tensor)),
                    value.metadata.plugin_data.plugin_name))
  return found


def test_logged_scalars_are_tensorboard_scalar_events(tmp_path):
  logger = metrics.MetricLogger(str(tmp_path), total_steps=10, batch_size=8)
  logger.log_train(5, {'loss': np.float32(2.5)})
  logger.log_eval(10, {'test/accuracy': 0.75, 'test/loss': 1.25})
  logger.close()

  events = read_events(os.path.join(tmp_path, metrics.TENSORBOARD_DIR))
  assert ('train/loss', 5, 2.5, 'scalars') in events
  assert ('test/accuracy', 10, 0.75, 'scalars') in events
  assert ('test/loss', 10, 1.25, 'scalars') in events
  with open(os.path.join(tmp_path, metrics.METRICS_FILE)) as f:
    records = [json.loads(line) for line in f]
  assert records[0]['step'] == 5 and records[0]['train/loss'] == 2.5
  assert records[1] == {'step': 10, 'test/accuracy': 0.75, 'test/loss': 1.25}

