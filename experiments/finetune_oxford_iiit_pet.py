"""The paper's fine-tuning sweep on oxford_iiit_pet (see paper_finetune.py).

    python -m vit_jax.sweep experiments/finetune_oxford_iiit_pet.py --workdir=runs/ft_oxford_iiit_pet --dry_run
"""

import paper_finetune


def get_sweep():
  return paper_finetune.paper_sweep('oxford_iiit_pet')
