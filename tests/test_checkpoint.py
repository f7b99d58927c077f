"""Checkpoints: npz layouts, HF directories, timm files, fine-tune surgery."""

import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import safetensors.torch
import timm
from timm.models import vision_transformer as timm_vit
import torch
import transformers

from vit_jax import checkpoint
from vit_jax import interop
from vit_jax import posemb as posemb_lib
from vit_jax.models import registry

POSEMB = checkpoint.POSEMB
RTOL = 1e-5


def small_config(**changes) -> ml_collections.ConfigDict:
  """A 2-layer, width-32 ViT on 8x8 patches with exact GELU (peer numerics)."""
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


def param_shapes(config, num_classes, image_size=(32, 32)):
  """The model's parameter shapes, without running (slow to compile) init."""
  model = registry.build_model(config, num_classes)
  images_spec = jax.ShapeDtypeStruct((1, *image_size, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), images_spec)['params']


def init_params(config, num_classes, image_size=(32, 32), seed=0):
  """A real fresh init (zero head etc.); slow, so only where values matter."""
  model = registry.build_model(config, num_classes)
  variables = model.init(jax.random.key(seed),
                         jnp.zeros((1, *image_size, 3), jnp.float32))
  return jax.tree.map(np.asarray, variables['params'])


def randomize(params, seed=0):
  """Every array drawn anew (norm scales near 1) so each mapping matters."""
  rng = np.random.default_rng(seed)
  flat = interop.flatten_params(
      jax.tree.map(lambda p: np.zeros(p.shape, p.dtype), params))
  for key, value in flat.items():
    noise = rng.normal(size=value.shape).astype(np.float32)
    if key.endswith('scale'):
      new = 1 + 0.2 * noise
    elif value.ndim <= 1 or key in (POSEMB, 'cls'):
      new = 0.2 * noise
    else:
      new = noise / np.sqrt(np.prod(value.shape[:-1]))
    flat[key] = new.astype(value.dtype)
  return interop.unflatten_params(flat)


def random_params(config, num_classes=5, image_size=(32, 32), seed=0):
  return randomize(param_shapes(config, num_classes, image_size), seed)


def images(size=(32, 32), seed=0):
  return np.random.default_rng(seed).normal(
      size=(2, size[0], size[1], 3)).astype(np.float32)


def logits(config, num_classes, params, x):
  model = registry.build_model(config, num_classes)
  return np.asarray(jax.jit(model.apply)({'params': params}, x))


def torch_logits(model, x):
  with torch.no_grad():
    out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  return getattr(out, 'logits', out).numpy()


def rel_error(ours, ref) -> float:
  return float(np.abs(np.float64(ours) - ref).max() / np.abs(ref).max())


def assert_trees_equal(actual, expected):
  actual, expected = (interop.flatten_params(t) for t in (actual, expected))
  assert sorted(actual) == sorted(expected)
  for key, value in expected.items():
    assert actual[key].dtype == value.dtype, key
    np.testing.assert_array_equal(actual[key], value, err_msg=key)


def assert_one_line_error(excinfo, *fragments):
  message = str(excinfo.value)
  assert '\n' not in message
  for fragment in fragments:
    assert fragment in message, (fragment, message)


# ------------------------------------------------------------- npz layouts


def test_npz_round_trip_is_bit_identical(tmp_path):
  params = random_params(small_config())
  path = str(tmp_path / 'model.npz')
  checkpoint.save_npz(params, path, metadata={'step': 7})
  assert_trees_equal(checkpoint.load_npz(path), params)
  assert checkpoint.read_card(path)['step'] == 7
  assert sorted(os.listdir(tmp_path)) == ['model.npz', 'model.npz.json']
  # Overwriting keeps the file whole and leaves no temporary behind.
  checkpoint.save_npz(randomize(params, seed=1), path)
  assert_trees_equal(checkpoint.load_npz(path), randomize(params, seed=1))
  assert sorted(os.listdir(tmp_path)) == ['model.npz', 'model.npz.json']


def test_npz_stores_bfloat16_as_float32(tmp_path):
  params = {'head': {'kernel': jnp.ones((2, 3), jnp.bfloat16)}}
  checkpoint.save_npz(params, str(tmp_path / 'bf16.npz'))
  loaded = checkpoint.load_npz(str(tmp_path / 'bf16.npz'))
  assert loaded['head']['kernel'].dtype == np.float32


def _write_flat_npz(path, flat):
  with open(path, 'wb') as f:
    np.savez(f, **flat)
  return str(path)


def test_released_naming_npz_loads(tmp_path):
  params = random_params(small_config())
  flat = interop.flatten_params(params)
  assert ('Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/'
          'kernel') in flat
  path = _write_flat_npz(tmp_path / 'released.npz', flat)
  assert_trees_equal(checkpoint.load_npz(path), params)


_RELEASED_TO_LINEN = {'MultiHeadDotProductAttention_1':
                      'MultiHeadDotProductAttention_0',
                      'LayerNorm_2': 'LayerNorm_1', 'MlpBlock_3': 'MlpBlock_0'}


def _linen_named(flat):
  renamed = {}
  for key, value in flat.items():
    parts = key.split('/')
    if len(parts) > 2 and parts[1].startswith('encoderblock_'):
      parts[2] = _RELEASED_TO_LINEN.get(parts[2], parts[2])
    renamed['/'.join(parts)] = value
  return renamed


def test_linen_named_npz_loads(tmp_path):
  params = random_params(small_config())
  flat = _linen_named(interop.flatten_params(params))
  assert 'Transformer/encoderblock_0/MlpBlock_0/Dense_1/bias' in flat
  path = _write_flat_npz(tmp_path / 'linen.npz', flat)
  assert_trees_equal(checkpoint.load_npz(path), params)
  _, layout = checkpoint.normalize_layout(flat)
  assert layout == ['linen-default block names']


def _big_vision(flat, num_layers, scanned):
  """Our flat params in big_vision's layout (posemb before the class token)."""
  out = {}
  blocks = {}
  for key, value in _linen_named(flat).items():
    match = re.match(r'Transformer/encoderblock_(\d+)/(.*)', key)
    if match:
      blocks.setdefault(match.group(2), {})[int(match.group(1))] = value
    elif key == POSEMB:
      out['params/pos_embedding'] = value[:, 1:]
    else:
      out['params/' + key] = value
  for rest, per_layer in blocks.items():
    if scanned:
      out[f'params/Transformer/encoderblock/{rest}'] = np.stack(
          [per_layer[i] for i in range(num_layers)])
    else:
      for i, value in per_layer.items():
        out[f'params/Transformer/encoderblock_{i}/{rest}'] = value
  return out


@pytest.mark.parametrize('scanned', [True, False])
def test_big_vision_layout_loads(tmp_path, scanned):
  params = random_params(small_config())
  # big_vision has no position embedding for the class token: ours is zero.
  params['Transformer']['posembed_input']['pos_embedding'][:, :1] = 0
  flat = _big_vision(interop.flatten_params(params), 2, scanned)
  path = _write_flat_npz(tmp_path / 'big_vision.npz', flat)
  assert_trees_equal(checkpoint.load_npz(path), params)
  _, layout = checkpoint.normalize_layout(flat)
  assert 'params/ prefix' in layout and 'big_vision pos_embedding' in layout
  assert ('scanned encoder (2 layers)' in layout) == scanned


def _hybrid_config(**changes):
  return small_config(resnet=ml_collections.ConfigDict(
      {'num_layers': (1,), 'width_factor': 1}), patch_size=(2, 2), **changes)


def test_hybrid_npz_with_resnet_prefix_and_4d_group_norms_loads(tmp_path):
  params = random_params(_hybrid_config())
  flat = interop.flatten_params(params)
  stem = ('conv_root', 'gn_root', 'block1')
  assert 'block1/unit1/gn_proj/scale' in flat
  odd = {}
  for key, value in flat.items():
    if key.startswith(stem):
      key = 'ResNet/' + key
      if '/gn' in key:
        value = value.reshape(1, 1, 1, -1)
    odd[key] = value
  path = _write_flat_npz(tmp_path / 'hybrid.npz', odd)
  assert_trees_equal(checkpoint.load_npz(path), params)


def test_unreadable_files_give_one_clear_line(tmp_path):
  good = str(tmp_path / 'good.npz')
  checkpoint.save_npz(random_params(small_config()), good)
  data = open(good, 'rb').read()
  cases = {
      'truncated.npz': data[:len(data) // 2],
      'garbage.npz': os.urandom(2048),
      'empty.npz': b'',
  }
  for name, content in cases.items():
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(checkpoint.CheckpointError) as excinfo:
      checkpoint.load_npz(str(path))
    assert_one_line_error(excinfo, str(path))

  with pytest.raises(checkpoint.CheckpointError) as excinfo:
    checkpoint.load_npz(str(tmp_path / 'absent.npz'))
  assert_one_line_error(excinfo, 'absent.npz', 'no such')


def test_corrupted_member_is_named(tmp_path):
  """Zeroed bytes inside a compressed member: the archive opens, the array
  does not."""
  path = tmp_path / 'flipped.npz'
  with open(path, 'wb') as f:
    np.savez_compressed(f, **{'head/kernel': np.arange(4096.0)})
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 16] = bytes(16)
  path.write_bytes(bytes(data))
  with pytest.raises(checkpoint.CheckpointError) as excinfo:
    checkpoint.load_npz(str(path))
  assert_one_line_error(excinfo, str(path), 'head/kernel')


def test_pickle_bearing_npz_is_refused(tmp_path):
  path = tmp_path / 'pickle.npz'
  with open(path, 'wb') as f:
    np.savez(f, **{'embedding/kernel': np.zeros(3),
                   'evil': np.array([{'x': 1}], dtype=object)})
  with pytest.raises(checkpoint.CheckpointError) as excinfo:
    checkpoint.load_npz(str(path))
  assert_one_line_error(excinfo, str(path), "'evil'", 'pickle')


def test_single_array_npy_is_refused(tmp_path):
  path = tmp_path / 'single.npy'
  np.save(path, np.zeros(3))
  with pytest.raises(checkpoint.CheckpointError) as excinfo:
    checkpoint.load_npz(str(path))
  assert_one_line_error(excinfo, str(path), 'single array')


# ---------------------------------------------------------- fine-tune surgery


def test_surgery_new_classes_resolution_and_no_pre_logits():
  source_config = small_config(representation_size=16)
  loaded = random_params(source_config, num_classes=5)
  target_config = small_config(head_bias_init=-2.0)
  init = init_params(target_config, 10, image_size=(64, 64), seed=3)

  params, report = checkpoint.adapt_params(loaded, init,
                                           model_config=target_config)

  np.testing.assert_array_equal(params['head']['kernel'], 0.0)
  np.testing.assert_array_equal(params['head']['bias'], -2.0)
  assert 'pre_logits' not in params
  expected_posemb = posemb_lib.resample_posemb(
      loaded['Transformer']['posembed_input']['pos_embedding'],
      new_grid=(8, 8), num_prefix_tokens=1)
  np.testing.assert_array_equal(
      params['Transformer']['posembed_input']['pos_embedding'],
      expected_posemb)
  np.testing.assert_array_equal(params['embedding']['kernel'],
                                loaded['embedding']['kernel'])
  assert sorted(report.reinitialised) == ['head/bias', 'head/kernel']
  assert sorted(report.dropped) == ['pre_logits/bias', 'pre_logits/kernel']
  assert report.resampled == [POSEMB]
  assert len(report.copied) == len(interop.flatten_params(init)) - 3
  summary = report.summary()
  assert 'resampled' in summary and '(4, 4) -> (8, 8)' in summary
  assert 'dropped: pre_logits' in summary
  out = logits(target_config, 10, params, images((64, 64)))
  np.testing.assert_allclose(out, -2.0)  # Zero head: the bias alone.


def test_surgery_to_a_non_square_grid():
  config = small_config()
  loaded = random_params(config)
  init = random_params(config, 5, image_size=(32, 48), seed=1)
  with pytest.raises(checkpoint.CheckpointError, match='not a square'):
    checkpoint.adapt_params(loaded, init, model_config=config)
  grid = checkpoint.patch_grid(config, (32, 48))
  assert grid == (4, 6)
  params, report = checkpoint.adapt_params(
      loaded, init, model_config=config, target_grid=grid,
      posemb_method='bicubic', posemb_antialias=True)
  assert report.resampled == [POSEMB] and not report.reinitialised
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (
      1, 25, 32)
  assert logits(config, 5, params, images((32, 48))).shape == (2, 5)


@pytest.mark.parametrize('classifier', ['gap', 'map'])
def test_surgery_without_class_token(classifier):
  config = small_config(classifier=classifier)
  loaded = random_params(config)
  init = random_params(config, 5, image_size=(48, 48), seed=1)
  params, _ = checkpoint.adapt_params(loaded, init, model_config=config)
  np.testing.assert_array_equal(
      params['Transformer']['posembed_input']['pos_embedding'],
      posemb_lib.resample_posemb(
          loaded['Transformer']['posembed_input']['pos_embedding'],
          new_grid=(6, 6), num_prefix_tokens=0))


def test_surgery_same_shapes_copies_everything_and_casts_dtypes():
  config = small_config()
  loaded = random_params(config)
  target = small_config(param_dtype='bfloat16')
  init = jax.tree.map(jnp.asarray, init_params(target, 5))
  params, report = checkpoint.adapt_params(loaded, init, model_config=target)
  assert not (report.resampled or report.dropped or report.reinitialised)
  flat = interop.flatten_params(params)
  assert all(v.dtype == jnp.bfloat16 for v in flat.values())
  np.testing.assert_array_equal(
      flat['embedding/kernel'],
      loaded['embedding']['kernel'].astype(jnp.bfloat16))


def test_surgery_reinitialises_the_head_when_asked():
  config = small_config()
  loaded = random_params(config)
  init = random_params(config, seed=1)
  params, report = checkpoint.adapt_params(
      loaded, init, model_config=config, reinit_head=True)
  assert sorted(report.reinitialised) == ['head/bias', 'head/kernel']
  np.testing.assert_array_equal(params['head']['kernel'],
                                init['head']['kernel'])


def test_surgery_accepts_a_big_vision_tree():
  config = small_config()
  params = random_params(config)
  params['Transformer']['posembed_input']['pos_embedding'][:, :1] = 0
  big_vision = interop.unflatten_params(
      _big_vision(interop.flatten_params(params), 2, scanned=True))
  adapted, report = checkpoint.adapt_params(
      big_vision, random_params(config, seed=1), model_config=config)
  assert_trees_equal(adapted, params)
  assert len(report.copied) == len(interop.flatten_params(params))


def test_surgery_lists_every_problem_with_both_shapes():
  config = small_config()
  loaded = interop.flatten_params(random_params(config))
  dense = 'Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel'
  loaded[dense] = loaded[dense][:, :48]
  del loaded['Transformer/encoderblock_0/LayerNorm_2/bias']
  loaded['Transformer/extra/kernel'] = np.zeros((3, 4), np.float32)
  with pytest.raises(checkpoint.CheckpointError) as excinfo:
    checkpoint.adapt_params(interop.unflatten_params(loaded),
                            random_params(config, seed=1),
                            model_config=config)
  assert_one_line_error(
      excinfo, '3 problem(s)',
      f'{dense}: checkpoint (32, 48) vs model (32, 64)',
      'Transformer/encoderblock_0/LayerNorm_2/bias: missing from the '
      'checkpoint (model (32,))',
      'Transformer/extra/kernel: not in the model (checkpoint (3, 4))')


def test_surgery_strict_mode_refuses_a_new_head():
  config = small_config()
  loaded = random_params(config, num_classes=5)
  with pytest.raises(checkpoint.CheckpointError) as excinfo:
    checkpoint.adapt_params(loaded, random_params(config, 7, seed=1),
                            model_config=config, drop=())
  assert_one_line_error(excinfo, 'head/kernel: checkpoint (32, 5) vs model '
                        '(32, 7)')


def test_surgery_allow_missing_keeps_the_initial_values():
  loaded = random_params(small_config())
  target = small_config(representation_size=16)
  init = random_params(target, seed=1)
  with pytest.raises(checkpoint.CheckpointError, match='pre_logits/kernel'):
    checkpoint.adapt_params(loaded, init, model_config=target)
  params, report = checkpoint.adapt_params(
      loaded, init, model_config=target, allow_missing=('pre_logits',))
  # The head is new as well: its input width changed from 32 to 16.
  assert sorted(report.reinitialised) == [
      'head/bias', 'head/kernel', 'pre_logits/bias', 'pre_logits/kernel']
  np.testing.assert_array_equal(params['pre_logits']['kernel'],
                                init['pre_logits']['kernel'])


def test_surgery_refuses_a_class_token_mismatch():
  loaded = random_params(small_config())  # Has a class token.
  target = small_config(classifier='gap')
  with pytest.raises(checkpoint.CheckpointError) as excinfo:
    checkpoint.adapt_params(loaded, random_params(target, 5, (48, 48)),
                            model_config=target)
  assert_one_line_error(excinfo, '1 prefix tokens', '0 prefix tokens',
                        'cls: not in the model')


def test_check_params_names_a_wrong_shape(tmp_path):
  config = small_config()
  params = random_params(config)
  checkpoint.check_params(params, config, num_classes=5, image_size=(32, 32))
  params['Transformer']['encoder_norm']['scale'] = np.ones(31, np.float32)
  with pytest.raises(checkpoint.CheckpointError) as excinfo:
    checkpoint.check_params(params, config, num_classes=5, image_size=(32, 32))
  assert_one_line_error(excinfo, 'Transformer/encoder_norm/scale: checkpoint '
                        '(31,) vs model (32,)')


def test_patch_grid_of_hybrids():
  r50 = registry.get_model_config('R50+ViT-B_16')
  assert checkpoint.patch_grid(r50, (384, 384)) == (24, 24)
  assert checkpoint.patch_grid(registry.get_model_config('R+ViT-Ti_16'),
                               (224, 224)) == (7, 7)
  with pytest.raises(checkpoint.CheckpointError, match='does not divide'):
    checkpoint.patch_grid(small_config(), (30, 32))


# ------------------------------------------------------------ HF directories


def test_ours_to_hf_dir_loads_in_transformers(tmp_path):
  config = small_config()
  params = random_params(config)
  out = str(tmp_path / 'hf')
  checkpoint.save_hf_dir(params, config, out,
                         class_names=['a', 'b', 'c', 'd', 'e'],
                         metadata={'step': 3})
  model, info = transformers.ViTForImageClassification.from_pretrained(
      out, output_loading_info=True)
  assert not any(info.values()), info
  assert model.config.id2label[4] == 'e'
  assert model.config.layer_norm_eps == 1e-6
  x = images()
  assert rel_error(logits(config, 5, params, x),
                   torch_logits(model.eval(), x)) < RTOL
  assert checkpoint.read_card(out)['step'] == 3
  assert checkpoint.hf_dir_class_names(out) == ['a', 'b', 'c', 'd', 'e']
  # And back: the same arrays, and the model config of the HF directory.
  loaded, loaded_config = checkpoint.load_checkpoint(out)
  assert_trees_equal(loaded, params)
  assert loaded_config.layer_norm_epsilon == 1e-6
  assert not loaded_config.gelu_approximate


def test_hf_random_model_dir_loads_as_ours(tmp_path):
  hf_config = transformers.ViTConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, image_size=32, patch_size=8, num_labels=3)
  torch.manual_seed(0)
  model = transformers.ViTForImageClassification(hf_config).eval()
  with torch.no_grad():
    model.classifier.weight.normal_(0, 0.5)
  model.save_pretrained(str(tmp_path / 'hf'))
  params, config = checkpoint.load_hf_dir(str(tmp_path / 'hf'))
  assert config.layer_norm_epsilon == 1e-12 and not config.gelu_approximate
  x = images()
  assert rel_error(logits(config, 3, params, x), torch_logits(model, x)) < RTOL


def test_hf_export_refuses_what_hf_cannot_express(tmp_path):
  config = small_config(classifier='gap')
  with pytest.raises(checkpoint.CheckpointError) as excinfo:
    checkpoint.save_hf_dir(random_params(config), config, str(tmp_path / 'x'))
  assert_one_line_error(excinfo, 'class token')
  assert not os.path.exists(tmp_path / 'x')


def test_hf_dir_with_only_a_pickle_is_refused(tmp_path):
  (tmp_path / 'config.json').write_text('{"model_type": "vit"}')
  (tmp_path / 'pytorch_model.bin').write_bytes(b'not really')
  with pytest.raises(checkpoint.CheckpointError) as excinfo:
    checkpoint.load_checkpoint(str(tmp_path))
  assert_one_line_error(excinfo, 'pytorch_model.bin', 'never unpickles')


# ------------------------------------------------------------------- timm


@pytest.mark.parametrize('classifier', ['token', 'gap'])
def test_timm_loads_our_npz_with_its_own_loader(tmp_path, classifier):
  config = small_config(classifier=classifier)
  params = random_params(config)
  path = str(tmp_path / 'ours.npz')
  checkpoint.save_npz(params, path)
  timm_path = str(tmp_path / 'ours.safetensors')
  checkpoint.save_timm_safetensors(params, config, timm_path)
  kwargs = checkpoint.read_card(timm_path)['timm_model_kwargs']
  model = timm_vit.VisionTransformer(**kwargs).eval()
  timm_vit._load_weights(model, path)  # pylint: disable=protected-access
  x = images()
  ours = logits(config, 5, params, x)
  assert rel_error(ours, torch_logits(model, x)) < RTOL
  # The same through timm's factory with a local-file weight source.
  created = timm.create_model(
      'vit_tiny_patch16_224', pretrained=True, num_classes=5,
      pretrained_cfg_overlay=dict(file=path, custom_load=True),
      img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=4,
      mlp_ratio=2.0, class_token=kwargs['class_token'],
      global_pool=kwargs['global_pool'], fc_norm=False).eval()
  assert rel_error(ours, torch_logits(created, x)) < RTOL


@pytest.mark.parametrize('classifier', ['token', 'gap', 'map', 'unpooled',
                                        'token_unpooled'])
def test_timm_loads_our_safetensors_strictly(tmp_path, classifier):
  config = small_config(classifier=classifier)
  params = random_params(config)
  path = str(tmp_path / 'ours.safetensors')
  checkpoint.save_timm_safetensors(params, config, path,
                                   metadata={'model_config': config.to_dict()})
  kwargs = checkpoint.read_card(path)['timm_model_kwargs']
  model = timm_vit.VisionTransformer(**kwargs).eval()
  model.load_state_dict(safetensors.torch.load_file(path), strict=True)
  x = images()
  assert rel_error(logits(config, 5, params, x), torch_logits(model, x)) < RTOL
  loaded, loaded_config = checkpoint.load_checkpoint(path)
  assert_trees_equal(loaded, params)
  assert loaded_config.classifier == classifier


def test_timm_loads_our_hybrid_npz(tmp_path):
  """Our hybrid stem names are the released ones timm's npz loader reads."""
  config = small_config(resnet=ml_collections.ConfigDict(
      {'num_layers': (), 'width_factor': 1}))
  params = random_params(config, image_size=(64, 64))
  params['conv_root']['kernel'] *= 1e3  # See test_peers.align_hybrid_numerics.
  path = str(tmp_path / 'hybrid.npz')
  checkpoint.save_npz(params, path)
  model = timm.create_model('vit_tiny_r_s16_p8_224', pretrained=False,
                            num_classes=5, img_size=64, depth=2, embed_dim=32,
                            num_heads=4, mlp_ratio=2.0).eval()
  for module in model.modules():
    if isinstance(module, torch.nn.GroupNorm):
      module.eps = 1e-6
  timm_vit._load_weights(model, path)  # pylint: disable=protected-access
  x = images((64, 64))
  assert rel_error(logits(config, 5, params, x), torch_logits(model, x)) < RTOL


def test_timm_export_refuses_pre_logits(tmp_path):
  config = small_config(representation_size=16)
  with pytest.raises(checkpoint.CheckpointError) as excinfo:
    checkpoint.save_timm_safetensors(random_params(config), config,
                                     str(tmp_path / 'x.safetensors'))
  assert_one_line_error(excinfo, 'pre_logits')


def test_surgery_resamples_between_grids_of_equal_size():
  """4x6 and 6x4 hold as many positions: only explicit grids tell them apart."""
  config = small_config()
  loaded = random_params(config, image_size=(32, 48))
  init = random_params(config, image_size=(48, 32), seed=1)
  params, report = checkpoint.adapt_params(
      loaded, init, model_config=config, loaded_grid=(4, 6),
      target_grid=(6, 4))
  assert report.resampled == [POSEMB]
  np.testing.assert_array_equal(
      params['Transformer']['posembed_input']['pos_embedding'],
      posemb_lib.resample_posemb(
          loaded['Transformer']['posembed_input']['pos_embedding'],
          new_grid=(6, 4), old_grid=(4, 6), num_prefix_tokens=1))
  # A square checkpoint grid is inferred; the target's grid is given.
  square = random_params(config, image_size=(32, 32))
  init = random_params(config, image_size=(16, 64), seed=1)
  _, report = checkpoint.adapt_params(square, init, model_config=config,
                                      target_grid=(2, 8))
  assert report.resampled == [POSEMB]
  _, report = checkpoint.adapt_params(square, init, model_config=config)
  assert report.resampled == [] and POSEMB in report.copied


def test_sincos2d_models_export_their_fixed_table(tmp_path):
  """No parameters here; timm and HF get the table as learned embeddings."""
  config = small_config(posemb='sincos2d')
  params = random_params(config)
  assert POSEMB not in interop.flatten_params(params)
  x = images()
  ours = logits(config, 5, params, x)
  path = str(tmp_path / 'sincos.safetensors')
  checkpoint.save_timm_safetensors(params, config, path, image_size=(32, 32))
  model = timm_vit.VisionTransformer(
      **checkpoint.read_card(path)['timm_model_kwargs']).eval()
  model.load_state_dict(safetensors.torch.load_file(path), strict=True)
  assert rel_error(ours, torch_logits(model, x)) < RTOL
  out = str(tmp_path / 'hf')
  checkpoint.save_hf_dir(params, config, out, image_size=(32, 32))
  hf_model = transformers.ViTForImageClassification.from_pretrained(out)
  assert rel_error(ours, torch_logits(hf_model.eval(), x)) < RTOL
  # Without position embeddings the resolution must be given.
  with pytest.raises(checkpoint.CheckpointError, match='image size'):
    checkpoint.save_hf_dir(params, config, str(tmp_path / 'hf2'))


def test_save_npz_writes_the_released_naming(tmp_path):
  params = random_params(small_config())
  linen = interop.unflatten_params(_linen_named(interop.flatten_params(params)))
  path = str(tmp_path / 'released.npz')
  checkpoint.save_npz(linen, path)
  with np.load(path, allow_pickle=False) as archive:
    assert set(archive.files) == set(interop.flatten_params(params))
