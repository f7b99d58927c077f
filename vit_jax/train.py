"""Training and evaluation: the train state, the jitted steps and the loop.

Everything runs under `jax.jit` over global arrays on a 'data' mesh (see
`parallel.py`): the batch is split across devices, the state follows the
config's sharding rule, and the state is donated to each step. The state is
created already sharded: `jax.eval_shape` gives its shapes, the rule gives
shardings, and a jitted init writes each array straight onto its devices (or
orbax reads it there when resuming).

The host reads values from the devices only at log, eval and checkpoint
steps; otherwise it only keeps from running more than a couple of steps
ahead of them.
"""

import collections
import contextlib
import dataclasses
import os
import time
from typing import Any, Callable, Iterator, NoReturn, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vit_jax import input_pipeline
from vit_jax import metrics as metrics_lib
from vit_jax import models
from vit_jax import optim
from vit_jax import parallel
from vit_jax import preemption
from vit_jax import train_checkpoints
from vit_jax import xla_options

# Steps dispatched but not finished before the host waits for the oldest.
_MAX_STEPS_IN_FLIGHT = 2

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


class NonFiniteLossError(RuntimeError):
  """Training diverged: a logged value or the parameters are not finite."""


@flax.struct.dataclass
class TrainState:
  """What a checkpoint holds.

  Attributes:
    step: number of updates applied so far (int32 scalar).
    params: the model parameters (float32).
    opt_state: the optax state.
    rng: base PRNG key of the run; step `s` uses `fold_in(rng, s)` for dropout
      and stochastic depth, so a resumed run draws the same randomness.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


# Losses: per-example values from float32 logits and (soft) label vectors.
def softmax_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy against label distributions (smoothed or mixed)."""
  return -jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1)


def sigmoid_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-class sigmoid cross-entropy summed over classes (multi-label)."""
  return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, labels), axis=-1)


LOSSES: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    'softmax_xent': softmax_xent,
    'sigmoid_xent': sigmoid_xent,
}


def _correct(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Whether the top logit is the top label, per example."""
  return jnp.argmax(logits, axis=-1) == jnp.argmax(labels, axis=-1)


# ---------------------------------------------------------------------------
# Set-up: config checks, model, state.


def validate_config(config: ml_collections.ConfigDict,
                    num_devices: int) -> None:
  """Raises ValueError with one clear sentence for an unusable config."""
  if config.loss not in LOSSES:
    raise ValueError(f'unknown loss {config.loss!r}; known: '
                     f'{", ".join(LOSSES)}')
  for key in ('total_steps', 'total_epochs', 'batch_size'):
    if config.get(key) is not None and config[key] <= 0:
      raise ValueError(f'{key} must be positive, got {config[key]}')
  for key in ('warmup_steps', 'warmup_epochs'):
    if config.get(key) is not None and config[key] < 0:
      raise ValueError(f'{key} must be 0 or positive, got {config[key]}')
  for key in ('log_every', 'accum_steps', 'keep_checkpoints'):
    if config[key] < 1:
      raise ValueError(f'{key} must be at least 1, got {config[key]}')
  for key in ('eval_every', 'checkpoint_every'):
    if config[key] < 0:
      raise ValueError(f'{key} must be 0 (only at the end) or positive, got '
                       f'{config[key]}')
  # Imported here: only these checks and fine-tuning need the module.
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  checkpoint.parse_step(config.get('init_from_step'), 'init_from_step')
  try:
    checkpoint.patch_grid(config.model, image_size(config))
  except checkpoint.CheckpointError:
    stem = ' after the ResNet stem' if config.model.get('resnet') else ''
    raise ValueError(f'image_size={config.image_size} does not divide into '
                     f'patches of model.patch_size={config.model.patch_size}'
                     f'{stem}') from None
  if config.batch_size % config.accum_steps:
    raise ValueError(f'batch_size={config.batch_size} is not divisible by '
                     f'accum_steps={config.accum_steps}')
  parallel.check_divisible(config.batch_size // config.accum_steps,
                           num_devices, 'batch_size / accum_steps'
                           if config.accum_steps > 1 else 'batch_size')
  parallel.check_divisible(eval_batch_size(config), num_devices,
                           'eval_batch_size')


def validate_data(config: ml_collections.ConfigDict,
                  info: input_pipeline.DatasetInfo) -> None:
  """Raises ValueError when the dataset cannot fill one training batch, or
  `best_checkpoint_metric` is not one of its eval metrics."""
  if config.batch_size > info.num_train_examples:
    raise ValueError(f'batch_size={config.batch_size} is larger than the '
                     f'train split of {info.name} ({info.num_train_examples} '
                     'examples)')
  metric = config.get('best_checkpoint_metric') or ''
  choices = [f'{split}/{name}' for split in info.num_eval_examples
             for name in ('accuracy', 'loss')]
  if metric and metric not in choices:
    raise ValueError(f'best_checkpoint_metric={metric!r} is not an eval '
                     f'metric of {info.name}; choose one of '
                     f'{", ".join(choices)}')


def eval_batch_size(config: ml_collections.ConfigDict) -> int:
  """The global eval batch size (default: the training batch size)."""
  return config.eval_batch_size or config.batch_size


def image_size(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(height, width) of the model's input images."""
  size = config.image_size
  return (size, size) if isinstance(size, int) else tuple(size)


def input_shape(config: ml_collections.ConfigDict,
                info: input_pipeline.DatasetInfo) -> tuple[int, int, int]:
  """(height, width, channels) of the model's input images."""
  return image_size(config) + (info.channels,)


def build_model(config: ml_collections.ConfigDict,
                info: input_pipeline.DatasetInfo) -> nn.Module:
  """The config's model with a head for the dataset's classes."""
  return models.build_model(config.model, info.num_classes)


def _init_fn(model: nn.Module, tx: optax.GradientTransformation,
             image_shape: tuple[int, int, int]) -> Callable[[jax.Array],
                                                            TrainState]:
  """A function from a seed key to a fresh train state."""
  def init(rng: jax.Array) -> TrainState:
    params_rng, run_rng = jax.random.split(rng)
    images = jnp.zeros((1,) + image_shape, jnp.float32)
    params = model.init({'params': params_rng}, images, train=False)['params']
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), rng=run_rng)
  return init


def abstract_state(model: nn.Module, tx: optax.GradientTransformation,
                   image_shape: tuple[int, int, int], mesh: Mesh,
                   rule: str = 'replicate') -> tuple[TrainState, TrainState]:
  """The state's shapes and its shardings, without computing anything.

  Returns (state of `jax.ShapeDtypeStruct`s carrying shardings, state of
  `NamedSharding`s).
  """
  shapes = jax.eval_shape(_init_fn(model, tx, image_shape),
                          jax.random.PRNGKey(0))
  shardings = parallel.state_shardings(shapes, mesh, rule)
  target = jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
      shapes, shardings)
  return target, shardings


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       image_shape: tuple[int, int, int], mesh: Mesh,
                       shardings: TrainState, seed: int) -> TrainState:
  """A fresh state, each array created directly with its sharding."""
  init = jax.jit(_init_fn(model, tx, image_shape), out_shardings=shardings)
  return init(jax.random.PRNGKey(seed))


# ---------------------------------------------------------------------------
# The jitted steps.


def _split_micro_batches(x: jax.Array, accum_steps: int,
                         mesh: Mesh) -> jax.Array:
  """(batch, ...) -> (accum_steps, batch / accum_steps, ...).

  Micro-batch j takes rows j, j + accum_steps, ...: each device's contiguous
  rows then hold a slice of every micro-batch, so no data moves.
  """
  micro = x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:])
  micro = jnp.swapaxes(micro, 0, 1)
  return jax.lax.with_sharding_constraint(
      micro, NamedSharding(mesh, P(None, parallel.DATA_AXIS)))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    schedule: optim.Schedule, mesh: Mesh,
                    shardings: TrainState, *, loss: str = 'softmax_xent',
                    accum_steps: int = 1,
                    compiler_options: Optional[dict[str, str]] = None):
  """The jitted `(state, batch) -> (state, metrics)`; donates `state`.

  `compiler_options` (XLA's) default to `xla_options.for_compute_dtype` of
  the model's compute dtype; {} compiles with XLA's defaults.

  `batch` holds 'image' (B, H, W, C) and 'label' (B, num_classes) global
  arrays. Metrics: mean loss and accuracy over the batch, the global norm of
  the (accumulated) gradient before clipping, and the step's learning rate.
  """
  loss_fn = LOSSES[loss]

  def micro_loss(params, images, labels, rng):
    logits = model.apply({'params': params}, images, train=True,
                         rngs={'dropout': rng})
    return (jnp.mean(loss_fn(logits, labels)),
            jnp.mean(_correct(logits, labels)))

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def accumulate(params, batch, rng):
    """Mean loss, accuracy and gradient over `accum_steps` micro-batches."""
    micro = jax.tree.map(
        lambda x: _split_micro_batches(x, accum_steps, mesh), batch)

    def body(carry, inputs):
      index, images, labels = inputs
      (loss_value, accuracy), grads = grad_fn(
          params, images, labels, jax.random.fold_in(rng, index))
      loss_sum, accuracy_sum, grad_sum = carry
      return (loss_sum + loss_value, accuracy_sum + accuracy,
              jax.tree.map(jnp.add, grad_sum, grads)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (loss_sum, accuracy_sum, grad_sum), _ = jax.lax.scan(
        body, (jnp.float32(0), jnp.float32(0), zeros),
        (jnp.arange(accum_steps), micro['image'], micro['label']))
    grads = jax.tree.map(lambda g: g / accum_steps, grad_sum)
    return loss_sum / accum_steps, accuracy_sum / accum_steps, grads

  def step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
    rng = jax.random.fold_in(state.rng, state.step)
    if accum_steps == 1:
      (loss_value, accuracy), grads = grad_fn(
          state.params, batch['image'], batch['label'], rng)
    else:
      loss_value, accuracy, grads = accumulate(state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params,
                              opt_state=opt_state)
    return new_state, {
        'loss': loss_value,
        'accuracy': accuracy,
        'grad_norm': optax.global_norm(grads),
        'lr': schedule(state.step + 1),
    }

  return jax.jit(
      step,
      in_shardings=(shardings, parallel.batch_sharding(mesh)),
      out_shardings=(shardings, parallel.replicated_sharding(mesh)),
      donate_argnums=(0,),
      compiler_options=_step_options(model, compiler_options))


def _step_options(model: nn.Module,
                  options: Optional[dict[str, str]]) -> Optional[dict]:
  """Explicit options, else the defaults for the model's compute dtype."""
  if options is None:
    options = xla_options.for_compute_dtype(
        getattr(model, 'dtype', jnp.float32))
  return options or None


def make_eval_step(model: nn.Module, mesh: Mesh, param_shardings: Any, *,
                   loss: str = 'softmax_xent',
                   compiler_options: Optional[dict[str, str]] = None):
  """The jitted `(params, batch) -> sums`; padded examples (mask 0) count 0.

  Returns integer counts ('correct', 'count') and the float 'loss_sum', so
  accuracy over a split is exact whatever the batch size and padding.
  """
  loss_fn = LOSSES[loss]

  def step(params, batch: Batch) -> Metrics:
    logits = model.apply({'params': params}, batch['image'], train=False)
    real = batch['mask'] > 0
    return {
        'correct': jnp.sum(_correct(logits, batch['label']) & real,
                           dtype=jnp.int32),
        'count': jnp.sum(real, dtype=jnp.int32),
        'loss_sum': jnp.sum(jnp.where(real, loss_fn(logits, batch['label']),
                                      0.0)),
    }

  return jax.jit(step,
                 in_shardings=(param_shardings, parallel.batch_sharding(mesh)),
                 out_shardings=parallel.replicated_sharding(mesh),
                 compiler_options=_step_options(model, compiler_options))


@jax.jit
def all_finite(tree: Any) -> jax.Array:
  """Whether every element of every array in `tree` is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves))


# ---------------------------------------------------------------------------
# The run: a bundle of what the loop needs, then small steps of the loop.


@dataclasses.dataclass
class Run:
  """Everything a training run holds besides its changing state."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: Mesh
  info: input_pipeline.DatasetInfo
  durations: optim.Durations
  model: nn.Module
  tx: optax.GradientTransformation
  target: TrainState
  shardings: TrainState
  train_step: Callable[[TrainState, Batch], tuple[TrainState, Metrics]]
  eval_step: Callable[[Any, Batch], Metrics]
  # Created once the inputs have proved usable (it writes to the workdir).
  checkpointer: Optional[train_checkpoints.Checkpointer] = None
  logger: Optional[metrics_lib.MetricLogger] = None

  @property
  def total_steps(self) -> int:
    """Length of the run in optimizer steps."""
    return self.durations.total_steps


def setup_run(config: ml_collections.ConfigDict, workdir: str,
              mesh: Optional[Mesh] = None) -> Run:
  """Reads the dataset's info and builds the model, optimizer and jitted steps.

  `config` must have passed `validate_config`. Writes nothing: the
  checkpointer is attached later.
  """
  mesh = mesh or parallel.make_mesh()
  info = input_pipeline.get_dataset_info(config)
  validate_data(config, info)
  durations = optim.resolve_durations(config, info.num_train_examples)
  model = build_model(config, info)
  schedule = optim.schedule_from_config(config, durations)
  tx = optim.make_optimizer(config, schedule)
  target, shardings = abstract_state(model, tx, input_shape(config, info),
                                     mesh, config.sharding_rule)
  return Run(
      config=config, workdir=workdir, mesh=mesh, info=info,
      durations=durations, model=model, tx=tx, target=target,
      shardings=shardings,
      train_step=make_train_step(model, tx, schedule, mesh, shardings,
                                 loss=config.loss,
                                 accum_steps=config.accum_steps),
      eval_step=make_eval_step(model, mesh, shardings.params,
                               loss=config.loss))


def load_init_checkpoint(config: ml_collections.ConfigDict) -> Any:
  """The parameters in `config.init_from` as stored (None without it).

  Called before the dataset and the model are set up, so that a wrong path
  or an unreadable file fails within seconds.
  """
  if not config.init_from:
    return None
  # Imported here: only fine-tuning runs need the interchange formats.
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  try:
    loaded, _ = checkpoint.load_checkpoint(
        config.init_from, step=checkpoint.parse_step(
            config.get('init_from_step'), 'init_from_step'))
  except checkpoint.CheckpointError as error:
    raise checkpoint.CheckpointError(f'init_from: {error}') from None
  return loaded


def _fit_pretrained(config: ml_collections.ConfigDict, loaded: Any,
                    init_params: Any) -> tuple[Any, str]:
  """Adapts loaded parameters to the model (fine-tuning).

  Returns the params and a summary of the surgery. The source may be an
  official .npz, a HF directory or a training workdir; position embeddings
  are resampled to this run's patch grid (`checkpoint.adapt_params`). With
  `init_reset_head` the head starts anew; without it the checkpoint's head
  is kept, so a different class count is an error rather than a silently
  new head.
  """
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  reset = config.init_reset_head
  try:
    params, report = checkpoint.adapt_params(
        loaded, init_params, model_config=config.model,
        posemb_method=config.init_posemb_method, reinit_head=reset,
        drop=('head', 'pre_logits') if reset else ('pre_logits',),
        target_grid=checkpoint.patch_grid(config.model, image_size(config)))
  except checkpoint.CheckpointError as error:
    hint = ''
    if not reset and 'head/' in str(error):
      hint = ("; init_reset_head=False keeps the checkpoint's head, which "
              'needs the same class count (set --config.init_reset_head=True '
              'for a new head)')
    raise checkpoint.CheckpointError(
        f'init_from {config.init_from}: {error}{hint}') from None
  return params, report.summary()


def pretrained_params(run: Run, loaded: Any = None
                      ) -> Optional[tuple[Any, str]]:
  """`config.init_from` fitted to the model (host arrays) and a summary.

  None without `init_from`. `loaded` is `load_init_checkpoint`'s result,
  read here when not given. Called before anything is written to the
  workdir, even when the run will resume instead, so that a wrong
  `init_from` fails on the first try.
  """
  if not run.config.init_from:
    return None
  if loaded is None:
    loaded = load_init_checkpoint(run.config)
  # The fresh params supply shapes and the values of a re-initialised head.
  init = _init_fn(run.model, run.tx, input_shape(run.config, run.info))
  init_params = jax.jit(lambda rng: init(rng).params)(
      jax.random.PRNGKey(run.config.seed))
  return _fit_pretrained(run.config, loaded, jax.device_get(init_params))


def initial_state(run: Run,
                  pretrained: Optional[tuple[Any, str]] = None) -> TrainState:
  """The latest checkpoint if any, else a fresh state (with `pretrained`)."""
  latest = run.checkpointer.latest_step()
  if latest is not None:
    if jax.process_index() == 0:
      print(f'resuming from step {latest} of {run.workdir}', flush=True)
    return run.checkpointer.restore(latest, run.target)
  state = create_train_state(run.model, run.tx, input_shape(run.config,
                                                            run.info),
                             run.mesh, run.shardings, run.config.seed)
  if pretrained is not None:
    params, summary = pretrained
    if jax.process_index() == 0:
      print(f'initialised from {run.config.init_from}: {summary}', flush=True)
    state = state.replace(params=jax.device_put(params, run.shardings.params))
  return state


def evaluate(run: Run, params: Any) -> dict[str, float]:
  """Accuracy and loss on every eval split, each example counted once."""
  results = {}
  for split in run.info.num_eval_examples:
    batches = input_pipeline.make_eval_iterator(
        run.config, split, global_batch_size=eval_batch_size(run.config))
    totals = None
    for batch in batches:
      sums = run.eval_step(params, parallel.global_batch(batch, run.mesh))
      totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = int(totals['count'])
    results[f'{split}/accuracy'] = int(totals['correct']) / max(count, 1)
    results[f'{split}/loss'] = float(totals['loss_sum']) / max(count, 1)
    results[f'{split}/examples'] = count
  return results


def _is_due(step: int, every: int, total: int) -> bool:
  """Whether a periodic action (`every` steps, 0 = never) falls on `step`."""
  return step == total or (every > 0 and step % every == 0)


class _MetricWindow:
  """Sums step metrics on the devices between log steps (no host sync).

  The learning rate is reported as of the last step, the rest as means.
  """
  LAST_VALUE = ('lr',)

  def __init__(self):
    self._sums, self._last, self._count = None, None, 0

  def add(self, metrics: Metrics) -> None:
    self._sums = metrics if self._sums is None else jax.tree.map(
        jnp.add, self._sums, metrics)
    self._last = metrics
    self._count += 1

  def mean(self) -> dict[str, float]:
    """The window's values on the host, and restarts the window."""
    sums, last = jax.device_get((self._sums, self._last))
    means = {key: float(value) / self._count for key, value in sums.items()}
    means.update({key: float(last[key]) for key in self.LAST_VALUE
                  if key in last})
    self._sums, self._last, self._count = None, None, 0
    return means


def _diverged(run: Run, step: int, what: str) -> NonFiniteLossError:
  run.checkpointer.wait()  # A save in flight is a good one: let it land.
  latest = run.checkpointer.latest_step()
  kept = (f'the last good checkpoint (step {latest}) is kept in '
          f'{train_checkpoints.checkpoint_dir(run.workdir)}'
          if latest is not None else 'no checkpoint was written')
  return NonFiniteLossError(
      f'training diverged at step {step}: {what} is not finite; {kept}. '
      'Lower the learning rate, add warmup or gradient clipping.')


def _log_train(run: Run, step: int, window: _MetricWindow) -> None:
  means = window.mean()
  bad = metrics_lib.non_finite(means)
  if bad:
    raise _diverged(run, step, ', '.join(f'train {name}' for name in bad))
  run.logger.log_train(step, means)


def _save(run: Run, step: int, state: TrainState,
          eval_results: Optional[dict[str, float]] = None) -> None:
  """Saves `state` (with the eval results of `step`), never a diverged one."""
  if not bool(all_finite(state.params)):
    raise _diverged(run, step, 'a parameter')
  run.checkpointer.save(step, state, metrics=eval_results)


def _is_new_best(run: Run, eval_results: Optional[dict[str, float]]) -> bool:
  """Whether `eval_results` beat every checkpoint's `best_checkpoint_metric`."""
  metric = run.checkpointer.best_metric
  if not metric or eval_results is None:
    return False
  _, best_score = run.checkpointer.best()
  return train_checkpoints.metric_score(metric, eval_results) > best_score


def _periodic_actions(run: Run, step: int, state: TrainState,
                      window: _MetricWindow) -> Optional[dict[str, float]]:
  """Logging, eval and checkpointing due at `step`; returns eval results.

  A checkpoint is due every `checkpoint_every` steps, and at an eval that
  sets a new best `best_checkpoint_metric`.
  """
  config, total = run.config, run.total_steps
  eval_results = None
  if _is_due(step, config.log_every, total):
    _log_train(run, step, window)
  if _is_due(step, config.eval_every, total):
    eval_results = evaluate(run, state.params)
    run.logger.log_eval(step, eval_results)
  save = (_is_due(step, config.checkpoint_every, total) or
          _is_new_best(run, eval_results))
  if save:
    _save(run, step, state, eval_results)
  if save or eval_results is not None:
    run.logger.start_window(step)  # Time training steps only.
  return eval_results


def _stop_for_preemption(run: Run, step: int, state: TrainState,
                         signal_name: str) -> NoReturn:
  """Saves `step` (unless just saved), waits for it, raises Preempted."""
  if run.checkpointer.latest_step() != step:
    _save(run, step, state)
  run.checkpointer.wait()  # The scheduler's SIGKILL may follow soon.
  raise preemption.Preempted(step, run.total_steps,
                             train_checkpoints.checkpoint_dir(run.workdir),
                             signal_name)


def train_loop(run: Run, state: TrainState) -> tuple[TrainState, dict]:
  """Trains from `state.step` to the end; returns the state and final eval."""
  start = int(state.step)
  batches: Iterator = input_pipeline.make_train_iterator(
      run.config, global_batch_size=run.config.batch_size, start_step=start,
      seed=run.config.seed)
  window = _MetricWindow()
  in_flight = collections.deque()
  run.logger.start_window(start)
  eval_results = {}
  with preemption.PreemptionWatcher() as watcher:
    for step in range(start + 1, run.total_steps + 1):
      batch = parallel.global_batch(next(batches), run.mesh)
      state, step_metrics = run.train_step(state, batch)
      window.add(step_metrics)
      # Bounds how far the host runs ahead (each queued step holds a batch
      # in device memory) without idling the devices: step s - 2 is done.
      in_flight.append(step_metrics['loss'])
      if len(in_flight) > _MAX_STEPS_IN_FLIGHT:
        in_flight.popleft().block_until_ready()
      eval_results = (_periodic_actions(run, step, state, window) or
                      eval_results)
      if step < run.total_steps and watcher.reached(step):
        _stop_for_preemption(run, step, state, watcher.signal_name)
  if not eval_results and start >= run.total_steps:
    eval_results = evaluate(run, state.params)  # Rerun of a finished run.
  return state, eval_results


def _results(run: Run, eval_results: dict, wall_seconds: float) -> dict:
  return {
      'final_step': run.total_steps,
      'warmup_steps': run.durations.warmup_steps,
      'final_eval': eval_results,
      'best_eval_accuracy': dict(run.logger.best_accuracy),
      'best_checkpoint_step': run.checkpointer.best()[0],
      'wall_time_sec': wall_seconds,
      'train_img_per_sec': run.logger.throughput(),
      'num_devices': run.mesh.size,
      'num_params': models.count_params(run.target.params),
      'dataset': run.info.name,
  }


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       mesh: Optional[Mesh] = None) -> dict:
  """Trains (resuming from `workdir` if possible), evaluates, checkpoints.

  Checks the config; the workdir, refusing (IncompatibleWorkdirError) one
  whose config.json describes a different model, or one that cannot be
  written; `init_from`; and the dataset. Only then writes config.json. A
  SIGTERM during training saves a checkpoint and raises
  `preemption.Preempted`.

  Args:
    config: a config from `configs/` (see configs/common.py for its keys).
    workdir: receives config.json, checkpoints, TensorBoard events,
      metrics.jsonl and results.json.
    mesh: devices to use; default all of them.

  Returns:
    The contents of results.json.
  """
  start_time = time.time()
  # Every input is checked before the workdir is touched, so a failed start
  # leaves an existing run exactly as it was; the cheap checks come first, so
  # a mistake in the config, the workdir or the init_from path is reported
  # before TensorFlow loads for the dataset and the model is compiled.
  mesh = mesh or parallel.make_mesh()
  validate_config(config, mesh.size)
  train_checkpoints.check_workdir_config(workdir, config)
  train_checkpoints.check_workdir_writable(workdir)
  loaded = load_init_checkpoint(config)
  run = setup_run(config, workdir, mesh)
  pretrained = pretrained_params(run, loaded)
  del loaded  # The fitted copy is what training starts from.
  os.makedirs(workdir, exist_ok=True)  # Only now that every input passed.
  run.checkpointer = train_checkpoints.Checkpointer(
      workdir, keep=config.keep_checkpoints,
      best_metric=config.get('best_checkpoint_metric') or '')
  try:
    train_checkpoints.write_config(workdir, config)
    if jax.process_index() == 0:
      input_pipeline.write_class_names(run.info, workdir)  # For predict/export.
    state = initial_state(run, pretrained)
    del pretrained  # Host copies, not needed once on the devices.
    run.logger = metrics_lib.MetricLogger(
        workdir, total_steps=run.total_steps, batch_size=config.batch_size)
    state, eval_results = train_loop(run, state)
    results = _results(run, eval_results, time.time() - start_time)
    metrics_lib.write_results(workdir, results)
  except BaseException:
    # The first error is the one to report: closing may fail the same way
    # (a full disk) and must not hide it.
    with contextlib.suppress(Exception):
      _close(run)
    raise
  _close(run)
  return results


def _close(run: Run) -> None:
  """Waits for pending saves, then closes the checkpointer and the logs."""
  try:
    run.checkpointer.close()
  finally:
    if run.logger is not None:
      run.logger.close()
