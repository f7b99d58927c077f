"""The built-in offline dataset: scikit-learn's handwritten digits as tfds.

`sklearn.datasets.load_digits` ships 1,797 real 8x8 grayscale scans of the
digits 0-9 inside scikit-learn, so this builder needs no download and the
demo and end-to-end tests run offline through the same tfds path as ImageNet.

Fixed split (documented in docs/data.md, checked by tests):
  `sklearn.model_selection.train_test_split(range(1797), test_size=360,
  stratify=labels, random_state=0)` -> 1,437 train / 360 test examples.

Pixels: the source values 0..16 are stored as uint8 `round(v * 255 / 16)`, so
0 stays black and 16 becomes 255; images have shape (8, 8, 1).

The builder registers itself with tfds as `vit_jax_digits` when this module is
imported; `ensure_prepared()` builds it into the tfds data dir on first use
(about a second) and reuses it afterwards.
"""

from typing import Iterator

import numpy as np
import tensorflow_datasets as tfds

NAME = 'vit_jax_digits'
NUM_TRAIN_EXAMPLES = 1_437
NUM_TEST_EXAMPLES = 360
NUM_CLASSES = 10
# The split is a function of this seed; changing it changes the dataset.
_SPLIT_SEED = 0

_DESCRIPTION = """\
The 1,797 8x8 handwritten digits bundled with scikit-learn
(`sklearn.datasets.load_digits`, a copy of the UCI optical recognition of
handwritten digits test set), stored as uint8 images round(v * 255 / 16) with
a fixed stratified split of 1,437 train and 360 test examples
(train_test_split(test_size=360, stratify=y, random_state=0)).
"""

_CITATION = """\
@misc{uci_optdigits,
  author = {Alpaydin, E. and Kaynak, C.},
  title = {Optical Recognition of Handwritten Digits},
  year = {1998},
  howpublished = {UCI Machine Learning Repository},
}
"""


def _load_digits():
  """scikit-learn's digits bunch (images 0..16, target 0..9)."""
  # Imported here: scikit-learn (~2 s to import) is needed only to build.
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  return datasets.load_digits()


def _split_indices() -> dict[str, np.ndarray]:
  """Returns the example indices of the fixed train/test split."""
  from sklearn import model_selection  # pylint: disable=g-import-not-at-top
  labels = _load_digits().target
  train, test = model_selection.train_test_split(
      np.arange(len(labels)), test_size=NUM_TEST_EXAMPLES, stratify=labels,
      random_state=_SPLIT_SEED)
  return {'train': np.sort(train), 'test': np.sort(test)}


def to_uint8(values: np.ndarray) -> np.ndarray:
  """Maps scikit-learn's digit intensities 0..16 onto uint8 0..255."""
  return np.round(np.asarray(values, np.float64) * 255.0 / 16.0).astype(
      np.uint8)


class VitJaxDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits with a fixed stratified split."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release: 1,437 train / 360 test.'}

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly: dataset_info_from_configs() looks for metadata files
    # beside a builder module, which a builder inside a package lacks.
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1)),
            'label': tfds.features.ClassLabel(
                names=[str(d) for d in range(NUM_CLASSES)]),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html',
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships inside scikit-learn.
    indices = _split_indices()
    return {name: self._generate_examples(idx)
            for name, idx in indices.items()}

  def _generate_examples(self, indices: np.ndarray) -> Iterator[tuple]:
    digits = _load_digits()
    images = to_uint8(digits.images)[..., None]
    for i in indices:
      # The index into load_digits() is the key, so every example can be
      # traced back to its source row.
      yield int(i), {'image': images[i], 'label': int(digits.target[i])}


def ensure_prepared(data_dir: str | None = None) -> VitJaxDigits:
  """Returns the digits builder, building it into `data_dir` if needed.

  Args:
    data_dir: tfds data dir; None means `TFDS_DATA_DIR` or tfds's default
      (~/tensorflow_datasets).
  """
  builder = VitJaxDigits(data_dir=data_dir)
  if builder.is_prepared():
    return builder
  try:
    builder.download_and_prepare()
  except OSError:
    # Another process (e.g. a second host sharing the data dir) may have
    # renamed its finished copy into place first; that copy is as good.
    if not VitJaxDigits(data_dir=data_dir).is_prepared():
      raise
  # A fresh builder reads its info back from the prepared files.
  return VitJaxDigits(data_dir=data_dir)
