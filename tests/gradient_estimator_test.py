"""Tests for `qtrain.config.GradientEstimator` in the dY slots of `qtrain.dot_general`.

Oracle: the backward GEMMs must equal a plain float contraction of the
estimator's output with the residual operand (the forward's dequantized codes),
computed here by hand; the key each GEMM receives must follow the documented
slots (`fold_in(key, 2)` for dX, `fold_in(key, 5)` for dW, the dX slot for both
under `share_gradient_sample`).
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import qtrain
from qtrain import config as cfgs
from qtrain import formats as fmts


@dataclasses.dataclass(frozen=True, kw_only=True)
class _NoisyScale(cfgs.GradientEstimator):
  """dY · (1 + u), u ~ U[0, 1) from the key: records what it was given."""

  def estimate(self, g, key, *, gemm, residual, kept):
    u = jax.random.uniform(key, g.shape)
    return g * (1.0 + u)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Deterministic(cfgs.GradientEstimator):

  @property
  def stochastic(self):
    return False

  def estimate(self, g, key, *, gemm, residual, kept):
    return g * 2.0


def _int8_fwd() -> cfgs.MatmulConfig:
  rule = cfgs.TensorConfig(format=fmts.IntFormat(bits=8))
  return cfgs.MatmulConfig(lhs=rule, rhs=rule)


def _setup(est, share=False):
  cfg = cfgs.DotConfig(fwd=_int8_fwd(), dlhs=cfgs.MatmulConfig(lhs=est, rhs=cfgs.REUSE),
                       drhs=cfgs.MatmulConfig(lhs=cfgs.REUSE, rhs=est),
                       share_gradient_sample=share)
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (6, 5))
  w = jax.random.normal(kw, (5, 4))
  dy = jax.random.normal(kg, (6, 4))
  return cfg, x, w, dy


def _dequantized(x):
  s = jnp.max(jnp.abs(x)) / 127
  return jnp.clip(jnp.round(x / s), -127, 127) * s


@pytest.mark.parametrize('share', [False, True])
def test_backward_gemms_multiply_the_estimate_with_the_forward_codes(share):
  est = _NoisyScale()
  cfg, x, w, dy = _setup(est, share)
  key = jax.random.key(3)
  dims = (((1,), (0,)), ((), ()))
  _, vjp = jax.vjp(lambda a, b: qtrain.dot_general(a, b, dims, config=cfg, key=key), x, w)
  dx, dw = vjp(dy)
  k_dx = jax.random.fold_in(key, 2)
  k_dw = k_dx if share else jax.random.fold_in(key, 5)
  g_dx = dy * (1 + jax.random.uniform(k_dx, dy.shape))
  g_dw = dy * (1 + jax.random.uniform(k_dw, dy.shape))
  chex.assert_trees_all_close(dx, g_dx @ _dequantized(w).T, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(dw, _dequantized(x).T @ g_dw, rtol=1e-5, atol=1e-5)


def test_estimator_makes_the_config_need_a_key():
  cfg, x, w, _ = _setup(_NoisyScale())
  assert cfg.needs_key
  with pytest.raises(ValueError, match='key is required'):
    qtrain.dot_general(x, w, (((1,), (0,)), ((), ())), config=cfg)
  det, *_ = _setup(_Deterministic())
  assert not det.needs_key


def test_estimator_is_refused_outside_the_dy_slots():
  with pytest.raises(ValueError, match='dY slots'):
    cfgs.DotConfig(fwd=cfgs.MatmulConfig(lhs=_NoisyScale()))
  with pytest.raises(ValueError, match='dY slots'):
    cfgs.DotConfig(dlhs=cfgs.MatmulConfig(rhs=_NoisyScale()))


def test_wrong_shape_from_estimate_is_reported():

  @dataclasses.dataclass(frozen=True, kw_only=True)
  class Bad(cfgs.GradientEstimator):

    def estimate(self, g, key, *, gemm, residual, kept):
      return g[:1]

  cfg, x, w, dy = _setup(Bad())
  f = lambda a: qtrain.dot_general(a, w, (((1,), (0,)), ((), ())), config=cfg,
                                   key=jax.random.key(0)).sum()
  with pytest.raises(ValueError, match='returned shape'):
    jax.grad(f)(x)


def test_conv_with_an_estimator_matches_float_transposes_of_the_estimate():
  est = _Deterministic()
  cfg = cfgs.DotConfig(fwd=_int8_fwd(), dlhs=cfgs.MatmulConfig(lhs=est, rhs=cfgs.REUSE),
                       drhs=cfgs.MatmulConfig(lhs=cfgs.REUSE, rhs=est))
  kx, kw = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (2, 6, 6, 3))
  w = jax.random.normal(kw, (3, 3, 3, 4))
  dn = ('NHWC', 'HWIO', 'NHWC')
  conv = lambda a, b, c: qtrain.conv_general_dilated(a, b, (1, 1), 'SAME',
                                                     dimension_numbers=dn, config=c)
  fconv = lambda a, b: lax.conv_general_dilated(a, b, (1, 1), 'SAME', dimension_numbers=dn)
  y, vjp = jax.vjp(lambda a, b: conv(a, b, cfg), x, w)
  dy = jnp.ones_like(y)
  dx, dw = vjp(dy)
  _, fvjp = jax.vjp(fconv, _dequantized(x), _dequantized(w))
  rx, rw = fvjp(2.0 * dy)
  np.testing.assert_allclose(dx, rx, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dw, rw, rtol=1e-5, atol=1e-4)
