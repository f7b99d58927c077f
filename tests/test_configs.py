"""Every config in configs/ loads, and its model builds (shapes only)."""

import glob
import importlib
import os

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from configs import common
from configs import digits_pretrain
from configs import finetune
from configs import pretrain
from vit_jax import models
from vit_jax import optim
from vit_jax.datasets import presets

_CONFIG_DIR = os.path.join(os.path.dirname(__file__), os.pardir, 'configs')

# (module, arg) pairs: every dataset and model kind the recipes name.
CASES = [
    (common, 'model=Ti/16,dataset=cifar100'),
    (pretrain, 'model=L/16,dataset=imagenet2012'),
    (pretrain, 'model=R50+ViT-B_16,dataset=imagenet21k,loss=softmax_xent'),
    *[(finetune, f'model=B/32,dataset={name}')
      for name in ('cifar10', 'cifar100', 'imagenet2012', 'oxford_iiit_pet',
                   'oxford_flowers102')],
    (finetune, 'model=S/16,dataset=svhn_cropped,image_size=224'),
]


def _train_configs(module, arg) -> list[ml_collections.ConfigDict]:
  """The training configs a file defines (the demo holds several)."""
  config = module.get_config(arg)
  if 'model' in config:
    return [config]
  return [config[stage] for stage in config]


def _build_abstract(config: ml_collections.ConfigDict):
  preset = presets.PRESETS.get(config.dataset)
  num_classes = preset.num_classes if preset else 10
  channels = preset.channels if preset else 3
  size = config.image_size
  model = models.build_model(config.model, num_classes)
  images = jnp.zeros((1, size, size, channels), jnp.float32)
  return jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), images, train=False))


def _config_modules():
  """Every module in configs/ that defines get_config."""
  names = sorted(os.path.basename(path)[:-3]
                 for path in glob.glob(os.path.join(_CONFIG_DIR, '*.py')))
  modules = [importlib.import_module(f'configs.{name}') for name in names
             if name != '__init__']
  return [module for module in modules if hasattr(module, 'get_config')]


def _check_config(config: ml_collections.ConfigDict) -> None:
  """Locks it like `main`, builds the model and the optimizer."""
  config.lock()
  shapes = _build_abstract(config)
  assert models.count_params(shapes['params']) > 0
  preset = presets.PRESETS.get(config.dataset)
  num_examples = preset.num_train_examples if preset else 50_000
  durations = optim.resolve_durations(config, num_examples)
  assert 0 <= durations.warmup_steps < durations.total_steps
  optim.make_optimizer(config, optim.schedule_from_config(config, durations))


@pytest.mark.parametrize('module', _config_modules(),
                         ids=lambda module: module.__name__)
def test_every_config_file_loads_and_builds(module):
  for config in _train_configs(module, None):
    _check_config(config)


@pytest.mark.parametrize('module,arg', CASES,
                         ids=lambda x: getattr(x, '__name__', str(x)))
def test_config_args_load_and_build(module, arg):
  for config in _train_configs(module, arg):
    _check_config(config)


def test_digits_model_is_the_136k_parameter_vit():
  shapes = _build_abstract(digits_pretrain.get_config())
  assert models.count_params(shapes['params']) == 136_138


def test_paper_recipes():
  config = pretrain.get_config()
  assert (config.optimizer, config.lr, config.weight_decay) == ('adamw', 1e-3,
                                                                0.1)
  assert (config.batch_size, config.warmup_steps, config.schedule) == (
      4096, 10_000, 'linear')
  assert config.image_size == 224 and config.loss == 'sigmoid_xent'
  config = finetune.get_config('dataset=oxford_iiit_pet')
  assert (config.optimizer, config.momentum, config.batch_size) == ('sgd', 0.9,
                                                                    512)
  assert (config.grad_clip_norm, config.weight_decay) == (1.0, 0.0)
  assert config.image_size == 384 and config.total_steps == 500
  assert config.lr in finetune.LR_GRIDS['oxford_iiit_pet']
  assert finetune.get_config('dataset=imagenet2012').total_steps == 20_000
  assert finetune.get_config('dataset=cifar100').total_steps == 10_000


@pytest.mark.parametrize('arg,message', [
    ('modle=B/16', "unknown config arg 'modle'"),
    ('model', 'not of the form key=value'),
    ('image_size=big', 'expected int'),
])
def test_bad_config_args_are_errors(arg, message):
  with pytest.raises(ValueError, match=message):
    finetune.get_config(arg)


def test_unknown_model_is_an_error():
  with pytest.raises(ValueError, match='unknown model'):
    finetune.get_config('model=Q/16')


def test_configs_without_args_reject_any():
  with pytest.raises(ValueError, match="unknown config arg 'steps'"):
    digits_pretrain.get_config('steps=5')


def test_locked_config_rejects_unknown_keys():
  config = common.get_config()
  config.lock()
  with pytest.raises(AttributeError):
    config.lrr = 0.1
