"""Attention rollout against hand-computed answers."""

import numpy as np
import pytest

from vit_jax import rollout


def test_one_layer_adds_identity_and_renormalises():
  # Two heads whose mean is [[0.5, 0.5], [0.2, 0.8]].
  heads = np.array([[[1.0, 0.0], [0.4, 0.6]],
                    [[0.0, 1.0], [0.0, 1.0]]])[None]
  (rolled,) = rollout.rollout([heads])
  # (mean + I) rows: [1.5, 0.5] / 2 and [0.2, 1.8] / 2.
  np.testing.assert_allclose(rolled[0], [[0.75, 0.25], [0.1, 0.9]])


def test_layers_multiply_from_first_to_last():
  first = np.array([[[0.0, 1.0], [0.0, 1.0]]])[None]  # T1 = [[.5,.5],[0,1]]
  second = np.array([[[1.0, 0.0], [1.0, 0.0]]])[None]  # T2 = [[1,0],[.5,.5]]
  per_layer = rollout.rollout([first, second])
  np.testing.assert_allclose(per_layer[0][0], [[0.5, 0.5], [0.0, 1.0]])
  # T2 @ T1 = [[.5, .5], [.25, .75]].
  np.testing.assert_allclose(per_layer[1][0], [[0.5, 0.5], [0.25, 0.75]])


def test_uniform_attention_spreads_evenly_over_patches():
  tokens = 5  # class token + 2x2 patches
  uniform = np.full((1, 3, tokens, tokens), 1 / tokens)
  rolled = rollout.rollout([uniform] * 4)[-1]
  np.testing.assert_allclose(rolled.sum(-1), 1.0)
  patches = rolled[0, 0, 1:]
  np.testing.assert_allclose(patches, patches[0])


def test_patch_map_reads_the_class_token_row_and_scales_to_unit_range():
  rolled = np.zeros((1, 5, 5))
  rolled[0, 0] = [0.6, 0.1, 0.2, 0.3, 0.5]  # class token, then 2x2 patches
  relevance = rollout.patch_map(rolled, (2, 2), has_class_token=True)
  np.testing.assert_allclose(relevance[0], [[0.0, 0.25], [0.5, 1.0]])


def test_patch_map_without_class_token_averages_every_row():
  rolled = np.array([[[1.0, 0.0], [0.0, 1.0]], ])
  rolled = np.concatenate([rolled, np.array([[[0.9, 0.1], [0.5, 0.5]]])])
  relevance = rollout.patch_map(rolled, (1, 2), has_class_token=False)
  np.testing.assert_allclose(relevance[1], [[1.0, 0.0]])
  np.testing.assert_allclose(relevance[0], [[0.0, 0.0]])  # flat map


def test_empty_stack_is_an_error():
  with pytest.raises(ValueError, match='at least one layer'):
    rollout.rollout([])
