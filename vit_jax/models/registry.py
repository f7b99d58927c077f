"""Named model variants: the one source of truth for model shapes.

Two spellings name the same models:
  * the official checkpoint names: 'ViT-B_16', 'ViT-B_16-gap-norep',
    'R50+ViT-B_16', ...;
  * variant strings: 'B/16', 'Ti/16', 'L/14', 'S/32-gap-norep', ... (any
    width from WIDTHS with any patch size).

`get_model_config(name)` returns an `ml_collections.ConfigDict` whose keys are
the attributes of `VisionTransformer`; `build_model(config, num_classes)`
turns it into a module.
"""

import re
from typing import Optional

import jax.numpy as jnp
import ml_collections

from vit_jax.models import resnet as resnet_lib
from vit_jax.models import vit

# Width name -> (hidden_size, num_layers, mlp_dim, num_heads), from the ViT and
# "How to train your ViT" (AugReg) papers.
WIDTHS = {
    'Ti': (192, 12, 768, 3),
    'S': (384, 12, 1536, 6),
    'M': (512, 12, 2048, 8),
    'B': (768, 12, 3072, 12),
    'L': (1024, 24, 4096, 16),
    'H': (1280, 32, 5120, 16),
}

# Official dropout: 0.1 for the large models, 0 for the others.
_DROPOUT = {'L': 0.1, 'H': 0.1}

# Official hybrid name -> (ViT width, patch size on the stem output,
# ResNet stages, effective patch size in the name).
_HYBRIDS = {
    'R+ViT-Ti_16': ('Ti', 8, ()),
    'R26+ViT-S_32': ('S', 1, (2, 2, 2, 2)),
    'R26+ViT-B_32': ('B', 1, (2, 2, 2, 2)),
    'R50+ViT-B_16': ('B', 1, (3, 4, 9)),
    'R50+ViT-L_32': ('L', 1, (3, 4, 6, 3)),
}

# Every released plain-ViT name; each also parses as a variant string.
_OFFICIAL_VITS = (
    'ViT-Ti_16', 'ViT-S_16', 'ViT-S_32', 'ViT-B_8', 'ViT-B_16', 'ViT-B_32',
    'ViT-L_16', 'ViT-L_32', 'ViT-H_14', 'ViT-S_16-gap-norep',
    'ViT-B_16-gap-norep', 'ViT-S_32-gap-norep', 'ViT-B_32-gap-norep')

_VARIANT_RE = re.compile(r'^(?:ViT-)?(Ti|S|M|B|L|H)[/_](\d+)(-gap-norep)?$')


def _vit_config(width: str, patch: int, name: str) -> ml_collections.ConfigDict:
  hidden, layers, mlp, heads = WIDTHS[width]
  dropout = _DROPOUT.get(width, 0.0)
  if width == 'L' and patch == 32:
    dropout = 0.0  # ViT-L_32 was released with dropout off.
  return ml_collections.ConfigDict({
      'name': name,
      'patch_size': (patch, patch),
      'hidden_size': hidden,
      'num_layers': layers,
      'num_heads': heads,
      'mlp_dim': mlp,
      'classifier': 'token',
      'representation_size': ml_collections.config_dict.placeholder(int),
      'posemb': 'learn',
      'resnet': ml_collections.config_dict.placeholder(
          ml_collections.ConfigDict),
      'dropout_rate': dropout,
      'attention_dropout_rate': 0.0,
      'stochastic_depth': 0.0,
      'layer_norm_epsilon': 1e-6,
      'gelu_approximate': True,
      'head_bias_init': 0.0,
      'remat': False,
      'dtype': 'float32',
      'param_dtype': 'float32',
  })


def _parse_plain(name: str) -> Optional[ml_collections.ConfigDict]:
  match = _VARIANT_RE.match(name)
  if not match:
    return None
  width, patch, gap = match.group(1), int(match.group(2)), match.group(3)
  official = f'ViT-{width}_{patch}' + (gap or '')
  config = _vit_config(width, patch, official)
  if gap:
    config.classifier = 'gap'
  return config


def _hybrid(name: str) -> ml_collections.ConfigDict:
  width, patch, stages = _HYBRIDS[name]
  config = _vit_config(width, patch, name)
  config.resnet = ml_collections.ConfigDict(
      {'num_layers': stages, 'width_factor': 1})
  if name == 'R50+ViT-B_16':
    config.dropout_rate = 0.1  # As released.
  return config


def known_names() -> tuple[str, ...]:
  """The official names (each variant string 'W/P' works as well)."""
  return _OFFICIAL_VITS + tuple(_HYBRIDS)


def get_model_config(name: str) -> ml_collections.ConfigDict:
  """The config of a named model ('ViT-B_16', 'B/16', 'R50+ViT-B_16', ...)."""
  if name in _HYBRIDS:
    return _hybrid(name)
  config = _parse_plain(name)
  if config is None:
    raise ValueError(
        f'unknown model {name!r}; known: {", ".join(known_names())}, or a '
        f'variant string W/P with W in {"/".join(WIDTHS)} and P the patch '
        'size (e.g. B/16, Ti/16-gap-norep)')
  return config


def build_model(config: ml_collections.ConfigDict,
                num_classes: Optional[int],
                **overrides) -> vit.VisionTransformer:
  """Builds the `VisionTransformer` that `config` describes.

  Args:
    config: a model config from `get_model_config` (possibly edited), or a
      dict with the same keys.
    num_classes: size of the classification head; None for features.
    **overrides: attributes to change on top of `config` (e.g. dtype).
  """
  kwargs = dict(config.to_dict() if hasattr(config, 'to_dict') else config)
  kwargs.pop('name', None)
  kwargs.update(overrides)
  kwargs['patch_size'] = _as_pair(kwargs['patch_size'])
  resnet = kwargs.get('resnet')
  if resnet is not None and not isinstance(resnet, resnet_lib.ResNetSpec):
    kwargs['resnet'] = resnet_lib.ResNetSpec(
        num_layers=tuple(resnet['num_layers']),
        width_factor=resnet['width_factor'])
  for key in ('dtype', 'param_dtype'):
    if key in kwargs:
      kwargs[key] = jnp.dtype(kwargs[key])
  unknown = set(kwargs) - set(vit.VisionTransformer.__dataclass_fields__)
  if unknown:
    raise ValueError(f'unknown model config keys: {", ".join(sorted(unknown))}')
  return vit.VisionTransformer(num_classes=num_classes, **kwargs)


def _as_pair(size) -> tuple[int, int]:
  if isinstance(size, int):
    return (size, size)
  return tuple(int(s) for s in size)
