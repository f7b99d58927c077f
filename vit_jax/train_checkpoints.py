"""Train-state checkpoints (orbax) and the workdir's `config.json`.

Layout: `workdir/checkpoints/<step>/{params,opt_state,meta}`, written by an
orbax `CheckpointManager`: asynchronously (the device-to-host copy blocks, the
write does not), atomically (a step directory appears only once complete), and
keeping the last `keep` steps. Params, optimizer state and the small `meta`
item (step and RNG) are separate items, so `restore_params` reads the
parameters without knowing which optimizer wrote them.

With a `best_metric` (config `best_checkpoint_metric`, e.g. 'test/accuracy')
the manager also keeps the checkpoint with the best value of that eval
metric, on top of the latest `keep`: orbax's preservation policies
(`LatestN` and `BestN`) decide what is deleted, and the eval metrics saved
with each checkpoint say which is best, also after a resume.

The data position needs no saving: the input pipeline's order is a function
of (seed, step).
"""

import json
import math
import os
import shutil
import tempfile
from typing import Any, Mapping, Optional, Union

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

CHECKPOINT_DIR = 'checkpoints'
CONFIG_FILE = 'config.json'
_ITEMS = ('params', 'opt_state', 'meta')

# Model-config keys that change neither parameter shapes nor their meaning:
# a run may resume with these changed.
_RESUMABLE_MODEL_KEYS = frozenset({
    'dropout_rate', 'attention_dropout_rate', 'stochastic_depth', 'remat',
    'dtype'})
# Top-level keys that change parameter shapes (class count, patch grid).
_SHAPE_KEYS = ('dataset', 'image_size')
# Room a save needs beyond the arrays' bytes: orbax metadata and OCDBT index.
_SAVE_OVERHEAD = 1.1
_SAVE_SLACK_BYTES = 1 << 20


class IncompatibleWorkdirError(ValueError):
  """The workdir holds a run whose model differs from the config's."""


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (disk full, read-only, ...)."""


def checkpoint_dir(workdir: str) -> str:
  """Where a workdir's checkpoints live."""
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def metric_score(metric: str, metrics: Optional[Mapping[str, Any]]) -> float:
  """How good `metrics[metric]` is, higher is better (-inf when absent).

  A loss ('.../loss') is better when lower, anything else when higher.
  """
  if not metrics or metric not in metrics:
    return -math.inf
  value = float(metrics[metric])
  return -value if metric.endswith('/loss') else value


def _scorer(metric: str):
  return lambda metrics: metric_score(metric, metrics)


def _preservation_policy(keep: int, best_metric: str):
  """The latest `keep` checkpoints, and the best one by `best_metric`."""
  latest = checkpoint_managers.LatestN(n=keep)
  if not best_metric:
    return latest
  best = checkpoint_managers.BestN(
      get_metric_fn=_scorer(best_metric), n=1,
      keep_checkpoints_without_metrics=False)
  return checkpoint_managers.AnyPreservationPolicy([latest, best])


class Checkpointer:
  """Saves and restores train states in `workdir/checkpoints`.

  The state is any pytree dataclass with fields `params`, `opt_state`, `step`
  and `rng` and a `replace` method (`train.TrainState`).

  Args:
    workdir: the run's directory.
    keep: how many of the latest checkpoints to keep.
    best_metric: an eval metric ('test/accuracy', 'validation/loss', ...):
      also keep the checkpoint with its best value. '' for none.
  """

  def __init__(self, workdir: str, *, keep: int, best_metric: str = ''):
    options = ocp.CheckpointManagerOptions(
        preservation_policy=_preservation_policy(keep, best_metric),
        # With a best_fn orbax writes each save's metrics next to it.
        best_fn=_scorer(best_metric) if best_metric else None,
        create=True, enable_async_checkpointing=True,
        # Removes half-written step directories left by a killed run.
        cleanup_tmp_directories=True)
    self.best_metric = best_metric
    self._directory = checkpoint_dir(workdir)
    self._manager = ocp.CheckpointManager(
        self._directory, item_names=_ITEMS, options=options)
    # Read from disk once, then kept up to date by `save`: every process
    # must take the same save decisions, whatever state the files of an
    # in-flight asynchronous save are in.
    self._best = best_checkpoint(self._manager, best_metric)

  def _write_failed(self, error: Exception) -> CheckpointWriteError:
    """One line: what failed, and which complete checkpoints remain."""
    # Listed from the directory: the manager may be in a failed state.
    kept = sorted(int(name) for name in os.listdir(self._directory)
                  if name.isdigit())
    reason = str(error).strip().splitlines()[-1] if str(error).strip() else (
        repr(error))
    return CheckpointWriteError(
        f'could not write a checkpoint in {self._directory}: {reason}; the '
        f'complete checkpoints (steps {kept or "none"}) are untouched')

  def _check_free_space(self, tree: Any) -> None:
    """Refuses a save that cannot fit, before orbax starts writing it.

    A write that runs out of space mid-way fails in orbax's threads, which
    print tracebacks; refusing early gives one clean line. Remote paths
    (gs://...) have no local free-space figure and are not checked.
    """
    try:
      free = shutil.disk_usage(self._directory).free
    except OSError:
      return
    needed = int(sum(leaf.nbytes for leaf in jax.tree.leaves(tree)
                     if hasattr(leaf, 'nbytes')) * _SAVE_OVERHEAD
                 ) + _SAVE_SLACK_BYTES
    if free < needed:
      raise self._write_failed(OSError(
          f'No space left on device: a checkpoint needs about '
          f'{needed / 2**20:.1f} MB, {free / 2**20:.1f} MB free'))

  def latest_step(self) -> Optional[int]:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of all complete checkpoints, oldest first."""
    return sorted(self._manager.all_steps())

  def best(self) -> tuple[Optional[int], float]:
    """(step, score) of the best checkpoint by `best_metric` (see
    `metric_score`); (None, -inf) when none was saved with that metric."""
    return self._best

  def save(self, step: int, state: Any,
           metrics: Optional[Mapping[str, float]] = None) -> None:
    """Starts saving `state` as `step`; returns once it is safe to donate it.

    `metrics` (eval results at `step`) are kept with the checkpoint and rank
    it for `best_metric`.
    """
    meta = {'step': state.step, 'rng': state.rng}
    # orbax would wait for the previous save anyway; waiting first makes
    # the free-space figure count its bytes.
    self.wait()
    self._check_free_space((state.params, state.opt_state))
    try:
      self._manager.save(
          step,
          args=ocp.args.Composite(
              params=ocp.args.StandardSave(state.params),
              opt_state=ocp.args.StandardSave(state.opt_state),
              meta=ocp.args.StandardSave(meta)),
          # Saves without an eval rank last (an empty dict scores -inf).
          metrics=dict(metrics or {}) if self.best_metric else None,
          force=True)  # The training loop decides the cadence.
    except (OSError, ValueError) as error:  # Also a failed earlier save.
      raise self._write_failed(error) from error
    if self.best_metric:
      score = metric_score(self.best_metric, metrics)
      if score > -math.inf and score >= self._best[1]:  # As `best_checkpoint`.
        self._best = (step, score)

  def restore(self, step: int, target: Any) -> Any:
    """Restores checkpoint `step` into the shapes/shardings of `target`.

    `target` is a state of `jax.ShapeDtypeStruct`s carrying shardings, so each
    array is read straight onto its devices.
    """
    meta = {'step': target.step, 'rng': target.rng}
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target.params),
            opt_state=ocp.args.StandardRestore(target.opt_state),
            meta=ocp.args.StandardRestore(meta)))
    return target.replace(params=restored['params'],
                          opt_state=restored['opt_state'],
                          step=restored['meta']['step'],
                          rng=restored['meta']['rng'])

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    try:
      self._manager.wait_until_finished()
    except (OSError, ValueError) as error:
      raise self._write_failed(error) from error

  def close(self) -> None:
    """Finishes pending saves and releases the manager."""
    try:
      self.wait()
    finally:
      self._manager.close()


def best_checkpoint(manager: ocp.CheckpointManager,
                    metric: str) -> tuple[Optional[int], float]:
  """(step, score) of `manager`'s best checkpoint by `metric`."""
  best_step, best_score = None, -math.inf
  if not metric:
    return best_step, best_score
  for step in sorted(manager.all_steps()):
    score = metric_score(metric, manager.metrics(step))
    # On a tie the later step wins, as in orbax's BestN (a stable sort).
    if score > -math.inf and score >= best_score:
      best_step, best_score = step, score
  return best_step, best_score


def _best_step_of(manager: ocp.CheckpointManager, workdir: str) -> int:
  """The step of the best checkpoint, by the metric in workdir's config."""
  config_path = os.path.join(os.path.abspath(workdir), CONFIG_FILE)
  metric = ''
  if os.path.isfile(config_path):
    with open(config_path) as f:
      metric = json.load(f).get('best_checkpoint_metric') or ''
  if not metric:
    raise FileNotFoundError(
        f'step=best: {workdir} has no best checkpoint (its config.json sets '
        'no best_checkpoint_metric)')
  step, _ = best_checkpoint(manager, metric)
  if step is None:
    raise FileNotFoundError(f'step=best: no checkpoint in {workdir} was saved '
                            f'with eval metric {metric!r}')
  return step


def restore_params(workdir: str,
                   step: Union[int, str, None] = None) -> tuple[Any, int]:
  """Reads only the parameters of a training workdir's checkpoint.

  Args:
    workdir: a directory written by `vit_jax.main` (or its `checkpoints`
      subdirectory).
    step: which checkpoint: None for the latest, 'best' for the best by the
      run's `best_checkpoint_metric`, or a step number.

  Returns:
    (params as a nested dict of numpy arrays, the checkpoint's step).
  """
  directory = checkpoint_dir(workdir)
  if not os.path.isdir(directory) and os.path.basename(
      os.path.normpath(workdir)) == CHECKPOINT_DIR:
    directory = os.path.abspath(workdir)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'no checkpoints in {workdir} (looked for '
                            f'{directory})')
  manager = ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(create=False),
      item_handlers={name: ocp.StandardCheckpointHandler()
                     for name in _ITEMS})
  try:
    steps = manager.all_steps()
    if step is None:
      step = manager.latest_step()
    elif step == 'best':
      step = _best_step_of(manager, os.path.dirname(directory))
    if step is None or step not in steps:
      raise FileNotFoundError(
          f'no checkpoint for step {step} in {directory}; available: '
          f'{sorted(steps) or "none"}')
    # Onto one local device: the saving run's devices (other hosts, another
    # device count) need not exist here.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                          sharding=device),
        manager.item_metadata(step)['params'])
    restored = manager.restore(
        step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target)))
  finally:
    manager.close()
  params = jax.tree.map(np.asarray, jax.device_get(restored['params']))
  return params, step


def _json_config(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON values (tuples become lists)."""
  return json.loads(config.to_json())


def _shape_defining(config_json: dict) -> dict:
  """The parts of a config that define the parameters' shapes and meaning."""
  model = config_json.get('model') or {}
  defining = {f'model.{key}': value for key, value in model.items()
              if key not in _RESUMABLE_MODEL_KEYS}
  defining.update({key: config_json.get(key) for key in _SHAPE_KEYS})
  return defining


def check_workdir_config(workdir: str,
                         config: ml_collections.ConfigDict) -> None:
  """Refuses a workdir whose saved config describes a different model.

  Raises `IncompatibleWorkdirError` naming the differing keys; nothing in the
  workdir is touched.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = _shape_defining(json.load(f))
  current = _shape_defining(_json_config(config))
  differences = [f'{key}: {saved.get(key)!r} in the workdir, {value!r} now'
                 for key, value in sorted(current.items())
                 if saved.get(key) != value]
  if differences:
    raise IncompatibleWorkdirError(
        f'{workdir} holds a run of a different model ({"; ".join(differences)})'
        '; use a new --workdir to start a new run. Nothing was changed.')


def check_workdir_writable(workdir: str) -> None:
  """Raises a one-line error if `workdir` cannot be created or written.

  Leaves nothing behind: a probe directory is made and removed in the
  workdir, or in its nearest existing parent when the workdir does not exist
  yet. Permission bits do not tell (root ignores them; a read-only mount
  does not show in them).
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise NotADirectoryError(f'--workdir {workdir} is a file, not a '
                             'directory')
  existing = os.path.abspath(workdir)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise NotADirectoryError(f'--workdir {workdir}: {existing} is a file, '
                             'not a directory')
  try:
    os.rmdir(tempfile.mkdtemp(dir=existing, prefix='.write_probe'))
  except OSError as error:
    raise PermissionError(f'--workdir {workdir} is not writable: '
                          f'{error.strerror or error}') from None


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes the resolved config as `workdir/config.json` (process 0)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  with open(path + '.tmp', 'w') as f:
    json.dump(_json_config(config), f, indent=2, sort_keys=True)
    f.write('\n')
  os.replace(path + '.tmp', path)
