"""The built-in digits dataset builds offline with the documented split."""

import os
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn import datasets as sk_datasets
from sklearn import model_selection

from vit_jax.datasets import digits
from vit_jax.datasets import presets


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """A tfds data dir shared by this session's tests (digits built once)."""
  return str(tmp_path_factory.getbasetemp() / 'tfds_data')


@pytest.fixture(scope='module')
def builder(data_dir):
  return digits.ensure_prepared(data_dir)


def _split_arrays(builder, split):
  ds = builder.as_dataset(split=split, shuffle_files=False)
  examples = list(tfds.as_numpy(ds))
  images = np.stack([ex['image'] for ex in examples])
  labels = np.array([ex['label'] for ex in examples])
  return images, labels


def _sorted_rows(images, labels):
  rows = np.concatenate([images.reshape(len(images), -1),
                         labels[:, None].astype(images.dtype)], axis=1)
  return rows[np.lexsort(rows.T[::-1])]


def test_builds_offline_with_documented_sizes(builder, data_dir):
  assert builder.name == 'vit_jax_digits'
  assert builder.info.splits['train'].num_examples == 1_437
  assert builder.info.splits['test'].num_examples == 360
  assert builder.info.features['label'].num_classes == 10
  assert builder.info.features['image'].shape == (8, 8, 1)
  assert os.path.isdir(os.path.join(data_dir, 'vit_jax_digits', '1.0.0'))


def test_preset_table_matches_the_builder(builder):
  preset = presets.get_preset('digits')
  assert preset.tfds_name == builder.name
  assert preset.num_train_examples == builder.info.splits[
      preset.train_split].num_examples
  assert preset.num_classes == 10 and preset.channels == 1


def test_split_is_the_documented_stratified_split(builder):
  source = sk_datasets.load_digits()
  images = digits.to_uint8(source.images)[..., None]
  train_idx, test_idx = model_selection.train_test_split(
      np.arange(len(source.target)), test_size=360, stratify=source.target,
      random_state=0)
  for split, idx in (('train', train_idx), ('test', test_idx)):
    got_images, got_labels = _split_arrays(builder, split)
    np.testing.assert_array_equal(
        _sorted_rows(got_images, got_labels),
        _sorted_rows(images[idx], source.target[idx]))
  _, test_labels = _split_arrays(builder, 'test')
  counts = np.bincount(test_labels, minlength=10)
  assert counts.min() >= 35 and counts.max() <= 37  # Stratified: ~36 each.


def test_pixels_are_uint8_scaled_from_0_to_16():
  np.testing.assert_array_equal(digits.to_uint8(np.array([0, 1, 8, 16])),
                                [0, 16, 128, 255])


def test_is_registered_with_tfds(builder, data_dir):
  del builder  # Only needs the data to exist.
  again = tfds.builder('vit_jax_digits', data_dir=data_dir)
  assert again.info.splits['test'].num_examples == 360


def test_second_use_reuses_the_built_data(builder, data_dir):
  info_file = os.path.join(builder.data_dir, 'dataset_info.json')
  before = os.path.getmtime(info_file)
  start = time.perf_counter()
  reused = digits.ensure_prepared(data_dir)
  assert time.perf_counter() - start < 1.0
  assert os.path.getmtime(info_file) == before
  assert reused.info.splits['train'].num_examples == 1_437
