"""The Vision Transformer (Dosovitskiy et al., ICLR 2021) as Flax linen modules.

Parameter names follow the released checkpoints exactly (for example
`Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel`), so loading an official
`.npz` is a flat-key join with '/' and nothing else. The defaults reproduce the
official numerics: LayerNorm epsilon 1e-6, tanh-approximate GELU, queries scaled
by 1/sqrt(head_dim), xavier-uniform kernels, position embeddings ~ N(0, 0.02).
"""

import dataclasses
import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.models import attention_kernel
from vit_jax.models import ops
from vit_jax.models import resnet as resnet_lib

Array = jax.Array
Dtype = Any

CLASSIFIERS = ('token', 'gap', 'map', 'unpooled', 'token_unpooled')
POSEMB_KINDS = ('learn', 'sincos2d')


def sincos2d_posemb(height: int, width: int, dim: int,
                    temperature: float = 10_000.) -> Array:
  """Fixed 2D sine-cosine position embeddings, shape (1, height*width, dim)."""
  if dim % 4:
    raise ValueError(f'sincos2d position embeddings need hidden_size % 4 == 0, '
                     f'got hidden_size={dim}')
  y, x = np.mgrid[:height, :width]
  omega = 1. / temperature**(np.arange(dim // 4) / (dim // 4 - 1 or 1))
  y = y.reshape(-1)[:, None] * omega[None, :]
  x = x.reshape(-1)[:, None] * omega[None, :]
  table = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(table[None], jnp.float32)


class AddPositionEmbs(nn.Module):
  """Adds learned position embeddings `pos_embedding` of shape (1, seq, dim)."""
  posemb_init: Callable[..., Array] = nn.initializers.normal(stddev=0.02)
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    shape = (1,) + x.shape[1:]
    if self.has_variable('params', 'pos_embedding'):
      stored = self.get_variable('params', 'pos_embedding').shape
      if stored != shape:
        raise ValueError(
            f'pos_embedding has shape {stored} but the input has {shape[1]} '
            f'tokens of width {shape[2]}: resample the position embeddings '
            'to the new patch grid (vit_jax.posemb.resample_posemb).')
    posemb = self.param('pos_embedding', self.posemb_init, shape,
                        self.param_dtype)
    return x + posemb



class LayerNorm(nn.Module):
  """`nn.LayerNorm`'s parameters (`scale`, `bias`) over `layer_norm`.

  Returns float32 for float32 inputs and parameters: the dense layers after
  it cast to their compute dtype themselves (`ops.dense`).
  """
  epsilon: float = 1e-6
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,),
                       self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (features,),
                      self.param_dtype)
    y = ops.layer_norm(x, scale, bias, self.epsilon)
    return y.astype(jnp.result_type(x, scale))


class Dense(nn.Module):
  """`nn.Dense`'s parameters (`kernel`, `bias`) over `ops.dense` (f32 out)."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable[..., Array] = nn.initializers.xavier_uniform()
  bias_init: Callable[..., Array] = nn.initializers.normal(stddev=1e-6)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param('kernel', self.kernel_init,
                        (x.shape[-1], self.features), self.param_dtype)
    bias = self.param('bias', self.bias_init, (self.features,),
                      self.param_dtype)
    return ops.dense(x, kernel, bias, self.dtype)


class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense -> dropout."""
  mlp_dim: int
  dropout_rate: float = 0.0
  gelu_approximate: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    dense = functools.partial(Dense, dtype=self.dtype,
                              param_dtype=self.param_dtype)
    hidden = dense(self.mlp_dim, name='Dense_0')(x)
    # The GELU on a 2-D (tokens, width) view: XLA:CPU fuses it and reduces
    # its gradient faster than on 3-D arrays (ops.py); 1.06x the reference
    # train step. The dense layers keep x's shape for their weight gradients.
    hidden = nn.gelu(ops.rows(hidden), approximate=self.gelu_approximate)
    hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=deterministic)
    hidden = jnp.reshape(hidden, x.shape[:-1] + (self.mlp_dim,))
    y = dense(x.shape[-1], name='Dense_1')(hidden)
    return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


def _flattened_init(init: Callable[..., Array],
                    in_dims: int) -> Callable[..., Array]:
  """`init` drawn on the 2-D (inputs, outputs) view, as DenseGeneral does.

  Keeps the fan-in/fan-out of xavier_uniform (and the values for a given
  seed) identical to `nn.DenseGeneral`'s kernels of the same shape.
  """
  def wrapped(rng, shape, dtype=jnp.float32):
    flat = (int(np.prod(shape[:in_dims])), int(np.prod(shape[in_dims:])))
    return jnp.reshape(init(rng, flat, dtype), shape)
  return wrapped


class _ProjectionParams(nn.Module):
  """The `kernel` and `bias` of a DenseGeneral, created but not applied.

  Lets the attention fuse its projections into one matmul while each keeps
  its released name, shape and initialisation.
  """
  kernel_shape: tuple[int, ...]
  bias_shape: tuple[int, ...]
  in_dims: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self) -> tuple[Array, Array]:
    kernel = self.param(
        'kernel', _flattened_init(nn.initializers.xavier_uniform(),
                                  self.in_dims),
        self.kernel_shape, self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, self.bias_shape,
                      self.param_dtype)
    return kernel, bias


class PatchEmbedding(nn.Module):
  """Non-overlapping patches, each projected to `features`.

  The same function, parameters (`kernel` (patch_h, patch_w, channels,
  features), `bias`) and initialisation as the released models' stride-
  `patch_size` `nn.Conv`, computed as the matmul it is: patches flattened
  in (row, column, channel) order times the kernel's 2-D view, through
  `ops.dense`. Why: XLA:CPU has no fast bf16 convolution; the kernel
  gradient of the bf16 conv ran at ~3 GFLOP/s, 22 ms of a ~370 ms bf16
  reference train step (docs/performance.md).
  """
  features: int
  patch_size: tuple[int, int]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: Array) -> Array:
    """(batch, height, width, channels) -> (batch, rows, cols, features)."""
    patch_h, patch_w = self.patch_size
    batch, height, width, channels = images.shape
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (patch_h, patch_w, channels, self.features),
                        self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (self.features,),
                      self.param_dtype)
    rows, cols = height // patch_h, width // patch_w
    patches = jnp.reshape(images, (batch, rows, patch_h, cols, patch_w,
                                   channels))
    patches = jnp.reshape(jnp.transpose(patches, (0, 1, 3, 2, 4, 5)),
                          (batch, rows, cols, -1))
    return ops.dense(patches, jnp.reshape(kernel, (-1, self.features)), bias,
                     self.dtype)


class MultiHeadDotProductAttention(nn.Module):
  """Multi-head attention with the official parameter layout.

  `query`, `key` and `value` kernels are (dim, heads, head_dim) and `out` is
  (heads, head_dim, dim), exactly as `flax.linen.MultiHeadDotProductAttention`
  stores them in the released checkpoints. Written out here so the logits and
  softmax stay in float32 under bfloat16 compute and so the attention weights
  can be returned for visualisation.

  For speed, the projections of self-attention run as one (dim, 3 * dim)
  matmul, and 1/sqrt(head_dim) is folded into the query kernel and bias (a
  dim x dim scaling rather than one over every query; exact when head_dim
  is a power of 4, e.g. 16 or 64). On CPU, self-attention without dropout
  on the weights then runs through `attention_kernel` (in float32 under
  either compute dtype); elsewhere through `_attend`.
  """
  num_heads: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Optional[Array] = None, *,
               deterministic: bool) -> tuple[Array, Array]:
    """Attends from `inputs_q` to `inputs_kv` (None: self-attention).

    Returns the output and the attention weights (batch, heads, queries,
    keys); under jit, unused weights cost nothing beyond the softmax.
    """
    dim = inputs_q.shape[-1]
    if dim % self.num_heads:
      raise ValueError(f'hidden size {dim} is not divisible by num_heads='
                       f'{self.num_heads}')
    heads, head_dim = self.num_heads, dim // self.num_heads
    params = {
        name: _ProjectionParams((dim, heads, head_dim), (heads, head_dim), 1,
                                self.param_dtype, name=name)()
        for name in ('query', 'key', 'value')}
    scale = 1.0 / np.sqrt(head_dim)
    query_kernel, query_bias = (p * scale for p in params['query'])
    if inputs_kv is None:
      fused = self._project(inputs_q, [(query_kernel, query_bias),
                                        params['key'], params['value']])
      dropout_active = self.dropout_rate > 0 and not deterministic
      if (not dropout_active
          and attention_kernel.applies(fused.shape, fused.dtype)):
        mixed, weights = attention_kernel.self_attention(fused)
      else:
        mixed, weights = self._attend(*self._split(fused), deterministic)
    else:
      query, = self._split(self._project(inputs_q,
                                         [(query_kernel, query_bias)]))
      key, value = self._split(
          self._project(inputs_kv, [params['key'], params['value']]))
      mixed, weights = self._attend(query, key, value, deterministic)

    out_kernel, out_bias = _ProjectionParams(
        (heads, head_dim, dim), (dim,), 2, self.param_dtype, name='out')()
    mixed = jnp.reshape(mixed, mixed.shape[:-2] + (dim,))
    out = ops.dense(mixed, jnp.reshape(out_kernel, (dim, dim)), out_bias,
                    self.dtype)
    return out, weights

  def _matmul(self, spec: str, x: Array, y: Array) -> Array:
    """einsum in the compute dtype, accumulated (and differentiated) in f32.

    Under bf16 compute the operands arrive in float32 and are cast inside
    `ops.mixed_einsum`, so their gradients leave in float32 (no bf16 round
    trip for the Q/K/V gradients; ~1.02x the bf16 reference step).
    """
    if jnp.dtype(self.dtype) == jnp.float32:
      return jnp.einsum(spec, x.astype(self.dtype), y.astype(self.dtype))
    return ops.mixed_einsum(spec, x, y, self.dtype)

  def _project(self, x: Array,
               kernels_and_biases: list[tuple[Array, Array]]) -> Array:
    """x @ [k_1 | k_2 | ...] + [b_1 | b_2 | ...] as one matmul: (..., parts,
    heads, head_dim), float32."""
    kernel = jnp.stack([k for k, _ in kernels_and_biases], axis=1)
    bias = jnp.stack([b for _, b in kernels_and_biases], axis=0)
    fused = ops.dense(x, jnp.reshape(kernel, (x.shape[-1], -1)),
                      jnp.reshape(bias, (-1,)), self.dtype)
    return jnp.reshape(fused, x.shape[:-1] + bias.shape)

  @staticmethod
  def _split(fused: Array) -> list[Array]:
    # split (not indexing): its gradient is one concatenate, not a zero-pad
    # and an add per part.
    parts = jnp.split(fused, fused.shape[-3], axis=-3)
    return [jnp.squeeze(part, axis=-3) for part in parts]

  def _attend(self, query: Array, key: Array, value: Array,
              deterministic: bool) -> tuple[Array, Array]:
    """softmax(q k^T) v per head; logits and softmax in float32."""
    logits = self._matmul('...qhd,...khd->...hqk', query, key)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    dropped = nn.Dropout(self.dropout_rate)(weights,
                                            deterministic=deterministic)
    mixed = self._matmul('...hqk,...khd->...qhd', dropped, value)
    return mixed, weights


class Encoder1DBlock(nn.Module):
  """A pre-LayerNorm transformer block, named as in the released checkpoints."""
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  layer_norm_epsilon: float = 1e-6
  gelu_approximate: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: Array, deterministic: bool) -> tuple[Array, Array]:
    norm = functools.partial(LayerNorm, epsilon=self.layer_norm_epsilon,
                             param_dtype=self.param_dtype)
    # Stochastic depth drops a whole residual branch per example.
    drop_path = nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2))

    x = norm(name='LayerNorm_0')(inputs)
    x, weights = MultiHeadDotProductAttention(
        num_heads=self.num_heads,
        dropout_rate=self.attention_dropout_rate,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name='MultiHeadDotProductAttention_1')(
            x, deterministic=deterministic)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
    x = inputs + drop_path(x, deterministic=deterministic)

    y = norm(name='LayerNorm_2')(x)
    y = MlpBlock(
        mlp_dim=self.mlp_dim,
        dropout_rate=self.dropout_rate,
        gelu_approximate=self.gelu_approximate,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name='MlpBlock_3')(
            y, deterministic=deterministic)
    return x + drop_path(y, deterministic=deterministic), weights


def rematerialized(block: nn.Module, x: Array, *,
                   deterministic: bool) -> Any:
  """`block(x, deterministic)`, recomputed in the backward pass.

  Like `nn.remat`, only the block's input is kept for the backward pass, but
  the recomputation is made to depend on the incoming gradient. With
  `jax.checkpoint` the recomputation depends only on forward values; XLA:CPU
  drops the optimization barrier meant to order it and runs every block's
  recomputation early, so remat saved no memory at all (ViT-B/16, batch 32:
  8.1 GB either way). Here the parameters used to recompute are offset by
  0 * (one element of the gradient), a data dependency XLA keeps (float
  x * 0 is not folded, for NaN semantics). Dropout draws one key per block
  so the recomputation sees the same masks.
  """
  def pure_block(params, inputs, rng):
    rngs = {} if rng is None else {'dropout': rng}
    return block.clone(parent=None).apply({'params': params}, inputs,
                                          deterministic, rngs=rngs)

  def draw_rng(module):
    return None if deterministic else module.make_rng('dropout')

  def forward(module, inputs):
    return pure_block(module.variables['params'], inputs, draw_rng(module))

  def forward_with_residuals(module, inputs):
    params, rng = module.variables['params'], draw_rng(module)
    return pure_block(params, inputs, rng), (params, inputs, rng)

  def backward(residuals, grads):
    params, inputs, rng = residuals
    # Any element of the gradient makes the whole recomputation wait for it.
    anchor = jax.tree_util.tree_leaves(grads)[0].reshape(-1)[0] * 0
    params = jax.tree.map(lambda p: p + anchor.astype(p.dtype), params)
    _, vjp = jax.vjp(lambda p, i: pure_block(p, i, rng), params, inputs)
    params_grad, inputs_grad = vjp(grads)
    return {'params': params_grad}, inputs_grad

  return nn.custom_vjp(forward, forward_with_residuals, backward)(block, x)


class Encoder(nn.Module):
  """Position embeddings, `num_layers` blocks and the final `encoder_norm`."""
  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  layer_norm_epsilon: float = 1e-6
  gelu_approximate: bool = True
  add_position_embedding: bool = True
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> tuple[Array, dict[str, Any]]:
    if self.add_position_embedding:
      x = AddPositionEmbs(param_dtype=self.param_dtype,
                          name='posembed_input')(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)

    blocks, attention = [], []
    for i in range(self.num_layers):
      # Stochastic depth grows linearly from 0 at the first block.
      rate = self.stochastic_depth * i / max(self.num_layers - 1, 1)
      block = Encoder1DBlock(
          mlp_dim=self.mlp_dim,
          num_heads=self.num_heads,
          dropout_rate=self.dropout_rate,
          attention_dropout_rate=self.attention_dropout_rate,
          drop_path_rate=rate,
          layer_norm_epsilon=self.layer_norm_epsilon,
          gelu_approximate=self.gelu_approximate,
          dtype=self.dtype,
          param_dtype=self.param_dtype,
          name=f'encoderblock_{i}')
      if self.remat and not self.is_initializing():
        x, weights = rematerialized(block, x, deterministic=not train)
      else:
        x, weights = block(x, not train)
      blocks.append(x)
      attention.append(weights)
    encoded = LayerNorm(epsilon=self.layer_norm_epsilon,
                           param_dtype=self.param_dtype,
                           name='encoder_norm')(x)
    return encoded, {'blocks': blocks, 'attention_weights': attention}


class MAPHead(nn.Module):
  """Multi-head attention pooling: a learned probe attends over the tokens."""
  mlp_dim: int
  num_heads: int
  layer_norm_epsilon: float = 1e-6
  gelu_approximate: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    probe = self.param('probe', nn.initializers.xavier_uniform(),
                       (1, 1, x.shape[-1]), self.param_dtype)
    probe = jnp.broadcast_to(probe, (x.shape[0], 1, x.shape[-1]))
    x, _ = MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype,
        param_dtype=self.param_dtype)(probe, x, deterministic=True)
    y = LayerNorm(epsilon=self.layer_norm_epsilon,
                     param_dtype=self.param_dtype)(x)
    x = x + MlpBlock(mlp_dim=self.mlp_dim,
                     gelu_approximate=self.gelu_approximate,
                     dtype=self.dtype,
                     param_dtype=self.param_dtype)(y, deterministic=True)
    return x[:, 0]


class VisionTransformer(nn.Module):
  """ViT classifier: (optional ResNet stem) -> patches -> encoder -> head.

  Attributes:
    num_classes: size of the `head`; 0 or None returns the pre-logits.
    patch_size: (height, width) of a patch, on the ResNet output for hybrids.
    hidden_size, num_layers, num_heads, mlp_dim: the transformer's shape.
    classifier: 'token' (class token), 'gap' (mean of the tokens), 'map'
      (attention pooling), 'unpooled' (all patch tokens) or 'token_unpooled'
      (class token plus patch tokens, unpooled).
    representation_size: width of the tanh `pre_logits` layer, or None.
    posemb: 'learn' (official) or 'sincos2d' (fixed, no parameters).
    resnet: a `ResNetSpec` for R+ViT hybrids, or None.
    dropout_rate, attention_dropout_rate, stochastic_depth: regularisation;
      the drop-path rate grows linearly over depth up to `stochastic_depth`.
    layer_norm_epsilon, gelu_approximate: 1e-6 and True are the official
      numerics; HF checkpoints use 1e-12 and exact-erf GELU.
    head_bias_init: constant initial bias of the zero-initialised head.
    remat: recompute each block in the backward pass to save memory.
    dtype: compute dtype (bfloat16 for mixed precision); param_dtype: storage.
  """
  num_classes: Optional[int]
  patch_size: tuple[int, int]
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  classifier: str = 'token'
  representation_size: Optional[int] = None
  posemb: str = 'learn'
  resnet: Optional[resnet_lib.ResNetSpec] = None
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  layer_norm_epsilon: float = 1e-6
  gelu_approximate: bool = True
  head_bias_init: float = 0.0
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f'unknown classifier {self.classifier!r}; '
                       f'known: {", ".join(CLASSIFIERS)}')
    if self.posemb not in POSEMB_KINDS:
      raise ValueError(f'unknown posemb {self.posemb!r}; '
                       f'known: {", ".join(POSEMB_KINDS)}')
    super().__post_init__()

  @property
  def has_class_token(self) -> bool:
    return self.classifier in ('token', 'token_unpooled')

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False,
               return_intermediates: bool = False):
    """Classifies `images` of shape (batch, height, width, channels).

    Returns the logits, or `(logits, intermediates)` when
    `return_intermediates` is set: a dict with the patch grid size
    (`grid`), every block's output (`blocks`), every block's attention
    weights (`attention_weights`, each (batch, heads, tokens, tokens)), the
    normalised encoder output (`encoded`) and the pooled features
    (`pre_logits`).
    """
    x = images.astype(self.dtype)
    if self.resnet is not None:
      x = resnet_lib.ResNetStem(spec=self.resnet, dtype=self.dtype,
                                param_dtype=self.param_dtype)(x)
    x = self._embed_patches(x)
    batch, grid_h, grid_w, dim = x.shape
    x = jnp.reshape(x, (batch, grid_h * grid_w, dim))
    if self.posemb == 'sincos2d':
      x = x + sincos2d_posemb(grid_h, grid_w, dim).astype(x.dtype)
    if self.has_class_token:
      cls = self.param('cls', nn.initializers.zeros, (1, 1, dim),
                       self.param_dtype)
      x = jnp.concatenate(
          [jnp.broadcast_to(cls, (batch, 1, dim)).astype(x.dtype), x], axis=1)

    encoded, intermediates = Encoder(
        num_layers=self.num_layers,
        mlp_dim=self.mlp_dim,
        num_heads=self.num_heads,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        stochastic_depth=self.stochastic_depth,
        layer_norm_epsilon=self.layer_norm_epsilon,
        gelu_approximate=self.gelu_approximate,
        add_position_embedding=self.posemb == 'learn',
        remat=self.remat,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name='Transformer')(x, train=train)

    features = self._pool(encoded)
    if self.representation_size is not None:
      features = nn.tanh(nn.Dense(self.representation_size,
                                  param_dtype=self.param_dtype,
                                  name='pre_logits')(features))
    logits = features
    if self.num_classes:
      logits = nn.Dense(
          self.num_classes,
          param_dtype=self.param_dtype,
          kernel_init=nn.initializers.zeros,
          bias_init=nn.initializers.constant(self.head_bias_init),
          name='head')(features)
    logits = logits.astype(jnp.float32)
    if not return_intermediates:
      return logits
    intermediates.update(grid=(grid_h, grid_w), encoded=encoded,
                         pre_logits=features)
    return logits, intermediates

  def _embed_patches(self, x: Array) -> Array:
    height, width = x.shape[1:3]
    patch_h, patch_w = self.patch_size
    if height % patch_h or width % patch_w:
      raise ValueError(
          f'input of {height}x{width} (after any ResNet stem) is not divisible '
          f'by the patch size {patch_h}x{patch_w}')
    return PatchEmbedding(self.hidden_size, (patch_h, patch_w),
                          dtype=self.dtype, param_dtype=self.param_dtype,
                          name='embedding')(x)

  def _pool(self, encoded: Array) -> Array:
    if self.classifier == 'token':
      return encoded[:, 0]
    if self.classifier == 'gap':
      return jnp.mean(encoded, axis=1)
    if self.classifier == 'map':
      return MAPHead(mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                     layer_norm_epsilon=self.layer_norm_epsilon,
                     gelu_approximate=self.gelu_approximate,
                     dtype=self.dtype, param_dtype=self.param_dtype,
                     name='MAPHead_0')(encoded)
    return encoded  # 'unpooled' and 'token_unpooled' keep every token.


def count_params(params) -> int:
  """Number of scalars in a parameter tree (works on ShapeDtypeStructs)."""
  return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


def replace(model: VisionTransformer, **changes) -> VisionTransformer:
  """A copy of `model` with some attributes changed (e.g. dtype, remat)."""
  return dataclasses.replace(model, **changes)
