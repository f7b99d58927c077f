"""Optimizers and learning-rate schedules as optax chains.

The chain is always, in order:
  global-norm clipping (optional) -> SGD momentum or Adam moments ->
  decoupled weight decay on kernels only (optional) -> learning-rate schedule.

Weight decay follows `optax.adamw`: the decay added to an update is
`lr(step) * weight_decay * param`, so the paper's "Adam, lr 1e-3, weight decay
0.1" is `optimizer='adamw', lr=1e-3, weight_decay=0.1`. It applies only to
`kernel` leaves (Dense, DenseGeneral and Conv weights): biases, LayerNorm and
GroupNorm scales, position embeddings, the class token and the MAP probe are
never decayed.

Gradient accumulation lives in the train step (see `train.py`), not here, so
the optimizer sees one update per step whatever `accum_steps` is.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

Schedule = Callable[[Any], jax.Array]

OPTIMIZERS = ('sgd', 'adam', 'adamw')
DECAYS = ('cosine', 'linear', 'constant')


@dataclasses.dataclass(frozen=True)
class Durations:
  """Training length in optimizer steps."""
  total_steps: int
  warmup_steps: int


def _duration_in_steps(config: ml_collections.ConfigDict, name: str,
                       steps_per_epoch: float) -> int | None:
  """Reads `{name}_steps` or `{name}_epochs` (not both) as a number of steps."""
  steps = config.get(f'{name}_steps')
  epochs = config.get(f'{name}_epochs')
  if steps is not None and epochs is not None:
    raise ValueError(
        f'set either {name}_steps ({steps}) or {name}_epochs ({epochs}), '
        'not both')
  if epochs is not None:
    return int(round(epochs * steps_per_epoch))
  return steps


def resolve_durations(config: ml_collections.ConfigDict,
                      num_train_examples: int) -> Durations:
  """Turns the config's step or epoch durations into optimizer steps.

  An epoch is `num_train_examples / config.batch_size` steps (the global batch;
  accumulation does not change it).
  """
  steps_per_epoch = num_train_examples / config.batch_size
  total = _duration_in_steps(config, 'total', steps_per_epoch)
  warmup = _duration_in_steps(config, 'warmup', steps_per_epoch) or 0
  if total is None:
    raise ValueError('set total_steps or total_epochs')
  if total <= 0:
    raise ValueError(f'the run must be at least one step long, got {total} '
                     'total steps')
  if not 0 <= warmup <= total:
    raise ValueError(f'warmup ({warmup} steps) must be between 0 and the '
                     f'total ({total} steps)')
  return Durations(total_steps=total, warmup_steps=warmup)


def make_schedule(*, base_lr: float, total_steps: int, warmup_steps: int = 0,
                  decay: str = 'cosine', end_lr: float = 0.0) -> Schedule:
  """The official ViT schedule: linear warmup, then decay to `end_lr`.

    lr(step) = warmup(step) * (end_lr + (base_lr - end_lr) * decay(progress))
    warmup(step) = min(1, step / warmup_steps)   (1 without warmup)
    progress = clip((step - warmup_steps) / (total_steps - warmup_steps), 0, 1)
    decay(p) = 0.5 * (1 + cos(pi * p)) | 1 - p | 1   for cosine|linear|constant

  `step` counts updates from 1: update k of a run uses lr(k), so the first
  update after warmup starts is not wasted on lr 0 and the last one uses
  `end_lr`.
  """
  if decay not in DECAYS:
    raise ValueError(f'unknown schedule {decay!r}; known: {", ".join(DECAYS)}')
  decay_steps = max(total_steps - warmup_steps, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
    if decay == 'cosine':
      factor = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif decay == 'linear':
      factor = 1.0 - progress
    else:
      factor = jnp.ones_like(progress)
    lr = end_lr + (base_lr - end_lr) * factor
    if warmup_steps:
      lr = lr * jnp.minimum(1.0, step / warmup_steps)
    return lr

  return schedule


def schedule_from_config(config: ml_collections.ConfigDict,
                         durations: Durations) -> Schedule:
  """The schedule of `config.lr`, `config.schedule` and `config.end_lr`."""
  return make_schedule(base_lr=config.lr, total_steps=durations.total_steps,
                       warmup_steps=durations.warmup_steps,
                       decay=config.schedule, end_lr=config.end_lr)


def weight_decay_mask(params: Any) -> Any:
  """True for the leaves weight decay applies to: the `kernel`s only."""
  def is_kernel(path, _):
    last = path[-1]
    return getattr(last, 'key', getattr(last, 'name', None)) == 'kernel'
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def _moments(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The optimizer's own update rule, before weight decay and learning rate."""
  state_dtype = jnp.dtype(config.momentum_dtype)
  if config.optimizer == 'sgd':
    if not config.momentum:
      return optax.identity()
    return optax.trace(decay=config.momentum, accumulator_dtype=state_dtype)
  return optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps,
                             mu_dtype=state_dtype)


def make_optimizer(config: ml_collections.ConfigDict,
                   schedule: Schedule) -> optax.GradientTransformation:
  """The optax chain of `config` (see the module docstring for its order).

  Reads `optimizer` ('sgd', 'adam', 'adamw'), `momentum` and `momentum_dtype`
  (the SGD trace or Adam first moment; bfloat16 halves its memory, as in the
  official fine-tuning), `b1`, `b2`, `eps`, `weight_decay` and
  `grad_clip_norm` (None or 0 turns clipping off).
  """
  if config.optimizer not in OPTIMIZERS:
    raise ValueError(f'unknown optimizer {config.optimizer!r}; known: '
                     f'{", ".join(OPTIMIZERS)}')
  if config.optimizer == 'adam' and config.weight_decay:
    raise ValueError(
        f"optimizer 'adam' has no weight decay (got weight_decay="
        f"{config.weight_decay}); use optimizer='adamw' for decoupled decay")
  parts = []
  if config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  parts.append(_moments(config))
  if config.weight_decay:
    parts.append(optax.add_decayed_weights(config.weight_decay,
                                           mask=weight_decay_mask))
  # optax counts updates from 0; the schedule counts them from 1.
  parts.append(optax.scale_by_learning_rate(lambda count: schedule(count + 1)))
  return optax.chain(*parts)

