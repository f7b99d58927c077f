r"""A train step built the way the official ViT code builds it, for comparison.

The performance issue's "official speed" was measured with
google-research/vision_transformer on another CPU; that code cannot be
fetched here. This module rebuilds its recipe from the facts of its design
so the ratio can be measured in the same run on any machine:

- the model from stock Flax modules: `nn.Conv` patch embedding, a class
  token, a learned position embedding, pre-norm blocks of `nn.LayerNorm`,
  `nn.MultiHeadDotProductAttention` (XLA's einsum-softmax-einsum attention)
  and an `nn.Dense`/`nn.gelu` MLP, a final `encoder_norm` and a `head`; the
  parameter names are the official checkpoint layout, so vit_jax's own
  parameters load into it unchanged (tests/test_benchmarks.py checks the
  logits agree);
- the update under `jax.pmap` over the local devices: value and gradient of
  the softmax cross-entropy, gradients summed over micro-batches in a
  `lax.fori_loop`, `pmean` over devices, then `optax.chain(
  clip_by_global_norm(1), sgd(momentum=0.9, accumulator_dtype=bfloat16))`,
  parameters and optimizer state donated;
- XLA's default compiler options, and (by default) glibc's malloc without
  vit_jax's huge pages or block cache, as a plain `python` process has.
The reference configs use no dropout (rate 0, which Flax skips), so the step
takes no dropout key.

`peer_throughput.py --peers=official` runs it in a child process of this
script (`RemoteStep`), so its memory settings are its own, and alternates it
with vit_jax's step and HF's.
"""

import argparse
import json
import os
import subprocess
import sys
from typing import Any, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from benchmarks import common
from vit_jax import host_memory
from vit_jax import train
# pylint: enable=g-import-not-at-top,wrong-import-position


class MlpBlock(nn.Module):
  mlp_dim: int
  gelu_approximate: bool

  @nn.compact
  def __call__(self, x):
    y = nn.Dense(self.mlp_dim, name='Dense_0')(x)
    y = nn.gelu(y, approximate=self.gelu_approximate)
    return nn.Dense(x.shape[-1], name='Dense_1')(y)


class EncoderBlock(nn.Module):
  """Pre-norm block: attention, then MLP, each with a residual."""
  num_heads: int
  mlp_dim: int
  epsilon: float
  gelu_approximate: bool

  @nn.compact
  def __call__(self, inputs):
    x = nn.LayerNorm(epsilon=self.epsilon, name='LayerNorm_0')(inputs)
    x = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, name='MultiHeadDotProductAttention_1')(x, x)
    x = x + inputs
    y = nn.LayerNorm(epsilon=self.epsilon, name='LayerNorm_2')(x)
    y = MlpBlock(self.mlp_dim, self.gelu_approximate, name='MlpBlock_3')(y)
    return x + y


class PositionEmbedding(nn.Module):
  """A learned embedding per token, added (`posembed_input/pos_embedding`)."""

  @nn.compact
  def __call__(self, x):
    posemb = self.param('pos_embedding', nn.initializers.normal(0.02),
                        (1,) + x.shape[1:])
    return x + posemb


class Transformer(nn.Module):
  num_layers: int
  block: dict  # EncoderBlock's fields.

  @nn.compact
  def __call__(self, x):
    epsilon = self.block['epsilon']
    x = PositionEmbedding(name='posembed_input')(x)
    for i in range(self.num_layers):
      x = EncoderBlock(**self.block, name=f'encoderblock_{i}')(x)
    return nn.LayerNorm(epsilon=epsilon, name='encoder_norm')(x)


class VisionTransformer(nn.Module):
  """Patches, class token, encoder, and a linear head on the class token."""
  hidden_size: int
  patch_size: tuple[int, int]
  num_classes: int
  num_layers: int
  block: dict

  @nn.compact
  def __call__(self, images):
    x = nn.Conv(self.hidden_size, self.patch_size, strides=self.patch_size,
                padding='VALID', name='embedding')(images)
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height * width, channels)
    cls = self.param('cls', nn.initializers.zeros, (1, 1, channels))
    x = jnp.concatenate([jnp.tile(cls, (batch, 1, 1)), x], axis=1)
    x = Transformer(self.num_layers, self.block, name='Transformer')(x)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros,
                    name='head')(x[:, 0])


def build_model(spec: common.ModelSpec) -> VisionTransformer:
  """The official-style ViT of `spec`'s shape (a 'token' classifier)."""
  config = spec.model_config
  if (config.classifier != 'token' or config.get('representation_size') or
      config.get('resnet')):
    raise ValueError(f'official_style: model {spec.name!r} is not a plain '
                     f'ViT with a "token" classifier and no representation '
                     f'layer (classifier {config.classifier!r})')
  block = dict(num_heads=config.num_heads, mlp_dim=config.mlp_dim,
               epsilon=config.layer_norm_epsilon,
               gelu_approximate=config.gelu_approximate)
  return VisionTransformer(config.hidden_size, tuple(config.patch_size),
                           spec.num_classes, config.num_layers, block)


# ---------------------------------------------------------------------------
# The update step.


def cross_entropy(logits, labels):
  """Mean softmax cross-entropy against one-hot `labels` (vit_jax's loss)."""
  return jnp.mean(train.softmax_xent(logits, labels))


def accumulated_value_and_grad(loss_fn, params, images, labels, accum: int):
  """Loss and gradient averaged over `accum` equal micro-batches: the first
  computed on its own, the others added to it in a `fori_loop`."""
  value_and_grad = jax.value_and_grad(loss_fn)
  if accum == 1:
    return value_and_grad(params, images, labels)
  micro = images.shape[0] // accum

  def micro_batch(i):
    start = i * micro
    return (jax.lax.dynamic_slice_in_dim(images, start, micro),
            jax.lax.dynamic_slice_in_dim(labels, start, micro))

  def add(i, totals):
    loss, grads = value_and_grad(params, *micro_batch(i))
    return jax.tree.map(jnp.add, totals, (loss, grads))

  totals = jax.lax.fori_loop(1, accum, add,
                             value_and_grad(params, *micro_batch(0)))
  return jax.tree.map(lambda total: total / accum, totals)


def make_optimizer() -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(1.0),
                     optax.sgd(0.01, momentum=0.9,
                               accumulator_dtype=jnp.bfloat16))


def make_update(model: VisionTransformer, tx: optax.GradientTransformation,
                accum: int):
  """The pmapped update: (params, opt_state, images, labels) -> (params,
  opt_state, loss), every argument with a leading device axis."""

  def loss_fn(params, images, labels):
    return cross_entropy(model.apply({'params': params}, images), labels)

  def update(params, opt_state, images, labels):
    loss, grads = accumulated_value_and_grad(loss_fn, params, images, labels,
                                             accum)
    grads = jax.lax.pmean(grads, axis_name='batch')
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, jax.lax.pmean(loss, axis_name='batch')

  return jax.pmap(update, axis_name='batch', donate_argnums=(0, 1))


class LocalStep:
  """The compiled official-style step on a fixed batch, in this process."""

  def __init__(self, spec: common.ModelSpec, batch_size: int, accum: int):
    devices = jax.local_devices()
    if batch_size % (len(devices) * accum):
      raise ValueError(f'official_style: batch {batch_size} does not split '
                       f'into {len(devices)} devices x {accum} micro-batches')
    model, tx = build_model(spec), make_optimizer()
    params = jax.jit(model.init)(jax.random.key(0),
                                 jnp.zeros((1,) + spec.image_shape))['params']
    batch = common.random_batch(spec, batch_size)
    self._images, self._labels = split((batch['image'], batch['label']),
                                       devices)
    self._params, self._opt_state = replicate((params, tx.init(params)),
                                              devices)
    self.compiled, self.compile_s = common.compile_step(
        make_update(model, tx, accum), self._params, self._opt_state,
        self._images, self._labels)
    # XLA's count of the step, with its own attention; the loop counts once
    # (see common.step_flops), so only a step of one micro-batch is counted.
    self.flops = (common.compiled_flops(self.compiled) if accum == 1 else
                  None)

  def __call__(self):
    self._params, self._opt_state, loss = self.compiled(
        self._params, self._opt_state, self._images, self._labels)
    return loss


def replicate(tree, devices):
  """A copy of each array on every device, placed for pmap."""
  count = len(devices)
  return _on_devices(jax.tree.map(
      lambda x: np.broadcast_to(np.asarray(x), (count,) + np.shape(x)), tree),
                     devices)


def split(tree, devices):
  """Each array's leading axis split evenly over the devices, for pmap."""
  return _on_devices(jax.tree.map(
      lambda x: np.reshape(x, (len(devices), -1) + np.shape(x)[1:]), tree),
                     devices)


def _on_devices(tree, devices):
  """Host arrays with one leading entry per device, each put on its own."""
  mesh = jax.sharding.Mesh(np.asarray(devices), ('batch',))
  sharding = jax.sharding.NamedSharding(mesh,
                                        jax.sharding.PartitionSpec('batch'))
  return jax.device_put(tree, sharding)


# ---------------------------------------------------------------------------
# The child process, and its handle in the parent.


def _serve(step: LocalStep, requests, replies) -> None:
  """Answers one JSON line per request line: warm-up, timed steps, stop."""
  def reply(message):
    replies.write(json.dumps(message) + '\n')
    replies.flush()

  reply({'flops': step.flops, 'compile_s': step.compile_s})
  for line in requests:
    request = json.loads(line)
    if request['command'] == 'warmup':
      for _ in range(request['steps']):
        jax.block_until_ready(step())
      reply({})
    elif request['command'] == 'time':
      timings = common.time_steps(step, warmup=0, steps=request['steps'])
      reply({'seconds': timings.seconds,
             'others_cores': timings.others_cores})
    elif request['command'] == 'stop':
      reply({'peak_rss_mb': common.peak_rss_mb()})
      return
    else:
      raise ValueError(f'official_style: unknown command {line.strip()!r}')


def child_env(env, vit_jax_memory: bool) -> dict[str, str]:
  """The child's environment: with vit_jax's malloc settings, or (as a
  plain `python` has) without them."""
  env = common.with_repo_on_path(env)
  return env if vit_jax_memory else host_memory.without_step_memory(env)


class RemoteStep:
  """The official-style step in a child process, driven over its stdin."""

  def __init__(self, model: str, image_size: Optional[int], batch_size: int,
               accum: int, vit_jax_memory: bool = False):
    command = [sys.executable, os.path.abspath(__file__), f'--model={model}',
               f'--batch={batch_size}', f'--accum={accum}']
    if image_size:
      command.append(f'--image_size={image_size}')
    self._process = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=child_env(os.environ, vit_jax_memory))
    ready = self._receive()
    self.flops, self.compile_s = ready['flops'], ready['compile_s']

  def warmup(self, steps: int) -> None:
    self._ask(command='warmup', steps=steps)

  def time_steps(self, steps: int) -> common.Timings:
    reply = self._ask(command='time', steps=steps)
    return common.Timings(reply['seconds'], reply['others_cores'])

  def close(self) -> float:
    """Stops the child; its peak resident memory in MB."""
    peak = self._ask(command='stop')['peak_rss_mb']
    self._process.wait(timeout=60)
    return peak

  def _ask(self, **request) -> dict[str, Any]:
    self._process.stdin.write(json.dumps(request) + '\n')
    self._process.stdin.flush()
    return self._receive()

  def _receive(self) -> dict[str, Any]:
    line = self._process.stdout.readline()
    if not line:
      code = self._process.wait(timeout=60)
      raise RuntimeError(f'official_style: the child process exited ({code}) '
                         'without answering; its error is printed above')
    return json.loads(line)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  common.add_model_arguments(parser)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--accum', type=int, default=1)
  args = parser.parse_args(argv)
  # The protocol's lines go to the real stdout; anything else printed (JAX's
  # warnings, say) goes to stderr, so it cannot break a reply.
  replies = os.fdopen(os.dup(sys.stdout.fileno()), 'w')
  os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
  spec = common.model_spec(args.model, args.image_size, dtype='float32')
  _serve(LocalStep(spec, args.batch, args.accum), sys.stdin, replies)
  return 0


if __name__ == '__main__':
  sys.exit(main())
