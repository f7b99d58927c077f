"""Hand-written gradients (vit_jax/models/ops.py) against autodiff.

Each op's gradient is compared with JAX's autodiff of the plain formula in
float32 (tight tolerance) and, for bfloat16 operands, with the
float32 gradient (bf16 tolerance). The whole model's gradients are compared
with PyTorch's in tests/test_peers.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.models import ops


def normal(seed, shape, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def grads_of(fn, args, cotangent):
  """Gradients of sum(fn(*args) * cotangent) with respect to every arg."""
  def loss(*a):
    return jnp.sum(fn(*a).astype(jnp.float32) * cotangent)
  return jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))(*args)


def assert_close(actual, expected, rtol):
  for a, e in zip(actual, expected):
    assert a.shape == e.shape and a.dtype == e.dtype
    scale = float(jnp.abs(e.astype(jnp.float32)).max())
    error = float(jnp.abs(a.astype(jnp.float32) -
                          e.astype(jnp.float32)).max())
    assert error <= rtol * scale, (error, scale)


def plain_dense(x, kernel, bias):
  return x @ kernel + bias


@pytest.mark.parametrize('leading', [(6,), (4, 5), (2, 3, 4)])
def test_dense_matches_autodiff_for_any_leading_axes(leading):
  x, kernel = normal(0, leading + (8,)), normal(1, (8, 12))
  bias, cotangent = normal(2, (12,)), normal(3, leading + (12,))
  np.testing.assert_allclose(ops.dense(x, kernel, bias),
                             plain_dense(x, kernel, bias), rtol=1e-6)
  assert_close(grads_of(ops.dense, (x, kernel, bias), cotangent),
               grads_of(plain_dense, (x, kernel, bias), cotangent), 1e-6)


def test_dense_of_bfloat16_inputs_accumulates_in_float32():
  x, kernel = normal(0, (4, 16, 32)), normal(1, (32, 24))
  bias, cotangent = normal(2, (24,)), normal(3, (4, 16, 24))
  exact = grads_of(plain_dense, (x, kernel, bias), cotangent)
  low = (x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), bias)
  assert ops.dense(*low).dtype == jnp.float32
  grads = grads_of(ops.dense, low, cotangent)
  assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16,
                                      jnp.float32]
  assert_close([g.astype(jnp.float32) for g in grads], exact, 2e-2)


def test_dense_casts_float32_inputs_and_returns_float32_gradients():
  x, kernel = normal(0, (4, 16, 32)), normal(1, (32, 24))
  bias, cotangent = normal(2, (24,)), normal(3, (4, 16, 24))
  exact = grads_of(plain_dense, (x, kernel, bias), cotangent)
  in_bf16 = lambda *a: ops.dense(*a, dtype=jnp.bfloat16)  # noqa: E731
  low = (x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16), bias)
  np.testing.assert_array_equal(in_bf16(x, kernel, bias), ops.dense(*low))
  grads = grads_of(in_bf16, (x, kernel, bias), cotangent)
  assert [g.dtype for g in grads] == [jnp.float32] * 3
  assert_close(grads, exact, 2e-2)
  # The x and kernel gradients are the bf16-input ones before rounding.
  rounded = grads_of(ops.dense, low, cotangent)
  for ours, bf16 in zip(grads[:2], rounded[:2]):
    np.testing.assert_array_equal(ours.astype(jnp.bfloat16), bf16)


def plain_layer_norm(x, scale, bias, epsilon=1e-6):
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) / jnp.sqrt(var + epsilon) * scale + bias


@pytest.mark.parametrize('leading', [(7,), (3, 5)])
def test_layer_norm_matches_autodiff(leading):
  x = 2 + 3 * normal(0, leading + (16,))
  scale, bias = 1 + normal(1, (16,)) * 0.2, normal(2, (16,))
  cotangent = normal(3, leading + (16,))
  ours = lambda x, s, b: ops.layer_norm(x, s, b, 1e-6)  # noqa: E731
  np.testing.assert_allclose(ours(x, scale, bias),
                             plain_layer_norm(x, scale, bias), atol=1e-5)
  assert_close(grads_of(ours, (x, scale, bias), cotangent),
               grads_of(plain_layer_norm, (x, scale, bias), cotangent), 1e-5)


@pytest.mark.parametrize('spec,lhs_shape,rhs_shape', [
    ('bqhd,bkhd->bhqk', (2, 5, 3, 4), (2, 6, 3, 4)),
    ('bhqk,bkhd->bqhd', (2, 3, 5, 6), (2, 6, 3, 4)),
])
def test_mixed_einsum_matches_autodiff(spec, lhs_shape, rhs_shape):
  lhs, rhs = normal(0, lhs_shape), normal(1, rhs_shape)
  out_shape = jnp.einsum(spec, lhs, rhs).shape
  cotangent = normal(2, out_shape)
  ours = lambda a, b: ops.mixed_einsum(spec, a, b)  # noqa: E731
  plain = lambda a, b: jnp.einsum(spec, a, b)  # noqa: E731
  assert_close(grads_of(ours, (lhs, rhs), cotangent),
               grads_of(plain, (lhs, rhs), cotangent), 1e-6)
  low = (lhs.astype(jnp.bfloat16), rhs.astype(jnp.bfloat16))
  low_grads = grads_of(ours, low, cotangent)
  assert [g.dtype for g in low_grads] == [jnp.bfloat16] * 2
  assert_close([g.astype(jnp.float32) for g in low_grads],
               grads_of(plain, (lhs, rhs), cotangent), 2e-2)
  # float32 operands cast inside: the same products, gradients unrounded.
  def in_bf16(a, b):
    return ops.mixed_einsum(spec, a, b, jnp.bfloat16)
  np.testing.assert_array_equal(in_bf16(lhs, rhs), ours(*low))
  cast_grads = grads_of(in_bf16, (lhs, rhs), cotangent)
  assert [g.dtype for g in cast_grads] == [jnp.float32] * 2
  for unrounded, rounded in zip(cast_grads, low_grads):
    np.testing.assert_array_equal(unrounded.astype(jnp.bfloat16), rounded)


def test_sum_rows_sums_every_leading_axis():
  x = normal(0, (2, 3, 4))
  np.testing.assert_allclose(ops.sum_rows(x), x.sum(axis=(0, 1)), rtol=1e-6)
  assert ops.rows(x).shape == (6, 4)
