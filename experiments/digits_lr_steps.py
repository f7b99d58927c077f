"""Learning rate x training length on the built-in digits (offline, minutes).

    python -m vit_jax.sweep experiments/digits_lr_steps.py --workdir=runs/digits_sweep

Six short pretraining runs of the 136k-parameter demo ViT at 8x8, ranked by
their best test accuracy.
"""

from vit_jax import sweep


def get_sweep() -> sweep.Sweep:
  return sweep.Sweep(
      config='configs/digits_pretrain.py',
      axes=sweep.product(
          sweep.axis('lr', [3e-4, 1e-3, 3e-3]),
          sweep.axis('total_steps', [300, 600])),
      fixed={'warmup_steps': 50, 'log_every': 50, 'eval_every': 150,
             'checkpoint_every': 300})
