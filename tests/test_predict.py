"""Prediction and attention maps on image files written in the test."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from vit_jax import checkpoint as ckpt
from vit_jax import inference
from vit_jax import predict
from vit_jax import visualize
from vit_jax.models import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ['zero', 'one', 'two', 'three']


def small_config():
  config = registry.get_model_config('Ti/4')
  config.update(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)
  return config


@pytest.fixture(name='exported')
def fixture_exported(tmp_path):
  """A 16x16 4-class model whose head prefers 'three', saved as npz + card."""
  config = small_config()
  model = registry.build_model(config, len(CLASSES))
  params = jax.jit(model.init)(jax.random.key(0),
                               jnp.zeros((1, 16, 16, 3)))['params']
  params = jax.tree_util.tree_map(np.asarray, params)
  params['head']['bias'] = np.array([0.0, 1.0, 0.5, 2.0], np.float32)
  path = str(tmp_path / 'model.npz')
  ckpt.save_npz(params, path, metadata={'model_config': config.to_dict(),
                                        'classes': CLASSES})
  return path, model, params


def write_images(directory, count=2):
  rng = np.random.default_rng(0)
  paths = []
  for i in range(count):
    path = os.path.join(directory, f'image{i}.png')
    Image.fromarray(rng.integers(0, 255, (24, 20, 3), np.uint8)).save(path)
    paths.append(path)
  return paths


def test_top_k_orders_by_probability():
  probabilities = np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
  best = predict.top_k(probabilities, ['a', 'b', 'c'], k=2)
  assert best == [[('b', 0.6), ('c', 0.3)], [('a', 0.5), ('c', 0.3)]]


def test_predictions_match_the_model_on_preprocessed_pixels(exported,
                                                           tmp_path):
  path, model, params = exported
  images = write_images(str(tmp_path))
  predictions = predict.predict(path, images, k=4)
  classifier = inference.load_classifier(path)
  assert classifier.image_size == (16, 16)
  pixels = inference.load_images(images, classifier)
  assert pixels.shape == (2, 16, 16, 3)
  assert pixels.min() >= -1 and pixels.max() <= 1
  expected = jax.nn.softmax(model.apply({'params': params}, pixels))
  for row, best in zip(np.asarray(expected), predictions):
    assert [name for name, _ in best] == [CLASSES[i] for i in
                                          np.argsort(-row)]
    np.testing.assert_allclose([p for _, p in best], np.sort(row)[::-1],
                               rtol=1e-5)
  assert predictions[0][0][0] == 'three'


def test_predict_cli_prints_json(exported, tmp_path):
  path, _, _ = exported
  images = write_images(str(tmp_path), count=1)
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.predict', f'--checkpoint={path}',
       f'--images={images[0]}', '--top_k=2', '--json'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  output = json.loads(result.stdout)
  assert output[0]['image'] == images[0]
  assert [c['class'] for c in output[0]['top_k']] == ['three', 'one']


def test_predict_cli_missing_image_is_one_line(exported, tmp_path):
  path, _, _ = exported
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.predict', f'--checkpoint={path}',
       f'--images={tmp_path}/missing.png'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == (
      f'predict: error: image {tmp_path}/missing.png does not exist')
  assert 'Traceback' not in result.stderr


def test_rollout_maps_cover_the_image_at_any_patch_grid(exported, tmp_path):
  path, _, _ = exported
  classifier = inference.load_classifier(path)
  images = inference.load_images(write_images(str(tmp_path)), classifier)
  logits, maps = visualize.rollout_maps(classifier, images)
  assert logits.shape == (2, 4)
  assert maps.shape == (2, 2, 16, 16)  # layers, images, height, width
  assert maps.min() >= 0 and maps.max() <= 1 + 1e-6


def test_visualize_writes_a_png(exported, tmp_path):
  path, _, _ = exported
  image = write_images(str(tmp_path), count=1)[0]
  out = str(tmp_path / 'map.png')
  label = visualize.visualize(path, image, out)
  assert label.startswith('three')
  with open(out, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
