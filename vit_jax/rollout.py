"""Attention rollout (Abnar & Zuidema, 2020): where a ViT's output looks.

Each layer's attention is averaged over heads; the identity is added for the
residual connection and the rows renormalised; the layers are multiplied from
the first to the last. The row of the class token (or the mean row, for
models without one) over the patch tokens is the map.
"""

from typing import Sequence

import numpy as np


def layer_transition(weights: np.ndarray) -> np.ndarray:
  """Head-averaged attention plus identity, rows renormalised.

  Args:
    weights: (batch, heads, tokens, tokens) attention of one layer.

  Returns:
    (batch, tokens, tokens), each row summing to 1.
  """
  mean = np.asarray(weights, np.float64).mean(axis=1)
  mixed = mean + np.eye(mean.shape[-1])
  return mixed / mixed.sum(axis=-1, keepdims=True)


def rollout(attention: Sequence[np.ndarray]) -> list[np.ndarray]:
  """Cumulative rollout after each layer: R_l = T_l @ ... @ T_1.

  Args:
    attention: per-layer (batch, heads, tokens, tokens) weights, first layer
      first (as `VisionTransformer(..., return_intermediates=True)` gives).

  Returns:
    One (batch, tokens, tokens) matrix per layer; the last is the rollout of
    the whole network.
  """
  if not attention:
    raise ValueError('attention rollout needs at least one layer')
  result, cumulative = [], None
  for weights in attention:
    transition = layer_transition(weights)
    cumulative = transition if cumulative is None else transition @ cumulative
    result.append(cumulative)
  return result


def patch_map(rolled: np.ndarray, grid: tuple[int, int],
              has_class_token: bool) -> np.ndarray:
  """Relevance of each patch, (batch, grid_h, grid_w), scaled to [0, 1].

  With a class token, its row over the patch columns; otherwise the mean
  row (every token's view) over all columns.
  """
  if has_class_token:
    relevance = rolled[:, 0, 1:]
  else:
    relevance = rolled.mean(axis=1)
  relevance = relevance.reshape((rolled.shape[0],) + tuple(grid))
  low = relevance.min(axis=(1, 2), keepdims=True)
  high = relevance.max(axis=(1, 2), keepdims=True)
  return (relevance - low) / np.maximum(high - low, 1e-12)
