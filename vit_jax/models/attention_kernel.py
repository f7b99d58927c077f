"""Self-attention on CPU through a small C++ kernel (`attention_kernel.cc`).

XLA:CPU runs the attention's batch * heads small products at 15-20% of its
large-matmul rate; the kernel does the logits, softmax and weighted sum of
one (example, head) at a time in cache, and the five backward products the
same way (docs/performance.md has the measurements).

The kernel is compiled on first use with the system's C++ compiler
(`$CXX`, default `c++`; GCC >= 12 or clang) for this CPU (`-march=native`)
and cached under `$VIT_JAX_KERNEL_CACHE` (default `~/.cache/vit_jax`),
keyed by the source, jaxlib's version and the CPU's flags. Without a
compiler, or with `VIT_JAX_CPU_ATTENTION=0`, the model uses XLA's attention
(same results up to float rounding, tests/test_attention_kernel.py).
"""

import ctypes
import functools
import os
import pathlib
import subprocess
import warnings

from typing import Any, Callable

import jax
from jax.experimental import custom_partitioning
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jaxlib

from vit_jax import cpu_info
from vit_jax import native_build

Array = jax.Array

ENV_SWITCH = 'VIT_JAX_CPU_ATTENTION'
CACHE_ENV = native_build.CACHE_ENV
SOURCE = pathlib.Path(__file__).with_name('attention_kernel.cc')
TARGETS = {
    'forward': 'VitJaxAttentionForward',
    'backward': 'VitJaxAttentionBackward',
    'backward_with_weights_grad': 'VitJaxAttentionBackwardWithWeightsGrad',
}
# The kernel pads rows to, and needs head_dim in, whole blocks of 16 floats:
# one AVX-512 register, two AVX2 ones (attention_kernel.cc's kAlign).
LANES = 16


def applies(qkv_shape: tuple[int, ...], dtype) -> bool:
  """Whether `self_attention` can run a (batch, tokens, 3, heads, head_dim)
  projection here: on CPU, float32, whole vectors, kernel built and wanted."""
  return (len(qkv_shape) == 5 and qkv_shape[2] == 3
          and qkv_shape[-1] % LANES == 0
          and jnp.dtype(dtype) == jnp.float32
          and os.environ.get(ENV_SWITCH, '1') != '0'
          and jax.default_backend() == 'cpu'
          and load() is not None)


def self_attention(qkv: Array) -> tuple[Array, Array]:
  """softmax(q k^T) v per head from the fused projection.

  Args:
    qkv: (batch, tokens, 3, heads, head_dim) float32, the query already
      scaled by 1/sqrt(head_dim).

  Returns:
    (batch, tokens, heads, head_dim) outputs and the (batch, heads, tokens,
    tokens) attention weights.
  """
  if load() is None:
    raise RuntimeError('the CPU attention kernel could not be built; check '
                       '`applies` first (the warning above says why)')
  return _self_attention(qkv)


# Products of q k^T's size per call: q k^T and p v forward; dv, dp, dq and
# dk backward (the weights' own gradient, when given, only adds to dp).
_PRODUCTS_PER_CALL = {'forward': 2, 'backward': 4,
                      'backward_with_weights_grad': 4}


def model_flops(kernel: str, qkv_shape: tuple[int, ...]) -> int:
  """The model's FLOPs in one call of `kernel` (a key of TARGETS).

  XLA's cost analysis counts nothing for a custom call, so a step's FLOP
  count adds these. Only the products count, 2 * tokens^2 * head_dim each
  per (example, head), as for XLA's attention; the softmax's few operations
  per weight (under 2% of the attention's FLOPs at head_dim 64) and the
  kernel's padding do not.
  """
  batch, tokens, _, heads, head_dim = qkv_shape
  return (_PRODUCTS_PER_CALL[kernel] * 2 * batch * heads * tokens**2 *
          head_dim)


def _padded(tokens: int) -> int:
  return -(-tokens // LANES) * LANES


def _batch_partitioned(call: Callable[..., Any], rule: str) -> Callable:
  """`call` split over the examples (axis 0 of every operand and result).

  Without this, XLA's partitioner knows nothing about a custom call and
  gathers the whole batch onto every device. Each example's attention is
  independent, so every device runs the kernel on its own examples.
  """
  partitioned = custom_partitioning.custom_partitioning(call)

  def batch_sharded(mesh, arg_shapes, result_shape):
    batch_axes = arg_shapes[0].sharding.spec[0] if (
        arg_shapes[0].sharding.spec) else None
    def by_examples(shape):
      rest = [None] * (len(shape.shape) - 1)
      return NamedSharding(mesh, P(batch_axes, *rest))
    return (tuple(by_examples(a) for a in arg_shapes),
            jax.tree.map(by_examples, result_shape))

  def infer(mesh, arg_shapes, result_shape):
    return batch_sharded(mesh, arg_shapes, result_shape)[1]

  def partition(mesh, arg_shapes, result_shape):
    arg_shardings, result_shardings = batch_sharded(mesh, arg_shapes,
                                                    result_shape)
    return mesh, call, result_shardings, arg_shardings

  partitioned.def_partition(partition=partition,
                            infer_sharding_from_operands=infer,
                            sharding_rule=rule)
  return partitioned


def _forward_kernel(qkv: Array) -> tuple[Array, Array]:
  batch, tokens, _, heads, head_dim = qkv.shape
  result_types = (
      jax.ShapeDtypeStruct((batch, tokens, heads, head_dim), jnp.float32),
      jax.ShapeDtypeStruct((batch, heads, tokens, _padded(tokens)),
                           jnp.float32))
  call = jax.ffi.ffi_call(TARGETS['forward'], result_types,
                          vmap_method='sequential')
  return tuple(call(qkv))


def _backward_kernel(target: str, qkv: Array, *args: Array) -> Array:
  call = jax.ffi.ffi_call(TARGETS[target],
                          jax.ShapeDtypeStruct(qkv.shape, jnp.float32),
                          vmap_method='sequential')
  return call(qkv, *args)


# Einsum-like rules for the partitioner: b (examples) is shared by all.
_forward_call = _batch_partitioned(
    _forward_kernel, 'b t s h d -> b t h d, b h t p')
_backward_call = _batch_partitioned(
    functools.partial(_backward_kernel, 'backward'),
    'b t s h d, b h t p, b t h d -> b t s h d')
_backward_with_weights_grad_call = _batch_partitioned(
    functools.partial(_backward_kernel, 'backward_with_weights_grad'),
    'b t s h d, b h t p, b t h d, b h t p -> b t s h d')


# The kernel keeps the weights with rows padded to whole vectors (zeros), so
# the backward pass reads them with vector loads; callers see them sliced,
# and the slice's transpose pads their gradient back.
@jax.custom_vjp
def _self_attention_padded(qkv):
  return _forward_call(qkv)


def _self_attention(qkv):
  out, padded_weights = _self_attention_padded(qkv)
  return out, padded_weights[..., :qkv.shape[1]]


def _self_attention_fwd(qkv):
  out, weights = _forward_call(qkv.value)
  return (out, weights), (qkv.value, weights)


def _self_attention_bwd(residuals, grads):
  qkv, weights = residuals
  out_grad, weights_grad = grads
  if isinstance(out_grad, jax.custom_derivatives.SymbolicZero):
    out_grad = jnp.zeros(out_grad.shape, out_grad.dtype)
  if isinstance(weights_grad, jax.custom_derivatives.SymbolicZero):
    return (_backward_call(qkv, weights, out_grad),)
  return (_backward_with_weights_grad_call(qkv, weights, out_grad,
                                           weights_grad),)


_self_attention_padded.defvjp(_self_attention_fwd, _self_attention_bwd,
                              symbolic_zeros=True)


@functools.cache
def load():
  """Builds (once per source and CPU) and registers the kernel.

  Returns the loaded library, or None (with a warning) when it cannot be
  built: the model then uses XLA's attention.
  """
  try:
    library = ctypes.cdll.LoadLibrary(str(_built_library()))
  except (OSError, subprocess.SubprocessError) as error:
    warnings.warn(f'vit_jax: CPU attention kernel unavailable, using XLA '
                  f'attention ({error})')
    return None
  for name in TARGETS.values():
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)),
                                platform='cpu')
  return library


def _compiler_command(output: pathlib.Path,
                      march: str = 'native') -> list[str]:
  return [os.environ.get('CXX', 'c++'), '-O3', f'-march={march}', '-std=c++17',
          '-shared', '-fPIC', '-fno-math-errno', '-I', jax.ffi.include_dir(),
          str(SOURCE), '-o', str(output)]


def _built_library() -> pathlib.Path:
  """The cached shared library, compiled first if it is not there yet."""
  return native_build.shared_library(SOURCE, _compiler_command,
                                     jaxlib.__version__,
                                     cpu_info.flags_line())
