"""XLA compiler options for the train and eval steps, chosen per backend.

On CPU, XLA (jax 0.10) hands dots and the elementwise work around them to
YNNPACK fusions by default. For a float32 ViT train step that is slower than
XLA's own fusions with Eigen dots: on the reference model of
`benchmarks/train_throughput.py` (ViT-Ti-like, 32px, batch 64) 58.5 img/s
without YNNPACK against 51.8 with it, measured alternately on 2 cores.
bfloat16 x bfloat16 -> float32 dots exist only as YNNPACK fusions, so
low-precision compute keeps the default. Other backends get no options.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp

# Turns YNNPACK fusions off (an empty list of fusion types).
NO_YNNPACK = {'xla_cpu_experimental_ynn_fusion_type': ''}


def for_compute_dtype(dtype: Any,
                      backend: Optional[str] = None) -> dict[str, str]:
  """The compiler options of a step that computes in `dtype`."""
  backend = backend or jax.default_backend()
  if backend == 'cpu' and jnp.dtype(dtype) == jnp.float32:
    return dict(NO_YNNPACK)
  return {}
