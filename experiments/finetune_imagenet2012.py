"""The paper's fine-tuning sweep on imagenet2012 (see paper_finetune.py).

    python -m vit_jax.sweep experiments/finetune_imagenet2012.py --workdir=runs/ft_imagenet2012 --dry_run
"""

import paper_finetune


def get_sweep():
  return paper_finetune.paper_sweep('imagenet2012')
