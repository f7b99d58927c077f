"""XLA compiler options for the train and eval steps, chosen per backend.

On CPU, XLA (jax 0.10) hands dots and the elementwise work around them to
YNNPACK fusions by default. Measured alternately on 2 cores with the
reference model of `benchmarks/train_throughput.py` (ViT-Ti-like, 32px,
batch 64):
- float32: XLA's own fusions with Eigen dots, no YNNPACK at all: 58.5
  against 51.8 img/s with the default.
- bfloat16: YNNPACK for the dots only (XLA:CPU has no other bf16 x bf16 ->
  f32 dot), XLA's fusions for the rest: 69.8 / 73.7 against 64.0 / 67.0
  img/s in two runs, and ViT-Ti/16 19.7 against 17.4.
Other backends get no options.
"""

import functools
from typing import Any, Optional

from absl import logging
import jax
import jax.numpy as jnp

from vit_jax import cpu_info

_YNN_FUSION_TYPES = 'xla_cpu_experimental_ynn_fusion_type'
# YNNPACK fusions off (an empty list of fusion types).
NO_YNNPACK = {_YNN_FUSION_TYPES: ''}
# YNNPACK for single dots only.
YNNPACK_DOTS_ONLY = {_YNN_FUSION_TYPES: 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}


def for_compute_dtype(dtype: Any,
                      backend: Optional[str] = None) -> dict[str, str]:
  """The compiler options of a step that computes in `dtype`."""
  backend = backend or jax.default_backend()
  if backend != 'cpu':
    return {}
  if jnp.dtype(dtype) == jnp.float32:
    return dict(NO_YNNPACK)
  if jnp.dtype(dtype) == jnp.bfloat16 and not cpu_info.has_native_bf16():
    _warn_emulated_bf16()
  return dict(YNNPACK_DOTS_ONLY)


@functools.cache
def _warn_emulated_bf16() -> None:
  # Once per process: each train and eval step asks for its options.
  logging.warning(
      'model.dtype=bfloat16 on a CPU without bf16 instructions (no %s in '
      '/proc/cpuinfo): the bf16 products run through conversions to float32 '
      'and the step is slower than in float32 (about 0.6x on the reference '
      'model, docs/performance.md); use model.dtype=float32 on this CPU.',
      '/'.join(sorted(cpu_info.NATIVE_BF16_FLAGS)))
