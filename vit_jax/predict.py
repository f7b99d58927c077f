"""Top-k classes for image files from any supported checkpoint.

    python -m vit_jax.predict --checkpoint=runs/demo/finetune \
        --images a.png b.jpg [--top_k=5] [--json]

`--checkpoint` is a training workdir, an `.npz` (add `--model=B/16` when it
has no model card), a timm safetensors file or an HF directory. Images are
preprocessed like the model's eval split (the workdir's `pp_eval`, else the
paper's resize to the training resolution and pixels in [-1, 1]).
"""

import json
import sys
from typing import Optional, Sequence

from absl import app
from absl import flags
import numpy as np

from vit_jax import checkpoint as ckpt
from vit_jax import inference


def top_k(probabilities: np.ndarray, class_names: Sequence[str],
          k: int) -> list[list[tuple[str, float]]]:
  """The k most likely (name, probability) pairs of every image."""
  k = min(k, probabilities.shape[-1])
  order = np.argsort(-probabilities, axis=-1, kind='stable')[:, :k]
  return [[(class_names[i], float(row[i])) for i in indices]
          for row, indices in zip(probabilities, order)]


def format_predictions(paths: Sequence[str], predictions) -> str:
  lines = []
  for path, best in zip(paths, predictions):
    lines.append(path)
    lines += [f'  {100 * p:6.2f}%  {name}' for name, p in best]
  return '\n'.join(lines)


def predict(checkpoint: str, image_paths: Sequence[str], *, k: int = 5,
            model: Optional[str] = None, step: ckpt.StepChoice = None,
            class_names_file: Optional[str] = None) -> list:
  """Loads the checkpoint and returns top-k predictions for each image."""
  inference.check_image_files(image_paths)
  classifier = inference.load_classifier(
      checkpoint, model=model, step=step, class_names_file=class_names_file)
  images = inference.load_images(image_paths, classifier)
  probabilities = inference.predict_probabilities(classifier, images)
  return top_k(probabilities, classifier.class_names, k)


def define_flags() -> None:
  """Flags, defined only when run as a program."""
  flags.DEFINE_string('checkpoint', None, 'Workdir, .npz, .safetensors or HF '
                      'directory.', required=True)
  flags.DEFINE_list('images', None, 'Image files (comma- or space-separated).',
                    required=True)
  flags.DEFINE_integer('top_k', 5, 'Classes to show per image.')
  flags.DEFINE_bool('json', False, 'Print JSON instead of a table.')
  flags.DEFINE_string('model', None, 'Architecture when the checkpoint has '
                      'no model config (e.g. B/16).')
  flags.DEFINE_string('step', None, 'Training step of a workdir: a number, '
                      '"best" (its best_checkpoint_metric), or the latest by '
                      'default.')
  flags.DEFINE_string('class_names', None, 'A text file with one class name '
                      'per line, in label order.')


def main(argv: Sequence[str]) -> None:
  flag_values = flags.FLAGS
  # Space-separated image paths arrive as extra arguments.
  paths = list(flag_values.images) + list(argv[1:])
  try:
    predictions = predict(flag_values.checkpoint, paths, k=flag_values.top_k,
                          model=flag_values.model,
                          step=ckpt.parse_step(flag_values.step),
                          class_names_file=flag_values.class_names)
  except (ckpt.CheckpointError, ValueError, FileNotFoundError) as error:
    sys.exit(f'predict: error: {error}')
  if flag_values.json:
    print(json.dumps([{'image': path, 'top_k': [
        {'class': name, 'probability': p} for name, p in best]}
                      for path, best in zip(paths, predictions)], indent=1))
  else:
    print(format_predictions(paths, predictions))


if __name__ == '__main__':
  define_flags()
  app.run(main)
