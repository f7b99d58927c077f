"""Sweeps: expansion and names, and a tiny real sweep on the built-in digits."""

import csv
import json
import os
import subprocess
import sys

import pytest

from vit_jax import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_product_varies_the_first_axis_slowest():
  trials = sweep.product(sweep.axis('lr', [0.1, 0.01]),
                         sweep.axis('total_steps', [10, 20]))
  assert trials == [{'lr': 0.1, 'total_steps': 10},
                    {'lr': 0.1, 'total_steps': 20},
                    {'lr': 0.01, 'total_steps': 10},
                    {'lr': 0.01, 'total_steps': 20}]


def test_zip_pairs_values_and_products_with_seeds():
  pairs = sweep.zip_axes(sweep.axis('image_size', [224, 384]),
                         sweep.axis('batch_size', [512, 256]))
  trials = sweep.product(pairs, sweep.axis('seed', [0, 1]))
  assert len(trials) == 4
  assert trials[1] == {'image_size': 224, 'batch_size': 512, 'seed': 1}
  assert trials[3] == {'image_size': 384, 'batch_size': 256, 'seed': 1}


def test_zip_of_unequal_axes_is_an_error():
  with pytest.raises(ValueError, match='equal length'):
    sweep.zip_axes(sweep.axis('a', [1, 2]), sweep.axis('b', [1]))


def test_same_key_twice_in_a_trial_is_an_error():
  with pytest.raises(ValueError, match=r"sets \['lr'\] twice"):
    sweep.product(sweep.axis('lr', [1]), sweep.axis('lr', [2]))


def test_names_are_readable_stable_and_unique():
  spec = sweep.Sweep(config='c.py', axes=sweep.product(
      sweep.axis('lr', [0.01, 3e-4]), sweep.axis('model.patch_size', [(4, 4)])),
                     fixed={'log_every': 5})
  names = [name for name, _ in sweep.expand(spec)]
  assert names == ['lr=0.01,model.patch_size=(4,4)',
                   'lr=0.0003,model.patch_size=(4,4)']
  _, overrides = sweep.expand(spec)[0]
  assert overrides == {'log_every': 5, 'lr': 0.01, 'model.patch_size': (4, 4)}
  repeated = sweep.Sweep(config='c.py', axes=sweep.axis('lr', [0.1, 0.1]))
  with pytest.raises(ValueError, match='repeated trials: lr=0.1'):
    sweep.expand(repeated)


def test_main_command_is_the_exact_cli():
  spec = sweep.Sweep(config='configs/finetune.py:model=B/16,dataset=cifar10',
                     axes=[{'lr': 0.003}])
  command = sweep.main_command(spec, {'lr': 0.003}, 'runs/x/lr=0.003')
  assert command == [
      'python', '-m', 'vit_jax.main',
      '--config=configs/finetune.py:model=B/16,dataset=cifar10',
      '--workdir=runs/x/lr=0.003', '--config.lr=0.003']


def test_shipped_sweeps_expand():
  experiments = os.path.join(REPO, 'experiments')
  files = sorted(f for f in os.listdir(experiments)
                 if f.endswith('.py') and f != 'paper_finetune.py')
  assert 'digits_lr_steps.py' in files and 'finetune_cifar10.py' in files
  for name in files:
    trials = sweep.expand(sweep.load_sweep(os.path.join(experiments, name)))
    assert len(trials) >= 4, name


TINY_SWEEP = '''
from vit_jax import sweep

def get_sweep():
  return sweep.Sweep(
      config={config!r},
      axes=sweep.axis('total_steps', [6, 8, -3]),
      fixed={{'batch_size': 32, 'warmup_steps': 2, 'log_every': 2,
              'eval_every': 0, 'checkpoint_every': 0}})
'''


def run_sweep_cli(sweep_file, workdir):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.run(
      [sys.executable, '-m', 'vit_jax.sweep', sweep_file,
       f'--workdir={workdir}'], cwd=REPO, env=env, capture_output=True,
      text=True, timeout=900)


@pytest.mark.slow
def test_tiny_digits_sweep_end_to_end(tmp_path):
  sweep_file = tmp_path / 'tiny.py'
  sweep_file.write_text(TINY_SWEEP.format(
      config=os.path.join(REPO, 'configs/digits_pretrain.py')))
  workdir = tmp_path / 'sweep'
  first = run_sweep_cli(str(sweep_file), workdir)
  assert first.returncode == 0, first.stdout + first.stderr

  # The failing trial is recorded with its error; the others finished.
  failed = sweep.read_status(str(workdir / 'total_steps=-3'))
  assert failed['status'] == 'failed' and failed['error']
  with open(workdir / 'results.csv') as f:
    rows = {row['trial']: row for row in csv.DictReader(f)}
  assert set(rows) == {'total_steps=6', 'total_steps=8', 'total_steps=-3'}
  for name in ('total_steps=6', 'total_steps=8'):
    with open(workdir / name / 'results.json') as f:
      results = json.load(f)
    expected = results['best_eval_accuracy']['test/accuracy']
    assert rows[name]['status'] == 'done'
    assert float(rows[name]['best_eval_accuracy']) == pytest.approx(
        expected, abs=1e-4)
  assert rows['total_steps=-3']['best_eval_accuracy'] == ''
  assert (workdir / 'results.md').read_text().count('\n') == 5
  for png in ('best_eval_accuracy_vs_total_steps.png', 'training_curves.png'):
    assert (workdir / 'plots' / png).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

  # A half-finished sweep: only the unfinished trials run again.
  os.remove(workdir / 'total_steps=8' / sweep.STATUS_FILE)
  second = run_sweep_cli(str(sweep_file), workdir)
  assert second.returncode == 0, second.stdout + second.stderr
  assert 'total_steps=6: finished earlier, skipped' in second.stdout
  assert 'total_steps=8: done' in second.stdout
  assert 'total_steps=-3: failed' in second.stdout
