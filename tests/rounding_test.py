"""Tests for qtrain.rounding: RNE against ml_dtypes, saturation, NaN policy, SR statistics."""

from __future__ import annotations

import functools
import math

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from qtrain import formats as fmts
from qtrain import rounding as rnd

_MINIFLOATS = {
    'e4m3': (fmts.FP8_E4M3, ml_dtypes.float8_e4m3fn),
    'e5m2': (fmts.FP8_E5M2, ml_dtypes.float8_e5m2),
    'e2m1': (fmts.FP4_E2M1, ml_dtypes.float4_e2m1fn),
}

# One format of every kind that the stochastic rules must treat alike.
_SR_FORMATS = {
    'int4': fmts.INT4,
    'uint4': fmts.UINT4,
    'int8n': fmts.IntFormat(bits=8, narrow=True),
    'e4m3': fmts.FP8_E4M3,
    'e5m2': fmts.FP8_E5M2,
    'e2m1': fmts.FP4_E2M1,
    'log2_fp4': fmts.LOG2_FP4,
    'log4_fp4': fmts.LOG4_FP4,
    'log4_fp4_odd': fmts.LOG4_FP4_ODD,
    'ulog2_4': fmts.ULOG2_4,
    'fixed8': fmts.fixed_point(8),
}

# Number of equi-spaced noise values u_i = (i + 0.5) / N. With x placed at
# lo + (hi - lo)·j/N, exactly j of the N draws satisfy u_i < j/N, so the mean
# of the rounded values is x exactly (all quantities are dyadic).
_N_EQUI = 1024
# Positions j/N inside a grid interval used for the exact-unbiasedness test.
_EQUI_POSITIONS = (1, 3, 256, 511, 512, 513, 1000, 1023)
# Columns of the equi-spaced test (at most 64 grid pairs x 8 positions).
_EQUI_WIDTH = 512
# Width of the statistical bounds, in standard deviations. Each assertion then
# fails by chance with probability < 6e-7 (normal tail).
_K_SIGMA = 5.0


# Tests that are not about jit-vs-eager run jitted: one compile per format, not one per op.
_round = jax.jit(rnd.round_to_format, static_argnames=('fmt', 'rounding', 'stream'))
_round_log = jax.jit(rnd.round_log, static_argnames=('radix', 'min_exponent', 'max_exponent',
                                                     'shift', 'rounding'))


def _bits32(x) -> np.ndarray:
  return np.asarray(x, np.float32).view(np.uint32)


def _neighbours(values: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Largest grid value <= clip(x) and smallest grid value >= clip(x)."""
  xc = np.clip(np.asarray(x, np.float64), values[0], values[-1])
  lo = values[np.searchsorted(values, xc, side='right') - 1]
  hi = values[np.searchsorted(values, xc, side='left')]
  return lo, hi


def _grid_pairs(fmt: fmts.Format, max_pairs: int = 64) -> list[tuple[float, float]]:
  """Adjacent grid pairs (lo, hi), at most `max_pairs`, always with the two ends and zero."""
  v = fmt.values()
  pairs = list(zip(v[:-1], v[1:]))
  if len(pairs) > max_pairs:
    idx = np.unique(np.concatenate([
        np.linspace(0, len(pairs) - 1, max_pairs - 2).round().astype(int),
        np.flatnonzero((v[:-1] == 0) | (v[1:] == 0))]))
    pairs = [pairs[i] for i in idx]
  return [(float(a), float(b)) for a, b in pairs]


def _random_in_range(rng: np.random.Generator, fmt_max: float, tiny: float,
                     n: int) -> np.ndarray:
  """float32 values with log-uniform magnitudes in [tiny, fmt_max] and random signs."""
  mags = np.exp(rng.uniform(np.log(tiny), np.log(fmt_max), n))
  x = (mags * rng.choice([-1.0, 1.0], n)).astype(np.float32)
  return np.clip(x, -fmt_max, fmt_max)


# ----------------------------------------------------------------------------
# Round to nearest.


class RoundNearestTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_tie_table(self):
    x = jnp.array([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 0.49999997, 2.5000002], jnp.float32)
    got = self.variant(rnd.round_nearest_even)(x)
    expected = np.array([0.0, 2.0, 2.0, 4.0, -0.0, -2.0, -2.0, 0.0, 3.0], np.float32)
    chex.assert_trees_all_equal(_bits32(got), _bits32(expected))  # -0.5 -> -0, sign kept

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[(n, n) for n in sorted(_MINIFLOATS)])
  def test_nearest_equals_ml_dtypes_cast_on_random_values(self, name):
    fmt, dtype = _MINIFLOATS[name]
    info = ml_dtypes.finfo(dtype)
    rng = np.random.default_rng(sorted(_MINIFLOATS).index(name))
    # From a quarter of the smallest subnormal (rounds to ±0) up to the max.
    x = _random_in_range(rng, fmt.max_value, float(info.smallest_subnormal) / 4, 20000)
    x = np.concatenate([x, [0.0, -0.0, fmt.max_value, -fmt.max_value]]).astype(np.float32)
    expected = x.astype(dtype).astype(np.float32)
    got = self.variant(functools.partial(rnd.round_to_format, fmt=fmt))(jnp.asarray(x))
    chex.assert_trees_all_equal(_bits32(got), _bits32(expected))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[(n, n) for n in sorted(_MINIFLOATS)])
  def test_nearest_equals_ml_dtypes_cast_on_exact_ties(self, name):
    fmt, dtype = _MINIFLOATS[name]
    v = fmt.values()
    mids = (v[:-1] + v[1:]) / 2
    x = np.concatenate([mids, v]).astype(np.float32)
    np.testing.assert_array_equal(x[:mids.size].astype(np.float64), mids)  # exact midpoints
    x = np.pad(x, (0, 512 - x.size))  # one shape for all formats: eager ops compile once
    expected = x.astype(dtype).astype(np.float32)
    got = self.variant(functools.partial(rnd.round_to_format, fmt=fmt))(jnp.asarray(x))
    chex.assert_trees_all_equal(_bits32(got), _bits32(expected))
    # Grid values are fixed points.
    np.testing.assert_array_equal(np.asarray(got)[mids.size:mids.size + v.size],
                                  v.astype(np.float32))

  @parameterized.named_parameters(*[(f'{n}_{r}', n, r) for n in sorted(_MINIFLOATS)
                                    for r in rnd.ROUNDING_MODES])
  def test_out_of_range_saturates(self, name, rounding):
    fmt, _ = _MINIFLOATS[name]
    m = fmt.max_value
    big = np.array([m * 1.01, m * 1.5, m * 2, 1e30, np.finfo(np.float32).max], np.float32)
    x = jnp.asarray(np.concatenate([big, -big]))
    got = _round(x, fmt=fmt, rounding=rounding, u=jnp.full(x.shape, 0.999, jnp.float32))
    expected = np.concatenate([np.full(5, m), np.full(5, -m)]).astype(np.float32)
    chex.assert_trees_all_equal(got, jnp.asarray(expected))

  @parameterized.named_parameters(*[(f'{n}_{r}', n, r) for n in sorted(_SR_FORMATS)
                                    for r in rnd.ROUNDING_MODES])
  def test_nan_and_inf_propagate(self, name, rounding):
    fmt = _SR_FORMATS[name]
    x = jnp.array([np.nan, np.inf, -np.inf, 1.0], jnp.float32)
    got = np.asarray(_round(x, fmt=fmt, rounding=rounding, u=jnp.full(x.shape, 0.5, jnp.float32)))
    assert np.isnan(got[0])
    assert got[1] == np.inf
    assert got[2] == -np.inf
    assert np.isfinite(got[3])


# Raw-cast behaviour that round_to_format deliberately does not copy (DESIGN §4:
# "casts lie"). If ml_dtypes changes these, the notes in rounding.py need review.


def test_raw_e4m3_cast_overflows_to_nan():
  x = np.array([464.0, 465.0, 1000.0, -1000.0], np.float32)
  raw = x.astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
  assert raw[0] == 448.0  # the tie below the first unrepresentable binade rounds down
  assert np.all(np.isnan(raw[1:]))
  np.testing.assert_array_equal(
      np.asarray(_round(jnp.asarray(x), fmt=fmts.FP8_E4M3)),
      np.array([448.0, 448.0, 448.0, -448.0], np.float32))


def test_raw_e5m2_cast_overflows_to_inf():
  x = np.array([1e6, -1e6], np.float32)
  raw = x.astype(ml_dtypes.float8_e5m2).astype(np.float32)
  np.testing.assert_array_equal(raw, np.array([np.inf, -np.inf], np.float32))
  np.testing.assert_array_equal(
      np.asarray(_round(jnp.asarray(x), fmt=fmts.FP8_E5M2)),
      np.array([57344.0, -57344.0], np.float32))


def test_raw_float4_cast_turns_nan_into_negative_zero():
  x = np.array([np.nan, np.inf, 100.0], np.float32)
  raw = x.astype(ml_dtypes.float4_e2m1fn).astype(np.float32)
  assert raw[0] == 0.0 and np.signbit(raw[0])  # NaN -> -0: silently finite
  np.testing.assert_array_equal(raw[1:], [6.0, 6.0])  # float4 saturates, even Inf
  # jnp's cast does the same.
  raw_jnp = np.asarray(jnp.asarray(x).astype(jnp.float4_e2m1fn).astype(jnp.float32))
  chex.assert_trees_all_equal(_bits32(raw_jnp), _bits32(raw))
  got = np.asarray(_round(jnp.asarray(x), fmt=fmts.FP4_E2M1))
  assert np.isnan(got[0])
  assert got[1] == np.inf and got[2] == 6.0


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize('rounding', rnd.ROUNDING_MODES)
def test_dtype_and_shape_are_kept(dtype, rounding):
  x = jnp.linspace(-8, 8, 24, dtype=jnp.float32).reshape(2, 3, 4).astype(dtype)
  got = _round(x, fmt=fmts.FP8_E4M3, rounding=rounding, key=jax.random.key(0))
  chex.assert_shape(got, x.shape)
  chex.assert_type(got, dtype)


def test_bf16_nearest_matches_ml_dtypes():
  x = jnp.linspace(-500, 500, 4001, dtype=jnp.float32).astype(jnp.bfloat16)
  got = _round(x, fmt=fmts.FP8_E4M3)
  expected = np.asarray(x).astype(np.float32).clip(-448, 448).astype(ml_dtypes.float8_e4m3fn)
  np.testing.assert_array_equal(np.asarray(got, np.float32), expected.astype(np.float32))


# ----------------------------------------------------------------------------
# Stochastic rounding.


def _equi_spaced_case(fmt: fmts.Format) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(x, lo, hi) with x = lo + (hi - lo)·j/N for several j in every chosen grid interval."""
  xs, los, his = [], [], []
  for lo, hi in _grid_pairs(fmt):
    for j in _EQUI_POSITIONS:
      xs.append(lo + (hi - lo) * j / _N_EQUI)
      los.append(lo)
      his.append(hi)
  # One width for every format, so eager op-by-op runs reuse their compiled ops.
  assert len(xs) <= _EQUI_WIDTH
  x, los, his = (np.resize(np.array(a, np.float64), _EQUI_WIDTH) for a in (xs, los, his))
  assert np.all(x.astype(np.float32).astype(np.float64) == x), 'test points must be exact in f32'
  return x.astype(np.float32), los, his


class StochasticRoundingTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[(n, n) for n in sorted(_SR_FORMATS)])
  def test_exactly_unbiased_with_equi_spaced_noise(self, name):
    fmt = _SR_FORMATS[name]
    x, _, _ = _equi_spaced_case(fmt)
    u = (np.arange(_N_EQUI, dtype=np.float32) + 0.5) / _N_EQUI
    xb = jnp.broadcast_to(jnp.asarray(x), (_N_EQUI, x.size))
    ub = jnp.broadcast_to(jnp.asarray(u)[:, None], (_N_EQUI, x.size))
    fn = functools.partial(rnd.round_to_format, fmt=fmt, rounding='stochastic')
    q = np.asarray(self.variant(fn)(xb, u=ub), np.float64)
    # Every quantity is dyadic, so the float64 mean is exact: no tolerance.
    np.testing.assert_array_equal(q.mean(axis=0), x.astype(np.float64))

  @parameterized.named_parameters(*[(n, n) for n in sorted(_SR_FORMATS)])
  def test_only_rounds_to_the_two_grid_neighbours(self, name):
    fmt = _SR_FORMATS[name]
    v = fmt.values()
    rng = np.random.default_rng(sorted(_SR_FORMATS).index(name))
    positive = v[v > 0]
    x = _random_in_range(rng, 1.25 * v[-1], positive[0] / 8, 8192)  # some beyond the max
    x = np.concatenate([x, v.astype(np.float32)])
    u = rng.uniform(0, 1, x.size).astype(np.float32)
    q = np.asarray(_round(jnp.asarray(x), fmt=fmt, rounding='stochastic', u=jnp.asarray(u)),
                   np.float64)
    lo, hi = _neighbours(v, x)
    bad = ~((q == lo) | (q == hi))
    assert not bad.any(), (x[bad][:5], q[bad][:5], lo[bad][:5], hi[bad][:5])
    # Both neighbours do occur (the rule is not secretly deterministic).
    strictly_inside = lo != hi
    assert np.any(q[strictly_inside] == lo[strictly_inside])
    assert np.any(q[strictly_inside] == hi[strictly_inside])

  @parameterized.named_parameters(
      ('int4', fmts.INT4, 2.3),
      ('e4m3', fmts.FP8_E4M3, 3.3),
      ('e2m1', fmts.FP4_E2M1, -4.5),
      ('log2_fp4', fmts.LOG2_FP4, 40.0),
      ('log4_fp4', fmts.LOG4_FP4, 0.3),
      ('log4_fp4_underflow', fmts.LOG4_FP4, -0.005),
      ('fixed8', fmts.fixed_point(8), 100.75),
  )
  def test_probability_of_rounding_up_matches_binomial_bound(self, fmt, x):
    n = 50_000
    xs = jnp.full((n,), x, jnp.float32)
    q = np.asarray(_round(xs, fmt=fmt, rounding='stochastic', key=jax.random.key(17)),
                   np.float64)
    lo, hi = (float(a[0]) for a in _neighbours(fmt.values(), np.array([np.float32(x)])))
    assert lo < float(np.float32(x)) < hi
    p = (float(np.float32(x)) - lo) / (hi - lo)
    assert set(np.unique(q)) <= {lo, hi}
    p_hat = float(np.mean(q == hi))
    # Binomial(n, p)/n has standard deviation sqrt(p(1-p)/n).
    bound = _K_SIGMA * math.sqrt(p * (1 - p) / n)
    assert abs(p_hat - p) <= bound, (p_hat, p, bound)

  def test_same_key_same_result_other_stream_differs(self):
    x = jnp.linspace(-7, 7, 4096, dtype=jnp.float32) + 0.37
    key = jax.random.key(3)
    a = _round(x, fmt=fmts.INT4, rounding='stochastic', key=key)
    b = _round(x, fmt=fmts.INT4, rounding='stochastic', key=jax.random.key(3))
    c = _round(x, fmt=fmts.INT4, rounding='stochastic', key=key, stream=1)
    chex.assert_trees_all_equal(a, b)
    assert np.any(np.asarray(a) != np.asarray(c))

  @chex.variants(with_jit=True, without_jit=True)
  def test_round_stochastic_resolution(self):
    # u < frac(x): u = 0 always rounds up a non-integer; u -> 1 never does.
    x = jnp.array([0.25, -0.25, 1.0, 2.75], jnp.float32)
    up = self.variant(rnd.round_stochastic)(x, jnp.zeros(4, jnp.float32))
    down = self.variant(rnd.round_stochastic)(x, jnp.full(4, 1 - 2**-24, jnp.float32))
    chex.assert_trees_all_equal(up, jnp.array([1.0, 0.0, 1.0, 3.0]))
    chex.assert_trees_all_equal(down, jnp.array([0.0, -1.0, 1.0, 2.0]))


def test_stochastic_underflow_function():
  n = 40_000
  threshold = 0.5
  p = 0.3
  x = jnp.full((n,), -p * threshold, jnp.float32)
  u = jax.random.uniform(jax.random.key(5), (n,))
  y = np.asarray(jax.jit(rnd.stochastic_underflow)(x, threshold, u))
  assert set(np.unique(y)) <= {0.0, -threshold}
  p_hat = float(np.mean(y == -threshold))
  assert abs(p_hat - p) <= _K_SIGMA * math.sqrt(p * (1 - p) / n)
  # At or above the threshold values pass unchanged.
  big = jnp.array([0.5, -0.7, 3.0], jnp.float32)
  chex.assert_trees_all_equal(rnd.stochastic_underflow(big, threshold, jnp.zeros(3)), big)


# ----------------------------------------------------------------------------
# round_log.


def _nearest_log(x, radix, lo_k, hi_k, shift=0):
  return _round_log(jnp.asarray(x, jnp.float32), radix=radix, min_exponent=lo_k,
                    max_exponent=hi_k, shift=shift)


@pytest.mark.parametrize('n', range(-2, 4))
def test_radix4_nearest_switches_at_linear_midpoint(n):
  mid = np.float32(0.625 * 4.0**n)  # (4^(n-1) + 4^n) / 2
  below, above = np.nextafter(mid, np.float32(0)), np.nextafter(mid, np.float32(np.inf))
  geometric = np.float32(0.5 * 4.0**n)  # the wrong midpoint 4^(n-1/2) rounds down
  x = np.array([below, above, -below, -above, geometric], np.float32)
  got = np.asarray(_nearest_log(x, 4, -3, 3))
  lo, hi = 4.0**(n - 1), 4.0**n
  np.testing.assert_array_equal(got, np.array([lo, hi, -lo, -hi, lo], np.float32))
  # The tie itself goes to the even exponent.
  tie = float(_nearest_log(mid, 4, -3, 3))
  assert tie == (hi if n % 2 == 0 else lo)


@pytest.mark.parametrize('n', range(0, 7))
def test_radix2_nearest_switches_at_linear_midpoint(n):
  mid = np.float32(1.5 * 2.0**n)  # (2^n + 2^(n+1)) / 2
  below, above = np.nextafter(mid, np.float32(0)), np.nextafter(mid, np.float32(np.inf))
  got = np.asarray(_nearest_log(np.array([below, above], np.float32), 2, 0, 7))
  np.testing.assert_array_equal(got, np.array([2.0**n, 2.0**(n + 1)], np.float32))
  tie = float(_nearest_log(mid, 2, 0, 7))
  assert tie == (2.0**(n + 1) if (n + 1) % 2 == 0 else 2.0**n)


@pytest.mark.parametrize('n', range(-2, 4))
def test_shifted_radix4_grid_switches_at_its_linear_midpoint(n):
  lo, hi = 2 * 4.0**(n - 1), 2 * 4.0**n
  mid = np.float32((lo + hi) / 2)  # 1.25·4^n
  below, above = np.nextafter(mid, np.float32(0)), np.nextafter(mid, np.float32(np.inf))
  got = np.asarray(_nearest_log(np.array([below, above], np.float32), 4, -3, 3, shift=1))
  np.testing.assert_array_equal(got, np.array([lo, hi], np.float32))


def test_round_log_underflow_and_saturation_nearest():
  bottom = 4.0**-3
  x = np.array([0.0, bottom * 0.49, bottom * 0.5, bottom * 0.51, 64.0, 200.0, 1e30, -1e30],
               np.float32)
  got = np.asarray(_nearest_log(x, 4, -3, 3))
  np.testing.assert_array_equal(
      got, np.array([0.0, 0.0, 0.0, bottom, 64.0, 64.0, 64.0, -64.0], np.float32))


@pytest.mark.parametrize('radix, lo_k, p', [(2, 0, 0.3), (4, -3, 0.05), (4, -3, 0.8)])
def test_round_log_stochastic_underflow_probability(radix, lo_k, p):
  n = 40_000
  bottom = float(radix)**lo_k
  x = jnp.full((n,), p * bottom, jnp.float32)
  u = jax.random.uniform(jax.random.key(11), (n,))
  got = np.asarray(_round_log(x, radix=radix, min_exponent=lo_k, max_exponent=lo_k + 6,
                              rounding='stochastic', u=u))
  assert set(np.unique(got)) <= {0.0, bottom}
  p_hat = float(np.mean(got == bottom))
  assert abs(p_hat - p) <= _K_SIGMA * math.sqrt(p * (1 - p) / n), (p_hat, p)


def test_round_to_format_stochastic_underflow_from_key():
  n = 40_000
  p = 0.25
  x = jnp.full((n,), -p, jnp.float32)  # below LUQ's smallest level 1
  got = np.asarray(_round(x, fmt=fmts.LOG2_FP4, rounding='stochastic', key=jax.random.key(2)))
  assert set(np.unique(got)) <= {0.0, -1.0}
  p_hat = float(np.mean(got == -1.0))
  assert abs(p_hat - p) <= _K_SIGMA * math.sqrt(p * (1 - p) / n)


def test_unsigned_log_clamps_negative_finite_values_to_zero():
  x = jnp.array([-0.5, -1e-6, 0.25, 2.0], jnp.float32)
  got = _round(x, fmt=fmts.ULOG2_4)
  chex.assert_trees_all_equal(np.abs(np.asarray(got)), np.array([0.0, 0.0, 0.25, 1.0], np.float32))


# ----------------------------------------------------------------------------
# Bad input.


def test_stochastic_without_key_names_key():
  with pytest.raises(ValueError, match=r'\bkey\b'):
    rnd.round_to_format(jnp.ones(3), fmts.INT4, 'stochastic')


@pytest.mark.parametrize('dtype', [jnp.int32, jnp.int8, jnp.uint8, jnp.bool_])
def test_integer_input_raises_type_error(dtype):
  with pytest.raises(TypeError, match=r'\bx\b'):
    rnd.round_to_format(jnp.ones(3, dtype), fmts.INT4)


def test_unknown_rounding_names_rounding():
  with pytest.raises(ValueError, match=r'\brounding\b'):
    rnd.round_to_format(jnp.ones(3), fmts.INT4, 'up')
  with pytest.raises(ValueError, match=r'\brounding\b'):
    rnd.check_rounding('truncate')


def test_unknown_format_names_fmt():
  with pytest.raises(TypeError, match=r'\bfmt\b'):
    rnd.round_to_format(jnp.ones(3), 'int4')
