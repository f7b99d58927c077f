"""Schedules, weight-decay masks, optimizer state dtypes and durations."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import common
from vit_jax import models
from vit_jax import optim

BASE, END, WARMUP, TOTAL = 0.1, 0.001, 10, 100


def _config(**changes) -> ml_collections.ConfigDict:
  config = common.get_config()
  config.update(changes)
  return config


# Expected values worked out by hand from the official formula
#   lr = base * min(1, step / warmup) * decay(progress) (with a floor `end`),
#   progress = clip((step - warmup) / (total - warmup), 0, 1).
@pytest.mark.parametrize('decay,step,expected', [
    # Warmup: the whole value scales linearly, 5 / 10 of base at step 5.
    ('cosine', 5, 0.5 * BASE),
    ('linear', 5, 0.5 * BASE),
    ('cosine', WARMUP, BASE),
    # progress 0.2: cosine 0.5 * (1 + cos(0.2 pi)) = 0.9045085, linear 0.8.
    ('cosine', 28, END + (BASE - END) * 0.5 * (1 + math.cos(0.2 * math.pi))),
    ('linear', 28, END + (BASE - END) * 0.8),
    # progress 0.5.
    ('cosine', 55, END + (BASE - END) * 0.5),
    ('linear', 55, END + (BASE - END) * 0.5),
    # The end, and past it: the floor.
    ('cosine', TOTAL, END),
    ('linear', TOTAL, END),
    ('cosine', 2 * TOTAL, END),
    ('constant', 77, BASE),
])
def test_schedule_matches_official_formula(decay, step, expected):
  schedule = optim.make_schedule(base_lr=BASE, total_steps=TOTAL,
                                 warmup_steps=WARMUP, decay=decay, end_lr=END)
  assert float(schedule(step)) == pytest.approx(expected, rel=1e-6)


def test_schedule_without_warmup_starts_at_base():
  schedule = optim.make_schedule(base_lr=BASE, total_steps=TOTAL,
                                 decay='cosine')
  assert float(schedule(0)) == pytest.approx(BASE)
  assert float(schedule(TOTAL)) == pytest.approx(0.0, abs=1e-9)


def test_optimizer_update_k_uses_lr_of_step_k():
  config = _config(optimizer='sgd', momentum=0.0, grad_clip_norm=0.0,
                   weight_decay=0.0)
  schedule = optim.make_schedule(base_lr=BASE, total_steps=TOTAL,
                                 warmup_steps=WARMUP)
  tx = optim.make_optimizer(config, schedule)
  params = {'w': jnp.zeros(3)}
  state = tx.init(params)
  for step in (1, 2, 3):
    updates, state = tx.update({'w': jnp.ones(3)}, state, params)
    np.testing.assert_allclose(updates['w'], -BASE * step / WARMUP, rtol=1e-6)


def test_unknown_schedule_and_optimizer_are_errors():
  with pytest.raises(ValueError, match='unknown schedule'):
    optim.make_schedule(base_lr=1., total_steps=10, decay='exp')
  with pytest.raises(ValueError, match='unknown optimizer'):
    optim.make_optimizer(_config(optimizer='lamb'), lambda step: 1.)
  with pytest.raises(ValueError, match='adamw'):
    optim.make_optimizer(_config(optimizer='adam', weight_decay=0.1),
                         lambda step: 1.)


def _abstract_params(variant='Ti/16', **overrides):
  config = common.model_config(variant, **overrides)
  model = models.build_model(config, 10)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  return shapes['params']


def _flat(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize('classifier', ['token', 'map'])
def test_weight_decay_mask_covers_kernels_only(classifier):
  params = _abstract_params(classifier=classifier)
  mask = _flat(optim.weight_decay_mask(params))
  decayed = {name for name, on in mask.items() if on}
  assert decayed == {name for name in mask if name.endswith('/kernel')}
  for name in ('Transformer/posembed_input/pos_embedding',
               'Transformer/encoder_norm/scale',
               'Transformer/encoder_norm/bias',
               'Transformer/encoderblock_0/LayerNorm_0/scale',
               'Transformer/encoderblock_0/MlpBlock_3/Dense_0/bias',
               'embedding/bias', 'head/bias'):
    assert not mask[name], name
  assert mask['Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel']
  if classifier == 'token':
    assert not mask['cls']
  else:
    assert not mask['MAPHead_0/probe']


def test_weight_decay_mask_skips_hybrid_group_norms():
  mask = _flat(optim.weight_decay_mask(_abstract_params('R+ViT-Ti_16')))
  assert mask['conv_root/kernel']
  assert not mask['gn_root/scale'] and not mask['gn_root/bias']


def test_adamw_decays_kernels_but_not_biases_or_posemb():
  config = _config(optimizer='adamw', weight_decay=0.5, grad_clip_norm=0.0)
  tx = optim.make_optimizer(config, lambda step: 0.1)
  params = {'Dense_0': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)},
            'posembed_input': {'pos_embedding': jnp.ones((1, 3, 2))},
            'cls': jnp.ones((1, 1, 2))}
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  # Zero gradients: only the decay -lr * wd * param moves anything.
  np.testing.assert_allclose(updates['Dense_0']['kernel'], -0.05)
  for name, leaf in _flat(updates).items():
    if not name.endswith('kernel'):
      np.testing.assert_array_equal(leaf, 0.0, err_msg=name)


@pytest.mark.parametrize('optimizer,dtype', [('sgd', 'bfloat16'),
                                             ('sgd', 'float32'),
                                             ('adamw', 'bfloat16')])
def test_momentum_dtype_is_configurable_and_params_stay_float32(optimizer,
                                                                dtype):
  config = _config(optimizer=optimizer, momentum_dtype=dtype)
  tx = optim.make_optimizer(config, lambda step: 0.01)
  params = {'kernel': jnp.ones((4, 4), jnp.float32)}
  state = tx.init(params)
  momentum = [leaf for leaf in jax.tree.leaves(state)
              if getattr(leaf, 'shape', ()) == (4, 4)]
  assert momentum[0].dtype == jnp.dtype(dtype)
  if optimizer == 'adamw':  # The second moment keeps float32.
    assert momentum[1].dtype == jnp.float32
  updates, state = tx.update({'kernel': jnp.full((4, 4), 0.3)}, state, params)
  new_params = optax.apply_updates(params, updates)
  assert new_params['kernel'].dtype == jnp.float32


def test_global_norm_clipping():
  config = _config(optimizer='sgd', momentum=0.0, grad_clip_norm=1.0)
  tx = optim.make_optimizer(config, lambda step: 1.0)
  params = {'a': jnp.zeros(4), 'b': jnp.zeros(5)}
  grads = {'a': jnp.full(4, 10.), 'b': jnp.full(5, -10.)}
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(optax.global_norm(updates)) == pytest.approx(1.0, rel=1e-5)


def test_durations_in_steps_or_epochs():
  durations = optim.resolve_durations(
      _config(batch_size=100, total_steps=None, total_epochs=3.0,
              warmup_epochs=0.5), num_train_examples=1_000)
  assert durations == optim.Durations(total_steps=30, warmup_steps=5)
  durations = optim.resolve_durations(
      _config(total_steps=50, warmup_steps=7), num_train_examples=1)
  assert durations == optim.Durations(total_steps=50, warmup_steps=7)


@pytest.mark.parametrize('changes,message', [
    ({'total_steps': 10, 'total_epochs': 2.0}, 'either total_steps'),
    ({'warmup_steps': 1, 'warmup_epochs': 1.0}, 'either warmup_steps'),
    ({'total_steps': None}, 'set total_steps or total_epochs'),
    ({'total_steps': 0}, 'at least one step'),
    ({'total_steps': 10, 'warmup_steps': 11}, 'warmup'),
])
def test_bad_durations_are_clear_errors(changes, message):
  with pytest.raises(ValueError, match=message):
    optim.resolve_durations(_config(**changes), num_train_examples=1_000)
