"""Resampling learned position embeddings to a new patch grid.

A ViT's `pos_embedding` has shape (1, prefix + grid_h * grid_w, dim): the
prefix tokens (the class token, if any) first, then the patch grid in
row-major order. Fine-tuning at another resolution (or with another patch
grid) keeps the prefix rows as they are and resizes the grid part. Methods:

* `bilinear` (default, no antialias): corner-aligned linear interpolation,
  exactly what the official code does with `scipy.ndimage.zoom(order=1)` on the
  grid (and timm's `resample_abs_pos_embed(..., interpolation='bilinear',
  align_corners=True)`). Corners are kept exactly: growing 4 -> 8 samples the
  first and last rows/columns unchanged, and a linear ramp stays a linear ramp.
  `jax.image.resize` is half-pixel (align_corners=False), so this is computed
  with two small interpolation matrices instead (exact, cheap).
* `bicubic` without antialias: the half-pixel Keys cubic with a = -0.75 and
  clamped borders, i.e. PyTorch's `F.interpolate(mode='bicubic',
  align_corners=False)`, which is what HF's `ViTEmbeddings.
  interpolate_pos_encoding` and timm's `resample_abs_pos_embed(...,
  antialias=False)` compute.
* `bicubic` with antialias: `jax.image.resize(method='cubic', antialias=True)`
  (Keys a = -0.5, kernel widened when shrinking, weights renormalised at the
  borders), the PIL-style filter that PyTorch uses for `antialias=True`; this is
  timm's default when it adapts a checkpoint (`checkpoint_filter_fn`).

Differences worth knowing: timm's npz loader (`_load_weights`) resamples with
half-pixel bilinear (align_corners=False), which is neither the official
corner-aligned result nor ours; and the two bicubic variants differ both in
the cubic coefficient and in how they treat the borders.
"""

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ('bilinear', 'bicubic')

# Keys' cubic coefficient in PyTorch's non-antialiased bicubic (OpenCV's).
_TORCH_CUBIC_A = -0.75


def num_prefix_tokens(classifier: str) -> int:
  """Rows of `pos_embedding` before the patch grid for a classifier type."""
  return 1 if classifier in ('token', 'token_unpooled') else 0


def infer_square_grid(num_patches: int, what: str = 'position embedding'
                      ) -> tuple[int, int]:
  """(side, side) for a square number of patches; a clear error otherwise."""
  side = math.isqrt(num_patches)
  if side * side != num_patches:
    raise ValueError(
        f'cannot infer the patch grid of the {what}: {num_patches} patch '
        'positions is not a square number; pass the grid (height, width) '
        'explicitly')
  return side, side


def resample_posemb(
    posemb, *, new_grid: Sequence[int],
    old_grid: Optional[Sequence[int]] = None,
    num_prefix_tokens: int,  # pylint: disable=redefined-outer-name
    method: str = 'bilinear',
    antialias: bool = False):
  """Resizes the patch-grid part of position embeddings to `new_grid`.

  Args:
    posemb: (1, num_prefix_tokens + old_h * old_w, dim), numpy or jax.
    new_grid: (new_h, new_w), the target patch grid.
    old_grid: (old_h, old_w) of `posemb`; inferred as square when None.
    num_prefix_tokens: leading rows (class token) copied unchanged.
    method: 'bilinear' (official, corner-aligned) or 'bicubic'.
    antialias: with 'bicubic', use the antialiased (PIL-style) filter.

  Returns:
    (1, num_prefix_tokens + new_h * new_w, dim), the same array type and dtype
    as `posemb`; `posemb` itself when the grids already match.
  """
  if method not in METHODS:
    raise ValueError(f'unknown posemb resampling method {method!r}; known: '
                     f'{", ".join(METHODS)}')
  if antialias and method != 'bicubic':
    raise ValueError("antialias applies to method='bicubic' only; 'bilinear' "
                     'is the corner-aligned official resampling')
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f'position embeddings must be (1, tokens, dim), got '
                     f'{tuple(posemb.shape)}')
  num_patches = posemb.shape[1] - num_prefix_tokens
  if num_patches <= 0:
    raise ValueError(f'position embeddings of shape {tuple(posemb.shape)} have '
                     f'no patch positions after {num_prefix_tokens} prefix '
                     'tokens')
  old_grid = (tuple(old_grid) if old_grid is not None
              else infer_square_grid(num_patches))
  new_grid = tuple(new_grid)
  if old_grid[0] * old_grid[1] != num_patches:
    raise ValueError(f'old_grid {old_grid} has {old_grid[0] * old_grid[1]} '
                     f'positions but the embeddings hold {num_patches} after '
                     f'{num_prefix_tokens} prefix tokens')
  if min(new_grid) < 1:
    raise ValueError(f'new_grid must be positive, got {new_grid}')
  if old_grid == new_grid:
    return posemb

  dim = posemb.shape[-1]
  prefix = posemb[:, :num_prefix_tokens]
  grid = jnp.asarray(posemb[0, num_prefix_tokens:], jnp.float32).reshape(
      old_grid + (dim,))
  if method == 'bicubic' and antialias:
    resized = jax.image.resize(grid, new_grid + (dim,), method='cubic',
                               antialias=True,
                               precision=jax.lax.Precision.HIGHEST)
  else:
    matrix_fn = (corner_aligned_linear_matrix if method == 'bilinear'
                 else torch_bicubic_matrix)
    rows = jnp.asarray(matrix_fn(old_grid[0], new_grid[0]), jnp.float32)
    cols = jnp.asarray(matrix_fn(old_grid[1], new_grid[1]), jnp.float32)
    resized = jnp.einsum('hH,wW,HWd->hwd', rows, cols, grid,
                         precision=jax.lax.Precision.HIGHEST)
  resized = resized.reshape(1, new_grid[0] * new_grid[1], dim)
  if isinstance(posemb, np.ndarray):
    return np.concatenate(
        [prefix, np.asarray(resized).astype(posemb.dtype)], axis=1)
  return jnp.concatenate([prefix, resized.astype(posemb.dtype)], axis=1)


def corner_aligned_linear_matrix(old_size: int, new_size: int) -> np.ndarray:
  """(new_size, old_size) weights of 1-D linear interpolation, corners aligned.

  Output i samples input coordinate i * (old - 1) / (new - 1), as
  `scipy.ndimage.zoom(order=1)` does (a single output samples coordinate 0).
  """
  matrix = np.zeros((new_size, old_size), np.float64)
  if new_size == 1:
    coords = np.zeros(1)
  else:
    # Multiply before dividing so the last sample lands exactly on old - 1.
    coords = np.arange(new_size) * (old_size - 1) / (new_size - 1)
  low = np.clip(np.floor(coords).astype(int), 0, old_size - 1)
  high = np.minimum(low + 1, old_size - 1)
  frac = coords - low
  rows = np.arange(new_size)
  np.add.at(matrix, (rows, low), 1.0 - frac)
  np.add.at(matrix, (rows, high), frac)
  return matrix


def torch_bicubic_matrix(old_size: int, new_size: int) -> np.ndarray:
  """(new_size, old_size) weights of PyTorch's bicubic, align_corners=False.

  Half-pixel source coordinates, Keys cubic with a = -0.75 over the four
  nearest inputs, indices clamped to the border (no renormalisation).
  """
  scale = old_size / new_size
  coords = (np.arange(new_size) + 0.5) * scale - 0.5
  base = np.floor(coords).astype(int)
  frac = coords - base
  matrix = np.zeros((new_size, old_size), np.float64)
  rows = np.arange(new_size)
  for offset in (-1, 0, 1, 2):
    weight = _keys_cubic(frac - offset, _TORCH_CUBIC_A)
    index = np.clip(base + offset, 0, old_size - 1)
    np.add.at(matrix, (rows, index), weight)
  return matrix


def _keys_cubic(distance: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel evaluated at `distance`."""
  x = np.abs(distance)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))
