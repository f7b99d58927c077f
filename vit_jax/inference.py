"""A trained classifier ready for images: model, params, eval preprocessing.

Shared by `vit_jax.predict` and `vit_jax.visualize`. Any checkpoint that
`vit_jax.export.load_source` reads works: a training workdir (its config
gives the image size, preprocessing and class names), an `.npz` (with its
model card, or `--model`), a timm safetensors file, or an HF directory.
"""

import dataclasses
import json
import os
from typing import Any, Optional, Sequence

import jax
import numpy as np

from vit_jax import checkpoint as ckpt
from vit_jax import export
from vit_jax.datasets import presets
from vit_jax.models import registry


@dataclasses.dataclass
class Classifier:
  """What inference needs, all read from one checkpoint."""
  model: Any
  params: dict[str, Any]
  image_size: tuple[int, int]
  channels: int
  pp_eval: str
  class_names: list[str]

  @property
  def has_class_token(self) -> bool:
    return self.model.classifier in ('token', 'token_unpooled')


def load_classifier(checkpoint: str, *, model: Optional[str] = None,
                    step: ckpt.StepChoice = None,
                    image_size: Optional[Sequence[int]] = None,
                    class_names_file: Optional[str] = None) -> Classifier:
  """Loads `checkpoint` with everything known about it.

  Raises:
    CheckpointError / ValueError: one-line messages for user errors.
  """
  source = export.load_source(checkpoint, step=step)
  model_config = source.model_config
  if model_config is None:
    if model is None:
      raise ValueError(f'{checkpoint} carries no model config; name the '
                       'architecture with --model (e.g. --model=B/16)')
    model_config = registry.get_model_config(model)
  run_config = _workdir_run_config(checkpoint)
  if image_size is None and 'image_size' in run_config:
    image_size = run_config['image_size']
  if image_size is None:
    image_size = ckpt.image_size_from_params(source.params, model_config)
  image_size = _pair(image_size)
  num_classes = int(source.params['head']['kernel'].shape[-1])
  names = _class_names(checkpoint, source.classes, class_names_file,
                       num_classes)
  return Classifier(
      model=registry.build_model(model_config, num_classes),
      params=source.params,
      image_size=image_size,
      channels=_input_channels(source.params),
      pp_eval=_eval_preprocessing(run_config, image_size),
      class_names=names)


def _pair(size) -> tuple[int, int]:
  if isinstance(size, int):
    return (size, size)
  return tuple(int(s) for s in size)


def _workdir_run_config(checkpoint: str) -> dict[str, Any]:
  path = os.path.join(checkpoint, 'config.json')
  if os.path.isdir(checkpoint) and os.path.isfile(path):
    with open(path) as f:
      return json.load(f)
  return {}


def _input_channels(params: dict[str, Any]) -> int:
  """Channels the first convolution expects (1 for the digits demo)."""
  first = params['conv_root'] if 'conv_root' in params else params['embedding']
  return int(first['kernel'].shape[2])


def _eval_preprocessing(run_config: dict[str, Any],
                        image_size: tuple[int, int]) -> str:
  """The run's own eval preprocessing, else the paper's (resize, [-1, 1])."""
  if run_config.get('pp_eval'):
    return run_config['pp_eval']
  preset = presets.PRESETS.get(run_config.get('dataset', ''))
  template = preset.pp_eval if preset else presets.PAPER_PP_EVAL
  return presets.format_pp(template, image_size)


def _class_names(checkpoint: str, known: Optional[list[str]],
                 names_file: Optional[str], num_classes: int) -> list[str]:
  """Names from --class_names, the checkpoint, the workdir, or indices."""
  names = known
  if names_file:
    with open(names_file) as f:
      names = [line.strip() for line in f if line.strip()]
  elif names is None:
    path = os.path.join(checkpoint, 'class_names.json')
    if os.path.isfile(path):
      with open(path) as f:
        names = json.load(f).get('class_names')
  if names is None:
    return [str(i) for i in range(num_classes)]
  if len(names) != num_classes:
    raise ValueError(f'{len(names)} class names for a head of {num_classes} '
                     'classes')
  return list(names)


def check_image_files(paths: Sequence[str]) -> None:
  """Raises FileNotFoundError for the first path that is not a file.

  Cheap, so callers check before loading a checkpoint.
  """
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(f'image {path} does not exist')


def load_images(paths: Sequence[str], classifier: Classifier) -> np.ndarray:
  """Decodes and preprocesses image files as the model's eval pipeline does."""
  check_image_files(paths)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from vit_jax import preprocess  # pylint: disable=g-import-not-at-top
  pipeline = preprocess.parse(classifier.pp_eval, channels=classifier.channels)
  images = []
  for path in paths:
    encoded = tf.io.read_file(path)
    try:
      features = pipeline({'image': encoded, 'label': tf.constant(0)})
    except (tf.errors.InvalidArgumentError, ValueError) as e:
      raise ValueError(f'image {path} could not be read: '
                       f'{str(e).splitlines()[0]}') from None
    images.append(np.asarray(features['image'], np.float32))
  return np.stack(images)


def predict_probabilities(classifier: Classifier,
                          images: np.ndarray) -> np.ndarray:
  """Softmax class probabilities, (num_images, num_classes)."""
  logits = jax.jit(classifier.model.apply)({'params': classifier.params},
                                           images)
  return np.asarray(jax.nn.softmax(logits, axis=-1))


def attention_maps(classifier: Classifier, images: np.ndarray):
  """The logits, the per-layer attention weights and the patch grid."""
  apply = jax.jit(lambda p, x: classifier.model.apply(
      {'params': p}, x, return_intermediates=True))
  logits, aux = apply(classifier.params, images)
  weights = [np.asarray(w) for w in aux['attention_weights']]
  return np.asarray(logits), weights, tuple(aux['grid'])
