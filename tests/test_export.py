"""`python -m vit_jax.export`: npz / timm / HF outputs, model cards, errors."""

import dataclasses
import json
import os
import subprocess
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.torch
from timm.models import vision_transformer as timm_vit
import transformers

from vit_jax import checkpoint
from vit_jax import export
from vit_jax import interop
from vit_jax import train_checkpoints
from vit_jax.models import registry


def small_config(**changes) -> ml_collections.ConfigDict:
  config = registry.get_model_config('Ti/16')
  config.name = 'test-vit'
  config.hidden_size = 32
  config.num_layers = 2
  config.num_heads = 4
  config.mlp_dim = 64
  config.patch_size = (8, 8)
  config.gelu_approximate = False
  for key, value in changes.items():
    setattr(config, key, value)
  return config


def random_params(config, num_classes=5, image_size=(32, 32), seed=0):
  """Random arrays in the model's shapes (eval_shape: no slow init)."""
  model = registry.build_model(config, num_classes)
  spec = jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), spec)['params']
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: (0.1 * rng.normal(size=s.shape)).astype(np.float32), shapes)


def run(*args) -> int:
  return export.main(['export', *args])


def assert_same_arrays(actual, expected):
  actual, expected = (interop.flatten_params(t) for t in (actual, expected))
  assert sorted(actual) == sorted(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(actual[key], value, err_msg=key)


@pytest.fixture
def carded_npz(tmp_path):
  """An npz written by vit_jax, with its model card (and so its config)."""
  config = small_config()
  params = random_params(config)
  path = str(tmp_path / 'source.npz')
  checkpoint.save_npz(params, path, metadata={
      'model_config': config.to_dict(), 'step': 42,
      'metrics': {'step': 42, 'eval_accuracy': 0.75},
      'classes': ['a', 'b', 'c', 'd', 'e']})
  return path, params, config


def test_npz_to_npz_keeps_arrays_and_card(tmp_path, carded_npz, capsys):
  source, params, config = carded_npz
  out = str(tmp_path / 'out' / 'model.npz')
  assert run(f'--checkpoint={source}', '--format=npz', f'--out={out}') == 0
  assert f'wrote {out}' in capsys.readouterr().out
  loaded, loaded_config = checkpoint.load_checkpoint(out)
  assert_same_arrays(loaded, params)
  assert loaded_config.to_dict() == json.loads(json.dumps(config.to_dict()))
  card = checkpoint.read_card(out)
  assert card['format'] == 'npz' and card['num_classes'] == 5
  assert card['image_size'] == [32, 32] and card['patch_grid'] == [4, 4]
  assert card['step'] == 42 and card['metrics']['eval_accuracy'] == 0.75
  assert card['classes'] == ['a', 'b', 'c', 'd', 'e']
  assert card['num_params'] == sum(
      v.size for v in interop.flatten_params(params).values())


def test_npz_to_timm_loads_strictly(tmp_path, carded_npz):
  source, _, _ = carded_npz
  out = str(tmp_path / 'model.safetensors')
  assert run(f'--checkpoint={source}', '--format=timm', f'--out={out}') == 0
  kwargs = checkpoint.read_card(out)['timm_model_kwargs']
  model = timm_vit.VisionTransformer(**kwargs)
  model.load_state_dict(safetensors.torch.load_file(out), strict=True)


def test_npz_to_hf_with_class_names(tmp_path, carded_npz):
  source, _, _ = carded_npz
  names = tmp_path / 'classes.txt'
  names.write_text('cat\ndog\nemu\nfox\ngnu\n')
  out = str(tmp_path / 'hf')
  assert run(f'--checkpoint={source}', '--format=hf', f'--out={out}',
             f'--class_names={names}') == 0
  assert sorted(os.listdir(out)) == ['config.json', 'model.safetensors',
                                     'model_card.json']
  model, info = transformers.ViTForImageClassification.from_pretrained(
      out, output_loading_info=True)
  assert not any(info.values()), info
  assert model.config.id2label[1] == 'dog'
  assert checkpoint.read_card(out)['classes'][4] == 'gnu'


def test_hf_dir_to_npz_carries_config_and_classes(tmp_path):
  hf_config = transformers.ViTConfig(
      hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
      intermediate_size=64, image_size=32, patch_size=8,
      id2label={0: 'x', 1: 'y'}, label2id={'x': 0, 'y': 1})
  transformers.ViTForImageClassification(hf_config).save_pretrained(
      str(tmp_path / 'hf'))
  out = str(tmp_path / 'from_hf.npz')
  assert run(f'--checkpoint={tmp_path / "hf"}', '--format=npz',
             f'--out={out}') == 0
  card = checkpoint.read_card(out)
  assert card['classes'] == ['x', 'y']
  assert card['model_config']['layer_norm_epsilon'] == 1e-12
  _, config = checkpoint.load_checkpoint(out)
  assert not config.gelu_approximate


def test_downloaded_npz_needs_and_takes_model(tmp_path, capsys):
  """A card-less file, as downloaded: the architecture comes from --model."""
  params = random_params(registry.get_model_config('Ti/16'), 3)
  source = str(tmp_path / 'ViT-Ti_16.npz')
  with open(source, 'wb') as f:
    np.savez(f, **interop.flatten_params(params))
  out = str(tmp_path / 'ti.safetensors')
  assert run(f'--checkpoint={source}', '--format=timm', f'--out={out}') == 1
  error = capsys.readouterr().err
  assert error.count('\n') == 1 and '--model' in error
  assert run(f'--checkpoint={source}', '--format=timm', f'--out={out}',
             '--model=Ti/16') == 0
  card = checkpoint.read_card(out)
  assert card['model_config']['name'] == 'ViT-Ti_16'
  assert card['timm_model_kwargs']['embed_dim'] == 192


def test_downloaded_in21k_npz_keeps_its_pre_logits(tmp_path):
  """The released ImageNet-21k files have a representation layer."""
  config = registry.get_model_config('Ti/16')
  config.representation_size = 192
  params = random_params(config, 7)
  source = str(tmp_path / 'imagenet21k_ViT-Ti_16.npz')
  with open(source, 'wb') as f:
    np.savez(f, **interop.flatten_params(params))
  out = str(tmp_path / 'copy.npz')
  assert run(f'--checkpoint={source}', '--format=npz', f'--out={out}',
             '--model=Ti/16') == 0
  loaded, loaded_config = checkpoint.load_checkpoint(out)
  assert loaded_config.representation_size == 192
  assert_same_arrays(loaded, params)


@dataclasses.dataclass
class _State:
  params: Any
  opt_state: Any
  step: Any
  rng: Any


def _workdir(tmp_path, config, steps):
  workdir = str(tmp_path / 'run')
  saver = train_checkpoints.Checkpointer(workdir, keep=len(steps))
  states = {}
  for i, step in enumerate(steps):
    states[step] = random_params(config, seed=i)
    saver.save(step, _State(states[step], {'count': jnp.zeros(())},
                            jnp.asarray(step), jax.random.PRNGKey(0)))
  saver.close()
  train_checkpoints.write_config(workdir, ml_collections.ConfigDict(
      {'model': config.to_dict(), 'num_classes': 5}))
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for step in steps:
      f.write(json.dumps({'step': step, 'eval_accuracy': step / 100}) + '\n')
  return workdir, states


def test_workdir_latest_and_chosen_step(tmp_path):
  config = small_config()
  workdir, states = _workdir(tmp_path, config, steps=(10, 20))
  latest = str(tmp_path / 'latest.npz')
  assert run(f'--checkpoint={workdir}', '--format=npz', f'--out={latest}') == 0
  assert_same_arrays(checkpoint.load_npz(latest), states[20])
  card = checkpoint.read_card(latest)
  assert card['step'] == 20 and card['metrics']['eval_accuracy'] == 0.2
  chosen = str(tmp_path / 'step10.npz')
  assert run(f'--checkpoint={workdir}', '--step=10', '--format=npz',
             f'--out={chosen}') == 0
  assert_same_arrays(checkpoint.load_npz(chosen), states[10])
  assert checkpoint.read_card(chosen)['metrics']['eval_accuracy'] == 0.1
  assert run(f'--checkpoint={workdir}', '--step=15', '--format=npz',
             f'--out={chosen}') == 1


def test_user_errors_are_one_line(tmp_path, carded_npz, capsys):
  source, params, config = carded_npz
  broken = tmp_path / 'broken.npz'
  broken.write_bytes(open(source, 'rb').read()[:500])
  wrong = str(tmp_path / 'wrong.npz')
  params['Transformer']['encoder_norm']['bias'] = np.zeros(7, np.float32)
  checkpoint.save_npz(params, wrong, metadata={'model_config':
                                               config.to_dict()})
  gap = str(tmp_path / 'gap.npz')
  gap_config = small_config(classifier='gap')
  checkpoint.save_npz(random_params(gap_config), gap,
                      metadata={'model_config': gap_config.to_dict()})
  out = str(tmp_path / 'out.npz')
  cases = [
      ([f'--checkpoint={broken}', '--format=npz', f'--out={out}'], 1,
       'broken.npz'),
      ([f'--checkpoint={tmp_path / "nope.npz"}', '--format=npz',
        f'--out={out}'], 1, 'nope.npz'),
      ([f'--checkpoint={wrong}', '--format=npz', f'--out={out}'], 1,
       'Transformer/encoder_norm/bias: checkpoint (7,) vs model (32,)'),
      ([f'--checkpoint={gap}', '--format=hf', f'--out={tmp_path / "hf"}'], 1,
       'class token'),
      ([f'--checkpoint={source}', '--step=3', '--format=npz',
        f'--out={out}'], 1, '--step applies to training workdirs'),
      ([f'--checkpoint={source}', '--format=onnx', f'--out={out}'], 2,
       'onnx'),
      ([f'--checkpoint={source}', '--format=npz'], 2, '--out'),
  ]
  for args, status, fragment in cases:
    assert run(*args) == status, args
    captured = capsys.readouterr()
    assert captured.err.count('\n') == 1, captured.err
    assert fragment in captured.err, (fragment, captured.err)
    assert 'Traceback' not in captured.err
  assert not os.path.exists(out)


@pytest.mark.slow
def test_command_line_in_a_subprocess(tmp_path, carded_npz):
  source, params, _ = carded_npz
  out = str(tmp_path / 'cli.npz')
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  done = subprocess.run(
      [sys.executable, '-m', 'vit_jax.export', f'--checkpoint={source}',
       '--format=npz', f'--out={out}'],
      capture_output=True, text=True, env=env, check=False)
  assert done.returncode == 0, done.stderr
  assert_same_arrays(checkpoint.load_npz(out), params)
  failed = subprocess.run(
      [sys.executable, '-m', 'vit_jax.export',
       f'--checkpoint={tmp_path / "missing.npz"}', '--format=npz',
       f'--out={out}'],
      capture_output=True, text=True, env=env, check=False)
  assert failed.returncode == 1
  assert failed.stderr.strip().count('\n') == 0
  assert 'missing.npz' in failed.stderr and 'Traceback' not in failed.stderr
