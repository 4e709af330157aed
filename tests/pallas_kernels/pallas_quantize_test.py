"""Tests for pallas_kernels.quantize: GPU-interpret mode bit for bit, CUDA cross-lowering, bad input.

Oracles: `qtrain.quantize` under jit (the library's XLA path, whose `x / s`
XLA compiles as `x * (1/s)`), and an independent numpy transcription of
absmax INT8 quantization in that convention: s = max|x|/127 (either
division convention for the scale itself), q = clip(round(x · f32(1/s))).
Shapes give grids of several CTAs in both directions (global tile offsets).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtrain import config as cfgs
from qtrain import formats as fmts
from qtrain import scaling
from qtrain.quantize import quantize as xla_quantize
from pallas_kernels import _common
from pallas_kernels import quantize as pq

# (128, 256) with 64 x 128 CTA blocks and 64-column register tiles: a 2 x 2 grid, 2 tiles each.
_T = pq.TuningConfig(block_rows=64, block_cols=128, tile_cols=64)
F32 = np.float32
_ROW = scaling.PerChannel(axes=(0,))

_CASES = {
    'int8_tensor': (cfgs.TensorConfig(format=fmts.INT8), (128, 256), jnp.float32, None),
    'int8_row_3d': (cfgs.TensorConfig(format=fmts.INT8, granularity=scaling.PerChannel(
        axes=(0, 1))), (2, 64, 256), jnp.float32, None),
    'int4_sawb_fp8': (cfgs.TensorConfig(format=fmts.INT4, calibration=scaling.Sawb()),
                      (128, 256), jnp.float32, jnp.float8_e4m3fn),
    'int4n_row_pow2_bf16': (cfgs.TensorConfig(format=fmts.IntFormat(bits=4, narrow=True),
                                              calibration=scaling.AbsMax(power_of_two=True),
                                              granularity=_ROW), (128, 256), jnp.bfloat16, None),
    'e4m3_tensor': (cfgs.TensorConfig(format=fmts.FP8_E4M3), (128, 256), jnp.float32, None),
    'e5m2_row': (cfgs.TensorConfig(format=fmts.FP8_E5M2, granularity=_ROW), (128, 256),
                 jnp.float32, None),
}


def _x(shape, dtype, seed=0):
  # Heavy-ish tails and a row with tiny values exercise saturation and fp8 subnormals.
  x = np.random.default_rng(seed).standard_t(4, shape).astype(np.float32) * 3 + 0.25
  x.reshape(-1, shape[-1])[5] *= 1e-4
  return jnp.asarray(x, dtype)


def _bits(codes):
  codes = jnp.asarray(codes)
  if jnp.issubdtype(codes.dtype, jnp.floating):
    return np.asarray(jax.lax.bitcast_convert_type(codes, jnp.uint8))
  return np.asarray(codes)


def _run(x, cfg, cd, tuning=_T):
  return jax.jit(lambda x: pq.quantize_pallas(x, cfg, codes_dtype=cd, tuning=tuning,
                                              interpret=True))(x)


@pytest.mark.parametrize('name', list(_CASES))
def test_interpret_equals_qtrain_quantize(name):
  cfg, shape, dtype, cd = _CASES[name]
  x = _x(shape, dtype)
  got = _run(x, cfg, cd)
  want = jax.jit(lambda x: pq.reference(x, cfg, codes_dtype=cd))(x)
  assert got.codes.dtype == want.codes.dtype and got.codes.shape == x.shape
  np.testing.assert_array_equal(_bits(got.codes), _bits(want.codes))
  np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(want.scale))
  assert got.granularity == cfg.granularity and got.format == cfg.format


def test_int8_absmax_matches_numpy_oracle():
  x = _x((128, 256), jnp.float32, seed=1)
  got = _run(x, cfgs.TensorConfig(format=fmts.INT8), None)
  xn = np.asarray(x)
  amax = F32(np.max(np.abs(xn)))
  s = float(np.asarray(got.scale).ravel()[0])
  assert s in (float(amax / F32(127)), float(amax * (F32(1) / F32(127))))
  want = np.clip(np.round(xn * (F32(1) / F32(s))), -127, 127)
  np.testing.assert_array_equal(np.asarray(got.codes), want.astype(np.int8))


def test_nan_policy_row_and_tensor():
  x = np.asarray(_x((128, 256), jnp.float32, seed=2)).copy()
  x[3, 7] = np.nan
  x[70, 0] = np.inf
  got = _run(jnp.asarray(x), cfgs.TensorConfig(format=fmts.INT8, granularity=_ROW), None)
  scale = np.asarray(got.scale)[:, 0]
  assert np.isnan(scale[3]) and np.isnan(scale[70])
  assert np.isfinite(np.delete(scale, [3, 70])).all()
  assert not np.asarray(got.codes)[[3, 70]].any()
  ok = np.delete(np.arange(128), [3, 70])
  want = np.clip(np.round(x[ok] * (F32(1) / scale[ok, None])), -127, 127)
  np.testing.assert_array_equal(np.asarray(got.codes)[ok], want)
  tensor = _run(jnp.asarray(x), cfgs.TensorConfig(format=fmts.INT8), None)
  assert np.isnan(np.asarray(tensor.scale)).all() and not np.asarray(tensor.codes).any()


def test_all_zero_gives_zero_codes_and_finite_scale():
  got = _run(jnp.zeros((64, 128), jnp.float32), cfgs.TensorConfig(format=fmts.INT8), None)
  assert not np.asarray(got.codes).any()
  np.testing.assert_array_equal(np.asarray(got.scale), np.full((1, 1), F32(1) / F32(127)))


def test_tiling_does_not_change_the_result():
  cfg = cfgs.TensorConfig(format=fmts.INT8, granularity=_ROW)
  x = _x((128, 256), jnp.float32, seed=3)
  a = _run(x, cfg, None)
  b = _run(x, cfg, None, pq.TuningConfig(block_rows=128, block_cols=256, tile_cols=128))
  np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))


def test_dispatch():
  cfg = cfgs.TensorConfig(format=fmts.INT8)
  x = _x((64, 128), jnp.float32, seed=4)
  want = jax.jit(lambda x: xla_quantize(x, cfg))(x)
  for impl in (None, 'xla', 'interpret'):
    got = jax.jit(lambda x, i=impl: pq.quantize(x, cfg, implementation=i, tuning=_T))(x)
    np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(want.codes))
  with pytest.raises(ValueError, match='implementation'):
    pq.quantize(x, cfg, implementation='cuda')
  with pytest.raises(ValueError, match='scale='):
    pq.quantize(x, cfg, scale=1.0, implementation='interpret')


@pytest.mark.parametrize('name', ['int8_tensor', 'int4_sawb_fp8', 'e4m3_tensor'])
def test_lowers_for_cuda_at_benchmark_shape(name):
  cfg, _, _, cd = _CASES[name]
  x = jax.ShapeDtypeStruct((8192, 4096), jnp.float32)
  lowered = _common.lower_for_cuda(lambda x: pq.quantize_pallas(x, cfg, codes_dtype=cd), x)
  assert 'mosaic_gpu' in lowered.as_text()


def test_row_config_lowers_for_cuda():
  cfg = cfgs.TensorConfig(format=fmts.INT8, granularity=_ROW)
  x = jax.ShapeDtypeStruct((8192, 4096), jnp.bfloat16)
  _common.lower_for_cuda(lambda x: pq.quantize_pallas(x, cfg), x)


_BAD = {
    'rows': ((100, 128), jnp.float32, cfgs.TensorConfig(format=fmts.INT8), None, 'rows M=100'),
    'last_dim': ((64, 200), jnp.float32, cfgs.TensorConfig(format=fmts.INT8), None,
                 'last dimension N=200'),
    'rank1': ((128,), jnp.float32, cfgs.TensorConfig(format=fmts.INT8), None, 'rank >= 2'),
    'stochastic': ((64, 128), jnp.float32, cfgs.TensorConfig(format=fmts.INT8,
                                                             rounding='stochastic'), None,
                   'rounding'),
    'minmax': ((64, 128), jnp.float32, cfgs.TensorConfig(format=fmts.INT8,
                                                         calibration=scaling.MinMax()), None,
               'calibration'),
    'unsigned': ((64, 128), jnp.float32, cfgs.TensorConfig(format=fmts.UINT4), None, 'uint4'),
    'bits16': ((64, 128), jnp.float32, cfgs.TensorConfig(format=fmts.IntFormat(bits=16)), None,
               'int16'),
    'e2m1': ((64, 128), jnp.float32, cfgs.TensorConfig(format=fmts.FP4_E2M1), None, 'e2m1'),
    'per_column': ((64, 128), jnp.float32, cfgs.TensorConfig(
        format=fmts.INT8, granularity=scaling.PerChannel(axes=(1,))), None, 'granularity'),
    'codes_dtype': ((64, 128), jnp.float32, cfgs.TensorConfig(format=fmts.INT8),
                    jnp.float8_e4m3fn, 'codes_dtype'),
    'float16_ok': ((64, 128), jnp.float16, cfgs.TensorConfig(format=fmts.INT8), None, None),
}


@pytest.mark.parametrize('name', list(_BAD))
def test_bad_input_raises_and_can_use_is_false(name):
  shape, dtype, cfg, cd, match = _BAD[name]
  x = jnp.zeros(shape, dtype)
  if match is None:  # float16 is supported: the control case
    assert pq.can_use(x, cfg, codes_dtype=cd)
    return
  assert not pq.can_use(x, cfg, codes_dtype=cd)
  with pytest.raises(ValueError, match=match):
    pq.quantize_pallas(x, cfg, codes_dtype=cd, interpret=True)


def test_non_float_x_is_a_type_error():
  x = jnp.zeros((64, 128), jnp.int32)
  assert not pq.can_use(x, fmts.INT8)
  with pytest.raises(TypeError, match='x must be a floating'):
    pq.quantize_pallas(x, fmts.INT8, interpret=True)


def test_tuning_config_validation():
  with pytest.raises(ValueError, match='block_rows'):
    pq.TuningConfig(block_rows=96)
  with pytest.raises(ValueError, match='block_cols'):
    pq.TuningConfig(block_cols=512)
  with pytest.raises(ValueError, match='tile_cols'):
    pq.TuningConfig(block_cols=256, tile_cols=96)
  assert dataclasses.is_dataclass(pq.TuningConfig())
