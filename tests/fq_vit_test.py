"""FQ-ViT quantizers (`qtrain.fq_vit`) against plain-numpy transcriptions of papers-5-8.md §6.1."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from qtrain import fq_vit

F32 = np.float32
EPS = np.finfo(np.float32).eps


# ----------------------------------------------------------------------------- numpy oracles


def np_minmax_params(lo, hi, bits=8):
  qmax = F32(2 ** bits - 1)
  s = np.maximum((F32(hi) - F32(lo)) / qmax, F32(EPS)).astype(F32)
  zp = np.clip(-np.round(F32(lo) / s), 0, qmax).astype(F32)
  return s, zp


def np_fake(x, s, zp, bits=8):
  q = np.clip(np.round(x / s) + zp, 0, 2 ** bits - 1)
  return ((q - zp) * s).astype(F32)


def np_ptf(x, bits=8, k=3):
  """Brute force: per channel, the α with the least MSE (float64 error sums)."""
  lo, hi = x.min(), x.max()
  top, zp = np_minmax_params(lo, hi, bits)
  base = F32(top / F32(2 ** k))
  errors = np.stack([
      ((x.astype(np.float64) - np_fake(x, F32(base * 2 ** a), zp, bits)) ** 2).reshape(
          -1, x.shape[-1]).mean(0) for a in range(k + 1)])
  return base, zp, errors


def np_log2_codes(p, bits, rule):
  """(codes, zero) by the code's two rules, in float64."""
  p = p.astype(np.float64)
  with np.errstate(divide='ignore', invalid='ignore'):
    if rule == 'geometric':
      r = np.round(-np.log2(p))
    else:
      v = 1.0 / p
      k = np.floor(np.log2(v))
      r = np.where(v - 2.0 ** k >= 2.0 ** (k - 1), k + 1, k)
  zero = (p == 0) | (r >= 2 ** bits)
  return np.clip(np.where(p == 0, 0, r), 0, 2 ** bits - 1), zero


def np_lis_codes(x, s, bits, n=30):
  """The official QIntSoftmax (int_softmax + log_round) in float32 numpy, rows on the last axis."""
  s = F32(s)
  a, b, c = F32(0.35815147), F32(0.96963238), F32(1.0)
  x_int = np.round(x / s).astype(F32)
  x_int = x_int - x_int.max(-1, keepdims=True)
  x0 = np.floor(F32(-0.6931) / s)
  x_int = np.maximum(x_int, F32(n) * x0)
  q = np.floor(x_int / x0)
  r = x_int - x0 * q
  b_int = np.floor(F32(b / a) / s)
  c_int = np.floor(F32(c / a) / (s * s))
  z = r * (r + b_int) + c_int
  e = np.maximum(np.floor(z * F32(2.0) ** (F32(n) - q)), 0).astype(F32)
  v = np.round(e.sum(-1, keepdims=True, dtype=F32) / e)
  big = np.floor(np.log2(v.astype(np.float64)))
  big = np.where(v - 2.0 ** big >= 2.0 ** (big - 1), big + 1, big)
  return np.clip(big, 0, 2 ** bits - 1), big >= 2 ** bits


def on_grid_logits(rng, shape, s, zp=128, spread=40.0):
  """Dequantized uint8 logits (q - zp)·s with a spread of about `spread` steps."""
  q = np.clip(np.round(rng.normal(0, spread, shape)) + zp, 0, 255)
  return ((q - zp) * F32(s)).astype(F32)


# ----------------------------------------------------------------------------- uniform


def test_minmax_params_and_uniform_quant_match_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(0.3, 2.0, (64, 16)).astype(F32)
  s, zp = np_minmax_params(x.min(), x.max())
  p = fq_vit.minmax_params(x.min(), x.max())
  chex.assert_trees_all_equal((np.asarray(p.scale), np.asarray(p.zero_point)), (s, zp))
  chex.assert_trees_all_equal(np.asarray(fq_vit.uniform_quant(jnp.asarray(x), p)),
                              np_fake(x, s, zp))
  chex.assert_trees_all_equal(np.asarray(fq_vit.minmax_quant(jnp.asarray(x))), np_fake(x, s, zp))


def test_minmax_range_is_not_widened_to_zero():
  # All positive: zp = clip(-round(lo/s)) = 0 and values below s/2 clip to 0.
  p = fq_vit.minmax_params(10.0, 265.0)
  assert float(p.scale) == 1.0 and float(p.zero_point) == 0.0


@pytest.mark.parametrize('half_step', [False, True])
def test_weight_quant_per_channel_matches_numpy(half_step):
  rng = np.random.default_rng(1)
  w = (rng.normal(size=(12, 5)) * np.array([0.1, 1, 3, 0.01, 10])).astype(F32)
  denom = F32(127.5 if half_step else 127.0)
  s = np.maximum(np.abs(w).max(0, keepdims=True) / denom, EPS).astype(F32)
  want = (np.clip(np.round(w / s), -128, 127) * s).astype(F32)
  got = fq_vit.weight_quant(jnp.asarray(w), axis=-1, half_step=half_step)
  chex.assert_trees_all_equal(np.asarray(got), want)


def test_weight_quant_half_step_clips_the_positive_extreme():
  # /127.5: +absmax → 127.5 → 128 → clipped to 127 (half a step lost); the
  # default /127 keeps ±absmax exact.
  w = jnp.array([[1.0, 3.0], [-1.0, -3.0], [0.5, 1.5]])
  got = np.asarray(fq_vit.weight_quant(w, half_step=True))
  s = F32(np.array([1.0, 3.0], F32) / F32(127.5))
  np.testing.assert_array_equal(got[0], 127 * s)
  assert np.all(got[0] < w[0])
  np.testing.assert_array_equal(np.asarray(fq_vit.weight_quant(w))[:2], np.asarray(w)[:2])


# ----------------------------------------------------------------------------- PTF


def skewed_layernorm_input(seed=0, tokens=(8, 17), channels=32):
  """LayerNorm inputs with a 40× inter-channel range variation (the paper's observation)."""
  rng = np.random.default_rng(seed)
  spread = np.exp(np.linspace(0, np.log(40.0), channels))[rng.permutation(channels)]
  offset = rng.normal(0, 0.5, channels)
  return (rng.normal(size=tokens + (channels,)) * spread + offset).astype(F32)


def test_ptf_scales_are_base_times_power_of_two_and_zero_point_uses_the_largest():
  x = skewed_layernorm_input()
  p = fq_vit.ptf_params(jnp.asarray(x), k=3)
  top, zp = np_minmax_params(x.min(), x.max())
  assert float(p.base_scale) == F32(top / 8) and float(p.zero_point) == zp
  alpha = np.asarray(p.alpha)
  assert alpha.dtype == np.int32 and set(alpha) <= {0, 1, 2, 3} and len(set(alpha)) > 1
  # Every channel's dequantized values are integer multiples of base·2^α around zp.
  xq = np.asarray(fq_vit.ptf(jnp.asarray(x), params=p))
  units = xq / (float(p.base_scale) * 2.0 ** alpha)
  np.testing.assert_allclose(units, np.round(units), atol=1e-3)
  codes = fq_vit.ptf_codes(jnp.asarray(x), params=p)
  np.testing.assert_allclose(
      (np.asarray(codes.codes) - zp) * float(p.base_scale) * 2.0 ** alpha, xq, rtol=1e-6)


def test_ptf_alpha_is_the_brute_force_mse_argmin():
  for seed in range(3):
    x = skewed_layernorm_input(seed)
    base, zp, errors = np_ptf(x)
    p = fq_vit.ptf_params(jnp.asarray(x), k=3)
    assert float(p.base_scale) == base and float(p.zero_point) == zp
    chosen = errors[np.asarray(p.alpha), np.arange(x.shape[-1])]
    # Equal to the argmin up to float32 summation ties (relative 1e-5).
    np.testing.assert_array_less(chosen, errors.min(0) * (1 + 1e-5) + 1e-30)
    assert (np.asarray(p.alpha) == errors.argmin(0)).mean() >= 0.95


def test_ptf_beats_per_tensor_uint8_on_channel_skewed_inputs():
  x = jnp.asarray(skewed_layernorm_input())
  mse_ptf = float(jnp.mean((fq_vit.ptf(x) - x) ** 2))
  mse_tensor = float(jnp.mean((fq_vit.minmax_quant(x) - x) ** 2))
  # Narrow channels get up to 8× finer steps (64× less error); the wide ones keep
  # the per-tensor step, so the total error must drop well below the per-tensor one.
  assert mse_ptf < 0.5 * mse_tensor, (mse_ptf, mse_tensor)


def test_ptf_with_k0_is_per_tensor_minmax_and_given_range_is_used():
  x = jnp.asarray(skewed_layernorm_input())
  chex.assert_trees_all_equal(fq_vit.ptf(x, k=0), fq_vit.minmax_quant(x))
  p = fq_vit.ptf_params(x, min_val=-100.0, max_val=155.0, k=3)
  assert float(p.base_scale) == F32(1.0 / 8) and float(p.zero_point) == 100.0


def test_ptf_zeros_and_nan():
  chex.assert_trees_all_equal(fq_vit.ptf(jnp.zeros((2, 4))), jnp.zeros((2, 4)))
  x = jnp.ones((2, 4)).at[0, 1].set(jnp.nan)
  assert np.isnan(np.asarray(fq_vit.ptf(x))).all()  # the range is NaN: the whole tensor


# ----------------------------------------------------------------------------- log2 / LIS


def probabilities(seed=0, n=20000):
  rng = np.random.default_rng(seed)
  p = np.exp2(-rng.uniform(0, 20, n)).astype(F32)
  return np.concatenate([p, np.array([0, 1, 2 ** -15, 2 ** -16, 0.75, 0.7], F32)])


@pytest.mark.parametrize('rule', ['geometric', 'arithmetic'])
@pytest.mark.parametrize('bits', [4, 8])
def test_log2_quant_matches_numpy(rule, bits):
  p = probabilities()
  q, zero = np_log2_codes(p, bits, rule)
  want = np.where(zero, 0, 2.0 ** -q).astype(F32)
  got = fq_vit.log2_quant(jnp.asarray(p), bits=bits, rounding=rule)
  chex.assert_trees_all_equal(np.asarray(got), want)
  codes, z = fq_vit.log2_codes(jnp.asarray(p), bits=bits, rounding=rule)
  chex.assert_trees_all_equal((np.asarray(codes), np.asarray(z)), (q.astype(F32), zero))


def test_log2_rules_differ_exactly_between_the_geometric_and_arithmetic_midpoints():
  p = probabilities(1)
  g = np.asarray(fq_vit.log2_codes(jnp.asarray(p), bits=8, rounding='geometric')[0])
  a = np.asarray(fq_vit.log2_codes(jnp.asarray(p), bits=8, rounding='arithmetic')[0])
  v = 1.0 / p[p > 0].astype(np.float64)
  frac = v / 2.0 ** np.floor(np.log2(v))  # 1/p = frac·2^k, frac in [1, 2)
  differ = (g != a)[p > 0]
  np.testing.assert_array_equal(differ, (frac >= np.sqrt(2)) & (frac < 1.5))
  assert np.all(g[p > 0][differ] == a[p > 0][differ] + 1)


def test_log2_quant_policies():
  got = np.asarray(fq_vit.log2_quant(jnp.array([0.0, 1.0, jnp.nan, 2.0 ** -20])))
  assert got[0] == 0 and got[1] == 1 and np.isnan(got[2]) and got[3] == 0


def exp_error_bound(s, q):
  """Derived bound on |ln(i_exp) - x·s| (papers-5-8.md §6.1 i-exp), for q shifts.

  (1) each shift by x0 stands for a factor e^{x0·s} while the code divides by
  2: drift δ = |x0|·s - ln 2 per shift (x0 = floor(-0.6931/s), so δ ∈
  [-5e-5, s)); (2) the continuous polynomial a·p² + b·p + c vs e^p on
  [x0·s, 0]; (3) the integer floors of b/a/s and c/a/s² change z by at most
  |x0| + 1 units, z being at least min(P)/(a·s²).
  """
  a, b, c = 0.35815147, 0.96963238, 1.0
  x0 = np.floor(np.float32(-0.6931) / np.float32(s))
  delta = abs(x0) * s - np.log(2)
  grid = np.linspace(x0 * s, 0, 10001)
  poly = a * grid ** 2 + b * grid + c
  eta = np.max(np.abs(np.log(poly) - grid)) + (abs(x0) + 1) * a * s * s / poly.min()
  return np.abs(q) * abs(delta) + eta + 1e-6


@pytest.mark.parametrize('s', [0.011, 0.02, 0.05, 0.1])
def test_i_exp_within_its_derived_error(s):
  x_int = -np.arange(0, 400, dtype=F32)
  e, e_scale = fq_vit.i_exp(jnp.asarray(x_int), s, n=30)
  x0 = np.floor(F32(-0.6931) / F32(s))
  q = np.floor(np.maximum(x_int, 30 * x0) / x0)
  resolved = q < 30  # below 2^-30 the code floors the exponent
  err = np.abs(np.log(np.asarray(e, np.float64) * float(e_scale)) - x_int * s)
  bound = exp_error_bound(s, q)
  np.testing.assert_array_less(err[resolved], bound[resolved])
  assert err[:5].max() < 0.01  # near the row max the polynomial alone (< 0.3%) matters


@pytest.mark.parametrize('bits', [4, 8])
def test_lis_matches_numpy_transcription_of_the_code(bits):
  rng = np.random.default_rng(2)
  s = 0.037
  x = on_grid_logits(rng, (64, 3, 50), s)
  want, zero = np_lis_codes(x, s, bits)
  got, gzero = fq_vit.log_int_softmax_codes(jnp.asarray(x), s, bits=bits)
  got, gzero = np.asarray(got), np.asarray(gzero)
  # Bit-exact except where float32 row sums in another order move round(Σe/e)
  # across a rounding boundary (≤ 0.1% of entries, one code apart).
  same = (got == want) & (gzero == zero)
  assert same.mean() >= 0.999, same.mean()
  assert np.all(np.abs(got - want)[~same & ~zero & ~gzero] <= 1)


# Logit scale s, and upper bounds on the fraction of (unclamped) entries whose
# derived interval contains a midpoint ("near") and on those that differ. The
# logits span ±2.6 nats (s = 0.02) and ±6.4 nats (s = 0.05): more shifts q per
# entry, so i-exp's drift δ·q widens the band (δ = 0.0069 for both scales).
@pytest.mark.parametrize('s, max_near, max_differ', [(0.02, 0.25, 0.06), (0.05, 0.5, 0.12)])
def test_lis_vs_float_softmax_then_log2_within_the_derived_band(s, max_near, max_differ):
  """LIS ≈ log2_quant(softmax(x), 'arithmetic'): differences only near a midpoint.

  Per entry, 1/p_LIS = round(Σ_j e_j / e_i) with e_j = exp(x_j s)·(1+ε_j),
  |ln(1+ε_j)| <= B(q_j) (`exp_error_bound`), so 1/p_LIS lies in
  [v·L_i - 1/2, v·U_i + 1/2] for v = 1/p (exact softmax), L_i =
  Σ_j p_j e^{-B_j} / e^{B_i}, U_i = Σ_j p_j e^{B_j} / e^{-B_i}. A code may
  differ (by one) only if that interval contains a midpoint 1.5·2^k.
  """
  rng = np.random.default_rng(3)
  x = on_grid_logits(rng, (128, 48), s, spread=60 * 0.05 / s)
  bits = 8
  got = np.asarray(fq_vit.log_int_softmax_codes(jnp.asarray(x), s, bits=bits)[0])
  z = x.astype(np.float64) - x.max(-1, keepdims=True)
  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  want = np_log2_codes(p, bits, 'arithmetic')[0]
  x0 = np.floor(F32(-0.6931) / F32(s))
  b = exp_error_bound(s, np.floor(np.round(z / s) / x0))
  lo = (p * np.exp(-b)).sum(-1, keepdims=True) / np.exp(b)
  hi = (p * np.exp(b)).sum(-1, keepdims=True) / np.exp(-b)
  v_lo, v_hi = lo / p - 0.5, hi / p + 0.5
  k = np.floor(np.log2(v_lo))
  near = (1.5 * 2.0 ** k >= v_lo) & (1.5 * 2.0 ** k <= v_hi) | (
      3.0 * 2.0 ** k <= v_hi)  # next midpoint 1.5·2^(k+1)
  relevant = want < 2 ** bits - 1  # clamped codes agree trivially
  differ = (got != want) & relevant
  assert not np.any(differ & ~near), np.argwhere(differ & ~near)[:5]
  assert np.all(np.abs(got - want)[differ] == 1)
  # The band is narrow: most entries are far from any midpoint, and they agree.
  assert near[relevant].mean() < max_near and differ[relevant].mean() < max_differ
  # The float (geometric) Log2Quantizer additionally differs on [√2·2^k, 1.5·2^k).
  geo = np_log2_codes(p, bits, 'geometric')[0]
  assert (geo != want)[relevant].mean() > differ[relevant].mean()


def test_lis_mask_and_degenerate_rows():
  x = jnp.array([[0.0, 0.0, 5.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
  mask = jnp.array([[True, True, False, True], [False, False, False, False]])
  got = np.asarray(fq_vit.log_int_softmax(x, 0.05, mask=mask))
  assert got[0, 2] == 0 and np.all(got[0, [0, 1, 3]] == 0.25)  # 1/3 → 2^-2 (v = 3 rounds up)
  np.testing.assert_array_equal(got[1], 0)  # fully masked row: zeros, not NaN
  uniform = np.asarray(fq_vit.log_int_softmax(jnp.zeros((1, 8)), 0.1))
  np.testing.assert_array_equal(uniform, 1 / 8)
  assert np.isnan(np.asarray(fq_vit.log_int_softmax(x.at[0, 0].set(jnp.nan), 0.05))[0]).all()


# ----------------------------------------------------------------------------- integer LayerNorm


def test_dyadic_multiplier_is_an_8bit_mantissa():
  a = np.exp(np.random.default_rng(4).uniform(-8, 4, 1000)).astype(F32)
  m, n = (np.asarray(t) for t in fq_vit.dyadic_multiplier(jnp.asarray(a)))
  assert np.all((m >= 128) & (m <= 255))
  np.testing.assert_array_less(m / 2.0 ** n, a * (1 + 1e-7))
  np.testing.assert_array_less(a, (m + 1) / 2.0 ** n)


def test_int_layer_norm_vs_float_layer_norm_of_the_dequantized_input():
  rng = np.random.default_rng(5)
  x = jnp.asarray(skewed_layernorm_input(5))
  c = x.shape[-1]
  gamma = rng.uniform(0.5, 2.0, c).astype(F32) * rng.choice([-1, 1], c)
  beta = rng.normal(0, 0.5, c).astype(F32)
  codes = fq_vit.ptf_codes(x)
  xq = ((np.asarray(codes.codes) - float(codes.zero_point)) * float(codes.base_scale)
        * 2.0 ** np.asarray(codes.alpha)).astype(np.float64)
  mu = xq.mean(-1, keepdims=True)
  sd = xq.std(-1, keepdims=True)
  ref = gamma * (xq - mu) / sd + beta  # float LayerNorm without ε
  s_out = float(np.ptp(ref)) / 255
  y = np.asarray(fq_vit.int_layer_norm(codes, out_scale=s_out, scale=jnp.asarray(gamma),
                                       bias=jnp.asarray(beta))) * s_out
  # M/2^N underestimates |A| by < 2^-7 relative (8-bit mantissa), B and the
  # output round to half a unit each (units s_out/2^N and s_out), plus float32 slack.
  tol = 2.0 ** -7 * np.abs(gamma * (xq - mu) / sd) + s_out + 1e-4
  np.testing.assert_array_less(np.abs(y - ref), tol)
  assert np.abs(y - ref).mean() < 0.5 * s_out + 0.01 * np.abs(ref).mean()


def test_int_layer_norm_constant_token_gives_beta_not_nan():
  codes = fq_vit.PtfCodes(codes=jnp.full((2, 4), 130.0), base_scale=jnp.float32(0.1),
                          zero_point=jnp.float32(128.0), alpha=jnp.zeros(4, jnp.int32))
  beta = jnp.array([0.0, 0.5, -1.0, 2.0])
  y = fq_vit.int_layer_norm(codes, out_scale=0.25, bias=beta)
  np.testing.assert_array_equal(np.asarray(y), np.broadcast_to([0.0, 2.0, -4.0, 8.0], (2, 4)))


# ----------------------------------------------------------------------------- observers


def batches(seed=6):
  rng = np.random.default_rng(seed)
  return [(rng.standard_t(3, (40, 7)) * (4 - i) + i).astype(F32) for i in range(4)]


def run(observer, xs):
  state = observer.init()
  for x in xs:
    state = observer.update(state, jnp.asarray(x))
  return state


def test_minmax_and_ema_observers_match_numpy():
  xs = batches()
  st = run(fq_vit.MinMax(), xs)
  assert float(st.lo) == min(x.min() for x in xs) and float(st.hi) == max(x.max() for x in xs)
  lo, hi = xs[0].min(), xs[0].max()
  for x in xs[1:]:
    lo, hi = lo + F32(0.01) * (x.min() - lo), hi + F32(0.01) * (x.max() - hi)
  st = run(fq_vit.Ema(), xs)
  np.testing.assert_allclose([float(st.lo), float(st.hi)], [lo, hi], rtol=1e-6)
  s, zp = np_minmax_params(lo, hi)
  p = fq_vit.Ema().params(st)
  np.testing.assert_allclose([float(p.scale), float(p.zero_point)], [s, zp], rtol=1e-6)


def test_percentile_observer_matches_numpy():
  xs = batches()
  lo, hi = None, None
  for x in xs:
    clo, chi = np.quantile(x.reshape(-1), 1 - 0.99999), np.quantile(x.reshape(-1), 0.99999)
    lo = clo if lo is None else lo + 0.01 * (clo - lo)
    hi = chi if hi is None else hi + 0.01 * (chi - hi)
  st = run(fq_vit.Percentile(), xs)
  # jnp.quantile interpolates in float32, numpy in float64: the 0.99999 quantile
  # lies between the two largest samples of a heavy tail, rtol 1e-4 covers it.
  np.testing.assert_allclose([float(st.lo), float(st.hi)], [lo, hi], rtol=1e-4)
  assert float(st.hi) < max(x.max() for x in xs)  # the extreme outlier is cut


def test_omse_observer_matches_a_brute_force_search():
  xs = batches()
  lo, hi = min(x.min() for x in xs), max(x.max() for x in xs)
  last = xs[-1]
  errors = []
  for i in range(90):
    s, zp = np_minmax_params(lo * F32(1 - 0.01 * i), hi * F32(1 - 0.01 * i))
    errors.append(((last.astype(np.float64) - np_fake(last, s, zp)) ** 2).mean())
  best = int(np.argmin(errors))
  p = fq_vit.Omse().params(run(fq_vit.Omse(), xs), jnp.asarray(last))
  s, zp = np_minmax_params(lo * F32(1 - 0.01 * best), hi * F32(1 - 0.01 * best))
  np.testing.assert_allclose([float(p.scale), float(p.zero_point)], [s, zp], rtol=1e-6)
  assert best > 0  # heavy tails: OMSE shrinks the range


def test_observer_nan_propagates():
  st = run(fq_vit.MinMax(), [np.array([1.0, np.nan], F32)])
  assert np.isnan(float(fq_vit.MinMax().params(st).scale))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize('fn, kwargs, error, match', [
    (fq_vit.ptf, dict(bits=1), ValueError, 'bits=1'),
    (fq_vit.ptf, dict(bits=17), ValueError, 'bits=17'),
    (fq_vit.ptf, dict(k=-1), ValueError, 'k=-1'),
    (fq_vit.ptf, dict(k=1.5), TypeError, 'k must be an int'),
    (fq_vit.ptf, dict(axis=3), ValueError, 'axis=3'),
    (fq_vit.log2_quant, dict(bits=0), ValueError, 'bits=0'),
    (fq_vit.log2_quant, dict(bits=9), ValueError, 'bits=9'),
    (fq_vit.log2_quant, dict(rounding='nearest'), ValueError, 'rounding'),
    (fq_vit.minmax_quant, dict(bits=True), TypeError, 'bits must be an int'),
    (fq_vit.weight_quant, dict(half_step=1), TypeError, 'half_step'),
    (fq_vit.weight_quant, dict(axis=5), ValueError, 'axis'),
])
def test_bad_arguments_raise_naming_them(fn, kwargs, error, match):
  with pytest.raises(error, match=match):
    fn(jnp.ones((2, 3)), **kwargs)


def test_bad_inputs_and_observer_misuse():
  with pytest.raises(TypeError, match='floating'):
    fq_vit.ptf(jnp.ones((2, 3), jnp.int32))
  with pytest.raises(ValueError, match='bits=9'):
    fq_vit.log_int_softmax(jnp.ones((2, 3)), 0.1, bits=9)
  with pytest.raises(ValueError, match='no calibration batch'):
    fq_vit.MinMax().params(fq_vit.MinMax().init())
  with pytest.raises(ValueError, match='last calibration batch'):
    fq_vit.Omse().params(run(fq_vit.Omse(), batches()))
  with pytest.raises(ValueError, match='momentum'):
    fq_vit.Ema(momentum=0.0)
  with pytest.raises(ValueError, match='unknown'):
    fq_vit.make_observer('kl')
