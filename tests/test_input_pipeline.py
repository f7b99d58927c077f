"""Tests of the input pipeline: sources, batches, sharding, resume, errors."""

import json
import logging
import os

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from vit_jax import input_pipeline
from vit_jax.datasets import presets

CLASSES = ('cat', 'dog', 'fish')


def _config(**overrides) -> ml_collections.ConfigDict:
  """The data fields of the training config, with test-friendly defaults."""
  config = dict(
      dataset='digits', data_dir=None, train_split=None, eval_splits=None,
      image_size=8, pp_train=None, pp_eval=None, label_smoothing=0.0,
      mixup_alpha=0.0, shuffle_buffer=2_000, cache=False, prefetch=2)
  config.update(overrides)
  return ml_collections.ConfigDict(config)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  """The session's shared tfds data dir (digits is built there once)."""
  return str(tmp_path_factory.getbasetemp() / 'tfds_data')


@pytest.fixture(scope='module')
def digits_config(data_dir):
  def make(**overrides):
    return _config(dataset='digits', data_dir=data_dir, **overrides)
  return make


def _write_image_folder(root, counts, *, size=(12, 10), seed=0):
  """Writes root/<split>/<class>/<i>.{png,jpg}; counts: split -> per class."""
  rng = np.random.default_rng(seed)
  for split, per_class in counts.items():
    for name in CLASSES:
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
      for i in range(per_class):
        pixels = rng.integers(0, 256, size + (3,), dtype=np.uint8)
        ext = 'png' if i % 2 else 'jpg'
        Image.fromarray(pixels).save(
            os.path.join(root, split, name, f'{i:03d}.{ext}'))
  return root


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
  """3 classes x (9 train, 4 test) images, a corrupt file, a text file."""
  root = _write_image_folder(str(tmp_path_factory.mktemp('folder')),
                             {'train': 9, 'test': 4})
  with open(os.path.join(root, 'train', 'cat', 'broken.jpg'), 'wb') as f:
    f.write(b'not a jpeg at all')
  with open(os.path.join(root, 'train', 'dog', 'notes.txt'), 'w') as f:
    f.write('ignored: not an image extension')
  os.makedirs(os.path.join(root, '.cache'))  # Hidden: not a split.
  return root


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _rows(images, labels):
  """(image, class) rows sorted, to compare collections as multisets."""
  rows = np.concatenate([images.reshape(len(images), -1),
                         labels.argmax(-1)[:, None]], axis=1)
  return rows[np.lexsort(rows.T[::-1])]


def _eval_examples(config, split, batch, **kwargs):
  """All real (unpadded) examples an eval iterator yields, and batch count."""
  batches = list(input_pipeline.make_eval_iterator(
      config, split, global_batch_size=batch, **kwargs))
  mask = np.concatenate([b['mask'] for b in batches]).astype(bool)
  images = np.concatenate([b['image'] for b in batches])[mask]
  labels = np.concatenate([b['label'] for b in batches])[mask]
  return images, labels, len(batches)


# ------------------------------------------------------------- digits --

def test_digits_info(digits_config):
  info = input_pipeline.get_dataset_info(digits_config())
  assert info.name == 'digits'
  assert info.num_classes == 10 and info.channels == 1
  assert info.num_train_examples == 1_437
  assert info.num_eval_examples == {'test': 360}
  assert info.eval_splits == ('test',)
  assert info.class_names == tuple(str(d) for d in range(10))


@pytest.mark.parametrize('image_size', [8, 16])
def test_digits_train_batches(digits_config, image_size):
  config = digits_config(image_size=image_size, label_smoothing=0.1)
  batch = next(input_pipeline.make_train_iterator(config,
                                                  global_batch_size=32))
  assert batch['image'].shape == (32, image_size, image_size, 1)
  assert batch['image'].dtype == np.float32
  assert batch['image'].min() >= -1 and batch['image'].max() <= 1
  assert batch['label'].shape == (32, 10)
  assert batch['label'].dtype == np.float32
  np.testing.assert_allclose(batch['label'].sum(-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(batch['label'].max(-1), 0.91, rtol=1e-5)


def test_digits_eval_covers_the_test_split_once(digits_config):
  images, labels, num_batches = _eval_examples(digits_config(), 'test', 64)
  assert num_batches == 6 and len(images) == 360
  assert np.bincount(labels.argmax(-1), minlength=10).min() >= 35
  np.testing.assert_array_equal(labels.sum(-1), 1.0)  # No smoothing.


def test_resume_equals_the_uninterrupted_run(digits_config):
  # Augmentation, mixup and smoothing on; 1,437 / 64 = 22.5 steps per epoch,
  # so the resumed steps include both sides of an epoch boundary.
  config = digits_config(
      pp_train='decode|inception_crop(8)|flip_lr|value_range(-1,1)',
      mixup_alpha=0.3, label_smoothing=0.1, shuffle_buffer=500)
  uninterrupted = _take(input_pipeline.make_train_iterator(
      config, global_batch_size=64, seed=7), 25)
  for step in (1, 22, 24):
    resumed = next(input_pipeline.make_train_iterator(
        config, global_batch_size=64, seed=7, start_step=step))
    for key in ('image', 'label'):
      np.testing.assert_array_equal(resumed[key], uninterrupted[step][key])


def test_resume_of_a_second_process(digits_config):
  config = digits_config(pp_train='decode|random_shift(1)|flip_lr')
  kwargs = dict(global_batch_size=32, seed=1, process_index=1,
                process_count=2)
  uninterrupted = _take(input_pipeline.make_train_iterator(config, **kwargs),
                        47)
  resumed = next(input_pipeline.make_train_iterator(config, start_step=46,
                                                    **kwargs))
  np.testing.assert_array_equal(resumed['image'], uninterrupted[46]['image'])


def test_seed_and_epoch_change_the_order(digits_config):
  config = digits_config(pp_train='decode')
  # 1,437 = 3 * 479: batch 479 makes each epoch exactly 3 steps.
  seed0 = _take(input_pipeline.make_train_iterator(
      config, global_batch_size=479, seed=0), 6)
  seed1 = next(input_pipeline.make_train_iterator(
      config, global_batch_size=479, seed=1))
  assert not np.array_equal(seed0[0]['image'], seed1['image'])
  epoch0 = np.concatenate([b['image'] for b in seed0[:3]])
  epoch1 = np.concatenate([b['image'] for b in seed0[3:]])
  assert not np.array_equal(epoch0, epoch1)
  labels0 = np.concatenate([b['label'] for b in seed0[:3]])
  labels1 = np.concatenate([b['label'] for b in seed0[3:]])
  # Each epoch is a permutation of the same examples.
  np.testing.assert_array_equal(_rows(epoch0, labels0),
                                _rows(epoch1, labels1))


def test_cache_does_not_change_the_stream(digits_config):
  plain = _take(input_pipeline.make_train_iterator(
      digits_config(), global_batch_size=128, seed=3), 13)
  cached = _take(input_pipeline.make_train_iterator(
      digits_config(cache=True), global_batch_size=128, seed=3), 13)
  for a, b in zip(plain, cached):
    np.testing.assert_array_equal(a['image'], b['image'])


def test_two_processes_read_disjoint_train_shards(digits_config):
  config = digits_config(pp_train='decode', shuffle_buffer=100)
  shards = []
  for process in range(2):
    shard_size = 719 - process  # tfds.even_splits: 1,437 = 719 + 718.
    batches = _take(input_pipeline.make_train_iterator(
        config, global_batch_size=16, process_index=process,
        process_count=2), -(-shard_size // 8))
    images = np.concatenate([b['image'] for b in batches])[:shard_size]
    labels = np.concatenate([b['label'] for b in batches])[:shard_size]
    shards.append((images, labels))
  union = _rows(np.concatenate([s[0] for s in shards]),
                np.concatenate([s[1] for s in shards]))
  full_images, full_labels, _ = _eval_examples(
      digits_config(pp_eval='decode'), 'train', 100)
  np.testing.assert_array_equal(union, _rows(full_images, full_labels))


def test_two_processes_eval_disjoint_shards_in_equal_batch_counts(
    digits_config):
  config = digits_config(pp_eval='decode')
  full = _eval_examples(config, 'test', 50)
  shards = [_eval_examples(config, 'test', 50, process_index=p,
                           process_count=2) for p in range(2)]
  assert [len(s[0]) for s in shards] == [180, 180]
  assert shards[0][2] == shards[1][2] == 8  # ceil(180 / 25)
  union = _rows(np.concatenate([s[0] for s in shards]),
                np.concatenate([s[1] for s in shards]))
  np.testing.assert_array_equal(union, _rows(full[0], full[1]))


def test_indivisible_global_batch_names_both_numbers(digits_config):
  with pytest.raises(ValueError, match=r'global batch size 10 is not '
                     r'divisible by the process count 3'):
    input_pipeline.make_train_iterator(digits_config(), global_batch_size=10,
                                       process_index=0, process_count=3)
  with pytest.raises(ValueError, match='10.*3'):
    input_pipeline.make_eval_iterator(digits_config(), 'test',
                                      global_batch_size=10, process_index=0,
                                      process_count=3)


def test_batch_larger_than_the_train_split_names_both_numbers(digits_config):
  with pytest.raises(ValueError, match=r'global batch size 2048 .*1437'):
    input_pipeline.make_train_iterator(digits_config(),
                                       global_batch_size=2048)


def test_preprocessing_must_decode_first(digits_config):
  with pytest.raises(ValueError, match="must start with 'decode'"):
    input_pipeline.make_train_iterator(
        digits_config(pp_train='resize(8)|decode'), global_batch_size=8)


def test_write_class_names(digits_config, tmp_path):
  info = input_pipeline.get_dataset_info(digits_config())
  input_pipeline.write_class_names(info, str(tmp_path / 'run'))
  with open(tmp_path / 'run' / 'class_names.json') as f:
    written = json.load(f)
  assert written == {'dataset': 'digits', 'num_classes': 10,
                     'class_names': [str(d) for d in range(10)]}


# --------------------------------------------------------------- tfds --

def test_mock_cifar10_through_the_full_pipeline(tmp_path):
  # mock_data ignores split slicing: 'train[:98%]' and every process shard
  # yield the same num_examples random examples.
  config = _config(dataset='cifar10', data_dir=str(tmp_path), image_size=24,
                   label_smoothing=0.1, mixup_alpha=0.2)
  with tfds.testing.mock_data(num_examples=48):
    info = input_pipeline.get_dataset_info(config)
    train = _take(input_pipeline.make_train_iterator(
        config, global_batch_size=16), 4)
    evals = list(input_pipeline.make_eval_iterator(config, 'test',
                                                   global_batch_size=32))
  assert info.num_classes == 10 and info.channels == 3
  assert info.num_train_examples == 48
  assert info.eval_splits == ('test',)
  for batch in train:
    assert batch['image'].shape == (16, 24, 24, 3)
    assert batch['image'].min() >= -1 and batch['image'].max() <= 1
    assert batch['label'].shape == (16, 10)
    np.testing.assert_allclose(batch['label'].sum(-1), 1.0, rtol=1e-5)
  assert [b['mask'].sum() for b in evals] == [32, 16]
  assert evals[1]['image'].shape == (32, 24, 24, 3)
  np.testing.assert_array_equal(evals[1]['image'][16:], 0)


def test_eval_of_1000_examples_with_batch_64_counts_1000(tmp_path):
  config = _config(dataset='cifar10', data_dir=str(tmp_path), image_size=8)
  with tfds.testing.mock_data(num_examples=1_000):
    batches = list(input_pipeline.make_eval_iterator(
        config, 'test', global_batch_size=64))
  assert len(batches) == 16
  assert all(b['image'].shape == (64, 8, 8, 3) for b in batches)
  assert all(b['mask'].dtype == np.float32 for b in batches)
  assert sum(b['mask'].sum() for b in batches) == 1_000
  assert batches[-1]['mask'].sum() == 1_000 - 15 * 64


def test_any_tfds_name_works_with_its_own_info(tmp_path):
  # mnist is no preset: classes, channels and default splits come from tfds.
  config = _config(dataset='mnist', data_dir=str(tmp_path), image_size=16)
  with tfds.testing.mock_data(num_examples=20):
    info = input_pipeline.get_dataset_info(config)
    batch = next(input_pipeline.make_train_iterator(config,
                                                    global_batch_size=8))
  assert info.num_classes == 10 and info.channels == 1
  assert info.eval_splits == ('test',)
  assert batch['image'].shape == (8, 16, 16, 1)


def test_missing_tfds_data_is_a_one_line_error(tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    input_pipeline.get_dataset_info(_config(dataset='cifar10',
                                            data_dir=str(tmp_path)))
  message = str(error.value)
  assert 'tfds build cifar10' in message and str(tmp_path) in message
  assert '\n' not in message
  assert error.value.__cause__ is None and error.value.__suppress_context__


def test_unknown_dataset_lists_the_presets(tmp_path):
  with pytest.raises(ValueError) as error:
    input_pipeline.get_dataset_info(_config(dataset='cifar11',
                                            data_dir=str(tmp_path)))
  message = str(error.value)
  assert message.startswith("unknown dataset 'cifar11' — presets: digits, ")
  assert 'imagenet21k' in message and 'folder:' in message


# ------------------------------------------------------------- folder --

def test_image_folder_info_skips_the_corrupt_file(image_folder, caplog):
  # Listed afresh, so the warning is logged within this test.
  input_pipeline._list_image_folder.cache_clear()  # pylint: disable=W0212
  with caplog.at_level(logging.WARNING):
    info = input_pipeline.get_dataset_info(
        _config(dataset=f'folder:{image_folder}'))
  assert info.class_names == CLASSES
  assert info.num_classes == 3 and info.channels == 3
  assert info.num_train_examples == 27  # broken.jpg and notes.txt left out.
  assert info.num_eval_examples == {'test': 12}  # .cache/ is not a split.
  assert 'broken.jpg' in caplog.text and 'skipped 1' in caplog.text


def test_image_folder_batches_and_class_names(image_folder, tmp_path):
  config = _config(dataset=f'folder:{image_folder}', image_size=16)
  batch = next(input_pipeline.make_train_iterator(config,
                                                  global_batch_size=8))
  assert batch['image'].shape == (8, 16, 16, 3)
  assert batch['image'].min() >= -1 and batch['image'].max() <= 1
  assert batch['label'].shape == (8, 3)
  _, labels, num_batches = _eval_examples(config, 'test', 5)
  assert num_batches == 3 and len(labels) == 12
  np.testing.assert_array_equal(np.bincount(labels.argmax(-1)), [4, 4, 4])
  info = input_pipeline.get_dataset_info(config)
  input_pipeline.write_class_names(info, str(tmp_path))
  with open(tmp_path / 'class_names.json') as f:
    assert json.load(f)['class_names'] == list(CLASSES)


def test_image_folder_labels_follow_the_class_folders(image_folder):
  # PNGs decode exactly, so each PNG's pixels must come back with its class.
  config = _config(dataset=f'folder:{image_folder}', pp_eval='decode')
  images, labels, _ = _eval_examples(config, 'test', 4)
  png_classes = {}
  for label, name in enumerate(CLASSES):
    class_dir = os.path.join(image_folder, 'test', name)
    for file_name in os.listdir(class_dir):
      if file_name.endswith('.png'):
        pixels = np.asarray(Image.open(os.path.join(class_dir, file_name)))
        png_classes[pixels.astype(np.float32).tobytes()] = label
  found = [(png_classes[image.tobytes()], label)
           for image, label in zip(images, labels.argmax(-1))
           if image.tobytes() in png_classes]
  assert len(found) == len(png_classes) == 6
  assert all(expected == got for expected, got in found)


def test_image_folder_split_slicing_and_sharding(image_folder):
  config = _config(dataset=f'folder:{image_folder}',
                   eval_splits=('train[:10]', 'train[10:]'))
  info = input_pipeline.get_dataset_info(config)
  assert info.num_eval_examples == {'train[:10]': 10, 'train[10:]': 17}
  sizes = [len(_eval_examples(config, 'train', 6, process_index=p,
                              process_count=3)[0]) for p in range(3)]
  assert sizes == [9, 9, 9]


def test_image_folder_errors(tmp_path):
  empty = tmp_path / 'empty'
  (empty / 'train' / 'a').mkdir(parents=True)
  (empty / 'train' / 'b').mkdir()
  with pytest.raises(ValueError, match='no readable'):
    input_pipeline.get_dataset_info(_config(dataset=f'folder:{empty}'))
  single = _write_image_folder(str(tmp_path / 'single'), {'train': 2})
  for name in CLASSES[1:]:
    for f in os.listdir(os.path.join(single, 'train', name)):
      os.remove(os.path.join(single, 'train', name, f))
    os.rmdir(os.path.join(single, 'train', name))
  with pytest.raises(ValueError, match='at least 2 class'):
    input_pipeline.get_dataset_info(_config(dataset=f'folder:{single}'))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    input_pipeline.get_dataset_info(
        _config(dataset=f'folder:{tmp_path / "nowhere"}'))
  extra = _write_image_folder(str(tmp_path / 'extra'), {'train': 1,
                                                        'test': 1})
  os.rename(os.path.join(extra, 'test', 'fish'),
            os.path.join(extra, 'test', 'whale'))
  with pytest.raises(ValueError, match='train/ lacks: whale'):
    input_pipeline.get_dataset_info(_config(dataset=f'folder:{extra}'))


# ------------------------------------------------------------ presets --

def test_presets_table():
  assert set(presets.PRESETS) == {
      'digits', 'cifar10', 'cifar100', 'oxford_iiit_pet',
      'oxford_flowers102', 'imagenet2012', 'imagenet21k'}
  cifar = presets.get_preset('cifar10')
  assert cifar.pp_train_for(384) == (
      'decode|inception_crop(384)|flip_lr|value_range(-1,1)')
  assert cifar.pp_eval_for((224, 160)) == (
      'decode|resize((224, 160))|value_range(-1,1)')
  digits = presets.get_preset('digits')
  assert digits.pp_train_for(8) == (
      'decode|resize(8)|random_shift(1)|value_range(-1,1)')
  assert 'random_shift(2)' in digits.pp_train_for(16)
  with pytest.raises(ValueError, match='presets: digits, cifar10'):
    presets.get_preset('cifar11')
