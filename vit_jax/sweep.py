"""Hyperparameter sweeps: expand, run (or print), resume, tabulate, plot.

A sweep is a Python file in `experiments/` with a `get_sweep()` returning a
`Sweep`:

    from vit_jax import sweep

    def get_sweep():
      return sweep.Sweep(
          config='configs/digits_pretrain.py',
          axes=sweep.product(sweep.axis('lr', [3e-4, 1e-3]),
                             sweep.axis('total_steps', [250, 500])),
          fixed={'log_every': 50})

Run it with

    python -m vit_jax.sweep experiments/digits_lr_steps.py --workdir=runs/sweep \
        [--parallel=2] [--dry_run]

Each trial trains in `<workdir>/<name>` with a readable, stable name such as
`lr=0.001,total_steps=500`. A rerun skips finished trials, resumes interrupted
ones (main resumes from the trial's checkpoints) and retries failed ones; a
failed trial is recorded with its error and the sweep goes on. At the end the
sweep writes `results.csv`, `results.md` and PNG plots into `<workdir>`.
"""

import concurrent.futures
import csv
import dataclasses
import importlib.util
import itertools
import json
import math
import os
import shlex
import subprocess
import sys
import time
from typing import Any, Iterable, Optional, Sequence

from absl import app
from absl import flags

Trial = dict[str, Any]

STATUS_FILE = 'sweep_status.json'
LOG_FILE = 'sweep_log.txt'


def axis(key: str, values: Iterable[Any]) -> list[Trial]:
  """One swept hyperparameter: a trial per value of config key `key`."""
  values = list(values)
  if not values:
    raise ValueError(f'sweep axis {key!r} has no values')
  return [{key: value} for value in values]


def product(*axes: Sequence[Trial]) -> list[Trial]:
  """Every combination of the axes (the first one varies slowest)."""
  return [_merge(combo) for combo in itertools.product(*axes)]


def zip_axes(*axes: Sequence[Trial]) -> list[Trial]:
  """Axes taken in lockstep, e.g. (resolution, batch) pairs."""
  lengths = {len(a) for a in axes}
  if len(lengths) != 1:
    raise ValueError(f'zip_axes needs axes of equal length, got '
                     f'{[len(a) for a in axes]}')
  return [_merge(combo) for combo in zip(*axes)]


def _merge(parts: Iterable[Trial]) -> Trial:
  merged = {}
  for part in parts:
    clash = set(merged) & set(part)
    if clash:
      raise ValueError(f'sweep sets {sorted(clash)} twice in one trial')
    merged.update(part)
  return merged


@dataclasses.dataclass
class Sweep:
  """What a sweep file describes.

  Attributes:
    config: the base config, `configs/<file>.py[:arg]`, relative to the
      repository root (or absolute).
    axes: the trials' varying overrides (from `axis`, `product`,
      `zip_axes`).
    fixed: overrides shared by every trial.
    metric: the results key that ranks trials (higher is better).
  """
  config: str
  axes: list[Trial]
  fixed: dict[str, Any] = dataclasses.field(default_factory=dict)
  metric: str = 'best_eval_accuracy'


def format_value(value: Any) -> str:
  """A value as it appears in trial names and on the command line."""
  if isinstance(value, float):
    return f'{value:g}'
  if isinstance(value, (tuple, list)):
    return '(' + ','.join(format_value(v) for v in value) + ')'
  return str(value)


def trial_name(trial: Trial) -> str:
  """A readable, stable directory name: 'lr=0.01,total_steps=500'."""
  name = ','.join(f'{key}={format_value(value)}'
                  for key, value in trial.items())
  return name.replace('/', '_').replace(' ', '') or 'default'


def expand(spec: Sweep) -> list[tuple[str, Trial]]:
  """The (name, overrides) of every trial; names must be unique."""
  trials = [(trial_name(t), {**spec.fixed, **t}) for t in spec.axes]
  names = [name for name, _ in trials]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f'sweep has repeated trials: {", ".join(duplicates)}')
  return trials


def main_command(spec: Sweep, overrides: Trial, workdir: str,
                 python: str = 'python') -> list[str]:
  """The exact `python -m vit_jax.main` command of one trial.

  Paths stay as given (relative to the directory the sweep runs from), so a
  printed command can be submitted from there to a cluster scheduler.
  """
  command = [python, '-m', 'vit_jax.main', f'--config={spec.config}',
             f'--workdir={workdir}']
  command += [f'--config.{key}={format_value(value)}'
              for key, value in overrides.items()]
  return command


def load_sweep(path: str) -> Sweep:
  """Imports a sweep file and returns its `get_sweep()`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'sweep file {path} does not exist')
  module_spec = importlib.util.spec_from_file_location('sweep_file', path)
  module = importlib.util.module_from_spec(module_spec)
  # Sweep files may import their siblings (shared recipes in experiments/).
  sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
  try:
    module_spec.loader.exec_module(module)
  finally:
    sys.path.pop(0)
  if not hasattr(module, 'get_sweep'):
    raise ValueError(f'sweep file {path} defines no get_sweep()')
  return module.get_sweep()


def read_status(trial_dir: str) -> dict[str, Any]:
  """The trial's recorded status ({} before its first run)."""
  path = os.path.join(trial_dir, STATUS_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def is_finished(trial_dir: str) -> bool:
  return (read_status(trial_dir).get('status') == 'done' and
          os.path.exists(os.path.join(trial_dir, 'results.json')))


def _write_status(trial_dir: str, **status) -> None:
  path = os.path.join(trial_dir, STATUS_FILE)
  with open(path + '.tmp', 'w') as f:
    json.dump(status, f, indent=2)
  os.replace(path + '.tmp', path)


def _last_lines(path: str, count: int = 5) -> str:
  with open(path, errors='replace') as f:
    lines = [line.rstrip() for line in f if line.strip()]
  return '\n'.join(lines[-count:])


def run_trial(name: str, command: list[str], trial_dir: str) -> dict[str, Any]:
  """Runs one trial to completion; records and returns its status."""
  os.makedirs(trial_dir, exist_ok=True)
  _write_status(trial_dir, status='running', command=shlex.join(command))
  log_path = os.path.join(trial_dir, LOG_FILE)
  start = time.time()
  with open(log_path, 'a') as log:
    returncode = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
  status = {'status': 'done' if returncode == 0 else 'failed',
            'returncode': returncode, 'seconds': time.time() - start,
            'command': shlex.join(command)}
  if returncode:
    status['error'] = _last_lines(log_path)
  _write_status(trial_dir, **status)
  print(f'[sweep] {name}: {status["status"]} in {status["seconds"]:.0f}s'
        + (f' ({status["error"].splitlines()[-1]})' if returncode else ''),
        flush=True)
  return status


def run_sweep(spec: Sweep, workdir: str, *,
              parallel: int = 1) -> list[dict[str, Any]]:
  """Runs every unfinished trial (N at a time), then writes the results."""
  os.makedirs(workdir, exist_ok=True)
  pending = []
  for name, overrides in expand(spec):
    trial_dir = os.path.join(workdir, name)
    if is_finished(trial_dir):
      print(f'[sweep] {name}: finished earlier, skipped', flush=True)
      continue
    command = main_command(spec, overrides, trial_dir, python=sys.executable)
    pending.append((name, command, trial_dir))
  with concurrent.futures.ThreadPoolExecutor(max(1, parallel)) as pool:
    list(pool.map(lambda job: run_trial(*job), pending))
  rows = collect_results(spec, workdir)
  write_tables(rows, spec, workdir)
  write_plots(rows, spec, workdir)
  return rows


def _final_train_loss(trial_dir: str) -> Optional[float]:
  path = os.path.join(trial_dir, 'metrics.jsonl')
  loss = None
  if os.path.exists(path):
    for record in read_metrics(path):
      loss = record.get('train/loss', loss)
  return loss


def read_metrics(path: str) -> list[dict[str, Any]]:
  """metrics.jsonl records; a line cut short by a crash is skipped."""
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def _first_value(mapping: dict[str, Any]) -> Optional[float]:
  """The eval accuracy of the first eval split in a results mapping."""
  accuracies = [v for k, v in sorted(mapping.items())
                if k.endswith('/accuracy')]
  return accuracies[0] if accuracies else None


def collect_results(spec: Sweep, workdir: str) -> list[dict[str, Any]]:
  """One row per trial: hyperparameters, status and final metrics."""
  rows = []
  for name, overrides in expand(spec):
    trial_dir = os.path.join(workdir, name)
    row = {'trial': name, **{k: overrides[k] for k in _swept_keys(spec)}}
    row['status'] = read_status(trial_dir).get('status', 'pending')
    results_path = os.path.join(trial_dir, 'results.json')
    if os.path.exists(results_path) and row['status'] == 'done':
      with open(results_path) as f:
        results = json.load(f)
      row['best_eval_accuracy'] = _first_value(results['best_eval_accuracy'])
      row['final_eval_accuracy'] = _first_value(results['final_eval'])
      row['final_train_loss'] = _final_train_loss(trial_dir)
      row['wall_time_sec'] = results['wall_time_sec']
      row['img_per_sec'] = results['train_img_per_sec']
    rows.append(row)
  metric = spec.metric
  rows.sort(key=lambda r: -(r.get(metric) if r.get(metric) is not None
                            else -math.inf))
  return rows


def _swept_keys(spec: Sweep) -> list[str]:
  keys = []
  for trial in spec.axes:
    keys += [k for k in trial if k not in keys]
  return keys


RESULT_COLUMNS = ('status', 'best_eval_accuracy', 'final_eval_accuracy',
                  'final_train_loss', 'wall_time_sec', 'img_per_sec')


def _cell(value: Any) -> str:
  if value is None:
    return ''
  if isinstance(value, float):
    return f'{value:.4g}'
  return format_value(value)


def write_tables(rows: list[dict[str, Any]], spec: Sweep, workdir: str) -> None:
  """results.csv and results.md, best trial first."""
  columns = ['trial', *_swept_keys(spec), *RESULT_COLUMNS]
  with open(os.path.join(workdir, 'results.csv'), 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for row in rows:
      writer.writerow([_cell(row.get(c)) for c in columns])
  lines = ['| ' + ' | '.join(columns) + ' |',
           '|' + '---|' * len(columns)]
  lines += ['| ' + ' | '.join(_cell(row.get(c)) for c in columns) + ' |'
            for row in rows]
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines), flush=True)


def write_plots(rows: list[dict[str, Any]], spec: Sweep, workdir: str) -> None:
  """Accuracy vs each swept hyperparameter, and all training curves."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  plot_dir = os.path.join(workdir, 'plots')
  os.makedirs(plot_dir, exist_ok=True)
  done = [r for r in rows if r.get(spec.metric) is not None]
  for key in _swept_keys(spec):
    fig, ax = plt.subplots(figsize=(5, 3.5))
    values = [r[key] for r in done]
    numeric = all(isinstance(v, (int, float)) for v in values)
    xs = values if numeric else [format_value(v) for v in values]
    ax.scatter(xs, [r[spec.metric] for r in done])
    if numeric and values and min(values) > 0 and max(values) / min(
        values) >= 10:
      ax.set_xscale('log')
    ax.set_xlabel(key)
    ax.set_ylabel(spec.metric)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(plot_dir, f'{spec.metric}_vs_{key}.png'))
    plt.close(fig)
  fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
  for row in rows:
    path = os.path.join(workdir, row['trial'], 'metrics.jsonl')
    if not os.path.exists(path):
      continue
    records = read_metrics(path)
    train = [(r['step'], r['train/loss']) for r in records if 'train/loss' in r]
    evals = [(r['step'], _first_value(r)) for r in records
             if _first_value(r) is not None and 'train/loss' not in r]
    if train:
      loss_ax.plot(*zip(*train), label=row['trial'])
    if evals:
      acc_ax.plot(*zip(*evals), marker='o', label=row['trial'])
  loss_ax.set(xlabel='step', ylabel='train loss', title='training loss')
  acc_ax.set(xlabel='step', ylabel='eval accuracy', title='eval accuracy')
  for ax in (loss_ax, acc_ax):
    ax.grid(alpha=0.3)
  if rows:
    acc_ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(os.path.join(plot_dir, 'training_curves.png'))
  plt.close(fig)


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags (defined only when run as a program, since
  sweep files import this module as `vit_jax.sweep` while it runs as
  `__main__`)."""
  flags.DEFINE_string('workdir', None, 'Directory of the sweep; a '
                      'subdirectory per trial.')
  flags.DEFINE_integer('parallel', 1, 'Trials to run at once.')
  flags.DEFINE_bool('dry_run', False, 'Print the trials and their main '
                    'commands instead of running them.')


def main(argv: Sequence[str]) -> None:
  if len(argv) != 2:
    raise app.UsageError('usage: python -m vit_jax.sweep experiments/FILE.py '
                         '--workdir=DIR [--parallel=N] [--dry_run]')
  try:
    spec = load_sweep(argv[1])
    trials = expand(spec)
  except (FileNotFoundError, ValueError) as error:
    sys.exit(f'error: {error}')
  workdir = FLAGS.workdir or os.path.join(
      'runs', os.path.splitext(os.path.basename(argv[1]))[0])
  if FLAGS.dry_run:
    print(f'{len(trials)} trials in {workdir}:')
    for name, overrides in trials:
      print(shlex.join(main_command(spec, overrides,
                                    os.path.join(workdir, name))))
    return
  run_sweep(spec, workdir, parallel=FLAGS.parallel)


if __name__ == '__main__':
  define_flags()
  app.run(main)
