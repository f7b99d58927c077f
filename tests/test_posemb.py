"""Position-embedding resampling: closed forms, scipy, timm and HF."""

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from timm.layers import resample_abs_pos_embed
import torch
import transformers
from transformers.models.vit import modeling_vit

from vit_jax import posemb
from vit_jax.models import vit

DIM = 6


def _posemb(grid, prefix=1, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(1, prefix + grid[0] * grid[1], DIM)).astype(
      np.float32)


def _ramp(grid, prefix=1):
  """Per channel c: value = (c + 1) * row - 0.5 * c * column + c."""
  rows, cols = np.mgrid[:grid[0], :grid[1]]
  channels = np.arange(DIM)
  table = ((channels + 1) * rows[..., None] - 0.5 * channels * cols[..., None]
           + channels)
  prefix_rows = np.full((prefix, DIM), 100.0)
  return np.concatenate([prefix_rows, table.reshape(-1, DIM)])[None].astype(
      np.float32)


@pytest.mark.parametrize('old,new', [((4, 4), (8, 8)), ((4, 6), (7, 3)),
                                     ((5, 3), (2, 9)), ((3, 3), (1, 4))])
def test_bilinear_keeps_a_linear_ramp_a_ramp(old, new):
  out = posemb.resample_posemb(_ramp(old), new_grid=new, old_grid=old,
                               num_prefix_tokens=1)
  # Corner-aligned: output index i samples input coordinate i*(old-1)/(new-1)
  # (a single output samples coordinate 0).
  scale = [(o - 1) / (n - 1) if n > 1 else 0.0 for o, n in zip(old, new)]
  rows, cols = np.mgrid[:new[0], :new[1]]
  channels = np.arange(DIM)
  expected = ((channels + 1) * (rows * scale[0])[..., None] -
              0.5 * channels * (cols * scale[1])[..., None] + channels)
  np.testing.assert_allclose(out[0, 1:], expected.reshape(-1, DIM),
                             rtol=0, atol=2e-5)
  np.testing.assert_array_equal(out[0, :1], 100.0)


def test_bilinear_4_to_8_keeps_the_corners_exactly():
  pe = _posemb((4, 4))
  out = posemb.resample_posemb(pe, new_grid=(8, 8), num_prefix_tokens=1)
  old = pe[0, 1:].reshape(4, 4, DIM)
  new = out[0, 1:].reshape(8, 8, DIM)
  for (oi, oj), (ni, nj) in [((0, 0), (0, 0)), ((0, 3), (0, 7)),
                             ((3, 0), (7, 0)), ((3, 3), (7, 7))]:
    np.testing.assert_array_equal(new[ni, nj], old[oi, oj])


@pytest.mark.parametrize('method,antialias', [('bilinear', False),
                                              ('bicubic', False),
                                              ('bicubic', True)])
def test_same_grid_is_the_identity(method, antialias):
  pe = _posemb((3, 5))
  out = posemb.resample_posemb(pe, new_grid=(3, 5), old_grid=(3, 5),
                               num_prefix_tokens=1, method=method,
                               antialias=antialias)
  np.testing.assert_array_equal(out, pe)


@pytest.mark.parametrize('old,new', [((4, 4), (8, 8)), ((7, 7), (12, 12)),
                                     ((4, 6), (7, 3)), ((8, 8), (5, 5)),
                                     ((5, 3), (12, 9))])
def test_bilinear_matches_scipy_zoom_order_1(old, new):
  """The official fine-tuning resampling (vit_jax checkpoint.py)."""
  pe = _posemb(old, seed=1)
  grid = pe[0, 1:].reshape(old + (DIM,)).astype(np.float64)
  zoom = (new[0] / old[0], new[1] / old[1], 1)
  expected = scipy.ndimage.zoom(grid, zoom, order=1)
  assert expected.shape[:2] == new
  out = posemb.resample_posemb(pe, new_grid=new, old_grid=old,
                               num_prefix_tokens=1)
  np.testing.assert_allclose(out[0, 1:], expected.reshape(-1, DIM),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('old,new', [((4, 4), (8, 8)), ((4, 6), (7, 3)),
                                     ((7, 5), (3, 9))])
@pytest.mark.parametrize('method,antialias,align_corners', [
    ('bilinear', False, True), ('bicubic', False, None),
    ('bicubic', True, None)])
def test_matches_timm_resample_abs_pos_embed(old, new, method, antialias,
                                             align_corners):
  pe = _posemb(old, seed=2)
  expected = resample_abs_pos_embed(
      torch.from_numpy(pe), new_size=list(new), old_size=list(old),
      num_prefix_tokens=1, interpolation=method, antialias=antialias,
      align_corners=align_corners).numpy()
  out = posemb.resample_posemb(pe, new_grid=new, old_grid=old,
                               num_prefix_tokens=1, method=method,
                               antialias=antialias)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize('new', [(6, 6), (6, 3), (2, 2)])
def test_bicubic_matches_hf_interpolate_pos_encoding(new):
  config = transformers.ViTConfig(hidden_size=DIM, image_size=32, patch_size=8,
                                  num_attention_heads=1)
  embeddings = modeling_vit.ViTEmbeddings(config)
  pe = _posemb((4, 4), seed=3)
  with torch.no_grad():
    embeddings.position_embeddings.copy_(torch.from_numpy(pe))
    tokens = torch.zeros(1, 1 + new[0] * new[1], DIM)
    expected = embeddings.interpolate_pos_encoding(
        tokens, new[0] * 8, new[1] * 8).numpy()
  out = posemb.resample_posemb(pe, new_grid=new, num_prefix_tokens=1,
                               method='bicubic')
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize('classifier', vit.CLASSIFIERS)
def test_prefix_tokens_are_kept_apart_for_every_head(classifier):
  prefix = posemb.num_prefix_tokens(classifier)
  assert prefix == (1 if classifier in ('token', 'token_unpooled') else 0)
  pe = _posemb((4, 4), prefix=prefix, seed=4)
  out = posemb.resample_posemb(pe, new_grid=(6, 5), num_prefix_tokens=prefix)
  assert out.shape == (1, prefix + 30, DIM)
  np.testing.assert_array_equal(out[:, :prefix], pe[:, :prefix])
  grid_only = posemb.resample_posemb(pe[:, prefix:], new_grid=(6, 5),
                                     num_prefix_tokens=0)
  np.testing.assert_array_equal(out[:, prefix:], grid_only)


def test_several_prefix_tokens():
  pe = _posemb((3, 3), prefix=3)
  out = posemb.resample_posemb(pe, new_grid=(5, 5), num_prefix_tokens=3)
  assert out.shape == (1, 28, DIM)
  np.testing.assert_array_equal(out[:, :3], pe[:, :3])


def test_array_type_and_dtype_are_kept():
  pe = _posemb((4, 4))
  as_jax = posemb.resample_posemb(jnp.asarray(pe, jnp.bfloat16),
                                  new_grid=(6, 6), num_prefix_tokens=1)
  assert isinstance(as_jax, jnp.ndarray) and as_jax.dtype == jnp.bfloat16
  as_numpy = posemb.resample_posemb(pe.astype(np.float64), new_grid=(6, 6),
                                    num_prefix_tokens=1)
  assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.float64
  np.testing.assert_allclose(np.asarray(as_jax, np.float32), as_numpy,
                             rtol=2e-2, atol=2e-2)


def test_interpolation_matrices_are_partitions_of_unity():
  for old, new in [(4, 8), (7, 3), (1, 5), (5, 1)]:
    for matrix in (posemb.corner_aligned_linear_matrix(old, new),
                   posemb.torch_bicubic_matrix(old, new)):
      assert matrix.shape == (new, old)
      np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-12)


@pytest.mark.parametrize('kwargs,message', [
    (dict(num_prefix_tokens=0), 'not a square'),
    (dict(num_prefix_tokens=0, old_grid=(3, 4)), 'old_grid'),
    (dict(num_prefix_tokens=10, old_grid=(2, 5)), 'no patch positions'),
    (dict(num_prefix_tokens=0, old_grid=(2, 5), method='nearest'),
     'unknown posemb resampling method'),
    (dict(num_prefix_tokens=0, old_grid=(2, 5), antialias=True),
     'antialias applies to'),
])
def test_clear_errors(kwargs, message):
  pe = _posemb((2, 5), prefix=0)  # 10 positions: not a square.
  with pytest.raises(ValueError, match=message):
    posemb.resample_posemb(pe, new_grid=(4, 4), **kwargs)
