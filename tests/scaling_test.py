"""Tests for qtrain.scaling: group shapes, calibrations, zero/NaN policy, LSQ gradients."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qtrain
from qtrain import config as cfgs
from qtrain import formats as fmts
from qtrain import scaling

_SHAPE = (4, 6, 8)
_EPS32 = float(np.finfo(np.float32).eps)
_quantize = jax.jit(qtrain.quantize, static_argnames='config')


def _x(seed: int = 0, shape=_SHAPE) -> jax.Array:
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


# ----------------------------------------------------------------------------
# Granularity: group_reduce and expand_scale.


@pytest.mark.parametrize('granularity, group_shape', [
    (scaling.PerTensor(), (1, 1, 1)),
    (scaling.PerChannel(axes=(0,)), (4, 1, 1)),
    (scaling.PerChannel(axes=0), (4, 1, 1)),  # a bare int is accepted
    (scaling.PerChannel(axes=(-1,)), (1, 1, 8)),
    (scaling.PerChannel(axes=(0, 2)), (4, 1, 8)),
    (scaling.PerChannel(axes=(2, -3)), (4, 1, 8)),
    (scaling.PerBlock(block_size=4), (4, 6, 2)),
    (scaling.PerBlock(block_size=8, axis=-1), (4, 6, 1)),
    (scaling.PerBlock(block_size=3, axis=1), (4, 2, 8)),
    (scaling.PerBlock(block_size=2, axis=0), (2, 6, 8)),
])
def test_group_reduce_and_expand_scale_shapes(granularity, group_shape):
  x = _x()
  reduced = scaling.group_reduce(jnp.abs(x), jnp.max, granularity)
  chex.assert_shape(reduced, group_shape)
  expanded = scaling.expand_scale(reduced, _SHAPE, granularity)
  chex.assert_shape(expanded, _SHAPE)
  # Every element sees the max of its own group, and it is attained in the group.
  assert bool(jnp.all(jnp.abs(x) <= expanded))
  assert int(jnp.sum(jnp.abs(x) == expanded)) >= math.prod(group_shape)


def test_per_block_groups_are_contiguous_blocks():
  x = jnp.arange(2 * 8, dtype=jnp.float32).reshape(2, 8)
  g = scaling.PerBlock(block_size=4)
  sums = scaling.group_reduce(x, jnp.sum, g)
  chex.assert_trees_all_equal(sums, jnp.array([[6.0, 22.0], [38.0, 54.0]]))
  chex.assert_trees_all_equal(
      scaling.expand_scale(sums, x.shape, g),
      jnp.array([[6.0] * 4 + [22.0] * 4, [38.0] * 4 + [54.0] * 4]))


def test_per_channel_reduces_all_other_axes():
  x = _x(1)
  got = scaling.group_reduce(x, jnp.sum, scaling.PerChannel(axes=(0, 2)))
  chex.assert_trees_all_close(got[:, 0, :], np.asarray(x).sum(axis=1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('make, error, name', [
    (lambda: scaling.group_reduce(_x(), jnp.max, scaling.PerChannel(axes=(3,))), ValueError,
     'axes'),
    (lambda: scaling.group_reduce(_x(), jnp.max, scaling.PerChannel()), ValueError, 'axes'),
    (lambda: scaling.group_reduce(_x(), jnp.max, scaling.PerBlock(block_size=5)), ValueError,
     'block_size'),
    (lambda: scaling.group_reduce(_x(), jnp.max, scaling.PerBlock(block_size=2, axis=3)),
     ValueError, 'axis'),
    (lambda: scaling.PerBlock(block_size=0), ValueError, 'block_size'),
    (lambda: scaling.PerBlock(block_size=2.0), ValueError, 'block_size'),
    (lambda: scaling.PerChannel(axes=(0.5,)), TypeError, 'axes'),
    (lambda: scaling.group_reduce(_x(), jnp.max, 'tensor'), TypeError, 'granularity'),
    (lambda: scaling.FixedScale(value=0.0), ValueError, 'value'),
    (lambda: scaling.FixedScale(value=float('nan')), ValueError, 'value'),
    (lambda: scaling.compute_scale(_x(), fmts.INT4, 'absmax'), TypeError, 'calibration'),
    (lambda: scaling.compute_scale(_x(), fmts.INT4, scaling.Lsq()), ValueError, 'scale'),
    (lambda: scaling.compute_scale(_x(), fmts.FP8_E4M3, scaling.MinMax()), ValueError, 'MinMax'),
    (lambda: scaling.compute_scale(_x(), fmts.fixed_point(8), scaling.AbsMax()), ValueError,
     'FixedScale'),
])
def test_bad_arguments(make, error, name):
  with pytest.raises(error, match=rf'\b{name}\b'):
    make()


def test_granularities_and_calibrations_are_hashable():
  things = [scaling.PerTensor(), scaling.PerChannel(axes=(0,)), scaling.PerBlock(block_size=32),
            scaling.AbsMax(), scaling.AbsMax(power_of_two=True), scaling.MinMax(), scaling.Sawb(),
            scaling.FixedScale(value=0.5), scaling.Lsq()]
  assert len({t: i for i, t in enumerate(things)}) == len(things)
  assert scaling.PerChannel(axes=0) == scaling.PerChannel(axes=(0,))


# ----------------------------------------------------------------------------
# AbsMax.


@pytest.mark.parametrize('fmt', [fmts.INT8, fmts.INT4, fmts.FP8_E4M3, fmts.LOG4_FP4, fmts.UINT8],
                         ids=str)
@pytest.mark.parametrize('granularity', [scaling.PerTensor(), scaling.PerChannel(axes=(1,)),
                                         scaling.PerBlock(block_size=4)], ids=repr)
def test_absmax_scale(fmt, granularity):
  x = _x(2)
  scale, zero_point = scaling.compute_scale(x, fmt, scaling.AbsMax(), granularity)
  assert zero_point is None
  chex.assert_type(scale, jnp.float32)
  amax = scaling.group_reduce(jnp.abs(x), jnp.max, granularity)
  chex.assert_trees_all_close(scale, amax / fmt.absmax_target, rtol=_EPS32, atol=0)


@pytest.mark.parametrize('fmt', [fmts.INT8, fmts.INT4, fmts.LOG4_FP4, fmts.FP4_E2M1], ids=str)
@pytest.mark.parametrize('magnitude', [1e-3, 0.7, 1.0, 3.0, 1e4])
def test_absmax_power_of_two(fmt, magnitude):
  x = _x(3) * magnitude
  scale, _ = scaling.compute_scale(x, fmt, scaling.AbsMax(power_of_two=True),
                                   scaling.PerChannel(axes=(0,)))
  s = np.asarray(scale, np.float64)
  np.testing.assert_array_equal(np.frexp(s)[0], 0.5)  # exact powers of two
  amax = np.abs(np.asarray(x, np.float64)).max(axis=(1, 2), keepdims=True)
  ratio = amax / s
  target = fmt.absmax_target
  assert np.all(ratio > target / 2) and np.all(ratio <= target), ratio.ravel()


def test_absmax_power_of_two_exact_power():
  # max|x| / target already a power of two: the scale is exactly that.
  x = jnp.array([0.5, -7.0 * 0.25, 1.0], jnp.float32)  # amax 1.75 = 7 · 2^-2
  scale, _ = scaling.compute_scale(x, fmts.INT4, scaling.AbsMax(power_of_two=True))
  assert float(scale[0]) == 0.25


# ----------------------------------------------------------------------------
# MinMax.


@pytest.mark.parametrize('bits', [2, 4, 8])
@pytest.mark.parametrize('lo, hi', [(-1.3, 2.9), (0.25, 3.0), (-4.0, -0.5), (-1.0, 1.0)])
def test_minmax_zero_point_makes_zero_exact_and_covers_range(bits, lo, hi):
  fmt = fmts.IntFormat(bits=bits, signed=False)
  rng = np.random.default_rng(bits)
  x = np.concatenate([rng.uniform(lo, hi, 200), [lo, hi, 0.0]]).astype(np.float32)
  scale, zp = scaling.compute_scale(jnp.asarray(x), fmt, scaling.MinMax())
  s, z = float(scale[0]), float(zp[0])
  assert z == round(z) and fmt.qmin <= z <= fmt.qmax  # integer zero point in range
  # The range [min(x, 0), max(x, 0)] spans qmax - qmin steps.
  lo0, hi0 = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
  assert math.isclose(s * (fmt.qmax - fmt.qmin), hi0 - lo0, rel_tol=4 * _EPS32)
  # The real grid is (q - z)·s for q in [qmin, qmax]: it holds 0 exactly ...
  grid_lo, grid_hi = (fmt.qmin - z) * s, (fmt.qmax - z) * s
  assert (z - z) * s == 0.0
  # ... and covers [min, max] up to the half step lost to rounding the zero point.
  assert grid_lo <= lo0 + s / 2 * (1 + 4 * _EPS32)
  assert grid_hi >= hi0 - s / 2 * (1 + 4 * _EPS32)
  # Quantize-dequantize: 0 comes back exactly, everything within half a step.
  q = _quantize(jnp.asarray(x), config=cfgs.TensorConfig(format=fmt, calibration=scaling.MinMax()))
  y = np.asarray(q.dequantize(), np.float64)
  assert y[-1] == 0.0
  err = np.abs(y - x.astype(np.float64))
  assert np.all(err <= s / 2 + 4 * _EPS32 * np.abs(x)), err.max() / s


def test_minmax_positive_tensor_has_zero_point_qmin():
  x = jnp.array([0.5, 1.0, 2.0], jnp.float32)
  scale, zp = scaling.compute_scale(x, fmts.UINT8, scaling.MinMax())
  assert float(zp[0]) == 0.0
  assert float(scale[0]) == pytest.approx(2.0 / 255, rel=_EPS32)


def test_minmax_per_channel():
  x = jnp.array([[-1.0, 0.0, 3.0], [2.0, 4.0, 6.0]], jnp.float32)
  scale, zp = scaling.compute_scale(x, fmts.UINT8, scaling.MinMax(), scaling.PerChannel(axes=0))
  chex.assert_shape((scale, zp), (2, 1))
  chex.assert_trees_all_close(scale[:, 0], jnp.array([4.0 / 255, 6.0 / 255]), rtol=_EPS32)
  chex.assert_trees_all_equal(zp[:, 0], jnp.array([64.0, 0.0]))  # round(255/4) = 64


# ----------------------------------------------------------------------------
# SAWB.


def _sawb_reference(x: np.ndarray, c1: float, c2: float, max_value: float) -> float:
  x = x.astype(np.float64)
  clip = c1 * math.sqrt(np.mean(x * x)) - c2 * np.mean(np.abs(x))
  if clip <= 0:
    clip = np.abs(x).max()
  return clip / max_value


@pytest.mark.parametrize('dist', ['normal', 'laplace', 'sparse'])
def test_sawb_clip_matches_numpy_reference(dist):
  rng = np.random.default_rng(4)
  x = {'normal': rng.standard_normal(4096),
       'laplace': rng.laplace(size=4096),
       'sparse': rng.standard_normal(4096) * (rng.uniform(size=4096) < 0.05)}[dist]
  x = x.astype(np.float32)
  scale, zp = scaling.compute_scale(jnp.asarray(x), fmts.INT4, scaling.Sawb())
  assert zp is None
  expected = _sawb_reference(x, 12.1, 12.2, 8.0)  # LUQ's coefficients, step clip/8
  # float32 statistics over 4096 elements: a relative error of a few hundred ulps at most.
  assert math.isclose(float(scale[0]), expected, rel_tol=1e-5), (float(scale[0]), expected)
  if dist == 'normal':
    # LUQ's clip on a Gaussian is about 2.37 sigma (papers-1-4.md §1a).
    assert 2.2 < float(scale[0]) * 8 < 2.55


def test_sawb_explicit_coefficients_and_per_channel():
  x = _x(5)
  scale, _ = scaling.compute_scale(x, fmts.INT8, scaling.Sawb(c1=12.68, c2=12.8),
                                   scaling.PerChannel(axes=(0,)))
  chex.assert_shape(scale, (4, 1, 1))
  for i in range(4):
    expected = _sawb_reference(np.asarray(x[i]), 12.68, 12.8, fmts.INT8.max_value)
    assert math.isclose(float(scale[i, 0, 0]), expected, rel_tol=1e-5)


@pytest.mark.parametrize('c', [0.5, 3.0])
def test_sawb_falls_back_to_absmax_when_clip_not_positive(c):
  # A ±c tensor: clip = 12.1c - 12.2c = -0.1c <= 0, so the scale uses max|x| = c.
  x = jnp.asarray(np.where(np.arange(64) % 2, c, -c), jnp.float32)
  scale, _ = scaling.compute_scale(x, fmts.INT4, scaling.Sawb())
  assert float(scale[0]) == pytest.approx(c / 8, rel=_EPS32)
  assert np.isfinite(float(scale[0])) and float(scale[0]) > 0


def test_sawb_without_default_coefficients_names_c1():
  with pytest.raises(ValueError, match=r'\bc1\b'):
    scaling.compute_scale(_x(), fmts.INT8, scaling.Sawb())
  with pytest.raises(ValueError, match=r'bits=8'):
    scaling.Sawb(c1=1.0).coefficients(8)  # both coefficients are needed
  assert scaling.Sawb().coefficients(4) == (12.1, 12.2)


# ----------------------------------------------------------------------------
# Zero and NaN policy.


_CALIBRATIONS = {
    'absmax': (fmts.INT4, scaling.AbsMax()),
    'absmax_pow2': (fmts.LOG4_FP4, scaling.AbsMax(power_of_two=True)),
    'minmax': (fmts.UINT8, scaling.MinMax()),
    'sawb': (fmts.INT4, scaling.Sawb()),
    'fixed': (fmts.fixed_point(8), scaling.FixedScale(value=2.0**-7)),
}


@pytest.mark.parametrize('name', sorted(_CALIBRATIONS))
def test_all_zero_tensor_gives_finite_scale_and_zero_codes(name):
  fmt, calibration = _CALIBRATIONS[name]
  x = jnp.zeros(_SHAPE, jnp.float32)
  scale, zp = scaling.compute_scale(x, fmt, calibration)
  chex.assert_tree_all_finite(scale)
  assert float(scale.ravel()[0]) > 0
  if not isinstance(calibration, scaling.FixedScale):
    # The zero statistic is guarded to 1, so the scale is 1 / (the format's reference level).
    reference = {'minmax': fmt.max_value, 'sawb': fmt.max_value}.get(name, fmt.absmax_target)
    if isinstance(calibration, scaling.AbsMax) and calibration.power_of_two:
      reference = 2.0**math.floor(math.log2(reference))
    assert float(scale.ravel()[0]) == pytest.approx(1 / reference, rel=_EPS32)
  q = _quantize(x, config=cfgs.TensorConfig(format=fmt, calibration=calibration))
  assert not np.any(np.asarray(q.codes, np.float32) - (0 if zp is None else np.asarray(zp)))
  chex.assert_trees_all_equal(q.dequantize(), x)


@pytest.mark.parametrize('name', sorted(_CALIBRATIONS))
@pytest.mark.parametrize('bad', [np.nan, np.inf, -np.inf])
def test_non_finite_group_gets_non_finite_scale_others_stay_finite(name, bad):
  fmt, calibration = _CALIBRATIONS[name]
  x = np.array(_x(6))
  x[1, 2, 3] = bad
  scale, _ = scaling.compute_scale(jnp.asarray(x), fmt, calibration, scaling.PerChannel(axes=0))
  s = np.asarray(scale).ravel()
  assert not np.isfinite(s[1])
  assert np.all(np.isfinite(np.delete(s, 1)))


def test_compute_scale_stops_gradients():
  fmt, cal = fmts.INT8, scaling.AbsMax()
  g = jax.grad(lambda x: scaling.compute_scale(x, fmt, cal)[0].sum())(_x())
  chex.assert_trees_all_equal(g, jnp.zeros(_SHAPE))


def test_fixed_scale_is_constant_and_group_shaped():
  x = _x(7) * 100
  scale, _ = scaling.compute_scale(x, fmts.fixed_point(8), scaling.FixedScale(value=2.0**-7),
                                   scaling.PerBlock(block_size=2))
  chex.assert_shape(scale, (4, 6, 4))
  chex.assert_trees_all_equal(scale, jnp.full((4, 6, 4), 2.0**-7, jnp.float32))


def test_fixed_scale_of_huge_finite_values_stays_finite():
  # Regression: the non-finite check summed the group, and 3e38 + 3e38 overflows.
  x = jnp.array([3e38, 3e38, 0.5], jnp.float32)
  scale, _ = scaling.compute_scale(x, fmts.fixed_point(8), scaling.FixedScale(value=2.0**-7))
  chex.assert_tree_all_finite(scale)


# ----------------------------------------------------------------------------
# LSQ.


def _lsq_reference_grads(x, step, g, fmt, grad_scale, group_axes):
  """d/dstep and d/dx of sum(g · lsq(x, step)) by Esser et al.'s formula (float64)."""
  x, step, g = (np.asarray(a, np.float64) for a in (x, step, g))
  v = x / step
  inside = (v >= fmt.qmin) & (v <= fmt.qmax)
  per_elem = np.where(inside, np.round(v) - v, np.where(v < fmt.qmin, fmt.qmin, fmt.qmax))
  d_step = np.sum(g * per_elem, axis=group_axes, keepdims=True) * grad_scale
  d_x = g * inside
  return d_step, d_x


@pytest.mark.parametrize('fmt', [fmts.INT4, fmts.INT8, fmts.IntFormat(bits=3, narrow=True)],
                         ids=str)
@pytest.mark.parametrize('per_channel', [False, True])
@pytest.mark.parametrize('grad_scale', [None, 0.5])
def test_lsq_gradients_match_the_formula(fmt, per_channel, grad_scale):
  rng = np.random.default_rng(8)
  x = rng.standard_normal((16, 8)).astype(np.float32) * 2
  # Steps chosen so some elements clip on both sides and none sits on a clip boundary.
  step = np.float32(3.0 / fmt.qmax) if not per_channel else (
      np.linspace(1.5, 4.0, 8, dtype=np.float32) / fmt.qmax)[None, :]
  g = rng.standard_normal(x.shape).astype(np.float32)
  v = x / step
  assert np.any(v > fmt.qmax) and np.any(v < fmt.qmin)
  assert np.min(np.abs(np.concatenate([v - fmt.qmax, v - fmt.qmin]))) > 1e-4

  def loss(x, step):
    return jnp.sum(jnp.asarray(g) * scaling.lsq_fake_quant(x, step, fmt, grad_scale))

  d_x, d_step = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(step))
  gs = grad_scale if grad_scale is not None else 1 / math.sqrt(x.size * fmt.qmax)
  ref_step, ref_x = _lsq_reference_grads(x, step, g, fmt, gs, 0 if per_channel else None)
  ref_step = ref_step.reshape(np.shape(step))
  # The clipped-STE mask times g; inside, the chain rule multiplies by (1/s)·s, one rounding.
  chex.assert_trees_all_close(d_x, jnp.asarray(ref_x, jnp.float32), rtol=2 * _EPS32, atol=0)
  chex.assert_trees_all_equal(d_x == 0, jnp.asarray(ref_x == 0))
  # Sums of O(100) float32 terms of size <= qmax: relative error ~ 100·eps.
  chex.assert_trees_all_close(d_step, jnp.asarray(ref_step, jnp.float32),
                              rtol=1e-5, atol=1e-5 * gs * fmt.qmax * x.size)


def test_lsq_forward_is_rtn_on_the_int_grid():
  x = jnp.array([0.26, -0.74, 10.0, -10.0, 0.25, 0.75], jnp.float32)
  got = scaling.lsq_fake_quant(x, jnp.float32(0.5), fmts.INT4)
  chex.assert_trees_all_equal(got, jnp.array([0.5, -0.5, 3.5, -4.0, 0.0, 1.0], jnp.float32))


def test_lsq_needs_int_format():
  with pytest.raises(TypeError, match='IntFormat'):
    scaling.lsq_fake_quant(jnp.ones(3), jnp.float32(1.0), fmts.FP8_E4M3)
