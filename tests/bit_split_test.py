"""Tests of `qtrain.bit_split` (bit splitting and leverage-score sampling, Xi et al. §4).

Oracles written here: with the unbiased ±7 clamp, 14·hi + lo is exactly
stochastic rounding of t = ∇Y/s↓ (s↓ = max|∇Y|/98) with the same uniform
bits (floor(t) + [u < frac t]); the official ±6 clamp clips |t| > 90 to 90 and
residuals in (6, 7] to 6; the probability capping of `special_quantize.py`
transcribed as its loop; Monte Carlo unbiasedness with bounds z·σ/√n
(σ from the Bernoulli/SR variance formulas or, where those are unwieldy,
estimated from the samples); and the dot wiring against the estimator's own
output for the key slot `fold_in(key, 2)` both GEMMs share.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qtrain
from qtrain import bit_split as bs
from qtrain import numerics, prng
from qtrain.recipes.papers.int4_transformer import int4_transformer_config

Z = 5.0


def np_capping(c, budget):
  """`special_quantize.py`'s loop, in float64."""
  c = np.asarray(c, np.float64)
  if (c > 0).sum() <= budget:
    return (c > 0).astype(np.float64)
  p = c * budget / c.sum()
  while p.max() > 1:
    small = p < 1
    capped = len(p) - small.sum()
    p = np.clip(p, 0, 1)
    p[small] = p[small] * (budget - capped) / p[small].sum()
  return p


def row_sparse_grad(key, shape=(16, 12), heavy=300.0):
  """A few tokens carry most of the gradient (the structure LSS exploits)."""
  g = np.array(jax.random.normal(key, shape), np.float32) * 0.01
  g[[1, 5]] *= heavy
  g[9] = 0.0
  return g


# ---------------------------------------------------------------------------
# bit splitting
# ---------------------------------------------------------------------------
def test_split_codes_with_clamp_7_are_stochastic_rounding_on_max_over_98():
  g = np.asarray(jax.random.normal(jax.random.key(0), (7, 9)), np.float32)
  key = jax.random.key(1)
  hi, lo, scale = bs.split_codes(g, key)
  assert hi.dtype == jnp.int8 and lo.dtype == jnp.int8
  assert int(jnp.abs(hi).max()) <= 7 and int(jnp.abs(lo).max()) <= 7
  s = np.float32(np.abs(g).max()) / np.float32(98)
  np.testing.assert_array_equal(scale, s)
  t = g / s
  u = np.asarray(prng.uniform(key, g.shape))
  sr = np.floor(t) + (u < t - np.floor(t))
  np.testing.assert_array_equal(14 * np.asarray(hi, np.int32) + np.asarray(lo), sr)
  np.testing.assert_array_equal(np.asarray(hi), np.clip(np.round(t / 14), -7, 7))


def grid_input(key, shape, frac_lo=0.1, frac_hi=0.9):
  """g = t·2^-7 with max|t| = 98 (so s↓ = 2^-7 exactly) and frac(t) in [frac_lo, frac_hi].

  Fractional parts away from 0 and 1 keep every element's SR count far from
  Poisson tails, so normal z-bounds hold.
  """
  k1, k2, k3 = jax.random.split(key, 3)
  ints = np.asarray(jax.random.randint(k1, shape, -97, 97), np.float64)
  frac = np.asarray(jax.random.uniform(k2, shape, minval=frac_lo, maxval=frac_hi))
  t = np.where(np.asarray(jax.random.bernoulli(k3, 0.5, shape)), ints + frac, ints)
  t.flat[0] = 98.0
  return (t * 2.0**-7).astype(np.float32)


def test_bit_split_is_unbiased():
  g = grid_input(jax.random.key(2), (6, 8))
  n = 4000
  keys = jax.random.split(jax.random.key(3), n)
  samples = np.asarray(jax.vmap(lambda k: bs.bit_split(jnp.asarray(g), k))(keys), np.float64)
  scale = 2.0**-7
  f = g / scale - np.floor(g / scale)
  sigma = scale * np.sqrt(f * (1 - f))  # SR on a grid of step `scale`
  bound = Z * sigma / math.sqrt(n) + 1e-9
  assert np.all(np.abs(samples.mean(0) - g) <= bound)
  assert (sigma > 0).any() and (sigma == 0).any()


def test_bit_split_variance_is_an_int8_sr_variance_times_127_over_98_squared():
  # Both are SR on a uniform grid: Var = Δ²·f(1 − f) per element, Δ = max/98 for BS and
  # max/127 for INT8 [−127, 127]; with fractional parts ~ uniform, E f(1 − f) = 1/6 for
  # both, so the ratio is (127/98)² ≈ 1.68.
  g = np.asarray(jax.random.normal(jax.random.key(4), (64, 64)), np.float32)
  keys = jax.random.split(jax.random.key(5), 16)
  err_bs = jax.vmap(lambda k: bs.bit_split(jnp.asarray(g), k) - g)(keys)
  err_8 = jax.vmap(lambda k: numerics.stochastic_round(jnp.asarray(g), k, bits=8) - g)(keys)
  var_bs, var_8 = float(jnp.mean(err_bs**2)), float(jnp.mean(err_8**2))
  delta = np.abs(g).max() / 98
  f = g / delta - np.floor(g / delta)
  exact = float(np.mean(f * (1 - f)) * delta**2)
  # 65,536 squared errors (each <= Δ²/4): the relative MC error is well below 2%.
  assert abs(var_bs / exact - 1) < 0.03, (var_bs, exact)
  assert abs((var_bs / var_8) / (127 / 98) ** 2 - 1) < 0.05, var_bs / var_8


def test_clamp_6_reproduces_the_official_bias():
  m = 1.0
  t = np.array([98.0, -98.0, 95.0, 90.5, 90.0, 6.5, -6.5, 20.0], np.float32)
  g = t * np.float32(m / 98)
  est = np.asarray(bs.bit_split(jnp.asarray(g), jax.random.key(6), clamp=6)) / (m / 98)
  # Above 90/98 of the max: hi = 6, lo = 6 -> 90; residuals in (6, 7] -> 6.
  np.testing.assert_allclose(est[:4], [90, -90, 90, 90], atol=1e-4)
  np.testing.assert_allclose(est[4], 90, atol=1e-4)
  np.testing.assert_allclose(est[5:7], [6, -6], atol=1e-4)
  # The unbiased clamp keeps the top of the range.
  est7 = np.asarray(bs.bit_split(jnp.asarray(g), jax.random.key(6), clamp=7)) / (m / 98)
  np.testing.assert_allclose(est7[:2], [98, -98], atol=1e-4)


def test_zero_and_nonfinite_gradients():
  chex.assert_trees_all_equal(bs.bit_split(jnp.zeros((3, 4)), jax.random.key(0)),
                              jnp.zeros((3, 4)))
  g = jnp.ones((3, 4)).at[0, 1].set(jnp.inf)
  assert np.isnan(np.asarray(bs.bit_split(g, jax.random.key(0)))).all()
  est = bs.BitSplitLss().estimate(g.at[0, 1].set(jnp.nan), jax.random.key(0), gemm='dlhs',
                                  residual=jnp.ones((4, 2)), kept=(0,))
  assert np.isnan(np.asarray(est)).all()


# ---------------------------------------------------------------------------
# probability capping and sampling
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('seed', range(6))
def test_capped_probabilities_sum_to_the_budget_and_stay_below_one(seed):
  rng = np.random.default_rng(seed)
  c = (rng.lognormal(0, 2.0, 40) * (rng.random(40) < 0.8)).astype(np.float32)
  budget = 20 if seed % 2 else int(rng.integers(21, 31))
  p = np.asarray(bs.capped_probabilities(jnp.asarray(c), budget))
  np.testing.assert_allclose(p.sum(), budget, rtol=1e-5)
  assert p.max() <= 1 and p.min() >= 0
  np.testing.assert_array_equal(p == 0, c == 0)
  np.testing.assert_allclose(p, np_capping(c, budget), rtol=1e-5, atol=1e-6)
  # Uncapped entries stay proportional to their scores.
  free = (p < 1) & (c > 0)
  ratio = p[free] / c[free]
  np.testing.assert_allclose(ratio, ratio[0], rtol=1e-5)


def test_capping_edge_cases():
  few = jnp.array([0.0, 3.0, 0.0, 1.0, 0.0, 0.0])
  np.testing.assert_array_equal(bs.capped_probabilities(few, 3), [0, 1, 0, 1, 0, 0])
  np.testing.assert_array_equal(bs.capped_probabilities(jnp.zeros(4), 2), jnp.zeros(4))
  np.testing.assert_allclose(bs.capped_probabilities(jnp.ones(4), 2), jnp.full(4, 0.5))


def test_keep_nonzero_keeps_exactly_the_nonzero_rows():
  c = jnp.array([0.0, 2.0, 0.5, 0.0, 9.0])
  mask, p = bs.sample_rows(c, None, budget=2, keep_nonzero=True)
  np.testing.assert_array_equal(mask, [False, True, True, False, True])
  np.testing.assert_array_equal(p, [0, 1, 1, 0, 1])
  g = row_sparse_grad(jax.random.key(7))
  chex.assert_trees_all_equal(bs.lss(jnp.asarray(g), keep_nonzero=True), jnp.asarray(g))


def test_lss_is_unbiased_and_keeps_the_budget_on_average():
  g = row_sparse_grad(jax.random.key(8))
  r = np.asarray(jax.random.uniform(jax.random.key(9), (16,), minval=0.5, maxval=2.0))
  n = 3000
  keys = jax.random.split(jax.random.key(10), n)
  samples = np.asarray(jax.vmap(lambda k: bs.lss(jnp.asarray(g), k, budget=8,
                                                 residual_norms=jnp.asarray(r)))(keys),
                       np.float64)
  p = np_capping(np.linalg.norm(g.astype(np.float64), axis=1) * r, 8)
  var = np.where(p[:, None] > 0, (1 - p[:, None]) / np.where(p > 0, p, 1)[:, None], 0) * g**2
  bound = Z * np.sqrt(var / n) + 1e-6 * np.abs(g)  # kept-for-sure rows: float32 1/p
  assert np.all(np.abs(samples.mean(0) - g) <= bound)
  kept = (np.abs(samples).sum(-1) > 0).sum(-1)
  # Σp = 8 expected kept rows; Var(kept) <= 8.
  assert abs(kept.mean() - 8) < Z * math.sqrt(8 / n)


def _estimates(est, g, x, w, keys):
  dx = jax.vmap(lambda k: est.estimate(g, k, gemm='dlhs', residual=w, kept=(0,)))(keys)
  dw = jax.vmap(lambda k: x.T @ est.estimate(g, k, gemm='drhs', residual=x, kept=(1,)))(keys)
  return np.asarray(dx, np.float64), np.asarray(dw, np.float64)


def test_bit_split_lss_estimator_is_unbiased_for_both_gemms():
  # Integer t (no SR noise): the only randomness is LSS, whose variance is known in
  # closed form: Var(est_ij) = Σ_parts (1 − p)/p · part_ij² with p from the capping.
  t = np.zeros((12, 6))
  t[0] = [98, -60, 30, 7, -14, 0]
  t[3] = [50, 41, -90, 2, 3, -8]
  t[[1, 5, 7, 10]] = [[1, -2, 0, 3, 0, 1], [0, 1, 1, -1, 0, 0], [2, 0, -5, 0, 1, 0],
                      [4, 4, -3, 0, 0, 6]]
  g = jnp.asarray(t * 2.0**-7, jnp.float32)
  hi = np.clip(np.round(t / 14), -7, 7)
  parts = (14 * hi * 2.0**-7, (t - 14 * hi) * 2.0**-7)
  x = np.asarray(jax.random.normal(jax.random.key(12), (12, 5)), np.float64)
  w = jax.random.normal(jax.random.key(13), (5, 6))
  n = 3000
  keys = jax.random.split(jax.random.key(14), n)
  dx, dw = _estimates(bs.BitSplitLss(), g, jnp.asarray(x, jnp.float32), w, keys)
  for samples, gemm in ((dx, 'dlhs'), (dw, 'drhs')):
    norms = np.concatenate([np.linalg.norm(p, axis=1) for p in parts])
    if gemm == 'drhs':
      norms = norms * np.tile(np.linalg.norm(x, axis=1), 2)
    p = np_capping(norms, 12)
    p_safe = np.where(p > 0, p, 1)
    var = sum(((1 - q) / q)[:, None] * part**2
              for q, part in zip(np.split(p_safe, 2), parts))
    want = t * 2.0**-7
    if gemm == 'drhs':
      var, want = (x**2).T @ var, x.T @ want
    bound = Z * np.sqrt(var / n) + 1e-6 * np.abs(want) + 1e-9
    assert np.all(np.abs(samples.mean(0) - want) <= bound), gemm


# ---------------------------------------------------------------------------
# wiring through qtrain.dot_general
# ---------------------------------------------------------------------------
def _dot_grads(cfg, x, w, dy, key):
  dims = (((1,), (0,)), ((), ()))
  _, vjp = jax.vjp(lambda a, b: qtrain.dot_general(a, b, dims, config=cfg, key=key), x, w)
  return vjp(dy)


def test_dx_and_dw_share_the_bit_split_codes_and_draw_their_own_masks():
  x = jax.random.normal(jax.random.key(15), (16, 5))
  w = jax.random.normal(jax.random.key(16), (5, 12))
  # Heavy rows 10x: more non-zero stacked rows than the budget, so sampling is real.
  dy = jnp.asarray(row_sparse_grad(jax.random.key(17), heavy=10.0))
  key = jax.random.key(18)
  shared = jax.random.fold_in(key, 2)  # the dX slot's key, given to both GEMMs
  for lss, keep in ((False, False), (True, True), (True, False)):
    cfg = int4_transformer_config(lss=lss, keep_nonzero=keep)
    est = cfg.dlhs.lhs
    dx, dw = _dot_grads(cfg, x, w, dy, key)
    g_dx = est.estimate(dy, shared, gemm='dlhs', residual=w, kept=(0,))
    g_dw = est.estimate(dy, shared, gemm='drhs', residual=x, kept=(1,))
    np.testing.assert_allclose(dx, g_dx @ w.T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dw, x.T @ g_dw, rtol=1e-5, atol=1e-6)
    # One set of codes: without sampling both GEMMs multiply the same BS(dY).
    bs_dy = bs.bit_split(dy, jax.random.fold_in(shared, 0))
    if not lss:
      chex.assert_trees_all_equal(g_dx, bs_dy)
      chex.assert_trees_all_equal(g_dw, bs_dy)
    elif keep:  # 14·hi·s + lo·s: the same values up to one float32 rounding
      chex.assert_trees_all_close(g_dx, bs_dy, rtol=1e-6, atol=1e-9)
      chex.assert_trees_all_close(g_dw, bs_dy, rtol=1e-6, atol=1e-9)
    else:
      # Every kept row is one of the shared rows hi·14·s, lo·s (or their sum), reweighted;
      # the two GEMMs sample them differently.
      assert not np.array_equal(np.asarray(g_dx), np.asarray(g_dw))
      hi, lo, s = bs.split_codes(dy, jax.random.fold_in(shared, 0))
      for est_rows in (g_dx, g_dw):
        for i in range(dy.shape[0]):
          row = np.asarray(est_rows[i])
          up, down = 14 * np.asarray(hi[i], np.float64) * s, np.asarray(lo[i], np.float64) * s
          # row = a·up + b·down with a, b >= 0: solve on the two parts' support.
          sol = np.linalg.lstsq(np.stack([up, down], 1), row, rcond=None)[0]
          np.testing.assert_allclose(np.stack([up, down], 1) @ sol, row, atol=1e-5)
          assert (sol >= -1e-5).all()


def test_rows_must_lead_for_sampling():
  est = bs.BitSplitLss()
  with pytest.raises(NotImplementedError, match='lead'):
    est.estimate(jnp.ones((3, 4)), jax.random.key(0), gemm='dlhs', residual=jnp.ones((2, 4)),
                 kept=(1,))


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------
def test_bad_arguments_raise_clear_errors():
  g = jnp.ones((4, 3))
  k = jax.random.key(0)
  with pytest.raises(ValueError, match='bits=2'):
    bs.bit_split(g, k, bits=2)
  with pytest.raises(ValueError, match='bits=9'):
    bs.BitSplitLss(bits=9)
  for clamp in (5, 8, True):
    with pytest.raises(ValueError, match='clamp'):
      bs.bit_split(g, k, clamp=clamp)
  with pytest.raises(ValueError, match='clamp'):
    bs.BitSplitLss(clamp=6, bits=5)
  with pytest.raises(ValueError, match='key is required'):
    bs.bit_split(g, None)
  with pytest.raises(ValueError, match='key is required'):
    bs.lss(g, None)
  with pytest.raises(ValueError, match='budget'):
    bs.capped_probabilities(jnp.ones(4), 0)
  with pytest.raises(ValueError, match='budget'):
    bs.lss(g, k, budget=5)
  with pytest.raises(ValueError, match='residual_norms'):
    bs.lss(g, k, residual_norms=jnp.ones(3))
  with pytest.raises(ValueError, match='1-D'):
    bs.capped_probabilities(jnp.ones((2, 2)), 1)
  with pytest.raises(TypeError, match='floating'):
    bs.bit_split(jnp.ones(3, jnp.int32), k)
  with pytest.raises(TypeError, match='lss must be a bool'):
    bs.BitSplitLss(lss=1)
