"""Tests for pallas_kernels.stochastic_quantize: in-kernel Threefry bits equal the XLA path's.

Oracles: `qtrain.quantize(x, config, key=key, stream=s)` under jit, bit for
bit, on grids of several CTAs (so the global element index of each tile
matters), and for SR to INT8 an independent numpy transcription of the rule
with the documented counter layout's uniforms (`qtrain.prng.uniform`):
q = lo + [u < v − lo], lo = floor(clip(v, −128, 127)), v = x · f32(1/s).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtrain import config as cfgs
from qtrain import formats as fmts
from qtrain import numerics
from qtrain import prng
from qtrain import scaling
from pallas_kernels import _common
from pallas_kernels import stochastic_quantize as sq

_T = sq.TuningConfig(block_rows=64, block_cols=128, tile_cols=64)  # 2 x 2 grid at (128, 256)
F32 = np.float32
_SR8 = cfgs.TensorConfig(format=fmts.INT8, rounding='stochastic')
_CASES = {
    'int8_tensor': (_SR8, (128, 256), None),
    'int4_row_3d_fp8': (cfgs.TensorConfig(format=fmts.INT4, rounding='stochastic',
                                          granularity=scaling.PerChannel(axes=(0, 1))),
                        (2, 64, 256), jnp.float8_e4m3fn),
    'luq_fp4': (numerics.luq_config(4), (128, 256), None),
}


def _x(shape, seed=0):
  x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  x.reshape(-1, shape[-1])[1] *= 1e-3  # LUQ: many stochastic underflows
  return jnp.asarray(x)


def _bits(codes):
  if jnp.issubdtype(codes.dtype, jnp.floating):
    return np.asarray(jax.lax.bitcast_convert_type(codes, jnp.uint8))
  return np.asarray(codes)


def _run(x, cfg, key, cd=None, stream=0, tuning=_T):
  return jax.jit(lambda x, k: sq.quantize_stochastic_pallas(
      x, cfg, k, stream=stream, codes_dtype=cd, tuning=tuning, interpret=True))(x, key)


@pytest.mark.parametrize('name', list(_CASES))
def test_kernel_bits_equal_xla_path(name):
  cfg, shape, cd = _CASES[name]
  x, key = _x(shape), jax.random.key(11)
  got = _run(x, cfg, key, cd, stream=2)
  want = jax.jit(lambda x, k: sq.reference(x, cfg, k, stream=2, codes_dtype=cd))(x, key)
  np.testing.assert_array_equal(_bits(got.codes), _bits(want.codes))
  np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(want.scale))


def test_sr_int8_matches_numpy_oracle_and_is_not_rtn():
  x, key = _x((128, 256), seed=1), jax.random.key(5)
  got = _run(x, _SR8, key)
  xn = np.asarray(x)
  s = np.asarray(got.scale).ravel()[0]
  v = np.clip(xn * (F32(1) / s), -128, 127)
  lo = np.floor(v)
  u = np.asarray(prng.uniform(key, x.shape))
  want = lo + (u < v - lo)
  np.testing.assert_array_equal(np.asarray(got.codes), want.astype(np.int8))
  # Not round-to-nearest: a good fraction of codes differ from RTN.
  assert np.mean(np.asarray(got.codes) != np.round(v)) > 0.1


def test_keys_streams_and_tiling():
  x = _x((128, 256), seed=2)
  a = _run(x, _SR8, jax.random.key(1))
  b = _run(x, _SR8, jax.random.key(2))
  c = _run(x, _SR8, jax.random.key(1), stream=1)
  d = _run(x, _SR8, jax.random.key(1), tuning=sq.TuningConfig(block_rows=128, block_cols=256,
                                                               tile_cols=128))
  assert np.mean(np.asarray(a.codes) != np.asarray(b.codes)) > 0.1
  assert np.mean(np.asarray(a.codes) != np.asarray(c.codes)) > 0.1
  np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(d.codes))
  legacy = _run(x, _SR8, jax.random.PRNGKey(1))  # same seed words as key(1)
  np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(legacy.codes))


def test_luq_nan_policy():
  x = np.asarray(_x((64, 128), seed=3)).copy()
  x[10, 3] = np.nan
  got = _run(jnp.asarray(x), numerics.luq_config(4), jax.random.key(0))
  assert np.isnan(np.asarray(got.scale)).all()
  assert not _bits(got.codes).any()


@pytest.mark.parametrize('name', ['int8_tensor', 'luq_fp4'])
def test_lowers_for_cuda_at_benchmark_shape(name):
  cfg, _, cd = _CASES[name]
  key = jax.random.key(0)
  x = jax.ShapeDtypeStruct((8192, 4096), jnp.float32)
  lowered = _common.lower_for_cuda(
      lambda x: sq.quantize_stochastic_pallas(x, cfg, key, codes_dtype=cd), x)
  assert 'mosaic_gpu' in lowered.as_text()


def test_dispatch_and_bad_input():
  x = _x((64, 128), seed=4)
  key = jax.random.key(3)
  want = jax.jit(lambda x, k: sq.reference(x, _SR8, k))(x, key)
  got = jax.jit(lambda x, k: sq.quantize(x, _SR8, key=k, implementation='interpret',
                                         tuning=_T))(x, key)
  np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(want.codes))
  with pytest.raises(ValueError, match='key is required'):
    sq.quantize(x, _SR8, implementation='interpret')
  with pytest.raises(ValueError, match='single key'):
    sq.quantize_stochastic_pallas(x, _SR8, jax.random.split(key, 2), interpret=True)
  nearest = cfgs.TensorConfig(format=fmts.INT8)
  radix4 = cfgs.TensorConfig(format=fmts.LOG4_FP4, rounding='stochastic')
  for cfg, shape, match in ((nearest, (64, 128), 'rounding'), (radix4, (64, 128), 'radix-2'),
                            (_SR8, (96, 128), 'rows M=96'), (_SR8, (64, 40), 'N=40')):
    assert not sq.can_use(jnp.zeros(shape), cfg)
    with pytest.raises(ValueError, match=match):
      sq.quantize_stochastic_pallas(jnp.zeros(shape), cfg, key, interpret=True)
  with pytest.raises(TypeError, match='floating'):
    sq.quantize_stochastic_pallas(jnp.zeros((64, 128), jnp.int8), _SR8, key, interpret=True)
