"""The CPU attention kernel (vit_jax/models/attention_kernel.cc).

Outputs and weights are checked against softmax attention evaluated in
float64 NumPy, gradients against JAX's autodiff of the same formula in
float32, the whole model against its XLA attention, and the sharded kernel
against the unsharded one with no gathered batch.
"""

import os
import platform
import subprocess
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vit_jax.models import attention_kernel
from vit_jax.models import vit

# (batch, tokens, 3, heads, head_dim): 1 token, tokens below, at and past a
# block of 16, the reference model's 65 (5 blocks), 90 (6 blocks: AVX-512
# column blocks of 4 and 2), ViT-Ti/16's 197 (13 blocks: 4, 4 and 5), and
# ViT-H's head_dim of 80. Row counts leave every remainder of the 6-row
# tiles (1 to 5 rows; 20 tokens leave 2).
SHAPES = [(2, 1, 3, 2, 16), (2, 5, 3, 2, 16), (3, 16, 3, 3, 32),
          (2, 17, 3, 1, 16), (2, 20, 3, 2, 32), (2, 65, 3, 3, 64),
          (1, 90, 3, 1, 16), (1, 197, 3, 1, 64), (1, 33, 3, 2, 80)]


def random_qkv(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) / 2,
                     jnp.float32)


def numpy_attention(qkv):
  """softmax(q k^T) v per head in float64, from the fused projection."""
  q, k, v = (np.asarray(qkv, np.float64)[:, :, i] for i in range(3))
  logits = np.einsum('bqhd,bkhd->bhqk', q, k)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhd->bqhd', weights, v), weights


def xla_attention(qkv):
  q, k, v = (qkv[:, :, i] for i in range(3))
  weights = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k), axis=-1)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v), weights


@pytest.fixture(autouse=True)
def kernel_built():
  # A missing compiler must not pass silently: only an explicit opt-out
  # (VIT_JAX_CPU_ATTENTION=0, as the README says) skips these tests.
  if os.environ.get(attention_kernel.ENV_SWITCH) == '0':
    pytest.skip(f'{attention_kernel.ENV_SWITCH}=0: kernel not wanted')
  if attention_kernel.load() is None:
    pytest.fail('the CPU attention kernel did not build (see the warning); '
                f'set {attention_kernel.ENV_SWITCH}=0 to run without it')


@pytest.mark.parametrize('shape', SHAPES)
def test_outputs_and_weights_match_float64_softmax_attention(shape):
  qkv = random_qkv(shape)
  out, weights = jax.jit(attention_kernel.self_attention)(qkv)
  expected_out, expected_weights = numpy_attention(qkv)
  assert out.shape == expected_out.shape
  assert weights.shape == expected_weights.shape
  np.testing.assert_allclose(out, expected_out, rtol=1e-5, atol=2e-6)
  np.testing.assert_allclose(weights, expected_weights, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.sum(weights, -1), 1.0, rtol=1e-6)


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('use_weights', [False, True])
def test_gradients_match_autodiff(shape, use_weights):
  qkv = random_qkv(shape)
  out_cotangent = random_qkv(shape[:2] + shape[3:], seed=1)
  weights_cotangent = random_qkv((shape[0], shape[3], shape[1], shape[1]),
                                 seed=2)

  def loss(attention):
    def of(x):
      out, weights = attention(x)
      total = jnp.sum(out * out_cotangent)
      if use_weights:
        total += jnp.sum(weights * weights_cotangent)
      return total
    return jax.jit(jax.grad(of))(qkv)

  grad, expected = loss(attention_kernel.self_attention), loss(xla_attention)
  scale = float(jnp.abs(expected).max())
  np.testing.assert_allclose(grad, expected, atol=1e-5 * scale)


def test_large_logits_stay_finite():
  # Logits of +-400: exp overflows unless the row maximum comes off first.
  qkv = random_qkv((1, 20, 3, 1, 16)) * 40
  out, weights = jax.jit(attention_kernel.self_attention)(qkv)
  expected_out, expected_weights = numpy_attention(qkv)
  assert np.isfinite(out).all()
  np.testing.assert_allclose(weights, expected_weights, atol=1e-6)
  np.testing.assert_allclose(out, expected_out, rtol=1e-4, atol=1e-4)


def kernel_sized_model(**overrides):
  # head_dim 16: the kernel applies (the tiny test models use 8).
  config = dict(num_classes=10, patch_size=(4, 4), hidden_size=32,
                num_layers=2, num_heads=2, mlp_dim=64, head_bias_init=0.1)
  config.update(overrides)
  return vit.VisionTransformer(**config)


def model_loss_and_grads(model, images):
  params = jax.jit(model.init)(jax.random.key(0), images)['params']

  def loss(p):
    return jnp.sum(model.apply({'params': p}, images) ** 2)
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize('overrides', [{}, {'remat': True},
                                       {'dtype': jnp.bfloat16}])
def test_model_with_the_kernel_matches_xla_attention(monkeypatch, overrides):
  model = kernel_sized_model(**overrides)
  images = jax.random.uniform(jax.random.key(1), (3, 20, 12, 3), minval=-1)
  qkv_shape = (3, 16, 3, 2, 16)
  assert attention_kernel.applies(qkv_shape, jnp.float32)
  with_kernel = model_loss_and_grads(model, images)
  monkeypatch.setenv(attention_kernel.ENV_SWITCH, '0')
  assert not attention_kernel.applies(qkv_shape, jnp.float32)
  with_xla = model_loss_and_grads(model, images)
  # bf16 rounds the dense layers' operands, not the kernel's: the same
  # rounding on both sides, so bf16 agrees to bf16 tolerance only.
  rtol = 3e-2 if overrides.get('dtype') == jnp.bfloat16 else 1e-5
  np.testing.assert_allclose(with_kernel[0], with_xla[0], rtol=rtol)
  for got, want in zip(jax.tree.leaves(with_kernel[1]),
                       jax.tree.leaves(with_xla[1])):
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(got, want, atol=rtol * scale + 1e-7)


def test_attention_weights_from_the_kernel_are_returned_to_callers(
    monkeypatch):
  model = kernel_sized_model()
  images = jax.random.uniform(jax.random.key(1), (2, 8, 8, 3))
  params = jax.jit(model.init)(jax.random.key(0), images)['params']

  def weights():
    _, aux = model.apply({'params': params}, images, return_intermediates=True)
    return aux['attention_weights']
  from_kernel = weights()
  monkeypatch.setenv(attention_kernel.ENV_SWITCH, '0')
  from_xla = weights()
  assert len(from_kernel) == 2
  for got, want in zip(from_kernel, from_xla):
    assert got.shape == (2, 2, 5, 5)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_sharded_kernel_runs_on_each_devices_examples():
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  qkv = random_qkv((2 * jax.device_count(), 17, 3, 2, 16))
  sharded = jax.device_put(qkv, NamedSharding(mesh, P('data')))

  def loss(x):
    out, weights = attention_kernel.self_attention(x)
    return jnp.sum(out ** 2) + jnp.sum(weights[..., 0])
  step = jax.jit(jax.value_and_grad(loss))
  value, grad = step(sharded)
  expected_value, expected_grad = jax.jit(jax.value_and_grad(loss))(qkv)
  np.testing.assert_allclose(value, expected_value, rtol=1e-6)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-6, atol=1e-7)
  assert grad.sharding.is_equivalent_to(sharded.sharding, grad.ndim)
  compiled = step.lower(sharded).compile().as_text()
  assert 'all-gather' not in compiled and 'all-to-all' not in compiled


@pytest.mark.parametrize('shape, dtype', [
    ((2, 5, 3, 2, 8), jnp.float32),     # head_dim not whole vectors
    ((2, 5, 2, 2, 16), jnp.float32),    # not a Q/K/V triple
    ((2, 5, 3, 2, 16), jnp.bfloat16),   # the kernel reads float32
])
def test_kernel_declines_what_it_cannot_run(shape, dtype):
  assert not attention_kernel.applies(shape, dtype)


def test_without_a_compiler_the_model_uses_xla_attention(monkeypatch,
                                                         tmp_path):
  monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
  monkeypatch.setenv(attention_kernel.CACHE_ENV, str(tmp_path / 'cache'))
  with pytest.warns(UserWarning, match='using XLA attention'):
    # The uncached body of `load`: the cached one already holds the kernel.
    assert attention_kernel.load.__wrapped__() is None
  assert not list((tmp_path / 'cache').glob('*.so'))


def test_the_built_kernel_is_cached_per_source_and_cpu(monkeypatch, tmp_path):
  monkeypatch.setenv(attention_kernel.CACHE_ENV, str(tmp_path))
  build = attention_kernel._built_library  # pylint: disable=protected-access
  first = build()
  modified = first.stat().st_mtime_ns
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    again = build()
  assert again == first and again.stat().st_mtime_ns == modified
  assert [p.name for p in tmp_path.iterdir()] == [first.name]


@pytest.mark.skipif(platform.machine() != 'x86_64', reason='x86 ISA levels')
@pytest.mark.parametrize('march', ['x86-64-v3', 'x86-64-v4'])
def test_the_kernel_compiles_for_avx2_and_avx512(march, tmp_path):
  # The source has a register layout per vector width; the tests above run
  # the one this CPU has, and this builds the other one too (AVX2 is v3,
  # AVX-512 v4).
  command = attention_kernel._compiler_command(  # pylint: disable=protected-access
      tmp_path / 'kernel.so', march=march)
  result = subprocess.run(command, capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
