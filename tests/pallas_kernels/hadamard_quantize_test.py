"""Tests for pallas_kernels.hadamard_quantize: block Hadamard + LSQ int4 quantize, fused.

Oracles: the Sylvester recursion H_k = (1/√2)[[H, H], [H, −H]] written out
here in numpy (orthogonal, symmetric); exact float64 code units
v/s = (x·Ĥ)/s, against which the kernel's codes must be equal everywhere
except within 1e-4 (relative) of a rounding tie, where the float32 sums may
land on either side; and the module's plain-jnp `reference` (XLA matmul).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _common
from pallas_kernels import hadamard_quantize as hq

_T = hq.TuningConfig(block_cols=128)  # (128, 256): a 2 x 2 grid


def _sylvester(g):
  h = np.array([[1.0]])
  while h.shape[0] < g:
    h = np.block([[h, h], [h, -h]]) / math.sqrt(2)
  return h


def _run(x, step, g, cd=None, bits=4):
  return jax.jit(lambda x: hq.hadamard_quantize(x, step, block_size=g, bits=bits,
                                                codes_dtype=cd, tuning=_T, interpret=True))(x)


@pytest.mark.parametrize('g', [1, 2, 8, 32, 128])
def test_hadamard_matrix(g):
  h = hq.hadamard_matrix(g)
  np.testing.assert_allclose(h, _sylvester(g), rtol=1e-6, atol=0)
  np.testing.assert_allclose(h @ h.T, np.eye(g), atol=1e-5)
  np.testing.assert_array_equal(h, h.T)


@pytest.mark.parametrize('g,dtype,cd', [(32, jnp.float32, None), (128, jnp.float32, None),
                                        (64, jnp.bfloat16, jnp.float8_e4m3fn)])
def test_codes_equal_exact_units_away_from_ties(g, dtype, cd):
  x = jnp.asarray(np.random.default_rng(g).standard_normal((128, 256)), dtype)
  step = float(2 * jnp.mean(jnp.abs(x.astype(jnp.float32))) / math.sqrt(7)) / 3
  got = _run(x, step, g, cd)
  assert got.codes.dtype == (jnp.int8 if cd is None else cd)
  off, near = hq.count_mismatches(got, x.astype(jnp.float32), step, g, 4)
  assert off == 0 and near < 0.01 * x.size
  codes = np.asarray(got.codes.astype(jnp.float32))
  assert codes.min() == -8 and codes.max() == 7  # the clamp is exercised
  ref = hq.reference(x, step, block_size=g, codes_dtype=cd)
  diff = np.asarray(ref.codes.astype(jnp.float32)) != codes
  assert diff.sum() <= near and np.all(np.abs(np.asarray(ref.codes.astype(jnp.float32))
                                              - codes) <= 1)
  np.testing.assert_array_equal(np.asarray(got.scale), np.full((1, 1), np.float32(step)))


def test_bits_8_and_3d_input():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 64, 256)), jnp.float32)
  got = _run(x, 0.02, 32, bits=8)
  off, _ = hq.count_mismatches(got, x, 0.02, 32, 8)
  assert off == 0 and got.codes.shape == x.shape


def test_nan_policy():
  x = np.random.default_rng(2).standard_normal((128, 256)).astype(np.float32)
  x[5, 40] = np.nan
  got = _run(jnp.asarray(x), 0.1, 32)
  assert np.isnan(np.asarray(got.scale)).all()
  assert not np.asarray(got.codes)[5, 32:64].any()  # the NaN's Hadamard block
  assert np.asarray(got.codes)[5, :32].any()


@pytest.mark.parametrize('g', [32, 128])
def test_lowers_for_cuda_at_benchmark_shape(g):
  x = jax.ShapeDtypeStruct((8192, 4096), jnp.float32)
  lowered = _common.lower_for_cuda(lambda x: hq.hadamard_quantize(x, 0.1, block_size=g), x)
  assert 'mosaic_gpu' in lowered.as_text()


@pytest.mark.parametrize('shape,kwargs,match', [
    ((128, 256), dict(block_size=48), 'block_size=48'),
    ((128, 256), dict(block_size=256), 'block_size=256'),
    ((128, 256), dict(bits=9), 'bits=9'),
    ((128, 256), dict(bits=8, codes_dtype=jnp.float8_e4m3fn), 'bits=8'),
    ((100, 256), {}, 'rows M=100'),
    ((128, 80), {}, 'last dimension D=80'),
    ((256,), {}, 'rank >= 2'),
])
def test_bad_input(shape, kwargs, match):
  x = jnp.zeros(shape, jnp.float32)
  assert not hq.can_use(x, 0.1, **kwargs)
  with pytest.raises(ValueError, match=match):
    hq.hadamard_quantize(x, 0.1, interpret=True, **kwargs)


def test_bad_types():
  with pytest.raises(TypeError, match='x must be a floating'):
    hq.hadamard_quantize(jnp.zeros((64, 128), jnp.int32), 0.1)
  with pytest.raises(ValueError, match='per-tensor scalar'):
    hq.hadamard_quantize(jnp.zeros((64, 128)), jnp.ones((2,)))
  with pytest.raises(ValueError, match='power of two'):
    hq.hadamard_matrix(12)
