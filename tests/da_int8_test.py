"""Tests for qtrain.recipes.da_int8: registry entry, GVQ wiring per GEMM, training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

import model_testlib as lib
import recipe_training_testlib as training
from qtrain import clipping
from qtrain import config as cfgs
from qtrain import gvq
from qtrain import models
from qtrain import recipes
from qtrain import scaling
from qtrain.dot import (conv_general_dilated, conv_general_dilated_grad_state, dot_general,
                        dot_general_grad_state)
from qtrain.model import quantize_model
from qtrain.quantize import fake_quant
from qtrain.recipes import registry
from qtrain.recipes.papers.da_int8 import da_int8, da_int8_config

_INT8 = cfgs.TensorConfig(format=clipping.symmetric_int(8))


def _per_channel_dy(shape, seed: int = 0) -> jnp.ndarray:
  """dY whose output channels (last axis) differ by orders of magnitude and in shape."""
  rng = np.random.default_rng(seed)
  c = shape[-1]
  mags = 10.0 ** rng.uniform(-5, -1, size=c)
  g = rng.normal(size=shape) * mags
  g[..., ::3] = rng.standard_t(1.5, size=g[..., ::3].shape) * mags[::3]  # inverted-T channels
  return jnp.asarray(g, jnp.float32)


def _rel_close(got, want):
  # Same codes, another float32 summation order: tolerance relative to the largest entry.
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))


def test_registered_with_paper_formats_and_reported_deltas():
  info = registry.info('da_int8')
  assert info.factory is da_int8 and info.build().name == 'da_int8'
  assert '2102.04782' in info.paper and 'mobilenet' in info.families
  assert {(r.model, r.dataset, r.delta_pp) for r in info.reported} == {
      ('ResNet-50', 'ImageNet', 0.09), ('MobileNetV2', 'ImageNet', -0.52),
      ('MobileNetV2', 'CIFAR-10', -0.36)}
  assert all(r.source for r in info.reported)


def test_defaults_are_the_papers():
  config = da_int8().rules[1].config
  assert config == da_int8_config()
  assert config.fwd.lhs == config.fwd.rhs == _INT8
  assert config.dlhs.lhs == cfgs.TensorConfig(format=clipping.symmetric_int(8))  # per tensor
  dw = config.drhs.rhs
  assert dw.granularity == scaling.PerChannel() and dw.calibration == gvq.MagnitudeAwareClipEMA(
      lam=0.3, k=1.0, a=0.8)
  assert config.stateful_slots == ('drhs',)
  assert not config.share_gradient_sample
  stateless = da_int8(ema=False).rules[1].config
  assert stateless.drhs.rhs.calibration == gvq.MagnitudeAwareClip(lam=0.3, k=1.0)
  assert stateless.stateful_slots == ()


def test_dense_dx_uses_a_per_tensor_gradient_and_dw_uses_gvq():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(16, 9)) * 0.3, jnp.float32)
  g = _per_channel_dy((64, 9))
  dn = (((1,), (0,)), ((), ()))
  # The EMA's first step (initial state) is the per-step clip: max|g| per channel.
  config = da_int8_config()
  state = dot_general_grad_state(x, w, dn, config=config)
  y, vjp = jax.vjp(lambda a, b: dot_general(a, b, dn, config=config, grad_state=state), x, w)
  dx, dw = vjp(g)
  xq, wq = fake_quant(x, _INT8), fake_quant(w, _INT8)
  g_tensor = fake_quant(g, _INT8)  # absmax per tensor, nearest
  g_channel = gvq.gvq(g, axis=-1)  # GVQ, per output channel
  _rel_close(y, xq @ wq)
  _rel_close(dx, g_tensor @ wq.T)
  _rel_close(dw, xq.T @ g_channel)
  # The small channels' dW survives only with per-channel scales.
  small = int(jnp.argmin(jnp.max(jnp.abs(g), axis=0)))
  assert float(jnp.max(jnp.abs((xq.T @ g_tensor)[:, small]))) == 0.0
  assert float(jnp.max(jnp.abs(dw[:, small]))) > 0.0


def test_conv_dw_quantizes_dy_per_output_channel():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(4, 6, 6, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 3, 3, 8)) * 0.3, jnp.float32)
  g = _per_channel_dy((4, 6, 6, 8), seed=3)
  dn = ('NHWC', 'HWIO', 'NHWC')
  conv = lambda a, b, **kw: lax.conv_general_dilated(a, b, (1, 1), 'SAME',
                                                     dimension_numbers=dn, **kw)
  config = da_int8_config(ema=False)
  _, vjp = jax.vjp(lambda a, b: conv_general_dilated(
      a, b, (1, 1), 'SAME', dimension_numbers=dn, config=config), x, w)
  dx, dw = vjp(g)
  xq, wq = fake_quant(x, _INT8), fake_quant(w, _INT8)
  _, ref_vjp = jax.vjp(conv, xq, wq)
  _rel_close(dw, ref_vjp(gvq.gvq(g, axis=-1))[1])
  _rel_close(dx, ref_vjp(fake_quant(g, _INT8))[0])
  # The EMA config from its initial state quantizes the same way on its first step.
  ema = da_int8_config()
  state = conv_general_dilated_grad_state(x, w, (1, 1), 'SAME', dimension_numbers=dn,
                                          config=ema)
  _, vjp_ema = jax.vjp(lambda a, b: conv_general_dilated(
      a, b, (1, 1), 'SAME', dimension_numbers=dn, config=ema, grad_state=state), x, w)
  np.testing.assert_array_equal(vjp_ema(g)[1], dw)


def test_first_conv_and_classifier_stay_float_and_dense_gemms_are_int8():
  model, report = quantize_model(models.LeNet(10, 1, batch_norm=True, rngs=nnx.Rngs(0)),
                                 da_int8().rules, return_report=True)
  assert sorted(p for p, _, _ in report.quantized) == ['conv2', 'fc1']
  assert {'stem', 'head'} <= {p for p, _, _ in report.kept_float}
  x = jnp.asarray(training.digits_images()[0][:8])
  y = jnp.asarray(training.digits_images()[1][:8])
  loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
  graphdef, state = nnx.split(model)
  found = lib.gemms(jax.make_jaxpr(lambda s: nnx.grad(loss)(nnx.merge(graphdef, s)))(state))
  for path in ('conv2', 'fc1'):
    assert {g.gemm for g in found if g.in_layer(path)} == {'fwd', 'dlhs', 'drhs'}, path
  assert all(set(g.dtypes) == {'int8'} for g in found if g.in_layer('fc1'))
  assert not any(g.in_layer(p) for g in found for p in ('stem', 'head'))


@pytest.mark.parametrize('kwargs, err', [
    (dict(lam=-0.1), ValueError), (dict(k=0), ValueError), (dict(lam='0.3'), TypeError),
    (dict(gradient_rounding='up'), ValueError), (dict(keep_float=3), TypeError),
    (dict(keep_float='['), ValueError), (dict(a=1.5), ValueError), (dict(ema=1), TypeError)])
def test_bad_options(kwargs, err):
  with pytest.raises(err):
    da_int8(**kwargs)


def test_trains_close_to_fp32_with_different_gradients():
  fp32 = training.train_digits_cnn(recipes.fp32())
  da = training.train_digits_cnn(da_int8())
  assert np.all(np.isfinite(da.losses))
  # Measured (seed 0, 100 steps): fp32 0.964, da_int8 0.972.
  assert da.accuracy >= fp32.accuracy - 0.03, (da.accuracy, fp32.accuracy)
  assert training.max_relative_grad_difference(da, fp32) > 0.01
