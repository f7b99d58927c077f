"""The ViT paper's fine-tuning sweeps (Dosovitskiy et al. 2021, Table 4).

Every dataset is fine-tuned with SGD momentum 0.9, batch 512, cosine decay,
no weight decay, global-norm clipping at 1 and 384px images (the defaults of
configs/finetune.py); the paper picks the best of four learning rates on a
held-out split. The sweep files `finetune_<dataset>.py` beside this one call
`paper_sweep`.
"""

from vit_jax import sweep

# Dataset -> (fine-tuning steps, learning rates), from the paper's Table 4.
PAPER_FINETUNING = {
    'imagenet2012': (20_000, (0.003, 0.01, 0.03, 0.06)),
    'cifar10': (10_000, (0.001, 0.003, 0.01, 0.03)),
    'cifar100': (10_000, (0.001, 0.003, 0.01, 0.03)),
    'oxford_iiit_pet': (500, (0.001, 0.003, 0.01, 0.03)),
    'oxford_flowers102': (500, (0.001, 0.003, 0.01, 0.03)),
}

# Where `python -m vit_jax.main` finds the pretrained weights; point it at
# your copy with --config.init_from in the printed commands, or edit here.
PRETRAINED = 'checkpoints/imagenet21k/ViT-B_16.npz'


def paper_sweep(dataset: str, model: str = 'B/16',
                init_from: str = PRETRAINED) -> sweep.Sweep:
  """The lr x steps sweep of one dataset, optionally over seeds too."""
  steps, learning_rates = PAPER_FINETUNING[dataset]
  return sweep.Sweep(
      config=f'configs/finetune.py:model={model},dataset={dataset}',
      axes=sweep.product(sweep.axis('lr', learning_rates),
                         sweep.axis('total_steps', [steps])),
      fixed={'init_from': init_from})
