"""Pretraining as in the ViT paper (Dosovitskiy et al. 2021, Sec. 4.1 and B.1).

    python -m vit_jax.main --config=configs/pretrain.py:model=B/16,dataset=imagenet21k \
        --workdir=runs/b16_i21k

Adam (beta1 0.9, beta2 0.999), batch 4096, lr 1e-3 with 10k linear warmup
steps then linear decay, weight decay 0.1, 224px, dropout 0.1, and a
`pre_logits` layer as wide as the model, as in the released i21k checkpoints.
The weight decay is decoupled in optax.adamw's sense (the decay per step is
lr * 0.1 * param).

Loss: ImageNet-21k images carry several labels, and sigmoid cross-entropy
(`loss=sigmoid_xent`, the default for i21k) trains a little better there than
softmax; other datasets default to softmax cross-entropy. Either can be chosen
with the `loss` arg.

Length: 90 epochs on ImageNet-21k, 300 on ImageNet (paper, Table 3); set
`--config.total_epochs` or `--config.total_steps` to change it.
"""

import ml_collections

from configs import common

_EPOCHS = {'imagenet21k': 90.0, 'imagenet2012': 300.0}
_DEFAULT_EPOCHS = 90.0


def get_config(arg=None) -> ml_collections.ConfigDict:
  """Args: model (B/16), dataset (imagenet21k), loss (by dataset)."""
  args = common.parse_arg(arg, model='B/16', dataset='imagenet21k', loss='')
  config = common.base_config(args.model, args.dataset)
  config.model.representation_size = config.model.hidden_size
  config.model.dropout_rate = 0.1
  config.image_size = 224
  config.loss = args.loss or ('sigmoid_xent' if args.dataset == 'imagenet21k'
                              else 'softmax_xent')

  config.batch_size = 4096
  config.total_epochs = _EPOCHS.get(args.dataset, _DEFAULT_EPOCHS)
  config.warmup_steps = 10_000
  config.optimizer = 'adamw'
  config.b1, config.b2 = 0.9, 0.999
  config.momentum_dtype = 'float32'
  config.lr = 1e-3
  config.schedule = 'linear'
  config.end_lr = 1e-5
  config.weight_decay = 0.1
  config.grad_clip_norm = 1.0

  config.log_every = 100
  config.eval_every = 5_000
  config.checkpoint_every = 1_000
  return config
