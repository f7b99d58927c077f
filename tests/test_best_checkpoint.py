"""Keeping the best checkpoint by an eval metric (`best_checkpoint_metric`).

The unit cases save hand-made states with chosen metrics, so which steps
must survive is known in advance; the end-to-end case trains the tiny digits
model with an eval every step and checks the kept checkpoint against the
accuracies in metrics.jsonl.
"""

import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax import input_pipeline
from vit_jax import metrics
from vit_jax import train
from vit_jax import train_checkpoints
from tests import test_train


@flax.struct.dataclass
class _State:
  params: dict
  opt_state: dict
  step: jax.Array
  rng: jax.Array


def _state(step):
  """A state whose only parameter holds its own step number."""
  return _State(params={'w': jnp.full((2,), float(step))},
                opt_state={'m': jnp.zeros((2,))},
                step=jnp.asarray(step, jnp.int32), rng=jax.random.key_data(
                    jax.random.key(0)))


def _save_all(workdir, metric, values, keep=2):
  """Saves steps 1..len(values); step s carries `values[s - 1]` (None: no
  eval at that step). Returns the reopened checkpointer."""
  saver = train_checkpoints.Checkpointer(workdir, keep=keep,
                                         best_metric=metric)
  for step, value in enumerate(values, start=1):
    scores = None if value is None else {metric: value, 'test/examples': 360}
    saver.save(step, _state(step), metrics=scores)
  saver.close()
  return train_checkpoints.Checkpointer(workdir, keep=keep, best_metric=metric)


def _write_config(workdir, metric):
  with open(os.path.join(workdir, train_checkpoints.CONFIG_FILE), 'w') as f:
    json.dump({'best_checkpoint_metric': metric, 'model': {}}, f)


def test_keeps_the_latest_and_the_highest_accuracy(tmp_path):
  workdir = str(tmp_path)
  saver = _save_all(workdir, 'test/accuracy',
                    [0.1, 0.5, 0.3, None, 0.2, 0.4])
  assert saver.all_steps() == [2, 5, 6]  # The best, and the latest 2.
  assert saver.best() == (2, 0.5)
  saver.close()


def test_a_loss_keeps_the_lowest(tmp_path):
  workdir = str(tmp_path)
  saver = _save_all(workdir, 'validation/loss', [2.0, 1.5, 0.7, 0.9, 1.1],
                    keep=1)
  assert saver.all_steps() == [3, 5]
  assert saver.best() == (3, -0.7)  # Scores: higher is better.
  saver.close()


def test_on_a_tie_the_later_checkpoint_is_the_best(tmp_path):
  saver = _save_all(str(tmp_path), 'test/accuracy', [0.5, 0.2, 0.5], keep=1)
  assert saver.all_steps() == [3]  # orbax's BestN keeps the later one.
  assert saver.best() == (3, 0.5)
  saver.close()


def test_the_best_is_tracked_while_saves_are_in_flight(tmp_path):
  saver = train_checkpoints.Checkpointer(str(tmp_path), keep=1,
                                         best_metric='test/accuracy')
  for step, accuracy in enumerate([0.3, 0.6, 0.4], start=1):
    saver.save(step, _state(step), metrics={'test/accuracy': accuracy})
    assert saver.best() == ((2, 0.6) if step >= 2 else (1, 0.3))
  saver.close()


def test_without_a_metric_only_the_latest_are_kept(tmp_path):
  saver = _save_all(str(tmp_path), '', [0.9, 0.1, 0.2])
  assert saver.all_steps() == [2, 3]
  assert saver.best() == (None, -np.inf)
  saver.close()


def test_restore_params_reads_the_best_step(tmp_path):
  workdir = str(tmp_path)
  _save_all(workdir, 'test/accuracy', [0.1, 0.9, 0.3, 0.2]).close()
  _write_config(workdir, 'test/accuracy')
  params, step = train_checkpoints.restore_params(workdir, step='best')
  assert step == 2
  np.testing.assert_array_equal(params['w'], [2.0, 2.0])
  assert train_checkpoints.restore_params(workdir)[1] == 4  # Latest.


def test_step_best_without_a_metric_is_one_clear_line(tmp_path):
  workdir = str(tmp_path)
  _save_all(workdir, '', [0.1, 0.2]).close()
  _write_config(workdir, '')
  with pytest.raises(FileNotFoundError,
                     match='sets no best_checkpoint_metric') as error:
    train_checkpoints.restore_params(workdir, step='best')
  assert '\n' not in str(error.value)


@pytest.mark.parametrize('value, expected', [
    (None, None), ('', None), ('  ', None), (7, 7), ('12', 12),
    ('best', 'best')])
def test_parse_step(value, expected):
  assert checkpoint.parse_step(value) == expected


@pytest.mark.parametrize('value', ['latest', '-3', '1.5', 'Best'])
def test_parse_step_rejects_other_text_naming_the_key(value):
  with pytest.raises(ValueError, match=f"init_from_step={value!r}"):
    checkpoint.parse_step(value, 'init_from_step')


def test_unknown_metric_names_the_key_and_the_choices():
  config = test_train.tiny_config(best_checkpoint_metric='test/acc')
  info = input_pipeline.DatasetInfo('digits', 10, 1000,
                                    {'test': 360, 'validation': 100}, None, 1)
  with pytest.raises(ValueError) as error:
    train.validate_data(config, info)
  assert str(error.value) == (
      "best_checkpoint_metric='test/acc' is not an eval metric of digits; "
      'choose one of test/accuracy, test/loss, validation/accuracy, '
      'validation/loss')


def _eval_accuracies(workdir):
  """{step: test accuracy} from metrics.jsonl."""
  with open(os.path.join(workdir, metrics.METRICS_FILE)) as f:
    records = [json.loads(line) for line in f]
  return {r['step']: r['test/accuracy'] for r in records
          if 'test/accuracy' in r}


@pytest.mark.slow
def test_training_keeps_the_best_eval_and_it_loads_for_finetuning(tmp_path):
  workdir = str(tmp_path / 'run')
  # Evals every step, regular checkpoints only at the end: any other kept
  # step was saved because its eval was the best so far.
  config = test_train.tiny_config(
      total_steps=8, eval_every=1, checkpoint_every=0, keep_checkpoints=1,
      best_checkpoint_metric='test/accuracy', lr=0.03)
  results = train.train_and_evaluate(config, workdir)

  accuracies = _eval_accuracies(workdir)
  assert sorted(accuracies) == list(range(1, 9))
  saver = train_checkpoints.Checkpointer(workdir, keep=1,
                                         best_metric='test/accuracy')
  best_step, best_score = saver.best()
  kept = saver.all_steps()
  saver.close()
  assert best_score == max(accuracies.values())
  assert accuracies[best_step] == best_score
  assert kept == sorted({best_step, 8})
  assert results['best_checkpoint_step'] == best_step
  # A finer accuracy sequence would not be constant; make sure this one
  # exercised the best-so-far logic (several distinct values).
  assert len(set(accuracies.values())) > 1, accuracies

  params, _ = checkpoint.load_checkpoint(workdir, step='best')
  expected, _ = train_checkpoints.restore_params(workdir, best_step)
  jax.tree.map(np.testing.assert_array_equal, params, expected)

  # Fine-tuning from the best checkpoint reads that step.
  finetune = test_train.tiny_config(init_from=workdir,
                                    init_from_step='best', total_steps=1)
  run = train.setup_run(finetune, str(tmp_path / 'finetune'))
  loaded, summary = train.pretrained_params(run)
  assert summary
  np.testing.assert_array_equal(
      loaded['Transformer']['encoder_norm']['scale'],
      expected['Transformer']['encoder_norm']['scale'])
