"""Numerical peers: HF transformers and timm ViTs give our logits.

Each peer is built offline with random weights, its state dict is mapped into
our parameter tree (vit_jax.interop) and both forwards run on the same
images. Peers' weights are re-drawn with unit-scale LayerNorms/biases so every
tensor of the mapping matters.
"""

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import timm
import torch
import transformers

from vit_jax.interop import hf
from vit_jax.interop import timm as timm_map
from vit_jax.models import registry

RTOL = 1e-5


def rel_error(ours, ref) -> float:
  """max |ours - ref| / max |ref|."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def randomize_torch(module: torch.nn.Module, seed: int = 0) -> None:
  """Draws every parameter anew: N(1, 0.2) for norms' weights, else N(0, .)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, param in module.named_parameters():
      noise = torch.randn(param.shape, generator=generator)
      if param.ndim == 1 and 'norm' in name and name.endswith('weight'):
        param.copy_(1 + 0.2 * noise)
      elif param.ndim == 1 or name.endswith(('token', 'embeddings', 'latent',
                                             'pos_embed')):
        param.copy_(0.2 * noise)
      else:
        fan_in = int(np.prod(param.shape[1:]))
        param.copy_(noise / np.sqrt(fan_in))


def images(size, seed=0, batch=2):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(batch, size[0], size[1], 3)).astype(np.float32)


def torch_logits(model, x):
  with torch.no_grad():
    out = model(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  return getattr(out, 'logits', out).numpy()


def our_logits(config, num_classes, params, x):
  model = registry.build_model(config, num_classes)
  return np.asarray(jax.jit(model.apply)({'params': params}, x))


def torch_state_dict(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- HF


def hf_model(hidden_act='gelu', image_size=32):
  config = transformers.ViTConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=64, image_size=image_size, patch_size=8, num_labels=5,
      hidden_act=hidden_act)
  model = transformers.ViTForImageClassification(config).eval()
  randomize_torch(model)
  return model


@pytest.mark.parametrize('hidden_act,approximate', [
    ('gelu', False), ('gelu_pytorch_tanh', True), ('gelu_new', True)])
def test_hf_random_model_gives_our_logits(hidden_act, approximate):
  model = hf_model(hidden_act)
  config = hf.hf_config_to_model_config(model.config.to_dict())
  assert config.gelu_approximate == approximate
  assert config.layer_norm_epsilon == 1e-12
  params = hf.from_hf_state_dict(torch_state_dict(model), num_heads=4)
  x = images((32, 32))
  assert rel_error(our_logits(config, 5, params, x),
                   torch_logits(model, x)) < RTOL


@pytest.mark.parametrize('hidden_act', ['gelu', 'gelu_pytorch_tanh'])
def test_hf_gradients_are_our_gradients(hidden_act):
  """PyTorch's autograd is the reference for our hand-written gradients."""
  model = hf_model(hidden_act)
  config = hf.hf_config_to_model_config(model.config.to_dict())
  params = hf.from_hf_state_dict(torch_state_dict(model), num_heads=4)
  x = images((32, 32), batch=3)
  logit_weights = np.random.default_rng(1).normal(size=(3, 5))

  torch_x = torch.from_numpy(x.transpose(0, 3, 1, 2)).requires_grad_()
  torch_loss = (model(torch_x).logits *
                torch.from_numpy(logit_weights).float()).sum()
  torch_loss.backward()
  torch_grads = {name: p.grad.numpy() for name, p in model.named_parameters()}
  expected = hf.from_hf_state_dict(torch_grads, num_heads=4)

  ours = registry.build_model(config, 5)

  def loss(params, x):
    return jnp.sum(ours.apply({'params': params}, x) * logit_weights)

  grads, grad_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  flat_ours = flax.traverse_util.flatten_dict(grads, sep='/')
  flat_expected = flax.traverse_util.flatten_dict(expected, sep='/')
  assert set(flat_ours) == set(flat_expected)
  scale = max(np.abs(v).max() for v in flat_expected.values())
  for key, value in flat_expected.items():
    if np.abs(value).max() < 1e-6 * scale:
      # The key bias cannot change a softmax over keys: both are ~0.
      assert np.abs(flat_ours[key]).max() < 1e-6 * scale, key
    else:
      assert rel_error(flat_ours[key], value) < 1e-4, key
  assert rel_error(grad_x,
                   torch_x.grad.numpy().transpose(0, 2, 3, 1)) < 1e-4


def test_hf_non_square_images_and_grid():
  model = hf_model(image_size=(32, 48))
  config = hf.hf_config_to_model_config(model.config.to_dict())
  params = hf.from_hf_state_dict(torch_state_dict(model), num_heads=4)
  x = images((32, 48))
  assert rel_error(our_logits(config, 5, params, x),
                   torch_logits(model, x)) < RTOL


def test_our_params_load_strictly_into_hf():
  model = hf_model()
  config = hf.hf_config_to_model_config(model.config.to_dict())
  params = hf.from_hf_state_dict(torch_state_dict(model), num_heads=4)
  fresh = transformers.ViTForImageClassification(model.config).eval()
  state_dict = hf.to_hf_state_dict(params, config, naming='modules')
  fresh.load_state_dict({k: torch.from_numpy(v)
                         for k, v in state_dict.items()}, strict=True)
  x = images((32, 32), seed=1)
  assert rel_error(torch_logits(fresh, x), our_logits(config, 5, params,
                                                      x)) < RTOL


def test_hf_mapping_round_trips_bit_identically():
  reference = torch_state_dict(hf_model())
  params = hf.from_hf_state_dict(reference, num_heads=4)
  back = hf.to_hf_state_dict(params, hf.hf_config_to_model_config({}),
                             naming='modules')
  assert set(back) == set(reference)
  for key, value in reference.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_hf_vit_model_pooler_is_our_pre_logits():
  config = transformers.ViTConfig(
      hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
      intermediate_size=64, image_size=32, patch_size=8, pooler_output_size=24)
  model = transformers.ViTModel(config).eval()
  randomize_torch(model)
  params = hf.from_hf_state_dict(torch_state_dict(model), num_heads=4)
  ours_config = hf.hf_config_to_model_config(config.to_dict(),
                                             has_pooler=True)
  assert ours_config.representation_size == 24 and 'head' not in params
  x = images((32, 32))
  with torch.no_grad():
    pooled = model(torch.from_numpy(x.transpose(0, 3, 1, 2))).pooler_output
  assert rel_error(our_logits(ours_config, None, params, x),
                   pooled.numpy()) < RTOL


# -------------------------------------------------------------- timm


def timm_model(name, **kwargs):
  model = timm.create_model(name, pretrained=False, num_classes=5,
                            **kwargs).eval()
  randomize_torch(model)
  return model


def our_config_of(model, classifier='token', resnet=None):
  """The vit_jax config of a (reduced) timm ViT: exact GELU, epsilon 1e-6."""
  config = registry.get_model_config('Ti/16')
  config.hidden_size = model.embed_dim
  config.num_layers = len(model.blocks)
  config.num_heads = model.blocks[0].attn.num_heads
  config.mlp_dim = model.blocks[0].mlp.fc1.out_features
  config.patch_size = tuple(model.patch_embed.proj.kernel_size)
  config.classifier = classifier
  config.gelu_approximate = False
  if resnet is not None:
    config.resnet = ml_collections.ConfigDict(
        {'num_layers': resnet, 'width_factor': 1})
  return config


@pytest.mark.parametrize('kwargs,classifier', [
    (dict(), 'token'),
    (dict(class_token=False, global_pool='avg', fc_norm=False), 'gap'),
    (dict(class_token=False, global_pool='map'), 'map'),
])
def test_timm_vit_tiny_gives_our_logits(kwargs, classifier):
  model = timm_model('vit_tiny_patch16_224', img_size=32, patch_size=8,
                     depth=2, **kwargs)
  state_dict = torch_state_dict(model)
  params = timm_map.from_timm_state_dict(state_dict, num_heads=3)
  config = our_config_of(model, classifier)
  x = images((32, 32))
  assert rel_error(our_logits(config, 5, params, x),
                   torch_logits(model, x)) < RTOL
  back = timm_map.to_timm_state_dict(params, config)
  assert set(back) == set(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def align_hybrid_numerics(model):
  """Makes timm's stem compute what the official StdConv/GroupNorm compute.

  Weight standardisation is scale invariant except for its epsilon, which
  timm puts inside the square root (1e-8) and the official code outside
  (1e-5): scaling every standardised kernel by 1e3 makes both negligible.
  GroupNorm's epsilon is 1e-5 in timm, 1e-6 in flax.
  """
  with torch.no_grad():
    for module in model.modules():
      if 'StdConv' in type(module).__name__:
        module.weight.mul_(1e3)
      if isinstance(module, torch.nn.GroupNorm):
        module.eps = 1e-6


def test_timm_hybrid_tiny_gives_our_logits():
  """timm's vit_tiny_r_s16_p8 (root-block stem) <-> our R+ViT-Ti_16 shape."""
  model = timm_model('vit_tiny_r_s16_p8_224', img_size=64, depth=2)
  align_hybrid_numerics(model)
  state_dict = torch_state_dict(model)
  params = timm_map.from_timm_state_dict(state_dict, num_heads=3)
  assert params['conv_root']['kernel'].shape == (7, 7, 3, 64)
  config = our_config_of(model, resnet=())
  x = images((64, 64))
  assert rel_error(our_logits(config, 5, params, x),
                   torch_logits(model, x)) < RTOL
  back = timm_map.to_timm_state_dict(params, config)
  assert set(back) == set(state_dict)


@pytest.mark.slow
def test_timm_resnet_hybrid_gives_our_logits():
  """timm's vit_small_r26_s32 (ResNetV2 stages) <-> our R26+ViT-S shape."""
  model = timm_model('vit_small_r26_s32_224', img_size=64, depth=1,
                     embed_dim=64, num_heads=4)
  align_hybrid_numerics(model)
  # Eight residual units at full scale lose ~6e-6 to float32 rounding in
  # either library (measured against float64); halving each residual
  # branch's last GroupNorm (zero at init) keeps rounding near 1e-6.
  with torch.no_grad():
    for name, module in model.named_modules():
      if name.endswith('norm3'):
        module.weight.mul_(0.5)
  state_dict = torch_state_dict(model)
  params = timm_map.from_timm_state_dict(state_dict, num_heads=4)
  assert 'conv_proj' in params['block2']['unit1']
  assert 'conv_proj' not in params['block2']['unit2']
  config = our_config_of(model, resnet=(2, 2, 2, 2))
  x = images((64, 64))
  assert rel_error(our_logits(config, 5, params, x),
                   torch_logits(model, x)) < RTOL
  back = timm_map.to_timm_state_dict(params, config)
  assert set(back) == set(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_unknown_peer_keys_are_named():
  state_dict = torch_state_dict(timm_model('vit_tiny_patch16_224',
                                           img_size=32, patch_size=8, depth=1))
  state_dict['blocks.0.ls1.gamma'] = np.ones(192, np.float32)
  with pytest.raises(ValueError, match=r'blocks\.0\.ls1\.gamma'):
    timm_map.from_timm_state_dict(state_dict, num_heads=3)
  del state_dict['blocks.0.ls1.gamma'], state_dict['norm.weight']
  with pytest.raises(ValueError, match=r'missing tensor\(s\): norm\.weight'):
    timm_map.from_timm_state_dict(state_dict, num_heads=3)
