"""The ResNet stem of the R+ViT hybrids (BiT-style: weight-standardised convs,
GroupNorm), named as in the released hybrid checkpoints.

The released files keep the stem's parameters at the top level of the tree
(`conv_root`, `gn_root`, `block1/unit1/conv1`, ...) next to `embedding` and
`Transformer`, so the stem is built with the parent's name scope.
"""

import dataclasses
import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
  """Shape of a hybrid's stem.

  Attributes:
    num_layers: bottleneck units per stage; () is the root block alone
      (R+ViT-Ti_16), (3, 4, 9) gives R50+ViT-B_16's /16 downsampling.
    width_factor: multiplies the root width of 64 channels.
  """
  num_layers: tuple[int, ...] = ()
  width_factor: int = 1


def weight_standardize(kernel: jax.Array, axis: Sequence[int],
                       eps: float = 1e-5) -> jax.Array:
  """Zero mean, unit standard deviation over `axis` (BiT's StdConv)."""
  kernel = kernel - jnp.mean(kernel, axis=axis, keepdims=True)
  return kernel / (jnp.std(kernel, axis=axis, keepdims=True) + eps)


class StdConv(nn.Conv):
  """A convolution whose kernel is weight-standardised on every use."""

  def param(self, name, init_fn, *init_args, **init_kwargs):
    param = super().param(name, init_fn, *init_args, **init_kwargs)
    if name == 'kernel':
      param = weight_standardize(param, axis=(0, 1, 2))
    return param


class ResidualUnit(nn.Module):
  """A bottleneck unit: 1x1 -> 3x3 (strided) -> 1x1, GroupNorm after each."""
  features: int
  strides: tuple[int, int] = (1, 1)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(StdConv, use_bias=False, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    norm = functools.partial(nn.GroupNorm, param_dtype=self.param_dtype)
    residual = x
    if x.shape[-1] != self.features * 4 or self.strides != (1, 1):
      residual = conv(self.features * 4, (1, 1), self.strides,
                      name='conv_proj')(residual)
      residual = norm(name='gn_proj')(residual)

    y = nn.relu(norm(name='gn1')(conv(self.features, (1, 1), name='conv1')(x)))
    y = conv(self.features, (3, 3), self.strides, name='conv2')(y)
    y = nn.relu(norm(name='gn2')(y))
    y = conv(self.features * 4, (1, 1), name='conv3')(y)
    # A zero scale makes every unit start as the identity.
    y = norm(scale_init=nn.initializers.zeros, name='gn3')(y)
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  """`num_units` bottleneck units; the first one may downsample."""
  num_units: int
  features: int
  first_stride: tuple[int, int]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_units):
      x = ResidualUnit(self.features,
                       strides=self.first_stride if i == 0 else (1, 1),
                       dtype=self.dtype, param_dtype=self.param_dtype,
                       name=f'unit{i + 1}')(x)
    return x


class ResNetStem:
  """Root block (7x7/2 conv, GroupNorm, ReLU, 3x3/2 max-pool) plus stages.

  Not a Module of its own: the official checkpoints put `conv_root`,
  `gn_root` and `block{i}` directly under the model, so the stem creates its
  submodules in the caller's scope (call it from inside a compact method).
  """

  def __init__(self, spec: ResNetSpec, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32):
    self.spec = spec
    self.dtype = dtype
    self.param_dtype = param_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    width = int(64 * self.spec.width_factor)
    x = StdConv(width, (7, 7), (2, 2), use_bias=False, dtype=self.dtype,
                param_dtype=self.param_dtype, name='conv_root')(x)
    x = nn.relu(nn.GroupNorm(param_dtype=self.param_dtype, name='gn_root')(x))
    x = nn.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding='SAME')
    for i, num_units in enumerate(self.spec.num_layers):
      x = ResNetStage(num_units, width * 2**i,
                      first_stride=(1, 1) if i == 0 else (2, 2),
                      dtype=self.dtype, param_dtype=self.param_dtype,
                      name=f'block{i + 1}')(x)
    return x
