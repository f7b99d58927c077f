"""Tests of the preprocessing op registry: each op on known inputs, parsing."""

import numpy as np
import pytest
import tensorflow as tf

from vit_jax import preprocess


def _run(spec, image, *, label=0, seed=(0, 0), channels=3):
  """Applies `spec` to one example and returns numpy features."""
  fn = preprocess.parse(spec, channels=channels)
  features = {'image': tf.constant(image), 'label': tf.constant(label,
                                                                tf.int64)}
  out = fn(features, seed=tf.constant(seed, tf.int64))
  return {k: v.numpy() for k, v in out.items()}


def _coordinate_image(height, width):
  """uint8 image whose channels 0 and 1 hold each pixel's row and column."""
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
  return np.stack([rows, cols, np.zeros_like(rows)], -1).astype(np.uint8)


def _random_image(height, width, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (height, width, channels), dtype=np.uint8)


# ------------------------------------------------------------------ ops --

@pytest.mark.parametrize('encode', [tf.io.encode_png, tf.io.encode_jpeg])
def test_decode_gives_uint8_with_requested_channels(encode):
  image = _random_image(12, 10)
  encoded = encode(tf.constant(image)).numpy()
  out = _run('decode', encoded)
  assert out['image'].shape == (12, 10, 3)
  assert out['image'].dtype == np.uint8
  if encode is tf.io.encode_png:  # Lossless: the exact pixels come back.
    np.testing.assert_array_equal(out['image'], image)
  assert _run('decode(1)', encoded)['image'].shape == (12, 10, 1)


def test_decode_without_arguments_uses_the_dataset_channels():
  encoded = tf.io.encode_png(tf.constant(_random_image(8, 8, 1))).numpy()
  assert _run('decode', encoded, channels=1)['image'].shape == (8, 8, 1)
  assert _run('decode', encoded, channels=3)['image'].shape == (8, 8, 3)
  assert _run('decode(channels=3)', encoded,
              channels=1)['image'].shape == (8, 8, 3)


def test_resize_upsamples_8x8_digits_to_16x16():
  image = _random_image(8, 8, 1)
  out = _run('resize(16)', image)['image']
  assert out.shape == (16, 16, 1)
  assert out.dtype == np.float32
  assert out.min() >= 0 and out.max() <= 255
  # Bilinear upsampling keeps the mean brightness of the image.
  assert abs(out.mean() - image.mean()) < 3


def test_resize_to_height_width_and_same_size_is_identity():
  image = _random_image(20, 30)
  assert _run('resize((12, 18))', image)['image'].shape == (12, 18, 3)
  assert _run('resize(size=(7, 9))', image)['image'].shape == (7, 9, 3)
  np.testing.assert_array_equal(_run('resize((20, 30))', image)['image'],
                                image.astype(np.float32))


def test_resize_bicubic_stays_in_the_uint8_range():
  image = np.zeros((8, 8, 1), np.uint8)
  image[::2] = 255  # Stripes make cubic kernels overshoot.
  out = _run("resize(32, method='bicubic')", image)['image']
  assert out.min() >= 0 and out.max() <= 255


def test_resize_small_keeps_aspect_ratio():
  assert _run('resize_small(25)', _random_image(100, 50))['image'].shape == (
      50, 25, 3)
  assert _run('resize_small(30)', _random_image(40, 80))['image'].shape == (
      30, 60, 3)


def test_central_crop_takes_the_centre():
  image = _coordinate_image(10, 12)
  out = _run('central_crop((4, 6))', image)['image']
  assert out.shape == (4, 6, 3)
  assert out[0, 0, 0] == 3 and out[0, 0, 1] == 3  # (10-4)//2, (12-6)//2
  assert _run('central_crop(10)', image)['image'].shape == (10, 10, 3)


def test_random_crop_is_a_window_inside_the_image():
  image = _coordinate_image(20, 16)
  offsets = set()
  for seed in range(20):
    out = _run('random_crop((5, 7))', image, seed=(seed, 1))['image']
    assert out.shape == (5, 7, 3)
    top, left = int(out[0, 0, 0]), int(out[0, 0, 1])
    assert 0 <= top <= 15 and 0 <= left <= 9
    np.testing.assert_array_equal(out, image[top:top + 5, left:left + 7])
    offsets.add((top, left))
  assert len(offsets) > 5


def test_inception_crop_area_and_aspect_within_the_paper_bounds():
  image = _coordinate_image(100, 100)
  areas = []
  for seed in range(40):
    # Nearest upsampling to the full size keeps every source row and column
    # of the crop, so the crop window can be read off the coordinates.
    out = _run("inception_crop(100, method='nearest')", image,
               seed=(seed, 7))['image']
    assert out.shape == (100, 100, 3)
    rows = np.unique(out[..., 0])
    cols = np.unique(out[..., 1])
    assert np.array_equal(rows, np.arange(rows.min(), rows.max() + 1))
    assert np.array_equal(cols, np.arange(cols.min(), cols.max() + 1))
    area = len(rows) * len(cols) / 100**2
    assert 0.05 - 0.01 <= area <= 1.0
    assert 3 / 4 - 0.05 <= len(cols) / len(rows) <= 4 / 3 + 0.05
    areas.append(area)
  assert min(areas) < 0.3 and max(areas) > 0.6  # The range is explored.


def test_inception_crop_respects_a_custom_area_range():
  image = _coordinate_image(60, 60)
  for seed in range(10):
    out = _run("inception_crop(60, area_min=0.5, area_max=0.6, "
               "method='nearest')", image, seed=(seed, 0))['image']
    area = len(np.unique(out[..., 0])) * len(np.unique(out[..., 1])) / 3600
    assert 0.45 <= area <= 0.65


def test_flip_lr_flips_or_keeps_and_does_both():
  image = _random_image(6, 9)
  seen = set()
  for seed in range(20):
    out = _run('flip_lr', image, seed=(seed, 3))['image']
    if np.array_equal(out, image[:, ::-1]):
      seen.add('flipped')
    else:
      np.testing.assert_array_equal(out, image)
      seen.add('kept')
  assert seen == {'flipped', 'kept'}


def test_random_shift_translates_with_zero_fill():
  image = _random_image(8, 8, 1) | 1  # No zeros inside: padding shows.
  shifts = set()
  for seed in range(30):
    out = _run('random_shift(2)', image, seed=(seed, 5))['image']
    assert out.shape == image.shape
    matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
               if np.array_equal(out, _shift(image, dy, dx))]
    assert len(matches) == 1
    shifts.add(matches[0])
  assert len(shifts) > 5
  np.testing.assert_array_equal(_run('random_shift(0)', image)['image'],
                                image)


def _shift(image, dy, dx):
  """`image` moved down by dy and right by dx, zeros where nothing lands."""
  height, width = image.shape[:2]
  padded = np.pad(image, [(2, 2), (2, 2), (0, 0)])
  return padded[2 - dy:2 - dy + height, 2 - dx:2 - dx + width]


def test_value_range_hits_the_ends_exactly():
  image = np.array([[[0], [255]], [[51], [204]]], np.uint8)
  out = _run('value_range(-1, 1)', image)['image']
  assert out.dtype == np.float32
  assert out[0, 0, 0] == -1.0 and out[0, 1, 0] == 1.0
  np.testing.assert_allclose(out[1, :, 0], [-0.6, 0.6], atol=1e-6)
  out = _run('value_range(0, 1)', image)['image']
  assert out[0, 0, 0] == 0.0 and out[0, 1, 0] == 1.0


def test_grayscale_to_rgb():
  gray = _random_image(5, 4, 1)
  out = _run('grayscale_to_rgb', gray)['image']
  assert out.shape == (5, 4, 3)
  for channel in range(3):
    np.testing.assert_array_equal(out[..., channel], gray[..., 0])
  rgb = _random_image(5, 4, 3)
  np.testing.assert_array_equal(_run('grayscale_to_rgb', rgb)['image'], rgb)


def test_onehot_with_and_without_label_smoothing():
  image = _random_image(2, 2)
  np.testing.assert_array_equal(
      _run('onehot(4)', image, label=2)['label'], [0, 0, 1, 0])
  smooth = _run('onehot(4, label_smoothing=0.2)', image, label=1)['label']
  np.testing.assert_allclose(smooth, [0.05, 0.85, 0.05, 0.05], rtol=1e-6)
  assert smooth.dtype == np.float32


def test_mixup_blends_images_and_labels_with_one_ratio():
  images = tf.constant(np.arange(4, dtype=np.float32).reshape(4, 1, 1, 1))
  labels = tf.one_hot([0, 1, 2, 3], 4)
  batch = {'image': images, 'label': labels}
  out = {k: v.numpy() for k, v in
         preprocess.mixup(batch, (1, 2), alpha=0.4).items()}
  again = preprocess.mixup(batch, (1, 2), alpha=0.4)
  np.testing.assert_array_equal(out['image'], again['image'].numpy())
  lam = out['label'][0, 0]
  np.testing.assert_allclose(out['label'].sum(-1), 1.0, rtol=1e-6)
  # Example i is mixed with example i - 1 (cyclically) by the same ratio.
  expected = lam * np.arange(4) + (1 - lam) * np.roll(np.arange(4), 1)
  np.testing.assert_allclose(out['image'].ravel(), expected, rtol=1e-5)
  np.testing.assert_allclose(out['label'][1, :2], [1 - lam, lam], rtol=1e-5)
  with pytest.raises(ValueError, match='alpha'):
    preprocess.mixup(batch, 0, alpha=0.0)


# --------------------------------------------------------- composition --

def test_random_pipeline_is_a_function_of_the_seed():
  image = _random_image(32, 32)
  spec = 'inception_crop(16)|flip_lr|value_range(-1,1)'
  first = _run(spec, image, seed=(3, 4))['image']
  np.testing.assert_array_equal(first, _run(spec, image, seed=(3, 4))['image'])
  assert not np.array_equal(first, _run(spec, image, seed=(3, 5))['image'])


def test_random_pipeline_without_seed_is_an_error():
  fn = preprocess.parse('flip_lr')
  with pytest.raises(ValueError, match='needs a seed'):
    fn({'image': tf.zeros([2, 2, 3], tf.uint8)})


def test_string_and_list_specs_are_equivalent():
  as_string = preprocess.parse('decode|resize(16)|value_range(-1, 1)')
  as_list = preprocess.parse(['decode', 'resize(16)', 'value_range(-1, 1)'])
  assert as_string.op_names == as_list.op_names == (
      'decode', 'resize', 'value_range')
  assert not as_string.random
  assert preprocess.parse('decode|flip_lr').random


def test_every_required_op_is_registered():
  assert set(preprocess.known_ops()) >= {
      'decode', 'resize', 'resize_small', 'central_crop', 'random_crop',
      'inception_crop', 'flip_lr', 'value_range', 'grayscale_to_rgb',
      'random_shift', 'onehot'}


def test_unknown_op_lists_the_known_ones():
  with pytest.raises(ValueError) as error:
    preprocess.parse('decode|flipp|value_range(-1,1)')
  message = str(error.value)
  assert message.startswith("unknown preprocessing op 'flipp' — known: ")
  assert 'flip_lr' in message and 'inception_crop' in message


@pytest.mark.parametrize('spec, match', [
    ('decode|resize(16', 'bad preprocessing op'),
    ('decode||value_range(-1,1)', 'empty preprocessing op'),
    ('resize 16', 'bad preprocessing op'),
    ('resize(1, 2, 3)', 'too many positional'),
    ('resize(16, colour=2)', 'unexpected keyword'),
    ('resize()', 'missing a required argument'),
    ('resize(sixteen)', 'must be literals'),
    ('resize(16,,)', 'not a Python argument list'),
    ('resize(-4)', 'size must be a positive int'),
    ('resize((4, 5, 6))', 'size must be a positive int'),
    ("resize(8, method='magic')", 'method must be one of'),
    ('value_range(1, -1)', 'lo < hi'),
    ('onehot(10, 1.5)', 'label_smoothing'),
    ('inception_crop(8, area_min=0)', 'area_min'),
    ("inception_crop(8, area_min='a')", 'bad arguments'),
    ('random_shift(-1)', 'pixels'),
    ('decode(2)', 'channels must be 1 or 3'),
])
def test_bad_specs_give_one_line_errors(spec, match):
  with pytest.raises(ValueError, match=match) as error:
    preprocess.parse(spec)
  assert '\n' not in str(error.value)
  assert error.value.__cause__ is None
