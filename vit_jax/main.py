"""Trains and evaluates a ViT.

    python -m vit_jax.main --config=configs/finetune.py:model=B/16,dataset=cifar10 \\
        --workdir=runs/b16_c10 --config.init_from=ViT-B_16.npz --config.lr=0.01

The config is locked: overriding a key it does not define is an error. The
workdir receives config.json, checkpoints/, tensorboard/, metrics.jsonl and
results.json; running the same command again resumes from the latest
checkpoint. Mistakes in the config or the inputs end the run with one line on
stderr and exit status 1 (`--traceback` shows the full trace). SIGTERM
saves a checkpoint at the current step and exits with status 75; rerunning
resumes (see docs/multihost.md). The command restarts itself once, at
start, with huge pages for malloc and a cache of XLA's per-step memory blocks
(vit_jax/host_memory.py; opt out with VIT_JAX_HUGE_PAGES=0 and
VIT_JAX_BLOCK_CACHE=0).
"""

import logging as std_logging
import os
import pathlib
import sys
from typing import Callable, NoReturn, Optional, TypeVar

from vit_jax import host_memory

if __name__ == '__main__':
  # Before anything heavy loads: this may restart the command once.
  host_memory.restart_for_step_memory()

# Quiet TensorFlow (the input pipeline's) start-up messages.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')
# `import tensorflow` also imports Keras (3.5 of its 10 s on 2 AVX2 cores)
# unless pointed at the separate tf_keras package, which it then skips when
# that is not installed. Training reads data with tf.data only.
os.environ.setdefault('TF_USE_LEGACY_KERAS', '1')

# The config files import their siblings as `configs.*`; configs/ is a
# directory of the checkout, not part of the installed package, so the
# checkout must be importable wherever the command runs from.
_REPO = pathlib.Path(__file__).resolve().parents[1]
if (_REPO / 'configs').is_dir() and str(_REPO) not in sys.path:
  sys.path.append(str(_REPO))

# pylint: disable=g-import-not-at-top
from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from vit_jax import parallel
# pylint: enable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file(
    'config', None,
    'Training config file, optionally with an argument: '
    'configs/finetune.py:model=B/16,dataset=cifar10.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None,
    'Directory for checkpoints, logs and results; rerunning resumes.')
_TRACEBACK = flags.DEFINE_bool(
    'traceback', False, 'Show full tracebacks instead of one-line errors.')

T = TypeVar('T')


def fail(message: str) -> NoReturn:
  """Ends the program with `error: message` on stderr and exit status 1.

  The message stays the last line: stderr is closed after it, because after
  a failed asynchronous save orbax's writer threads may still print
  tracebacks while the interpreter shuts down.
  """
  print(f'error: {message}', file=sys.stderr, flush=True)
  os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
  sys.exit(1)


def _lines(error: Exception) -> list[str]:
  """The non-empty lines of an error's message (at least one)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines or [repr(error)]


def _flag_error_line(error: Exception) -> str:
  """One line from a flag-parsing error, which may embed a traceback."""
  lines = _lines(error)
  if len(lines) == 1:
    return lines[0]
  # e.g. 'flag --config=x.py:foo=1: Error whilst parsing config file:' and
  # the embedded exception's last line.
  return f'{lines[0]} {lines[-1]}'


def _unknown_override_line(error: Exception, argv: list[str]) -> str:
  """Names the `--config.<key>` override that the config does not define."""
  # AttributeError(KeyError("'key'\nDid you mean ...")): unwrap to the text.
  while error.args and isinstance(error.args[0], Exception):
    error = error.args[0]
  text = str(error.args[0]) if error.args else str(error)
  key, _, hint = text.partition('\n')
  key = key.strip('\'"')
  overrides = [arg for arg in argv
               if arg.startswith('--config.') and key in
               arg.split('=', 1)[0].split('.')]
  if not overrides:  # Raised by the config file itself.
    return f'--config: {type(error).__name__}: {text}'
  hint = f' ({hint.strip()})' if hint else ''
  return f'{overrides[0]}: the config has no key {key!r}{hint}'


def parse_flags(argv: list[str]) -> list[str]:
  """Parses flags like absl, but reports mistakes as one line, no traceback.

  A misspelled `--config.<key>` override surfaces from ml_collections as an
  AttributeError/KeyError with a "did you mean" hint, which is kept.
  """
  try:
    remaining = flags.FLAGS(argv)
    if flags.FLAGS['config'].present:
      # config_flags reports an unreadable file on first attribute access.
      flags.FLAGS.config.keys()
    return remaining
  except flags.Error as error:
    fail(_flag_error_line(error))
  except (AttributeError, KeyError) as error:
    fail(_unknown_override_line(error, argv))
  except SyntaxError as error:
    fail(f'--config: syntax error in {error.filename} line {error.lineno}: '
         f'{error.msg}')
  except OSError as error:  # e.g. the config file does not exist.
    fail(f'--config: {_lines(error)[-1]}')


def quiet_library_logs() -> None:
  """Hides orbax's per-save INFO lines unless --verbosity is given.

  Also asyncio's "Task exception was never retrieved" at exit, which a
  failed asynchronous save (disk full) leaves after its one-line error.
  """
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
    std_logging.getLogger('asyncio').setLevel(std_logging.CRITICAL)


def user_errors() -> tuple[type[BaseException], ...]:
  """Exceptions that mean a wrong input, reported as one line."""
  # Imported here so that flag errors are reported before JAX loads; the
  # input pipeline loads TensorFlow only when it reads data (lazy_imports).
  # pylint: disable=g-import-not-at-top
  from vit_jax import train
  from vit_jax import train_checkpoints
  # pylint: enable=g-import-not-at-top
  return (ValueError, FileNotFoundError, NotADirectoryError, PermissionError,
          train.NonFiniteLossError, train_checkpoints.CheckpointWriteError)


def run_reporting_errors(job: Callable[[], T]) -> T:
  """Runs `job`; a user error ends the program with one line (`fail`).

  A preempted run (SIGTERM, checkpoint saved) ends with one line and exit
  status `preemption.EXIT_CODE` (75): not finished, rerun to resume.
  """
  quiet_library_logs()
  from vit_jax import preemption  # pylint: disable=g-import-not-at-top
  try:
    return job()
  except preemption.Preempted as stop:
    print(str(stop), file=sys.stderr, flush=True)
    sys.exit(preemption.EXIT_CODE)
  except user_errors() as error:
    if _TRACEBACK.value:
      raise
    fail(str(error))


def config_and_workdir() -> tuple[Optional[ml_collections.ConfigDict], str]:
  """The --config (None when not given) and the required --workdir."""
  if not _WORKDIR.value:
    fail('--workdir is required')
  return _CONFIG.value, _WORKDIR.value


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Starts the runtime, then trains in `workdir`; returns the results."""
  parallel.maybe_initialize_distributed(config)  # Before any device is used.
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  return train.train_and_evaluate(config, workdir)


def _summary(results: dict) -> str:
  accuracies = ', '.join(f'{key} {value:.4f}' for key, value in sorted(
      results['final_eval'].items()) if key.endswith('/accuracy'))
  return (f'done: step {results["final_step"]}, {accuracies}, '
          f'{results["wall_time_sec"]:.0f}s')


def main(argv: list[str]) -> None:
  """Trains with --config in --workdir, then prints a one-line summary."""
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}')
  config, workdir = config_and_workdir()
  if config is None:
    fail('--config is required, e.g. --config=configs/digits_pretrain.py')
  results = run_reporting_errors(lambda: run(config, workdir))
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:  # The console belongs to process 0.
    print(_summary(results), flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
