"""Tests for qtrain.dot_general: the quantized forward GEMM and its two backward GEMMs.

Oracles, tightest first:
  * the forward against a plain-numpy fake-quant reference, bit for bit: absmax
    INT8 codes q = clip(round(x/s), -127, 127), s = max|x|/127 (float32), an
    exact int64 contraction of the codes, cast to float32 and multiplied by the
    combined scale in the library's order, acc·(s_lhs·s_rhs). XLA evaluates a
    division by a broadcast scale as a multiplication by its reciprocal in
    some contexts, so the reference enumerates both conventions for the two
    divisions (see `lib.DIVISIONS`); power-of-two scales pin a single reference;
  * the backward against the same reference with the stochastic-rounding noise
    reproduced from the documented key slots (`fold_in(key, slot)`, slot 2 = dY
    for dX, 5 = dY for dW) and `qtrain.prng.uniform`;
  * statistics: the mean over n keys of the stochastic gradient converges to
    the QAT gradient (straight-through fake quant of the same forward codes) at
    the 1/sqrt(n) rate, with bounds derived from the exact noise covariance
    (tests/contraction_testlib.py);
  * jaxpr inspection: int8 (or fp8) operands really reach `dot_general`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import contraction_testlib as lib
import qtrain
from qtrain import formats as fmts
from qtrain import presets
from qtrain import prng
from qtrain import scaling
from qtrain.config import REUSE, DotConfig, MatmulConfig, TensorConfig

F32 = np.float32
HIGHEST = lax.Precision.HIGHEST
MATMUL = (((1,), (0,)), ((), ()))

# name, lhs shape, rhs shape, dimension_numbers
DOT_CASES = (
    ('2d', (16, 48), (48, 24), MATMUL),
    ('batched', (3, 8, 40), (3, 40, 12), (((2,), (1,)), ((0,), (0,)))),
    ('transposed', (40, 16), (24, 40), (((0,), (1,)), ((), ()))),
    ('two_contracting', (6, 5, 8), (8, 5, 7), (((1, 2), (1, 0)), ((), ()))),
)


# ---------------------------------------------------------------------------
# independent references
# ---------------------------------------------------------------------------
def _normal(seed: int, shape, scale: float = 1.0) -> np.ndarray:
  return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(F32)


def _sawb_scale_float64(a) -> float:
  """SAWB step clip/8 with LUQ's coefficients (12.1, 12.2), in float64."""
  a = np.asarray(a, np.float64)
  clip = 12.1 * np.sqrt(np.mean(a * a)) - 12.2 * np.mean(np.abs(a))
  return (clip if clip > 0 else np.max(np.abs(a))) / 8


def _sawb_int4(a) -> tuple[np.ndarray, np.ndarray]:
  """SAWB INT4 codes (-8..7) with the float64 step rounded to float32 (for statistics)."""
  s = np.full((1,) * np.ndim(a), _sawb_scale_float64(a), F32)
  return lib.codes_candidates(a, s, -8, 7)[0]


def _sawb_rtol(a) -> float:
  """Float32 error bound of the SAWB step relative to float64.

  Each mean of N non-negative terms has relative error <= (N + 1)·u (u = 2^-24;
  summation in any order, plus the division); sqrt halves it. The products
  c1·r and c2·m add the rounding of the float32 constants and of the product
  (2u each). The clip c1·r - c2·m subtracts, so these absolute errors count
  relative to the clip; the difference itself adds u, and /8 is exact.
  """
  a = np.asarray(a, np.float64)
  n, u = a.size, 2.0 ** -24
  r, m = np.sqrt(np.mean(a * a)), np.mean(np.abs(a))
  clip = 12.1 * r - 12.2 * m
  return ((12.1 * r * ((n + 1) / 2 + 2) + 12.2 * m * (n + 3)) / clip + 1) * u


def _np_dot_general(a: np.ndarray, b: np.ndarray, dn) -> np.ndarray:
  """lax.dot_general semantics in numpy (exact for int64 operands)."""
  (lc, rc), (lb, rb) = dn
  lf = [d for d in range(a.ndim) if d not in lc and d not in lb]
  rf = [d for d in range(b.ndim) if d not in rc and d not in rb]
  batch = tuple(a.shape[d] for d in lb)
  k = math.prod(a.shape[d] for d in lc)
  a3 = np.transpose(a, list(lb) + lf + list(lc)).reshape(batch + (-1, k))
  b3 = np.transpose(b, list(rb) + list(rc) + rf).reshape(batch + (k, -1))
  out = np.matmul(a3, b3)
  return out.reshape(batch + tuple(a.shape[d] for d in lf) + tuple(b.shape[d] for d in rf))


def _rhs_kept(rhs_ndim: int, dn) -> tuple[int, ...]:
  (_, rc), _ = dn
  return tuple(d for d in range(rhs_ndim) if d not in rc)


def _rhs_scale_to_out(s: np.ndarray, dn, n_lhs_free: int) -> np.ndarray:
  """Moves a rhs scale (size 1 on contracting axes) to the output layout."""
  (_, rc), (_, rb) = dn
  rf = [d for d in range(s.ndim) if d not in rc and d not in rb]
  t = np.transpose(s, list(rb) + list(rc) + rf)
  shape = tuple(s.shape[d] for d in rb) + (1,) * n_lhs_free + tuple(s.shape[d] for d in rf)
  return t.reshape(shape)


def _ref_forward(lhs_cands, rhs_cands, dn, lhs_ndim: int) -> list[np.ndarray]:
  """acc(codes).astype(f32) · (s_lhs · s_rhs) (the library's order), for every candidate pair."""
  (lc, _), (lb, _) = dn
  n_lhs_free = lhs_ndim - len(lc) - len(lb)
  outs = []
  for qa, sa in lhs_cands:
    for qb, sb in rhs_cands:
      acc = _np_dot_general(qa, qb, dn)
      outs.append((acc.astype(F32) * (sa.reshape(()) * _rhs_scale_to_out(sb, dn, n_lhs_free)),))
  return [o[0] for o in lib.unique(outs)]


def _sr_candidates(g: np.ndarray, key, slot: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """INT8 stochastic rounding of g with the documented key slot and qtrain.prng bits."""
  g = np.asarray(g, F32)
  amax = F32(np.max(np.abs(g)))
  u = np.asarray(prng.uniform(jax.random.fold_in(key, slot), g.shape), F32)
  out = []
  for scale_div in lib.DIVISIONS:
    s = lib.div(amax, 127, scale_div)
    for code_div in lib.DIVISIONS:
      x = np.clip(lib.div(g, s, code_div), F32(-128), F32(127))
      lo = np.floor(x)
      out.append(((lo + (u < x - lo)).astype(np.int64), s))
  return lib.unique(out)


def _ste(a, a_deq):
  return a + lax.stop_gradient(a_deq - a)


@functools.partial(jax.jit, static_argnames='dn')
def _qat_grads(x, w, xd, wd, c, dn=MATMUL):
  """Gradient of sum(dot(fake_quant(x), fake_quant(w)) · c) with straight-through estimators.

  xd, wd are the fake-quantized values; the gradient is dY·W_deqᵀ and X_deqᵀ·dY.
  """
  def loss(x, w):
    y = lax.dot_general(_ste(x, xd), _ste(w, wd), dn, precision=HIGHEST)
    return jnp.sum(y * c)
  return jax.grad(loss, (0, 1))(x, w)


def _dot(x, w, cfg, key=None, dn=MATMUL, **kw):
  return qtrain.dot_general(x, w, dn, config=cfg, key=key, **kw)


def _loss(cfg, c, dn=MATMUL):
  def loss(x, w, key):
    return jnp.sum(_dot(x, w, cfg, key, dn) * c)
  return loss


def _grad_config(rule: TensorConfig, fwd=None, residual=REUSE, share=False) -> DotConfig:
  fwd = MatmulConfig() if fwd is None else fwd
  return DotConfig(fwd=fwd, dlhs=MatmulConfig(lhs=rule, rhs=residual),
                   drhs=MatmulConfig(lhs=residual, rhs=rule), share_gradient_sample=share)


INT8_SR = TensorConfig(format=fmts.INT8, rounding='stochastic')


# ---------------------------------------------------------------------------
# forward: bit for bit against the reference
# ---------------------------------------------------------------------------
def _forward_cases():
  for name, ls, rs, dn in DOT_CASES:
    for per_channel in (False, True):
      yield (f'{name}_{"per_channel" if per_channel else "per_tensor"}', ls, rs, dn, per_channel)


class ForwardTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_forward_cases())
  def test_int8_forward_is_bit_exact(self, lhs_shape, rhs_shape, dn, per_channel):
    cfg = presets.int8(per_channel_weights=per_channel)
    fn = self.variant(lambda a, b, k: _dot(a, b, cfg, k, dn))
    rhs_keep = _rhs_kept(len(rhs_shape), dn) if per_channel else ()
    # 1) absmax 127·2^k in every group: exact scales, one reference.
    lhs, rhs = lib.pow2_groups(0, lhs_shape), lib.pow2_groups(1, rhs_shape, rhs_keep)
    want = _ref_forward(lib.absmax_candidates(lhs), lib.absmax_candidates(rhs, rhs_keep), dn,
                        len(lhs_shape))
    self.assertLen(want, 1)
    got = fn(lhs, rhs, jax.random.key(0))
    chex.assert_type(got, jnp.float32)
    chex.assert_trees_all_equal(got, want[0])
    # 2) Gaussian data with an outlier: either division convention, bit for bit.
    lhs, rhs = _normal(2, lhs_shape), _normal(3, rhs_shape, 0.1)
    lhs[(0,) * lhs.ndim] = 7.5
    want = _ref_forward(lib.absmax_candidates(lhs), lib.absmax_candidates(rhs, rhs_keep), dn,
                        len(lhs_shape))
    got = fn(lhs, rhs, jax.random.key(0))
    lib.assert_one_of(got, want)
    # Sanity of the oracle itself: close to the float product (INT8 error ~1%).
    float_out = np.asarray(lax.dot_general(lhs, rhs, dn, precision=HIGHEST))
    rel = np.linalg.norm(np.asarray(got) - float_out) / np.linalg.norm(float_out)
    self.assertLess(rel, 0.05)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('transposed', (40, 16), (24, 40), (((0,), (1,)), ((), ()))))
  def test_int4_sawb_forward(self, lhs_shape, rhs_shape, dn):
    """SAWB INT4 forward: exact given the step; the step is the formula to float32 accuracy.

    The SAWB step comes from two float32 means whose summation order XLA
    chooses (it differs between eager and jit by a few ulps), so no
    independent reference can fix its last bits. The step is therefore read
    from `qtrain.quantize` in the same computation (XLA computes it once), and
    checked against the float64 formula with the float32 error bound
    `_sawb_rtol`; given the step, codes and GEMM must match bit for bit.
    """
    lhs, rhs = _normal(4, lhs_shape), _normal(5, rhs_shape, 0.1)
    cfg = presets.int4()
    rule = cfg.fwd.lhs

    def fn(a, b, k):
      return _dot(a, b, cfg, k, dn), qtrain.quantize(a, rule).scale, qtrain.quantize(b, rule).scale

    got, sx, sw = self.variant(fn)(lhs, rhs, jax.random.key(0))
    for a, s in ((lhs, sx), (rhs, sw)):
      np.testing.assert_allclose(float(np.asarray(s).ravel()[0]), _sawb_scale_float64(a),
                                 rtol=_sawb_rtol(a))
    want = _ref_forward(lib.codes_candidates(lhs, sx, -8, 7), lib.codes_candidates(rhs, sw, -8, 7),
                        dn, len(lhs_shape))
    lib.assert_one_of(got, want)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ('bf16_default', jnp.bfloat16, None, jnp.bfloat16),
      ('f32_to_bf16', jnp.float32, jnp.bfloat16, jnp.bfloat16),
  )
  def test_output_dtype(self, in_dtype, preferred, out_dtype):
    lhs = jnp.asarray(lib.pow2_groups(6, (8, 32)), in_dtype)
    rhs = jnp.asarray(lib.pow2_groups(7, (32, 16)), in_dtype)
    fn = self.variant(lambda a, b, k: _dot(a, b, presets.int8(), k,
                                           preferred_element_type=preferred))
    got = fn(lhs, rhs, jax.random.key(0))
    chex.assert_type(got, out_dtype)
    # bf16 inputs are quantized from their exact float32 values.
    l32, r32 = np.asarray(lhs, F32), np.asarray(rhs, F32)
    (want,) = _ref_forward(lib.absmax_candidates(l32), lib.absmax_candidates(r32), MATMUL, 2)
    chex.assert_trees_all_equal(got, jnp.asarray(want).astype(out_dtype))
    grads = jax.jit(jax.grad(lambda a, b, k: jnp.sum(_dot(a, b, presets.int8(), k,
                                                          preferred_element_type=preferred)
                                                     .astype(jnp.float32)), (0, 1)))(
                                                         lhs, rhs, jax.random.key(1))
    chex.assert_type(grads, (in_dtype, in_dtype))


# ---------------------------------------------------------------------------
# float fallbacks
# ---------------------------------------------------------------------------
class FallbackTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      *[(name, ls, rs, dn) for name, ls, rs, dn in DOT_CASES])
  def test_config_none_is_lax_dot_general(self, lhs_shape, rhs_shape, dn):
    lhs, rhs = _normal(7, lhs_shape), _normal(8, rhs_shape)
    for precision, preferred in ((None, None), (HIGHEST, jnp.float32)):
      fn = self.variant(lambda a, b: qtrain.dot_general(  # pylint: disable=cell-var-from-loop
          a, b, dn, precision, preferred, config=None))
      ref = self.variant(lambda a, b: lax.dot_general(  # pylint: disable=cell-var-from-loop
          a, b, dn, precision, preferred))
      chex.assert_trees_all_equal(fn(lhs, rhs), ref(lhs, rhs))
      loss = lambda f: lambda a, b: jnp.sum(f(a, b) ** 2)
      chex.assert_trees_all_equal(jax.grad(loss(fn), (0, 1))(lhs, rhs),
                                  jax.grad(loss(ref), (0, 1))(lhs, rhs))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(('float_lhs', 'lhs'), ('float_rhs', 'rhs'))
  def test_one_float_operand(self, float_side):
    """fwd.lhs=None (float activations) or fwd.rhs=None: the other side is fake-quantized."""
    x, w, c = lib.pow2_groups(9, (16, 32)), lib.pow2_groups(10, (32, 24)), _normal(11, (16, 24))
    rule = TensorConfig(format=fmts.INT8)
    fwd = MatmulConfig(lhs=None, rhs=rule) if float_side == 'lhs' else MatmulConfig(lhs=rule)
    cfg = DotConfig(fwd=fwd)  # default backward: float dY, REUSE residuals
    fn = self.variant(lambda a, b: _dot(a, b, cfg, precision=HIGHEST))
    xq, sx = lib.absmax_int8(x)
    wq, sw = lib.absmax_int8(w)
    xd = x if float_side == 'lhs' else (xq.astype(F32) * sx)
    wd = (wq.astype(F32) * sw) if float_side == 'lhs' else w
    chex.assert_trees_all_equal(fn(x, w), lax.dot_general(xd, wd, MATMUL, precision=HIGHEST))
    grads = jax.grad(lambda a, b: jnp.sum(fn(a, b) * c), (0, 1))(x, w)
    # dX = dY·W_deqᵀ, dW = X_deqᵀ·dY: the QAT (straight-through) gradient.
    chex.assert_trees_all_equal(grads, _qat_grads(x, w, xd, wd, c))

  def test_precision_reaches_float_gemms_only(self):
    x, w = _normal(12, (8, 16)), _normal(13, (16, 4))
    int8_rule = TensorConfig(format=fmts.INT8)
    cases = (
        (None, 3, 0),  # plain lax: one float dot per GEMM, all with the precision
        (DotConfig(fwd=MatmulConfig(rhs=int8_rule)), 3, 0),
        (presets.int8(gradient_rounding='nearest'), 0, 3),
    )
    for cfg, n_float, n_int in cases:
      def loss(a, b, cfg=cfg):
        return jnp.sum(_dot(a, b, cfg, precision=HIGHEST))
      eqns = lib.find_eqns(jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, w).jaxpr)
      floats = [e for e in eqns if e.invars[0].aval.dtype == jnp.float32]
      ints = [e for e in eqns if e.invars[0].aval.dtype == jnp.int8]
      self.assertLen(floats, n_float, msg=str(cfg))
      self.assertLen(ints, n_int, msg=str(cfg))
      for e in floats:
        self.assertEqual(e.params['precision'], (HIGHEST, HIGHEST))
      for e in ints:  # codes GEMMs are exact whatever the precision
        self.assertIsNone(e.params['precision'])


# ---------------------------------------------------------------------------
# jaxpr and HLO structure
# ---------------------------------------------------------------------------
class StructureTest(chex.TestCase):

  def _grad_jaxpr(self, cfg, x, w):
    return jax.make_jaxpr(jax.grad(_loss(cfg, 1.0), (0, 1)))(x, w, jax.random.key(0))

  def test_int8_three_int8_gemms(self):
    x, w = _normal(14, (8, 32)), _normal(15, (32, 16))
    for cfg in (presets.int8(), presets.int8(per_channel_weights=True)):
      eqns = lib.find_eqns(self._grad_jaxpr(cfg, x, w).jaxpr)
      self.assertLen(eqns, 3)
      scopes = []
      for e in eqns:
        self.assertEqual([v.aval.dtype for v in e.invars], [jnp.int8, jnp.int8])
        self.assertEqual(e.outvars[0].aval.dtype, jnp.int32)
        scopes.append(str(e.source_info.name_stack))
      for scope, name in zip(scopes, ('qtrain/fwd', 'qtrain/dlhs', 'qtrain/drhs')):
        self.assertIn(name, scope)

  def test_int4_preset_forward_int8_backward_fp8(self):
    """INT4 codes ride int8 in the forward; INT4 x LOG2_FP4 backward GEMMs use e4m3 + f32."""
    x, w = _normal(16, (8, 32)), _normal(17, (32, 16))
    eqns = lib.find_eqns(self._grad_jaxpr(presets.int4(), x, w).jaxpr)
    self.assertLen(eqns, 3)
    fwd, *bwd = eqns
    self.assertEqual([v.aval.dtype for v in fwd.invars], [jnp.int8, jnp.int8])
    self.assertEqual(fwd.outvars[0].aval.dtype, jnp.int32)
    for e in bwd:
      self.assertEqual([v.aval.dtype for v in e.invars],
                       [jnp.float8_e4m3fn, jnp.float8_e4m3fn])
      self.assertEqual(e.outvars[0].aval.dtype, jnp.float32)

  def test_named_scopes_in_lowered_hlo(self):
    # The scopes are kept as op locations, so they show with debug_info=True.
    x, w = _normal(18, (8, 32)), _normal(19, (32, 16))
    # value_and_grad: with grad alone the forward GEMM is dead code and is dropped.
    lowered = jax.jit(jax.value_and_grad(_loss(presets.int8(), 1.0), (0, 1))).lower(
        x, w, jax.random.key(0))
    text = lowered.as_text(debug_info=True)
    for name in ('qtrain/fwd', 'qtrain/dlhs', 'qtrain/drhs'):
      self.assertIn(name, text)


# ---------------------------------------------------------------------------
# backward: bit for bit with the documented key slots
# ---------------------------------------------------------------------------
class BackwardExactTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_int8_backward_is_bit_exact(self):
    x, w, c = _normal(20, (24, 32)), _normal(21, (32, 16), 0.1), _normal(22, (24, 16))
    key = jax.random.key(3)
    fn = self.variant(jax.grad(_loss(presets.int8(), c), (0, 1)))
    dx, dw = fn(x, w, key)
    # Slot 2 draws dY for dX = Q(dY)·W_codesᵀ, slot 5 dY for dW = X_codesᵀ·Q(dY).
    lib.assert_one_of(dx, [(gq @ wq.T).astype(F32) * (sg * sw.reshape(()))
                           for gq, sg in _sr_candidates(c, key, 2)
                           for wq, sw in lib.absmax_candidates(w)])
    lib.assert_one_of(dw, [(xq.T @ gq).astype(F32) * (sg * sx.reshape(()))
                           for gq, sg in _sr_candidates(c, key, 5)
                           for xq, sx in lib.absmax_candidates(x)])

  def test_gvq_per_channel_gradient_for_dw(self):
    """drhs.rhs with PerChannel(): one dY scale per output column in the dW GEMM (DA-INT8 GVQ)."""
    x, w = _normal(23, (24, 32)), _normal(24, (32, 16), 0.1)
    # Columns of very different magnitudes: a per-tensor scale would crush the small ones.
    c = _normal(25, (24, 16)) * np.logspace(-3, 0, 16, dtype=F32)
    gvq = TensorConfig(format=fmts.INT8, granularity=scaling.PerChannel())
    cfg = DotConfig(fwd=presets.int8().fwd, dlhs=MatmulConfig(lhs=INT8_SR, rhs=REUSE),
                    drhs=MatmulConfig(lhs=REUSE, rhs=gvq))
    _, dw = jax.jit(jax.grad(_loss(cfg, c), (0, 1)))(x, w, jax.random.key(0))
    cands = lib.absmax_candidates(c, keep_axes=(1,))
    self.assertEqual(cands[0][1].shape, (1, 16))  # one scale per column of dY
    lib.assert_one_of(dw, [(xq.T @ gq).astype(F32) * (s_col * sx.reshape(()))
                           for gq, s_col in cands for xq, sx in lib.absmax_candidates(x)])


# ---------------------------------------------------------------------------
# gradient statistics
# ---------------------------------------------------------------------------
N_KEYS, N_SMALL = 256, 16
STAT_SHAPES = dict(x=(64, 16), w=(16, 32))  # dX: 1024 elements, dW: 512, dY: 2048


def _stat_inputs(seed: int):
  x = _normal(seed, STAT_SHAPES['x'])
  w = _normal(seed + 1, STAT_SHAPES['w'], 0.2)
  c = _normal(seed + 2, (STAT_SHAPES['x'][0], STAT_SHAPES['w'][1]))
  return x, w, c


def _sample_grads(cfg, x, w, c, n: int, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), n)
  fn = jax.jit(jax.vmap(jax.grad(_loss(cfg, c), (0, 1)), in_axes=(None, None, 0)))
  dx, dw = fn(x, w, keys)
  return np.asarray(dx), np.asarray(dw)


def _jacobians(xd, wd):
  """Matrices of the linear maps dY-noise -> dX = E·W_deqᵀ and -> dW = X_deqᵀ·E (row-major)."""
  xd, wd = np.asarray(xd, np.float64), np.asarray(wd, np.float64)
  jx = np.kron(np.eye(xd.shape[0]), wd)  # [(i,k), (i',n)] = δ_ii' W[k,n]
  jw = np.kron(xd.T, np.eye(wd.shape[1]))  # [(k,n), (i,n')] = X[i,k] δ_nn'
  return jx, jw


class GradientStatisticsTest(chex.TestCase):

  def _check(self, samples, ref, model):
    stats = lib.check_unbiased(samples[:N_KEYS], ref, model)
    small = samples[N_KEYS:].mean(0)
    lib.check_rate(small, N_SMALL, stats['mean'], N_KEYS, ref, model)

  def test_int8_sr_gradients_unbiased(self):
    x, w, c = _stat_inputs(30)
    dx, dw = _sample_grads(presets.int8(), x, w, c, N_KEYS + N_SMALL)
    xq, sx = lib.absmax_int8(x)
    wq, sw = lib.absmax_int8(w)
    xd, wd = xq.astype(F32) * sx, wq.astype(F32) * sw
    ref_dx, ref_dw = _qat_grads(x, w, xd, wd, c)
    jx, jw = _jacobians(xd, wd)
    h, p = lib.int_sr(c, np.max(np.abs(c)) / F32(127))
    model_x = lib.noise_model(jx, h, p)
    self._check(dx, ref_dx, model_x)
    self._check(dw, ref_dw, lib.noise_model(jw, h, p))
    # Power of the checks: a bias of one standard error per element, or a
    # variance off by 10%, is rejected.
    sd = np.sqrt(model_x.var).reshape(dx.shape[1:]) / np.sqrt(N_KEYS)
    with self.assertRaisesRegex(AssertionError, 'biased'):
      lib.check_unbiased(dx[:N_KEYS] + sd, ref_dx, model_x)
    with self.assertRaisesRegex(AssertionError, 'variance'):
      lib.check_unbiased(dx[:N_KEYS], ref_dx, lib.noise_model(jx, h * np.sqrt(1.1), p))

  def test_int8_per_channel_weights_fold_scale_into_dy(self):
    """dX = Q(dY·s_w)·W_codesᵀ is still unbiased for dY·W_deqᵀ; the noise is that of Q(dY·s_w)."""
    x, w, c = _stat_inputs(40)
    w = w * np.logspace(-2, 0, w.shape[1], dtype=F32)  # channel scales far apart
    dx, dw = _sample_grads(presets.int8(per_channel_weights=True), x, w, c, N_KEYS + N_SMALL)
    xq, sx = lib.absmax_int8(x)
    wq, sw = lib.absmax_int8(w, keep_axes=(1,))
    xd, wd = xq.astype(F32) * sx, wq.astype(F32) * sw
    ref_dx, ref_dw = _qat_grads(x, w, xd, wd, c)
    jx, jw = _jacobians(xd, wd)
    folded = c.astype(np.float64) * sw
    h, p = lib.int_sr(folded, np.max(np.abs(folded)) / 127)
    self._check(dx, ref_dx, lib.noise_model(jx, h / sw, p))  # noise back in dY units
    h, p = lib.int_sr(c, np.max(np.abs(c)) / F32(127))
    self._check(dw, ref_dw, lib.noise_model(jw, h, p))

  def test_int4_luq_gradients_unbiased(self):
    """LUQ (log2 FP4 SR + stochastic underflow), one shared sample: dX -> dY·W_sawbᵀ."""
    x, w, c = _stat_inputs(50)
    dx, dw = _sample_grads(presets.int4(), x, w, c, N_KEYS + N_SMALL)
    xq, sx = _sawb_int4(x)
    wq, sw = _sawb_int4(w)
    xd, wd = xq.astype(F32) * sx, wq.astype(F32) * sw
    ref_dx, ref_dw = _qat_grads(x, w, xd, wd, c)
    jx, jw = _jacobians(xd, wd)
    h, p = lib.log2_sr(c, float(np.max(np.abs(c))) / 2 ** 7, 7)
    self._check(dx, ref_dx, lib.noise_model(jx, h, p))
    self._check(dw, ref_dw, lib.noise_model(jw, h, p))

  def test_smp_two_samples_halve_the_variance(self):
    """samples=2 averages two independent GEMMs: the variance model with samples=2 fits."""
    x, w, c = _stat_inputs(60)
    rule = dataclasses.replace(INT8_SR, samples=2)
    cfg = _grad_config(rule, fwd=presets.int8().fwd)
    dx, _ = _sample_grads(cfg, x, w, c, N_KEYS)
    xq, sx = lib.absmax_int8(x)
    wq, sw = lib.absmax_int8(w)
    xd, wd = xq.astype(F32) * sx, wq.astype(F32) * sw
    ref_dx, _ = _qat_grads(x, w, xd, wd, c)
    jx, _ = _jacobians(xd, wd)
    h, p = lib.int_sr(c, np.max(np.abs(c)) / F32(127))
    # The variance check inside pins Var = (one-sample SR variance)/2 per element
    # and rejects the one-sample variance.
    lib.check_unbiased(dx, ref_dx, lib.noise_model(jx, h, p, samples=2))
    with self.assertRaisesRegex(AssertionError, 'variance'):
      lib.check_unbiased(dx, ref_dx, lib.noise_model(jx, h, p, samples=1))


# ---------------------------------------------------------------------------
# keys
# ---------------------------------------------------------------------------
class KeyTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.x, self.w, self.c = _normal(70, (16, 32)), _normal(71, (32, 8)), _normal(72, (16, 8))
    self.grad = jax.jit(jax.grad(_loss(presets.int8(), self.c), (0, 1)))

  def test_same_key_same_grads_other_key_other_grads(self):
    a = self.grad(self.x, self.w, jax.random.key(1))
    b = self.grad(self.x, self.w, jax.random.key(1))
    d = self.grad(self.x, self.w, jax.random.key(2))
    chex.assert_trees_all_equal(a, b)
    for u, v in zip(a, d):
      self.assertFalse(np.array_equal(u, v))

  def test_legacy_uint32_key(self):
    legacy = self.grad(self.x, self.w, jax.random.PRNGKey(5))
    typed = self.grad(self.x, self.w, jax.random.wrap_key_data(jax.random.PRNGKey(5)))
    chex.assert_tree_all_finite(legacy)
    chex.assert_trees_all_equal(legacy, typed)  # same key bits, same noise

  def test_key_gets_no_cotangent(self):
    def fwd_bwd(a, b, k):
      y, vjp = jax.vjp(lambda a, b, k: _dot(a, b, presets.int8(), k), a, b, k)
      return vjp(jnp.ones_like(y))
    # Shapes and dtypes of the vjp only (no compilation needed).
    dx, dw, dkey = jax.eval_shape(fwd_bwd, self.x, self.w, jax.random.key(0))
    chex.assert_shape((dx, dw), (self.x.shape, self.w.shape))
    self.assertEqual(dkey.dtype, jax.dtypes.float0)

  def test_missing_key_is_an_error(self):
    with self.assertRaisesRegex(ValueError, 'key'):
      _dot(self.x, self.w, presets.int8())
    with self.assertRaisesRegex(ValueError, 'key'):
      _dot(self.x, self.w, presets.int4())

  def test_deterministic_config_needs_no_key(self):
    cfg = presets.int8(gradient_rounding='nearest')
    self.assertFalse(cfg.needs_key)
    loss = lambda a, b: jnp.sum(_dot(a, b, cfg) * self.c)
    grads = jax.jit(jax.grad(loss, (0, 1)))(self.x, self.w)
    chex.assert_tree_all_finite(grads)
    # Round-to-nearest dY: dX = round(dY/s)·W_codesᵀ·s·s_w exactly.
    lib.assert_one_of(grads[0], [(gq @ wq.T).astype(F32) * (sg.reshape(()) * sw.reshape(()))
                                 for gq, sg in lib.absmax_candidates(self.c)
                                 for wq, sw in lib.absmax_candidates(self.w)])


# ---------------------------------------------------------------------------
# config options
# ---------------------------------------------------------------------------
def _identity_grads(cfg, c, key):
  """dX and dW with X = W = I: with float residuals they are the quantized dY itself."""
  eye = jnp.eye(c.shape[0], dtype=jnp.float32)
  return jax.jit(jax.grad(_loss(cfg, c), (0, 1)))(eye, eye, key)


def _nearest_on_grid(v: np.ndarray, grid: np.ndarray) -> np.ndarray:
  """Nearest point of a sorted non-negative grid to |v|, with v's sign (linear distance)."""
  a = np.abs(v)[..., None]
  return np.sign(v) * grid[np.argmin(np.abs(a - grid), axis=-1)]


class ConfigOptionsTest(chex.TestCase):

  def test_share_gradient_sample(self):
    c = _normal(80, (16, 16))
    key = jax.random.key(0)
    shared = _grad_config(INT8_SR, residual=None, share=True)
    dx, dw = _identity_grads(shared, c, key)
    chex.assert_trees_all_equal(dx, dw)  # one sample Q(dY) feeds both GEMMs
    # Drawn in the dlhs slot (2).
    lib.assert_one_of(dx, [q.astype(F32) * s for q, s in _sr_candidates(c, key, 2)])
    dx, dw = _identity_grads(dataclasses.replace(shared, share_gradient_sample=False), c, key)
    self.assertFalse(np.array_equal(dx, dw))
    lib.assert_one_of(dw, [q.astype(F32) * s for q, s in _sr_candidates(c, key, 5)])

  def test_int4_preset_shares_its_sample(self):
    # X = W = I get identical SAWB codes and scales, so dX == dW iff Q(dY) is shared.
    c = _normal(81, (16, 16))
    dx, dw = _identity_grads(presets.int4(), c, jax.random.key(0))
    chex.assert_trees_all_equal(dx, dw)
    unshared = dataclasses.replace(presets.int4(), share_gradient_sample=False)
    dx, dw = _identity_grads(unshared, c, jax.random.key(0))
    self.assertFalse(np.array_equal(dx, dw))

  def test_two_phase_rounding(self):
    """TPR: dlhs.lhs on the even radix-4 grid s·4^k, drhs.rhs on the odd grid s·2·4^k."""
    c = _normal(82, (16, 16))
    even = TensorConfig(format=fmts.LOG4_FP4)
    odd = TensorConfig(format=fmts.LOG4_FP4_ODD)
    cfg = DotConfig(dlhs=MatmulConfig(lhs=even, rhs=None), drhs=MatmulConfig(lhs=None, rhs=odd))
    dx, dw = _identity_grads(cfg, c, None)
    s = F32(np.max(np.abs(c)) / F32(64))  # shared absmax scale: max|dY| -> 4^3
    k = np.arange(-3, 4, dtype=np.float64)
    even_grid = np.concatenate([[0.0], 4.0 ** k])
    odd_grid = np.concatenate([[0.0], 2 * 4.0 ** k])
    units = c.astype(np.float64) / s
    chex.assert_trees_all_equal(dx, (_nearest_on_grid(units, even_grid).astype(F32) * s))
    chex.assert_trees_all_equal(dw, (_nearest_on_grid(units, odd_grid).astype(F32) * s))
    self.assertFalse(np.array_equal(dx, dw))


# ---------------------------------------------------------------------------
# transformations
# ---------------------------------------------------------------------------
class TransformationTest(chex.TestCase):

  def test_vmap_per_example_keys_equals_loop(self):
    x, w = _normal(90, (6, 32)), _normal(91, (32, 8))
    dn = (((0,), (0,)), ((), ()))  # one example x_i of shape (32,)

    def loss(w, xi, key):
      return jnp.sum(jnp.tanh(_dot(xi, w, presets.int8(), key, dn)))

    keys = jax.random.split(jax.random.key(0), 6)
    batched = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0)))(w, x, keys)
    one = jax.jit(jax.grad(loss))
    looped = jnp.stack([one(w, x[i], keys[i]) for i in range(6)])
    # Per-example (per vmapped instance) scales and counter-based noise: identical.
    chex.assert_trees_all_equal(batched, looped)

  def _mlp(self, n_layers=2, width=32):
    ws = _normal(92, (n_layers, width, width), 0.2)
    x = _normal(93, (16, width))
    cfg = presets.int8()

    def layer(h, w, key):
      return jnp.tanh(_dot(h, w, cfg, key))

    def unrolled(ws, x, key):
      h = x
      for i in range(n_layers):
        h = layer(h, ws[i], jax.random.fold_in(key, i))
      return jnp.sum(h ** 2)

    def scanned(ws, x, key, remat=False):
      def body(h, wi):
        w, i = wi
        return layer(h, w, jax.random.fold_in(key, i)), None
      h, _ = lax.scan(jax.checkpoint(body) if remat else body, x, (ws, jnp.arange(n_layers)))
      return jnp.sum(h ** 2)

    return ws, x, unrolled, scanned

  def test_checkpoint_and_scan_are_bit_identical(self):
    """Remat recomputes the same forward and the same key-derived noise: same bits."""
    ws, x, unrolled, scanned = self._mlp()
    key = jax.random.key(0)
    plain = jax.jit(jax.grad(unrolled, (0, 1)))(ws, x, key)
    remat = jax.checkpoint(unrolled, policy=jax.checkpoint_policies.nothing_saveable)
    chex.assert_trees_all_equal(jax.jit(jax.grad(remat, (0, 1)))(ws, x, key), plain)
    scan_remat = functools.partial(scanned, remat=True)
    chex.assert_trees_all_equal(jax.jit(jax.grad(scan_remat, (0, 1)))(ws, x, key), plain)

  @pytest.mark.slow
  def test_checkpoint_default_policy_and_plain_scan(self):
    ws, x, unrolled, scanned = self._mlp(n_layers=3)
    key = jax.random.key(1)
    plain = jax.jit(jax.grad(unrolled, (0, 1)))(ws, x, key)
    chex.assert_trees_all_equal(jax.jit(jax.grad(jax.checkpoint(unrolled), (0, 1)))(ws, x, key),
                                plain)
    chex.assert_trees_all_equal(jax.jit(jax.grad(scanned, (0, 1)))(ws, x, key), plain)

  def test_train_step_does_not_retrace(self):
    chex.clear_trace_counter()
    cfg = presets.int8()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(w, x, key):
      loss, g = jax.value_and_grad(lambda w: jnp.mean(_dot(x, w, cfg, key) ** 2))(w)
      return w - 0.1 * g, loss

    w = jnp.asarray(_normal(94, (32, 8)))
    for i in range(3):
      w, loss = step(w, jnp.asarray(_normal(95 + i, (16, 32))), jax.random.key(i))
      chex.assert_tree_all_finite((w, loss))


# ---------------------------------------------------------------------------
# sharding
# ---------------------------------------------------------------------------
class ShardingTest(chex.TestCase):

  @parameterized.named_parameters(('auto', AxisType.Auto), ('explicit', AxisType.Explicit))
  def test_data_parallel_equals_single_device(self, axis_type):
    if jax.device_count() < 8:
      self.skipTest('needs 8 devices (tests/conftest.py sets them up on the CPU)')
    x, w, c = _normal(100, (64, 32)), _normal(101, (32, 16)), _normal(102, (64, 16))
    x[37, 5] = 40.0  # an outlier on one shard only: the scale must be the global max
    key = jax.random.key(0)

    def run(x, w, c, key):
      def loss(x, w):
        y = _dot(x, w, presets.int8(), key)
        return jnp.sum(y * c), y
      (loss_value, y), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, w)
      return loss_value, y, grads

    ref_loss, ref_y, ref_grads = jax.jit(run)(x, w, c, key)
    mesh = jax.make_mesh((8,), ('data',), axis_types=(axis_type,))
    with jax.set_mesh(mesh):
      xs = jax.device_put(x, NamedSharding(mesh, P('data', None)))
      cs = jax.device_put(c, NamedSharding(mesh, P('data', None)))
      ws = jax.device_put(w, NamedSharding(mesh, P()))
      loss_value, y, (dx, dw) = jax.jit(run)(xs, ws, cs, key)
    chex.assert_trees_all_equal((y, dx, dw), (ref_y, *ref_grads))
    self.assertEqual(dx.sharding.spec[0], 'data')
    # The loss is a float32 sum in a different order: |error| <= M·eps·Σ|terms|.
    bound = ref_y.size * np.finfo(F32).eps * float(np.sum(np.abs(np.asarray(ref_y) * c)))
    self.assertLessEqual(abs(float(loss_value) - float(ref_loss)), bound)


# ---------------------------------------------------------------------------
# bad input and numerical edge cases
# ---------------------------------------------------------------------------
class BadInputTest(chex.TestCase):

  def setUp(self):
    super().setUp()
    self.x, self.w = _normal(110, (8, 16)), _normal(111, (16, 4))
    self.key = jax.random.key(0)

  def test_integer_operand(self):
    with self.assertRaisesRegex(TypeError, 'lhs'):
      _dot(self.x.astype(np.int32), self.w, presets.int8(), self.key)
    with self.assertRaisesRegex(TypeError, 'rhs'):
      _dot(self.x, self.w.astype(np.int8), presets.int8(), self.key)

  def test_mismatched_contracting_dims(self):
    with self.assertRaisesRegex(ValueError, r'lhs.shape\[1\]=16 vs rhs.shape\[0\]=5'):
      _dot(self.x, np.ones((5, 4), F32), presets.int8(), self.key)
    with self.assertRaisesRegex(ValueError, 'batch'):
      _dot(np.ones((2, 3, 4), F32), np.ones((5, 4, 6), F32), presets.int8(), self.key,
           (((2,), (1,)), ((0,), (0,))))

  def test_config_of_wrong_type(self):
    for bad in (TensorConfig(format=fmts.INT8), fmts.INT8, 'int8', MatmulConfig()):
      with self.assertRaisesRegex(TypeError, 'DotConfig'):
        _dot(self.x, self.w, bad, self.key)

  def test_per_block_not_supported(self):
    block = TensorConfig(format=fmts.INT8, granularity=scaling.PerBlock(block_size=8))
    with self.assertRaisesRegex(NotImplementedError, 'PerBlock'):
      _dot(self.x, self.w, DotConfig(fwd=MatmulConfig(lhs=block)))

  def test_per_channel_on_contracted_axis(self):
    rule = TensorConfig(format=fmts.INT8, granularity=scaling.PerChannel(axes=(0,)))
    with self.assertRaisesRegex(ValueError, 'contracted'):
      _dot(self.x, self.w, DotConfig(fwd=MatmulConfig(rhs=rule)))

  def test_invalid_configs(self):
    other = dataclasses.replace(INT8_SR, format=fmts.INT4)
    with self.assertRaisesRegex(ValueError, 'share_gradient_sample'):
      DotConfig(dlhs=MatmulConfig(lhs=INT8_SR, rhs=REUSE),
                drhs=MatmulConfig(lhs=REUSE, rhs=other), share_gradient_sample=True)
    with self.assertRaisesRegex(ValueError, 'REUSE'):
      DotConfig(fwd=MatmulConfig(lhs=REUSE))
    with self.assertRaisesRegex(ValueError, 'REUSE'):
      DotConfig(dlhs=MatmulConfig(lhs=REUSE))

  @staticmethod
  @functools.cache
  def _fwd_bwd():
    def fwd_bwd(a, b, g, key):
      y, vjp = jax.vjp(lambda a, b: _dot(a, b, presets.int8(), key), a, b)
      return (y, *vjp(g))
    return jax.jit(fwd_bwd)

  def test_all_zero_inputs(self):
    ones, zeros = np.ones((8, 4), F32), np.zeros((8, 4), F32)
    for x, w in ((np.zeros_like(self.x), self.w), (self.x, np.zeros_like(self.w)),
                 (np.zeros_like(self.x), np.zeros_like(self.w))):
      y, dx, dw = self._fwd_bwd()(x, w, ones, self.key)
      chex.assert_trees_all_equal(y, zeros)
      chex.assert_tree_all_finite((dx, dw))
      # dX = dY·W_deqᵀ and dW = X_deqᵀ·dY vanish with the zero operand.
      if not x.any():
        chex.assert_trees_all_equal(dw, np.zeros_like(w))
      if not w.any():
        chex.assert_trees_all_equal(dx, np.zeros_like(x))
    # A zero cotangent gives exact zeros, not NaN (its scale is guarded to 1).
    _, dx, dw = self._fwd_bwd()(self.x, self.w, zeros, self.key)
    chex.assert_trees_all_equal((dx, dw), (np.zeros_like(self.x), np.zeros_like(self.w)))

  def test_nan_policy(self):
    """A NaN in a per-tensor-scaled operand makes its scale NaN: the whole output is NaN.

    Never silently finite (stricter than a float GEMM, where one NaN spoils
    one row). dX = Q(dY)·W_deqᵀ does not touch the poisoned operand and stays
    finite; dW = X_deqᵀ·Q(dY) is all NaN.
    """
    x = self.x.copy()
    x[3, 4] = np.nan
    y, dx, dw = self._fwd_bwd()(x, self.w, np.ones((8, 4), F32), self.key)
    self.assertTrue(np.all(np.isnan(y)))
    chex.assert_tree_all_finite(dx)
    self.assertTrue(np.all(np.isnan(dw)))


if __name__ == '__main__':
  pytest.main([__file__])
