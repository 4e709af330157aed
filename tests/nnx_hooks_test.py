"""NNX hooks: quantized Linear/Conv layers train under nnx.jit with fresh noise per step."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import qtrain
from qtrain.nnx_hooks import QuantizedConvGeneralDilated, QuantizedDotGeneral


def _linear(config, seed=0):
  layer = nnx.Linear(8, 4, rngs=nnx.Rngs(seed))
  layer.dot_general = nnx.data(QuantizedDotGeneral(config, rngs=nnx.Rngs(quant=seed + 1)))
  return layer


def test_linear_forward_matches_functional_dot():
  layer = _linear(qtrain.presets.int8())
  x = jax.random.normal(jax.random.key(0), (3, 8))
  y = layer(x)
  ref = qtrain.dot_general(x, layer.kernel[...], (((1,), (0,)), ((), ())),
                           config=qtrain.presets.int8(), key=jax.random.key(0)) + layer.bias[...][None]
  # The forward is round-to-nearest: the key does not matter.
  chex.assert_trees_all_equal(y, ref)


def test_noise_advances_per_step_and_no_retrace():
  layer = _linear(qtrain.presets.int8())
  x = jax.random.normal(jax.random.key(0), (16, 8))
  traces = []

  @nnx.jit
  def grad_fn(layer, x):
    traces.append(1)
    return nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)

  g1 = grad_fn(layer, x)
  g2 = grad_fn(layer, x)
  assert len(traces) == 1
  # Same data, new SR noise in the backward: gradients differ.
  assert not np.array_equal(np.asarray(g1.kernel[...]), np.asarray(g2.kernel[...]))


def test_conv_hook_trains():
  conv = nnx.Conv(1, 4, (3, 3), rngs=nnx.Rngs(0))
  conv.conv_general_dilated = nnx.data(
      QuantizedConvGeneralDilated(qtrain.presets.int4(), rngs=nnx.Rngs(quant=1)))
  x = jax.random.normal(jax.random.key(0), (8, 6, 6, 1))
  target = jnp.zeros((8, 6, 6, 4))
  opt = nnx.Optimizer(conv, optax.sgd(0.05), wrt=nnx.Param)

  @nnx.jit
  def step(conv, opt):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target - 1.0) ** 2))(conv)
    opt.update(conv, grads)
    return loss

  losses = [float(step(conv, opt)) for _ in range(40)]
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0]


def test_public_api_imports():
  for name in qtrain.__all__:
    assert hasattr(qtrain, name), name
