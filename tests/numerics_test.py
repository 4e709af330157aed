"""Tests for qtrain.numerics: the papers' quantizers (unbiasedness, grids, references, errors)."""

from __future__ import annotations

import functools
import math

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtrain import formats as fmts
from qtrain import numerics
from qtrain import scaling

_EPS32 = float(np.finfo(np.float32).eps)
# Number of independent keys for the statistical tests.
_N_KEYS = 2000
# Per-element failure probability of the Bernstein bound below. With a few
# thousand checked elements in this file, a false alarm has probability < 1e-2
# for a random seed; the seeds are fixed, so the outcome is deterministic.
_DELTA = 1e-6


def _bernstein_bound(var: np.ndarray, width: np.ndarray, n: int) -> np.ndarray:
  """|mean of n draws - E| bound holding with probability >= 1 - _DELTA (Bernstein).

  For i.i.d. draws with variance `var` and range `width`,
  P(|mean - E| >= t) <= 2 exp(-n t² / (2 var + 2 width t / 3)). Solving for t gives
  t = (L w / 3 + sqrt((L w / 3)² + 2 n var L)) / n with L = ln(2 / delta): about
  5.4 sigma/sqrt(n) when var is large, and still valid when p(1-p) is tiny (where
  a plain k-sigma normal bound is not).
  """
  log_term = math.log(2 / _DELTA)
  a = log_term * width / 3
  return (a + np.sqrt(a * a + 2 * n * var * log_term)) / n


def _neighbours(grid: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  xc = np.clip(x, grid[0], grid[-1])
  lo = grid[np.searchsorted(grid, xc, side='right') - 1]
  hi = grid[np.searchsorted(grid, xc, side='left')]
  return lo, hi


def _real_grid(values: np.ndarray, scale: float, zero_point: float = 0.0) -> np.ndarray:
  """The dequantized grid exactly as the library computes it: f32 (code - zp) · f32 scale."""
  codes = (np.asarray(values, np.float32) - np.float32(zero_point)).astype(np.float32)
  return np.unique((codes * np.float32(scale)).astype(np.float32).astype(np.float64))


# Deterministic quantizers jitted once per static configuration (cheaper than eager op-by-op).
_radix4 = jax.jit(numerics.radix4, static_argnames=('bits', 'phase'))
_sawb = jax.jit(numerics.sawb, static_argnames=('bits', 'c1', 'c2', 'rounding'))
_fixed_point = jax.jit(numerics.fixed_point, static_argnames=('bits', 'fractional_bits',
                                                               'saturate', 'rounding'))


def _draws(fn, x: jax.Array, n: int = _N_KEYS, seed: int = 0) -> np.ndarray:
  keys = jax.random.split(jax.random.key(seed), n)
  return np.asarray(jax.jit(jax.vmap(lambda k: fn(x, k)))(keys), np.float64)


# ----------------------------------------------------------------------------
# Unbiasedness and two-neighbour support of every stochastic quantizer.


def _x_luq():
  rng = np.random.default_rng(0)
  # Gradient-like: log-normal magnitudes spanning more than the 8 binades, so
  # both the stochastic underflow and the log rounding are exercised.
  x = rng.choice([-1.0, 1.0], 256) * np.exp(rng.uniform(-9, 0, 256))
  x[0] = -1.0
  return x


def _x_uniform(lo=-1.0, hi=1.0, seed=1, n=256):
  x = np.random.default_rng(seed).uniform(lo, hi, n)
  x[0] = hi
  return x


def _x_asym():
  # MinMax with 8 bits: range [-51, 204]·2^-6 gives scale exactly 2^-6 and zero
  # point 51, so no element is clipped and every element must be unbiased.
  x = _x_uniform(-51 * 2.0**-6, 204 * 2.0**-6, seed=2)
  x[1] = -51 * 2.0**-6
  return x


def _x_sparse():
  # SAWB with a sparse tensor: the clip exceeds max|x|, so nothing is clipped.
  rng = np.random.default_rng(3)
  return rng.standard_normal(256) * (rng.uniform(size=256) < 0.5)


def _luq_grid(x, bits):
  alpha = np.float32(np.max(np.abs(x.astype(np.float32)))) / np.float32(2.0**(2**(bits - 1) - 1))
  return _real_grid(numerics.luq_format(bits).values(), alpha)


def _absmax_grid(fmt):
  def grid(x):
    scale = np.float32(np.max(np.abs(x.astype(np.float32)))) / np.float32(fmt.absmax_target)
    return _real_grid(fmt.values(), scale)
  return grid


def _asym_grid(x):
  scale, zp = scaling.compute_scale(jnp.asarray(x, jnp.float32), fmts.UINT8, scaling.MinMax())
  assert float(scale[0]) == 2.0**-6 and float(zp[0]) == 51  # the construction above
  return _real_grid(fmts.UINT8.values(), float(scale[0]), float(zp[0]))


def _sawb_grid(x):
  scale, _ = scaling.compute_scale(jnp.asarray(x, jnp.float32), fmts.INT4, scaling.Sawb())
  grid = _real_grid(fmts.INT4.values(), float(scale[0]))
  assert np.max(np.abs(x)) < grid[-1]  # the sparse construction: nothing clipped
  return grid


def _sawb_scale_rtol(x):
  """Relative uncertainty of SAWB's f32 scale between eager and jit/vmap evaluation.

  Each f32 mean over n elements is off by at most ~log2(n)·eps (pairwise sums),
  and clip = c1·rms - c2·mean|x| amplifies that by (c1·rms + c2·mean|x|) / clip.
  """
  x = x.astype(np.float64)
  rms, mabs = np.sqrt(np.mean(x * x)), np.mean(np.abs(x))
  amplification = (12.1 * rms + 12.2 * mabs) / (12.1 * rms - 12.2 * mabs)
  return 2 * math.ceil(math.log2(x.size)) * _EPS32 * amplification


def _fixed_grid(bits, saturate):
  def grid(x):
    if saturate:
      return _real_grid(fmts.fixed_point(bits).values(), 2.0**-(bits - 1))
    m = int(np.ceil(np.max(np.abs(x)) * 2**(bits - 1))) + 1
    return np.arange(-m, m + 1, dtype=np.float64) * 2.0**-(bits - 1)
  return grid


# name: (quantizer fn(x, key), input builder, grid builder(x), samples[, scale rtol(x)]).
# The scale rtol is 0 where the scale is max|x|/const, a constant or exact by
# construction, so the grid here is bit-identical to the library's up to
# the few-ulp `tiny` of the test.
_STOCHASTIC = {
    'luq': (lambda x, k: numerics.luq(x, k), _x_luq, functools.partial(_luq_grid, bits=4), 1),
    'luq_bits3': (lambda x, k: numerics.luq(x, k, bits=3), _x_luq,
                  functools.partial(_luq_grid, bits=3), 1),
    'luq_smp2': (lambda x, k: numerics.luq(x, k, samples=2), _x_luq,
                 functools.partial(_luq_grid, bits=4), 2),
    'stochastic_round': (lambda x, k: numerics.stochastic_round(x, k), _x_uniform,
                         _absmax_grid(fmts.IntFormat(bits=8, narrow=True)), 1),
    'stochastic_round_int2': (lambda x, k: numerics.stochastic_round(x, k, bits=2), _x_uniform,
                              _absmax_grid(fmts.IntFormat(bits=2, narrow=True)), 1),
    'stochastic_round_e4m3': (
        lambda x, k: numerics.stochastic_round(x, k, format=fmts.FP8_E4M3), _x_luq,
        _absmax_grid(fmts.FP8_E4M3), 1),
    'stochastic_round_log4': (
        lambda x, k: numerics.stochastic_round(x, k, format=fmts.LOG4_FP4), _x_luq,
        _absmax_grid(fmts.LOG4_FP4), 1),
    'int_symmetric': (lambda x, k: numerics.int_symmetric(x, k, bits=4, rounding='stochastic'),
                      _x_uniform, _absmax_grid(fmts.IntFormat(bits=4, narrow=True)), 1),
    'int_asymmetric': (lambda x, k: numerics.int_asymmetric(x, k, rounding='stochastic'),
                       _x_asym, _asym_grid, 1),
    'fixed_point': (lambda x, k: numerics.fixed_point(x, k, rounding='stochastic'),
                    functools.partial(_x_uniform, -0.99, 0.99), _fixed_grid(8, True), 1),
    'fixed_point_unsaturated': (
        lambda x, k: numerics.fixed_point(x, k, bits=4, saturate=False, rounding='stochastic'),
        functools.partial(_x_uniform, -3.0, 3.0), _fixed_grid(4, False), 1),
    'sawb': (lambda x, k: numerics.sawb(x, k, rounding='stochastic'), _x_sparse, _sawb_grid, 1,
             _sawb_scale_rtol),
}


@pytest.mark.parametrize('name', sorted(_STOCHASTIC))
def test_stochastic_quantizer_is_unbiased_and_uses_two_neighbours(name):
  fn, make_x, make_grid, samples, *rest = _STOCHASTIC[name]
  x = make_x().astype(np.float32)
  xs = x.astype(np.float64)
  grid = make_grid(x)
  scale_rtol = rest[0](x) if rest else 0.0
  lo, hi = _neighbours(grid, xs)
  y = _draws(fn, jnp.asarray(x))
  width = hi - lo
  # f32 rounding of the units x/scale and of the grid values, plus the scale's own uncertainty.
  mag = np.maximum(np.abs(xs), np.maximum(np.abs(lo), np.abs(hi)))
  tiny = (4 * _EPS32 + scale_rtol) * mag
  # Support: one sample lies on lo or hi; the mean of `samples` lies on lo + width·j/samples.
  j = np.divide((y - lo) * samples, width, out=np.zeros_like(y), where=width > 0)
  assert np.all(np.abs(j - np.round(j)) * width / samples <= tiny), name
  assert np.all((np.round(j) >= 0) & (np.round(j) <= samples)), name
  if samples == 1:
    assert np.all((np.abs(y - lo) <= tiny) | (np.abs(y - hi) <= tiny)), name
  # Unbiased: E[y] = x; per draw the variance is (x-lo)(hi-x)/samples.
  var = np.clip((xs - lo) * (hi - xs), 0, None) / samples
  bound = _bernstein_bound(var, width, _N_KEYS) + tiny
  err = np.abs(y.mean(axis=0) - xs)
  worst = int(np.argmax(err - bound))
  assert np.all(err <= bound), (name, xs[worst], lo[worst], hi[worst], err[worst], bound[worst])
  # The rule is genuinely random: strictly-inside elements take both neighbours.
  inside = (xs > lo) & (xs < hi)
  assert inside.sum() > x.size // 4
  took_both = np.any(y > lo + width / 2, axis=0) & np.any(y < lo + width / 2, axis=0)
  assert np.mean(took_both[inside]) > 0.5


def test_stochastic_quantizers_with_the_same_key_are_deterministic():
  x = jnp.asarray(_x_luq(), jnp.float32)
  # One quantizer per code path that draws noise (fake_quant, and fixed_point's own).
  for name in ('luq_smp2', 'stochastic_round', 'fixed_point_unsaturated'):
    fn = _STOCHASTIC[name][0]
    jitted = jax.jit(fn)
    a, b = jitted(x, jax.random.key(42)), jitted(x, jax.random.key(42))
    c = jitted(x, jax.random.key(43))
    chex.assert_trees_all_equal(a, b, custom_message=name)
    assert np.any(np.asarray(a) != np.asarray(c)), name


def test_luq_accepts_legacy_uint32_keys():
  x = jnp.asarray(_x_luq(), jnp.float32)
  y = jax.jit(numerics.luq)(x, jax.random.PRNGKey(0))
  chex.assert_shape(y, x.shape)
  chex.assert_tree_all_finite(y)


# ----------------------------------------------------------------------------
# LUQ structure.


def test_luq_levels_use_the_absolute_max():
  # The most negative entry dominates: alpha = max|x| / 2^7 = 10/128 (the
  # official code's signed max would give 1/128 and levels up to 2^10·alpha).
  rng = np.random.default_rng(4)
  x = rng.uniform(-1, 1, 4096).astype(np.float32)
  x[:9] = [-10.0, 1.0, 1e-4, -1e-3, 0.05, 0.0, -0.07, 5.0, 3.0]
  alpha = 10 / 128
  ys = _draws(lambda x, k: numerics.luq(x, k), jnp.asarray(x), n=16)
  mags = np.abs(ys[ys != 0])
  k = np.log2(mags / alpha)
  np.testing.assert_array_equal(k, np.round(k))  # exactly alpha·2^k
  assert k.min() >= 0 and k.max() <= 7
  assert mags.max() <= 10.0
  np.testing.assert_array_equal(ys[:, 0], -10.0)  # the max itself is a level: kept exactly
  np.testing.assert_array_equal(ys[:, 5], 0.0)  # zero stays zero
  # Every level k = 0..7 is used (uniform entries cover k <= 4; 3, 5 and 10 the rest).
  assert set(np.unique(k).astype(int)) == set(range(8))


def test_luq_signs_are_kept():
  x = jnp.asarray(_x_luq(), jnp.float32)
  y = np.asarray(jax.jit(numerics.luq)(x, jax.random.key(5)))
  nz = y != 0
  np.testing.assert_array_equal(np.sign(y[nz]), np.sign(np.asarray(x)[nz]))


@pytest.mark.parametrize('fn', [
    lambda x: numerics.luq(x, jax.random.key(0)),
    lambda x: numerics.luq(x, jax.random.key(0), samples=2),
    lambda x: numerics.stochastic_round(x, jax.random.key(0)),
    lambda x: numerics.radix4(x),
    lambda x: numerics.sawb(x),
    lambda x: numerics.int_symmetric(x),
    lambda x: numerics.int_asymmetric(x),
    lambda x: numerics.fixed_point(x),
], ids=['luq', 'luq_smp', 'stochastic_round', 'radix4', 'sawb', 'int_symmetric',
        'int_asymmetric', 'fixed_point'])
def test_all_zero_input_gives_zeros(fn):
  x = jnp.zeros((4, 8), jnp.float32)
  y = jax.jit(fn)(x)
  chex.assert_tree_all_finite(y)
  chex.assert_trees_all_equal(y, x)


# ----------------------------------------------------------------------------
# Radix-4 (Sun et al.).


@pytest.mark.parametrize('n', range(-2, 4))
def test_radix4_rounds_at_the_linear_midpoint(n):
  mid = np.float32(0.625 * 4.0**n)
  below = np.nextafter(mid, np.float32(0))
  above = np.nextafter(mid, np.float32(np.inf))
  geometric = np.float32(0.5 * 4.0**n)  # 4^(n-1/2): NOT the switch point
  x = jnp.asarray(np.array([below, above, -below, -above, geometric], np.float32))
  got = _radix4(x, scale=jnp.float32(1.0))
  lo, hi = 4.0**(n - 1), 4.0**n
  chex.assert_trees_all_equal(got, jnp.array([lo, hi, -lo, -hi, lo], jnp.float32))


@pytest.mark.parametrize('n', range(-2, 4))
def test_radix4_phase1_rounds_onto_the_odd_grid(n):
  lo, hi = 2 * 4.0**(n - 1), 2 * 4.0**n
  mid = np.float32((lo + hi) / 2)
  x = jnp.asarray(np.array([np.nextafter(mid, np.float32(0)),
                            np.nextafter(mid, np.float32(np.inf))], np.float32))
  got = _radix4(x, phase=1, scale=jnp.float32(1.0))
  chex.assert_trees_all_equal(got, jnp.array([lo, hi], jnp.float32))


def _radix4_reference(u: np.ndarray, levels: np.ndarray) -> np.ndarray:
  """Nearest level in the linear domain (numpy, float64); ties have measure zero here."""
  cands = np.concatenate([[0.0], levels])
  idx = np.argmin(np.abs(np.abs(u)[:, None] - cands[None, :]), axis=1)
  return np.sign(u) * cands[idx]


@pytest.mark.parametrize('phase', [0, 1])
def test_radix4_matches_a_nearest_level_reference(phase):
  rng = np.random.default_rng(6)
  u = (rng.choice([-1.0, 1.0], 4096) * np.exp(rng.uniform(-12, 5, 4096))).astype(np.float32)
  levels = 2.0**phase * 4.0**np.arange(-3, 4)
  got = np.asarray(_radix4(jnp.asarray(u), phase=phase, scale=jnp.float32(1.0)))
  expected = _radix4_reference(u.astype(np.float64), levels)
  np.testing.assert_array_equal(got, expected.astype(np.float32))
  nz = np.abs(got[got != 0])
  assert set(np.unique(nz)) <= set(levels)


def _gradscale(amax: float) -> float:
  """2^ceil(log2(amax / 4^3)), computed exactly from the binary exponent."""
  mant, exp = np.frexp(amax / 64)
  return float(np.ldexp(1.0, exp - 1 if mant == 0.5 else exp))


@pytest.mark.parametrize('magnitude', [1e-4, 0.3, 1.0, 7.0, 1e3])
def test_radix4_default_scale_is_a_power_of_two_gradscale(magnitude):
  rng = np.random.default_rng(7)
  x = (rng.standard_normal(1024) * magnitude).astype(np.float32)
  amax = float(np.max(np.abs(x)))
  s = _gradscale(amax)
  assert 32 < amax / s <= 64  # GradScale's steady state: max|x|/s in (Max/2, Max]
  got = np.asarray(_radix4(jnp.asarray(x)))
  expected = np.asarray(_radix4(jnp.asarray(x), scale=jnp.float32(s)))
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(
      got, (_radix4_reference(x.astype(np.float64) / s, 4.0**np.arange(-3, 4)) * s)
      .astype(np.float32))


def test_radix4_phases_share_the_scale():
  x = np.random.default_rng(8).standard_normal(512).astype(np.float32)
  s = _gradscale(float(np.max(np.abs(x))))
  even = np.abs(np.asarray(_radix4(jnp.asarray(x), phase=0), np.float64))
  odd = np.abs(np.asarray(_radix4(jnp.asarray(x), phase=1), np.float64))
  # Even phase: s·4^k (even powers of two of s); odd phase: s·2·4^k (odd powers).
  k_even = np.log2(even[even > 0] / s)
  k_odd = np.log2(odd[odd > 0] / s)
  np.testing.assert_array_equal(np.mod(k_even, 2), 0)
  np.testing.assert_array_equal(np.mod(k_odd, 2), 1)


def test_radix4_format_bits():
  assert numerics.radix4_format(4) == fmts.LogFormat(radix=4, min_exponent=-3, max_exponent=3)
  assert numerics.radix4_format(4, phase=1).values()[-1] == 128.0
  assert numerics.radix4_format(3).values().tolist() == [-4.0, -1.0, -0.25, 0.0, 0.25, 1.0, 4.0]


# ----------------------------------------------------------------------------
# SAWB.


def _sawb_reference(x: np.ndarray, c1=12.1, c2=12.2, bits=4) -> tuple[np.ndarray, float]:
  x = x.astype(np.float64)
  clip = c1 * np.sqrt(np.mean(x * x)) - c2 * np.mean(np.abs(x))
  if clip <= 0:
    clip = np.max(np.abs(x))
  step = clip / 2**(bits - 1)
  q = np.clip(np.round(x / step), -2**(bits - 1), 2**(bits - 1) - 1)
  return q * step, step


@pytest.mark.parametrize('dist', ['normal', 'laplace', 'uniform'])
def test_sawb_matches_numpy_reference(dist):
  rng = np.random.default_rng(9)
  x = {'normal': rng.standard_normal(2048), 'laplace': rng.laplace(size=2048),
       'uniform': rng.uniform(-1, 1, 2048)}[dist].astype(np.float32)
  got = np.asarray(_sawb(jnp.asarray(x)), np.float64)
  expected, step = _sawb_reference(x)
  # The f32 statistics differ from float64 by ~1e-6 relative; any rounding
  # flip would show as a whole step.
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * step)
  codes = np.round(got / step)
  assert codes.min() >= -8 and codes.max() <= 7
  assert codes.min() == -8  # the full-range int4 grid: -8 is used (clipped values)


def test_sawb_constant_magnitude_falls_back_to_absmax():
  c = 0.75
  x = jnp.asarray(np.where(np.arange(64) % 2, c, -c), jnp.float32)
  got = np.asarray(_sawb(x))
  # step = c/8: -c is code -8, +c is code 8 and saturates to 7.
  np.testing.assert_array_equal(got, np.where(np.arange(64) % 2, 7 * c / 8, -c).astype(np.float32))


def test_sawb_explicit_coefficients_for_8_bits():
  x = np.random.default_rng(10).standard_normal(1024).astype(np.float32)
  got = np.asarray(_sawb(jnp.asarray(x), bits=8, c1=12.68, c2=12.8), np.float64)
  expected, step = _sawb_reference(x, 12.68, 12.8, 8)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * step)


# ----------------------------------------------------------------------------
# Fixed point (WAGEUBN) and integer quantizers.


@pytest.mark.parametrize('rounding', ['nearest'])
def test_fixed_point_8bit_grid_and_saturation(rounding):
  x = np.linspace(-2, 2, 4001, dtype=np.float32)
  got = np.asarray(_fixed_point(jnp.asarray(x), rounding=rounding), np.float64)
  expected = np.clip(np.round(x.astype(np.float64) * 128), -127, 127) / 128
  np.testing.assert_array_equal(got, expected)
  assert got.max() == 127 / 128 and got.min() == -127 / 128


def test_fixed_point_unsaturated_is_unbounded():
  x = np.array([3.3, -5.1, 100.0, 0.004, -0.0039], np.float32)
  got = np.asarray(_fixed_point(jnp.asarray(x), saturate=False), np.float64)
  np.testing.assert_array_equal(got, np.round(x.astype(np.float64) * 128) / 128)


def test_fixed_point_custom_fraction_bits():
  x = jnp.array([0.3, 7.9, -9.0, 0.06], jnp.float32)
  got = _fixed_point(x, bits=8, fractional_bits=4)
  chex.assert_trees_all_equal(got, jnp.array([5 / 16, 7.875, -127 / 16, 0.0625], jnp.float32))


def test_int_symmetric_examples_and_axis():
  int_symmetric = jax.jit(numerics.int_symmetric, static_argnames=('bits', 'narrow', 'axis'))
  chex.assert_trees_all_equal(int_symmetric(jnp.array([1.0, -0.6, 0.3]), bits=2),
                              jnp.array([1.0, -1.0, 0.0]))
  # -0.5 is a tie: round-half-to-even gives -0 (not -1).
  assert int_symmetric(jnp.array([1.0, -0.5, 0.3]), bits=2).tolist() == [1.0, 0.0, 0.0]
  x = jnp.array([[1.0, 0.5], [10.0, -2.5]], jnp.float32)
  got = int_symmetric(x, bits=3, axis=0)  # per row: scale max|row| / 3
  # XLA may divide by the constant 3 as a multiply by 1/3: one ulp either way.
  chex.assert_trees_all_close(got, jnp.array([[1.0, 2 / 3], [10.0, -10 / 3]], jnp.float32),
                              rtol=2 * _EPS32, atol=0)
  full = int_symmetric(jnp.array([-1.0, 0.9]), bits=2, narrow=False)  # grid {-2..1}·1
  chex.assert_trees_all_equal(full, jnp.array([-1.0, 1.0]))


def test_int_asymmetric_zero_is_exact():
  x = jnp.array([-0.37, 0.0, 1.91, 0.5], jnp.float32)
  got = np.asarray(jax.jit(numerics.int_asymmetric, static_argnames='bits')(x, bits=4))
  assert got[1] == 0.0
  step = (1.91 + 0.37) / 15
  assert np.all(np.abs(got - np.asarray(x)) <= step / 2 * (1 + 1e-6))


# ----------------------------------------------------------------------------
# dtype, shape, gradients.


_ALL = {
    'int_symmetric': lambda x: numerics.int_symmetric(x),
    'int_symmetric_sr': lambda x: numerics.int_symmetric(x, jax.random.key(0),
                                                         rounding='stochastic'),
    'int_asymmetric': lambda x: numerics.int_asymmetric(x),
    'sawb': lambda x: numerics.sawb(x),
    'luq': lambda x: numerics.luq(x, jax.random.key(0)),
    'radix4': lambda x: numerics.radix4(x),
    'radix4_phase1': lambda x: numerics.radix4(x, phase=1),
    'fixed_point': lambda x: numerics.fixed_point(x),
    'fixed_point_unsaturated_sr': lambda x: numerics.fixed_point(
        x, jax.random.key(0), saturate=False, rounding='stochastic'),
    'stochastic_round': lambda x: numerics.stochastic_round(x, jax.random.key(0)),
    'stochastic_round_e2m1': lambda x: numerics.stochastic_round(x, jax.random.key(0),
                                                                 format=fmts.FP4_E2M1),
}


_NAME_DTYPE = [(f'{n}_{d}', n, d) for n in sorted(_ALL) for d in ('float32', 'bfloat16')]


class ShapeDtypeGradTest(parameterized.TestCase):

  @parameterized.named_parameters(*_NAME_DTYPE)
  def test_output_dtype_and_shape_equal_input(self, name, dtype):
    x = jnp.asarray(np.random.default_rng(11).standard_normal((3, 5, 7)), dtype)
    y = jax.jit(_ALL[name])(x)
    chex.assert_shape(y, x.shape)
    chex.assert_type(y, x.dtype)
    chex.assert_tree_all_finite(y)

  @parameterized.named_parameters(*_NAME_DTYPE)
  def test_gradient_is_straight_through(self, name, dtype):
    x = jnp.asarray(np.random.default_rng(12).standard_normal((4, 9)) * 3, dtype)
    g = jax.jit(jax.grad(lambda x: jnp.sum(_ALL[name](x).astype(jnp.float32))))(x)
    chex.assert_type(g, x.dtype)
    chex.assert_trees_all_equal(g, jnp.ones_like(x))


# ----------------------------------------------------------------------------
# Bad input.


_KEY = jax.random.key(0)


@pytest.mark.parametrize('make, error, name', [
    (lambda: numerics.int_symmetric(jnp.ones(3), bits=9), ValueError, 'bits'),
    (lambda: numerics.int_symmetric(jnp.ones(3), bits=1), ValueError, 'bits'),
    (lambda: numerics.int_symmetric(jnp.ones(3), bits=4.0), TypeError, 'bits'),
    (lambda: numerics.int_asymmetric(jnp.ones(3), bits=9), ValueError, 'bits'),
    (lambda: numerics.sawb(jnp.ones(3), bits=9), ValueError, 'bits'),
    (lambda: numerics.luq(jnp.ones(3), _KEY, bits=7), ValueError, 'bits'),
    (lambda: numerics.luq(jnp.ones(3), _KEY, bits=1), ValueError, 'bits'),
    (lambda: numerics.radix4(jnp.ones(3), bits=6), ValueError, 'bits'),
    (lambda: numerics.radix4(jnp.ones(3), phase=2), ValueError, 'phase'),
    (lambda: numerics.fixed_point(jnp.ones(3), bits=33), ValueError, 'bits'),
    (lambda: numerics.fixed_point(jnp.ones(3), bits=1), ValueError, 'bits'),
    (lambda: numerics.stochastic_round(jnp.ones(3), _KEY, bits=9), ValueError, 'bits'),
    (lambda: numerics.sawb(jnp.ones(3), bits=8), ValueError, 'c1'),
    (lambda: numerics.int_symmetric(jnp.ones(3, jnp.int32)), TypeError, 'x'),
    (lambda: numerics.int_asymmetric(jnp.ones(3, jnp.int8)), TypeError, 'x'),
    (lambda: numerics.sawb(jnp.ones(3, jnp.int32)), TypeError, 'x'),
    (lambda: numerics.luq(jnp.ones(3, jnp.int32), _KEY), TypeError, 'x'),
    (lambda: numerics.radix4(jnp.ones(3, jnp.int32)), TypeError, 'x'),
    (lambda: numerics.fixed_point(jnp.ones(3, jnp.int32)), TypeError, 'x'),
    (lambda: numerics.stochastic_round(jnp.ones(3, jnp.uint8), _KEY), TypeError, 'x'),
    (lambda: numerics.luq(jnp.ones(3)), ValueError, 'key'),
    (lambda: numerics.stochastic_round(jnp.ones(3)), ValueError, 'key'),
    (lambda: numerics.int_symmetric(jnp.ones(3), rounding='stochastic'), ValueError, 'key'),
    (lambda: numerics.int_asymmetric(jnp.ones(3), rounding='stochastic'), ValueError, 'key'),
    (lambda: numerics.sawb(jnp.ones(3), rounding='stochastic'), ValueError, 'key'),
    (lambda: numerics.fixed_point(jnp.ones(3), rounding='stochastic', saturate=False),
     ValueError, 'key'),
    (lambda: numerics.int_symmetric(jnp.ones(3), rounding='up'), ValueError, 'rounding'),
    (lambda: numerics.fixed_point(jnp.ones(3), rounding='floor'), ValueError, 'rounding'),
])
def test_bad_input_names_the_argument(make, error, name):
  with pytest.raises(error, match=rf'\b{name}\b'):
    make()
