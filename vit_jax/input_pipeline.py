"""Input pipeline: tfds datasets, image folders, the built-in digits -> batches.

Each process reads a disjoint shard of every split and yields numpy batches
of its part of the global batch; the train loop assembles the global
`jax.Array` (`jax.make_array_from_process_local_data`).

Sources (`config.dataset`):
  * a preset of `vit_jax.datasets.presets` (`digits`, `cifar10`, ...);
  * any other tfds name, with splits and classes read from tfds;
  * `folder:/path/to/root`, images in `root/<split>/<class>/*.{jpg,jpeg,png}`.

Determinism: the train stream is a function of (seed, process index, step).
Epoch e of a shard is the shard's records shuffled with a seed derived from
(seed, process, e); example i of the stream is augmented with the stateless
seed (derived seed, i). Records are decoded after shuffling, so resuming at
step k rebuilds epoch e = k * batch // shard_size and skips the encoded
records before the step's first example: it costs reading (not decoding) at
most one epoch of the shard.

Evaluation reads every example of a split exactly once: the last partial
batch is padded, and 'mask' marks real examples (1) and padding (0); every
process yields the same number of batches.
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import functools
import json
import logging
import math
import os
from typing import Iterator

import jax
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from vit_jax import lazy_imports
from vit_jax import preprocess
from vit_jax.datasets import presets

FOLDER_PREFIX = 'folder:'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
CLASS_NAMES_FILE = 'class_names.json'

_FOREVER = 2**62  # End of the infinite index ranges (int64).
# Tags that give the shuffle, augmentation and mixup streams distinct seeds.
_SHUFFLE, _AUGMENT, _MIXUP, _EVAL = range(4)

logger = logging.getLogger(__name__)
# Loads when the first pipeline is built (see lazy_imports).
tf = lazy_imports.LazyModule('tensorflow')


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the train loop needs to know about a dataset.

  `num_eval_examples` is keyed by the resolved eval splits, in order: its
  keys are the splits to pass to `make_eval_iterator`.
  """
  name: str
  num_classes: int
  num_train_examples: int
  num_eval_examples: dict[str, int]
  class_names: tuple[str, ...] | None
  channels: int

  @property
  def eval_splits(self) -> tuple[str, ...]:
    return tuple(self.num_eval_examples)


# ------------------------------------------------------------ sources --

class _Source(abc.ABC):
  """A dataset as shards of cheap (encoded) records plus a `load` step.

  `records` must be deterministic: the same shard in the same order on
  every call. `load` turns a record into {'image': encoded bytes, 'label'}.
  """
  name: str
  num_classes: int
  class_names: tuple[str, ...] | None
  channels: int
  default_train_split: str
  default_eval_splits: tuple[str, ...]
  default_pp_train: str = presets.PAPER_PP_TRAIN
  default_pp_eval: str = presets.PAPER_PP_EVAL

  @abc.abstractmethod
  def records(self, split: str, process_index: int,
              process_count: int) -> tf.data.Dataset:
    """The records of one process's shard of `split`, in a fixed order."""

  @abc.abstractmethod
  def num_examples(self, split: str, process_index: int = 0,
                   process_count: int = 1) -> int:
    """How many records `records` yields for these arguments."""

  def load(self, record):
    return record


class _TfdsSource(_Source):
  """A tfds dataset; images stay encoded until the `decode` op."""

  def __init__(self, name: str, builder: tfds.core.DatasetBuilder,
               data_dir: str | None, preset: presets.Preset | None):
    self.name = name
    self._builder = builder
    self._data_dir = data_dir
    label = _check_features(builder)
    self.num_classes = int(label.num_classes)
    self.class_names = tuple(label.names) if label.names else None
    if preset is None:
      image_channels = builder.info.features['image'].shape[-1]
      self.channels = image_channels if image_channels in (1, 3) else 3
      self.default_train_split = 'train'
      self.default_eval_splits = self._guess_eval_splits()
      return
    if preset.num_classes != self.num_classes:
      raise ValueError(f'preset {name!r} expects {preset.num_classes} '
                       f'classes but tfds {builder.name!r} has '
                       f'{self.num_classes}')
    self.channels = preset.channels
    self.default_train_split = preset.train_split
    self.default_eval_splits = preset.eval_splits
    self.default_pp_train = preset.pp_train
    self.default_pp_eval = preset.pp_eval

  def _guess_eval_splits(self) -> tuple[str, ...]:
    known = list(self._builder.info.splits)
    for split in ('test', 'validation'):
      if not known or split in known:
        return (split,)
    raise ValueError(f'tfds dataset {self.name!r} has neither a test nor a '
                     f'validation split; set config.eval_splits (splits: '
                     f'{", ".join(known)})')

  def records(self, split, process_index, process_count):
    subsplit = tfds.split_for_jax_process(
        split, process_index=process_index, process_count=process_count)
    # Images stay encoded (decoding comes after shuffling); other image
    # features, e.g. segmentation masks, are not decoded at all.
    decoders = {name: tfds.decode.SkipDecoding()
                for name, feature in self._builder.info.features.items()
                if isinstance(feature, tfds.features.Image)}
    try:
      ds = self._builder.as_dataset(split=subsplit, decoders=decoders,
                                    shuffle_files=False)
    except AssertionError:
      if not self._builder.is_prepared():
        raise FileNotFoundError(
            _not_prepared_message(self._builder.name, self._data_dir)
        ) from None
      raise
    except ValueError as e:
      raise ValueError(f'dataset {self.name!r}, split {split!r}: '
                       f'{_first_line(e)}') from None
    return ds.map(_image_and_label)

  def num_examples(self, split, process_index=0, process_count=1):
    # The cardinality tfds asserts is exact for what is read (and is what
    # tfds.testing.mock_data yields, since it ignores split slicing).
    ds = self.records(split, process_index, process_count)
    count = int(ds.cardinality())
    if count >= 0:
      return count
    logger.warning('counting the examples of %s split %r', self.name, split)
    return int(ds.reduce(np.int64(0), lambda n, _: n + 1))


def _check_features(builder) -> tfds.features.ClassLabel:
  """Returns the label feature; the pipeline needs encoded images + labels."""
  features = builder.info.features
  if not ('image' in features and 'label' in features and
          isinstance(features['image'], tfds.features.Image) and
          isinstance(features['label'], tfds.features.ClassLabel)):
    raise ValueError(f'tfds dataset {builder.name!r} needs an Image feature '
                     "'image' and a ClassLabel feature 'label' (it has "
                     f'{", ".join(features)})')
  return features['label']


def _image_and_label(example):
  # Other features (file names, masks, ...) would only fill the buffers.
  return {'image': example['image'], 'label': example['label']}


@dataclasses.dataclass(frozen=True)
class _FolderListing:
  classes: tuple[str, ...]
  # split -> (paths, labels), sorted by (class, file name).
  files: dict[str, tuple[tuple[str, ...], tuple[int, ...]]]
  skipped: tuple[str, ...]


class _FolderSource(_Source):
  """Images in `root/<split>/<class>/*`; classes are sorted folder names.

  Corrupt files (ones PIL cannot identify or verify) are skipped with a
  warning when the folder is listed. Splits accept tfds slicing syntax
  (`train[:90%]`).
  """

  def __init__(self, name: str, root: str):
    self.name = name
    self.root = root
    self._listing = _list_image_folder(root)
    self.num_classes = len(self._listing.classes)
    self.class_names = self._listing.classes
    self.channels = 3
    self.default_train_split = 'train'
    self.default_eval_splits = tuple(
        s for s in sorted(self._listing.files) if s != 'train')

  def _slices(self, split, process_index, process_count):
    split_infos = {
        name: tfds.core.SplitInfo(name=name, shard_lengths=[len(paths)],
                                  num_bytes=0)
        for name, (paths, _) in self._listing.files.items()}
    subsplit = tfds.even_splits(split, process_count)[process_index]
    try:
      return subsplit.to_absolute(split_infos)
    except ValueError as e:
      raise ValueError(f'image folder {self.root}, split {split!r}: '
                       f'{_first_line(e)}') from None

  def _files(self, split, process_index, process_count):
    paths, labels = [], []
    for part in self._slices(split, process_index, process_count):
      all_paths, all_labels = self._listing.files[part.splitname]
      selected = slice(part.from_, part.to)
      paths.extend(all_paths[selected])
      labels.extend(all_labels[selected])
    return paths, labels

  def records(self, split, process_index, process_count):
    paths, labels = self._files(split, process_index, process_count)
    return tf.data.Dataset.from_tensor_slices({
        'path': tf.constant(paths, tf.string),
        'label': tf.constant(labels, tf.int64)})

  def num_examples(self, split, process_index=0, process_count=1):
    return len(self._files(split, process_index, process_count)[0])

  def load(self, record):
    # Reading happens after shuffling, so the shuffle buffer holds paths.
    return {'image': tf.io.read_file(record['path']),
            'label': record['label']}


@functools.lru_cache(maxsize=16)
def _list_image_folder(root: str) -> _FolderListing:
  """Lists `root/<split>/<class>/*` and drops files PIL cannot read."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f'image folder {root!r} does not exist')
  splits = _subdirs(root)
  if 'train' not in splits:
    raise ValueError(f'image folder {root!r} has no train/ directory '
                     f'(expected {root}/train/<class>/*.jpg)')
  classes = _subdirs(os.path.join(root, 'train'))
  if len(classes) < 2:
    raise ValueError(f'image folder {root!r}: train/ needs at least 2 class '
                     f'directories, found {len(classes)} ({list(classes)})')
  files, skipped = {}, []
  for split in splits:
    paths, labels, bad = _list_split(root, split, classes)
    if not paths:
      unreadable = (f' ({len(bad)} unreadable, e.g. {bad[0]})' if bad
                    else '')
      raise ValueError(f'image folder {root!r}: no readable '
                       f'{"/".join(IMAGE_EXTENSIONS)} images in '
                       f'{split}/{unreadable}')
    files[split] = (tuple(paths), tuple(labels))
    skipped.extend(bad)
  if skipped:
    logger.warning('image folder %s: skipped %d unreadable file(s): %s',
                   root, len(skipped), ', '.join(skipped[:10]) +
                   (' ...' if len(skipped) > 10 else ''))
  return _FolderListing(classes, files, tuple(skipped))


def _subdirs(path: str) -> tuple[str, ...]:
  """Sorted names of the directories in `path`, hidden ones left out."""
  return tuple(sorted(d for d in os.listdir(path) if not d.startswith('.')
                      and os.path.isdir(os.path.join(path, d))))


def _list_split(root, split, classes):
  """Returns (paths, labels, unreadable paths) of one split directory."""
  split_dir = os.path.join(root, split)
  unknown = sorted(set(_subdirs(split_dir)) - set(classes))
  if unknown:
    raise ValueError(f'image folder {root!r}: {split}/ has classes that '
                     f'train/ lacks: {", ".join(unknown)}')
  candidates = []
  for label, name in enumerate(classes):
    class_dir = os.path.join(split_dir, name)
    if not os.path.isdir(class_dir):
      continue
    for file_name in sorted(os.listdir(class_dir)):
      if file_name.lower().endswith(IMAGE_EXTENSIONS):
        candidates.append((os.path.join(class_dir, file_name), label))
  with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
    readable = list(pool.map(lambda c: _is_readable_image(c[0]), candidates))
  good = [c for c, ok in zip(candidates, readable) if ok]
  bad = [c[0] for c, ok in zip(candidates, readable) if not ok]
  return [p for p, _ in good], [label for _, label in good], bad


def _is_readable_image(path: str) -> bool:
  """A cheap header check: PIL identifies the format and verifies it."""
  try:
    with Image.open(path) as image:
      image.verify()
    return True
  except (OSError, SyntaxError, ValueError):
    return False


def _open_source(config) -> _Source:
  """Resolves `config.dataset` to a folder, a preset or a tfds dataset."""
  name = config.dataset
  if not isinstance(name, str) or not name:
    raise ValueError(f'config.dataset must be a non-empty string, got '
                     f'{name!r}')
  if name.startswith(FOLDER_PREFIX):
    root = os.path.abspath(os.path.expanduser(name[len(FOLDER_PREFIX):]))
    return _FolderSource(name, root)
  preset = presets.PRESETS.get(name)
  tfds_name = preset.tfds_name if preset else name
  data_dir = config.data_dir or None
  if tfds_name == 'vit_jax_digits':
    from vit_jax.datasets import digits  # pylint: disable=g-import-not-at-top
    digits.ensure_prepared(data_dir)
  try:
    builder = tfds.builder(tfds_name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    if preset is not None:  # e.g. imagenet21k: a builder you prepare.
      raise FileNotFoundError(
          _not_prepared_message(tfds_name, data_dir)) from None
    raise ValueError(
        f'unknown dataset {name!r} — presets: {", ".join(presets.PRESETS)}; '
        'or any tfds name (tfds.list_builders()), or folder:/path/to/images'
    ) from None
  return _TfdsSource(name, builder, data_dir, preset)


def _not_prepared_message(tfds_name: str, data_dir: str | None) -> str:
  where = data_dir or os.environ.get('TFDS_DATA_DIR') or '~/tensorflow_datasets'
  return (f'tfds dataset {tfds_name!r} is not prepared in {where}: prepare '
          f'it on a machine with internet with `tfds build {tfds_name} '
          f'--data_dir={where}` (or tfds.builder({tfds_name!r}, data_dir=...)'
          '.download_and_prepare(); imagenet needs its manual download in '
          '<data_dir>/downloads/manual) and copy the directory here')


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else repr(error)


# ------------------------------------------------------------- public --

def get_dataset_info(config) -> DatasetInfo:
  """Classes, channels and split sizes of `config.dataset`.

  Split sizes are global (all processes). Builds the built-in digits on
  first use. Raises FileNotFoundError (one line, with how to prepare it) when
  a tfds dataset is missing from the data dir.
  """
  source = _open_source(config)
  return _dataset_info(source, config)


def _dataset_info(source: _Source, config) -> DatasetInfo:
  return DatasetInfo(
      name=source.name,
      num_classes=source.num_classes,
      num_train_examples=source.num_examples(_train_split(source, config)),
      num_eval_examples={split: source.num_examples(split)
                         for split in _eval_splits(source, config)},
      class_names=source.class_names,
      channels=source.channels,
  )


def make_train_iterator(config, *, global_batch_size: int,
                        start_step: int = 0, seed: int = 0,
                        process_index: int | None = None,
                        process_count: int | None = None,
                        ) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator over this process's part of each global train batch.

  Yields {'image': float32 (B, H, W, C), 'label': float32 (B, num_classes)}
  with B = global_batch_size / process_count (labels one-hot, smoothed by
  `config.label_smoothing`, mixed by `config.mixup_alpha` when > 0).

  The batches from `start_step` on are bit-equal to those an uninterrupted
  run with the same seed sees from that step (order and augmentation).

  Args:
    config: the training config (see docs/data.md for the fields read).
    global_batch_size: examples per step over all processes.
    start_step: the first step to yield (a resumed run's step).
    seed: the data seed: shuffling, augmentation and mixup derive from it.
    process_index: this process; defaults to `jax.process_index()`.
    process_count: defaults to `jax.process_count()`.
  """
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch_size(global_batch_size, process_count)
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}')
  source = _open_source(config)
  split = _train_split(source, config)
  num_train = source.num_examples(split)
  if global_batch_size > num_train:
    raise ValueError(f'global batch size {global_batch_size} is larger than '
                     f'the train split {split!r} of {source.name} '
                     f'({num_train} examples)')
  pipeline = _pipeline(source, config.pp_train, source.default_pp_train,
                       config, label_smoothing=config.label_smoothing)
  ds = _train_dataset(source, split, pipeline, config,
                      local_batch=local_batch, start_step=start_step,
                      seed=seed, process_index=process_index,
                      process_count=process_count)
  return ds.as_numpy_iterator()


def make_eval_iterator(config, split: str, *, global_batch_size: int,
                       process_index: int | None = None,
                       process_count: int | None = None,
                       ) -> Iterator[dict[str, np.ndarray]]:
  """Iterator over every example of `split` once, in padded batches.

  Yields {'image': float32 (B, H, W, C), 'label': float32 one-hot
  (B, num_classes), 'mask': float32 (B,)} with B = global_batch_size /
  process_count; mask is 1 for real examples and 0 for padding. Every
  process yields ceil(largest shard / B) batches, so collectives line up.
  """
  process_index, process_count = _process(process_index, process_count)
  local_batch = _local_batch_size(global_batch_size, process_count)
  source = _open_source(config)
  pipeline = _pipeline(source, config.pp_eval, source.default_pp_eval,
                       config, label_smoothing=0.0)
  # tfds.even_splits gives process 0 the largest shard.
  largest_shard = source.num_examples(split, 0, process_count)
  num_batches = math.ceil(largest_shard / local_batch)
  ds = _eval_dataset(source, split, pipeline, config, local_batch,
                     process_index, process_count)
  return _padded_batches(ds, local_batch, num_batches)


def write_class_names(info: DatasetInfo, workdir: str) -> None:
  """Writes `workdir/class_names.json`: dataset, num_classes, class_names.

  `class_names` is the list indexed by label (for image folders: the sorted
  folder names), or null when the dataset has no names. Call it from one
  process; the file is written atomically (also on gs:// workdirs).
  """
  tf.io.gfile.makedirs(workdir)
  path = os.path.join(workdir, CLASS_NAMES_FILE)
  content = json.dumps({
      'dataset': info.name,
      'num_classes': info.num_classes,
      'class_names': list(info.class_names) if info.class_names else None,
  }, indent=1)
  tmp_path = path + '.tmp'
  with tf.io.gfile.GFile(tmp_path, 'w') as f:
    f.write(content + '\n')
  tf.io.gfile.rename(tmp_path, path, overwrite=True)


# ------------------------------------------------------------ helpers --

def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f'process index {process_index} is outside '
                     f'[0, {process_count})')
  return process_index, process_count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0:
    raise ValueError(f'global batch size must be > 0, got '
                     f'{global_batch_size}')
  if global_batch_size % process_count:
    raise ValueError(f'global batch size {global_batch_size} is not '
                     f'divisible by the process count {process_count}')
  return global_batch_size // process_count


def _train_split(source: _Source, config) -> str:
  return config.train_split or source.default_train_split


def _eval_splits(source: _Source, config) -> tuple[str, ...]:
  splits = config.eval_splits
  if not splits:  # None or '': the source's default.
    return source.default_eval_splits
  if isinstance(splits, str):  # 'test,train[98%:]' from the command line.
    splits = [s.strip() for s in splits.split(',') if s.strip()]
  return tuple(splits)


def _pipeline(source: _Source, spec, default_template: str, config, *,
              label_smoothing: float) -> preprocess.Preprocess:
  """Parses the configured (or default) spec and appends onehot."""
  if not spec:
    spec = presets.format_pp(default_template, config.image_size)
  pipeline = preprocess.parse(spec, channels=source.channels)
  if not pipeline.op_names or pipeline.op_names[0] != 'decode':
    raise ValueError(f'preprocessing {pipeline.spec!r} must start with '
                     "'decode': the pipeline reads encoded images")
  if 'onehot' not in pipeline.op_names:
    pipeline = preprocess.parse(
        [op.text for op in pipeline.ops] +
        [f'onehot({source.num_classes}, {float(label_smoothing)!r})'],
        channels=source.channels)
  return pipeline


def _derive_seed(seed: int, process_index: int, tag: int) -> int:
  """A well-mixed 32-bit seed for one (seed, process, purpose)."""
  entropy = [int(seed) % 2**64, process_index, tag]
  return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def _identity(record):
  return record


def _finalize(features) -> dict[str, tf.Tensor]:
  """Keeps image and label, as float32."""
  return {'image': tf.cast(features['image'], tf.float32),
          'label': tf.cast(features['label'], tf.float32)}


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  return options


def _train_dataset(source, split, pipeline, config, *, local_batch,
                   start_step, seed, process_index,
                   process_count) -> tf.data.Dataset:
  """The infinite, seeded, resumable train stream of one process."""
  records = source.records(split, process_index, process_count)
  load = source.load
  if config.cache:
    # Caches what `load` returns: encoded images, not decoded pixels.
    records = records.map(load, num_parallel_calls=tf.data.AUTOTUNE).cache()
    load = _identity
  shard_size = source.num_examples(split, process_index, process_count)
  first = start_step * local_batch
  first_epoch, offset = divmod(first, shard_size)
  shuffle_seed = _derive_seed(seed, process_index, _SHUFFLE)
  buffer_size = min(int(config.shuffle_buffer), shard_size)

  def epoch(index):
    if buffer_size <= 1:
      return records
    return records.shuffle(buffer_size, seed=shuffle_seed + index,
                           reshuffle_each_iteration=False)

  stream = tf.data.Dataset.range(first_epoch, _FOREVER).flat_map(epoch)
  # Skipping encoded records is cheap: nothing is decoded yet.
  stream = stream.skip(offset)
  positions = tf.data.Dataset.range(first, _FOREVER)
  augment_seed = tf.constant(_derive_seed(seed, process_index, _AUGMENT),
                             tf.int64)

  def process(position, record):
    example = pipeline(load(record), seed=tf.stack([augment_seed, position]))
    return _finalize(example)

  ds = tf.data.Dataset.zip((positions, stream))
  ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE,
              deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True)
  if config.mixup_alpha > 0:
    ds = _mixup(ds, start_step, _derive_seed(seed, process_index, _MIXUP),
                float(config.mixup_alpha))
  return _prefetch(ds, config).with_options(_options())


def _mixup(ds, start_step, mixup_seed, alpha) -> tf.data.Dataset:
  seed = tf.constant(mixup_seed, tf.int64)

  def mix(step, batch):
    return preprocess.mixup(batch, tf.stack([seed, step]), alpha=alpha)

  steps = tf.data.Dataset.range(start_step, _FOREVER)
  return tf.data.Dataset.zip((steps, ds)).map(mix)


def _prefetch(ds, config) -> tf.data.Dataset:
  return ds.prefetch(config.prefetch) if config.prefetch else ds


def _eval_dataset(source, split, pipeline, config, local_batch,
                  process_index, process_count) -> tf.data.Dataset:
  """One pass over this process's shard of `split`, batches not padded."""
  records = source.records(split, process_index, process_count)
  # A fixed seed keeps evaluation repeatable should the spec be random.
  eval_seed = tf.constant(_derive_seed(0, process_index, _EVAL), tf.int64)

  def process(position, record):
    example = _finalize(pipeline(source.load(record),
                                 seed=tf.stack([eval_seed, position])))
    return {**example, 'mask': tf.constant(1.0, tf.float32)}

  ds = records.enumerate().map(process, num_parallel_calls=tf.data.AUTOTUNE,
                               deterministic=True)
  ds = ds.batch(local_batch)
  return _prefetch(ds, config).with_options(_options())


def _padded_batches(ds: tf.data.Dataset, local_batch: int,
                    num_batches: int) -> Iterator[dict[str, np.ndarray]]:
  """Pads the last batch and appends all-padding batches up to num_batches."""
  spec = ds.element_spec
  template = None
  count = 0
  for batch in ds.as_numpy_iterator():
    count += 1
    if count > num_batches:
      raise RuntimeError(f'eval shard has more than {num_batches} batches '
                         'of the largest shard; dataset sizes are '
                         'inconsistent')
    template = batch
    yield _pad_batch(batch, local_batch)
  for _ in range(count, num_batches):
    yield _empty_batch(template, spec, local_batch)


def _pad_batch(batch, local_batch):
  missing = local_batch - len(batch['mask'])
  if not missing:
    return batch
  return {k: np.concatenate([v, np.zeros((missing,) + v.shape[1:], v.dtype)])
          for k, v in batch.items()}


def _empty_batch(template, spec, local_batch):
  """An all-padding batch shaped like the real ones (mask all 0)."""
  if template is not None:
    return {k: np.zeros((local_batch,) + v.shape[1:], v.dtype)
            for k, v in template.items()}
  shapes = {k: s.shape[1:] for k, s in spec.items()}
  if not all(shape.is_fully_defined() for shape in shapes.values()):
    raise ValueError('eval preprocessing must produce fixed-size images to '
                     f'pad an empty shard, got {shapes}')
  return {k: np.zeros((local_batch,) + tuple(shapes[k]),
                      spec[k].dtype.as_numpy_dtype) for k in spec}
