"""Tests for pallas_kernels.int8_matmul: interpret mode bit for bit, CUDA cross-lowering, bad input.

The oracle is a plain-numpy transcription: int64 matmul, float32 conversion,
one float32 multiply by a_scale[i] * b_scale[j], then the output cast.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels import _common
from pallas_kernels import int8_matmul as im

_SMALL = im.Int8MatmulTuning(tile_m=64, tile_n=64, tile_k=64, max_concurrent_steps=2)


def _codes(seed, shape):
  return np.random.default_rng(seed).integers(-127, 128, shape).astype(np.int8)


def _scales(seed, n):
  return np.random.default_rng(seed).uniform(1e-3, 2e-3, n).astype(np.float32)


def _oracle(a, bt, rs, cs, out_dtype):
  acc = a.astype(np.int64) @ bt.astype(np.int64).T
  if out_dtype == np.int32:
    return acc.astype(np.int32)
  rs = np.ones(a.shape[0], np.float32) if rs is None else np.broadcast_to(
      np.asarray(rs, np.float32).reshape(-1), (a.shape[0],))
  cs = np.ones(bt.shape[0], np.float32) if cs is None else np.broadcast_to(
      np.asarray(cs, np.float32).reshape(-1), (bt.shape[0],))
  y = acc.astype(np.float32) * (rs[:, None] * cs[None, :])
  return y.astype(ml_dtypes.bfloat16 if out_dtype == 'bf16' else np.float32)


# (tuning, a_scale kind, b_scale kind, out dtype, b_layout)
_CASES = [
    (im.DEFAULT_TUNING, 'row', 'col', 'bf16', 'nk'),
    (im.DEFAULT_TUNING, 'tensor', 'tensor', 'f32', 'kn'),
    (_SMALL, 'row2d', None, 'f32', 'kn'),
    (_SMALL, None, 'col2d', 'bf16', 'nk'),
    (_SMALL, None, None, 'i32', 'nk'),
]


@pytest.mark.parametrize('tuning,sa_kind,sb_kind,out,layout', _CASES)
def test_interpret_matches_numpy_bit_for_bit(tuning, sa_kind, sb_kind, out, layout):
  m, n, k = 128, 256, 256
  a, bt = _codes(1, (m, k)), _codes(2, (n, k))
  rs, cs = _scales(3, m), _scales(4, n)
  sa = {'row': rs, 'row2d': rs[:, None], 'tensor': rs[:1], None: None}[sa_kind]
  sb = {'col': cs, 'col2d': cs[None, :], 'tensor': cs[:1], None: None}[sb_kind]
  out_dtype = {'bf16': jnp.bfloat16, 'f32': jnp.float32, 'i32': jnp.int32}[out]
  b = bt if layout == 'nk' else np.ascontiguousarray(bt.T)
  run = jax.jit(functools.partial(im.int8_matmul, a_scale=sa, b_scale=sb, out_dtype=out_dtype,
                                  b_layout=layout, tuning=tuning, interpret=True))
  got = np.asarray(run(a, b))
  want = _oracle(a, bt, sa, sb, np.int32 if out == 'i32' else out)
  assert got.dtype == want.dtype
  np.testing.assert_array_equal(got, want)
  # The XLA reference is the same function of the inputs.
  ref = im.reference(a, b, a_scale=sa, b_scale=sb, out_dtype=out_dtype, b_layout=layout)
  np.testing.assert_array_equal(np.asarray(ref), want)


def test_large_accumulator_is_exact():
  """Sums beyond 2^24 stay exact in the int32 output (float32 would round them)."""
  m, n, k = 128, 256, 2048
  a = np.full((m, k), 127, np.int8)
  bt = np.full((n, k), 127, np.int8)
  bt[0, 0] = 126  # 127*127*2048 = 33032192 > 2^24: odd sums are not float32 values
  a[0, 1] = -127
  want = _oracle(a, bt, None, None, np.int32)
  assert np.any(want.astype(np.float32).astype(np.int64) != want)  # the test can fail
  got = jax.jit(functools.partial(im.int8_matmul, out_dtype=jnp.int32, b_layout='nk',
                                  interpret=True))(a, bt)
  np.testing.assert_array_equal(np.asarray(got), want)


_BENCH = [(1024, 1024, 1024), (8192, 8192, 8192), (8192, 16384, 4096), (8192, 4096, 16384)]


@pytest.mark.parametrize('m,n,k', _BENCH)
@pytest.mark.parametrize('out_dtype', [jnp.float32, jnp.bfloat16])
def test_lowers_for_cuda_at_benchmark_shapes(m, n, k, out_dtype):
  s = jax.ShapeDtypeStruct
  fn = functools.partial(im.int8_matmul, out_dtype=out_dtype, b_layout='nk')
  text = _common.lower_for_cuda(
      lambda a, b, rs, cs: fn(a, b, a_scale=rs, b_scale=cs),
      s((m, k), jnp.int8), s((n, k), jnp.int8), s((m,), jnp.float32), s((n,), jnp.float32)
  ).as_text()
  assert 'mosaic_gpu' in text


def test_lowering_rejects_a_tiling_over_the_smem_budget():
  big = im.Int8MatmulTuning(tile_m=256, tile_n=256, max_concurrent_steps=8)
  with pytest.raises(ValueError, match='SMEM'):
    im.int8_matmul(jnp.zeros((1024, 1024), jnp.int8), jnp.zeros((1024, 1024), jnp.int8),
                   tuning=big)


_BAD = [
    (dict(a=(128, 100), b=(100, 256)), 'K=100 is not a multiple of the tile 128'),
    (dict(a=(100, 128), b=(128, 256)), 'M=100 is not a multiple of the tile 128'),
    (dict(a=(128, 128), b=(128, 300)), 'N=300 is not a multiple of the tile 256'),
    (dict(a=(128, 128), b=(256, 256)), 'K differs'),
    (dict(a=(128, 128), b=(128, 256), b_dtype=jnp.float32), 'int8 x float32'),
    (dict(a=(128, 128), b=(128, 256), out_dtype=jnp.float16), 'out_dtype=float16'),
    (dict(a=(128, 128), b=(128, 256), b_layout='mn'), "b_layout='mn'"),
    (dict(a=(2, 128, 128), b=(128, 256)), '2-D'),
]


@pytest.mark.parametrize('spec,message', _BAD)
def test_bad_input_raises_and_can_use_declines(spec, message):
  a = jnp.zeros(spec['a'], jnp.int8)
  b = jnp.zeros(spec['b'], spec.get('b_dtype', jnp.int8))
  kw = dict(out_dtype=spec.get('out_dtype', jnp.float32), b_layout=spec.get('b_layout', 'kn'))
  with pytest.raises(ValueError, match=message):
    im.int8_matmul(a, b, interpret=True, **kw)
  assert not im.can_use(a, b, interpret=True, **kw)


def test_bad_scales_and_tunings_raise():
  a, b = jnp.ones((128, 128), jnp.int8), jnp.ones((128, 256), jnp.int8)
  with pytest.raises(ValueError, match='a_scale of shape'):
    im.int8_matmul(a, b, a_scale=jnp.ones((3,)), interpret=True)
  with pytest.raises(ValueError, match='scales must be None|must be None'):
    im.int8_matmul(a, b, a_scale=jnp.ones(()), out_dtype=jnp.int32, interpret=True)
  with pytest.raises(ValueError, match='tile_m=96'):
    im.int8_matmul(a, b, tuning=im.Int8MatmulTuning(tile_m=96), interpret=True)
  with pytest.raises(ValueError, match='epi_tile_m'):
    im.Int8MatmulTuning(epi_tile_m=32).check()


def test_can_use_needs_hopper_unless_interpret():
  a, b = jax.ShapeDtypeStruct((128, 128), jnp.int8), jax.ShapeDtypeStruct((128, 256), jnp.int8)
  assert im.can_use(a, b, interpret=True)
  assert not im.can_use(a, b)  # this CPU machine has no Hopper GPU
