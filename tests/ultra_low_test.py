"""Tests of the Ultra-low recipe (`qtrain.recipes.ultra_low`) and PACT/GradScale in `qtrain.four_bit`.

Oracles: plain-numpy transcriptions written here (radix-4 grids by brute-force
nearest level, PACT, the power-of-two GradScale, SAWB), `ml_dtypes` for FP8
e5m2, the dot's backward on diagonal operands so each backward GEMM's
quantized gradient can be read back, and a short digits training run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

import qtrain
from qtrain import dot, four_bit, models, numerics, recipes, scaling
from qtrain.recipes import registry
from qtrain.recipes.papers import ultra_low as ul_mod
from qtrain import pact as pact_mod
from qtrain.recipes.papers.ultra_low import ultra_low, ultra_low_config

import recipe_training_testlib as rtl

DN = (((1,), (0,)), ((), ()))


# ---------------------------------------------------------------------------
# numpy transcriptions
# ---------------------------------------------------------------------------
def np_gradscale(x, top=64.0):
  return 2.0 ** np.ceil(np.log2(np.max(np.abs(x)) / top))


def np_radix4(x, phase):
  """Nearest level (linear distance) of {0} ∪ {2^phase·4^k, k=-3..3}, scale 2^ceil(log2(max/64))."""
  x = np.asarray(x, np.float64)
  s = np_gradscale(x)
  levels = np.array([0.0] + [2.0 ** phase * 4.0 ** k for k in range(-3, 4)])
  u = np.abs(x) / s
  q = levels[np.argmin(np.abs(u[..., None] - levels), axis=-1)]
  return np.sign(x) * q * s


def np_sawb_clip(x, c1, c2):
  x = np.asarray(x, np.float64)
  clip = c1 * np.sqrt(np.mean(x * x)) - c2 * np.mean(np.abs(x))
  return clip if clip > 0 else np.max(np.abs(x))


def np_weight(w):
  s = np_sawb_clip(w, 12.035, 12.03) / 7  # IBM 15-level SAWB, grid [-7, 7]
  return np.clip(np.round(np.asarray(w, np.float64) / s), -7, 7) * s


def np_activation(x):
  clip = np_sawb_clip(x, 12.1, 12.2)
  x = np.asarray(x, np.float64)
  assert x.min() >= 0
  s = clip / 15  # PACT grid [0, α], α = the SAWB clip
  return np.clip(np.round(x / s), 0, 15) * s


def np_e5m2(x):
  x = np.asarray(x, np.float32)
  s = np.max(np.abs(x)) / 57344.0
  return (x / s).astype(ml_dtypes.float8_e5m2).astype(np.float64) * s


def np_pact(x, alpha, bits):
  n = 2 ** bits - 1
  return np.round(np.clip(x, 0, alpha) * n / alpha) * alpha / n


# ---------------------------------------------------------------------------
# PACT and GradScale
# ---------------------------------------------------------------------------
def test_pact_matches_numpy_and_has_pacts_gradients():
  x = jnp.linspace(-1.0, 4.0, 101)
  alpha = 2.5
  np.testing.assert_allclose(four_bit.pact(x, alpha=alpha), np_pact(np.asarray(x), alpha, 4),
                             rtol=1e-6, atol=1e-7)
  gx, ga = jax.grad(lambda x, a: four_bit.pact(x, alpha=a).sum(), (0, 1))(x, jnp.float32(alpha))
  xs = np.asarray(x)
  np.testing.assert_array_equal(gx, ((xs > 0) & (xs < alpha)).astype(np.float32))
  assert np.any(xs == alpha)  # the tie x == α: all of its gradient goes to α
  assert float(ga) == np.sum(xs >= alpha)
  with pytest.raises(ValueError, match='alpha'):
    four_bit.pact(x, alpha=0.0)
  with pytest.raises(ValueError, match='bits'):
    four_bit.pact(x, bits=1)


def test_gradscale_is_the_power_of_two_steady_state():
  g = jax.random.normal(jax.random.key(0), (50,)) * 1e-3
  s = float(four_bit.gradscale(g))
  assert s == np_gradscale(np.asarray(g, np.float64))
  m = float(jnp.max(jnp.abs(g))) / s
  assert 32 < m <= 64  # the scaled max sits in the top half of the range
  # The iterative rule reaches it from far below and from far above, one factor 2 a step.
  for start in (1.0, 2.0 ** -40):
    scale = jnp.float32(start)
    for _ in range(60):
      scale = four_bit.gradscale_update(scale, g)
    assert float(scale) == s
  assert float(four_bit.gradscale_update(jnp.float32(s), g)) == s
  assert float(four_bit.gradscale_update(jnp.float32(s / 4), g)) == s / 2  # overflow: halve 1/s
  assert float(four_bit.gradscale_update(jnp.float32(4 * s), g)) == 2 * s  # under-used: double
  assert float(four_bit.gradscale_update(1.0, jnp.array([jnp.nan]))) == 1.0
  assert np.isnan(four_bit.gradscale(jnp.array([1.0, jnp.nan])))
  with pytest.raises(ValueError, match='scale'):
    four_bit.gradscale_update(0.0, g)


@pytest.mark.parametrize('phase', [0, 1])
def test_radix4_with_gradscale_matches_numpy(phase):
  g = jax.random.normal(jax.random.key(1), (400,)) * jnp.exp(
      3 * jax.random.normal(jax.random.key(2), (400,)))
  got = numerics.radix4(g, phase=phase, scale=four_bit.gradscale(g))
  np.testing.assert_allclose(got, np_radix4(np.asarray(g), phase), rtol=1e-6)


# ---------------------------------------------------------------------------
# wiring of the DotConfig: Two-Phase Rounding, FP8 dW
# ---------------------------------------------------------------------------
def _diag_backward(config, n=16):
  x = 0.7 * jnp.eye(n)
  w = 1.3 * jnp.eye(n)
  dy = jax.random.normal(jax.random.key(3), (n, n)) * jnp.exp(
      2 * jax.random.normal(jax.random.key(4), (n, n)))
  f = lambda x, w: jnp.vdot(dot.dot_general(x, w, DN, config=config), dy)
  dx, dw = jax.grad(f, (0, 1))(x, w)
  d = np.diag(np_weight(np.asarray(w)))[0]
  e = np.diag(np_activation(np.asarray(x)))[0]
  return np.asarray(dy), np.asarray(dx, np.float64) / d, np.asarray(dw, np.float64) / e


def test_two_phase_rounding_even_grid_for_dx_odd_grid_for_dw():
  dy, q_dx, q_dw = _diag_backward(ultra_low_config())
  np.testing.assert_allclose(q_dx, np_radix4(dy, 0), rtol=1e-5)
  np.testing.assert_allclose(q_dw, np_radix4(dy, 1), rtol=1e-5)
  assert not np.allclose(q_dx, q_dw)
  _, q_dx, q_dw = _diag_backward(ultra_low_config(two_phase_rounding=False))
  np.testing.assert_allclose(q_dw, q_dx, rtol=1e-5)


def test_fp8_update_layers_get_e5m2_gradients_in_dw_only():
  dy, q_dx, q_dw = _diag_backward(ultra_low_config(fp8_update=True))
  np.testing.assert_allclose(q_dx, np_radix4(dy, 0), rtol=1e-5)
  np.testing.assert_allclose(q_dw, np_e5m2(dy), rtol=1e-5)


def test_forward_gemm_uses_int4_operands():
  x = jax.nn.relu(jax.random.normal(jax.random.key(5), (8, 32)))
  w = jax.random.normal(jax.random.key(6), (32, 16))
  y = dot.dot_general(x, w, DN, config=ultra_low_config())
  want = np_activation(np.asarray(x)) @ np_weight(np.asarray(w))
  np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=2e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# the recipe
# ---------------------------------------------------------------------------
@pytest.mark.slow  # MobileNetV2 construction: ~10 s alone, more on a loaded machine
@pytest.mark.parametrize('setting', ['resnet', 'mobilenet'])
def test_mobilenet_8bit_layers_chosen_by_shape(setting):
  model = models.MobileNetV2(10, 3, rngs=nnx.Rngs(0))
  r = ultra_low(setting=setting, learned_clip=False)
  _, report = qtrain.quantize_model(model, r, return_report=True)
  assert sorted(p for p, *_ in report.kept_float) == ['head', 'stem']
  configs = {rule.config for rule in r.rules}
  by_config = {}
  for path, _, i in report.quantized:
    by_config.setdefault(r.rules[i].config, set()).add(path.rsplit('/', 1)[-1])
  if setting == 'resnet':  # every 1x1 conv fully FP8, depthwise convs FP8 dW
    assert by_config[ul_mod.fp8_config()] == {'expand', 'project', 'last_conv'}
    assert by_config[ultra_low_config(fp8_update=True)] == {'depthwise'}
  else:  # FP8 dW gradients in every quantized layer, nothing FP8 forward
    assert set(by_config) == {ultra_low_config(fp8_update=True)}
  assert len(configs) >= 1


def test_shape_kinds_of_convolutions():
  from qtrain.rules import conv_shape_kinds
  assert conv_shape_kinds((1, 1), 1, 8) == ('conv1x1',)
  assert conv_shape_kinds(1, 1, 8) == ('conv1x1',)
  assert conv_shape_kinds((3, 3), 1, 8) == ()
  assert conv_shape_kinds((3, 3), 8, 8) == ('depthwise_conv',)
  assert conv_shape_kinds((3, 3), 2, 8) == ()  # grouped, not depthwise
  assert conv_shape_kinds((3, 3), 8, None) == ('depthwise_conv',)


def test_one_by_one_convs_of_any_name_run_in_fp8():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Conv(3, 8, (3, 3), rngs=rngs)
      self.b = nnx.Conv(8, 8, (1, 1), rngs=rngs)
      self.c = nnx.Conv(8, 8, (3, 3), feature_group_count=8, rngs=rngs)

    def __call__(self, x):
      return self.c(self.b(self.a(x)))

  r = ultra_low(float_layers=None, learned_clip=False)
  _, report = qtrain.quantize_model(Net(nnx.Rngs(0)), r, return_report=True)
  got = {path: r.rules[i].config for path, _, i in report.quantized}
  assert got == {'a': ultra_low_config(), 'b': ul_mod.fp8_config(),
                 'c': ultra_low_config(fp8_update=True)}


def test_depthwise_conv_backward_with_fp8_dw():
  # A grouped (depthwise) conv through the quantized conv: both backward GEMMs
  # run, stay finite and approximate the float gradients.
  c = 4
  x = jax.nn.relu(jax.random.normal(jax.random.key(7), (2, 6, 6, c)))
  w = jax.random.normal(jax.random.key(8), (3, 3, 1, c))
  dy = jax.random.normal(jax.random.key(9), (2, 6, 6, c))

  def f(x, w, config):
    y = dot.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                 feature_group_count=c, config=config)
    return jnp.vdot(y, dy)

  gq = jax.grad(f, (0, 1))(x, w, ultra_low_config(fp8_update=True))
  gf = jax.grad(f, (0, 1))(x, w, None)
  for a, b in zip(gq, gf):
    assert bool(jnp.all(jnp.isfinite(a)))
    rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    assert 1e-3 < rel < 0.5, rel


def test_recipe_defaults_and_validation():
  r = ultra_low()
  assert [(q.module_path, q.op_kinds) for q in r.rules] == [
      ('stem|head', ()), ('.*', ('conv1x1',)), ('.*', ('depthwise_conv',)), ('.*', ())]
  assert r.rules[-1].config == ultra_low_config()
  assert r.rules[1].config == ul_mod.fp8_config()
  assert r.rules[2].config == ultra_low_config(fp8_update=True)
  assert not r.rules[-1].config.share_gradient_sample  # two roundings, not one sample
  assert r.prepare_model is pact_mod.install_pact
  assert ultra_low(learned_clip=False).prepare_model is None
  mob = ultra_low(setting='mobilenet', float_layers=None)
  assert mob.rules == (qtrain.QuantRule(config=ultra_low_config(fp8_update=True)),)
  extra = ultra_low(fp8_layers='x', fp8_update_layers='y').rules
  assert (extra[1].module_path, extra[2].module_path) == ('x', 'y')
  with pytest.raises(TypeError, match='two_phase_rounding'):
    ultra_low(two_phase_rounding=1)
  with pytest.raises(TypeError, match='learned_clip'):
    ultra_low(learned_clip='yes')
  with pytest.raises(ValueError, match='setting'):
    ultra_low(setting='vgg')
  with pytest.raises(TypeError, match='fp8_layers'):
    ultra_low(fp8_layers=1)
  with pytest.raises(ValueError, match='phase'):
    ul_mod.gradient_config(2)


def _pact_lenet():
  model = models.LeNet(10, 1, batch_norm=True, rngs=nnx.Rngs(0))
  return qtrain.quantize_model(model, ultra_low(), rngs=nnx.Rngs(quant=1))


def test_learned_pact_clip_starts_at_the_sawb_clip_and_quantizes_onto_its_grid():
  model = pact_mod.install_pact(_pact_lenet())
  hook = model.conv2.conv_general_dilated
  assert isinstance(hook, pact_mod.PactConv) and hook.config.fwd.lhs is None
  assert hook.full_config() == ultra_low_config()
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (4, 6, 6, 8)))
  q = hook._activation(x)  # pylint: disable=protected-access
  xs = np.asarray(x, np.float64)
  c1, c2 = scaling.SAWB_COEFFICIENTS[4]  # the activation rule's (LUQ's) coefficients
  clip = c1 * np.sqrt(np.mean(xs ** 2)) - c2 * np.mean(np.abs(xs))
  np.testing.assert_allclose(float(hook.alpha()), clip, rtol=1e-5)
  step = float(hook.alpha()) / 15
  codes = np.asarray(q, np.float64) / step
  np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
  assert codes.min() == 0 and 10 <= round(codes.max()) <= 15
  # A second batch does not move the offset (values above α clip to code 15);
  # a signed input takes the SAWB signed grid.
  q3 = np.asarray(hook._activation(3 * x), np.float64)  # pylint: disable=protected-access
  np.testing.assert_allclose(float(hook.alpha()), clip, rtol=1e-5)
  np.testing.assert_allclose(q3.max() / step, 15, rtol=1e-5)
  signed = x - 0.5
  np.testing.assert_array_equal(hook._activation(signed),  # pylint: disable=protected-access
                                qtrain.fake_quant(signed, ultra_low_config().fwd.lhs))


def test_learned_pact_clip_gets_pacts_gradient_and_is_trained():
  model = _pact_lenet()
  pact_mod.install_pact(model)
  x = jnp.asarray(rtl.digits_images()[0][:32])
  y = jnp.asarray(rtl.digits_images()[1][:32])
  loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
  loss(model)  # initialises the offsets
  before = pact_mod.pact_alphas(model)
  assert sorted(before) == ['conv2', 'fc1']
  grads = nnx.grad(loss)(model)
  g = float(grads.conv2.conv_general_dilated.pact_alpha[...])
  assert np.isfinite(g) and g != 0.0
  opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  opt.update(model, grads)
  after = pact_mod.pact_alphas(model)
  np.testing.assert_allclose(after['conv2'], before['conv2'] - 0.1 * g, rtol=1e-5)


def test_registered():
  entry = registry.info('ultra_low')
  assert entry.factory is ul_mod.ultra_low and entry.build().name == 'ultra_low'
  assert {d.model for d in entry.reported} >= {'ResNet-18', 'ResNet-50'}
  assert all(d.delta_pp < 0 and 'Table 2' in d.source for d in entry.reported)


def test_trains_close_to_fp32_and_gradients_differ():
  fp32 = rtl.train_digits_cnn(recipes.fp32())
  q = rtl.train_digits_cnn(ultra_low())
  assert np.all(np.isfinite(q.losses))
  # Margin: 3 points on the 360-image digits test split (fp32 reaches ~0.96).
  assert q.accuracy >= fp32.accuracy - 0.03, (q.accuracy, fp32.accuracy)
  assert rtl.max_relative_grad_difference(q, fp32) > 0.05
