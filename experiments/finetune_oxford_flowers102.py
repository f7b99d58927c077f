"""The paper's fine-tuning sweep on oxford_flowers102 (see paper_finetune.py).

    python -m vit_jax.sweep experiments/finetune_oxford_flowers102.py --workdir=runs/ft_oxford_flowers102 --dry_run
"""

import paper_finetune


def get_sweep():
  return paper_finetune.paper_sweep('oxford_flowers102')
