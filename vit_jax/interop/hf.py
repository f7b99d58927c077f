"""HF `transformers` ViT <-> vit_jax: state dicts and configs (numpy only).

`ViTForImageClassification` keys live under `vit.` plus `classifier`;
a bare `ViTModel` has no prefix and may carry a `pooler` (Dense + tanh on the
class token), which is exactly our `pre_logits` layer. HF's ViT is the
class-token model without a ResNet stem; anything else is refused with a
clear error. HF checkpoints use exact-erf GELU and LayerNorm epsilon 1e-12,
so a model built from `hf_config_to_model_config` reproduces their logits.
"""

import re
from typing import Any, Mapping, Optional, Sequence

import ml_collections
import numpy as np

from vit_jax import interop
from vit_jax.models import registry
from vit_jax.models import vit

POSEMB = 'Transformer/posembed_input/pos_embedding'

# HF `hidden_act` -> our `gelu_approximate`. The tanh forms are one formula.
_GELU_KINDS = {
    'gelu': False,
    'gelu_pytorch_tanh': True,
    'gelu_new': True,
    'gelu_fast': True,
}


# Block sub-module names in the two HF namings: 'hub' is what checkpoint
# files hold (every hub checkpoint, and what `save_pretrained` writes);
# 'modules' is the in-memory `state_dict()` of transformers >= 5.
_NAMINGS = {
    'hub': {
        'layer': 'encoder.layer.{i}.',
        'query': 'attention.attention.query',
        'key': 'attention.attention.key',
        'value': 'attention.attention.value',
        'out': 'attention.output.dense',
        'fc1': 'intermediate.dense',
        'fc2': 'output.dense',
    },
    'modules': {
        'layer': 'layers.{i}.',
        'query': 'attention.q_proj',
        'key': 'attention.k_proj',
        'value': 'attention.v_proj',
        'out': 'attention.o_proj',
        'fc1': 'mlp.fc1',
        'fc2': 'mlp.fc2',
    },
}


def _block_rules(i: int, prefix: str, naming: str) -> list[interop.Rule]:
  rule = interop.rule
  names = _NAMINGS[naming]
  hf = prefix + names['layer'].format(i=i)
  ours = f'Transformer/encoderblock_{i}/'
  attn = ours + 'MultiHeadDotProductAttention_1/'
  rules = [
      rule(hf + 'layernorm_before.weight', ours + 'LayerNorm_0/scale'),
      rule(hf + 'layernorm_before.bias', ours + 'LayerNorm_0/bias'),
      rule(f'{hf}{names["out"]}.weight', attn + 'out/kernel',
           kind='heads_out'),
      rule(f'{hf}{names["out"]}.bias', attn + 'out/bias'),
      rule(hf + 'layernorm_after.weight', ours + 'LayerNorm_2/scale'),
      rule(hf + 'layernorm_after.bias', ours + 'LayerNorm_2/bias'),
      rule(f'{hf}{names["fc1"]}.weight', ours + 'MlpBlock_3/Dense_0/kernel',
           kind='dense'),
      rule(f'{hf}{names["fc1"]}.bias', ours + 'MlpBlock_3/Dense_0/bias'),
      rule(f'{hf}{names["fc2"]}.weight', ours + 'MlpBlock_3/Dense_1/kernel',
           kind='dense'),
      rule(f'{hf}{names["fc2"]}.bias', ours + 'MlpBlock_3/Dense_1/bias'),
  ]
  for name in ('query', 'key', 'value'):
    rules.append(rule(f'{hf}{names[name]}.weight', f'{attn}{name}/kernel',
                      kind='heads_in'))
    rules.append(rule(f'{hf}{names[name]}.bias', f'{attn}{name}/bias',
                      kind='heads_bias'))
  return rules


def state_dict_rules(num_layers: int, *, prefix: str = 'vit.',
                     naming: str = 'hub', classifier: bool = True,
                     pooler: bool = False) -> list[interop.Rule]:
  """The name/layout rules of an HF ViT state dict.

  Args:
    num_layers: transformer blocks.
    prefix: 'vit.' for ViTForImageClassification, '' for a bare ViTModel.
    naming: 'hub' (checkpoint files) or 'modules' (transformers >= 5 in
      memory); see _NAMINGS.
    classifier: whether there is a `classifier` (our `head`).
    pooler: whether there is a `pooler.dense` (our `pre_logits`).
  """
  rule = interop.rule
  embed = f'{prefix}embeddings.'
  rules = [
      rule(embed + 'cls_token', 'cls'),
      rule(embed + 'position_embeddings', POSEMB),
      rule(embed + 'patch_embeddings.projection.weight', 'embedding/kernel',
           kind='conv'),
      rule(embed + 'patch_embeddings.projection.bias', 'embedding/bias'),
      rule(f'{prefix}layernorm.weight', 'Transformer/encoder_norm/scale'),
      rule(f'{prefix}layernorm.bias', 'Transformer/encoder_norm/bias'),
  ]
  for i in range(num_layers):
    rules.extend(_block_rules(i, prefix, naming))
  if pooler:
    rules.append(rule(f'{prefix}pooler.dense.weight', 'pre_logits/kernel',
                      kind='dense'))
    rules.append(rule(f'{prefix}pooler.dense.bias', 'pre_logits/bias'))
  if classifier:
    rules.append(rule('classifier.weight', 'head/kernel', kind='dense'))
    rules.append(rule('classifier.bias', 'head/bias'))
  return rules


def to_hf_state_dict(params: Mapping[str, Any], model_config: Any, *,
                     grid: Optional[Sequence[int]] = None,
                     naming: str = 'hub') -> dict[str, np.ndarray]:
  """Our params -> a `ViTForImageClassification` state dict (numpy).

  Args:
    params: our parameter tree (released naming).
    model_config: the model config (classifier, posemb, resnet are checked).
    grid: the patch grid (h, w); needed only for sincos2d position
      embeddings, which are written out as the fixed table.
    naming: 'hub' for files (`model.safetensors`), 'modules' for
      `load_state_dict` into a transformers >= 5 model in memory.
  """
  _check_exportable(params, model_config)
  flat = interop.flatten_params(params)
  if interop.config_value(model_config, 'posemb', 'learn') == 'sincos2d':
    flat[POSEMB] = _sincos_with_class_row(flat['embedding/kernel'].shape[-1],
                                          grid)
  num_layers = interop.count_indexed(flat, r'Transformer/encoderblock_(\d+)/')
  rules = state_dict_rules(num_layers, naming=naming,
                           classifier='head/kernel' in flat)
  return interop.export_with_rules(flat, rules, 'HF ViT export')


def from_hf_state_dict(state_dict: Mapping[str, np.ndarray], *,
                       num_heads: int, qkv_bias: bool = True
                       ) -> dict[str, Any]:
  """An HF ViT state dict (ViTForImageClassification or ViTModel) -> params.

  `qkv_bias=False` (an HF config option) gives zero query/key/value biases,
  which is the same function.
  """
  keys = list(state_dict)
  prefix = 'vit.' if any(k.startswith('vit.') for k in keys) else ''
  for naming, names in _NAMINGS.items():
    layer_re = re.escape(prefix + names['layer']).replace(r'\{i\}', r'(\d+)')
    num_layers = interop.count_indexed(keys, layer_re)
    if num_layers:
      break
  else:
    raise interop.MappingError('not an HF ViT state dict: no encoder.layer.N '
                               'or layers.N tensors')
  state_dict = dict(state_dict)
  if not qkv_bias:
    state_dict.update(_zero_qkv_biases(state_dict, prefix, naming, num_layers))
  rules = state_dict_rules(
      num_layers, prefix=prefix, naming=naming,
      classifier='classifier.weight' in state_dict,
      pooler=f'{prefix}pooler.dense.weight' in state_dict)
  flat = interop.import_with_rules(state_dict, rules, num_heads,
                                   'HF ViT state dict')
  return interop.unflatten_params(flat)


def hf_config_to_model_config(hf_config: Mapping[str, Any], *,
                              name: str = 'HF-ViT',
                              has_pooler: bool = False
                              ) -> ml_collections.ConfigDict:
  """An HF `ViTConfig` (as a dict, e.g. config.json) -> our model config.

  `has_pooler` marks a ViTModel checkpoint whose pooler becomes our
  `pre_logits` (width `pooler_output_size`).
  """
  model_type = hf_config.get('model_type', 'vit')
  if model_type != 'vit':
    raise ValueError(f'HF config has model_type={model_type!r}; only plain '
                     "'vit' checkpoints map onto vit_jax")
  act = hf_config.get('hidden_act', 'gelu')
  if act not in _GELU_KINDS:
    raise ValueError(f'HF config has hidden_act={act!r}; supported: '
                     f'{", ".join(_GELU_KINDS)}')
  hidden = int(hf_config.get('hidden_size', 768))
  config = registry.get_model_config('B/16')  # A template with every key.
  config.name = name
  config.patch_size = _pair(hf_config.get('patch_size', 16))
  config.hidden_size = hidden
  config.num_layers = int(hf_config.get('num_hidden_layers', 12))
  config.num_heads = int(hf_config.get('num_attention_heads', 12))
  config.mlp_dim = int(hf_config.get('intermediate_size', 3072))
  config.classifier = 'token'
  config.representation_size = (
      int(hf_config.get('pooler_output_size') or hidden) if has_pooler
      else None)
  config.posemb = 'learn'
  config.resnet = None
  config.dropout_rate = float(hf_config.get('hidden_dropout_prob', 0.0))
  config.attention_dropout_rate = float(
      hf_config.get('attention_probs_dropout_prob', 0.0))
  config.layer_norm_epsilon = float(hf_config.get('layer_norm_eps', 1e-12))
  config.gelu_approximate = _GELU_KINDS[act]
  return config


def hf_image_size(hf_config: Mapping[str, Any]) -> tuple[int, int]:
  """(height, width) of the images an HF ViT config was made for."""
  return _pair(hf_config.get('image_size', 224))


def hf_class_names(hf_config: Mapping[str, Any]) -> Optional[list[str]]:
  """Class names from `id2label`, or None when absent or only placeholders."""
  id2label = hf_config.get('id2label') or {}
  names = [id2label[k] for k in sorted(id2label, key=int)]
  if not names or all(n == f'LABEL_{i}' for i, n in enumerate(names)):
    return None
  return names


def model_config_to_hf_config(model_config: Any, *, num_classes: int,
                              image_size: Sequence[int],
                              class_names: Optional[Sequence[str]] = None
                              ) -> dict[str, Any]:
  """Our model config -> the config.json of a `ViTForImageClassification`."""
  get = lambda key, default=None: interop.config_value(model_config, key,
                                                       default)
  patch = _pair(get('patch_size'))
  image = _pair(image_size)
  if class_names is not None and len(class_names) != num_classes:
    raise ValueError(f'{len(class_names)} class names for a head of '
                     f'{num_classes} classes')
  names = list(class_names) if class_names is not None else [
      f'LABEL_{i}' for i in range(num_classes)]
  return {
      'architectures': ['ViTForImageClassification'],
      'model_type': 'vit',
      'hidden_size': int(get('hidden_size')),
      'num_hidden_layers': int(get('num_layers')),
      'num_attention_heads': int(get('num_heads')),
      'intermediate_size': int(get('mlp_dim')),
      'hidden_act': 'gelu_pytorch_tanh' if get('gelu_approximate', True)
                    else 'gelu',
      'hidden_dropout_prob': float(get('dropout_rate', 0.0)),
      'attention_probs_dropout_prob': float(get('attention_dropout_rate',
                                                0.0)),
      'layer_norm_eps': float(get('layer_norm_epsilon', 1e-6)),
      'image_size': image[0] if image[0] == image[1] else list(image),
      'patch_size': patch[0] if patch[0] == patch[1] else list(patch),
      'num_channels': 3,
      'qkv_bias': True,
      'encoder_stride': patch[0],
      'initializer_range': 0.02,
      'id2label': {str(i): n for i, n in enumerate(names)},
      'label2id': {n: i for i, n in enumerate(names)},
      'problem_type': 'single_label_classification',
      'dtype': 'float32',
  }


def _check_exportable(params: Mapping[str, Any], model_config: Any) -> None:
  """HF's ViTForImageClassification is a class-token model, no stem, no tanh."""
  get = lambda key, default=None: interop.config_value(model_config, key,
                                                       default)
  if get('classifier', 'token') != 'token':
    raise ValueError(f"HF's ViTForImageClassification pools the class token; "
                     f"classifier={get('classifier')!r} cannot be exported")
  if get('resnet') is not None:
    raise ValueError("HF's ViTForImageClassification has no ResNet stem; "
                     'export hybrids as npz or timm')
  if 'pre_logits' in params:
    raise ValueError("HF's ViTForImageClassification has no pre_logits "
                     '(representation) layer; export this model as npz')
  if 'head' not in params:
    raise ValueError('the model has no head (num_classes is None); '
                     'ViTForImageClassification needs one')


def _sincos_with_class_row(dim: int, grid: Optional[Sequence[int]]
                           ) -> np.ndarray:
  """The fixed sincos2d table with a zero row for the class token."""
  if grid is None:
    raise ValueError('exporting sincos2d position embeddings needs the patch '
                     'grid (pass grid= or the image size)')
  table = np.asarray(vit.sincos2d_posemb(int(grid[0]), int(grid[1]), dim))
  return np.concatenate([np.zeros((1, 1, dim), table.dtype), table], axis=1)


def _zero_qkv_biases(state_dict: Mapping[str, np.ndarray], prefix: str,
                     naming: str, num_layers: int) -> dict[str, np.ndarray]:
  names = _NAMINGS[naming]
  zeros = {}
  for i in range(num_layers):
    layer = prefix + names['layer'].format(i=i)
    for name in ('query', 'key', 'value'):
      weight = state_dict[f'{layer}{names[name]}.weight']
      zeros[f'{layer}{names[name]}.bias'] = np.zeros(weight.shape[0],
                                                     weight.dtype)
  return zeros


def _pair(size) -> tuple[int, int]:
  if isinstance(size, (int, np.integer)):
    return int(size), int(size)
  return tuple(int(s) for s in size)

