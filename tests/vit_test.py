"""Tests of qtrain.vit: patch layout against numpy, shapes, paths, quantized training step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qtrain
from qtrain import models, tasks
from qtrain.vit import ViT, patchify


def _small_vit(**kwargs):
  defaults = dict(num_classes=10, in_channels=1, image_size=8, d_model=16, num_heads=2,
                  num_layers=2, rngs=nnx.Rngs(0))
  return ViT(**{**defaults, **kwargs})


def test_patchify_matches_numpy_loops():
  images = np.arange(2 * 6 * 6 * 3, dtype=np.float32).reshape(2, 6, 6, 3)
  p = 3
  expected = np.stack([np.stack([images[b, i * p:(i + 1) * p, j * p:(j + 1) * p, :].reshape(-1)
                                 for i in range(2) for j in range(2)]) for b in range(2)])
  np.testing.assert_array_equal(np.asarray(patchify(jnp.asarray(images), p)), expected)


def test_patch_embedding_equals_strided_conv():
  # Eq. 1's linear projection of flattened patches is a P×P conv with stride P.
  model = _small_vit(image_size=8, patch_size=4)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  kernel = model.stem.kernel[...].reshape(4, 4, 1, 16)  # (row, col, channel) flattening
  conv = jax.lax.conv_general_dilated(x, kernel, (4, 4), 'VALID',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  conv = np.asarray(conv).reshape(2, 4, 16) + np.asarray(model.stem.bias[...])
  np.testing.assert_allclose(np.asarray(model.stem(patchify(x, 4))), conv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('image_size, channels, patches', [(8, 1, 16), (28, 1, 16), (32, 3, 16)])
def test_output_shape_and_default_patch_grid(image_size, channels, patches):
  model = _small_vit(image_size=image_size, in_channels=channels)
  assert model.num_patches == patches and model.pos_embed.shape == (1, patches + 1, 16)
  logits = nnx.jit(lambda m, x: m(x))(model, jnp.ones((3, image_size, image_size, channels)))
  assert logits.shape == (3, 10) and logits.dtype == jnp.float32


def test_class_token_output_depends_on_every_patch():
  model = _small_vit()
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 1))
  base = model(x)
  # Changing one pixel in the last patch changes the class-token logits.
  changed = model(x.at[0, 7, 7, 0].add(1.0))
  assert float(jnp.max(jnp.abs(changed - base))) > 1e-6


def test_module_paths_and_layer_types():
  model = nnx.eval_shape(lambda: ViT(num_classes=10, image_size=28, rngs=nnx.Rngs(0)))
  assert isinstance(model.stem, nnx.Linear) and model.stem.in_features == 49
  assert isinstance(model.head, nnx.Linear)
  block = model.blocks[0]
  assert isinstance(block.attn, nnx.MultiHeadAttention)
  assert block.attn.query.kernel.shape == (64, 4, 16) and block.attn.out.kernel.shape == (4, 16,
                                                                                          64)
  assert isinstance(block.mlp.fc1, nnx.Linear) and isinstance(block.ln1, nnx.LayerNorm)
  assert len(model.blocks) == 4


def test_registered_in_zoo_and_image_tasks():
  model = nnx.eval_shape(lambda: models.create('vit', image_size=28, rngs=nnx.Rngs(0)))
  assert isinstance(model, ViT)
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == 205_066
  for name in ('digits', 'fashion_mnist'):
    tasks.get(name).check_model('vit')
  data = tasks.get('digits').load(limit=64)
  built = tasks.get('digits').create_model('vit', data, rngs=nnx.Rngs(0))
  assert built.image_size == 8 and built.patch_size == 2


def test_width_override_sets_d_model():
  model = nnx.eval_shape(lambda: ViT(image_size=8, width=2, rngs=nnx.Rngs(0)))
  assert model.stem.out_features == 64


@pytest.mark.parametrize('kwargs, match', [
    (dict(image_size=28, patch_size=5), 'not divisible by patch_size=5'),
    (dict(d_model=30, num_heads=4), 'd_model=30 is not divisible by num_heads=4'),
    (dict(num_layers=0), 'num_layers=0'),
])
def test_bad_sizes_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ViT(**{'image_size': 8, **kwargs}, rngs=nnx.Rngs(0))


def test_wrong_image_shape_raises():
  with pytest.raises(ValueError, match=r'images must be \[B, 8, 8, 1\]'):
    _small_vit()(jnp.ones((1, 28, 28, 1)))


def test_quantized_train_step_lowers_loss():
  model = _small_vit()
  qtrain.quantize_model(model, [qtrain.QuantRule(module_path='stem|head', config=None),
                                qtrain.QuantRule(config=qtrain.presets.int8())],
                        rngs=nnx.Rngs(quant=1))
  x = jax.random.normal(jax.random.key(0), (16, 8, 8, 1))
  y = jnp.arange(16) % 10
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(15)]
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0]
