"""The ViT family: exact parameter counts, shapes, heads, numerics, names."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models
from vit_jax.models import resnet as resnet_lib
from vit_jax.models import vit

# The official parameter counts with a 1000-class head (vit_jax README).
OFFICIAL_PARAM_COUNTS = {
    'ViT-Ti_16': 5_717_416,
    'ViT-S_16': 22_050_664,
    'ViT-S_32': 22_878_952,
    'ViT-B_8': 86_576_872,
    'ViT-B_16': 86_567_656,
    'ViT-B_32': 88_224_232,
    'ViT-L_16': 304_326_632,
    'ViT-L_32': 306_535_400,
    'ViT-H_14': 632_045_800,
    'ViT-B_16-gap-norep': 86_566_120,
    'ViT-S_16-gap-norep': 22_049_896,
    'R+ViT-Ti_16': 6_337_704,
    'R26+ViT-S_32': 36_431_912,
    'R26+ViT-B_32': 101_383_976,
    'R50+ViT-B_16': 98_659_112,
    'R50+ViT-L_32': 328_994_856,
}


def tiny_model(**overrides):
  """A 2-layer ViT small enough for real forwards in every test."""
  config = dict(patch_size=(4, 4), hidden_size=32, num_layers=2, num_heads=4,
                mlp_dim=64)
  config.update(overrides)
  num_classes = config.pop('num_classes', 10)
  return vit.VisionTransformer(num_classes=num_classes, **config)


def init(model, images, seed=0):
  # Jitted: one compile is much faster than running init op by op.
  return jax.jit(model.init)(jax.random.key(seed), images)['params']


def abstract_params(model, shape):
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros(shape)))['params']


def random_images(shape, seed=0):
  return jax.random.uniform(jax.random.key(seed), shape, minval=-1, maxval=1)


@pytest.mark.parametrize('name', sorted(OFFICIAL_PARAM_COUNTS))
def test_parameter_count_equals_official(name):
  model = models.build_model(models.get_model_config(name), num_classes=1000)
  params = abstract_params(model, (1, 224, 224, 3))
  assert models.count_params(params) == OFFICIAL_PARAM_COUNTS[name]


@pytest.mark.parametrize('name', models.known_names())
def test_every_registered_model_has_the_right_output_shape(name):
  model = models.build_model(models.get_model_config(name), num_classes=7)

  def forward():
    images = jnp.zeros((2, 224, 224, 3))
    params = model.init(jax.random.key(0), images)
    return model.apply(params, images)

  assert jax.eval_shape(forward).shape == (2, 7)


@pytest.mark.parametrize('variant,official', [
    ('Ti/16', 'ViT-Ti_16'), ('B/16', 'ViT-B_16'), ('L/14', 'ViT-L_14'),
    ('S/32-gap-norep', 'ViT-S_32-gap-norep'), ('ViT-B_8', 'ViT-B_8')])
def test_variant_strings_name_the_official_models(variant, official):
  config = models.get_model_config(variant)
  assert config.name == official
  assert config.patch_size[0] == int(official.split('_')[1].split('-')[0])


def test_variant_string_and_official_name_build_the_same_model():
  assert (models.get_model_config('B/16').to_dict() ==
          models.get_model_config('ViT-B_16').to_dict())


def test_unknown_model_name_lists_the_known_ones():
  with pytest.raises(ValueError, match=r"unknown model 'ViT-X_16'.*ViT-B_16"):
    models.get_model_config('ViT-X_16')


@pytest.mark.parametrize('name', ['ViT-Ti_16', 'R+ViT-Ti_16'])
def test_small_official_models_run_a_real_forward(name):
  model = models.build_model(models.get_model_config(name), num_classes=5)
  images = random_images((2, 64, 64, 3))
  params = init(model, images)
  logits = model.apply({'params': params}, images)
  assert logits.shape == (2, 5)
  assert np.all(np.isfinite(logits))
  # The head starts at zero, as in the paper, so the first logits are 0.
  np.testing.assert_array_equal(logits, 0.0)


def test_parameter_names_are_the_released_checkpoint_names():
  model = tiny_model(num_layers=1, representation_size=16)
  params = init(model, jnp.zeros((1, 8, 8, 3)))
  names = {'/'.join(k.key for k in path)
           for path, _ in jax.tree_util.tree_leaves_with_path(params)}
  block = 'Transformer/encoderblock_0'
  attention = f'{block}/MultiHeadDotProductAttention_1'
  expected = {
      'cls', 'embedding/kernel', 'embedding/bias',
      'Transformer/posembed_input/pos_embedding',
      f'{block}/LayerNorm_0/scale', f'{block}/LayerNorm_0/bias',
      f'{block}/LayerNorm_2/scale', f'{block}/LayerNorm_2/bias',
      f'{block}/MlpBlock_3/Dense_0/kernel', f'{block}/MlpBlock_3/Dense_0/bias',
      f'{block}/MlpBlock_3/Dense_1/kernel', f'{block}/MlpBlock_3/Dense_1/bias',
      'Transformer/encoder_norm/scale', 'Transformer/encoder_norm/bias',
      'pre_logits/kernel', 'pre_logits/bias', 'head/kernel', 'head/bias',
  } | {f'{attention}/{p}/{w}' for p in ('query', 'key', 'value', 'out')
       for w in ('kernel', 'bias')}
  assert names == expected


def test_attention_kernels_have_the_official_shapes():
  params = init(tiny_model(), jnp.zeros((1, 8, 8, 3)))
  attention = params['Transformer']['encoderblock_0'][
      'MultiHeadDotProductAttention_1']
  assert attention['query']['kernel'].shape == (32, 4, 8)
  assert attention['query']['bias'].shape == (4, 8)
  assert attention['out']['kernel'].shape == (4, 8, 32)
  assert attention['out']['bias'].shape == (32,)


def test_hybrid_stem_uses_the_released_names():
  config = models.get_model_config('R50+ViT-B_16')
  params = abstract_params(models.build_model(config, 10), (1, 64, 64, 3))
  assert params['conv_root']['kernel'].shape == (7, 7, 3, 64)
  assert set(params['gn_root']) == {'scale', 'bias'}
  unit = params['block1']['unit1']
  assert {'conv_proj', 'gn_proj', 'conv1', 'gn1', 'conv2', 'gn2', 'conv3',
          'gn3'} <= set(unit)
  assert set(params['block3']) == {f'unit{i}' for i in range(1, 10)}


def test_hybrid_last_groupnorm_starts_at_zero():
  model = tiny_model(patch_size=(1, 1),
                     resnet=resnet_lib.ResNetSpec(num_layers=(1, 1)))
  params = init(model, jnp.zeros((1, 32, 32, 3)))
  np.testing.assert_array_equal(params['block1']['unit1']['gn3']['scale'], 0)


@pytest.mark.parametrize('height,width', [(32, 48), (48, 16)])
def test_non_square_images(height, width):
  model = tiny_model()
  images = random_images((2, height, width, 3))
  params = init(model, images)
  _, aux = model.apply({'params': params}, images, return_intermediates=True)
  assert aux['grid'] == (height // 4, width // 4)
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (
      1, 1 + (height // 4) * (width // 4), 32)


@pytest.mark.parametrize('classifier,output_shape,has_cls', [
    ('token', (2, 10), True),
    ('gap', (2, 10), False),
    ('map', (2, 10), False),
    ('unpooled', (2, 4, 10), False),
    ('token_unpooled', (2, 5, 10), True),
])
def test_each_head_type(classifier, output_shape, has_cls):
  model = tiny_model(classifier=classifier)
  images = random_images((2, 8, 8, 3))
  params = init(model, images)
  assert ('cls' in params) == has_cls
  assert ('MAPHead_0' in params) == (classifier == 'map')
  posemb = params['Transformer']['posembed_input']['pos_embedding']
  assert posemb.shape[1] == 4 + has_cls
  logits = model.apply({'params': params}, images)
  assert logits.shape == output_shape


def test_no_head_returns_features():
  model = tiny_model(num_classes=None, representation_size=16)
  images = random_images((2, 8, 8, 3))
  features = model.apply({'params': init(model, images)}, images)
  assert features.shape == (2, 16)
  assert np.all(np.abs(features) <= 1)  # tanh pre-logits


def test_head_bias_init_is_configurable():
  params = init(tiny_model(head_bias_init=-6.9), jnp.zeros((1, 8, 8, 3)))
  np.testing.assert_allclose(params['head']['bias'], -6.9, rtol=1e-6)
  np.testing.assert_array_equal(params['head']['kernel'], 0)


def test_unknown_classifier_is_an_error():
  with pytest.raises(ValueError, match="unknown classifier 'tok'"):
    tiny_model(classifier='tok')


def test_image_size_not_divisible_by_patch_is_an_error():
  model = tiny_model()
  with pytest.raises(ValueError, match='not divisible by the patch size 4x4'):
    init(model, jnp.zeros((1, 10, 8, 3)))


def test_resolution_change_without_resampling_is_a_clear_error():
  model = tiny_model()
  params = init(model, jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match='resample the position embeddings'):
    model.apply({'params': params}, jnp.zeros((1, 16, 16, 3)))


def test_bfloat16_compute_matches_float32_within_bf16_tolerance():
  model = tiny_model(num_layers=4, head_bias_init=0.0)
  images = random_images((4, 16, 16, 3))
  params = init(model, images)
  # A random head, so the logits are not all zero.
  params['head']['kernel'] = jax.random.normal(jax.random.key(1),
                                               params['head']['kernel'].shape)
  logits32 = model.apply({'params': params}, images)
  logits16 = vit.replace(model, dtype=jnp.bfloat16).apply({'params': params},
                                                          images)
  assert logits16.dtype == jnp.float32
  # bfloat16 keeps 8 bits of mantissa: relative error ~ 2^-8 per rounding.
  scale = np.max(np.abs(logits32))
  np.testing.assert_allclose(logits16, logits32, atol=0.05 * scale)
  assert not np.allclose(logits16, logits32, atol=1e-7 * scale)


def test_params_keep_their_dtype_under_bfloat16_compute():
  model = tiny_model(dtype=jnp.bfloat16)
  params = init(model, jnp.zeros((1, 8, 8, 3)))
  assert {p.dtype for p in jax.tree_util.tree_leaves(params)} == {
      jnp.dtype(jnp.float32)}


def test_remat_gives_the_same_logits_and_gradients():
  images = random_images((2, 8, 8, 3))
  plain, rematted = tiny_model(), tiny_model(remat=True)
  params = init(plain, images)
  params['head']['kernel'] += 0.1

  def loss(model, p):
    return jnp.sum(model.apply({'params': p}, images) ** 2)

  np.testing.assert_allclose(loss(rematted, params), loss(plain, params),
                             rtol=1e-6)
  grads = jax.grad(lambda p: loss(rematted, p))(params)
  expected = jax.grad(lambda p: loss(plain, p))(params)
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
      grads, expected)


def test_intermediates_return_blocks_and_attention_weights():
  model = tiny_model(num_layers=3)
  images = random_images((2, 8, 12, 3))
  params = init(model, images)
  logits, aux = model.apply({'params': params}, images,
                            return_intermediates=True)
  assert logits.shape == (2, 10)
  assert len(aux['blocks']) == 3 and len(aux['attention_weights']) == 3
  tokens = 1 + 2 * 3
  for weights in aux['attention_weights']:
    assert weights.shape == (2, 4, tokens, tokens)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
  assert aux['encoded'].shape == (2, tokens, 32)


def test_dropout_is_active_only_in_training():
  model = tiny_model(dropout_rate=0.5)
  images = random_images((2, 8, 8, 3))
  params = init(model, images)
  forward = lambda seed: model.apply(  # pylint: disable=g-long-lambda
      {'params': params}, images, train=True, return_intermediates=True,
      rngs={'dropout': jax.random.key(seed)})[1]['encoded']
  assert not np.allclose(forward(0), forward(1))
  eval_a = model.apply({'params': params}, images, return_intermediates=True)
  eval_b = model.apply({'params': params}, images, return_intermediates=True)
  np.testing.assert_array_equal(eval_a[1]['encoded'], eval_b[1]['encoded'])


def test_stochastic_depth_grows_linearly_over_depth():
  # With rate 1.0 over 2 blocks the first block keeps its branches (rate 0)
  # and the last always drops both, so it returns its input unchanged.
  model = tiny_model(stochastic_depth=1.0)
  images = random_images((2, 8, 8, 3))
  params = init(model, images)
  _, aux = model.apply({'params': params}, images, train=True,
                       return_intermediates=True,
                       rngs={'dropout': jax.random.key(0)})
  _, plain = model.apply({'params': params}, images, return_intermediates=True)
  np.testing.assert_array_equal(aux['blocks'][1], aux['blocks'][0])
  np.testing.assert_allclose(aux['blocks'][0], plain['blocks'][0], rtol=1e-6)


@pytest.mark.parametrize('patch_size', [(4, 4), (2, 3)])
def test_patch_embedding_is_the_released_strided_convolution(patch_size):
  """Same parameters, initial values, outputs and gradients as nn.Conv."""
  conv = nn.Conv(16, kernel_size=patch_size, strides=patch_size,
                 padding='VALID')
  embed = vit.PatchEmbedding(16, patch_size)
  images = random_images((2, 8, 12, 3))
  conv_params = conv.init(jax.random.key(1), images)['params']
  params = embed.init(jax.random.key(1), images)['params']
  assert jax.tree_util.tree_map(np.shape, params) == jax.tree_util.tree_map(
      np.shape, conv_params)
  np.testing.assert_array_equal(params['kernel'], conv_params['kernel'])
  params = randomize(params)
  np.testing.assert_allclose(embed.apply({'params': params}, images),
                             conv.apply({'params': params}, images),
                             rtol=1e-5, atol=1e-6)
  cotangent = random_images((2, 8 // patch_size[0], 12 // patch_size[1], 16),
                            seed=2)
  def grads(module):
    def loss(p, x):
      return jnp.sum(module.apply({'params': p}, x) * cotangent)
    return jax.grad(loss, argnums=(0, 1))(params, images)
  for got, want in zip(jax.tree_util.tree_leaves(grads(embed)),
                       jax.tree_util.tree_leaves(grads(conv))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_sincos2d_position_embeddings_have_no_parameters():
  model = tiny_model(posemb='sincos2d')
  params = init(model, jnp.zeros((1, 8, 8, 3)))
  assert 'posembed_input' not in params['Transformer']
  table = np.asarray(vit.sincos2d_posemb(2, 3, 8))[0]
  # Token (row 1, col 2): x=2, y=1 with frequencies 1 and 1/10000.
  omega = np.array([1.0, 1e-4])
  expected = np.concatenate([np.sin(2 * omega), np.cos(2 * omega),
                             np.sin(1 * omega), np.cos(1 * omega)])
  np.testing.assert_allclose(table[1 * 3 + 2], expected, rtol=1e-6)


def reference_forward(params, images, *, patch, heads, epsilon, approximate):
  """An independent NumPy ViT forward (token classifier), float64."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(images, np.float64)
  batch, height, width, channels = x.shape
  gh, gw = height // patch, width // patch
  patches = x.reshape(batch, gh, patch, gw, patch, channels).transpose(
      0, 1, 3, 2, 4, 5).reshape(batch, gh * gw, -1)
  kernel = p['embedding']['kernel'].reshape(-1, p['embedding']['kernel'].shape[-1])
  tokens = patches @ kernel + p['embedding']['bias']
  cls = np.broadcast_to(p['cls'], (batch, 1, tokens.shape[-1]))
  x = np.concatenate([cls, tokens], axis=1)
  x = x + p['Transformer']['posembed_input']['pos_embedding']

  def layer_norm(v, ln):
    mean = v.mean(-1, keepdims=True)
    var = ((v - mean)**2).mean(-1, keepdims=True)
    return (v - mean) / np.sqrt(var + epsilon) * ln['scale'] + ln['bias']

  def gelu(v):
    if approximate:
      return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))
    from scipy import special  # pylint: disable=g-import-not-at-top
    return 0.5 * v * (1 + special.erf(v / np.sqrt(2)))

  i = 0
  while f'encoderblock_{i}' in p['Transformer']:
    block = p['Transformer'][f'encoderblock_{i}']
    att = block['MultiHeadDotProductAttention_1']
    y = layer_norm(x, block['LayerNorm_0'])
    q, k, v = (np.einsum('btd,dhk->bthk', y, att[n]['kernel']) + att[n]['bias']
               for n in ('query', 'key', 'value'))
    logits = np.einsum('bqhk,bthk->bhqt', q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    mixed = np.einsum('bhqt,bthk->bqhk', weights, v)
    x = x + np.einsum('bqhk,hkd->bqd', mixed, att['out']['kernel']) + att[
        'out']['bias']
    mlp = block['MlpBlock_3']
    y = layer_norm(x, block['LayerNorm_2'])
    y = gelu(y @ mlp['Dense_0']['kernel'] + mlp['Dense_0']['bias'])
    x = x + y @ mlp['Dense_1']['kernel'] + mlp['Dense_1']['bias']
    i += 1
  x = layer_norm(x, p['Transformer']['encoder_norm'])
  return x[:, 0] @ p['head']['kernel'] + p['head']['bias']


def randomize(params, seed=0):
  """Gives every parameter (zero heads, unit norms) a random value."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(treedef, [
      leaf + 0.3 * jax.random.normal(key, leaf.shape)
      for leaf, key in zip(leaves, keys)])


@pytest.mark.parametrize('epsilon,approximate', [(1e-6, True), (1e-12, False)])
def test_forward_matches_an_independent_numpy_reference(epsilon, approximate):
  model = tiny_model(layer_norm_epsilon=epsilon, gelu_approximate=approximate)
  images = random_images((2, 8, 12, 3))
  params = randomize(init(model, images))
  logits = model.apply({'params': params}, images)
  expected = reference_forward(params, images, patch=4, heads=4,
                               epsilon=epsilon, approximate=approximate)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_default_numerics_are_the_official_ones():
  model = tiny_model()
  assert model.layer_norm_epsilon == 1e-6
  assert model.gelu_approximate
  # The two GELUs differ, so the reference test above tells them apart.
  images = random_images((2, 8, 8, 3))
  params = randomize(init(model, images))
  tanh_logits = model.apply({'params': params}, images)
  erf_logits = vit.replace(model, gelu_approximate=False).apply(
      {'params': params}, images)
  assert not np.allclose(tanh_logits, erf_logits, rtol=1e-6)
