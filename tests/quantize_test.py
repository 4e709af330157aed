"""Tests for qtrain.quantize and QArray: round trips, storage, pytrees, policies, STE, packing."""

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

import qtrain
from qtrain import formats as fmts
from qtrain import scaling
from qtrain.config import TensorConfig
from qtrain.qarray import QArray

_EPS32 = float(np.finfo(np.float32).eps)
# Tests that are not about jit-vs-eager run jitted: one compile instead of one per op.
_quantize = jax.jit(qtrain.quantize, static_argnames=('config', 'stream'))
_fake_quant = jax.jit(qtrain.fake_quant, static_argnames=('config', 'ste'))
# Statistical bounds are this many standard deviations wide (normal tail < 6e-7).
_K_SIGMA = 5.0


def _x(seed: int = 0, shape=(16, 32), dtype=jnp.float32) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _rtn_bound(x, full_scale) -> np.ndarray:
  """Half a step, plus a few float32 ulps of x for the division and the multiplication."""
  return np.asarray(full_scale, np.float64) / 2 + 4 * _EPS32 * np.abs(np.asarray(x, np.float64))


_GRANULARITIES = {
    'tensor': scaling.PerTensor(),
    'rows': scaling.PerChannel(axes=(0,)),
    'cols': scaling.PerChannel(axes=(-1,)),
    'block8': scaling.PerBlock(block_size=8),
    'block4_axis0': scaling.PerBlock(block_size=4, axis=0),
}

_INT_CONFIGS = {
    'int8': (fmts.INT8, scaling.AbsMax()),
    'int8n': (fmts.IntFormat(bits=8, narrow=True), scaling.AbsMax()),
    'int4': (fmts.INT4, scaling.AbsMax()),
    'int2': (fmts.INT2, scaling.AbsMax()),
    'uint8_minmax': (fmts.UINT8, scaling.MinMax()),
    'uint4_minmax': (fmts.UINT4, scaling.MinMax()),
}


class RoundTripTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      *[(f'{f}_tensor', f, 'tensor') for f in sorted(_INT_CONFIGS)],
      *[(f'{f}_{g}', f, g) for f in ('int4', 'uint8_minmax')
        for g in sorted(_GRANULARITIES) if g != 'tensor'])
  def test_rtn_int_round_trip_error_is_at_most_half_a_step(self, fmt_name, gran_name):
    fmt, calibration = _INT_CONFIGS[fmt_name]
    granularity = _GRANULARITIES[gran_name]
    cfg = TensorConfig(format=fmt, calibration=calibration, granularity=granularity)
    x = _x(1)
    q = self.variant(functools.partial(qtrain.quantize, config=cfg))(x)
    chex.assert_type(q.codes, fmt.storage_dtype)
    chex.assert_shape(q.codes, x.shape)
    codes = np.asarray(q.codes, np.float64)
    assert np.all((codes >= fmt.qmin) & (codes <= fmt.qmax))
    y = self.variant(qtrain.dequantize)(q)
    full_scale = scaling.expand_scale(q.scale, x.shape, granularity)
    err = np.abs(np.asarray(y, np.float64) - np.asarray(x, np.float64))
    assert np.all(err <= _rtn_bound(x, full_scale)), float(np.max(err / full_scale))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('e4m3', fmts.FP8_E4M3, ml_dtypes.float8_e4m3fn),
                                  ('e5m2', fmts.FP8_E5M2, ml_dtypes.float8_e5m2),
                                  ('e2m1', fmts.FP4_E2M1, ml_dtypes.float4_e2m1fn))
  def test_minifloat_codes_match_the_ml_dtypes_reference(self, fmt, dtype):
    # Plain reference: divide by the scale in float32, cast with ml_dtypes.
    x = _x(2, (8, 64)) * 3
    cfg = TensorConfig(format=fmt, granularity=scaling.PerChannel(axes=(0,)))
    q = self.variant(functools.partial(qtrain.quantize, config=cfg))(x)
    units = np.asarray(x, np.float32) / np.asarray(q.scale, np.float32)
    expected = units.astype(dtype).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(q.codes, np.float32), expected)
    np.testing.assert_array_equal(
        np.asarray(self.variant(qtrain.dequantize)(q)),
        (expected * np.asarray(q.scale, np.float32)).astype(np.float32))

  @chex.variants(with_jit=True, without_jit=True)
  def test_docstring_example(self):
    q = self.variant(functools.partial(qtrain.quantize, config=fmts.INT8))(
        jnp.array([0.5, -1.0, 0.25]))
    assert q.codes.dtype == np.int8
    assert q.codes.tolist() == [64, -127, 32]

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('f32', jnp.float32), ('bf16', jnp.bfloat16),
                                  ('f16', jnp.float16))
  def test_input_dtype_is_kept(self, dtype):
    x = _x(3, dtype=dtype)
    q = self.variant(functools.partial(qtrain.quantize, config=fmts.INT8))(x)
    assert q.dtype == np.dtype(dtype)
    chex.assert_type(q.scale, jnp.float32)
    y = self.variant(qtrain.dequantize)(q)
    chex.assert_type(y, dtype)
    fq = self.variant(functools.partial(qtrain.fake_quant, config=fmts.INT8))(x)
    chex.assert_type(fq, dtype)
    # bf16 round trip: the f32 result rounded once to the input dtype.
    q32 = qtrain.quantize(x.astype(jnp.float32), fmts.INT8)
    chex.assert_trees_all_equal(y, q32.dequantize().astype(dtype))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('fixed8', fmts.fixed_point(8)), ('int8', fmts.INT8),
                                  ('e4m3', fmts.FP8_E4M3))
  def test_fake_quant_bf16_saturated_values_are_exactly_on_the_grid(self, fmt):
    # Regression: `x + sg(y - x)` is not y in bf16 when |y| << |x| (saturation).
    x = jnp.array([3.0, -5.0, 0.3, 1.7, 100.0], jnp.bfloat16)
    scale = jnp.float32(2.0**-7) if fmt != fmts.FP8_E4M3 else jnp.float32(2.0**-6)
    kwargs = dict(config=fmt) if isinstance(fmt, fmts.FixedPointFormat) else dict(
        config=fmt, scale=scale)
    got = self.variant(functools.partial(qtrain.fake_quant, **kwargs))(x)
    expected = qtrain.quantize(x, **kwargs).dequantize()
    chex.assert_trees_all_equal(got, expected)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('int8', fmts.INT8), ('e4m3', fmts.FP8_E4M3),
                                  ('log2', fmts.LOG2_FP4), ('fixed8', fmts.fixed_point(8)))
  def test_all_zero_tensor_quantizes_to_zeros(self, fmt):
    x = jnp.zeros((4, 8), jnp.float32)
    q = self.variant(functools.partial(qtrain.quantize, config=fmt))(x)
    chex.assert_tree_all_finite(q.scale)
    assert not np.any(np.asarray(q.codes, np.float32))
    chex.assert_trees_all_equal(q.dequantize(), x)
    chex.assert_trees_all_equal(
        self.variant(functools.partial(qtrain.fake_quant, config=fmt))(x), x)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*[(f'{b}_{r}', v, r) for b, v in (('nan', np.nan),
                                                                     ('inf', np.inf),
                                                                     ('neg_inf', -np.inf))
                                    for r in ('nearest', 'stochastic')])
  def test_non_finite_makes_its_whole_group_nan(self, bad, rounding):
    x = np.array(_x(4, (4, 8)))
    x[2, 5] = bad
    cfg = TensorConfig(format=fmts.INT8, rounding=rounding,
                       granularity=scaling.PerChannel(axes=(0,)))
    fn = functools.partial(qtrain.quantize, config=cfg)
    q = self.variant(fn)(jnp.asarray(x), key=jax.random.key(0))
    y = np.asarray(q.dequantize())
    assert np.all(np.isnan(y[2])), y[2]
    assert np.all(np.isfinite(np.delete(y, 2, axis=0)))
    assert np.isnan(float(q.scale[2, 0]))
    assert not np.any(np.asarray(q.codes[2]))  # codes of the bad group are 0, not garbage
    # Per tensor, the whole tensor is NaN.
    q_all = qtrain.quantize(jnp.asarray(x), fmts.INT8)
    assert np.all(np.isnan(np.asarray(q_all.dequantize())))


@pytest.mark.parametrize('granularity', [scaling.PerTensor(), scaling.PerChannel(axes=(0,))],
                         ids=['tensor', 'row'])
@pytest.mark.parametrize('jit', [False, True])
def test_nan_in_a_large_tensor_still_makes_its_group_nan(granularity, jit):
  # XLA:CPU's vectorised max reduction drops NaN in large tensors (a 128x512
  # tensor with one NaN has a finite jnp.max); the scale must still be NaN.
  x = np.random.default_rng(0).normal(size=(128, 512)).astype(np.float32)
  x[5, 7] = np.nan
  fn = functools.partial(qtrain.quantize, config=TensorConfig(format=fmts.INT8,
                                                              granularity=granularity))
  q = (jax.jit(fn) if jit else fn)(jnp.asarray(x))
  scale = np.asarray(q.scale).reshape(-1)
  if isinstance(granularity, scaling.PerTensor):
    assert np.isnan(scale).all()
  else:
    assert np.isnan(scale[5]) and np.isfinite(np.delete(scale, 5)).all()


@pytest.mark.parametrize('fmt, dtype', [
    (fmts.INT8, np.int8), (fmts.INT4, np.int8), (fmts.INT2, np.int8), (fmts.UINT8, np.uint8),
    (fmts.FP4_E2M1, ml_dtypes.float8_e4m3fn), (fmts.LOG2_FP4, ml_dtypes.float8_e4m3fn),
    (fmts.LOG4_FP4, ml_dtypes.float8_e4m3fn), (fmts.LOG4_FP4_ODD, ml_dtypes.float8_e4m3fn),
    (fmts.ULOG2_4, ml_dtypes.float8_e5m2), (fmts.FP8_E4M3, ml_dtypes.float8_e4m3fn),
    (fmts.FP8_E5M2, ml_dtypes.float8_e5m2), (fmts.fixed_point(8), np.int8),
    (fmts.fixed_point(12), np.int16),
], ids=str)
def test_codes_dtype_is_storage_dtype_and_codes_are_on_the_grid(fmt, dtype):
  x = _x(5) * 0.4
  if not fmt.signed:
    x = jnp.abs(x)
  assert fmt.storage_dtype == np.dtype(dtype)
  # Both roundings in one jitted function: one compile per format.
  both = jax.jit(lambda x, key: (
      qtrain.quantize(x, TensorConfig(format=fmt)),
      qtrain.quantize(x, TensorConfig(format=fmt, rounding='stochastic'), key=key)))
  for q in both(x, jax.random.key(1)):
    chex.assert_type(q.codes, dtype)
    codes = np.unique(np.asarray(q.codes, np.float64))
    assert np.all(np.isin(codes, fmt.values())), codes[~np.isin(codes, fmt.values())]


# ----------------------------------------------------------------------------
# QArray as a pytree.


def test_qarray_is_a_pytree():
  q = qtrain.quantize(_x(6), fmts.INT8)
  leaves, treedef = jax.tree.flatten(q)
  assert len(leaves) == 2  # codes, scale (zero_point None is an empty subtree)
  q2 = jax.tree.unflatten(treedef, leaves)
  assert isinstance(q2, QArray) and q2.format == fmts.INT8
  doubled = jax.tree.map(lambda a: a * 2, q)
  assert isinstance(doubled, QArray)
  chex.assert_trees_all_equal(doubled.scale, q.scale * 2)
  assert (doubled.format, doubled.granularity, doubled.dtype) == (q.format, q.granularity, q.dtype)
  qmm = qtrain.quantize(_x(6), TensorConfig(format=fmts.UINT8, calibration=scaling.MinMax()))
  assert len(jax.tree.leaves(qmm)) == 3  # codes, scale, zero_point


def test_qarray_goes_in_and_out_of_jit():
  cfg = TensorConfig(format=fmts.INT4, granularity=scaling.PerBlock(block_size=8))
  x = _x(7)
  q_jit = jax.jit(qtrain.quantize, static_argnames='config')(x, config=cfg)
  q = qtrain.quantize(x, cfg)
  assert isinstance(q_jit, QArray)
  assert q_jit.granularity == cfg.granularity and q_jit.format == fmts.INT4
  chex.assert_trees_all_equal(q_jit, q)
  identity = jax.jit(lambda q: q)(q)
  chex.assert_trees_all_equal(identity, q)
  chex.assert_trees_all_equal(jax.jit(qtrain.dequantize)(q), q.dequantize())
  assert q.shape == x.shape and q.ndim == 2


def test_qarray_under_vmap():
  xs = _x(8, (3, 4, 8))
  qs = jax.jit(jax.vmap(lambda x: qtrain.quantize(x, fmts.INT8)))(xs)
  chex.assert_shape(qs.scale, (3, 1, 1))
  for i in range(3):
    chex.assert_trees_all_equal(qs.codes[i], _quantize(xs[i], config=fmts.INT8).codes)


# ----------------------------------------------------------------------------
# Granularity.


def test_block_granularity():
  x = _x(9, (8, 32))
  g = scaling.PerBlock(block_size=8)
  q = _quantize(x, config=TensorConfig(format=fmts.INT8, granularity=g))
  chex.assert_shape(q.scale, (8, 4))
  blocks = np.abs(np.asarray(x)).reshape(8, 4, 8).max(axis=-1)
  chex.assert_trees_all_close(q.scale, jnp.asarray(blocks / 127), rtol=_EPS32)
  # The largest element of each block maps to ±127.
  codes = np.abs(np.asarray(q.codes, np.int32)).reshape(8, 4, 8)
  np.testing.assert_array_equal(codes.max(axis=-1), 127)


def test_explicit_scale_is_broadcast_to_the_group_shape():
  x = _x(10, (4, 8))
  q = qtrain.quantize(x, TensorConfig(format=fmts.INT8, granularity=scaling.PerChannel(axes=0)),
                      scale=jnp.float32(0.05))
  chex.assert_shape(q.scale, (4, 1))
  chex.assert_trees_all_equal(q.scale, jnp.full((4, 1), 0.05, jnp.float32))


def test_finite_values_overflowing_a_tiny_scale_saturate():
  # Regression: x / scale = inf made the group NaN although x was finite.
  x = jnp.array([1e10, -1e10, 1.0], jnp.float32)
  q = qtrain.quantize(x, fmts.INT8, scale=jnp.float32(1e-30))
  chex.assert_trees_all_equal(q.codes, jnp.array([127, -128, 127], jnp.int8))
  chex.assert_tree_all_finite(q.dequantize())
  big = jnp.array([3e38, -3e38, 0.5], jnp.float32)
  y = qtrain.fake_quant(big, fmts.fixed_point(8))
  chex.assert_trees_all_equal(y, jnp.array([127 / 128, -127 / 128, 0.5], jnp.float32))


# ----------------------------------------------------------------------------
# Empty arrays.


@pytest.mark.parametrize('shape', [(0,), (0, 4), (3, 0), (2, 0, 8)])
@pytest.mark.parametrize('cfg', [
    TensorConfig(format=fmts.INT8),
    TensorConfig(format=fmts.UINT8, calibration=scaling.MinMax()),
    TensorConfig(format=fmts.INT4, calibration=scaling.Sawb()),
    TensorConfig(format=fmts.LOG2_FP4, rounding='stochastic'),
    TensorConfig(format=fmts.fixed_point(8)),
    TensorConfig(format=fmts.FP8_E4M3, calibration=scaling.AbsMax(power_of_two=True)),
], ids=lambda c: f'{c.format}-{type(c.calibration).__name__}')
def test_empty_arrays(shape, cfg):
  x = jnp.zeros(shape, jnp.float32)
  key = jax.random.key(0)
  q = _quantize(x, config=cfg, key=key)
  chex.assert_shape(q.codes, shape)
  chex.assert_shape(q.dequantize(), shape)
  chex.assert_shape(_fake_quant(x, config=cfg, key=key), shape)
  g = jax.jit(jax.grad(lambda x: qtrain.fake_quant(x, cfg, key=key).sum()))(x)
  chex.assert_shape(g, shape)


# ----------------------------------------------------------------------------
# fake_quant: straight-through gradients.


@pytest.mark.parametrize('cfg', [
    TensorConfig(format=fmts.INT8),
    TensorConfig(format=fmts.INT4, calibration=scaling.Sawb()),
    TensorConfig(format=fmts.LOG2_FP4, rounding='stochastic'),
    TensorConfig(format=fmts.FP4_E2M1, granularity=scaling.PerChannel(axes=(0,))),
    TensorConfig(format=fmts.LOG2_FP4, rounding='stochastic', samples=3),
], ids=lambda c: f'{c.format}-{c.rounding}-{c.samples}')
def test_plain_ste_gradient_is_one(cfg):
  x = _x(11, (8, 16)) * 3
  g = jax.jit(jax.grad(lambda x: qtrain.fake_quant(x, cfg, key=jax.random.key(0)).sum()))(x)
  chex.assert_trees_all_equal(g, jnp.ones_like(x))


@pytest.mark.parametrize('fmt', [fmts.INT8, fmts.INT4, fmts.LOG2_FP4, fmts.FP4_E2M1], ids=str)
def test_clipped_ste_gradient_is_the_in_range_mask(fmt):
  x = jnp.linspace(-3, 3, 121, dtype=jnp.float32)
  scale = jnp.float32(2.0 / fmt.values()[-1])  # the top of the grid sits at x = 2

  def fq(x):
    return qtrain.fake_quant(x, fmt, scale=scale, ste='clipped')

  g = jax.jit(jax.grad(lambda x: jnp.sum(fq(x))))(x)
  units = np.asarray(x, np.float64) / float(scale)
  mask = (units >= fmt.values()[0]) & (units <= fmt.values()[-1])
  assert 0 < mask.sum() < mask.size
  chex.assert_trees_all_equal(g, jnp.asarray(mask, jnp.float32))
  # The cotangent is passed through, not replaced by ones.
  ct = jnp.arange(121, dtype=jnp.float32)
  vjp = jax.jit(lambda x, ct: jax.vjp(fq, x)[1](ct)[0])
  chex.assert_trees_all_equal(vjp(x, ct), ct * jnp.asarray(mask, jnp.float32))


def test_fake_quant_forward_equals_dequantize_quantize():
  for cfg in (TensorConfig(format=fmts.INT8), TensorConfig(format=fmts.FP8_E5M2),
              TensorConfig(format=fmts.LOG4_FP4, calibration=scaling.AbsMax(power_of_two=True))):
    x = _x(12) * 10
    chex.assert_trees_all_equal(_fake_quant(x, config=cfg),
                                _quantize(x, config=cfg).dequantize())


def test_lsq_fake_quant_routes_to_lsq():
  x = _x(13)
  cfg = TensorConfig(format=fmts.INT4, calibration=scaling.Lsq())
  step = jnp.float32(0.3)
  chex.assert_trees_all_equal(_fake_quant(x, config=cfg, scale=step),
                              jax.jit(scaling.lsq_fake_quant, static_argnums=2)(x, step,
                                                                                 fmts.INT4))
  g = jax.jit(jax.grad(lambda s: qtrain.fake_quant(x, cfg, scale=s).sum()))(step)
  assert float(g) != 0.0  # the step is learned


# ----------------------------------------------------------------------------
# Stochastic rounding through quantize, and SMP (samples > 1).


def _binomial_mean_moments(p: np.ndarray, samples: int, width: float):
  """Variance and 4th central moment of width · Binomial(samples, p) / samples."""
  q = 1 - p
  var = width**2 * p * q / samples
  mu4 = width**4 * samples * p * q * (1 + 3 * (samples - 2) * p * q) / samples**4
  return var, mu4


class SamplesTest(parameterized.TestCase):
  # Explicit scale 2^-4: x in code units has known neighbours lo, lo + 1.
  _STEP = 2.0**-4
  _N_KEYS = 2000

  def _draws(self, x, samples):
    cfg = TensorConfig(format=fmts.IntFormat(bits=8, narrow=True), rounding='stochastic',
                       samples=samples)
    keys = jax.random.split(jax.random.key(samples), self._N_KEYS)
    fn = jax.jit(jax.vmap(lambda k: qtrain.fake_quant(x, cfg, key=k,
                                                      scale=jnp.float32(self._STEP))))
    return np.asarray(fn(keys), np.float64)

  @parameterized.named_parameters(*[(f'samples{n}', n) for n in (1, 2, 4, 16)])
  def test_samples_average_is_unbiased_with_variance_over_samples(self, samples):
    rng = np.random.default_rng(14)
    units = rng.integers(-100, 100, 64) + rng.uniform(0.02, 0.98, 64)
    x = jnp.asarray(units * self._STEP, jnp.float32)
    xs = np.asarray(x, np.float64)
    lo = np.floor(xs / self._STEP) * self._STEP
    p = (xs - lo) / self._STEP
    y = self._draws(x, samples)
    # The average of `samples` draws lies on the lattice lo + step·j/samples.
    j = (y - lo) / self._STEP * samples
    np.testing.assert_array_equal(j, np.round(j))
    assert np.all((j >= 0) & (j <= samples))
    # Unbiased: per element, 5 sigma of the mean of N_KEYS averages.
    var, mu4 = _binomial_mean_moments(p, samples, self._STEP)
    n = self._N_KEYS
    err = np.abs(y.mean(axis=0) - xs)
    assert np.all(err <= _K_SIGMA * np.sqrt(var / n) + 4 * _EPS32 * np.abs(xs)), np.max(
        err / np.sqrt(var / n))
    # Variance shrinks as 1/samples: the summed sample variance matches the exact
    # sum of p(1-p)·step²/samples within 5 sigma of the sample-variance estimator
    # (Var(s²) = mu4/n - sigma⁴(n-3)/(n(n-1))).
    total = y.var(axis=0, ddof=1).sum()
    expected = var.sum()
    sd = math.sqrt(np.sum(mu4 / n - var**2 * (n - 3) / (n * (n - 1))))
    assert abs(total - expected) <= _K_SIGMA * sd, (total, expected, sd)

  def test_quantize_with_samples_returns_one_sample_on_the_grid(self):
    cfg = TensorConfig(format=fmts.INT8, rounding='stochastic', samples=4)
    q = qtrain.quantize(_x(15), cfg, key=jax.random.key(0))
    chex.assert_type(q.codes, jnp.int8)


def test_stochastic_quantize_unbiased_per_element():
  n = 4000
  x = jnp.asarray(np.random.default_rng(16).uniform(-1, 1, 32), jnp.float32)
  x = x.at[0].set(1.0)  # fixes the absmax scale at 1/127 for every key
  cfg = TensorConfig(format=fmts.IntFormat(bits=8, narrow=True), rounding='stochastic')
  keys = jax.random.split(jax.random.key(3), n)
  y = np.asarray(jax.jit(jax.vmap(lambda k: qtrain.fake_quant(x, cfg, key=k)))(keys), np.float64)
  step = 1 / 127
  xs = np.asarray(x, np.float64)
  lo = np.floor(xs / step) * step
  var = (xs - lo) * (lo + step - xs)  # two-neighbour Bernoulli variance
  assert np.all(np.abs(y.mean(axis=0) - xs) <= _K_SIGMA * np.sqrt(var / n) + 8 * _EPS32)


# ----------------------------------------------------------------------------
# int4 packing.


def test_pack_int4_layout_and_round_trip_all_codes():
  codes = jnp.arange(-8, 8, dtype=jnp.int8)
  packed = qtrain.pack_int4(codes)
  chex.assert_type(packed, jnp.uint8)
  chex.assert_shape(packed, (8,))
  c = np.arange(-8, 8) & 0xF
  np.testing.assert_array_equal(np.asarray(packed), (c[0::2] | (c[1::2] << 4)).astype(np.uint8))
  unpacked = qtrain.unpack_int4(packed)
  chex.assert_type(unpacked, jnp.int8)
  chex.assert_trees_all_equal(unpacked, codes)


@pytest.mark.parametrize('axis', [0, 1, -1, -2])
def test_pack_int4_round_trip_along_any_axis(axis):
  rng = np.random.default_rng(17)
  codes = jnp.asarray(rng.integers(-8, 8, (6, 16)), jnp.int32)
  packed = jax.jit(qtrain.pack_int4, static_argnames='axis')(codes, axis=axis)
  shape = list(codes.shape)
  shape[axis] //= 2
  chex.assert_shape(packed, tuple(shape))
  back = jax.jit(qtrain.unpack_int4, static_argnames='axis')(packed, axis=axis)
  chex.assert_trees_all_equal(back, codes.astype(jnp.int8))


def test_pack_int4_of_quantized_codes():
  q = qtrain.quantize(_x(18), fmts.INT4)
  chex.assert_trees_all_equal(qtrain.unpack_int4(qtrain.pack_int4(q.codes)), q.codes)


def test_pack_int4_bad_input():
  with pytest.raises(ValueError, match=r'even'):
    qtrain.pack_int4(jnp.zeros((3,), jnp.int8))
  with pytest.raises(ValueError, match=r'shape\[0\]'):
    qtrain.pack_int4(jnp.zeros((5, 4), jnp.int8), axis=0)
  with pytest.raises(TypeError, match=r'\bcodes\b'):
    qtrain.pack_int4(jnp.zeros((4,), jnp.float32))
  with pytest.raises(TypeError, match=r'\bpacked\b'):
    qtrain.unpack_int4(jnp.zeros((4,), jnp.int8))


# ----------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize('make, error, name', [
    (lambda: qtrain.quantize(jnp.ones(3, jnp.int32), fmts.INT8), TypeError, 'x'),
    (lambda: qtrain.fake_quant(jnp.ones(3, jnp.int8), fmts.INT8), TypeError, 'x'),
    (lambda: qtrain.quantize(jnp.ones(3), 'int8'), TypeError, 'config'),
    (lambda: qtrain.quantize(jnp.ones(3), TensorConfig(format=fmts.INT8, rounding='stochastic')),
     ValueError, 'key'),
    (lambda: qtrain.fake_quant(jnp.ones(3), TensorConfig(format=fmts.INT8,
                                                         rounding='stochastic')),
     ValueError, 'key'),
    (lambda: qtrain.fake_quant(jnp.ones(3), TensorConfig(format=fmts.INT8,
                                                         calibration=scaling.Lsq())),
     ValueError, 'scale'),
    (lambda: qtrain.quantize(jnp.ones(3), fmts.INT8, scale=jnp.ones((), jnp.int32)), TypeError,
     'scale'),
    (lambda: qtrain.fake_quant(jnp.ones(3), fmts.INT8, ste='pact'), ValueError, 'ste'),
    (lambda: qtrain.dequantize(jnp.ones(3)), TypeError, 'q'),
    (lambda: TensorConfig(format=fmts.INT8, samples=2), ValueError, 'samples'),
    (lambda: TensorConfig(format=fmts.INT8, samples=0), ValueError, 'samples'),
    (lambda: TensorConfig(format=fmts.INT8, rounding='floor'), ValueError, 'rounding'),
    (lambda: TensorConfig(format='int8'), TypeError, 'format'),
    (lambda: qtrain.quantize(jnp.ones((3, 5)), TensorConfig(
        format=fmts.INT8, granularity=scaling.PerBlock(block_size=2))), ValueError, 'block_size'),
])
def test_bad_input_names_the_argument(make, error, name):
  with pytest.raises(error, match=rf'\b{name}\b'):
    make()


@pytest.mark.parametrize('jit', [False, True])
def test_zero_or_subnormal_given_scale_keeps_zeros_zero(jit):
  # A per-channel clip EMA of a dead channel decays to 0 or a subnormal, which
  # XLA flushes to zero: 0/0 must not turn the channel's zero gradient into NaN.
  x = jnp.asarray(np.array([[0.0, 0.5], [0.0, -1.0]], np.float32))
  scale = jnp.asarray(np.array([[1e-40, 1 / 127]], np.float32))
  cfg = TensorConfig(format=fmts.INT8, granularity=scaling.PerChannel(axes=(1,)))
  fn = lambda v, s: qtrain.quantize(v, cfg, scale=s).dequantize()
  y = np.asarray((jax.jit(fn) if jit else fn)(x, scale))
  assert np.all(np.isfinite(y))
  np.testing.assert_array_equal(y[:, 0], 0.0)
  np.testing.assert_allclose(y[:, 1], [64 / 127, -1.0], rtol=1e-6)
