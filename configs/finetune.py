"""Fine-tuning as in the ViT paper (Dosovitskiy et al. 2021, Appendix B.1.1).

    python -m vit_jax.main --config=configs/finetune.py:model=B/16,dataset=cifar10 \
        --workdir=runs/b16_c10 --config.init_from=ViT-B_16.npz --config.lr=0.01

SGD with momentum 0.9 (momentum kept in bfloat16, as the official code), batch
512, global-norm clipping at 1.0, no weight decay, cosine decay after a short
warmup, 384px. Position embeddings are resampled to the new patch grid and the
head starts from zero (`init_from` surgery).

Steps and learning rates per dataset follow the paper's Table 4: each run
picks the best lr of the grid on a held-out minival; `lr` below is the
default and `LR_GRIDS` the grid to sweep. Any other dataset gets the paper's
VTAB setting (2,500 steps, lr 0.01).
"""

import ml_collections

from configs import common

# dataset -> (total steps, warmup steps, default lr). Warmup is the official
# code's 500 steps, or 10% of the shorter runs.
_STEPS_AND_LR = {
    'cifar10': (10_000, 500, 0.03),
    'cifar100': (10_000, 500, 0.03),
    'imagenet2012': (20_000, 500, 0.03),
    'oxford_iiit_pet': (500, 50, 0.003),
    'oxford_flowers102': (500, 50, 0.003),
}
_OTHER_DATASETS = (2_500, 200, 0.01)  # The paper's VTAB fine-tuning.

# The learning rates the paper swept per dataset (Table 4).
LR_GRIDS = {
    'cifar10': (0.001, 0.003, 0.01, 0.03),
    'cifar100': (0.001, 0.003, 0.01, 0.03),
    'imagenet2012': (0.003, 0.01, 0.03, 0.06),
    'oxford_iiit_pet': (0.001, 0.003, 0.01, 0.03),
    'oxford_flowers102': (0.001, 0.003, 0.01, 0.03),
}


def get_config(arg=None) -> ml_collections.ConfigDict:
  """Args: model (B/16), dataset (cifar10), image_size (384)."""
  args = common.parse_arg(arg, model='B/16', dataset='cifar10',
                          image_size=384)
  config = common.base_config(args.model, args.dataset)
  config.image_size = args.image_size
  total_steps, warmup_steps, lr = _STEPS_AND_LR.get(args.dataset,
                                                    _OTHER_DATASETS)

  config.batch_size = 512
  config.total_steps = total_steps
  config.warmup_steps = warmup_steps
  config.optimizer = 'sgd'
  config.momentum = 0.9
  config.momentum_dtype = 'bfloat16'
  config.lr = lr
  config.schedule = 'cosine'
  config.weight_decay = 0.0
  config.grad_clip_norm = 1.0

  config.log_every = 50
  config.eval_every = max(total_steps // 10, 100)
  config.checkpoint_every = max(total_steps // 10, 100)
  return config
