"""The paper's fine-tuning sweep on cifar100 (see paper_finetune.py).

    python -m vit_jax.sweep experiments/finetune_cifar100.py --workdir=runs/ft_cifar100 --dry_run
"""

import paper_finetune


def get_sweep():
  return paper_finetune.paper_sweep('cifar100')
