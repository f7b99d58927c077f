"""The paper's fine-tuning sweep on cifar10 (see paper_finetune.py).

    python -m vit_jax.sweep experiments/finetune_cifar10.py --workdir=runs/ft_cifar10 --dry_run
"""

import paper_finetune


def get_sweep():
  return paper_finetune.paper_sweep('cifar10')
