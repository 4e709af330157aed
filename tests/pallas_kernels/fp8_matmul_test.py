"""Tests for pallas_kernels.fp8_matmul: 4-bit codes on FP8 wgmma, interpret, lowering, bad input.

Oracle: plain numpy in float64 (exact for 4-bit code products and their sums
at these K), rounded once to float32, times the float32 combined scale.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels import _common
from pallas_kernels import fp8_matmul as fm

_E4M3, _E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
_SMALL = fm.Fp8MatmulTuning(tile_m=64, tile_n=64, tile_k=128, max_concurrent_steps=2)


def _int4(seed, shape, dtype):
  return np.random.default_rng(seed).integers(-8, 8, shape).astype(np.float32).astype(dtype)


def _log2(seed, shape, dtype):
  """Signed radix-2 log FP4 codes: 0, ±2^0 ... ±2^7."""
  rng = np.random.default_rng(seed)
  v = np.sign(rng.standard_normal(shape)) * 2.0 ** rng.integers(0, 8, shape)
  v[rng.random(shape) < 0.1] = 0.0
  return v.astype(np.float32).astype(dtype)


def _oracle(a, bt, rs, cs, out_dtype):
  acc = (a.astype(np.float64) @ bt.astype(np.float64).T).astype(np.float32)
  rs = np.broadcast_to(np.asarray(rs, np.float32).reshape(-1), (a.shape[0],))
  cs = np.broadcast_to(np.asarray(cs, np.float32).reshape(-1), (bt.shape[0],))
  return (acc * (rs[:, None] * cs[None, :])).astype(out_dtype)


_CASES = [  # a dtype, b dtype, tuning, scale kinds, out dtype
    (_E4M3, _E4M3, fm.DEFAULT_TUNING, 'row+col', ml_dtypes.bfloat16),
    (_E4M3, _E5M2, _SMALL, 'tensor', np.float32),
    (_E5M2, _E5M2, _SMALL, 'row+col', np.float32),
]


@pytest.mark.parametrize('a_dtype,b_dtype,tuning,scales,out', _CASES)
def test_four_bit_codes_bit_for_bit_in_interpret_mode(a_dtype, b_dtype, tuning, scales, out):
  m, n, k = 128, 256, 256
  a, bt = _int4(1, (m, k), a_dtype), _log2(2, (n, k), b_dtype)
  rng = np.random.default_rng(3)
  rs = rng.uniform(1e-3, 2e-3, m).astype(np.float32)
  cs = rng.uniform(1e-3, 2e-3, n).astype(np.float32)
  if scales == 'tensor':
    rs, cs = rs[:1], cs[:1]
  out_dtype = jnp.bfloat16 if out is ml_dtypes.bfloat16 else jnp.float32
  run = jax.jit(functools.partial(fm.fp8_matmul, a_scale=rs, b_scale=cs, out_dtype=out_dtype,
                                  b_layout='nk', tuning=tuning, interpret=True))
  got = np.asarray(run(a, bt))
  np.testing.assert_array_equal(got, _oracle(a, bt, rs, cs, out))


def test_general_fp8_values_within_the_documented_bound():
  """Arbitrary e4m3 values (partial sums not exact in f32): within error_bound."""
  rng = np.random.default_rng(5)
  a = rng.standard_normal((128, 256)).astype(np.float32).astype(_E4M3)
  b = rng.standard_normal((256, 256)).astype(np.float32).astype(_E4M3)
  got = jax.jit(functools.partial(fm.fp8_matmul, interpret=True))(a, b)
  want = a.astype(np.float64) @ b.astype(np.float64)
  bound = np.asarray(fm.error_bound(jnp.asarray(a), jnp.asarray(b)))
  assert np.all(np.abs(np.asarray(got, np.float64) - want) <= bound)


_BENCH = [(1024, 1024, 1024), (8192, 8192, 8192), (8192, 16384, 4096), (8192, 4096, 16384)]


@pytest.mark.parametrize('m,n,k', _BENCH)
@pytest.mark.parametrize('b_dtype', [_E4M3, _E5M2])
def test_lowers_for_cuda_at_benchmark_shapes(m, n, k, b_dtype):
  s = jax.ShapeDtypeStruct
  fn = functools.partial(fm.fp8_matmul, out_dtype=jnp.bfloat16, b_layout='nk')
  text = _common.lower_for_cuda(
      lambda a, b, rs, cs: fn(a, b, a_scale=rs, b_scale=cs),
      s((m, k), _E4M3), s((n, k), b_dtype), s((m,), jnp.float32), s((n,), jnp.float32)
  ).as_text()
  assert 'mosaic_gpu' in text


_BAD = [
    (dict(a=(128, 100), b=(100, 256)), 'K=100 is not a multiple of the tile 128'),
    (dict(a=(64, 128), b=(128, 256)), 'M=64 is not a multiple of the tile 128'),
    (dict(a=(128, 128), b=(128, 128)), 'N=128 is not a multiple of the tile 256'),
    (dict(a=(128, 128), b=(128, 256), dtype=jnp.int8), 'int8 x int8 are not supported'),
    (dict(a=(128, 128), b=(128, 256), out_dtype=jnp.int32), 'out_dtype=int32'),
]


@pytest.mark.parametrize('spec,message', _BAD)
def test_bad_input_raises_and_can_use_declines(spec, message):
  a = jnp.zeros(spec['a'], spec.get('dtype', _E4M3))
  b = jnp.zeros(spec['b'], spec.get('dtype', _E4M3))
  kw = dict(out_dtype=spec.get('out_dtype', jnp.float32))
  with pytest.raises(ValueError, match=message):
    fm.fp8_matmul(a, b, interpret=True, **kw)
  assert not fm.can_use(a, b, interpret=True, **kw)


def test_can_use_accepts_good_shapes_only_in_interpret_mode_here():
  a, b = jax.ShapeDtypeStruct((128, 128), _E4M3), jax.ShapeDtypeStruct((128, 256), _E5M2)
  assert fm.can_use(a, b, interpret=True)
  assert not fm.can_use(a, b)
