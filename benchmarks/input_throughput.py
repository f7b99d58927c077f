r"""Images per second the input pipeline delivers, alone (no model).

    python benchmarks/input_throughput.py            # the real run (~1 min)
    python benchmarks/input_throughput.py --smoke    # a few seconds

Cases: the digits train pipeline at 8px and 16px (the demo's pretraining and
fine-tuning inputs) and a generated folder of 224x224 JPEGs (10 classes)
through the paper's train pipeline (inception crop + flip) and eval pipeline.
Each case is warmed up, then timed over several windows of batches; the
table shows the median (and the spread) of images/s over the windows.

Writes the numbers as JSON to --out.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

# Runnable as a file from anywhere, like the other benchmarks.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import ml_collections
import numpy as np
from PIL import Image

from vit_jax import cpu_info
from vit_jax import input_pipeline
# pylint: enable=g-import-not-at-top,wrong-import-position

_RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        'results')


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default=None,
                      help='JSON results path (default: benchmarks/results/'
                      'input_throughput.json, or input_throughput_smoke.json '
                      'with --smoke, so a smoke run keeps the real numbers)')
  parser.add_argument('--smoke', action='store_true',
                      help='tiny and fast: checks that the script runs')
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--windows', type=int, default=5,
                      help='timed windows per case (median reported)')
  parser.add_argument('--window_batches', type=int, default=20,
                      help='batches per timed window')
  parser.add_argument('--folder_images', type=int, default=512)
  parser.add_argument('--data_dir', default=None,
                      help='tfds data dir for the digits (default: a '
                      'temporary one, built in about a second)')
  args = parser.parse_args(argv)
  if args.smoke:
    args.batch_size, args.windows, args.window_batches = 16, 2, 2
    args.folder_images = 40
  if args.out is None:
    name = 'input_throughput_smoke.json' if args.smoke else (
        'input_throughput.json')
    args.out = os.path.join(_RESULTS, name)
  return args


def _config(**overrides) -> ml_collections.ConfigDict:
  """The input fields of the training config (configs/common.py)."""
  config = dict(dataset='digits', data_dir=None, train_split=None,
                eval_splits=None, image_size=8, pp_train='', pp_eval='',
                label_smoothing=0.0, mixup_alpha=0.0, shuffle_buffer=50_000,
                cache=False, prefetch=2)
  config.update(overrides)
  return ml_collections.ConfigDict(config)


def write_jpeg_folder(root: str, num_images: int, *, size: int = 224,
                      num_classes: int = 10, seed: int = 0) -> None:
  """root/{train,test}/class_k/*.jpg with smooth random content.

  Smooth blobs plus mild noise compress like photos (~10-20 kB at 224px);
  pure noise would make every JPEG unrealistically large and slow to decode.
  """
  rng = np.random.default_rng(seed)
  for i in range(num_images):
    split = 'test' if i % 8 == 7 else 'train'
    class_dir = os.path.join(root, split, f'class_{i % num_classes}')
    os.makedirs(class_dir, exist_ok=True)
    coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    pixels = np.asarray(image, np.int16) + rng.integers(
        -8, 9, (size, size, 3), dtype=np.int16)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        os.path.join(class_dir, f'{i:05d}.jpg'), quality=90)


def measure(make_iterator, *, windows: int, window_batches: int) -> dict:
  """Median images/s over timed windows after a warm-up of one window.

  Padding in eval batches is not counted: only examples with mask 1.
  """
  iterator = make_iterator()
  for _ in range(window_batches):  # Warm-up: fills buffers, builds graphs.
    next(iterator)
  rates = []
  for _ in range(windows):
    start = time.perf_counter()
    images = sum(_real_examples(next(iterator))
                 for _ in range(window_batches))
    rates.append(images / (time.perf_counter() - start))
  return {'images_per_s': statistics.median(rates),
          'min_images_per_s': min(rates), 'max_images_per_s': max(rates)}


def _real_examples(batch) -> int:
  if 'mask' in batch:
    return int(batch['mask'].sum())
  return len(batch['image'])


def _cycle_eval(config, split, batch_size):
  """Eval batches forever (the eval iterator ends after one pass)."""
  def make():
    while True:
      yield from input_pipeline.make_eval_iterator(
          config, split, global_batch_size=batch_size)
  return make


def _cases(args, data_dir, folder):
  """(name, image size, iterator factory) of every benchmarked pipeline."""
  batch = args.batch_size
  cases = []
  for size in (8, 16):
    config = _config(dataset='digits', data_dir=data_dir, image_size=size,
                     cache=True)
    cases.append(('digits train (cached)', size,
                  lambda c=config: input_pipeline.make_train_iterator(
                      c, global_batch_size=batch)))
  config = _config(dataset=f'folder:{folder}', image_size=224)
  cases.append(('folder train (inception_crop|flip_lr)', 224,
                lambda: input_pipeline.make_train_iterator(
                    config, global_batch_size=batch)))
  # Eval iterators are rebuilt each pass, as train.py does at every eval.
  cases.append(('folder eval (resize)', 224,
                _cycle_eval(config, 'train', batch)))
  return cases


def _print_table(rows, args):
  print(f'\ninput pipeline throughput: batch {args.batch_size}, median of '
        f'{args.windows} windows x {args.window_batches} batches, '
        f'{os.cpu_count()} CPU cores')
  header = (f'{"pipeline":42s} {"size":>5s} {"img/s":>9s} {"min":>9s} '
            f'{"max":>9s}')
  print(header)
  print('-' * len(header))
  for row in rows:
    print(f'{row["pipeline"]:42s} {row["image_size"]:5d} '
          f'{row["images_per_s"]:9.0f} {row["min_images_per_s"]:9.0f} '
          f'{row["max_images_per_s"]:9.0f}')


def main(argv=None) -> int:
  args = _parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = args.data_dir or os.path.join(tmp, 'tfds')
    folder = os.path.join(tmp, 'folder')
    write_jpeg_folder(folder, args.folder_images)
    rows = []
    for name, size, make_iterator in _cases(args, data_dir, folder):
      result = measure(make_iterator, windows=args.windows,
                       window_batches=args.window_batches)
      rows.append({'pipeline': name, 'image_size': size, **result})
  _print_table(rows, args)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'batch_size': args.batch_size, 'windows': args.windows,
               'window_batches': args.window_batches,
               'folder_images': args.folder_images, 'smoke': args.smoke,
               'cpu_count': os.cpu_count(), 'machine': platform.machine(),
               'cpu_features': cpu_info.vector_features(),
               'results': rows}, f, indent=1)
  print(f'\nwrote {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
