"""The XLA options of the train and eval steps: which, and that XLA takes them."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import cpu_info
from vit_jax import xla_options


def test_float32_on_cpu_turns_ynnpack_fusions_off():
  assert xla_options.for_compute_dtype(jnp.float32, 'cpu') == (
      xla_options.NO_YNNPACK)


def test_bfloat16_on_cpu_keeps_ynnpack_for_dots_only():
  # bf16 x bf16 -> f32 dots exist on XLA:CPU only as YNNPACK fusions.
  assert xla_options.for_compute_dtype(jnp.bfloat16, 'cpu') == (
      xla_options.YNNPACK_DOTS_ONLY)


def test_other_backends_keep_xla_defaults():
  assert xla_options.for_compute_dtype(jnp.bfloat16, 'gpu') == {}
  assert xla_options.for_compute_dtype(jnp.float32, 'gpu') == {}
  assert xla_options.for_compute_dtype(jnp.float32, 'tpu') == {}


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_this_xla_accepts_the_options_and_computes_the_same(dtype):
  # An XLA that renamed the option would reject it here, not in a user's run.
  x = np.random.default_rng(0).standard_normal((64, 48), np.float32)
  w = np.random.default_rng(1).standard_normal((48, 32), np.float32)

  def layer(x, w):
    y = jnp.matmul(x.astype(dtype), w.astype(dtype),
                   preferred_element_type=jnp.float32)
    return jnp.sum(jnp.tanh(y) ** 2)

  options = xla_options.for_compute_dtype(dtype)
  with_options = jax.jit(jax.grad(layer, argnums=1),
                         compiler_options=options or None)(x, w)
  default = jax.jit(jax.grad(layer, argnums=1))(x, w)
  np.testing.assert_allclose(with_options, default, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('native', [True, False])
def test_bfloat16_on_a_cpu_without_bf16_warns_once(monkeypatch, caplog,
                                                    native):
  monkeypatch.setattr(cpu_info, 'has_native_bf16', lambda: native)
  xla_options._warn_emulated_bf16.cache_clear()  # pylint: disable=protected-access
  with caplog.at_level(logging.WARNING):
    for _ in range(3):
      xla_options.for_compute_dtype(jnp.bfloat16, 'cpu')
    xla_options.for_compute_dtype(jnp.float32, 'cpu')
    xla_options.for_compute_dtype(jnp.bfloat16, 'gpu')
  warned = [r for r in caplog.records if 'without bf16 instructions' in
            r.getMessage()]
  assert len(warned) == (0 if native else 1)
