"""timm `VisionTransformer` <-> vit_jax state dicts (numpy only).

timm fuses query/key/value into one `attn.qkv` Linear, stores the position
embeddings of the class token and the grid together in `pos_embed` (as we
do), and names the hybrids' ResNet stems `patch_embed.backbone.*`: a stem of
the root block alone (`vit_tiny_r_s16_p8_*`) is `patch_embed.backbone.conv` /
`.norm`, a ResNetV2 (`vit_*_r26_*`, `vit_*_r50_*`) is
`patch_embed.backbone.stem.*` plus `stages.S.blocks.U.{conv,norm}{1,2,3}` and
`downsample.{conv,norm}`.

Numerics to match when comparing logits: timm's ViT uses exact-erf GELU and
LayerNorm epsilon 1e-6 (so build our model with `gelu_approximate=False`);
timm's hybrid stems standardise weights with `(w - mean) / sqrt(var + 1e-8)`
where the official (and our) StdConv uses `(w - mean) / (std + 1e-5)`, and
use GroupNorm epsilon 1e-5 where flax uses 1e-6.
"""

from typing import Any, Mapping, Optional, Sequence

import numpy as np

from vit_jax import interop
from vit_jax.models import vit

POSEMB = 'Transformer/posembed_input/pos_embedding'

# Our classifier -> (timm class_token, timm global_pool).
_POOLING = {
    'token': (True, 'token'),
    'gap': (False, 'avg'),
    'map': (False, 'map'),
    'unpooled': (False, ''),
    'token_unpooled': (True, ''),
}


def _block_rules(i: int) -> list[interop.Rule]:
  rule = interop.rule
  timm = f'blocks.{i}.'
  ours = f'Transformer/encoderblock_{i}/'
  attn = ours + 'MultiHeadDotProductAttention_1/'
  return [
      rule(timm + 'norm1.weight', ours + 'LayerNorm_0/scale'),
      rule(timm + 'norm1.bias', ours + 'LayerNorm_0/bias'),
      rule(timm + 'attn.qkv.weight', *(f'{attn}{n}/kernel'
                                       for n in ('query', 'key', 'value')),
           kind='heads_in'),
      rule(timm + 'attn.qkv.bias', *(f'{attn}{n}/bias'
                                     for n in ('query', 'key', 'value')),
           kind='heads_bias'),
      rule(timm + 'attn.proj.weight', attn + 'out/kernel', kind='heads_out'),
      rule(timm + 'attn.proj.bias', attn + 'out/bias'),
      rule(timm + 'norm2.weight', ours + 'LayerNorm_2/scale'),
      rule(timm + 'norm2.bias', ours + 'LayerNorm_2/bias'),
      rule(timm + 'mlp.fc1.weight', ours + 'MlpBlock_3/Dense_0/kernel',
           kind='dense'),
      rule(timm + 'mlp.fc1.bias', ours + 'MlpBlock_3/Dense_0/bias'),
      rule(timm + 'mlp.fc2.weight', ours + 'MlpBlock_3/Dense_1/kernel',
           kind='dense'),
      rule(timm + 'mlp.fc2.bias', ours + 'MlpBlock_3/Dense_1/bias'),
  ]


def _map_head_rules() -> list[interop.Rule]:
  rule = interop.rule
  ours = 'MAPHead_0/'
  attn = ours + 'MultiHeadDotProductAttention_0/'
  return [
      rule('attn_pool.latent', ours + 'probe'),
      rule('attn_pool.q.weight', attn + 'query/kernel', kind='heads_in'),
      rule('attn_pool.q.bias', attn + 'query/bias', kind='heads_bias'),
      rule('attn_pool.kv.weight', attn + 'key/kernel', attn + 'value/kernel',
           kind='heads_in'),
      rule('attn_pool.kv.bias', attn + 'key/bias', attn + 'value/bias',
           kind='heads_bias'),
      rule('attn_pool.proj.weight', attn + 'out/kernel', kind='heads_out'),
      rule('attn_pool.proj.bias', attn + 'out/bias'),
      rule('attn_pool.norm.weight', ours + 'LayerNorm_0/scale'),
      rule('attn_pool.norm.bias', ours + 'LayerNorm_0/bias'),
      rule('attn_pool.mlp.fc1.weight', ours + 'MlpBlock_0/Dense_0/kernel',
           kind='dense'),
      rule('attn_pool.mlp.fc1.bias', ours + 'MlpBlock_0/Dense_0/bias'),
      rule('attn_pool.mlp.fc2.weight', ours + 'MlpBlock_0/Dense_1/kernel',
           kind='dense'),
      rule('attn_pool.mlp.fc2.bias', ours + 'MlpBlock_0/Dense_1/bias'),
  ]


def _conv_norm_rules(timm_conv: str, timm_norm: str, ours_conv: str,
                     ours_norm: str) -> list[interop.Rule]:
  rule = interop.rule
  return [
      rule(f'{timm_conv}.weight', f'{ours_conv}/kernel', kind='conv'),
      rule(f'{timm_norm}.weight', f'{ours_norm}/scale'),
      rule(f'{timm_norm}.bias', f'{ours_norm}/bias'),
  ]


def _stem_rules(stages: Sequence[Sequence[bool]]) -> list[interop.Rule]:
  """Rules of a hybrid stem; `stages[s][u]` says whether unit u projects."""
  backbone = 'patch_embed.backbone.'
  root = backbone if not stages else backbone + 'stem.'
  rules = _conv_norm_rules(root + 'conv', root + 'norm', 'conv_root',
                           'gn_root')
  for s, units in enumerate(stages):
    for u, projects in enumerate(units):
      timm = f'{backbone}stages.{s}.blocks.{u}.'
      ours = f'block{s + 1}/unit{u + 1}/'
      for r in (1, 2, 3):
        rules += _conv_norm_rules(f'{timm}conv{r}', f'{timm}norm{r}',
                                  f'{ours}conv{r}', f'{ours}gn{r}')
      if projects:
        rules += _conv_norm_rules(f'{timm}downsample.conv',
                                  f'{timm}downsample.norm',
                                  f'{ours}conv_proj', f'{ours}gn_proj')
  return rules


def state_dict_rules(num_layers: int, *, class_token: bool, head: bool,
                     map_head: bool = False,
                     stem: Optional[Sequence[Sequence[bool]]] = None
                     ) -> list[interop.Rule]:
  """The name/layout rules of a timm VisionTransformer state dict.

  Args:
    num_layers: transformer blocks.
    class_token: whether there is a `cls_token`.
    head: whether there is a `head` Linear.
    map_head: whether pooling is timm's `attn_pool` (our MAPHead).
    stem: None for a plain ViT; for a hybrid, one list per ResNet stage
      with one bool per unit (True when the unit has a projection shortcut);
      [] for a stem of the root block alone.
  """
  rule = interop.rule
  rules = []
  if class_token:
    rules.append(rule('cls_token', 'cls'))
  rules += [
      rule('pos_embed', POSEMB),
      rule('patch_embed.proj.weight', 'embedding/kernel', kind='conv'),
      rule('patch_embed.proj.bias', 'embedding/bias'),
      rule('norm.weight', 'Transformer/encoder_norm/scale'),
      rule('norm.bias', 'Transformer/encoder_norm/bias'),
  ]
  if stem is not None:
    rules += _stem_rules(stem)
  for i in range(num_layers):
    rules += _block_rules(i)
  if map_head:
    rules += _map_head_rules()
  if head:
    rules += [rule('head.weight', 'head/kernel', kind='dense'),
              rule('head.bias', 'head/bias')]
  return rules


def to_timm_state_dict(params: Mapping[str, Any], model_config: Any, *,
                       grid: Optional[Sequence[int]] = None
                       ) -> dict[str, np.ndarray]:
  """Our params -> a timm VisionTransformer state dict (numpy arrays).

  Args:
    params: our parameter tree (released naming).
    model_config: the model config (posemb kind is checked).
    grid: the patch grid (h, w); needed only for sincos2d position
      embeddings, which timm receives as a fixed `pos_embed` table.
  """
  flat = interop.flatten_params(params)
  if 'pre_logits/kernel' in flat:
    raise ValueError("timm's VisionTransformer has no pre_logits "
                     '(representation) layer; export this model as npz')
  if interop.config_value(model_config, 'posemb', 'learn') == 'sincos2d':
    flat[POSEMB] = _sincos_table(flat, model_config, grid)
  rules = state_dict_rules(
      interop.count_indexed(flat, r'Transformer/encoderblock_(\d+)/'),
      class_token='cls' in flat,
      head='head/kernel' in flat,
      map_head='MAPHead_0/probe' in flat,
      stem=_our_stem(flat))
  return interop.export_with_rules(flat, rules, 'timm export')


def from_timm_state_dict(state_dict: Mapping[str, np.ndarray], *,
                         num_heads: int) -> dict[str, Any]:
  """A timm VisionTransformer state dict (plain or hybrid) -> our params."""
  keys = list(state_dict)
  num_layers = interop.count_indexed(keys, r'blocks[.](\d+)[.]')
  if not num_layers or 'patch_embed.proj.weight' not in state_dict:
    raise interop.MappingError('not a timm VisionTransformer state dict: no '
                               'blocks.N / patch_embed.proj tensors')
  rules = state_dict_rules(
      num_layers,
      class_token='cls_token' in state_dict,
      head='head.weight' in state_dict,
      map_head='attn_pool.latent' in state_dict,
      stem=_timm_stem(keys))
  flat = interop.import_with_rules(state_dict, rules, num_heads,
                                   'timm state dict')
  return interop.unflatten_params(flat)


def timm_model_kwargs(model_config: Any, *, num_classes: Optional[int],
                      image_size: Sequence[int]) -> dict[str, Any]:
  """`timm.models.vision_transformer.VisionTransformer(**kwargs)` arguments
  that build the model our timm export loads into (plain ViTs only).

  timm's LayerNorm epsilon is fixed at 1e-6 in these kwargs; a model trained
  with another epsilon loads but computes slightly different logits.
  """
  get = lambda key, default=None: interop.config_value(model_config, key,
                                                       default)
  if get('resnet') is not None:
    raise ValueError('hybrid models need timm\'s vit_*_r* factories '
                     '(e.g. vit_tiny_r_s16_p8_224), not plain kwargs')
  if get('representation_size') is not None:
    raise ValueError("timm's VisionTransformer has no pre_logits layer")
  class_token, global_pool = _POOLING[get('classifier', 'token')]
  patch = tuple(int(p) for p in np.broadcast_to(get('patch_size'), (2,)))
  image = tuple(int(s) for s in np.broadcast_to(image_size, (2,)))
  return {
      'img_size': image,
      'patch_size': patch,
      'embed_dim': int(get('hidden_size')),
      'depth': int(get('num_layers')),
      'num_heads': int(get('num_heads')),
      'mlp_ratio': float(get('mlp_dim')) / float(get('hidden_size')),
      'qkv_bias': True,
      'class_token': class_token,
      'global_pool': global_pool,
      'fc_norm': False,
      'num_classes': int(num_classes or 0),
      'act_layer': 'gelu_tanh' if get('gelu_approximate', True) else 'gelu',
  }


def _our_stem(flat: Mapping[str, Any]) -> Optional[list[list[bool]]]:
  if 'conv_root/kernel' not in flat:
    return None
  stages = []
  while f'block{len(stages) + 1}/unit1/conv1/kernel' in flat:
    s = len(stages) + 1
    units = []
    while f'block{s}/unit{len(units) + 1}/conv1/kernel' in flat:
      units.append(f'block{s}/unit{len(units) + 1}/conv_proj/kernel' in flat)
    stages.append(units)
  return stages


def _timm_stem(keys: Sequence[str]) -> Optional[list[list[bool]]]:
  keys = set(keys)
  backbone = 'patch_embed.backbone.'
  if backbone + 'conv.weight' in keys:
    return []
  if backbone + 'stem.conv.weight' not in keys:
    return None
  stages = []
  while f'{backbone}stages.{len(stages)}.blocks.0.conv1.weight' in keys:
    prefix = f'{backbone}stages.{len(stages)}.blocks.'
    units = []
    while f'{prefix}{len(units)}.conv1.weight' in keys:
      units.append(f'{prefix}{len(units)}.downsample.conv.weight' in keys)
    stages.append(units)
  return stages


def _sincos_table(flat: Mapping[str, np.ndarray], model_config: Any,
                  grid: Optional[Sequence[int]]) -> np.ndarray:
  """The fixed sincos2d table, with zero rows for prefix tokens."""
  if grid is None:
    raise ValueError('exporting sincos2d position embeddings needs the patch '
                     'grid (pass grid= or the image size)')
  dim = int(interop.config_value(model_config, 'hidden_size'))
  table = np.asarray(vit.sincos2d_posemb(int(grid[0]), int(grid[1]), dim))
  if 'cls' in flat:
    table = np.concatenate([np.zeros((1, 1, dim), table.dtype), table], axis=1)
  return table
