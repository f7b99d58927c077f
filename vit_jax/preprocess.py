"""Named preprocessing ops, composed from a string or a list.

  fn = preprocess.parse('decode|inception_crop(224)|flip_lr|value_range(-1,1)')
  features = fn({'image': encoded_bytes, 'label': label}, seed=seed)

Each op maps a features dict `{'image': ..., 'label': ...}` to a new one inside
tf.data. Arguments are Python literals, positional or by keyword:
`resize(224)`, `resize((224, 160))`, `inception_crop(224, area_min=0.08)`.
See docs/data.md for the list; `known_ops()` returns it.

Images are uint8 after `decode` and float32 after any resize or crop that
resamples; `value_range` expects the [0, 255] scale of the source pixels.

Randomness: random ops draw only from stateless TF random ops. The composed
function takes one seed (an int64 tensor of shape [2]) and gives op i the seed
`fold_in(seed, i)`, so an example's augmentation is a function of the seed
alone (the input pipeline derives it from the run seed and the example's
position in the stream), independent of threads and of where a run resumed.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from typing import Any, Callable, Sequence

from vit_jax import lazy_imports

# Loads when the first op runs (see lazy_imports).
tf = lazy_imports.LazyModule('tensorflow')

Features = dict[str, 'tf.Tensor']

# The paper's inception crop samples 5%-100% of the image area.
INCEPTION_AREA_RANGE = (0.05, 1.0)
_ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
_RESIZE_METHODS = ('bilinear', 'nearest', 'bicubic', 'area', 'lanczos3')


@dataclasses.dataclass(frozen=True)
class _OpDef:
  builder: Callable[..., Callable[..., Features]]
  random: bool


_REGISTRY: dict[str, _OpDef] = {}


def register(name: str, *, random: bool = False):
  """Registers an op builder under `name`.

  The builder takes the op's arguments and returns `fn(features)`, or
  `fn(features, seed)` when `random` is set.
  """
  def decorator(builder):
    if name in _REGISTRY:
      raise ValueError(f'preprocessing op {name!r} is registered twice')
    _REGISTRY[name] = _OpDef(builder, random)
    return builder
  return decorator


def known_ops() -> tuple[str, ...]:
  """Names of all registered ops, sorted."""
  return tuple(sorted(_REGISTRY))


# ---------------------------------------------------------------- parsing --

@dataclasses.dataclass(frozen=True)
class _BoundOp:
  text: str
  fn: Callable[..., Features]
  random: bool


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """A parsed pipeline: call it on a features dict (and a seed if random)."""
  spec: str
  ops: tuple[_BoundOp, ...]

  @property
  def op_names(self) -> tuple[str, ...]:
    return tuple(op.text.split('(', 1)[0].strip() for op in self.ops)

  @property
  def random(self) -> bool:
    return any(op.random for op in self.ops)

  def __call__(self, features: Features, seed=None) -> Features:
    if self.random and seed is None:
      random_ops = [op.text for op in self.ops if op.random]
      raise ValueError(f'preprocessing {self.spec!r} has random ops '
                       f'{random_ops} and needs a seed')
    features = dict(features)
    if seed is not None:
      seed = _as_seed(seed)
    for i, op in enumerate(self.ops):
      if op.random:
        features = op.fn(features,
                         tf.random.experimental.stateless_fold_in(seed, i))
      else:
        features = op.fn(features)
    return features


_OP_RE = re.compile(r'^\s*([A-Za-z_]\w*)\s*(?:\((.*)\))?\s*$', re.DOTALL)


def parse(spec: str | Sequence[str], *, channels: int = 3) -> Preprocess:
  """Parses `'op1|op2(args)|...'` (or a list of op strings) into a pipeline.

  Args:
    spec: the ops, separated by `|`, or a list with one op per item.
    channels: what `decode` without arguments decodes to (the dataset's
      channel count: 1 for the built-in digits, 3 otherwise).

  Raises:
    ValueError: one line naming the bad op for an unknown op, bad syntax or
      bad arguments.
  """
  if isinstance(spec, str):
    texts = spec.split('|') if spec.strip() else []
    spec_str = spec
  else:
    texts = list(spec)
    spec_str = '|'.join(texts)
  ops = []
  for text in texts:
    if not isinstance(text, str):
      raise ValueError(f'preprocessing ops must be strings, got {text!r} '
                       f'in {spec_str!r}')
    ops.append(_bind_op(text, spec_str, channels))
  return Preprocess(spec_str, tuple(ops))


def _bind_op(text: str, spec: str, channels: int) -> _BoundOp:
  """Parses one op string and builds it with its arguments."""
  if not text.strip():
    raise ValueError(f'empty preprocessing op in {spec!r}')
  match = _OP_RE.match(text)
  if not match:
    raise ValueError(f'bad preprocessing op {text.strip()!r} in {spec!r}: '
                     'expected name or name(arg, ...)')
  name, args_text = match.groups()
  if name not in _REGISTRY:
    raise ValueError(f'unknown preprocessing op {name!r} — known: '
                     f'{", ".join(known_ops())}')
  args, kwargs = _parse_args(args_text or '', text.strip())
  op_def = _REGISTRY[name]
  signature = inspect.signature(op_def.builder)
  if name == 'decode' and not args and 'channels' not in kwargs:
    kwargs['channels'] = channels
  try:
    signature.bind(*args, **kwargs)
    fn = op_def.builder(*args, **kwargs)
  except TypeError as e:
    raise ValueError(f'bad arguments in {text.strip()!r}: {e}; expected '
                     f'{name}{signature}') from None
  return _BoundOp(text.strip(), fn, op_def.random)


def _parse_args(args_text: str, text: str) -> tuple[list[Any], dict[str, Any]]:
  """Parses `1, (2, 3), key='v'` as Python literals."""
  try:
    call = ast.parse(f'_({args_text})', mode='eval').body
  except SyntaxError:
    raise ValueError(f'bad arguments in preprocessing op {text!r}: not a '
                     'Python argument list') from None
  if not isinstance(call, ast.Call) or any(
      isinstance(a, ast.Starred) for a in call.args) or any(
          k.arg is None for k in call.keywords):
    raise ValueError(f'bad arguments in preprocessing op {text!r}')
  try:
    args = [ast.literal_eval(a) for a in call.args]
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
  except ValueError:
    raise ValueError(f'bad arguments in preprocessing op {text!r}: arguments '
                     'must be literals (numbers, strings, tuples)') from None
  return args, kwargs


def _as_seed(seed) -> tf.Tensor:
  """An int, a pair or a tensor of shape [2] as an int64 stateless seed."""
  seed = tf.convert_to_tensor(seed)
  if seed.shape.rank == 0:
    seed = tf.stack([tf.zeros_like(seed), seed])
  return tf.cast(seed, tf.int64)


# ------------------------------------------------------- argument checks --

def _size_arg(op: str, size) -> tuple[int, int]:
  """Accepts `S` or `(H, W)` of positive ints; returns (H, W)."""
  if isinstance(size, int) and not isinstance(size, bool):
    size = (size, size)
  if (not isinstance(size, (tuple, list)) or len(size) != 2 or
      not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
              for s in size)):
    raise ValueError(f'{op}: size must be a positive int or (height, width), '
                     f'got {size!r}')
  return int(size[0]), int(size[1])


def _method_arg(op: str, method: str) -> str:
  if method not in _RESIZE_METHODS:
    raise ValueError(f'{op}: method must be one of {_RESIZE_METHODS}, '
                     f'got {method!r}')
  return method


def _on_image(fn: Callable[[tf.Tensor], tf.Tensor]):
  """Lifts an image -> image function to a features -> features op."""
  def op(features: Features) -> Features:
    return {**features, 'image': fn(features['image'])}
  return op


def _on_image_seeded(fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor]):
  def op(features: Features, seed: tf.Tensor) -> Features:
    return {**features, 'image': fn(features['image'], seed)}
  return op


def _resize_image(image: tf.Tensor, size, method: str) -> tf.Tensor:
  """Resizes to `size`, returning float32 on the input's value scale."""
  resized = tf.image.resize(image, size, method=method, antialias=False)
  resized = tf.cast(resized, tf.float32)
  if image.dtype == tf.uint8 and method not in ('bilinear', 'nearest',
                                                'area'):
    # Cubic kernels overshoot; keep the [0, 255] scale value_range expects.
    resized = tf.clip_by_value(resized, 0.0, 255.0)
  return resized


# ------------------------------------------------------------------- ops --

@register('decode')
def decode(channels: int = 3):
  """Decodes JPEG/PNG/GIF/BMP bytes to uint8 (H, W, channels)."""
  if channels not in (1, 3):
    raise ValueError(f'decode: channels must be 1 or 3, got {channels!r}')

  def fn(encoded):
    image = tf.io.decode_image(encoded, channels=channels,
                               expand_animations=False)
    return tf.ensure_shape(image, [None, None, channels])
  return _on_image(fn)


@register('resize')
def resize(size, method: str = 'bilinear'):
  """Resizes to `size` (S or (H, W)); up- or down-sampling, no antialias."""
  size = _size_arg('resize', size)
  method = _method_arg('resize', method)
  return _on_image(lambda image: _resize_image(image, size, method))


@register('resize_small')
def resize_small(size: int, method: str = 'bilinear'):
  """Resizes so that the smaller side is `size`, keeping the aspect ratio."""
  size = _size_arg('resize_small', size)[0]
  method = _method_arg('resize_small', method)

  def fn(image):
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = size / tf.reduce_min(shape)
    # The smaller side lands exactly on `size`; the other is rounded.
    new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
    return _resize_image(image, new, method)
  return _on_image(fn)


@register('central_crop')
def central_crop(size):
  """Crops the central (H, W) window; fails if the image is smaller."""
  height, width = _size_arg('central_crop', size)

  def fn(image):
    shape = tf.shape(image)
    top = (shape[0] - height) // 2
    left = (shape[1] - width) // 2
    return tf.image.crop_to_bounding_box(image, top, left, height, width)
  return _on_image(fn)


@register('random_crop', random=True)
def random_crop(size):
  """Crops a uniformly placed (H, W) window."""
  height, width = _size_arg('random_crop', size)

  def fn(image, seed):
    channels = tf.shape(image)[-1]
    crop = tf.image.stateless_random_crop(
        image, tf.stack([height, width, channels]), seed)
    return tf.ensure_shape(crop, [height, width, image.shape[-1]])
  return _on_image_seeded(fn)


@register('inception_crop', random=True)
def inception_crop(size, area_min: float = INCEPTION_AREA_RANGE[0],
                   area_max: float = INCEPTION_AREA_RANGE[1],
                   method: str = 'bilinear'):
  """Crops a random window (area fraction and aspect 3/4..4/3), resizes it.

  The defaults reproduce the paper: 5%-100% of the image area.
  """
  size = _size_arg('inception_crop', size)
  method = _method_arg('inception_crop', method)
  if not 0 < area_min <= area_max <= 1:
    raise ValueError('inception_crop: need 0 < area_min <= area_max <= 1, got '
                     f'area_min={area_min!r}, area_max={area_max!r}')

  def fn(image, seed):
    begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.zeros([1, 0, 4]), seed=seed,
        min_object_covered=0.0, aspect_ratio_range=_ASPECT_RATIO_RANGE,
        area_range=(area_min, area_max), max_attempts=100,
        use_image_if_no_bounding_boxes=True)
    crop = tf.slice(image, begin, crop_size)
    return _resize_image(crop, size, method)
  return _on_image_seeded(fn)


@register('flip_lr', random=True)
def flip_lr():
  """Mirrors the image left-right with probability 1/2."""
  return _on_image_seeded(tf.image.stateless_random_flip_left_right)


@register('random_shift', random=True)
def random_shift(pixels: int):
  """Translates by up to ±`pixels` in each direction, filling with 0.

  Pads with zeros (black on the source scale) then crops back to the original
  size, so use it before value_range.
  """
  if not isinstance(pixels, int) or isinstance(pixels, bool) or pixels < 0:
    raise ValueError('random_shift: pixels must be an int >= 0, got '
                     f'{pixels!r}')

  def fn(image, seed):
    shape = tf.shape(image)
    padded = tf.pad(image, [[pixels, pixels], [pixels, pixels], [0, 0]])
    shifted = tf.image.stateless_random_crop(padded, shape, seed)
    return tf.ensure_shape(shifted, image.shape)
  return _on_image_seeded(fn)


@register('value_range')
def value_range(lo: float, hi: float):
  """Maps pixels from [0, 255] linearly onto [lo, hi] as float32."""
  if not all(isinstance(v, (int, float)) and not isinstance(v, bool)
             for v in (lo, hi)) or lo >= hi:
    raise ValueError(f'value_range: need numbers lo < hi, got ({lo!r}, '
                     f'{hi!r})')

  def fn(image):
    # Divide first so that 0 and 255 land exactly on lo and hi.
    unit = tf.cast(image, tf.float32) / 255.0
    return unit * (hi - lo) + lo
  return _on_image(fn)


@register('grayscale_to_rgb')
def grayscale_to_rgb():
  """Repeats a single channel three times; RGB images pass unchanged."""
  def fn(image):
    channels = image.shape[-1]
    if channels == 3:
      return image
    if channels != 1:
      raise ValueError('grayscale_to_rgb: needs a known channel count of 1 '
                       f'or 3 (decode first), got {channels}')
    return tf.tile(image, [1, 1, 3])
  return _on_image(fn)


@register('onehot')
def onehot(num_classes: int, label_smoothing: float = 0.0):
  """Integer label -> float32 one-hot of length `num_classes`, smoothed.

  With smoothing s the target is (1 - s) * onehot + s / num_classes.
  """
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f'onehot: num_classes must be an int >= 1, got '
                     f'{num_classes!r}')
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError('onehot: label_smoothing must be in [0, 1), got '
                     f'{label_smoothing!r}')

  def op(features: Features) -> Features:
    labels = tf.one_hot(features['label'], num_classes, dtype=tf.float32)
    labels = labels * (1.0 - label_smoothing) + label_smoothing / num_classes
    return {**features, 'label': labels}
  return op


# -------------------------------------------------------------- batch ops --

def mixup(batch: Features, seed, *, alpha: float) -> Features:
  """Mixes each example of a batch with its neighbour (mixup, Zhang et al.).

  One ratio `lam ~ Beta(alpha, alpha)` per batch; example i is blended with
  example i - 1 (cyclically), images and one-hot labels alike:
  `x = lam * x_i + (1 - lam) * x_{i-1}`.

  Args:
    batch: dict with float 'image' (B, H, W, C) and one-hot 'label' (B, K).
    seed: stateless seed (int, pair or int64 tensor of shape [2]).
    alpha: the Beta distribution's concentration, > 0.
  """
  if alpha <= 0:
    raise ValueError(f'mixup: alpha must be > 0, got {alpha!r}')
  seed = _as_seed(seed)
  gammas = [
      tf.random.stateless_gamma(
          [], tf.random.experimental.stateless_fold_in(seed, i), alpha=alpha)
      for i in range(2)]
  # Beta(a, a) as a ratio of gammas; both can underflow to 0 for tiny alpha.
  lam = tf.math.divide_no_nan(gammas[0], gammas[0] + gammas[1])

  def blend(x):
    x = tf.cast(x, tf.float32)
    return lam * x + (1.0 - lam) * tf.roll(x, shift=1, axis=0)
  return {**batch, 'image': blend(batch['image']),
          'label': blend(batch['label'])}
