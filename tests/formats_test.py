"""Tests for qtrain.formats: exhaustive bit tables against ml_dtypes, grids, validation."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from qtrain import formats as fmts

# (format, ml_dtypes type, number of bits in a pattern).
_MINIFLOATS = {
    'e4m3': (fmts.FP8_E4M3, ml_dtypes.float8_e4m3fn, 8),
    'e5m2': (fmts.FP8_E5M2, ml_dtypes.float8_e5m2, 8),
    'e2m1': (fmts.FP4_E2M1, ml_dtypes.float4_e2m1fn, 4),
}


def _ml_dtypes_table(dtype, bits: int) -> np.ndarray:
  """Value of every bit pattern 0..2^bits-1 according to ml_dtypes (float64).

  ml_dtypes stores float4_e2m1fn one value per byte, in the low nibble, so a
  uint8 array of the patterns 0..15 views as float4 directly.
  """
  patterns = np.arange(2**bits, dtype=np.uint8)
  return patterns.view(dtype).astype(np.float64)


def _same_values(a: np.ndarray, b: np.ndarray) -> bool:
  """Element-wise equal including NaN == NaN and the sign of zero."""
  both_nan = np.isnan(a) & np.isnan(b)
  equal = (a == b) & (np.signbit(a) == np.signbit(b))
  return bool(np.all(both_nan | equal))


# ----------------------------------------------------------------------------
# Minifloats.


@pytest.mark.parametrize('name', sorted(_MINIFLOATS))
def test_decode_matches_ml_dtypes_bit_pattern_by_bit_pattern(name):
  fmt, dtype, bits = _MINIFLOATS[name]
  assert fmt.bits == bits
  expected = _ml_dtypes_table(dtype, bits)
  for pattern in range(2**bits):
    got = fmt.decode(pattern)
    want = expected[pattern]
    assert _same_values(np.float64(got), want), (
        f'{name}: pattern {pattern:#0{bits // 4 + 2}x} decodes to {got}, ml_dtypes says {want}')


@pytest.mark.parametrize('name', sorted(_MINIFLOATS))
def test_nan_and_inf_patterns_match_ml_dtypes(name):
  fmt, dtype, bits = _MINIFLOATS[name]
  expected = _ml_dtypes_table(dtype, bits)
  decoded = np.array([fmt.decode(p) for p in range(2**bits)])
  np.testing.assert_array_equal(np.isnan(decoded), np.isnan(expected))
  np.testing.assert_array_equal(np.isinf(decoded), np.isinf(expected))


def test_special_pattern_counts():
  # e4m3fn: only S.1111.111 is NaN, no Inf. e5m2: IEEE (2 Inf, 6 NaN). e2m1: all finite.
  counts = {}
  for name, (fmt, _, bits) in _MINIFLOATS.items():
    decoded = np.array([fmt.decode(p) for p in range(2**bits)])
    counts[name] = (int(np.isnan(decoded).sum()), int(np.isinf(decoded).sum()))
  assert counts == {'e4m3': (2, 0), 'e5m2': (6, 2), 'e2m1': (0, 0)}


@pytest.mark.parametrize('name', sorted(_MINIFLOATS))
def test_values_are_the_finite_ml_dtypes_values(name):
  fmt, dtype, bits = _MINIFLOATS[name]
  table = _ml_dtypes_table(dtype, bits)
  expected = np.unique(table[np.isfinite(table)])  # +0 and -0 collapse to one value
  values = fmt.values()
  chex.assert_type(values, np.float64)
  assert np.all(np.diff(values) > 0), 'values() must be sorted and unique'
  np.testing.assert_array_equal(values, expected)


@pytest.mark.parametrize('name', sorted(_MINIFLOATS))
def test_max_value_is_ml_dtypes_finfo_max(name):
  fmt, dtype, _ = _MINIFLOATS[name]
  assert fmt.max_value == float(ml_dtypes.finfo(dtype).max)
  assert fmt.absmax_target == fmt.max_value
  assert fmt.signed


@pytest.mark.parametrize('name', sorted(_MINIFLOATS))
def test_min_normal_and_subnormal_match_finfo(name):
  fmt, dtype, _ = _MINIFLOATS[name]
  info = ml_dtypes.finfo(dtype)
  assert 2.0**fmt.min_normal_exponent == float(info.smallest_normal)
  positive = fmt.values()[fmt.values() > 0]
  assert positive[0] == float(info.smallest_subnormal)


def test_minifloat_names_and_storage():
  assert (fmts.FP8_E4M3.name, fmts.FP8_E5M2.name, fmts.FP4_E2M1.name) == ('e4m3', 'e5m2', 'e2m1')
  assert str(fmts.FP8_E4M3) == 'e4m3'
  assert fmts.FloatFormat(exponent_bits=3, mantissa_bits=2).name == 'e3m2'
  assert fmts.FP8_E4M3.storage_dtype == np.dtype(ml_dtypes.float8_e4m3fn)
  assert fmts.FP8_E5M2.storage_dtype == np.dtype(ml_dtypes.float8_e5m2)
  # e2m1 has no 4-bit container dtype of its own: its codes ride in e4m3fn exactly.
  assert fmts.FP4_E2M1.storage_dtype == np.dtype(ml_dtypes.float8_e4m3fn)


def test_custom_bias_shifts_the_grid():
  default = fmts.FloatFormat(exponent_bits=4, mantissa_bits=3, nan_code=True)
  shifted = fmts.FloatFormat(exponent_bits=4, mantissa_bits=3, nan_code=True, bias=8)
  assert default.exponent_bias == 7 and shifted.exponent_bias == 8
  np.testing.assert_array_equal(shifted.values(), default.values() / 2)


# ----------------------------------------------------------------------------
# Integers.

_INT_CASES = [(bits, signed, narrow) for bits in range(2, 9) for signed in (True, False)
              for narrow in (False, True)]


@pytest.mark.parametrize('bits, signed, narrow', _INT_CASES)
def test_int_format_grid(bits, signed, narrow):
  fmt = fmts.int_format(bits, signed=signed, narrow=narrow)
  assert fmt == fmts.IntFormat(bits=bits, signed=signed, narrow=narrow)
  if signed:
    qmin = -(2**(bits - 1)) + (1 if narrow else 0)
    qmax = 2**(bits - 1) - 1
  else:  # `narrow` is ignored for unsigned formats
    qmin, qmax = 0, 2**bits - 1
  assert (fmt.qmin, fmt.qmax) == (qmin, qmax)
  np.testing.assert_array_equal(fmt.values(), np.arange(qmin, qmax + 1, dtype=np.float64))
  assert fmt.max_value == max(-qmin, qmax)
  assert fmt.absmax_target == (min(-qmin, qmax) if signed else qmax)
  assert fmt.signed == signed
  assert fmt.bits == bits


@pytest.mark.parametrize('bits, signed, narrow', _INT_CASES)
def test_int_format_storage_dtype_is_one_byte_integer(bits, signed, narrow):
  fmt = fmts.int_format(bits, signed=signed, narrow=narrow)
  dtype = fmt.storage_dtype
  assert dtype in (np.dtype(np.int8), np.dtype(np.uint8))
  info = np.iinfo(dtype)
  assert info.min <= fmt.qmin and fmt.qmax <= info.max
  if signed:
    assert dtype == np.int8
  if not signed and bits == 8:
    assert dtype == np.uint8


def test_int_names():
  assert [f.name for f in (fmts.INT2, fmts.INT3, fmts.INT4, fmts.INT8, fmts.UINT4, fmts.UINT8)] == [
      'int2', 'int3', 'int4', 'int8', 'uint4', 'uint8']
  assert fmts.IntFormat(bits=4, narrow=True).name == 'int4n'
  assert fmts.IntFormat(bits=4, signed=False, narrow=True).name == 'uint4'


def test_int_absmax_target_never_clips():
  # Full-range int4 reaches -8 only by clipping, so absmax maps max|x| to 7.
  assert fmts.INT4.max_value == 8 and fmts.INT4.absmax_target == 7
  assert fmts.UINT8.absmax_target == 255


# ----------------------------------------------------------------------------
# Log formats.


def _log_grid(magnitudes, signed=True):
  mags = sorted(float(m) for m in magnitudes)
  neg = [-m for m in reversed(mags)] if signed else []
  return np.array(neg + [0.0] + mags)


@pytest.mark.parametrize('name, fmt, expected, bits, storage', [
    ('log2_fp4', fmts.LOG2_FP4, _log_grid(2.0**k for k in range(0, 8)), 5,
     ml_dtypes.float8_e4m3fn),
    ('log4_fp4', fmts.LOG4_FP4, _log_grid(4.0**k for k in range(-3, 4)), 4,
     ml_dtypes.float8_e4m3fn),
    ('log4_fp4_odd', fmts.LOG4_FP4_ODD, _log_grid(2 * 4.0**k for k in range(-3, 4)), 4,
     ml_dtypes.float8_e4m3fn),
    ('ulog2_4', fmts.ULOG2_4, _log_grid((2.0**k for k in range(-15, 1)), signed=False), 5,
     ml_dtypes.float8_e5m2),
])
def test_log_format_grid(name, fmt, expected, bits, storage):
  assert fmt.name == name
  np.testing.assert_array_equal(fmt.values(), expected)
  # `bits` counts the sign and enough exponent codes for the magnitudes and zero.
  assert fmt.bits == bits
  assert fmt.storage_dtype == np.dtype(storage)
  assert fmt.signed == (expected[0] < 0)
  assert fmt.max_value == expected[-1]


def test_log_absmax_target_ignores_shift():
  # TPR's odd phase shares the even phase's scale: same target, grid shifted by 2.
  assert fmts.LOG4_FP4.absmax_target == fmts.LOG4_FP4_ODD.absmax_target == 64.0
  assert fmts.LOG2_FP4.absmax_target == 128.0
  assert fmts.ULOG2_4.absmax_target == 1.0


def test_log_default_names():
  assert fmts.LogFormat(radix=2, min_exponent=0, max_exponent=6).name == 'log2[0,6]'
  assert fmts.LogFormat(radix=4, min_exponent=-1, max_exponent=1, shift=1).name == 'log4[-1,1]<<1'
  assert fmts.LogFormat(radix=2, min_exponent=-3, max_exponent=0,
                        signed_values=False).name == 'ulog2[-3,0]'


def test_strict_4bit_luq_variant():
  # papers-1-4.md §1f pitfall 2: magnitudes 2^0..2^6 plus zero fit sign + 3 bits.
  fmt = fmts.LogFormat(radix=2, min_exponent=0, max_exponent=6)
  assert fmt.bits == 4
  assert fmt.values().size == 15


# ----------------------------------------------------------------------------
# Fixed point.


@pytest.mark.parametrize('bits, storage', [(2, np.int8), (4, np.int8), (8, np.int8),
                                           (12, np.int16), (16, np.int16)])
def test_fixed_point_grid(bits, storage):
  fmt = fmts.fixed_point(bits)
  qmax = 2**(bits - 1) - 1
  assert fmt == fmts.FixedPointFormat(bits=bits, fractional_bits=bits - 1)
  assert fmt.name == f'fixed{bits}.{bits - 1}'
  assert fmt.qmax == qmax and fmt.max_value == qmax
  assert fmt.step == 2.0**-(bits - 1)
  assert fmt.max_abs_real() == qmax * 2.0**-(bits - 1)
  np.testing.assert_array_equal(fmt.values(), np.arange(-qmax, qmax + 1, dtype=np.float64))
  assert fmt.storage_dtype == np.dtype(storage)
  assert fmt.signed
  assert fmt.int_format == fmts.IntFormat(bits=bits, narrow=True)


def test_fixed_point_explicit_fraction_and_wide():
  fmt = fmts.fixed_point(8, fractional_bits=4)
  assert fmt.step == 1 / 16 and fmt.max_abs_real() == 127 / 16
  wide = fmts.fixed_point(32)
  assert wide.storage_dtype == np.dtype(np.int32)
  assert wide.max_abs_real() == (2**31 - 1) * 2.0**-31
  assert wide.is_exact_in(np.int32)
  assert not wide.is_exact_in(np.int16)
  assert not wide.is_exact_in(np.float32)
  assert fmts.fixed_point(24).is_exact_in(np.float32)
  with pytest.raises(ValueError, match='fixed32.31'):
    wide.values()


# ----------------------------------------------------------------------------
# is_exact_in.


@pytest.mark.parametrize('fmt, dtype, exact', [
    (fmts.INT4, ml_dtypes.float8_e4m3fn, True),
    (fmts.INT8, ml_dtypes.float8_e4m3fn, False),  # 17 needs 4 mantissa bits
    (fmts.INT8, jnp.bfloat16, True),
    (fmts.INT8, np.int8, True),
    (fmts.UINT8, np.int8, False),
    (fmts.UINT8, np.uint8, True),
    (fmts.INT8, np.uint8, False),
    (fmts.IntFormat(bits=16), jnp.bfloat16, False),
    (fmts.LOG2_FP4, ml_dtypes.float8_e4m3fn, True),
    (fmts.LOG2_FP4, np.int8, False),  # 128
    (fmts.LOG4_FP4, ml_dtypes.float8_e4m3fn, True),
    (fmts.LOG4_FP4_ODD, ml_dtypes.float8_e4m3fn, True),
    (fmts.LOG4_FP4, np.int8, False),  # 1/64
    (fmts.ULOG2_4, ml_dtypes.float8_e4m3fn, False),  # 2^-15 below e4m3's 2^-9
    (fmts.ULOG2_4, ml_dtypes.float8_e5m2, True),
    (fmts.FP4_E2M1, ml_dtypes.float8_e4m3fn, True),
    (fmts.FP4_E2M1, ml_dtypes.float8_e5m2, True),
    (fmts.FP4_E2M1, np.int8, False),  # 0.5
    (fmts.FP8_E5M2, ml_dtypes.float8_e4m3fn, False),
    (fmts.FP8_E4M3, ml_dtypes.float8_e5m2, False),
    (fmts.FP8_E4M3, jnp.bfloat16, True),
    (fmts.FP8_E5M2, np.float16, True),
])
def test_is_exact_in(fmt, dtype, exact):
  assert fmt.is_exact_in(dtype) == exact
  # Cross-check by brute force on the value table.
  v = fmt.values()
  if np.issubdtype(np.dtype(dtype), np.integer):
    info = np.iinfo(dtype)
    brute = bool(np.all(v == np.round(v)) and v.min() >= info.min and v.max() <= info.max)
  else:
    with np.errstate(over='ignore', invalid='ignore'):
      brute = bool(np.all(v.astype(dtype).astype(np.float64) == v))
  assert brute == exact


@pytest.mark.parametrize('fmt', [
    fmts.INT2, fmts.INT4, fmts.INT8, fmts.UINT4, fmts.UINT8, fmts.FP8_E4M3, fmts.FP8_E5M2,
    fmts.FP4_E2M1, fmts.LOG2_FP4, fmts.LOG4_FP4, fmts.LOG4_FP4_ODD, fmts.ULOG2_4,
    fmts.fixed_point(8), fmts.fixed_point(16)], ids=str)
def test_storage_dtype_holds_every_value_exactly(fmt):
  dtype = fmt.storage_dtype
  assert fmt.is_exact_in(dtype)
  values = fmt.values()
  np.testing.assert_array_equal(values.astype(dtype).astype(np.float64), values)


# ----------------------------------------------------------------------------
# Hashability and immutability.


_ALL = (fmts.INT4, fmts.INT8, fmts.UINT8, fmts.FP8_E4M3, fmts.FP8_E5M2, fmts.FP4_E2M1,
        fmts.LOG2_FP4, fmts.LOG4_FP4, fmts.LOG4_FP4_ODD, fmts.ULOG2_4, fmts.fixed_point(8))


def test_formats_are_hashable_and_equal_by_value():
  table = {fmt: fmt.name for fmt in _ALL}
  assert len(table) == len(_ALL)
  assert table[fmts.IntFormat(bits=4)] == 'int4'
  assert table[fmts.LogFormat(radix=2, min_exponent=0, max_exponent=7,
                              label='log2_fp4')] == 'log2_fp4'
  assert hash(fmts.fixed_point(8)) == hash(fmts.FixedPointFormat(bits=8, fractional_bits=7))
  assert fmts.IntFormat(bits=4) != fmts.IntFormat(bits=4, narrow=True)


def test_formats_are_frozen():
  with pytest.raises(AttributeError):
    fmts.INT4.bits = 8  # pytype: disable=not-writable


def test_formats_as_jit_static_arguments():
  traces = []

  def fn(x, fmt):
    traces.append(fmt)
    return x * fmt.max_value

  jitted = jax.jit(fn, static_argnames='fmt')
  x = jnp.ones(3)
  for fmt in _ALL:
    chex.assert_trees_all_equal(jitted(x, fmt=fmt), x * fmt.max_value)
  # An equal but distinct instance hits the cache: no retrace.
  n = len(traces)
  jitted(x, fmt=fmts.IntFormat(bits=4))
  assert len(traces) == n


# ----------------------------------------------------------------------------
# Bad arguments.


@pytest.mark.parametrize('make, error, name', [
    (lambda: fmts.IntFormat(bits=1), ValueError, 'bits'),
    (lambda: fmts.IntFormat(bits=17), ValueError, 'bits'),
    (lambda: fmts.IntFormat(bits=4.0), TypeError, 'bits'),
    (lambda: fmts.IntFormat(bits=True), TypeError, 'bits'),
    (lambda: fmts.int_format(0), ValueError, 'bits'),
    (lambda: fmts.FloatFormat(exponent_bits=0, mantissa_bits=3), ValueError, 'exponent_bits'),
    (lambda: fmts.FloatFormat(exponent_bits=9, mantissa_bits=3), ValueError, 'exponent_bits'),
    (lambda: fmts.FloatFormat(exponent_bits=4, mantissa_bits=-1), ValueError, 'mantissa_bits'),
    (lambda: fmts.FloatFormat(exponent_bits=4, mantissa_bits=11), ValueError, 'mantissa_bits'),
    (lambda: fmts.FloatFormat(exponent_bits='4', mantissa_bits=3), TypeError, 'exponent_bits'),
    (lambda: fmts.LogFormat(radix=3, min_exponent=0, max_exponent=7), ValueError, 'radix'),
    (lambda: fmts.LogFormat(radix=8, min_exponent=0, max_exponent=7), ValueError, 'radix'),
    (lambda: fmts.LogFormat(radix=2, min_exponent=3, max_exponent=2), ValueError, 'max_exponent'),
    (lambda: fmts.LogFormat(radix=2, min_exponent=-127, max_exponent=2), ValueError,
     'min_exponent'),
    (lambda: fmts.LogFormat(radix=2, min_exponent=0.5, max_exponent=2), TypeError,
     'min_exponent'),
    (lambda: fmts.FixedPointFormat(bits=1, fractional_bits=0), ValueError, 'bits'),
    (lambda: fmts.FixedPointFormat(bits=33, fractional_bits=0), ValueError, 'bits'),
    (lambda: fmts.FixedPointFormat(bits=8, fractional_bits=65), ValueError, 'fractional_bits'),
    (lambda: fmts.fixed_point(8, fractional_bits=1.5), TypeError, 'fractional_bits'),
])
def test_bad_arguments_name_the_argument(make, error, name):
  with pytest.raises(error, match=rf'\b{name}\b'):
    make()


def test_positional_arguments_are_rejected():
  # kw_only dataclasses: a positional bits=4 would be ambiguous between fields.
  with pytest.raises(TypeError):
    fmts.IntFormat(4)  # pylint: disable=too-many-function-args


def test_format_is_abstract():
  with pytest.raises(TypeError):
    fmts.Format()  # pylint: disable=abstract-class-instantiated


def test_values_are_finite_and_sorted_for_every_format():
  for fmt in _ALL:
    v = fmt.values()
    assert np.all(np.isfinite(v)), fmt
    assert np.all(np.diff(v) > 0), fmt
    assert 0.0 in v, fmt
    assert math.isclose(fmt.max_value, float(np.max(np.abs(v))))
