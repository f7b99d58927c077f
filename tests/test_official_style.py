"""The official-style baseline step (benchmarks/official_style.py) is the
same model and the same update as vit_jax's, built from stock Flax."""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import common
from benchmarks import official_style
from vit_jax import models
# pylint: enable=g-import-not-at-top,wrong-import-position

SPEC = 'custom:hidden=32,layers=2,heads=2,mlp=64,patch=4,image=16,classes=5'


def _spec():
  return common.model_spec(SPEC, dtype='float32')


def _init(model, images, seed=0):
  # Jitted: eager initialization dispatches op by op, seconds per model.
  return jax.jit(model.init)(jax.random.key(seed), images)['params']


def _shapes(tree):
  return jax.tree.map(lambda x: x.shape, tree)


def test_it_takes_our_parameters_and_gives_our_logits():
  spec = _spec()
  ours = models.build_model(spec.model_config, spec.num_classes)
  images = jnp.asarray(common.random_batch(spec, 8)['image'])
  params = _init(ours, images, seed=1)
  # A head that is not all zeros, so the logits say something.
  params['head']['kernel'] = jax.random.normal(
      jax.random.key(2), params['head']['kernel'].shape)
  baseline = official_style.build_model(spec)
  own = _init(baseline, images)
  assert _shapes(own) == _shapes(params)
  np.testing.assert_allclose(
      jax.jit(baseline.apply)({'params': params}, images),
      jax.jit(ours.apply, static_argnames='train')(
          {'params': params}, images, train=False),
      rtol=1e-4, atol=1e-5)


def test_it_refuses_models_it_does_not_build():
  spec = common.model_spec('Ti/16')
  spec.model_config.classifier = 'gap'
  with pytest.raises(ValueError, match="classifier 'gap'"):
    official_style.build_model(spec)


def _loss_fn(model):
  def loss_fn(params, images, labels):
    return official_style.cross_entropy(
        model.apply({'params': params}, images), labels)
  return loss_fn


def test_micro_batches_give_the_full_batch_loss_and_gradient():
  spec = _spec()
  model = official_style.build_model(spec)
  batch = common.random_batch(spec, 8)
  params = _init(model, batch['image'])
  loss_fn = _loss_fn(model)
  full = jax.jit(jax.value_and_grad(loss_fn))(
      params, batch['image'], batch['label'])
  accumulated = jax.jit(
      lambda *args: official_style.accumulated_value_and_grad(
          loss_fn, *args, accum=4))(params, batch['image'], batch['label'])
  for got, want in zip(jax.tree.leaves(accumulated), jax.tree.leaves(full)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_the_pmapped_update_over_8_devices_is_one_full_batch_update():
  spec = _spec()
  model, tx = official_style.build_model(spec), official_style.make_optimizer()
  batch = common.random_batch(spec, 16)
  params = _init(model, batch['image'])
  opt_state = tx.init(params)

  @jax.jit
  def full_batch_update(params, opt_state, images, labels):
    loss, grads = jax.value_and_grad(_loss_fn(model))(params, images, labels)
    updates, _ = tx.update(grads, opt_state, params)
    return loss, optax.apply_updates(params, updates)

  loss, expected = full_batch_update(params, opt_state, batch['image'],
                                     batch['label'])

  devices = jax.local_devices()
  assert len(devices) == 8
  new_params, _, new_loss = official_style.make_update(model, tx, accum=2)(
      *official_style.replicate((params, opt_state), devices),
      *official_style.split((batch['image'], batch['label']), devices))
  np.testing.assert_allclose(new_loss, np.full(8, loss), rtol=1e-5)
  for got, want in zip(jax.tree.leaves(new_params),
                       jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, np.broadcast_to(want, got.shape),
                               rtol=1e-4, atol=1e-6)


def test_a_child_that_fails_is_reported():
  with pytest.raises(RuntimeError, match='child process exited'):
    official_style.RemoteStep('no-such-model', None, batch_size=8, accum=1)
