"""Array functions of the ViT with hand-written gradients.

Why by hand: on XLA:CPU, autodiff of these formulas spends more time moving
data than multiplying it. Here (a) each weight gradient is one x^T @ dy
product over x's own leading axes, which XLA runs without first copying a
transposed gradient (and, for bf16, hands to YNNPACK); (b) sums over the
batch and token axes run on a 2-D (rows, features) view, which XLA reduces
several times faster than over two leading axes of a 3-D array; (c) bf16
products stay bf16 x bf16 -> f32 in the backward pass, and float32 inputs
are cast inside, so their gradients leave unrounded. Together with the
2-D GELU in `MlpBlock`, the float32 reference train step runs ~1.1-1.2x
faster than with autodiff of nn.Dense (docs/performance.md).

Tested against autodiff of the plain formulas (tests/test_ops.py) and, in
the whole model, against PyTorch's gradients (tests/test_peers.py).
"""

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any


def _dtype_carriers(*arrays: Array) -> tuple[Array, ...]:
  """A 0-d array per argument, of its dtype: custom_vjp residuals must be
  arrays, and the backward pass casts each gradient to its input's dtype."""
  return tuple(jnp.zeros((), a.dtype) for a in arrays)


def _accumulate_in_f32(spec: str, lhs: Array, rhs: Array) -> Array:
  return jnp.einsum(spec, lhs, rhs, preferred_element_type=jnp.float32)


def mixed_einsum(spec: str, lhs: Array, rhs: Array,
                 dtype: Optional[Dtype] = None) -> Array:
  """einsum of `lhs` and `rhs` cast to `dtype` (default: lhs's), in float32.

  `spec` is 'lhs,rhs->out' where every index of an operand also appears in
  the other operand or the output (no index is summed within one operand).
  Autodiff of a bf16 x bf16 -> f32 product would give float32 cotangents,
  so both backward products would run in float32 at half the speed; here
  the cotangent is rounded to the compute dtype first, so all three
  products are bf16 x bf16 -> f32 (what mixed-precision training does
  elsewhere: PyTorch autocast also computes gradients in bf16). As in
  `dense`, the gradients come back in the dtypes the operands came in.
  """
  return _mixed_einsum(spec, jnp.dtype(dtype or lhs.dtype), lhs, rhs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _mixed_einsum(spec, dtype, lhs, rhs):
  return _accumulate_in_f32(spec, lhs.astype(dtype), rhs.astype(dtype))


def _mixed_einsum_fwd(spec, dtype, lhs, rhs):
  return (_mixed_einsum(spec, dtype, lhs, rhs),
          (lhs.astype(dtype), rhs.astype(dtype), _dtype_carriers(lhs, rhs)))


def _operand_order_score(spec: str, other: str, out: str) -> int:
  """How canonical `spec` is as the left operand of a matmul.

  +1 if its batch indices (shared with `other` and `out`) lead, +1 if its
  contracted indices (shared with `other` only) come last.
  """
  batch = [c for c in spec if c in other and c in out]
  contracted = [c for c in spec if c in other and c not in out]
  return ((spec[:len(batch)] == ''.join(batch)) +
          (spec[len(spec) - len(contracted):] == ''.join(contracted)))


def _canonical_einsum(spec_a: str, spec_b: str, out: str, a: Array,
                      b: Array) -> Array:
  """bf16 x bf16 -> f32 einsum with the more matmul-like operand first.

  XLA:CPU runs bf16 x bf16 -> f32 products only through its YNNPACK
  fusions; with the operands in the other order, XLA folds some batched
  products (e.g. d(key) of the attention logits) into a layout YNNPACK
  rejects and the fallback has no bf16 kernel.
  """
  if _operand_order_score(spec_b, spec_a, out) > _operand_order_score(
      spec_a, spec_b, out):
    spec_a, spec_b, a, b = spec_b, spec_a, b, a
  return _accumulate_in_f32(f'{spec_a},{spec_b}->{out}', a, b)


def _mixed_einsum_bwd(spec, dtype, residuals, grad):
  lhs, rhs, (lhs_like, rhs_like) = residuals
  inputs, out = spec.split('->')
  lhs_spec, rhs_spec = inputs.split(',')
  grad = grad.astype(dtype)
  grad_lhs = _canonical_einsum(out, rhs_spec, lhs_spec, grad, rhs)
  grad_rhs = _canonical_einsum(lhs_spec, out, rhs_spec, lhs, grad)
  return grad_lhs.astype(lhs_like.dtype), grad_rhs.astype(rhs_like.dtype)


_mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: Array, scale: Array, bias: Array, epsilon: float) -> Array:
  """(x - mean) / sqrt(var + epsilon) * scale + bias over the last axis, in f32.

  Same numerics as `nn.LayerNorm` (float32 statistics, var = E[x^2] - E[x]^2
  clamped at 0), with a hand-written gradient: autodiff of that formula
  costs about twice the passes over the activations (it was ~15% of the
  reference train step's time on CPU), and keeps a full-size
  rsqrt(var) * scale product alive for the backward pass.
  """
  return _layer_norm_fwd(x, scale, bias, epsilon)[0]


def _layer_norm_fwd(x, scale, bias, epsilon):
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  mean_of_squares = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
  var = jnp.maximum(mean_of_squares - jnp.square(mean), 0.0)
  rstd = jax.lax.rsqrt(var + epsilon)
  normed = (x32 - mean) * rstd
  y = normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)
  return y, (normed, rstd, scale, bias, _dtype_carriers(x))


def _layer_norm_bwd(epsilon, residuals, grad):
  del epsilon
  normed, rstd, scale, bias, (x_like,) = residuals
  grad = grad.astype(jnp.float32)
  grad_bias = sum_rows(grad)
  grad_scale = sum_rows(grad * normed)
  grad_normed = grad * scale.astype(jnp.float32)
  grad_x = rstd * (
      grad_normed - jnp.mean(grad_normed, axis=-1, keepdims=True) -
      normed * jnp.mean(grad_normed * normed, axis=-1, keepdims=True))
  return (grad_x.astype(x_like.dtype), grad_scale.astype(scale.dtype),
          grad_bias.astype(bias.dtype))


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def rows(x: Array) -> Array:
  """x as a 2-D (rows, last axis) array: every leading axis is a row."""
  return jnp.reshape(x, (-1, x.shape[-1]))


def sum_rows(x: Array) -> Array:
  """x summed over every axis but the last, on the 2-D view (see top).

  The barrier keeps the view: without it XLA folds the reshape back into
  a reduction over two axes of the 3-D array, which it pads (65 tokens to
  96) and runs ~6x slower: 26 of a 420 ms bf16 reference step, 4 with it.
  """
  return jnp.sum(jax.lax.optimization_barrier(rows(x)), axis=0)


def dense(x: Array, kernel: Array, bias: Array,
          dtype: Optional[Dtype] = None) -> Array:
  """x @ kernel + bias over x's last axis, accumulated in float32.

  `x` and the 2-D `kernel` are cast to the compute `dtype` (default: x's;
  float32, or bfloat16 for mixed precision, where the products are
  bf16 x bf16 -> f32 forward and backward, as in `mixed_einsum`); `bias`
  is added in float32. Returns float32. Same values as `nn.Dense`; the
  gradient is what is hand-written. Gradients come back in the dtypes the
  arguments came in, straight from the float32 products: float32 inputs
  under bf16 compute get float32 gradients, not bf16 ones cast back up
  (one rounding and one pass over each gradient fewer: ~1.05x the bf16
  reference train step).
  """
  return _dense(jnp.dtype(dtype or x.dtype), x, kernel, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dense(dtype, x, kernel, bias):
  y = jnp.matmul(rows(x.astype(dtype)), kernel.astype(dtype),
                 preferred_element_type=jnp.float32)
  y = y + bias.astype(jnp.float32)
  return jnp.reshape(y, x.shape[:-1] + (kernel.shape[-1],))


def _dense_fwd(dtype, x, kernel, bias):
  return (_dense(dtype, x, kernel, bias),
          (x.astype(dtype), kernel.astype(dtype), bias,
           _dtype_carriers(x, kernel)))


def _dense_bwd(dtype, residuals, grad):
  x, kernel, bias, (x_like, kernel_like) = residuals
  # The products run in the compute dtype; the bias sum stays in float32.
  grad_low = grad.astype(dtype)
  grad_x = jnp.einsum('...k,dk->...d', grad_low, kernel,
                      preferred_element_type=jnp.float32)
  # Over x's own leading axes, not a 2-D view: for bf16 operands XLA then
  # hands the product to YNNPACK (2.2 vs 5.4 ms for a 4160x192 x.T @ dy).
  leading = tuple(range(x.ndim - 1))
  grad_kernel = jax.lax.dot_general(
      x, grad_low, ((leading, leading), ((), ())),
      preferred_element_type=jnp.float32)
  return (grad_x.astype(x_like.dtype), grad_kernel.astype(kernel_like.dtype),
          sum_rows(grad).astype(bias.dtype))


_dense.defvjp(_dense_fwd, _dense_bwd)
