"""The offline demo's stages, run in this order by `python -m vit_jax.demo`:

  pretrain: digits at 8x8 (configs/digits_pretrain.py);
  finetune: digits at 16x16 from the pretrain workdir, position embeddings
            resampled 4x4 -> 8x8, new zero head (configs/digits_finetune.py);
  scratch:  the same fine-tuning recipe and budget from random init.

The driver sets `finetune.init_from` to the pretrain workdir. Any stage can be
changed from the command line, e.g. `--config.pretrain.total_steps=1000`.
"""

import ml_collections

from configs import common
from configs import digits_finetune
from configs import digits_pretrain


def get_config(arg=None) -> ml_collections.ConfigDict:
  """One full training config per stage."""
  common.parse_arg(arg)  # Takes no arguments; rejects any.
  config = ml_collections.ConfigDict()
  config.pretrain = digits_pretrain.get_config()
  config.finetune = digits_finetune.get_config()
  config.scratch = digits_finetune.get_config()
  return config
