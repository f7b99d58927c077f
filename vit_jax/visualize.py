"""Attention-rollout maps of a ViT's prediction, overlaid on the image.

    python -m vit_jax.visualize --checkpoint=runs/demo/finetune \
        --image=digit.png --out=map.png

Writes one PNG: the image, the rollout of the whole network overlaid on it
(class token to patches; see `vit_jax.rollout`), and the cumulative rollout
after each layer. Works at any resolution and patch size the checkpoint
supports.
"""

import sys
from typing import Optional, Sequence

from absl import app
from absl import flags
import jax
import numpy as np

from vit_jax import checkpoint as ckpt
from vit_jax import inference
from vit_jax import rollout


def upsample(relevance: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """A (grid_h, grid_w) map resized smoothly to the image's (h, w)."""
  return np.asarray(jax.image.resize(relevance, size, 'bilinear'))


def rollout_maps(classifier: inference.Classifier, images: np.ndarray):
  """Per-layer cumulative rollout maps at image resolution, and the logits.

  Returns:
    (logits, maps) with maps of shape (layers, batch, height, width) in [0, 1].
  """
  logits, weights, grid = inference.attention_maps(classifier, images)
  per_layer = rollout.rollout(weights)
  maps = []
  for rolled in per_layer:
    relevance = rollout.patch_map(rolled, grid, classifier.has_class_token)
    maps.append(np.stack([upsample(r, images.shape[1:3]) for r in relevance]))
  return logits, np.stack(maps)


def _display(image: np.ndarray) -> np.ndarray:
  """Preprocessed pixels back to [0, 1] for display (grayscale squeezed)."""
  low, high = image.min(), image.max()
  shown = (image - low) / max(high - low, 1e-12)
  return shown[..., 0] if shown.shape[-1] == 1 else shown


def save_figure(image: np.ndarray, maps: np.ndarray, title: str,
                out: str) -> None:
  """Image, final rollout overlay, and one small map per layer."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  layers = maps.shape[0]
  columns = 2 + layers
  fig, axes = plt.subplots(1, columns, figsize=(2.2 * columns, 2.6))
  shown = _display(image)
  cmap = 'gray' if shown.ndim == 2 else None
  axes[0].imshow(shown, cmap=cmap)
  axes[0].set_title('image', fontsize=8)
  axes[1].imshow(shown, cmap=cmap)
  axes[1].imshow(maps[-1], cmap='jet', alpha=0.5)
  axes[1].set_title(title, fontsize=8)
  for layer in range(layers):
    axes[2 + layer].imshow(maps[layer], cmap='viridis', vmin=0, vmax=1)
    axes[2 + layer].set_title(f'after block {layer}', fontsize=8)
  for ax in axes:
    ax.axis('off')
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)


def visualize(checkpoint: str, image_path: str, out: str, *,
              model: Optional[str] = None, step: Optional[int] = None) -> str:
  """Writes the rollout figure of one image; returns the predicted class."""
  inference.check_image_files([image_path])
  classifier = inference.load_classifier(checkpoint, model=model, step=step)
  images = inference.load_images([image_path], classifier)
  logits, maps = rollout_maps(classifier, images)
  best = int(np.argmax(logits[0]))
  probability = float(jax.nn.softmax(logits[0])[best])
  label = f'{classifier.class_names[best]} ({100 * probability:.0f}%)'
  save_figure(images[0], maps[:, 0], f'rollout: {label}', out)
  return label


def define_flags() -> None:
  """Flags, defined only when run as a program."""
  flags.DEFINE_string('checkpoint', None, 'Workdir, .npz, .safetensors or HF '
                      'directory.', required=True)
  flags.DEFINE_string('image', None, 'The image file.', required=True)
  flags.DEFINE_string('out', 'attention_map.png', 'The PNG to write.')
  flags.DEFINE_string('model', None, 'Architecture when the checkpoint has '
                      'no model config (e.g. B/16).')
  flags.DEFINE_integer('step', None, 'Training step of a workdir.')


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    sys.exit(f'visualize: error: unexpected arguments {argv[1:]}')
  flag_values = flags.FLAGS
  try:
    label = visualize(flag_values.checkpoint, flag_values.image,
                      flag_values.out, model=flag_values.model,
                      step=flag_values.step)
  except (ckpt.CheckpointError, ValueError, FileNotFoundError) as error:
    sys.exit(f'visualize: error: {error}')
  print(f'{flag_values.out}: predicted {label}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
