"""Tests for qtrain.clipping (UI8: DSGC, DCLRS) and qtrain.gvq (DA-INT8: GVQ, MCS).

Every quantizer is checked against a plain-numpy transcription of the papers'
formulas written here: ĝ = (c/Q)·round(Q·clamp(g, -c, c)/c), the cosine
distance 1 - ⟨g, ĝ⟩/(‖g‖‖ĝ‖), φ(d) = max(exp(-α d), β), the test
P(|g| > σ) > λ and the EMA s_t = (1 - kA)s_{t-1} + A·max|g|.
"""

from __future__ import annotations

import math
import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qtrain import clipping
from qtrain import gvq
from qtrain import scaling

_RNG = np.random.default_rng(1234)


def _data(kind: str, shape=(4000,)) -> np.ndarray:
  # crc32, not hash(): str hashes change from process to process.
  rng = np.random.default_rng(zlib.crc32(kind.encode()))
  if kind == 'gauss':
    x = rng.normal(size=shape)
  elif kind == 'laplace':
    x = rng.laplace(size=shape)
  elif kind == 't2':  # heavy tail: a sharp gradient distribution
    x = rng.standard_t(2, size=shape)
  else:
    raise ValueError(kind)
  return (1e-3 * x).astype(np.float32)


# ------------------------------------------------------------ numpy oracles


def _np_quant(x: np.ndarray, clip, q: int) -> np.ndarray:
  """The papers' symmetric quantizer in float32: (c/Q)·rint(clamp(x/(c/Q), -Q, Q))."""
  s = (np.asarray(clip, np.float32) / np.float32(q)).astype(np.float32)
  return (np.clip(np.rint(np.clip(x / s, -q, q)), -q, q) * s).astype(np.float32)


def _assert_quantized(got, x: np.ndarray, clip, q: int) -> None:
  """`got` is the papers' quantizer of x at `clip`, exactly up to XLA's division.

  XLA on CPU divides as x·(1/y), which can differ from IEEE division by one
  ulp; so codes are recomputed in float64 and compared exactly wherever x/s
  is not within 1e-4 of a rounding boundary (there, either neighbour is
  accepted), and values to float32 precision.
  """
  got = np.asarray(got, np.float64)
  s = np.asarray(clip, np.float64) / q
  u = np.clip(x.astype(np.float64) / s, -q, q)
  codes = np.rint(u)
  near_tie = np.abs(np.abs(u - np.floor(u)) - 0.5) < 1e-4
  got_codes = got / s
  np.testing.assert_allclose(got_codes, np.round(got_codes), atol=1e-4)  # on the grid
  got_codes = np.round(got_codes)
  ok = (got_codes == codes) | (near_tie & (np.abs(got_codes - u) <= 0.5 + 1e-4))
  assert np.all(ok), f'{np.sum(~ok)} codes differ, e.g. {got_codes[~ok][:5]} vs {codes[~ok][:5]}'
  np.testing.assert_allclose(got, codes * s, rtol=3e-7, atol=0)


def _np_cos_dist(a: np.ndarray, b: np.ndarray) -> float:
  a = a.astype(np.float64).ravel()
  b = b.astype(np.float64).ravel()
  if not np.any(b):  # nothing survived the quantizer: no direction (the module's convention)
    return 1.0
  return 1.0 - float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _np_search(x: np.ndarray, bits: int, n: int, min_ratio: float):
  """Brute-force DSGC in float64: (best clip, its distance, every distance)."""
  q = 2 ** (bits - 1) - 1
  amax = float(np.max(np.abs(x)))
  ratios = [min_ratio ** (i / (n - 1)) for i in range(n)]
  ds = [_np_cos_dist(x, _np_quant(x, np.float32(r * amax), q)) for r in ratios]
  i = int(np.argmin(ds))
  return ratios[i] * amax, ds[i], ds


# ------------------------------------------------------------ cosine distance


def test_cosine_distance_matches_numpy_per_tensor_and_per_channel():
  x = _RNG.normal(size=(6, 50)).astype(np.float32)
  y = (x + 0.3 * _RNG.normal(size=x.shape)).astype(np.float32)
  d = clipping.cosine_distance(jnp.asarray(x), jnp.asarray(y))
  np.testing.assert_allclose(float(d.ravel()[0]), _np_cos_dist(x, y), rtol=1e-5)
  dc = clipping.cosine_distance(jnp.asarray(x), jnp.asarray(y), scaling.PerChannel(axes=(0,)))
  assert dc.shape == (6, 1)
  want = [_np_cos_dist(x[i], y[i]) for i in range(6)]
  np.testing.assert_allclose(np.asarray(dc)[:, 0], want, rtol=1e-5)


def test_cosine_distance_is_accurate_for_tiny_distances():
  x = _RNG.normal(size=4096).astype(np.float32)
  y = (x + 1e-4 * _RNG.normal(size=x.shape)).astype(np.float32)
  got = float(clipping.cosine_distance(jnp.asarray(x), jnp.asarray(y))[0])
  np.testing.assert_allclose(got, _np_cos_dist(x, y), rtol=1e-3)  # d ~ 5e-9


def test_cosine_distance_edge_cases():
  z = jnp.zeros(3)
  one = jnp.array([1.0, 0.0, 0.0])
  assert float(clipping.cosine_distance(z, z)[0]) == 0.0
  assert float(clipping.cosine_distance(one, z)[0]) == 1.0
  assert float(clipping.cosine_distance(one, -one)[0]) == 2.0
  assert np.isnan(clipping.cosine_distance(jnp.array([1.0, jnp.nan, 0.0]), one)[0])
  assert np.isnan(clipping.cosine_distance(jnp.array([1.0, jnp.inf, 0.0]), one)[0])
  # Huge and tiny magnitudes: scale-invariant, no overflow/underflow.
  big = jnp.array([3e38, -1e38, 2e38])
  tiny = jnp.array([3e-37, -1e-37, 2e-37])
  assert float(clipping.cosine_distance(big, tiny)[0]) == pytest.approx(0.0, abs=1e-6)
  with pytest.raises(ValueError, match='one shape'):
    clipping.cosine_distance(jnp.ones(3), jnp.ones(4))
  with pytest.raises(TypeError, match='y must be'):
    clipping.cosine_distance(jnp.ones(3), jnp.ones(3, jnp.int32))


# ------------------------------------------------------------ DSGC search


@pytest.mark.parametrize('kind', ['gauss', 'laplace', 't2'])
@pytest.mark.parametrize('bits', [8, 4])
def test_search_finds_the_numpy_minimum(kind, bits):
  x = _data(kind)
  n, min_ratio = 21, 1 / 16
  clip, dist = clipping.cosine_clip_search(jnp.asarray(x), clipping.symmetric_int(bits),
                                           num_candidates=n, min_ratio=min_ratio)
  want_clip, want_d, ds = _np_search(x, bits, n, min_ratio)
  got_clip = float(clip.ravel()[0])
  d_at_got = _np_cos_dist(x, _np_quant(x, np.float32(got_clip), 2 ** (bits - 1) - 1))
  # float32 vs float64 may swap near-ties: the choice must be a minimum to 1e-3.
  assert d_at_got <= want_d * (1 + 1e-3) + 1e-9
  np.testing.assert_allclose(float(dist.ravel()[0]), d_at_got, rtol=1e-3)
  if sorted(ds)[1] > want_d * 1.01:  # a clear minimum: the same candidate
    np.testing.assert_allclose(got_clip, want_clip, rtol=1e-6)


def test_search_clips_heavy_tails_and_not_gaussians():
  amax = lambda x: float(np.max(np.abs(x)))
  # The clip of one heavy-tailed sample depends on its few largest values
  # (0.27-1.0 of the max over 20 seeds), so judge the median of 11 samples.
  ratios = []
  for seed in range(11):
    x = (1e-3 * np.random.default_rng(seed).standard_t(2, size=4000)).astype(np.float32)
    clip, _ = clipping.cosine_clip_search(jnp.asarray(x), clipping.symmetric_int(4))
    ratios.append(float(clip.ravel()[0]) / amax(x))
  assert np.median(ratios) < 0.65, ratios
  g = _data('gauss')
  clip_g, _ = clipping.cosine_clip_search(jnp.asarray(g))
  assert float(clip_g.ravel()[0]) > 0.9 * amax(g)


def test_search_per_channel_equals_per_row_searches():
  x = np.stack([_data('gauss')[:500], _data('t2')[:500] * 50, np.zeros(500, np.float32)])
  clip, dist = clipping.cosine_clip_search(jnp.asarray(x), clipping.symmetric_int(4),
                                           scaling.PerChannel(axes=(0,)))
  assert clip.shape == dist.shape == (3, 1)
  for i in range(2):
    c, d = clipping.cosine_clip_search(jnp.asarray(x[i]), clipping.symmetric_int(4))
    np.testing.assert_array_equal(np.asarray(clip)[i], np.asarray(c))
    np.testing.assert_allclose(np.asarray(dist)[i], np.asarray(d), rtol=1e-6)
  assert float(clip[2, 0]) == 0.0 and float(dist[2, 0]) == 0.0


def test_candidate_ratios():
  r = clipping.candidate_ratios(5, 1 / 16)
  np.testing.assert_allclose(r, [1, 0.5, 0.25, 0.125, 0.0625], rtol=1e-6)
  assert clipping.candidate_ratios(1, 0.5).tolist() == [1.0]


# ------------------------------------------------------------ cosine_clip quantizer


@pytest.mark.parametrize('bits', [8, 4])
def test_cosine_clip_nearest_is_bit_exact(bits):
  x = _data('t2')
  clip, _ = clipping.cosine_clip_search(jnp.asarray(x), clipping.symmetric_int(bits))
  got = clipping.cosine_clip(jnp.asarray(x), bits=bits, rounding='nearest')
  _assert_quantized(got, x, np.asarray(clip).ravel()[0], 2 ** (bits - 1) - 1)
  # A given clip (the periodic state) skips the search.
  got = clipping.cosine_clip(jnp.asarray(x), bits=bits, rounding='nearest', clip=1e-3)
  _assert_quantized(got, x, np.float32(1e-3), 2 ** (bits - 1) - 1)


def test_cosine_clip_stochastic_is_unbiased_inside_the_clip_and_on_the_grid():
  x = np.array([-3.0, -0.37, -0.011, 0.0, 0.004, 0.2, 0.51, 2.5], np.float32)
  clip, q, n = 1.0, 7, 4000
  s = clip / q
  keys = jax.random.split(jax.random.key(0), n)
  fn = jax.jit(jax.vmap(lambda k: clipping.cosine_clip(jnp.asarray(x), k, bits=4, clip=clip)))
  samples = np.asarray(fn(keys))
  target = np.clip(x, -clip, clip)
  lo, hi = np.floor(target / s) * s, np.ceil(target / s) * s
  assert np.all(np.isclose(samples, lo, atol=1e-6) | np.isclose(samples, hi, atol=1e-6))
  # Bernoulli between two grid points: std of the mean <= s / (2 sqrt(n)); 6 sigma.
  np.testing.assert_array_less(np.abs(samples.mean(0) - target), 6 * s / (2 * math.sqrt(n)))


def test_cosine_clip_non_finite_and_zero_policy():
  x = jnp.array([[1.0, jnp.nan, 0.5], [0.2, -0.1, 0.3], [0.0, 0.0, 0.0]])
  y = clipping.cosine_clip(x, rounding='nearest')
  assert bool(jnp.all(jnp.isnan(y)))  # NaN makes its (per-tensor) group NaN
  y = clipping.cosine_clip(x, rounding='nearest', axis=0)
  assert bool(jnp.all(jnp.isnan(y[0])))
  assert bool(jnp.all(jnp.isfinite(y[1:])))
  np.testing.assert_array_equal(np.asarray(y[2]), 0.0)
  y = clipping.cosine_clip(jnp.array([1.0, jnp.inf]), rounding='nearest')
  assert bool(jnp.all(jnp.isnan(y)))
  assert clipping.cosine_clip(jnp.zeros((0,)), rounding='nearest').shape == (0,)


def test_cosine_clip_keeps_dtype_and_straight_through_gradient():
  x = jnp.asarray(_data('laplace')[:64]).astype(jnp.bfloat16)
  y = clipping.cosine_clip(x, rounding='nearest')
  assert y.dtype == jnp.bfloat16 and y.shape == x.shape
  g = jax.grad(lambda v: jnp.sum(clipping.cosine_clip(v, rounding='nearest') * 2.0))(
      jnp.ones(4))
  np.testing.assert_array_equal(np.asarray(g), 2.0)


@pytest.mark.parametrize('kwargs, err, match', [
    (dict(bits=1), ValueError, 'bits=1'),
    (dict(bits=9), ValueError, 'bits=9'),
    (dict(bits=8.0), TypeError, 'bits must be an int'),
    (dict(num_candidates=0), ValueError, 'num_candidates=0'),
    (dict(min_ratio=0.0), ValueError, 'min_ratio=0.0'),
    (dict(min_ratio=1.5), ValueError, 'min_ratio=1.5'),
    (dict(rounding='up'), ValueError, 'rounding'),
    (dict(rounding='stochastic'), ValueError, 'key is required'),
])
def test_cosine_clip_bad_arguments(kwargs, err, match):
  kwargs.setdefault('rounding', 'nearest')
  with pytest.raises(err, match=match):
    clipping.cosine_clip(jnp.ones(4), **kwargs)


def test_cosine_clip_rejects_integer_input():
  with pytest.raises(TypeError, match='floating'):
    clipping.cosine_clip(jnp.ones(4, jnp.int32), rounding='nearest')


# ------------------------------------------------------------ periodic update (UI8 state)


def test_cosine_clip_update_searches_every_period_and_reuses_in_between():
  grads = [jnp.asarray(_data(k)[:1000] * f) for k, f in
           (('t2', 1.0), ('gauss', 3.0), ('laplace', 0.5), ('t2', 2.0), ('gauss', 1.0))]
  update = jax.jit(lambda s, g: clipping.cosine_clip_update(s, g, period=3, bits=4))
  state = clipping.cosine_clip_init(grads[0])
  clips = []
  for step, g in enumerate(grads):
    state = update(state, g)
    clips.append(state.clip)
    if step % 3 == 0:
      want, want_d = clipping.cosine_clip_search(g, clipping.symmetric_int(4))
      np.testing.assert_array_equal(np.asarray(state.clip), np.asarray(want))
      np.testing.assert_allclose(np.asarray(state.deviation), np.asarray(want_d), rtol=1e-6)
    else:
      np.testing.assert_array_equal(np.asarray(state.clip), np.asarray(clips[step - 1]))
      g_np = np.asarray(g)
      want_d = _np_cos_dist(g_np, _np_quant(g_np, np.asarray(state.clip).ravel()[0], 7))
      np.testing.assert_allclose(float(state.deviation.ravel()[0]), want_d, rtol=1e-3)
    assert int(state.count) == step + 1
  with pytest.raises(ValueError, match='period=0'):
    clipping.cosine_clip_update(state, grads[0], period=0)


# ------------------------------------------------------------ DCLRS


def test_deviation_lr_scale_matches_the_formula():
  d = np.array([0.0, 0.001, 0.01, 0.05, 0.115, 0.5, 2.0], np.float32)
  want = np.maximum(np.exp(-20.0 * d.astype(np.float64)), 0.1)
  np.testing.assert_allclose(np.asarray(clipping.deviation_lr_scale(jnp.asarray(d))), want,
                             rtol=1e-6)
  assert np.isnan(clipping.deviation_lr_scale(jnp.nan))
  with pytest.raises(ValueError, match='beta=1.5'):
    clipping.deviation_lr_scale(0.1, beta=1.5)
  with pytest.raises(ValueError, match='alpha=-1'):
    clipping.deviation_lr_scale(0.1, alpha=-1)


def test_scale_by_deviation_scales_each_layer_after_the_optimizer():
  params = {'conv': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)},
            'fc': {'kernel': jnp.ones(3)}}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 2), params)
  tx = optax.chain(optax.sgd(0.5), clipping.scale_by_deviation())
  state = tx.init(params)
  dev = {'conv': jnp.float32(0.01), 'fc': jnp.float32(0.3)}
  updates, _ = jax.jit(tx.update)(grads, state, params, deviation=dev)
  chex.assert_trees_all_close(updates['conv'], jax.tree.map(
      lambda g: -0.5 * g * math.exp(-0.2), grads['conv']), rtol=1e-6)
  chex.assert_trees_all_close(updates['fc'], jax.tree.map(lambda g: -0.05 * g, grads['fc']),
                              rtol=1e-6)
  # Integer leaves (counts) pass through.
  tx_alone = clipping.scale_by_deviation()
  counts, _ = tx_alone.update({'n': jnp.ones(2, jnp.int32)}, tx_alone.init(None), deviation=0.5)
  assert counts['n'].dtype == jnp.int32 and counts['n'].tolist() == [1, 1]
  # One scalar for everything; a NaN deviation stays visible.
  updates, _ = tx.update(grads, state, params, deviation=jnp.nan)
  assert bool(jnp.all(jnp.isnan(updates['fc']['kernel'])))


def test_scale_by_deviation_errors():
  tx = clipping.scale_by_deviation()
  u = {'a': jnp.ones(2)}
  with pytest.raises(ValueError, match='deviation=d'):
    tx.update(u, tx.init(u))
  with pytest.raises(ValueError, match='prefix'):
    tx.update(u, tx.init(u), deviation={'b': 0.1})
  with pytest.raises(ValueError, match='scalars'):
    tx.update(u, tx.init(u), deviation={'a': jnp.ones(2)})
  with pytest.raises(ValueError, match='beta'):
    clipping.scale_by_deviation(beta=-0.1)


# ------------------------------------------------------------ DA-INT8: distribution test, MCS, GVQ


def _np_gaussian_like(g: np.ndarray, lam: float) -> np.ndarray:
  """Per column: fraction of |g| > std(g) exceeds lam."""
  g = g.astype(np.float64)
  sigma = g.std(axis=0)
  return (np.abs(g) > sigma).mean(axis=0) > lam


def _mixed_channels(n: int = 256) -> np.ndarray:
  rng = np.random.default_rng(7)
  cols = [rng.normal(size=n), rng.standard_t(1.5, size=n),
          rng.normal(size=n) * (rng.random(n) < 0.05), rng.uniform(-1, 1, size=n),
          rng.laplace(size=n) * 4]
  return (np.stack(cols, axis=-1) * 1e-2).astype(np.float32)


def test_gaussian_like_matches_numpy():
  g = _mixed_channels()
  got = gvq.gaussian_like(jnp.asarray(g), scaling.PerChannel(axes=(1,)))
  want = _np_gaussian_like(g, 0.3)
  np.testing.assert_array_equal(np.asarray(got)[0], want)
  assert want[0] and not want[1] and not want[2]  # bell-shaped vs sharp/long-tailed


@pytest.mark.parametrize('k', [1.0, 2.0])
def test_magnitude_aware_clip_matches_numpy(k):
  g = _mixed_channels()
  got = gvq.magnitude_aware_clip(jnp.asarray(g), scaling.PerChannel(axes=(1,)), k=k)
  amax = np.abs(g).max(axis=0)
  want = np.where(_np_gaussian_like(g, 0.3), amax, amax / np.float32(k))
  np.testing.assert_array_equal(np.asarray(got)[0], want.astype(np.float32))


def test_magnitude_aware_calibration_with_k1_is_per_channel_absmax():
  g = jnp.asarray(_mixed_channels())
  int8 = clipping.symmetric_int(8)
  got, _ = scaling.compute_scale(g, int8, gvq.MagnitudeAwareClip(), scaling.PerChannel(axes=(1,)))
  want, _ = scaling.compute_scale(g, int8, scaling.AbsMax(), scaling.PerChannel(axes=(1,)))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize('axis', [-1, 0])
def test_gvq_nearest_is_bit_exact(axis):
  g = _mixed_channels()
  g = g if axis == -1 else g.T.copy()
  got = np.asarray(gvq.gvq(jnp.asarray(g), axis=axis, k=2.0))
  gg = g if axis == -1 else g.T
  amax = np.abs(gg).max(axis=0)
  clip = np.where(_np_gaussian_like(gg, 0.3), amax, amax / np.float32(2.0))
  _assert_quantized(got if axis == -1 else got.T, gg, clip[None, :], 127)


def test_gvq_with_state_clip_and_stochastic_support():
  g = _mixed_channels(64)
  clip = np.abs(g).max(axis=0)[None, :] * np.float32(0.5)
  got = gvq.gvq(jnp.asarray(g), clip=jnp.asarray(clip), bits=4)
  _assert_quantized(got, g, clip, 7)
  sr = np.asarray(gvq.gvq(jnp.asarray(g), jax.random.key(3), rounding='stochastic', bits=4))
  s = (np.abs(g).max(axis=0) / 7).astype(np.float32)
  lo, hi = np.floor(g / s) * s, np.ceil(g / s) * s
  assert np.all(np.isclose(sr, lo, rtol=1e-6, atol=0) | np.isclose(sr, hi, rtol=1e-6, atol=0))


def test_gvq_non_finite_and_zero_channels():
  g = _mixed_channels(32)
  g[3, 1] = np.nan
  g[:, 2] = 0.0
  y = np.asarray(gvq.gvq(jnp.asarray(g)))
  assert np.all(np.isnan(y[:, 1]))
  np.testing.assert_array_equal(y[:, 2], 0.0)
  assert np.all(np.isfinite(y[:, [0, 3, 4]]))


@pytest.mark.parametrize('kwargs, err, match', [
    (dict(lam=1.5), ValueError, 'lam=1.5'),
    (dict(k=0.0), ValueError, 'k=0.0'),
    (dict(bits=1), ValueError, 'bits=1'),
    (dict(axis='c'), TypeError, 'axis'),
    (dict(rounding='stochastic'), ValueError, 'key is required'),
])
def test_gvq_bad_arguments(kwargs, err, match):
  with pytest.raises(err, match=match):
    gvq.gvq(jnp.ones((4, 3)), **kwargs)


@pytest.mark.parametrize('k, a', [(1.0, 0.8), (0.5, 0.5)])
def test_magnitude_aware_clip_update_is_the_ema(k, a):
  rng = np.random.default_rng(11)
  steps = [_mixed_channels() * np.float32(rng.uniform(0.5, 2.0)) for _ in range(4)]
  update = jax.jit(lambda s, g: gvq.magnitude_aware_clip_update(s, g, k=k, a=a))
  state = gvq.magnitude_aware_clip_init(jnp.asarray(steps[0]))
  s_prev = None
  for g in steps:
    state = update(state, jnp.asarray(g))
    amax = np.abs(g).max(axis=0).astype(np.float64)
    gauss = _np_gaussian_like(g, 0.3)
    if s_prev is None:
      want = amax
    else:
      want = np.where(gauss, amax, (1 - k * a) * s_prev + a * amax)
    np.testing.assert_allclose(np.asarray(state.clip)[0], want, rtol=1e-6)
    s_prev = want
  assert int(state.count) == 4
  with pytest.raises(ValueError, match='a=1.5'):
    gvq.magnitude_aware_clip_update(state, jnp.asarray(steps[0]), a=1.5)


def test_magnitude_aware_clip_update_keeps_nan_visible():
  g = _mixed_channels(16)
  state = gvq.magnitude_aware_clip_init(jnp.asarray(g))
  g[0, 2] = np.nan
  state = gvq.magnitude_aware_clip_update(state, jnp.asarray(g))
  clip = np.asarray(state.clip)[0]
  assert np.isnan(clip[2]) and np.all(np.isfinite(clip[[0, 1, 3, 4]]))
