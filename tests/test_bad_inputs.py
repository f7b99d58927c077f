"""A catalogue of bad inputs through the real entry points.

Every case runs the program as a user would (a subprocess), and must exit
non-zero with one line on stderr that names the problem: no traceback, and
the existing workdir's checkpoints and results untouched.
"""

import concurrent.futures
import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(REPO, 'configs', 'digits_pretrain.py')
# A few quick steps of the demo model; every case starts from these flags.
QUICK = ['--config.total_steps=4', '--config.batch_size=32',
         '--config.warmup_steps=1', '--config.log_every=2',
         '--config.eval_every=0', '--config.checkpoint_every=2']
# The error of a run refused for resuming a workdir of another model.
REFUSED_RESUME = 'holds a run of a different model'


@dataclasses.dataclass
class Case:
  """One bad input: the command's arguments and the text its error holds.

  `{workdir}` is a copy of a trained run, or with `new_workdir` a path that
  does not exist (and must not exist afterwards): a new run whose config
  differs from the trained one in the dataset or the model would be refused
  by the resume check before reaching the check the case is about.
  """
  name: str
  args: list[str]
  expected: str
  module: str = 'vit_jax.main'
  env: dict[str, str] = dataclasses.field(default_factory=dict)
  new_workdir: bool = False


def run_program(module, args, env, tfds_dir):
  environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2',
                     TFDS_DATA_DIR=tfds_dir, **env)
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO,
                        env=environment, capture_output=True, text=True,
                        timeout=600)


def digest(directory):
  """A hash of every file's path and bytes below `directory` (None if it
  does not exist)."""
  if not os.path.exists(directory):
    return None
  hasher = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(directory)):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      hasher.update(os.path.relpath(path, directory).encode())
      with open(path, 'rb') as f:
        hasher.update(f.read())
  return hasher.hexdigest()


@pytest.fixture(scope='module', name='env')
def fixture_env(tmp_path_factory):
  """A trained workdir plus the bad files the cases point at."""
  root = tmp_path_factory.mktemp('bad_inputs')
  tfds_dir = str(root / 'tfds')
  workdir = str(root / 'trained')
  done = run_program('vit_jax.main', [f'--config={DIGITS}',
                                      f'--workdir={workdir}', *QUICK], {},
                     tfds_dir)
  assert done.returncode == 0, done.stderr
  files = {}
  files['syntax'] = root / 'syntax_error.py'
  files['syntax'].write_text('def get_config(:\n  pass\n')
  files['text'] = root / 'notes.txt'
  files['text'].write_text('not a checkpoint\n')
  files['truncated'] = root / 'truncated.npz'
  np.savez(files['truncated'], a=np.zeros((64, 64), np.float32))
  data = files['truncated'].read_bytes()
  files['truncated'].write_bytes(data[:len(data) // 2])
  files['pickled'] = root / 'pickled.npz'
  np.savez(files['pickled'], obj=np.array([{'a': 1}], dtype=object))
  files['a_file'] = root / 'a_file'
  files['a_file'].write_text('')
  files['empty_folder'] = root / 'empty_folder'
  (files['empty_folder'] / 'train').mkdir(parents=True)
  (files['empty_folder'] / 'test').mkdir()
  files['one_class'] = root / 'one_class'
  files['corrupt'] = root / 'corrupt'
  files['two_class'] = root / 'two_class'
  rng = np.random.default_rng(0)
  for split in ('train', 'test'):
    (files['one_class'] / split / 'cat').mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), np.uint8)).save(
        files['one_class'] / split / 'cat' / 'a.png')
    for label in ('cat', 'dog'):
      (files['two_class'] / split / label).mkdir(parents=True)
      for index in range(16):  # Enough for one batch of 32 over two classes.
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), np.uint8)).save(
            files['two_class'] / split / label / f'{index}.png')
      folder = files['corrupt'] / split / label
      folder.mkdir(parents=True)
      (folder / 'broken.jpg').write_bytes(b'\xff\xd8 not really a jpeg')
  return {'root': root, 'tfds_dir': tfds_dir, 'workdir': workdir,
          'files': {k: str(v) for k, v in files.items()}}


def catalogue(env):
  """The cases; `{workdir}` runs against a copy of the trained workdir."""
  f = env['files']
  main = lambda *extra: [f'--config={DIGITS}', '--workdir={workdir}', *QUICK,  # pylint: disable=g-long-lambda
                         *extra]
  finetune = lambda source: main('--config.image_size=16',  # pylint: disable=g-long-lambda
                                 f'--config.init_from={source}')
  new = dict(new_workdir=True)
  return [
      Case('config file missing',
           ['--config=configs/no_such_config.py', '--workdir={workdir}'],
           'no_such_config.py'),
      Case('config syntax error',
           [f'--config={f["syntax"]}', '--workdir={workdir}'],
           'syntax error'),
      Case('unknown config key', main('--config.learning_rate=0.1'),
           "no key 'learning_rate'"),
      Case('wrong type', main('--config.batch_size=many'), 'batch_size'),
      Case('negative steps', main('--config.total_steps=-5'), 'total_steps'),
      Case('zero steps', main('--config.total_steps=0'), 'total_steps'),
      Case('batch not divisible by devices', main('--config.batch_size=12'),
           '12', env={'XLA_FLAGS':
                      '--xla_force_host_platform_device_count=8'}),
      Case('batch larger than the dataset', main('--config.batch_size=4096'),
           '4096'),
      Case('unknown model name',
           ['--config=configs/finetune.py:model=Q/16,dataset=digits',
            '--workdir={workdir}'], "unknown model 'Q/16'"),
      Case('unknown config arg',
           ['--config=configs/finetune.py:modle=B/16',
            '--workdir={workdir}'], "unknown config arg 'modle'"),
      Case('unknown dataset', main('--config.dataset=no_such_dataset'),
           "unknown dataset 'no_such_dataset'", **new),
      Case('image size not divisible by patch',
           main('--config.image_size=9'),
           'image_size=9 does not divide into patches of model.patch_size'),
      Case('tfds data missing offline', main('--config.dataset=cifar10'),
           'cifar10', **new),
      Case('image folder empty',
           main(f'--config.dataset=folder:{f["empty_folder"]}'),
           f['empty_folder'], **new),
      Case('image folder with one class',
           main(f'--config.dataset=folder:{f["one_class"]}'),
           'needs at least 2 class', **new),
      Case('image folder of corrupt images',
           main(f'--config.dataset=folder:{f["corrupt"]}'), 'broken.jpg',
           **new),
      Case('init_from missing', finetune('/no/such/ViT-B_16.npz'),
           '/no/such/ViT-B_16.npz', **new),
      Case('init_from not a checkpoint', finetune(f['text']), f['text'], **new),
      Case('init_from truncated npz', finetune(f['truncated']),
           f['truncated'], **new),
      Case('init_from npz with pickled objects', finetune(f['pickled']),
           'refusing to unpickle', **new),
      Case('init_from shape mismatch',
           main('--config.model.hidden_size=32',
                f'--config.init_from={env["workdir"]}'),
           'vs model', **new),
      Case('wrong class count without head reset',
           main('--config.init_reset_head=False',
                f'--config.dataset=folder:{f["two_class"]}',
                f'--config.init_from={env["workdir"]}'),
           'init_reset_head=False', **new),
      Case('best checkpoint metric not an eval metric',
           main('--config.best_checkpoint_metric=test/acc'),
           "best_checkpoint_metric='test/acc' is not an eval metric"),
      Case('init_from_step not a step', main('--config.init_from_step=last'),
           "init_from_step='last'"),
      Case('export of the best step of a run that kept none',
           ['--checkpoint={workdir}', '--format=npz', '--out=/tmp/x.npz',
            '--step=best'], 'sets no best_checkpoint_metric',
           module='vit_jax.export'),
      Case('workdir is a file',
           [f'--config={DIGITS}', f'--workdir={f["a_file"]}', *QUICK],
           f['a_file']),
      Case('workdir not writable',
           [f'--config={DIGITS}', '--workdir=/sys/vit_jax_run', *QUICK],
           '/sys/vit_jax_run'),
      Case('resume with a different model',
           main('--config.model.num_layers=2'),
           f"{REFUSED_RESUME} (model.num_layers: 4 in the workdir, 2 now)"),
      Case('missing workdir flag', [f'--config={DIGITS}'], '--workdir'),
      Case('export of a missing checkpoint',
           ['--checkpoint=/no/such/run', '--format=npz', '--out=/tmp/x.npz'],
           '/no/such/run', module='vit_jax.export'),
      Case('export to an unknown format',
           ['--checkpoint={workdir}', '--format=onnx', '--out=/tmp/x'],
           'onnx', module='vit_jax.export'),
      Case('predict on a missing image',
           ['--checkpoint={workdir}', '--images=/no/such/image.png'],
           '/no/such/image.png', module='vit_jax.predict'),
  ]


def run_case(case, env):
  """Runs `case` against its own copy of the trained workdir."""
  workdir = os.path.join(str(env['root']), 'case_' + case.name.replace(
      ' ', '_'))
  if not case.new_workdir:
    shutil.copytree(env['workdir'], workdir)
  before = digest(workdir)
  args = [a.replace('{workdir}', workdir) for a in case.args]
  result = run_program(case.module, args, case.env, env['tfds_dir'])
  return result, before, digest(workdir)


def test_catalogue_has_at_least_25_distinct_cases():
  names = ('syntax', 'text', 'truncated', 'pickled', 'a_file', 'empty_folder',
           'one_class', 'corrupt', 'two_class')
  fake_env = {'workdir': '/w', 'files': {name: f'/{name}' for name in names}}
  cases = catalogue(fake_env)
  assert len(cases) >= 25
  assert len({case.name for case in cases}) == len(cases)


@pytest.mark.slow
def test_every_bad_input_fails_cleanly_and_loses_nothing(env):
  cases = catalogue(env)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    outcomes = list(pool.map(lambda c: run_case(c, env), cases))
  problems, report = [], []
  for case, (result, before, after) in zip(cases, outcomes):
    lines = result.stderr.strip().splitlines()
    last = lines[-1] if lines else ''
    report.append(f'{case.name}: {last}')
    if result.returncode == 0:
      problems.append(f'{case.name}: exited 0')
    if 'Traceback' in result.stderr:
      problems.append(f'{case.name}: traceback\n{result.stderr[-2000:]}')
    if case.expected not in last:
      problems.append(f'{case.name}: {case.expected!r} not in {last!r}')
    if REFUSED_RESUME in last and REFUSED_RESUME not in case.expected:
      problems.append(f'{case.name}: stopped by the resume check instead')
    if before != after:
      problems.append(f'{case.name}: the workdir changed')
  print('\n'.join(report))
  assert not problems, '\n'.join(problems)
