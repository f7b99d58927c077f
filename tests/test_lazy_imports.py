"""TensorFlow loads only when data is read (vit_jax.lazy_imports)."""

import importlib.util
import os
import subprocess
import sys

import pytest

from vit_jax import lazy_imports

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_lazy_module_imports_on_first_attribute_read():
  sys.modules.pop('colorsys', None)
  colorsys = lazy_imports.LazyModule('colorsys')
  # Asking whether it is installed (as etils does) must not load it.
  assert importlib.util.find_spec('colorsys') is not None
  assert 'colorsys' not in sys.modules
  assert colorsys.rgb_to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)
  assert 'colorsys' in sys.modules


def test_lazy_module_of_a_missing_module_fails_on_use():
  missing = lazy_imports.LazyModule('no_such_module_xyz')
  with pytest.raises(ModuleNotFoundError) as error:
    missing.anything  # pylint: disable=pointless-statement
  assert error.value.name == 'no_such_module_xyz'


def _modules_after(code: str) -> str:
  """stdout of `code` in a fresh interpreter run from the repository."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  done = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  return done.stdout.strip()


def test_a_config_error_is_reported_before_tensorflow_loads(tmp_path):
  # The job's own entry point, stopped by a config check (exit status 1).
  code = f"""
import runpy, sys
sys.argv = ['main', '--config=configs/digits_pretrain.py',
            '--config.total_steps=0', '--workdir={tmp_path}']
try:
  runpy.run_module('vit_jax.main', run_name='__main__')
except SystemExit as stop:
  print(stop.code, 'tensorflow' in sys.modules)
"""
  assert _modules_after(code) == '1 False'


def test_the_pipeline_modules_import_without_tensorflow_and_use_it():
  code = """
import sys
from vit_jax import input_pipeline, preprocess, train
before = 'tensorflow' in sys.modules
fn = preprocess.parse('value_range(-1, 1)')
out = fn({'image': input_pipeline.tf.zeros((2, 2, 3), 'uint8')})
print(before, 'tensorflow' in sys.modules, float(out['image'][0, 0, 0]))
"""
  assert _modules_after(code) == 'False True -1.0'


def test_the_training_command_loads_tensorflow_without_keras():
  # TF_USE_LEGACY_KERAS (set by vit_jax.main): 3.5 s less at every start.
  code = """
import os, sys
os.environ.pop('TF_USE_LEGACY_KERAS', None)  # Inherited from this process.
from vit_jax import input_pipeline, main
input_pipeline.tf.data.Dataset.range(3).batch(2)
print('tensorflow' in sys.modules, 'keras' in sys.modules)
"""
  assert _modules_after(code) == 'True False'


def test_the_logger_does_not_import_torch(tmp_path):
  # tensorboardX would: 3-5 s added to every run's start when torch is there.
  code = f"""
import sys
from vit_jax import metrics
metrics.MetricLogger({str(tmp_path)!r}, total_steps=1, batch_size=1).close()
print('torch' in sys.modules)
"""
  assert _modules_after(code) == 'False'
