"""Weight mappings between vit_jax parameter trees and other ViT libraries.

* `vit_jax.interop.hf`: HF `transformers` ViT (`ViTForImageClassification`
  and `ViTModel` state dicts, `ViTConfig`).
* `vit_jax.interop.timm`: timm `VisionTransformer` state dicts, including the
  ResNet stems of the hybrids.

Everything is numpy in, numpy out: these modules never import torch. Our
trees use the released checkpoint names (`Transformer/encoderblock_0/...`);
the helpers here turn them into flat '/'-joined dicts and back.
"""

import dataclasses
import re
from typing import Any, Iterable, Mapping

import numpy as np


def flatten_params(tree: Mapping[str, Any], sep: str = '/'
                   ) -> dict[str, np.ndarray]:
  """{'a': {'b': x}} -> {'a/b': np.asarray(x)} (dict, FrozenDict or jax)."""
  flat = {}

  def visit(node, prefix):
    for key, value in node.items():
      name = f'{prefix}{sep}{key}' if prefix else str(key)
      if isinstance(value, Mapping):
        visit(value, name)
      else:
        flat[name] = np.asarray(value)

  visit(tree, '')
  return flat


def unflatten_params(flat: Mapping[str, Any], sep: str = '/'
                     ) -> dict[str, Any]:
  """{'a/b': x} -> {'a': {'b': x}}; a leaf that is also a prefix fails."""
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split(sep)
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise ValueError(f'parameter {name!r} lies under another parameter')
    if leaf in node:
      raise ValueError(f'parameter {name!r} is both a leaf and a subtree')
    node[leaf] = value
  return tree


def config_value(config: Any, key: str, default: Any = None) -> Any:
  """`config[key]` for a dict or ConfigDict, `default` when absent."""
  if config is None:
    return default
  if isinstance(config, Mapping):
    return config.get(key, default)
  return config.get(key, default) if hasattr(config, 'get') else getattr(
      config, key, default)


class MappingError(ValueError):
  """A state dict or parameter tree that a mapping cannot translate."""


def check_all_used(source_keys, used_keys, what: str) -> None:
  """Fails, naming every key, if some of `source_keys` were not translated."""
  unused = sorted(set(source_keys) - set(used_keys))
  if unused:
    raise MappingError(f'{what}: {len(unused)} unrecognised key(s): '
                       f'{", ".join(unused)}')


# How one tensor changes between our layout and a PyTorch state dict.
#   copy:       same array (norms, biases, tokens, position embeddings)
#   dense:      Dense kernel (in, out) <-> Linear weight (out, in)
#   conv:       Conv kernel (h, w, in, out) <-> Conv2d weight (out, in, h, w)
#   heads_in:   query/key/value kernel (dim, heads, head_dim)
#               <-> (heads*head_dim, dim)
#   heads_bias: query/key/value bias (heads, head_dim) <-> (heads*head_dim,)
#   heads_out:  out kernel (heads, head_dim, dim) <-> (dim, heads*head_dim)
KINDS = ('copy', 'dense', 'conv', 'heads_in', 'heads_bias', 'heads_out')


@dataclasses.dataclass(frozen=True)
class Rule:
  """One PyTorch tensor made of one or more of our tensors.

  Several `ours` keys are concatenated along the PyTorch tensor's first axis
  (timm's fused `qkv` projection holds query, key and value).
  """
  theirs: str
  ours: tuple[str, ...]
  kind: str = 'copy'


def rule(theirs: str, *ours: str, kind: str = 'copy') -> Rule:
  """A `Rule`; `ours` are '/'-joined parameter names."""
  if kind not in KINDS:
    raise ValueError(f'unknown rule kind {kind!r}')
  return Rule(theirs, tuple(ours), kind)


def to_torch_layout(array: np.ndarray, kind: str) -> np.ndarray:
  """Our array -> the PyTorch tensor layout of `kind` (see KINDS)."""
  if kind == 'dense':
    return array.T
  if kind == 'conv':
    return array.transpose(3, 2, 0, 1)
  if kind == 'heads_in':
    return array.reshape(array.shape[0], -1).T
  if kind == 'heads_bias':
    return array.reshape(-1)
  if kind == 'heads_out':
    return array.reshape(-1, array.shape[-1]).T
  return array


def from_torch_layout(array: np.ndarray, kind: str, num_heads: int
                      ) -> np.ndarray:
  """A PyTorch tensor of `kind` -> our layout (inverse of to_torch_layout)."""
  if kind == 'dense':
    return array.T
  if kind == 'conv':
    return array.transpose(2, 3, 1, 0)
  if kind == 'heads_in':
    return array.T.reshape(array.shape[1], num_heads, -1)
  if kind == 'heads_bias':
    return array.reshape(num_heads, -1)
  if kind == 'heads_out':
    return array.T.reshape(num_heads, -1, array.shape[0])
  return array


def export_with_rules(flat: Mapping[str, np.ndarray], rules: Iterable[Rule],
                      what: str) -> dict[str, np.ndarray]:
  """Our flat params -> a PyTorch-named state dict; every key must be used."""
  state_dict, used, missing = {}, set(), []
  for r in rules:
    absent = [k for k in r.ours if k not in flat]
    if absent:
      missing.extend(absent)
      continue
    parts = [to_torch_layout(np.asarray(flat[k]), r.kind) for k in r.ours]
    state_dict[r.theirs] = np.ascontiguousarray(
        parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0))
    used.update(r.ours)
  if missing:
    raise MappingError(f'{what}: missing parameter(s): {", ".join(missing)}')
  check_all_used(flat, used, what)
  return state_dict


def import_with_rules(state_dict: Mapping[str, np.ndarray],
                      rules: Iterable[Rule], num_heads: int,
                      what: str) -> dict[str, np.ndarray]:
  """A PyTorch-named state dict -> our flat params; every key must be used."""
  flat, used, missing = {}, set(), []
  for r in rules:
    if r.theirs not in state_dict:
      missing.append(r.theirs)
      continue
    tensor = np.asarray(state_dict[r.theirs])
    parts = np.split(tensor, len(r.ours), axis=0) if len(r.ours) > 1 else [
        tensor]
    for key, part in zip(r.ours, parts):
      flat[key] = np.ascontiguousarray(
          from_torch_layout(part, r.kind, num_heads))
    used.add(r.theirs)
  if missing:
    raise MappingError(f'{what}: missing tensor(s): {", ".join(missing)}')
  check_all_used(state_dict, used, what)
  return flat


def count_indexed(keys: Iterable[str], pattern: str) -> int:
  """1 + the largest integer captured by `pattern` in `keys` (0 if none)."""
  regex = re.compile(pattern)
  found = [int(m.group(1)) for m in map(regex.match, keys) if m]
  return max(found) + 1 if found else 0
