"""Defaults shared by every training config, and the `arg` string parser.

A config file is `get_config(arg)`; `arg` is what follows the ':' in
`--config=configs/finetune.py:model=B/16,dataset=cifar10`. `parse_arg` turns
it into values typed like the defaults and rejects unknown keys.

Every key a run reads is defined here, so with the config locked (as
`vit_jax.main` does) a misspelled `--config.<key>` is an error. Durations are
`*_steps` or `*_epochs` (one of the two), converted with the dataset size.
"""

from typing import Any, Optional

import ml_collections
from ml_collections import config_dict

from vit_jax import models

_TRUE = ('1', 'true', 'yes', 'on')
_FALSE = ('0', 'false', 'no', 'off')


def _convert(key: str, text: str, default: Any) -> Any:
  """Parses `text` as the type of `default` (str when the default is None)."""
  if isinstance(default, bool):
    if text.lower() not in _TRUE + _FALSE:
      raise ValueError(f'config arg {key}={text!r}: expected a bool')
    return text.lower() in _TRUE
  if isinstance(default, (int, float)):
    try:
      return type(default)(text)
    except ValueError:
      raise ValueError(f'config arg {key}={text!r}: expected '
                       f'{type(default).__name__}') from None
  return text


def parse_arg(arg: Optional[str], **defaults) -> ml_collections.ConfigDict:
  """Parses 'key=value,key=value' against `defaults`.

  Keys must be among `defaults`; values are converted to the default's type.
  Model names contain '/', which is fine; values may not contain ','.

  Raises:
    ValueError: for an unknown key or a malformed or mistyped value.
  """
  values = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, text = item.partition('=')
    key = key.strip()
    if not sep:
      raise ValueError(f'config arg {item!r} is not of the form key=value')
    if key not in defaults:
      known = ', '.join(sorted(defaults)) or 'none'
      raise ValueError(f'unknown config arg {key!r}; known: {known}')
    values[key] = _convert(key, text.strip(), defaults[key])
  return ml_collections.ConfigDict(values)


def model_config(variant: str, **overrides) -> ml_collections.ConfigDict:
  """The registry's config of model `variant` with some attributes changed."""
  config = models.get_model_config(variant)
  for key, value in overrides.items():
    if key not in config:
      raise ValueError(f'unknown model config key {key!r}')
    config[key] = value
  return config


def _data(config: ml_collections.ConfigDict, dataset: str) -> None:
  """Keys read by `vit_jax.input_pipeline`."""
  config.dataset = dataset  # A preset, a tfds name, or 'folder:/path'.
  config.data_dir = config_dict.placeholder(str)  # None: $TFDS_DATA_DIR.
  config.train_split = config_dict.placeholder(str)  # None: the preset's.
  config.eval_splits = config_dict.placeholder(str)  # None: the preset's.
  config.image_size = 224
  config.pp_train = ''  # '' : the preset's preprocessing.
  config.pp_eval = ''
  config.label_smoothing = 0.0  # Applied to the labels by the pipeline.
  config.mixup_alpha = 0.0
  config.shuffle_buffer = 50_000
  config.cache = False
  config.prefetch = 2


def _schedule(config: ml_collections.ConfigDict) -> None:
  """Length, learning rate and optimizer (see `vit_jax.optim`)."""
  config.batch_size = 512  # Global, across all devices and hosts.
  config.eval_batch_size = config_dict.placeholder(int)  # None: batch_size.
  config.accum_steps = 1  # Micro-batches per step (same result, less memory).
  config.total_steps = config_dict.placeholder(int)
  config.total_epochs = config_dict.placeholder(float)
  config.warmup_steps = config_dict.placeholder(int)
  config.warmup_epochs = config_dict.placeholder(float)
  config.lr = 0.01
  config.schedule = 'cosine'  # 'cosine', 'linear' or 'constant' after warmup.
  config.end_lr = 0.0  # The floor the decay ends at.
  config.optimizer = 'sgd'  # 'sgd', 'adam' or 'adamw'.
  config.momentum = 0.9  # SGD only.
  config.momentum_dtype = 'bfloat16'  # SGD trace / Adam first moment.
  config.b1 = 0.9
  config.b2 = 0.999
  config.eps = 1e-8
  config.weight_decay = 0.0  # Decoupled, kernels only, times the lr.
  config.grad_clip_norm = 1.0  # Global norm; 0 turns clipping off.
  config.loss = 'softmax_xent'  # Or 'sigmoid_xent'.


def _run(config: ml_collections.ConfigDict) -> None:
  """Seeds, fine-tuning source, cadences and placement."""
  config.seed = 0  # Parameter init, dropout and data order.
  # Fine-tune from an official .npz, a HF directory or a training workdir.
  config.init_from = ''
  # With a training workdir as init_from: '' (latest), a step, or 'best'.
  config.init_from_step = ''
  config.init_posemb_method = 'bilinear'  # Or 'bicubic'.
  # Start from a zero head even when the class count matches (official).
  config.init_reset_head = True
  config.log_every = 50
  config.eval_every = 1000  # 0: only at the end.
  config.checkpoint_every = 1000  # 0: only at the end.
  config.keep_checkpoints = 3
  # An eval metric ('test/accuracy', 'validation/loss', ...): also keep the
  # checkpoint with its best value (accuracy highest, loss lowest), saved at
  # the eval that reached it. '' keeps only the latest. Read it back with
  # --step=best (export, predict) or init_from_step='best'.
  config.best_checkpoint_metric = ''
  config.sharding_rule = 'replicate'  # How params and optimizer state shard.
  config.multihost = ml_collections.ConfigDict({
      'initialize': False,  # Call jax.distributed.initialize at start-up.
      'coordinator_address': config_dict.placeholder(str),
      'num_processes': config_dict.placeholder(int),
      'process_id': config_dict.placeholder(int),
  })


def base_config(model: str = 'B/16',
                dataset: str = 'cifar10') -> ml_collections.ConfigDict:
  """Every key with its default; `model` is a registry name or variant."""
  config = ml_collections.ConfigDict()
  config.model = models.get_model_config(model)
  _data(config, dataset)
  _schedule(config)
  _run(config)
  return config


def get_config(arg: Optional[str] = None) -> ml_collections.ConfigDict:
  """The defaults alone; `arg` may set `model` and `dataset`."""
  args = parse_arg(arg, model='B/16', dataset='cifar10')
  config = base_config(args.model, args.dataset)
  config.total_steps = 10_000
  return config
