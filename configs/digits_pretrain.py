"""Pretrains a 136k-parameter ViT on the built-in digits at 8x8 (offline demo).

    python -m vit_jax.main --config=configs/digits_pretrain.py --workdir=runs/digits_pt

The digits ship with scikit-learn (1,437 train / 360 test 8x8 scans), so this
runs anywhere. Patch 2 gives a 4x4 grid (16 patches + class token). Measured
here: 2,000 steps reach 91.7% test accuracy in about 2.5 minutes on 2 CPU
cores, and fine-tuning from that checkpoint reaches 96.4%
(configs/digits_finetune.py).
"""

import ml_collections

from configs import common

# The demo model: hidden 64, 4 layers, 4 heads, MLP 128, patch 2, 136,138
# parameters with the 10-class head on one-channel 8x8 images.
DIGITS_MODEL = dict(name='ViT-digits_2', hidden_size=64, num_layers=4,
                    num_heads=4, mlp_dim=128)


def digits_model(**overrides) -> ml_collections.ConfigDict:
  """The demo ViT (from the Ti/2 variant) with `overrides` applied."""
  return common.model_config('Ti/2', **{**DIGITS_MODEL, **overrides})


def get_config(arg=None) -> ml_collections.ConfigDict:
  """AdamW, 100 warmup + cosine over 2,000 steps of batch 128 at 8x8."""
  common.parse_arg(arg)  # Takes no arguments; rejects any.
  config = common.base_config(dataset='digits')
  config.model = digits_model(dropout_rate=0.2)
  config.image_size = 8
  config.cache = True  # 1,437 tiny images.
  config.label_smoothing = 0.1

  config.batch_size = 128
  config.total_steps = 2_000
  config.warmup_steps = 100
  config.optimizer = 'adamw'
  config.momentum_dtype = 'float32'
  config.lr = 1e-3
  config.schedule = 'cosine'
  config.weight_decay = 0.1
  config.grad_clip_norm = 1.0

  config.log_every = 100
  config.eval_every = 1_000
  config.checkpoint_every = 500
  return config
