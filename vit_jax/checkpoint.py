"""Checkpoints in and out: official .npz, HF ViT directories, timm safetensors.

Loading
  * `load_npz(path)`: an .npz of flat '/'-joined keys, in any of the layouts
    listed in `normalize_layout` (released naming, linen-default names,
    big_vision's `params/` tree with a scanned encoder, hybrid stems under
    `ResNet/`, GroupNorm scales with leading singleton dims). Always
    `allow_pickle=False`; an unreadable file is one `CheckpointError` line.
  * `load_hf_dir(path)`: `config.json` + `model.safetensors` of an HF ViT.
  * `load_checkpoint(path)`: dispatches on npz file / HF dir / timm
    safetensors file / training workdir.

Fine-tuning
  * `adapt_params(loaded, init_params, model_config=...)`: the surgery that
    fits a checkpoint to a freshly initialised model (position embeddings
    resampled, head re-initialised, pre_logits dropped) and reports it.

Writing
  * `save_npz`, `save_hf_dir`, `save_timm_safetensors`, each atomic and each
    with a JSON model card (`<file>.json`, or `model_card.json` inside the HF
    directory).
"""

import dataclasses
import datetime
import json
import math
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from typing import Any, Mapping, Optional, Sequence, Union

from absl import logging
import jax
import ml_collections
import numpy as np
import safetensors.numpy

import vit_jax
from vit_jax import interop
from vit_jax import posemb as posemb_lib
from vit_jax.interop import hf as hf_interop
from vit_jax.interop import timm as timm_interop
from vit_jax.models import registry

# Which checkpoint of a training workdir: None (the latest), 'best' (by the
# run's best_checkpoint_metric) or a step number.
StepChoice = Union[int, str, None]

POSEMB = 'Transformer/posembed_input/pos_embedding'
HF_CARD = 'model_card.json'

# Linen's automatic names inside an encoder block -> the released names.
_LINEN_TO_RELEASED = {
    'LayerNorm_0': 'LayerNorm_0',
    'MultiHeadDotProductAttention_0': 'MultiHeadDotProductAttention_1',
    'LayerNorm_1': 'LayerNorm_2',
    'MlpBlock_0': 'MlpBlock_3',
}
_TREE_PREFIXES = ('opt/target/', 'params/')
_PUBLIC_FILE, _PUBLIC_DIR = 0o644, 0o755
_GROUP_NORM_RE = re.compile(r'(^|/)gn(_root|_proj|\d+)/(scale|bias)$')


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not fit (a one-line message)."""


# ----------------------------------------------------------------- npz files


def load_npz(path: str) -> dict[str, Any]:
  """Reads an .npz checkpoint into a nested dict of numpy arrays.

  Any layout that `normalize_layout` knows comes back in the released naming.
  Raises CheckpointError (one line naming the file) for missing, truncated,
  corrupted or pickle-bearing files.
  """
  flat = _read_npz(path)
  try:
    flat, layout = normalize_layout(flat)
  except CheckpointError as e:
    raise CheckpointError(f'{path}: {e}') from None
  logging.info('Loaded %s (%d arrays, layout: %s)', path, len(flat),
               ', '.join(layout))
  return interop.unflatten_params(flat)


def _read_npz(path: str) -> dict[str, np.ndarray]:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise CheckpointError(f'{path}: no such checkpoint file')
  if not zipfile.is_zipfile(path) and not _is_npy(path):
    # np.load would call any other file "pickled data", which misleads.
    raise CheckpointError(f'{path}: not an .npz archive (not a zip file: '
                          'truncated, corrupted or another format)')
  try:
    archive = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise CheckpointError(
        f'{path}: not a readable .npz archive (truncated, corrupted or not '
        f'numpy data): {_one_line(e)}') from None
  if not isinstance(archive, np.lib.npyio.NpzFile):
    raise CheckpointError(f'{path}: holds a single array, not an .npz '
                          'archive of named parameters')
  with archive:
    flat = {key: _read_member(archive, key, path) for key in archive.files}
  if not flat:
    raise CheckpointError(f'{path}: the .npz archive is empty')
  return flat


def _is_npy(path: str) -> bool:
  """Whether `path` starts like a single-array .npy file."""
  with open(path, 'rb') as f:
    return f.read(6) == b'\x93NUMPY'


def _read_member(archive, key: str, path: str) -> np.ndarray:
  try:
    array = archive[key]
  except ValueError as e:
    if 'allow_pickle' in str(e):
      raise CheckpointError(
          f'{path}: array {key!r} holds pickled Python objects; refusing to '
          'unpickle (allow_pickle=False)') from None
    raise CheckpointError(f'{path}: array {key!r} is corrupted: '
                          f'{_one_line(e)}') from None
  except (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
    raise CheckpointError(f'{path}: array {key!r} is truncated or corrupted: '
                          f'{_one_line(e)}') from None
  if array.dtype.kind not in 'biuf':
    raise CheckpointError(f'{path}: array {key!r} has dtype {array.dtype}, '
                          'not numbers')
  return array


def normalize_layout(flat: Mapping[str, np.ndarray]
                     ) -> tuple[dict[str, np.ndarray], list[str]]:
  """Brings flat checkpoint keys into the released layout.

  Detected from the keys, in this order (each step is a no-op when absent):
    * `params/` (big_vision, flax variables) or `opt/target/` (old flax
      optimizer checkpoints) around the parameters: stripped, and arrays
      outside it (optimizer state, step) ignored;
    * `ResNet/` around a hybrid's stem: stripped (the released files keep
      `conv_root`, `gn_root`, `block*` at the top level);
    * big_vision's `pos_embedding` at the top level, added to the patches
      before the class token is prepended: moved to
      `Transformer/posembed_input/pos_embedding` with a zero row in front for
      the class token (the same function);
    * a scanned encoder, `Transformer/encoderblock/...` with a leading layer
      axis: unstacked into `encoderblock_{i}`;
    * linen-default names inside blocks (`MultiHeadDotProductAttention_0`,
      `LayerNorm_1`, `MlpBlock_0`): renamed to the released ones;
    * GroupNorm scale/bias stored as (1, 1, 1, C): squeezed to (C,).

  Returns:
    (flat params in the released layout, the names of the steps applied;
    ['released'] when none was needed).
  """
  flat = dict(flat)
  layout = []
  for step in (_strip_tree_prefix, _strip_resnet_prefix,
               _move_big_vision_posemb, _unstack_scanned_encoder,
               _rename_linen_blocks, _squeeze_group_norm):
    flat, applied = step(flat)
    if applied:
      layout.append(applied)
  return flat, layout or ['released']


def _strip_tree_prefix(flat):
  for prefix in _TREE_PREFIXES:
    anchored = f'{prefix}embedding/kernel' in flat
    if anchored or (flat and all(k.startswith(prefix) for k in flat)):
      params = {k[len(prefix):]: v for k, v in flat.items()
                if k.startswith(prefix)}
      # A whole train state (optimizer moments, step) may sit beside them.
      ignored = len(flat) - len(params)
      return params, f'{prefix} prefix' + (
          f' ({ignored} non-parameter arrays ignored)' if ignored else '')
  return flat, None


def _strip_resnet_prefix(flat):
  if not any(k.startswith('ResNet/') for k in flat):
    return flat, None
  return {k.removeprefix('ResNet/'): v for k, v in flat.items()}, (
      'ResNet/ stem prefix')


def _move_big_vision_posemb(flat):
  if 'pos_embedding' not in flat or POSEMB in flat:
    return flat, None
  flat = dict(flat)
  posemb = flat.pop('pos_embedding')
  if 'cls' in flat:
    # big_vision adds position embeddings before prepending the class token;
    # a zero row for it makes the released layout compute the same thing.
    posemb = np.concatenate(
        [np.zeros((1, 1, posemb.shape[-1]), posemb.dtype), posemb], axis=1)
  flat[POSEMB] = posemb
  return flat, 'big_vision pos_embedding'


def _unstack_scanned_encoder(flat):
  prefix = 'Transformer/encoderblock/'
  stacked = {k: v for k, v in flat.items() if k.startswith(prefix)}
  if not stacked:
    return flat, None
  depths = {v.shape[0] for v in stacked.values()}
  if len(depths) != 1:
    raise CheckpointError(
        'scanned encoder arrays disagree on the number of layers: ' +
        ', '.join(f'{k} {v.shape}' for k, v in stacked.items()))
  depth = depths.pop()
  flat = {k: v for k, v in flat.items() if not k.startswith(prefix)}
  for key, value in stacked.items():
    rest = key[len(prefix):]
    for i in range(depth):
      flat[f'Transformer/encoderblock_{i}/{rest}'] = value[i]
  return flat, f'scanned encoder ({depth} layers)'


def _rename_linen_blocks(flat):
  block_re = re.compile(r'^(Transformer/encoderblock_\d+/)([^/]+)(/.*)$')
  if not any((m := block_re.match(k)) and
             m.group(2) == 'MultiHeadDotProductAttention_0' for k in flat):
    return flat, None
  renamed = {}
  for key, value in flat.items():
    match = block_re.match(key)
    if match and match.group(2) in _LINEN_TO_RELEASED:
      key = match.group(1) + _LINEN_TO_RELEASED[match.group(2)] + match.group(3)
    renamed[key] = value
  return renamed, 'linen-default block names'


def _squeeze_group_norm(flat):
  squeezed = {}
  for key, value in flat.items():
    if (_GROUP_NORM_RE.search(key) and value.ndim > 1 and
        all(d == 1 for d in value.shape[:-1])):
      squeezed[key] = value.reshape(value.shape[-1])
  if not squeezed:
    return flat, None
  return {**flat, **squeezed}, 'GroupNorm (1, 1, 1, C) squeezed'


def save_npz(params: Mapping[str, Any], path: str,
             metadata: Optional[Mapping[str, Any]] = None) -> None:
  """Writes params as an official-layout .npz (released naming), atomically.

  Trees in another known layout (linen names, big_vision) are converted
  first. bfloat16 arrays are stored as float32 (npz has no bfloat16). A JSON
  model card `<path>.json` is written beside it with `metadata` merged in.
  """
  released, _ = normalize_layout(interop.flatten_params(params))
  flat = {k: _storable(k, v) for k, v in released.items()}
  path = os.fspath(path)

  def write(f):
    np.savez(f, **flat)

  _write_atomically(path, write)
  _write_card(card_path(path), flat, 'npz', metadata)


def card_path(path: str) -> str:
  """Where the JSON model card of an exported file or HF directory lives."""
  path = os.fspath(path)
  if os.path.isdir(path):
    return os.path.join(path, HF_CARD)
  return path + '.json'


def _storable(key: str, value: np.ndarray) -> np.ndarray:
  value = np.asarray(value)
  if jax.dtypes.issubdtype(value.dtype, np.floating):
    # npz has no bfloat16; float16 is widened too so loaders see one dtype.
    return value.astype(np.float32) if value.dtype.itemsize < 4 else value
  if value.dtype.kind not in 'biu':
    raise CheckpointError(f'parameter {key!r} has dtype {value.dtype}; only '
                          'numeric arrays can be saved')
  return value


# ------------------------------------------------------------- HF directories


def load_hf_dir(path: str) -> tuple[dict[str, Any], ml_collections.ConfigDict]:
  """Reads an HF ViT directory (`config.json` + `model.safetensors`).

  Returns our params and a model config with HF's numerics (exact GELU or
  not, LayerNorm epsilon) so the built model reproduces HF's logits.
  """
  path = os.fspath(path)
  hf_config = _read_json(os.path.join(path, 'config.json'))
  state_dict = _read_hf_weights(path)
  prefix = 'vit.' if any(k.startswith('vit.') for k in state_dict) else ''
  has_pooler = f'{prefix}pooler.dense.weight' in state_dict
  if has_pooler and hf_config.get('pooler_act', 'tanh') != 'tanh':
    raise CheckpointError(f'{path}: pooler_act={hf_config["pooler_act"]!r}; '
                          'only a tanh pooler maps onto pre_logits')
  try:
    model_config = hf_interop.hf_config_to_model_config(
        hf_config, name=os.path.basename(os.path.normpath(path)),
        has_pooler=has_pooler)
    params = hf_interop.from_hf_state_dict(
        state_dict, num_heads=model_config.num_heads,
        qkv_bias=hf_config.get('qkv_bias', True))
  except ValueError as e:
    raise CheckpointError(f'{path}: {e}') from None
  return params, model_config


def hf_dir_class_names(path: str) -> Optional[list[str]]:
  """Class names (id2label) of an HF directory; None for LABEL_i defaults."""
  return hf_interop.hf_class_names(
      _read_json(os.path.join(os.fspath(path), 'config.json')))


def _read_hf_weights(path: str) -> dict[str, np.ndarray]:
  single = os.path.join(path, 'model.safetensors')
  index = single + '.index.json'
  if os.path.isfile(single):
    return _read_safetensors(single)
  if os.path.isfile(index):
    shards = sorted(set(_read_json(index).get('weight_map', {}).values()))
    state_dict = {}
    for shard in shards:
      state_dict.update(_read_safetensors(os.path.join(path, shard)))
    return state_dict
  if os.path.isfile(os.path.join(path, 'pytorch_model.bin')):
    raise CheckpointError(
        f'{path}: only pytorch_model.bin (a pickle) is present; vit_jax never '
        'unpickles; re-save the model with safetensors (save_pretrained)')
  raise CheckpointError(f'{path}: no model.safetensors in this directory')


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  try:
    return safetensors.numpy.load_file(path)
  # safetensors raises its own error types (SafetensorError, ...).
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f'{path}: not a readable safetensors file: '
                          f'{_one_line(e)}') from None


def save_hf_dir(params: Mapping[str, Any], model_config: Any, path: str,
                class_names: Optional[Sequence[str]] = None, *,
                image_size: Optional[Sequence[int]] = None,
                metadata: Optional[Mapping[str, Any]] = None) -> None:
  """Writes a directory `ViTForImageClassification.from_pretrained` loads.

  Args:
    params: our params (class-token model with a head, no stem, no
      pre_logits: what HF's ViT can express).
    model_config: the model config (GELU kind and epsilon go to config.json).
    path: the directory; replaced atomically if it exists.
    class_names: written as id2label; LABEL_i when None.
    image_size: (h, w); inferred from a square position-embedding grid
      when None.
    metadata: merged into `model_card.json` inside the directory.
  """
  flat = interop.flatten_params(params)
  if 'head/kernel' not in flat:
    raise CheckpointError('the model has no head; HF export needs one')
  num_classes = flat['head/kernel'].shape[-1]
  image_size = _resolve_image_size(flat, model_config, image_size)
  grid = patch_grid(model_config, image_size)
  try:
    hf_config = hf_interop.model_config_to_hf_config(
        model_config, num_classes=num_classes, image_size=image_size,
        class_names=class_names)
    state_dict = hf_interop.to_hf_state_dict(params, model_config, grid=grid)
  except ValueError as e:
    raise CheckpointError(f'HF export: {e}') from None

  def write(directory):
    safetensors.numpy.save_file(
        state_dict, os.path.join(directory, 'model.safetensors'),
        metadata={'format': 'pt'})
    _write_json(os.path.join(directory, 'config.json'), hf_config)
    _write_card(os.path.join(directory, HF_CARD), flat, 'hf', metadata)

  _write_dir_atomically(os.fspath(path), write)


# ------------------------------------------------------------ timm safetensors


def save_timm_safetensors(params: Mapping[str, Any], model_config: Any,
                          path: str, *,
                          image_size: Optional[Sequence[int]] = None,
                          metadata: Optional[Mapping[str, Any]] = None
                          ) -> None:
  """Writes a safetensors file in timm's VisionTransformer naming.

  `timm.create_model(...).load_state_dict(safetensors.torch.load_file(path),
  strict=True)` loads it; the card `<path>.json` records the
  `VisionTransformer(**kwargs)` that matches (plain ViTs).
  """
  flat = interop.flatten_params(params)
  image_size = _resolve_image_size(flat, model_config, image_size)
  grid = patch_grid(model_config, image_size)
  try:
    state_dict = timm_interop.to_timm_state_dict(params, model_config,
                                                  grid=grid)
  except ValueError as e:
    raise CheckpointError(f'timm export: {e}') from None
  path = os.fspath(path)
  _write_atomically(path, lambda f: f.write(safetensors.numpy.save(
      state_dict, metadata={'format': 'pt'})))
  card = dict(metadata or {})
  if interop.config_value(model_config, 'resnet') is None:
    card['timm_model_kwargs'] = timm_interop.timm_model_kwargs(
        model_config, num_classes=_num_classes(flat), image_size=image_size)
  _write_card(card_path(path), flat, 'timm', card)


def load_timm_safetensors(path: str, model_config: Any) -> dict[str, Any]:
  """Reads a timm-named safetensors file (ours or timm's) into our params."""
  state_dict = _read_safetensors(os.fspath(path))
  try:
    return timm_interop.from_timm_state_dict(
        state_dict, num_heads=int(interop.config_value(model_config,
                                                       'num_heads')))
  except ValueError as e:
    raise CheckpointError(f'{path}: {e}') from None


# ------------------------------------------------------------------ dispatch


def load_checkpoint(path: str, model_config: Any = None, *,
                    step: StepChoice = None
                    ) -> tuple[dict[str, Any], Optional[Any]]:
  """Loads any supported checkpoint; returns (params, model config or None).

  * an `.npz` file: the model config comes from its card `<path>.json` when
    vit_jax wrote it, else `model_config` (may stay None);
  * an HF directory (`config.json` + `model.safetensors`): config from HF;
  * a `.safetensors` file in timm's naming: needs the config (card or arg);
  * a training workdir (a `checkpoints/` directory and a `config.json` with
    a `model` entry): the latest or the given `step`, read by
    `vit_jax.train_checkpoints.restore_params`.
  """
  path = os.fspath(path)
  if os.path.isdir(path) and is_workdir(path):
    params, config, _ = load_workdir(path, step)
    return params, config
  if step is not None:
    raise CheckpointError(f'{path}: step={step} applies to training workdirs '
                          'only')
  if os.path.isdir(path):
    return load_hf_dir(path)
  if not os.path.exists(path):
    raise CheckpointError(f'{path}: no such checkpoint file or directory')
  card = read_card(path)
  config = model_config
  if config is None and card.get('model_config'):
    config = ml_collections.ConfigDict(card['model_config'])
  if path.endswith('.safetensors'):
    if config is None:
      raise CheckpointError(f'{path}: a timm safetensors file needs the model '
                            'config (none given and no card beside it)')
    return load_timm_safetensors(path, config), config
  return load_npz(path), config


def parse_step(value: StepChoice, what: str = 'step') -> StepChoice:
  """A checkpoint choice from a flag or config value: None (latest), 'best'
  or a step number. `what` names the flag or key in the error."""
  if value is None or isinstance(value, int):
    return value
  text = str(value).strip()
  if not text:
    return None
  if text == 'best':
    return text
  if text.isdigit():
    return int(text)
  raise ValueError(f'{what}={value!r}: expected a step number, "best", or '
                   'nothing for the latest checkpoint')


def read_card(path: str) -> dict[str, Any]:
  """The JSON model card beside an export (empty dict when absent)."""
  card = card_path(path)
  return _read_json(card) if os.path.isfile(card) else {}


def is_workdir(path: str) -> bool:
  """Whether `path` is a training workdir (`checkpoints/`, or a config.json
  with a `model` entry)."""
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    return True
  config = os.path.join(path, 'config.json')
  return os.path.isfile(config) and 'model' in _read_json(config)


def load_workdir(path: str, step: StepChoice = None
                 ) -> tuple[dict[str, Any], ml_collections.ConfigDict, int]:
  """Params, model config and step of a training workdir.

  The params come from `vit_jax.train_checkpoints.restore_params` (orbax);
  the model config from the workdir's `config.json` (`model` entry).
  """
  # Imported here: the training stack (orbax, optax) is not needed to read
  # npz or HF checkpoints.
  try:
    from vit_jax import train_checkpoints  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise CheckpointError(f'{path}: reading training workdirs needs '
                          f'vit_jax.train_checkpoints ({e})') from None
  config = _read_json(os.path.join(path, 'config.json'))
  if not isinstance(config.get('model'), Mapping):
    raise CheckpointError(f'{path}/config.json has no model config (a '
                          '"model" entry)')
  try:
    params, restored_step = train_checkpoints.restore_params(path, step=step)
  except FileNotFoundError as e:
    raise CheckpointError(_one_line(e)) from None
  params = jax.tree_util.tree_map(np.asarray, params)
  return params, ml_collections.ConfigDict(config['model']), restored_step


# ------------------------------------------------------------ fine-tuning


@dataclasses.dataclass
class AdaptReport:
  """What `adapt_params` did to each parameter (flat '/'-joined names)."""
  copied: list[str] = dataclasses.field(default_factory=list)
  resampled: list[str] = dataclasses.field(default_factory=list)
  dropped: list[str] = dataclasses.field(default_factory=list)
  reinitialised: list[str] = dataclasses.field(default_factory=list)
  notes: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    """A few human-readable lines for logs."""
    lines = [f'copied {len(self.copied)} arrays from the checkpoint']
    for name in ('resampled', 'dropped', 'reinitialised'):
      keys = getattr(self, name)
      if keys:
        lines.append(f'{name}: {", ".join(keys)}')
    return '\n'.join(lines + self.notes)


def adapt_params(loaded: Mapping[str, Any], init_params: Mapping[str, Any], *,
                 model_config: Any,
                 posemb_method: str = 'bilinear',
                 posemb_antialias: bool = False,
                 allow_missing: Sequence[str] = (),
                 drop: Sequence[str] = ('head', 'pre_logits'),
                 reinit_head: bool = False,
                 loaded_grid: Optional[Sequence[int]] = None,
                 target_grid: Optional[Sequence[int]] = None
                 ) -> tuple[dict[str, Any], AdaptReport]:
  """Fits checkpoint params to a freshly initialised model (fine-tune surgery).

  Args:
    loaded: params from a checkpoint (any layout `normalize_layout` knows).
    init_params: the target model's freshly initialised params; supplies the
      shapes, the dtypes and the values of re-initialised parameters.
    model_config: the target's model config (its classifier decides how many
      prefix tokens the position embeddings have).
    posemb_method, posemb_antialias: how to resample position embeddings
      (see `vit_jax.posemb.resample_posemb`).
    allow_missing: subtrees of the target that may be absent from the
      checkpoint; they keep their initial values.
    drop: subtrees of the checkpoint that may be discarded: `pre_logits` when
      the target has none, `head` when the class count differs.
    reinit_head: re-initialise the head even when its shape fits.
    loaded_grid, target_grid: patch grids (h, w) of the position embeddings;
      inferred as squares when None (give them for non-square grids; see
      `patch_grid`).

  Returns:
    (a complete params tree of numpy arrays in the target's structure and
    dtypes, an AdaptReport).

  Raises:
    CheckpointError: one line listing every missing key, unexpected key and
      shape mismatch (with both shapes).
  """
  source, _ = normalize_layout(interop.flatten_params(loaded))
  target = interop.flatten_params(init_params)
  report = AdaptReport()
  problems: list[str] = []
  out: dict[str, np.ndarray] = {}

  head_reinit = _head_needs_reinit(source, target, reinit_head, drop, problems)
  for key, init in target.items():
    if _under(key, ('head',)) and head_reinit:
      out[key] = init
      report.reinitialised.append(key)
    elif key not in source:
      if _under(key, ('head',) + tuple(allow_missing)):
        out[key] = init
        report.reinitialised.append(key)
      else:
        problems.append(f'{key}: missing from the checkpoint (model '
                        f'{_shape(init)})')
    elif key == POSEMB:
      out[key] = _fit_posemb(source, target, model_config, posemb_method,
                             posemb_antialias, loaded_grid, target_grid,
                             problems, report)
    elif source[key].shape != init.shape:
      problems.append(f'{key}: checkpoint {_shape(source[key])} vs model '
                      f'{_shape(init)}')
    else:
      out[key] = source[key].astype(init.dtype, copy=False)
      report.copied.append(key)

  for key in sorted(set(source) - set(target)):
    if _under(key, drop):
      report.dropped.append(key)
    else:
      problems.append(f'{key}: not in the model (checkpoint '
                      f'{_shape(source[key])})')
  if problems:
    raise _misfit(problems)
  return interop.unflatten_params(out), report


def _head_needs_reinit(source, target, reinit_head, drop, problems) -> bool:
  """Whether the target's head keeps its init; records a forbidden change."""
  head_keys = [k for k in target if _under(k, ('head',))]
  if not head_keys:
    return False
  if reinit_head or any(k not in source for k in head_keys):
    return True
  mismatched = [k for k in head_keys if source[k].shape != target[k].shape]
  if mismatched and not _under('head', drop):
    problems.extend(f'{k}: checkpoint {_shape(source[k])} vs model '
                    f'{_shape(target[k])}' for k in mismatched)
  return bool(mismatched)


def _fit_posemb(source, target, model_config, method, antialias,
                loaded_grid, target_grid, problems, report):
  """The checkpoint's position embeddings on the target's patch grid.

  Copied when the grids agree; resampled when the token counts differ or the
  given grids do (4x6 and 6x4 hold as many tokens but are different grids).
  """
  old, new = source[POSEMB], target[POSEMB]
  prefix = posemb_lib.num_prefix_tokens(
      interop.config_value(model_config, 'classifier', 'token'))
  old_prefix = 1 if 'cls' in source else 0
  if old_prefix != prefix or old.shape[-1] != new.shape[-1]:
    problems.append(f'{POSEMB}: checkpoint {_shape(old)} ({old_prefix} prefix '
                    f'tokens) vs model {_shape(new)} ({prefix} prefix tokens)')
    return None
  old_grid = _grid_or_none(old, prefix, loaded_grid)
  new_grid = _grid_or_none(new, prefix, target_grid)
  if old.shape == new.shape and (old_grid is None or new_grid is None or
                                 old_grid == new_grid):
    report.copied.append(POSEMB)
    return old.astype(new.dtype, copy=False)
  if old_grid is None or new_grid is None:
    side, argument, unknown = (('checkpoint', 'loaded_grid', old)
                               if old_grid is None else
                               ('model', 'target_grid', new))
    problems.append(f'{POSEMB}: checkpoint {_shape(old)} vs model '
                    f'{_shape(new)}: cannot infer the {side} patch grid, '
                    f'{unknown.shape[1] - prefix} positions is not a square '
                    f'number; pass {argument}=(height, width)')
    return None
  try:
    resampled = posemb_lib.resample_posemb(
        old, new_grid=new_grid, old_grid=old_grid,
        num_prefix_tokens=prefix, method=method, antialias=antialias)
  except ValueError as e:
    problems.append(f'{POSEMB}: checkpoint {_shape(old)} vs model '
                    f'{_shape(new)}: {e}')
    return None
  if resampled.shape != new.shape:
    problems.append(f'{POSEMB}: resampled to {_shape(resampled)} but the model '
                    f'has {_shape(new)}')
    return None
  report.resampled.append(POSEMB)
  report.notes.append(f'position embeddings {_shape(old)} -> {_shape(new)}: '
                      f'grid {old_grid} -> {new_grid} '
                      f'({method}{", antialias" if antialias else ""})')
  return np.asarray(resampled).astype(new.dtype)


def _grid_or_none(posemb, prefix, grid) -> Optional[tuple[int, ...]]:
  """The given grid, else the square one, else None (not a square)."""
  if grid is not None:
    return tuple(int(g) for g in grid)
  side = math.isqrt(posemb.shape[1] - prefix)
  return (side, side) if side * side == posemb.shape[1] - prefix else None


def check_params(params: Mapping[str, Any], model_config: Any, *,
                 num_classes: Optional[int],
                 image_size: Sequence[int]) -> None:
  """Raises CheckpointError unless `params` fit the model exactly."""
  model = registry.build_model(model_config, num_classes)
  images = jax.ShapeDtypeStruct((1, *image_size, 3), np.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), images)['params']
  expected = {k: v.shape for k, v in _flatten_shapes(shapes).items()}
  actual = interop.flatten_params(params)
  problems = [f'{k}: missing from the checkpoint (model {v})'
              for k, v in expected.items() if k not in actual]
  problems += [f'{k}: not in the model (checkpoint {_shape(v)})'
               for k, v in actual.items() if k not in expected]
  problems += [f'{k}: checkpoint {_shape(v)} vs model {expected[k]}'
               for k, v in actual.items()
               if k in expected and v.shape != expected[k]]
  if problems:
    raise _misfit(problems)


def _misfit(problems: Sequence[str],
            shown: int = 6) -> CheckpointError:
  """One line with the first `shown` problems and how many more there are."""
  listing = '; '.join(problems[:shown])
  if len(problems) > shown:
    listing += f'; and {len(problems) - shown} more'

  return CheckpointError(f'the checkpoint does not fit the model '
                         f'({len(problems)} problem(s)): {listing}')


def patch_grid(model_config: Any, image_size: Sequence[int]
               ) -> tuple[int, int]:
  """The (h, w) patch grid of `image_size` images, ResNet stem included."""
  patch = _pair(interop.config_value(model_config, 'patch_size'))
  grid = []
  for size, p in zip(image_size, patch):
    size = _stem_output_size(int(size), model_config)
    if size % p:
      raise CheckpointError(f'image size {tuple(image_size)} does not divide '
                            f'into patches of {patch}')
    grid.append(size // p)
  return tuple(grid)


def _stem_output_size(size: int, model_config: Any) -> int:
  """Spatial size after a hybrid's stem ('SAME' padding rounds up)."""
  resnet = interop.config_value(model_config, 'resnet')
  if resnet is None:
    return size
  size = math.ceil(math.ceil(size / 2) / 2)  # 7x7/2 conv, then 3x3/2 max-pool.
  stages = len(interop.config_value(resnet, 'num_layers', ()))
  for _ in range(max(stages - 1, 0)):
    size = math.ceil(size / 2)  # Every stage after the first halves it.
  return size


def _stem_stride(model_config: Any) -> int:
  resnet = interop.config_value(model_config, 'resnet')
  if resnet is None:
    return 1
  return 4 * 2**max(len(interop.config_value(resnet, 'num_layers', ())) - 1, 0)


def image_size_from_params(params: Mapping[str, Any], model_config: Any
                           ) -> tuple[int, int]:
  """The image size a learned position embedding was made for (square grid)."""
  return _resolve_image_size(interop.flatten_params(params), model_config, None)


def _resolve_image_size(flat, model_config, image_size) -> tuple[int, int]:
  if image_size is not None:
    return _pair(image_size)
  if POSEMB not in flat:
    raise CheckpointError('the image size cannot be inferred without learned '
                          'position embeddings; pass it explicitly')
  prefix = 1 if 'cls' in flat else 0
  try:
    grid = posemb_lib.infer_square_grid(flat[POSEMB].shape[1] - prefix)
  except ValueError as e:
    raise CheckpointError(f'{e} (pass the image size explicitly)') from None
  patch = _pair(interop.config_value(model_config, 'patch_size'))
  stride = _stem_stride(model_config)
  return tuple(g * p * stride for g, p in zip(grid, patch))


# ------------------------------------------------------------------ helpers


def _pair(size) -> tuple[int, int]:
  return tuple(int(s) for s in np.broadcast_to(size, (2,)))


def _under(key: str, prefixes: Sequence[str]) -> bool:
  return any(key == p or key.startswith(p + '/') for p in prefixes)


def _shape(array) -> tuple[int, ...]:
  return tuple(int(d) for d in array.shape)


def _num_classes(flat: Mapping[str, np.ndarray]) -> Optional[int]:
  return flat['head/kernel'].shape[-1] if 'head/kernel' in flat else None


def _flatten_shapes(tree, prefix=''):
  flat = {}
  for key, value in tree.items():
    name = f'{prefix}/{key}' if prefix else key
    if isinstance(value, Mapping):
      flat.update(_flatten_shapes(value, name))
    else:
      flat[name] = value
  return flat


def _one_line(error: Exception) -> str:
  return ' '.join(str(error).split()) or type(error).__name__


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise CheckpointError(f'{path}: no such file') from None
  except (OSError, json.JSONDecodeError) as e:
    raise CheckpointError(f'{path}: not readable JSON: '
                          f'{_one_line(e)}') from None


def _json_default(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if hasattr(value, 'to_dict'):
    return value.to_dict()
  if isinstance(value, (tuple, set)):
    return list(value)
  return str(value)


def _write_json(path: str, data: Mapping[str, Any]) -> None:
  text = json.dumps(data, indent=2, sort_keys=True, default=_json_default)
  _write_atomically(path, lambda f: f.write(text.encode() + b'\n'))


def _write_card(path: str, flat: Mapping[str, np.ndarray], fmt: str,
                metadata: Optional[Mapping[str, Any]]) -> None:
  card = {
      'format': fmt,
      'num_params': int(sum(v.size for v in flat.values())),
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'),
      'vit_jax_version': vit_jax.__version__,
  }
  card.update(metadata or {})
  _write_json(path, card)


def _write_atomically(path: str, write) -> None:
  """Calls write(binary file) on a temp file beside `path`, then renames."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.',
                             suffix='.tmp', dir=directory)
  try:
    with os.fdopen(fd, 'wb') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, _PUBLIC_FILE)  # mkstemp makes it private.
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _write_dir_atomically(path: str, write) -> None:
  """Fills a temp directory beside `path`, then swaps it into place."""
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.' + os.path.basename(path) + '.', dir=parent)
  try:
    write(tmp)
    os.chmod(tmp, _PUBLIC_DIR)  # mkdtemp makes it private.
    if os.path.isdir(path):
      old = tempfile.mkdtemp(prefix='.' + os.path.basename(path) + '.old.',
                             dir=parent)
      os.replace(path, os.path.join(old, 'previous'))
      os.replace(tmp, path)
      shutil.rmtree(old)
    else:
      os.replace(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
