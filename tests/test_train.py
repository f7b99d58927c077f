"""The train step, the loop, checkpoints and resume, on the built-in digits.

The end-to-end cases train a tiny ViT (hidden 16, one block) for a few steps
through the real input pipeline; conftest gives every test 8 CPU devices.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import digits_pretrain
from vit_jax import input_pipeline
from vit_jax import metrics
from vit_jax import optim
from vit_jax import parallel
from vit_jax import train
from vit_jax import train_checkpoints

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**changes):
  """digits_pretrain with a 1-block, width-16 model and a few steps."""
  config = digits_pretrain.get_config()
  config.model = digits_pretrain.digits_model(
      hidden_size=16, num_layers=1, num_heads=2, mlp_dim=32, dropout_rate=0.1)
  config.batch_size = 16
  config.eval_batch_size = 120  # 360 test images: 3 batches, 15 per device.
  config.total_steps = 4
  config.warmup_steps = 1
  config.log_every = 1
  config.eval_every = 0
  config.checkpoint_every = 2
  config.update(changes)
  return config


def _train_losses(workdir):
  """{step: loss} from metrics.jsonl (the later line wins on repeats)."""
  losses = {}
  with open(os.path.join(workdir, metrics.METRICS_FILE)) as f:
    for line in f:
      record = json.loads(line)
      if 'train/loss' in record:
        losses[record['step']] = record['train/loss']
  return losses


def _assert_trees_close(a, b, **tolerance):
  flat_a, tree_a = jax.tree.flatten(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_allclose(np.asarray(x, np.float32),
                               np.asarray(y, np.float32), **tolerance)


# ---------------------------------------------------------------------------
# The step alone, on synthetic batches.


def _synthetic_batch(batch_size, seed=0):
  rng = np.random.default_rng(seed)
  return {
      'image': rng.uniform(-1, 1, (batch_size, 8, 8, 1)).astype(np.float32),
      'label': np.eye(10, dtype=np.float32)[rng.integers(0, 10, batch_size)],
  }


def _step_fixture(mesh, accum_steps=1, model_dtype='float32'):
  config = tiny_config(optimizer='sgd', momentum_dtype='float32', lr=0.1)
  config.model.dropout_rate = 0.0  # Micro-batches draw other dropout masks.
  config.model.dtype = model_dtype
  info = input_pipeline.DatasetInfo('synthetic', 10, 1000, {'test': 10}, None,
                                    1)
  model = train.build_model(config, info)
  durations = optim.Durations(total_steps=10, warmup_steps=2)
  schedule = optim.schedule_from_config(config, durations)
  tx = optim.make_optimizer(config, schedule)
  _, shardings = train.abstract_state(model, tx, (8, 8, 1), mesh)
  state = train.create_train_state(model, tx, (8, 8, 1), mesh, shardings,
                                   seed=0)
  step = train.make_train_step(model, tx, schedule, mesh, shardings,
                               accum_steps=accum_steps)
  return state, step


def _run_steps(state, step, mesh, batch_size, num_steps=3):
  losses = []
  for i in range(num_steps):
    batch = parallel.global_batch(_synthetic_batch(batch_size, seed=i), mesh)
    state, step_metrics = step(state, batch)
    losses.append(float(step_metrics['loss']))
  return state, losses


def test_state_is_created_sharded_and_donated():
  mesh = parallel.make_mesh()
  state, step = _step_fixture(mesh)
  kernel = state.params['head']['kernel']
  assert kernel.sharding.is_equivalent_to(
      parallel.replicated_sharding(mesh), kernel.ndim)
  assert len(kernel.sharding.device_set) == jax.device_count() == 8
  old_params = state.params
  state, _ = step(state, parallel.global_batch(_synthetic_batch(16), mesh))
  assert jax.tree.leaves(old_params)[0].is_deleted()  # Donated.
  assert int(state.step) == 1


def test_accumulation_equals_full_batch():
  mesh = parallel.make_mesh()
  full_state, full_step = _step_fixture(mesh, accum_steps=1)
  accum_state, accum_step = _step_fixture(mesh, accum_steps=4)
  full_state, full_losses = _run_steps(full_state, full_step, mesh, 32)
  accum_state, accum_losses = _run_steps(accum_state, accum_step, mesh, 32)
  np.testing.assert_allclose(accum_losses, full_losses, rtol=1e-5)
  _assert_trees_close(accum_state.params, full_state.params, rtol=1e-4,
                      atol=1e-6)


def test_bfloat16_compute_keeps_float32_params():
  mesh = parallel.make_mesh()
  state, step = _step_fixture(mesh, model_dtype='bfloat16')
  state, losses = _run_steps(state, step, mesh, 16, num_steps=2)
  assert all(np.isfinite(losses))
  assert {leaf.dtype for leaf in jax.tree.leaves(state.params)} == {
      jnp.dtype(jnp.float32)}


def test_micro_batch_must_split_over_devices():
  config = tiny_config(batch_size=16, accum_steps=4)
  with pytest.raises(ValueError, match=r'batch_size / accum_steps=4 .*8 '
                     'devices'):
    train.validate_config(config, num_devices=8)
  with pytest.raises(ValueError, match='batch_size=12 must be a positive '
                     r'multiple of the device count \(8 devices\)'):
    train.validate_config(tiny_config(batch_size=12), num_devices=8)


def test_image_size_must_divide_into_patches():
  config = tiny_config(image_size=9)
  with pytest.raises(ValueError, match=r'image_size=9 does not divide into '
                     r'patches of model.patch_size=\(2, 2\)$'):
    train.validate_config(config, num_devices=8)
  hybrid = tiny_config(image_size=40)
  hybrid.model.resnet = ml_collections.ConfigDict(
      {'num_layers': (1,), 'width_factor': 1})
  hybrid.model.patch_size = (4, 4)  # 40 -> 10 after the stem.
  with pytest.raises(ValueError, match='after the ResNet stem'):
    train.validate_config(hybrid, num_devices=8)
  hybrid.image_size = 48  # 12 after the stem.
  train.validate_config(hybrid, num_devices=8)


def test_workdir_probe_leaves_nothing_behind(tmp_path):
  new = tmp_path / 'runs' / 'new'
  train_checkpoints.check_workdir_writable(str(new))
  assert not (tmp_path / 'runs').exists() and os.listdir(tmp_path) == []
  (tmp_path / 'file').write_text('')
  with pytest.raises(NotADirectoryError, match='is a file'):
    train_checkpoints.check_workdir_writable(str(tmp_path / 'file'))
  with pytest.raises(NotADirectoryError, match='is a file'):
    train_checkpoints.check_workdir_writable(str(tmp_path / 'file' / 'run'))


def test_sigmoid_loss():
  logits = jnp.array([[2.0, -1.0]])
  labels = jnp.array([[1.0, 0.0]])
  expected = np.log1p(np.exp(-2.0)) + np.log1p(np.exp(-1.0))
  assert float(train.sigmoid_xent(logits, labels)[0]) == pytest.approx(
      expected, rel=1e-6)


def test_eval_step_counts_only_real_examples():
  mesh = parallel.make_mesh()
  state, _ = _step_fixture(mesh)
  model = train.build_model(tiny_config(), input_pipeline.DatasetInfo(
      'synthetic', 10, 1, {}, None, 1))
  eval_step = train.make_eval_step(model, mesh,
                                   parallel.replicated_sharding(mesh))
  batch = _synthetic_batch(16)
  batch['mask'] = np.array([1.0] * 11 + [0.0] * 5, np.float32)
  sums = jax.device_get(eval_step(state.params,
                                  parallel.global_batch(batch, mesh)))
  assert int(sums['count']) == 11
  # The zero-initialised head predicts class 0 everywhere.
  assert int(sums['correct']) == int(np.sum(
      batch['label'][:11].argmax(-1) == 0))


# ---------------------------------------------------------------------------
# The loop, on the real digits pipeline.


def _main(*args, timeout=300):
  """Runs `python -m vit_jax.main` from the repository (1 CPU device)."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', TF_ENABLE_ONEDNN_OPTS='0')
  return subprocess.run([sys.executable, '-m', 'vit_jax.main', *args],
                        cwd=_REPO, capture_output=True, text=True, env=env,
                        timeout=timeout, check=False)


def _tiny_flags(workdir, total_steps):
  """Command-line twin of `tiny_config`, checkpointing every step."""
  return ['--config=configs/digits_pretrain.py', f'--workdir={workdir}',
          '--config.model.hidden_size=16', '--config.model.num_layers=1',
          '--config.model.num_heads=2', '--config.model.mlp_dim=32',
          '--config.model.dropout_rate=0.1', '--config.batch_size=16',
          '--config.eval_batch_size=120', f'--config.total_steps={total_steps}',
          '--config.warmup_steps=1', '--config.log_every=1',
          '--config.eval_every=0', '--config.checkpoint_every=1',
          '--config.keep_checkpoints=2']


@pytest.fixture(scope='module')
def pretrained_workdir(tmp_path_factory):
  """A finished 4-step run of `python -m vit_jax.main`, shared by tests."""
  workdir = str(tmp_path_factory.mktemp('pretrained'))
  result = _main(*_tiny_flags(workdir, total_steps=4))
  assert result.returncode == 0, result.stderr
  return workdir, result.stdout


@pytest.mark.slow
def test_main_trains_evaluates_and_checkpoints(pretrained_workdir):
  workdir, stdout = pretrained_workdir
  assert 'step 4/4 (100%) | loss' in stdout and 'done: step 4' in stdout
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  assert results['final_eval']['test/examples'] == 360  # Each example once.
  assert 0 <= results['final_eval']['test/accuracy'] <= 1
  assert results['final_step'] == 4 and results['train_img_per_sec'] > 0
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model']['hidden_size'] == 16
  assert os.listdir(os.path.join(workdir, metrics.TENSORBOARD_DIR))
  assert sorted(_train_losses(workdir)) == [1, 2, 3, 4]
  assert os.path.isfile(os.path.join(workdir, input_pipeline.CLASS_NAMES_FILE))
  checkpointer = train_checkpoints.Checkpointer(workdir, keep=2)
  assert checkpointer.all_steps() == [3, 4]  # keep_checkpoints=2.
  checkpointer.close()
  params, step = train_checkpoints.restore_params(workdir)
  assert step == 4
  assert isinstance(params['head']['kernel'], np.ndarray)
  assert params['head']['kernel'].shape == (16, 10)


@pytest.mark.slow
def test_main_resumes_when_rerun(pretrained_workdir, tmp_path):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(pretrained_workdir[0], workdir)
  result = _main(*_tiny_flags(workdir, total_steps=5))
  assert result.returncode == 0, result.stderr
  assert 'resuming from step 4' in result.stdout
  assert 'step 5/5' in result.stdout and 'step 4/' not in result.stdout
  assert train_checkpoints.restore_params(workdir)[1] == 5


class _Interrupted(Exception):
  pass


def _iterator_stopping_after(num_batches, monkeypatch):
  """Makes the train iterator raise after `num_batches` (a crash)."""
  real = input_pipeline.make_train_iterator

  def stopping(*args, **kwargs):
    batches = real(*args, **kwargs)
    for _ in range(num_batches):
      yield next(batches)
    raise _Interrupted()

  monkeypatch.setattr(input_pipeline, 'make_train_iterator', stopping)


@pytest.mark.slow
def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
  config = tiny_config(total_steps=6, checkpoint_every=3)
  straight = str(tmp_path / 'straight')
  train.train_and_evaluate(config, straight)

  resumed = str(tmp_path / 'resumed')
  with monkeypatch.context() as patch:
    _iterator_stopping_after(4, patch)  # Step 3 is saved, step 4 crashes.
    with pytest.raises(_Interrupted):
      train.train_and_evaluate(config, resumed)
  assert train_checkpoints.restore_params(resumed)[1] == 3
  train.train_and_evaluate(config, resumed)

  straight_params, straight_step = train_checkpoints.restore_params(straight)
  resumed_params, resumed_step = train_checkpoints.restore_params(resumed)
  assert straight_step == resumed_step == 6
  _assert_trees_close(resumed_params, straight_params, rtol=1e-6, atol=1e-7)
  straight_losses, resumed_losses = (_train_losses(straight),
                                     _train_losses(resumed))
  np.testing.assert_allclose([resumed_losses[s] for s in range(1, 7)],
                             [straight_losses[s] for s in range(1, 7)],
                             rtol=1e-6)


def _loop_fixture(config, mesh):
  """The real set-up of a run (model, optimizer, jitted step) on `mesh`."""
  info = input_pipeline.get_dataset_info(config)
  durations = optim.resolve_durations(config, info.num_train_examples)
  model = train.build_model(config, info)
  schedule = optim.schedule_from_config(config, durations)
  tx = optim.make_optimizer(config, schedule)
  shape = train.input_shape(config, info)
  _, shardings = train.abstract_state(model, tx, shape, mesh)
  state = train.create_train_state(model, tx, shape, mesh, shardings,
                                   config.seed)
  return state, train.make_train_step(model, tx, schedule, mesh, shardings,
                                      loss=config.loss)


@pytest.mark.slow
def test_eight_devices_match_one_device():
  # Real digits batches, dropout on: the masks must not depend on sharding.
  config = tiny_config(total_steps=5)
  batches = input_pipeline.make_train_iterator(config, global_batch_size=16)
  batches = [next(batches) for _ in range(config.total_steps)]
  losses = {}
  for num_devices in (1, 8):
    mesh = parallel.make_mesh(jax.devices()[:num_devices])
    state, step = _loop_fixture(config, mesh)
    losses[num_devices] = []
    for batch in batches:
      state, step_metrics = step(state, parallel.global_batch(batch, mesh))
      losses[num_devices].append(float(step_metrics['loss']))
  assert len(set(losses[1])) == 5  # The loss moves: training happens.
  np.testing.assert_allclose(losses[8], losses[1], rtol=1e-5)


def _iterator_poisoned_from(first_bad_batch, monkeypatch):
  """Makes every train image NaN from batch `first_bad_batch` (0-based) on."""
  real = input_pipeline.make_train_iterator

  def poisoned(*args, **kwargs):
    for index, batch in enumerate(real(*args, **kwargs)):
      if index >= first_bad_batch:
        batch = dict(batch, image=np.full_like(batch['image'], np.nan))
      yield batch

  monkeypatch.setattr(input_pipeline, 'make_train_iterator', poisoned)


@pytest.mark.slow
@pytest.mark.parametrize('log_every', [1, 10])
def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(
    tmp_path, monkeypatch, log_every):
  # With log_every=1 the loss check stops step 3; with 10 the parameter
  # check before the step-4 save does. Either way step 2 stays the latest.
  config = tiny_config(total_steps=5, checkpoint_every=2, log_every=log_every)
  _iterator_poisoned_from(2, monkeypatch)
  with pytest.raises(train.NonFiniteLossError,
                     match=r'diverged at step [34].*last good checkpoint '
                     r'\(step 2\)'):
    train.train_and_evaluate(config, str(tmp_path))
  params, step = train_checkpoints.restore_params(str(tmp_path))
  assert step == 2
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


@pytest.mark.slow
def test_finetune_from_workdir_resamples_posemb(pretrained_workdir, tmp_path):
  workdir, _ = pretrained_workdir
  pretrained, _ = train_checkpoints.restore_params(workdir)
  # lr 0: the saved params are exactly what the checkpoint surgery produced.
  config = tiny_config(image_size=16, total_steps=1, init_from=workdir,
                       optimizer='sgd', lr=0.0, warmup_steps=0)
  train.train_and_evaluate(config, str(tmp_path))
  finetuned, _ = train_checkpoints.restore_params(str(tmp_path))
  posemb = finetuned['Transformer']['posembed_input']['pos_embedding']
  assert posemb.shape == (1, 1 + 8 * 8, 16)  # 4x4 grid -> 8x8 grid.
  np.testing.assert_array_equal(finetuned['head']['kernel'], 0.0)
  block = 'encoderblock_0'
  np.testing.assert_array_equal(
      finetuned['Transformer'][block]['MlpBlock_3']['Dense_0']['kernel'],
      pretrained['Transformer'][block]['MlpBlock_3']['Dense_0']['kernel'])


@pytest.mark.slow
def test_resume_with_a_different_model_is_refused(pretrained_workdir):
  workdir, _ = pretrained_workdir
  config_path = os.path.join(workdir, 'config.json')
  with open(config_path, 'rb') as f:
    before = f.read()
  config = tiny_config()
  config.model.hidden_size = 32
  with pytest.raises(train_checkpoints.IncompatibleWorkdirError,
                     match=r'different model \(model.hidden_size: 16 in the '
                     r'workdir, 32 now\)'):
    train.train_and_evaluate(config, workdir)
  with open(config_path, 'rb') as f:
    assert f.read() == before
  assert train_checkpoints.restore_params(workdir)[1] == 4


# ---------------------------------------------------------------------------
# The command line.


@pytest.mark.slow
@pytest.mark.parametrize('override,message', [
    ('--config.lrr=0.1',
     "--config.lrr=0.1: the config has no key 'lrr' (Did you mean \"lr\""),
    ('--config.model.hiden_size=8', "the config has no key 'hiden_size'"),
])
def test_misspelled_override_fails_with_a_clear_message(tmp_path, override,
                                                        message):
  result = _main('--config=configs/digits_pretrain.py',
                 f'--workdir={tmp_path}', override)
  assert result.returncode != 0
  assert message in result.stderr
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(os.path.join(tmp_path, 'config.json'))
