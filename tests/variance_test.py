"""Tests of the gradient variance diagnostic (`qtrain.variance`).

Oracles: a hand-written numpy computation of the decomposition of
StatQuant's `debug.py::fast_dump_2` from gradients taken here with plain
`jax.grad` on a float model (a linear model, where the QAT gradient is known
in closed form), and the properties the paper's framework predicts: the
quantization variance of an all-float recipe is exactly 0, BHQ's is below
PTQ's at 4 bits, and the caller's model (BatchNorm statistics, hooks, RNG
state) is left untouched.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qtrain
from qtrain import models, recipes, variance
from qtrain.config import REUSE
from qtrain.recipes.papers.statquant import statquant

import recipe_training_testlib as rtl


def _loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _batches(n=3, size=32):
  xtr, ytr, _, _ = rtl.digits_images()
  return [(xtr[i * size:(i + 1) * size], ytr[i * size:(i + 1) * size]) for i in range(n)]


class _Mlp(nnx.Module):

  def __init__(self, rngs):
    self.fc1 = nnx.Linear(64, 32, rngs=rngs)
    self.fc2 = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.relu(self.fc1(x.reshape(x.shape[0], -1))))


def test_sample_variance_matches_a_numpy_decomposition_of_float_gradients():
  model = _Mlp(nnx.Rngs(0))
  batches = _batches()
  report = variance.measure_variance(model, _loss, batches, recipes.fp32(), repeats=2)
  grads = [nnx.grad(_loss)(model, jnp.asarray(x), jnp.asarray(y)) for x, y in batches]
  flat = [{'/'.join(map(str, p)): np.asarray(v.get_value(), np.float64)
           for p, v in nnx.to_flat_state(nnx.state(g, nnx.Param))} for g in grads]
  for path, g0 in flat[0].items():
    stack = np.stack([f[path] for f in flat])
    mean = stack.mean(0)
    row = report.layer(path)
    np.testing.assert_allclose(row.sample_var, np.sum((stack - mean) ** 2) / 3, rtol=1e-4)
    np.testing.assert_allclose(row.grad_norm_sq, np.sum(mean ** 2), rtol=1e-4)
    assert row.quant_var == 0.0 and row.size == g0.size and not row.quantized
  assert report.sample_var > 0 and report.quant_var == 0.0
  assert report.overall_var == report.sample_var


def test_bhq_has_less_quantization_variance_than_ptq_and_the_model_is_untouched():
  model = models.LeNet(10, 1, batch_norm=True, rngs=nnx.Rngs(0))
  before = jax.tree.map(np.asarray, nnx.state(model))
  batches = _batches()
  reports = {k: variance.measure_variance(model, _loss, batches,
                                          statquant(k, 4, per_sample_weight_grad=False),
                                          repeats=3)
             for k in ('ptq', 'bhq')}
  ptq, bhq = reports['ptq'], reports['bhq']
  assert ptq.quant_var > 1.1 * bhq.quant_var > 0, (ptq.quant_var, bhq.quant_var)
  # Same forward (and batches): the QAT gradients, hence the sampling variance, agree.
  np.testing.assert_allclose(ptq.sample_var, bhq.sample_var, rtol=1e-5)
  assert ptq.sample_var > 0
  assert {r.path for r in ptq.layers if r.quantized} == {
      'stem/kernel', 'conv2/kernel', 'fc1/kernel', 'fc1/bias', 'head/kernel', 'head/bias'}
  after = jax.tree.map(np.asarray, nnx.state(model))
  jax.tree.map(np.testing.assert_array_equal, before, after)  # BN stats, params unchanged
  assert not any(isinstance(m, qtrain.nnx_hooks.HOOK_TYPES) for _, m in nnx.iter_modules(model))
  table = str(ptq)
  assert 'sample var' in table and 'quant var' in table and 'total' in table
  assert 'conv2/kernel' in table and len(table.splitlines()) == len(ptq.layers) + 5
  assert 'stem_bn' not in ptq.format_table(quantized_only=True)


def test_each_repeat_draws_new_noise():
  model = _Mlp(nnx.Rngs(1))
  batch = _batches(1)
  one = variance.measure_variance(model, _loss, batch, 'int8', repeats=1, seed=3)
  again = variance.measure_variance(model, _loss, batch, 'int8', repeats=1, seed=3)
  other = variance.measure_variance(model, _loss, batch, 'int8', repeats=1, seed=4)
  many = variance.measure_variance(model, _loss, batch, 'int8', repeats=6, seed=3)
  assert one.quant_var == again.quant_var > 0  # reproducible from the seed
  assert other.quant_var != one.quant_var
  assert many.quant_var != one.quant_var  # six different keys, not one repeated
  assert many.sample_var == 0.0 and many.num_batches == 1  # one batch: no sampling variance


def test_qat_counterpart_keeps_the_forward_and_floats_dy():
  cfg = statquant().rules[0].config
  qat = variance.qat_config(cfg)
  assert qat.fwd == cfg.fwd and qat.dlhs.lhs is None and qat.drhs.rhs is None
  assert qat.dlhs.rhs == REUSE and qat.drhs.lhs == REUSE and not qat.share_gradient_sample
  luq = recipes.get('luq')
  assert variance.qat_counterpart(luq).name == 'luq-qat'
  assert all(r.config is None or not r.config.share_gradient_sample
             for r in variance.qat_counterpart(luq).rules)
  assert variance.qat_counterpart(cfg) == qat
  assert variance.qat_counterpart([qtrain.QuantRule(config=cfg)]) == (
      qtrain.QuantRule(config=qat),)
  assert variance.qat_config(None) is None
  with pytest.raises(TypeError):
    variance.qat_config('int8')


def test_bad_arguments():
  model = _Mlp(nnx.Rngs(0))
  with pytest.raises(ValueError, match='batches'):
    variance.measure_variance(model, _loss, [], 'fp32')
  with pytest.raises(ValueError, match='repeats'):
    variance.measure_variance(model, _loss, _batches(1), 'fp32', repeats=0)
  with pytest.raises(TypeError, match='nnx'):
    variance.measure_variance(object(), _loss, _batches(1), 'fp32')
  with pytest.raises(ValueError, match='unknown recipe'):
    variance.measure_variance(model, _loss, _batches(1), 'nope')
