"""Tests of the LUQ recipe (`qtrain.recipes.luq`) and its pieces in `qtrain.four_bit`.

Oracles: plain-numpy transcriptions of LUQ's formulas written here (SAWB clip,
the activation grids, α = max|δ|/2^7, the in-hindsight max), the dot's
backward checked on diagonal operands so the quantized gradient can be read
back from both backward GEMMs, and a short digits training run against fp32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qtrain
from qtrain import dot, four_bit, models, nnx_hooks, numerics, recipes
from qtrain.recipes.papers import luq as luq_mod
from qtrain.recipes import registry
from qtrain.recipes.papers.luq import fnt_config, fnt_schedule, luq, luq_config

import recipe_training_testlib as rtl

DN = (((1,), (0,)), ((), ()))


# ---------------------------------------------------------------------------
# numpy transcriptions of the paper's formulas
# ---------------------------------------------------------------------------
def np_sawb_clip(x, c1=12.1, c2=12.2):
  x = np.asarray(x, np.float64)
  clip = c1 * np.sqrt(np.mean(x * x)) - c2 * np.mean(np.abs(x))
  return clip if clip > 0 else np.max(np.abs(x))


def np_weight(w):
  """INT4 SAWB, step clip/8, codes [-8, 7], round half to even."""
  s = np_sawb_clip(w) / 8
  return np.clip(np.round(np.asarray(w, np.float64) / s), -8, 7) * s


def np_activation(x, top=2.0):
  """LUQ code's unsigned grid [0, 15]·2clip/15 if x >= 0, else signed [-8, 7]·clip/8."""
  clip = np_sawb_clip(x)
  x = np.asarray(x, np.float64)
  if x.min() >= 0:
    s = top * clip / 15
    return np.clip(np.round(x / s), 0, 15) * s
  s = clip / 8
  return np.clip(np.round(x / s), -8, 7) * s


def assert_on_luq_grid(q, alpha):
  mags = np.abs(np.asarray(q, np.float64))[np.asarray(q) != 0] / alpha
  k = np.log2(mags)
  np.testing.assert_allclose(k, np.round(k), atol=1e-5)
  assert k.min() >= -1e-5 and k.max() <= 7 + 1e-5, (k.min(), k.max())


# ---------------------------------------------------------------------------
# activation quantizer
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('signed', [False, True])
def test_sawb_activation_matches_numpy(signed):
  x = jax.random.normal(jax.random.key(0), (64, 33))
  x = x if signed else jax.nn.relu(x)
  got = np.asarray(four_bit.sawb_activation(x), np.float64)
  want = np_activation(np.asarray(x))
  # float32 vs float64 statistics: the scales agree to ~1e-6 (SAWB cancels two
  # terms ~12x larger than the clip); the codes agree exactly.
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
  assert len(np.unique(got)) <= 16  # a true 4-bit grid


def test_sawb_activation_edge_cases():
  zero = four_bit.sawb_activation(jnp.zeros((5,)))
  np.testing.assert_array_equal(zero, 0.0)
  nan = four_bit.sawb_activation(jnp.array([1.0, jnp.nan, 0.5]))
  assert np.all(np.isnan(nan))  # the whole scale group turns NaN, never finite
  g = jax.grad(lambda x: four_bit.sawb_activation(x).sum())(jnp.array([0.3, 2.0]))
  np.testing.assert_array_equal(g, 1.0)  # straight-through, as the LUQ code
  with pytest.raises(ValueError, match='unsigned_top'):
    four_bit.sawb_activation(jnp.ones(3), unsigned_top=0.0)
  with pytest.raises(ValueError, match='c1 and c2'):
    four_bit.sawb_activation(jnp.ones(3), bits=3)
  with pytest.raises(TypeError):
    four_bit.sawb_activation(jnp.ones(3, jnp.int32))


# ---------------------------------------------------------------------------
# in-hindsight max
# ---------------------------------------------------------------------------
def test_hindsight_max_matches_formula():
  g = np.array([[0.5, -3.0], [1.0, 2.0]], np.float32)
  np.testing.assert_allclose(four_bit.hindsight_max(None, g, momentum=0.9), 3.0)
  np.testing.assert_allclose(four_bit.hindsight_max(5.0, g, momentum=0.9),
                             0.1 * 3.0 + 0.9 * 5.0, rtol=1e-6)
  assert np.isnan(four_bit.hindsight_max(1.0, jnp.array([jnp.nan]), momentum=0.5))
  with pytest.raises(ValueError, match='momentum'):
    four_bit.hindsight_max(1.0, g, momentum=1.5)


def test_luq_hindsight_unbiased_below_max_and_saturates_above():
  max_value = 8.0
  alpha = max_value / 128
  x = jnp.array([0.3 * alpha, 0.9 * alpha, 1.3 * alpha, 5.7 * alpha, 3.1, -6.0, 20.0])
  n = 4000
  keys = jax.random.split(jax.random.key(1), n)
  q = np.asarray(jax.vmap(lambda k: four_bit.luq_hindsight(x, k, max_value=max_value))(keys),
                 np.float64)
  xs = np.asarray(x, np.float64)
  # Support: the two grid neighbours (0 or alpha below alpha; alpha·2^k, alpha·2^(k+1) above).
  a = np.abs(xs[:-1]) / alpha
  lo = np.where(a < 1, 0.0, 2.0 ** np.floor(np.log2(np.maximum(a, 1))))
  hi = np.where(a < 1, 1.0, 2 * lo)
  mags = np.abs(q[:, :-1]) / alpha
  assert np.all(np.isclose(mags, lo) | np.isclose(mags, hi))
  # Unbiased: |mean - x| within 5 standard errors; var <= (x - lo)(hi - x) alpha^2.
  var = (a - lo) * (hi - a) * alpha ** 2
  bound = 5 * np.sqrt(var / n) + 1e-7
  assert np.all(np.abs(q[:, :-1].mean(0) - xs[:-1]) <= bound), (q[:, :-1].mean(0), xs[:-1])
  np.testing.assert_array_equal(q[:, -1], max_value)  # 20 > max: saturates (the price of m̂)
  with pytest.raises(ValueError, match='key'):
    four_bit.luq_hindsight(x, max_value=1.0)


# ---------------------------------------------------------------------------
# FNT schedule
# ---------------------------------------------------------------------------
def test_fnt_schedule_rises_then_falls_with_the_same_slope():
  s = fnt_schedule(final_lr=0.01, base_lr=0.1, steps=10)
  lr = np.array([float(s(t)) for t in range(11)])
  np.testing.assert_allclose(lr[[0, 5, 10]], [0.01, 0.1, 0.01], rtol=1e-6)
  d = np.diff(lr)
  np.testing.assert_allclose(d[:5], 0.018, rtol=1e-5)
  np.testing.assert_allclose(d[5:], -0.018, rtol=1e-5)
  # Joined after a main schedule, as the docstring says a loop should do it.
  main = optax.constant_schedule(0.01)
  full = optax.join_schedules([main, s], [90])
  assert float(full(89)) == pytest.approx(0.01) and float(full(95)) == pytest.approx(0.1)
  with pytest.raises(ValueError, match='steps'):
    fnt_schedule(final_lr=0.1, base_lr=1.0, steps=1)
  with pytest.raises(ValueError, match='base_lr'):
    fnt_schedule(final_lr=0.1, base_lr=-1.0, steps=4)


# ---------------------------------------------------------------------------
# wiring of the DotConfig
# ---------------------------------------------------------------------------
def test_forward_gemm_uses_int4_sawb_operands():
  x = jax.nn.relu(jax.random.normal(jax.random.key(2), (8, 32)))
  w = jax.random.normal(jax.random.key(3), (32, 16))
  y = dot.dot_general(x, w, DN, config=luq_config(), key=jax.random.key(0))
  want = np_activation(np.asarray(x)) @ np_weight(np.asarray(w))
  np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('smp', [1, 2])
def test_one_gradient_sample_feeds_both_backward_gemms(smp):
  n = 16
  x = 0.7 * jnp.eye(n)  # batch n x features n; Xq = e·I
  w = 1.3 * jnp.eye(n)  # Wq = d·I
  dy = jax.random.normal(jax.random.key(4), (n, n)) * jnp.exp(
      2 * jax.random.normal(jax.random.key(5), (n, n)))

  def f(x, w):
    return jnp.vdot(dot.dot_general(x, w, DN, config=luq_config(smp=smp),
                                    key=jax.random.key(6)), dy)

  dx, dw = jax.grad(f, (0, 1))(x, w)
  d = np.diag(np_weight(np.asarray(w)))[0]
  e = np.diag(np_activation(np.asarray(x)))[0]
  q_from_dx = np.asarray(dx, np.float64) / d  # dX = Q(dY)·Wqᵀ
  q_from_dw = np.asarray(dw, np.float64) / e  # dW = Xqᵀ·Q(dY)
  np.testing.assert_allclose(q_from_dx, q_from_dw, rtol=1e-5, atol=1e-9)
  alpha = float(np.max(np.abs(dy))) / 2 ** 7  # α from max|δ| (not the signed max)
  if smp == 1:
    assert_on_luq_grid(q_from_dx, alpha)
  else:  # the mean of two grid samples (some fall between grid points)
    mags = np.abs(q_from_dx[q_from_dx != 0]) / alpha
    assert np.any(np.abs(np.log2(mags) - np.round(np.log2(mags))) > 1e-3)
    np.testing.assert_allclose((2 * mags) % 1, 0, atol=1e-4)  # halves of sums of integers
  # Without SMP the sample differs from dY but is close on average.
  rel = np.linalg.norm(q_from_dx - np.asarray(dy)) / np.linalg.norm(np.asarray(dy))
  assert 0.01 < rel < 1.0, rel


def test_fnt_config_keeps_only_the_weights_int4():
  x = jax.random.normal(jax.random.key(7), (4, 32))
  w = jax.random.normal(jax.random.key(8), (32, 8))
  dy = jax.random.normal(jax.random.key(9), (4, 8))
  f = lambda x, w: jnp.vdot(dot.dot_general(x, w, DN, config=fnt_config()), dy)
  wq = np_weight(np.asarray(w))
  np.testing.assert_allclose(dot.dot_general(x, w, DN, config=fnt_config()),
                             np.asarray(x, np.float64) @ wq, rtol=1e-5, atol=1e-5)
  dx, dw = jax.grad(f, (0, 1))(x, w)
  np.testing.assert_allclose(dx, np.asarray(dy, np.float64) @ wq.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, np.asarray(x).T @ np.asarray(dy), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# the recipe
# ---------------------------------------------------------------------------
def test_recipe_rules_keep_stem_and_head_float():
  model = models.LeNet(10, 1, batch_norm=True, rngs=nnx.Rngs(0))
  _, report = qtrain.quantize_model(model, luq(), return_report=True)
  assert sorted(p for p, *_ in report.kept_float) == ['head', 'stem']
  assert sorted(p for p, *_ in report.quantized) == ['conv2', 'fc1']
  assert not report.unused_rules


def test_recipe_options_and_fnt_phase():
  r = luq(smp=2, fnt=30)
  cfg = r.rules[-1].config
  assert cfg.share_gradient_sample and cfg.dlhs.lhs.samples == 2
  assert cfg.dlhs.lhs == numerics.luq_config(4, 2)
  assert r.rules_at(69, 100) == r.rules
  final = r.rules_at(70, 100)
  assert final[0].config is None and final[-1].config == fnt_config()
  assert luq(float_layers=None).rules == (qtrain.QuantRule(config=luq_config()),)
  assert luq().float_last_steps == 0 and luq().final_rules is None
  for bad, err in (({'smp': 0}, ValueError), ({'fnt': -1}, ValueError),
                   ({'smp': 1.5}, TypeError), ({'float_layers': 3}, TypeError)):
    with pytest.raises(err):
      luq(**bad)
  with pytest.raises(TypeError):
    luq(2)  # options are keyword-only


def test_registered():
  entry = registry.info('luq')  # registered by importing qtrain.recipes.papers.luq
  assert entry.factory is luq_mod.luq and entry.build().name == 'luq'
  assert {d.model for d in entry.reported} >= {'ResNet-18', 'ResNet-50', 'MobileNet-V2'}
  assert all(d.delta_pp < 0 and 'Table 2' in d.source for d in entry.reported)


def test_trains_close_to_fp32_and_gradients_differ():
  fp32 = rtl.train_digits_cnn(recipes.fp32())
  q = rtl.train_digits_cnn(luq())
  assert np.all(np.isfinite(q.losses))
  # Margin: 3 points on the 360-image digits test split (fp32 reaches ~0.96).
  assert q.accuracy >= fp32.accuracy - 0.03, (q.accuracy, fp32.accuracy)
  assert rtl.max_relative_grad_difference(q, fp32) > 0.05


def test_hindsight_max_calibration_follows_the_papers_recursion():
  cal = four_bit.HindsightMax(momentum=0.75)
  fmt = numerics.luq_config(4).format
  state = cal.init_state((3, 5), qtrain.PerTensor())
  rng = np.random.default_rng(0)
  estimate = None  # numpy transcription: m̂_1 = max|g_0|; m̂_{t+1} = (1-η)·max|g_t| + η·m̂_t
  for t in range(4):
    g = rng.normal(size=(3, 5)).astype(np.float32) * (t + 1)
    m = float(np.max(np.abs(g)))
    use = m if estimate is None else estimate
    scale, zero_point, state = cal.compute(jnp.asarray(g), fmt, qtrain.PerTensor(), state)
    assert zero_point is None and scale.shape == (1, 1)
    np.testing.assert_allclose(float(scale[0, 0]) * fmt.absmax_target, use, rtol=1e-6)
    estimate = m if estimate is None else 0.25 * m + 0.75 * estimate
    np.testing.assert_allclose(float(state['max']), estimate, rtol=1e-6)
    assert float(state['count']) == t + 1
  with pytest.raises(ValueError, match='momentum'):
    four_bit.HindsightMax(momentum=1.5)


def test_hindsight_option_wires_a_stateful_shared_gradient_rule_and_trains():
  recipe = luq(hindsight_momentum=0.9)
  cfg = recipe.rules[1].config
  assert isinstance(cfg.dlhs.lhs.calibration, four_bit.HindsightMax)
  assert cfg.share_gradient_sample and cfg.stateful_slots == ('dlhs',)
  out = rtl.train_digits_cnn(recipe, steps=30)
  assert np.all(np.isfinite(out.losses)) and out.losses[-5:].mean() < out.losses[:5].mean()
  flat = nnx.to_flat_state(nnx.state(out.model, nnx_hooks.GradState))
  counts = {'/'.join(map(str, path)): float(np.asarray(v[...])) for path, v in flat
            if 'count' in map(str, path)}
  # One state per quantized layer (conv2, fc1), advanced once per training step
  # (the initial-gradient probe differentiates Params only).
  assert len(counts) == 2 and set(counts.values()) == {30.0}, counts
