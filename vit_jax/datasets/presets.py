"""The one table of dataset presets: tfds name, splits, classes, preprocessing.

`config.dataset` may name a preset below, any other tfds dataset (its splits
and classes are then read from tfds), or `folder:/path` for an image folder.
Importing this module is cheap: it needs neither TensorFlow nor tfds.

Splits follow the paper's fine-tuning setup: a slice of the training set is
held out as minival (2% for CIFAR, 10% for pets and flowers, 1% for ImageNet)
and evaluation runs on the official test/validation split.

Preprocessing templates take the image size S; `format_pp` fills it in:
  train: decode|inception_crop(S)|flip_lr|value_range(-1,1)   (paper)
  eval:  decode|resize(S)|value_range(-1,1)                    (paper)
  digits train: decode|resize(S)|random_shift(max(1, S//8))|value_range(-1,1)
The digits shift is one source pixel at any size: ±1 px at 8x8, ±2 px after
upsampling to 16x16; digits are too small and too centred for inception crops.
"""

import dataclasses

PAPER_PP_TRAIN = 'decode|inception_crop({size})|flip_lr|value_range(-1,1)'
PAPER_PP_EVAL = 'decode|resize({size})|value_range(-1,1)'
DIGITS_PP_TRAIN = ('decode|resize({size})|random_shift({shift})|'
                   'value_range(-1,1)')


@dataclasses.dataclass(frozen=True)
class Preset:
  """One row of the table; `num_train_examples` counts `train_split`."""
  name: str
  tfds_name: str
  train_split: str
  eval_splits: tuple[str, ...]
  num_classes: int
  num_train_examples: int
  channels: int = 3
  pp_train: str = PAPER_PP_TRAIN
  pp_eval: str = PAPER_PP_EVAL

  def pp_train_for(self, image_size) -> str:
    """The default train preprocessing at `image_size` (S or (H, W))."""
    return format_pp(self.pp_train, image_size)

  def pp_eval_for(self, image_size) -> str:
    """The default eval preprocessing at `image_size` (S or (H, W))."""
    return format_pp(self.pp_eval, image_size)


PRESETS: dict[str, Preset] = {p.name: p for p in (
    # Built into the package (vit_jax/datasets/digits.py); no download.
    Preset('digits', 'vit_jax_digits', 'train', ('test',), 10, 1_437,
           channels=1, pp_train=DIGITS_PP_TRAIN),
    Preset('cifar10', 'cifar10', 'train[:98%]', ('test',), 10, 49_000),
    Preset('cifar100', 'cifar100', 'train[:98%]', ('test',), 100, 49_000),
    Preset('oxford_iiit_pet', 'oxford_iiit_pet', 'train[:90%]', ('test',),
           37, 3_312),
    Preset('oxford_flowers102', 'oxford_flowers102', 'train[:90%]',
           ('test',), 102, 918),
    Preset('imagenet2012', 'imagenet2012', 'train[:99%]', ('validation',),
           1_000, 1_268_355),
    # Not in public tfds: prepare your own `imagenet21k` builder (fall11
    # release, 14,197,122 images, one split `full`); the first 51,200 images
    # are held out as in big_vision. The train count assumes that release.
    Preset('imagenet21k', 'imagenet21k', 'full[51200:]', ('full[:51200]',),
           21_843, 14_145_922),
)}


def get_preset(name: str) -> Preset:
  """Returns the preset called `name`; ValueError listing them if unknown."""
  if name not in PRESETS:
    raise ValueError(f'unknown dataset preset {name!r} — presets: '
                     f'{", ".join(PRESETS)}')
  return PRESETS[name]


def format_size(image_size) -> str:
  """`224` -> '224'; `(224, 160)` -> '(224, 160)' (as ops take sizes)."""
  height, width = _size_pair(image_size)
  return str(height) if height == width else f'({height}, {width})'


def format_pp(template: str, image_size) -> str:
  """Fills `{size}` (and `{shift}`, one source digit pixel) into a template."""
  height, width = _size_pair(image_size)
  return template.format(size=format_size(image_size),
                         shift=max(1, min(height, width) // 8))


def _size_pair(image_size) -> tuple[int, int]:
  if isinstance(image_size, int) and not isinstance(image_size, bool):
    image_size = (image_size, image_size)
  if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2 or
      not all(isinstance(s, int) and s > 0 for s in image_size)):
    raise ValueError('image_size must be a positive int or (height, width), '
                     f'got {image_size!r}')
  return int(image_size[0]), int(image_size[1])
