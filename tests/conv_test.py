"""Tests for qtrain.conv_general_dilated: quantized forward and backward convolutions.

The forward is checked bit for bit against an independent numpy reference:
absmax INT8 codes, an exact int64 convolution of the codes (shifted windows and
matmuls), cast to float32 and multiplied by the combined scale acc·(s_x·s_w).
The two divisions of the absmax quantizer may be evaluated by XLA as IEEE
divisions or as multiplications by the reciprocal; both are enumerated
(contraction_testlib.DIVISIONS), and power-of-two scales pin one reference.
The stochastic backward is checked statistically against the QAT (straight-
through fake-quant) convolution gradient, with bounds derived from the exact
noise covariance (contraction_testlib).
"""

from __future__ import annotations

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
from qtrain import scaling
from qtrain.config import DotConfig, MatmulConfig, TensorConfig

F32 = np.float32
HIGHEST = lax.Precision.HIGHEST
NHWC = ('NHWC', 'HWIO', 'NHWC')
O_AXIS = 3  # output-feature axis of an HWIO kernel

# name, lhs shape, rhs shape, strides, padding, feature_group_count
# One input shape throughout (odd spatial size: strides leave a remainder), so
# the eagerly run quantizer ops compile once.
CONV_CASES = (
    ('same_s1', (2, 9, 9, 4), (3, 3, 4, 6), (1, 1), 'SAME', 1),
    ('valid_s2', (2, 9, 9, 4), (3, 3, 4, 6), (2, 2), 'VALID', 1),
    ('same_s2_rect_kernel', (2, 9, 9, 4), (3, 2, 4, 6), (2, 2), 'SAME', 1),
    ('depthwise', (2, 9, 9, 4), (3, 3, 1, 8), (1, 1), 'SAME', 4),
)


def _normal(seed: int, shape, scale: float = 1.0) -> np.ndarray:
  return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(F32)


def _np_conv_nhwc(x: np.ndarray, w: np.ndarray, strides, padding, groups: int) -> np.ndarray:
  """NHWC x HWIO convolution in numpy, exact for int64 operands."""
  n, h, wd, c = x.shape
  kh, kw, ci, o = w.shape
  pads = lax.padtype_to_pads((h, wd), (kh, kw), strides, padding) if isinstance(
      padding, str) else padding
  xp = np.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  sh, sw = strides
  oh = (xp.shape[1] - kh) // sh + 1
  ow = (xp.shape[2] - kw) // sw + 1
  og = o // groups
  out = np.zeros((n, oh, ow, o), x.dtype)
  for i in range(kh):
    for j in range(kw):
      patch = xp[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :]
      for g in range(groups):
        out[..., g * og:(g + 1) * og] += (patch[..., g * ci:(g + 1) * ci]
                                          @ w[i, j, :, g * og:(g + 1) * og])
  return out


def _ref_forward(lhs_cands, rhs_cands, strides, padding, groups) -> list[np.ndarray]:
  outs = []
  for qx, sx in lhs_cands:
    for qw, sw in rhs_cands:
      acc = _np_conv_nhwc(qx, qw, strides, padding, groups)
      outs.append((acc.astype(F32) * (sx.reshape(()) * sw.reshape(1, 1, 1, -1)),))
  return [o[0] for o in lib.unique(outs)]


def _conv(x, w, cfg, key=None, strides=(1, 1), padding='SAME', groups=1, **kw):
  return qtrain.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC,
                                     feature_group_count=groups, config=cfg, key=key, **kw)


def _float_conv(x, w, strides=(1, 1), padding='SAME', groups=1):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC,
                                  feature_group_count=groups, precision=HIGHEST)


def _forward_cases():
  for name, ls, rs, st, pad, groups in CONV_CASES:
    for per_channel in (False, True):
      yield (f'{name}_{"per_channel" if per_channel else "per_tensor"}', ls, rs, st, pad, groups,
             per_channel)


class ConvForwardTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*_forward_cases())
  def test_int8_forward_is_bit_exact(self, lhs_shape, rhs_shape, strides, padding, groups,
                                     per_channel):
    cfg = presets.int8(per_channel_weights=per_channel)
    fn = self.variant(lambda a, b, k: _conv(a, b, cfg, k, strides, padding, groups))
    w_keep = (O_AXIS,) if per_channel else ()
    # 1) absmax 127·2^k per group: one reference.
    x, w = lib.pow2_groups(10, lhs_shape), lib.pow2_groups(11, rhs_shape, w_keep)
    want = _ref_forward(lib.absmax_candidates(x), lib.absmax_candidates(w, w_keep), strides,
                        padding, groups)
    self.assertLen(want, 1)
    got = fn(x, w, jax.random.key(0))
    chex.assert_type(got, jnp.float32)
    chex.assert_trees_all_equal(got, want[0])
    # 2) Gaussian data: either division convention, bit for bit.
    x, w = _normal(12, lhs_shape), _normal(13, rhs_shape, 0.2)
    want = _ref_forward(lib.absmax_candidates(x), lib.absmax_candidates(w, w_keep), strides,
                        padding, groups)
    got = fn(x, w, jax.random.key(0))
    lib.assert_one_of(got, want)
    # The oracle's own sanity: close to the float convolution (INT8 error ~1%).
    ref = np.asarray(_float_conv(x, w, strides, padding, groups))
    self.assertLess(np.linalg.norm(np.asarray(got) - ref) / np.linalg.norm(ref), 0.05)

  def test_native_int8_carrier_is_bit_exact(self):
    """int_carrier='native' (int8 operands, int32 accumulation) gives the same bits."""
    x, w = _normal(14, (2, 8, 8, 4)), _normal(15, (3, 3, 4, 6), 0.2)
    key = jax.random.key(0)
    cfg = presets.int8(per_channel_weights=True)

    def fwd_bwd(carrier):
      def f(a, b):
        return jnp.sum(_conv(a, b, cfg, key, int_carrier=carrier) ** 2)
      return jax.jit(jax.value_and_grad(f, (0, 1)))(x, w)

    chex.assert_trees_all_equal(fwd_bwd('native'), fwd_bwd('float32'))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ('same_s1', (1, 1), 'SAME', 1), ('valid_s2', (2, 2), 'VALID', 1),
      ('depthwise', (1, 1), 'SAME', 4))
  def test_config_none_is_lax(self, strides, padding, groups):
    x = _normal(16, (2, 9, 9, 4))
    w = _normal(17, (3, 3, 4 // groups, 8))
    fn = self.variant(lambda a, b: _conv(a, b, None, None, strides, padding, groups,
                                         precision=HIGHEST))
    ref = self.variant(lambda a, b: _float_conv(a, b, strides, padding, groups))
    chex.assert_trees_all_equal(fn(x, w), ref(x, w))
    loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)))
    chex.assert_trees_all_equal(jax.grad(loss(fn), (0, 1))(x, w),
                                jax.grad(loss(ref), (0, 1))(x, w))


class ConvStructureTest(chex.TestCase):

  def test_three_int8_convolutions(self):
    x, w = _normal(18, (2, 8, 8, 4)), _normal(19, (3, 3, 4, 6))
    for cfg in (presets.int8(), presets.int8(per_channel_weights=True)):
      def loss(a, b, k, cfg=cfg):
        return jnp.sum(_conv(a, b, cfg, k, (2, 2), int_carrier='native') ** 2)
      jaxpr = jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, w, jax.random.key(0)).jaxpr
      convs = lib.find_eqns(jaxpr, 'conv_general_dilated')
      self.assertLen(convs, 3)
      for e, scope in zip(convs, ('qtrain/fwd', 'qtrain/dlhs', 'qtrain/drhs')):
        self.assertEqual([v.aval.dtype for v in e.invars], [jnp.int8, jnp.int8])
        self.assertEqual(e.outvars[0].aval.dtype, jnp.int32)
        self.assertIn(scope, str(e.source_info.name_stack))

  def test_cpu_default_carries_codes_in_float32(self):
    """int_carrier='auto' on the CPU backend: the int8 codes travel as exact float32."""
    if jax.default_backend() != 'cpu':
      self.skipTest('CPU-specific default')
    x, w = _normal(20, (2, 8, 8, 4)), _normal(21, (3, 3, 4, 6))
    loss = lambda a, b, k: jnp.sum(_conv(a, b, presets.int8(), k) ** 2)
    convs = lib.find_eqns(jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, w, jax.random.key(0)).jaxpr,
                 'conv_general_dilated')
    self.assertLen(convs, 3)
    for e in convs:
      self.assertEqual([v.aval.dtype for v in e.invars], [jnp.float32, jnp.float32])


# ---------------------------------------------------------------------------
# gradient statistics
# ---------------------------------------------------------------------------
N_KEYS, N_SMALL = 256, 16


class ConvGradientStatisticsTest(chex.TestCase):

  def _run(self, per_channel: bool, strides, seed: int):
    x = _normal(seed, (2, 8, 8, 4))
    w = _normal(seed + 1, (3, 3, 4, 8), 0.3)
    if per_channel:
      w = w * np.logspace(-2, 0, 8, dtype=F32)  # output channels far apart
    cfg = presets.int8(per_channel_weights=per_channel)
    y_shape = jax.eval_shape(lambda a, b: _float_conv(a, b, strides), x, w).shape
    c = _normal(seed + 2, y_shape)

    def loss(a, b, key):
      return jnp.sum(_conv(a, b, cfg, key, strides) * c)

    keys = jax.random.split(jax.random.key(seed), N_KEYS + N_SMALL)
    dx, dw = jax.jit(jax.vmap(jax.grad(loss, (0, 1)), in_axes=(None, None, 0)))(x, w, keys)
    dx, dw = np.asarray(dx), np.asarray(dw)

    # QAT reference: straight-through gradient of conv(fake_quant(x), fake_quant(w)).
    w_keep = (O_AXIS,) if per_channel else ()
    qx, sx = lib.absmax_int8(x)
    qw, sw = lib.absmax_int8(w, w_keep)
    xd, wd = qx.astype(F32) * sx, qw.astype(F32) * sw

    @jax.jit
    def qat_grads(a, b):
      ste = lambda v, d: v + lax.stop_gradient(d - v)
      return jax.grad(lambda a, b: jnp.sum(_float_conv(ste(a, xd), ste(b, wd), strides) * c),
                      (0, 1))(a, b)

    ref_dx, ref_dw = (np.asarray(t) for t in qat_grads(x, w))
    jx = lib.vjp_jacobian(lambda a: _float_conv(a, jnp.asarray(wd), strides), jnp.asarray(xd))
    jw = lib.vjp_jacobian(lambda b: _float_conv(jnp.asarray(xd), b, strides), jnp.asarray(wd))
    # dY noise: SR of dY (dW GEMM) and, with per-channel weights, of dY·s_w (dX GEMM:
    # the O-axis weight scale is folded into dY; its noise is mapped back to dY units).
    h, p = lib.int_sr(c, np.max(np.abs(c)) / F32(127))
    model_w = lib.noise_model(jw, h, p)
    if per_channel:
      s_out = sw.reshape(1, 1, 1, -1).astype(np.float64)
      folded = c * s_out
      hf, pf = lib.int_sr(folded, np.max(np.abs(folded)) / 127)
      model_x = lib.noise_model(jx, hf / s_out, pf)
    else:
      model_x = lib.noise_model(jx, h, p)
    for samples, ref, model in ((dx, ref_dx, model_x), (dw, ref_dw, model_w)):
      stats = lib.check_unbiased(samples[:N_KEYS], ref, model)
      lib.check_rate(samples[N_KEYS:].mean(0), N_SMALL, stats['mean'], N_KEYS, ref, model)

  def test_int8_sr_conv_gradients_unbiased(self):
    self._run(per_channel=False, strides=(1, 1), seed=30)

  def test_int8_per_channel_strided_conv_gradients_unbiased(self):
    self._run(per_channel=True, strides=(2, 2), seed=40)


# ---------------------------------------------------------------------------
# sharding, keys, bad input
# ---------------------------------------------------------------------------
class ConvShardingTest(chex.TestCase):

  @parameterized.named_parameters(('auto', AxisType.Auto), ('explicit', AxisType.Explicit))
  def test_batch_sharded_equals_single_device(self, axis_type):
    if jax.device_count() < 8:
      self.skipTest('needs 8 devices (tests/conftest.py sets them up on the CPU)')
    x, w = _normal(50, (8, 6, 6, 4)), _normal(51, (3, 3, 4, 6))
    x[5, 2, 3, 1] = 30.0  # an outlier on one shard: the scale is the global max
    c = _normal(52, (8, 6, 6, 6))
    key = jax.random.key(0)

    def run(x, w, c):
      def loss(x, w):
        y = _conv(x, w, presets.int8(per_channel_weights=True), key)
        return jnp.sum(y * c), y
      (_, y), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, w)
      return y, grads

    ref = jax.jit(run)(x, w, c)
    mesh = jax.make_mesh((8,), ('data',), axis_types=(axis_type,))
    with jax.set_mesh(mesh):
      batch = NamedSharding(mesh, P('data'))
      y, (dx, dw) = jax.jit(run)(jax.device_put(x, batch), jax.device_put(w, NamedSharding(
          mesh, P())), jax.device_put(c, batch))
    chex.assert_trees_all_equal((y, (dx, dw)), ref)
    self.assertEqual(dx.sharding.spec[0], 'data')


class ConvMiscTest(chex.TestCase):

  def test_keys(self):
    x, w, c = _normal(60, (2, 6, 6, 4)), _normal(61, (3, 3, 4, 6)), _normal(62, (2, 6, 6, 6))
    grad = jax.jit(jax.grad(lambda a, b, k: jnp.sum(_conv(a, b, presets.int8(), k) * c),
                            (0, 1)))
    a = grad(x, w, jax.random.key(1))
    chex.assert_trees_all_equal(a, grad(x, w, jax.random.key(1)))
    chex.assert_tree_all_finite(grad(x, w, jax.random.PRNGKey(1)))  # legacy key
    for u, v in zip(a, grad(x, w, jax.random.key(2))):
      self.assertFalse(np.array_equal(u, v))
    with self.assertRaisesRegex(ValueError, 'key'):
      _conv(x, w, presets.int8())

  def test_bad_input(self):
    x, w = _normal(63, (2, 6, 6, 4)), _normal(64, (3, 3, 4, 6))
    with self.assertRaisesRegex(TypeError, 'lhs'):
      _conv(x.astype(np.int8), w, presets.int8(gradient_rounding='nearest'))
    with self.assertRaisesRegex(TypeError, 'DotConfig'):
      _conv(x, w, TensorConfig(format=fmts.INT8))
    with self.assertRaisesRegex(ValueError, 'int_carrier'):
      _conv(x, w, presets.int8(gradient_rounding='nearest'), int_carrier='int4')
    block = TensorConfig(format=fmts.INT8, granularity=scaling.PerBlock(block_size=2))
    with self.assertRaisesRegex(NotImplementedError, 'PerBlock'):
      _conv(x, w, DotConfig(fwd=MatmulConfig(rhs=block)))

  def test_all_zero_inputs(self):
    @jax.jit
    def fwd_bwd(a, b, g):
      y, vjp = jax.vjp(lambda a, b: _conv(a, b, presets.int8(), jax.random.key(0)), a, b)
      return (y, *vjp(g))

    x, w = np.zeros((2, 6, 6, 4), F32), _normal(65, (3, 3, 4, 6))
    y, dx, dw = fwd_bwd(x, w, np.ones((2, 6, 6, 6), F32))
    chex.assert_trees_all_equal((y, dw), (np.zeros_like(y), np.zeros_like(w)))
    chex.assert_tree_all_finite(dx)


if __name__ == '__main__':
  pytest.main([__file__])
