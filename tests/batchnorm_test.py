"""WAGEUBN's quantized BatchNorm: numpy oracle, NNX drop-in, Linen, in-place swap."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qtrain import batchnorm, models

EPS = 2.0 ** -15


def np_q(x, k):
  return np.round(np.asarray(x, np.float32) * np.float32(2.0 ** (k - 1))) / np.float32(
      2.0 ** (k - 1))


def np_bn(x, mean, var, gamma, beta):
  """papers-1-4.md §3a (official BatchNorm.py), float32 like the layer."""
  x = np.asarray(x, np.float32)
  mu = np_q(mean, 16)
  sd = np_q(np.sqrt(np.asarray(var, np.float32)), 16) + np.float32(EPS)
  xhat = np_q((x - mu) / sd, 8)
  return xhat * np_q(gamma, 8) + np_q(beta, 8)


def _data(seed=0, shape=(16, 3, 3, 5)):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)


def _assert_matches(out, ref, pre):
  """Equal, except where a value sits within float rounding of a Q(·, 8) tie."""
  out, ref = np.asarray(out), np.asarray(ref)
  near_tie = np.abs(np.abs(pre * 128) % 1 - 0.5) < 1e-4
  assert np.all((out == ref) | near_tie), np.max(np.abs(out - ref))
  assert np.mean(out == ref) > 0.99


def test_function_matches_numpy():
  x = _data()
  rng = np.random.default_rng(1)
  mean, var = rng.standard_normal(5).astype(np.float32), rng.uniform(0.1, 4, 5).astype(np.float32)
  gamma, beta = rng.uniform(0.5, 1.5, 5).astype(np.float32), rng.standard_normal(5).astype(
      np.float32)
  out = batchnorm.quantized_batch_norm(jnp.asarray(x), mean, var, gamma, beta)
  pre = (x - np_q(mean, 16)) / (np_q(np.sqrt(var), 16) + np.float32(EPS))
  _assert_matches(out, np_bn(x, mean, var, gamma, beta), pre)
  out_jit = jax.jit(batchnorm.quantized_batch_norm)(jnp.asarray(x), mean, var, gamma, beta)
  _assert_matches(out_jit, np_bn(x, mean, var, gamma, beta), pre)


def test_nnx_train_and_eval():
  x = _data(2)
  qbn = batchnorm.QuantizedBatchNorm(5, momentum=0.9, rngs=nnx.Rngs(0))
  ref = nnx.BatchNorm(5, momentum=0.9, rngs=nnx.Rngs(0))
  y = qbn(jnp.asarray(x))
  ref(jnp.asarray(x))
  # Batch statistics, running averages updated like nnx.BatchNorm's.
  chex.assert_trees_all_close(qbn.mean[...], ref.mean[...], rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(qbn.var[...], ref.var[...], rtol=1e-4)
  mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
  pre = (x - np_q(mean, 16)) / (np_q(np.sqrt(var), 16) + np.float32(EPS))
  _assert_matches(y, np_bn(x, mean, var, np.ones(5), np.zeros(5)), pre)
  # Eval: the running statistics.
  qbn.eval()
  y_eval = qbn(jnp.asarray(x))
  m, v = np.asarray(qbn.mean[...]), np.asarray(qbn.var[...])
  pre = (x - np_q(m, 16)) / (np_q(np.sqrt(v), 16) + np.float32(EPS))
  _assert_matches(y_eval, np_bn(x, m, v, np.ones(5), np.zeros(5)), pre)


def test_nnx_same_state_layout_and_grads():
  qbn = batchnorm.QuantizedBatchNorm(4, rngs=nnx.Rngs(0))
  bn = nnx.BatchNorm(4, rngs=nnx.Rngs(0))
  chex.assert_trees_all_equal_shapes_and_dtypes(nnx.state(qbn), nnx.state(bn))
  assert isinstance(qbn, nnx.BatchNorm)
  # A dead channel (zero variance) gives finite gradients (no sqrt'(0) = inf).
  x = jnp.asarray(_data(3, (8, 4))).at[:, 0].set(0.0)
  grads = nnx.grad(lambda m, x: jnp.sum(m(x) ** 2), argnums=(0, 1))(qbn, x)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_linen_module():
  x = jnp.asarray(_data(4))
  qbn = batchnorm.LinenQuantizedBatchNorm(momentum=0.9)
  variables = qbn.init(jax.random.key(0), x, use_running_average=False)
  ref_vars = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  chex.assert_trees_all_equal_shapes_and_dtypes(variables, ref_vars)
  y, updates = qbn.apply(variables, x, use_running_average=False, mutable=['batch_stats'])
  mean, var = np.asarray(x).mean((0, 1, 2)), np.asarray(x).var((0, 1, 2))
  chex.assert_trees_all_close(updates['batch_stats']['mean'], 0.1 * mean, rtol=1e-5, atol=1e-7)
  expected = batchnorm.quantized_batch_norm(x, mean, var, jnp.ones(5), jnp.zeros(5))
  chex.assert_trees_all_close(y, expected, atol=2 ** -7)  # at most one step at a tie
  y_eval = qbn.apply(variables, x, use_running_average=True)
  chex.assert_trees_all_equal(
      y_eval, batchnorm.quantized_batch_norm(x, jnp.zeros(5), jnp.ones(5), jnp.ones(5),
                                             jnp.zeros(5)))


def test_swap_lenet_in_place():
  model = models.LeNet(batch_norm=True, rngs=nnx.Rngs(0))
  old = model.stem_bn
  old.scale[...] = jnp.full(6, 1.25)
  before = nnx.state(model)
  assert batchnorm.swap_batch_norm(model) == ['conv2_bn', 'stem_bn']
  assert isinstance(model.stem_bn, batchnorm.QuantizedBatchNorm)
  assert model.stem_bn.scale is old.scale and model.stem_bn.momentum == old.momentum
  chex.assert_trees_all_equal(nnx.state(model), before)  # same layout, same values
  assert batchnorm.swap_batch_norm(model) == []  # idempotent
  assert model(jnp.ones((2, 8, 8, 1))).shape == (2, 10)
  model.eval()
  assert model.stem_bn.use_running_average


def test_swap_resnet_lists():
  model = models.ResNet20(10, 1, width=2, rngs=nnx.Rngs(0))
  swapped = batchnorm.swap_batch_norm(model)
  assert len(swapped) == 19 and 'stages/2/2/bn2' in swapped
  assert isinstance(model.stages[1][0].bn1, batchnorm.QuantizedBatchNorm)


def test_bad_arguments():
  with pytest.raises(ValueError, match='x_bits'):
    batchnorm.QuantizedBatchNorm(3, x_bits=1, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='epsilon'):
    batchnorm.quantized_batch_norm(jnp.ones((2, 3)), jnp.zeros(3), jnp.ones(3), epsilon=0.0)
  with pytest.raises(TypeError, match='model'):
    batchnorm.swap_batch_norm(nnx.BatchNorm)
  with pytest.raises(TypeError, match='unknown'):
    batchnorm.QuantizedBatchNorm.from_batch_norm(nnx.BatchNorm(3, rngs=nnx.Rngs(0)), foo=3)
