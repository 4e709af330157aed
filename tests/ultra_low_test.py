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
import pytest
from flax import nnx

import qtrain
from qtrain import dot, four_bit, models, numerics, recipes
from qtrain.recipes import registry
from qtrain.recipes.papers import ultra_low as ul_mod
from qtrain.recipes.papers.ultra_low import ZOO_1X1_CONVS, ultra_low, ultra_low_config

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
def test_mobilenet_rules_by_layer_name():
  model = models.MobileNetV2(10, 3, rngs=nnx.Rngs(0))
  r = ultra_low(fp8_layers=ZOO_1X1_CONVS)
  _, report = qtrain.quantize_model(model, r, return_report=True)
  assert sorted(p for p, *_ in report.kept_float) == ['head', 'stem']
  by_rule = {}
  for path, _, i in report.quantized:
    by_rule.setdefault(i, []).append(path.rsplit('/', 1)[-1])
  assert set(by_rule[1]) == {'expand', 'project', 'last_conv'}  # 1x1 convs: FP8
  assert set(by_rule[2]) == {'depthwise'}  # FP8 dW gradients
  assert r.rules[1].config == ul_mod.fp8_config()


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
  assert [q.module_path for q in r.rules] == ['stem|head', ul_mod.ZOO_DEPTHWISE_CONVS, '.*']
  assert r.rules[-1].config == ultra_low_config()
  assert r.rules[1].config == ultra_low_config(fp8_update=True)
  assert not r.rules[-1].config.share_gradient_sample  # two roundings, not one sample
  plain = ultra_low(float_layers=None, fp8_update_layers=None)
  assert plain.rules == (qtrain.QuantRule(config=ultra_low_config()),)
  with pytest.raises(TypeError, match='two_phase_rounding'):
    ultra_low(two_phase_rounding=1)
  with pytest.raises(TypeError, match='fp8_layers'):
    ultra_low(fp8_layers=1)
  with pytest.raises(ValueError, match='phase'):
    ul_mod.gradient_config(2)


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
