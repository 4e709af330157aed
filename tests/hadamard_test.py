"""Tests of `qtrain.hadamard` (Xi et al.'s Hadamard quantizer, LSQ grid, block search).

Oracles written here in plain numpy: the Sylvester recursion H_k =
[[H, H], [H, −H]]/√2 and its block-diagonal Ĥ = kron(I, H_k); the HQ fake
quantization Ĥ·clip(⌊XĤ/s⌉)·s with s = 2·mean|XĤ|/√Q_P + 1e-10; LSQ's step
gradient (−Q_N / Q_P outside the range, ⌊v⌉ − v inside, × 1/√(numel·Q_P));
and the official block search (transform, quantize at the initial step,
transform back, argmin of the product of Frobenius errors, first on ties).
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qtrain import hadamard as hq
from qtrain import scaling


def np_sylvester(k):
  h = np.ones((1, 1))
  for _ in range(k):
    h = np.block([[h, h], [h, -h]]) / math.sqrt(2)
  return h


def np_block_diag(dim, block):
  return np.kron(np.eye(dim // block), np_sylvester(int(math.log2(block))))


def np_fake_quant(v, qmin, qmax, step=None):
  v = np.asarray(v, np.float64)
  s = 2 * np.mean(np.abs(v)) / math.sqrt(qmax) + 1e-10 if step is None else step
  return np.clip(np.round(v / s), qmin, qmax) * s


def np_search(x, w, candidates, qmin=-7, qmax=7):
  """The official search: the argmin (first on ties) of ‖X̄−X‖·‖W̄−W‖."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  errors = []
  for g in candidates:
    hm = np_block_diag(x.shape[-1], g)
    xb = np_fake_quant(x @ hm, qmin, qmax) @ hm.T
    wb = hm @ np_fake_quant(hm.T @ w, qmin, qmax)
    errors.append(np.linalg.norm(xb - x) * np.linalg.norm(wb - w))
  return candidates[int(np.argmin(errors))], np.array(errors)


def outlier_input(key, shape, columns=(3,), scale=40.0):
  x = np.array(jax.random.normal(key, shape), np.float32)
  x[..., list(columns)] *= scale  # the outlier features HQ is meant for
  return x


# ---------------------------------------------------------------------------
# the matrices
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('k', [0, 1, 2, 3, 5, 7])
def test_hadamard_matrix_is_sylvester_orthogonal_and_symmetric(k):
  h = hq.hadamard_matrix(k)
  assert h.shape == (2**k, 2**k) and h.dtype == np.float32
  np.testing.assert_allclose(h, np_sylvester(k), rtol=1e-6, atol=0)
  np.testing.assert_allclose(h @ h.T, np.eye(2**k), atol=1e-5)
  np.testing.assert_array_equal(h, h.T)


@pytest.mark.parametrize('block', [1, 2, 4, 8, 16])
def test_block_hadamard_is_the_block_diagonal_matrix(block):
  x = np.asarray(jax.random.normal(jax.random.key(0), (3, 5, 16)), np.float32)
  w = np.asarray(jax.random.normal(jax.random.key(1), (16, 6)), np.float32)
  hm = np_block_diag(16, block)
  np.testing.assert_allclose(hq.block_hadamard(x, block), x @ hm, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(hq.block_hadamard(w, block, axis=0), hm.T @ w, rtol=1e-5,
                             atol=1e-5)
  # Ĥ Ĥᵀ = I: applying it twice is the identity.
  np.testing.assert_allclose(hq.block_hadamard(hq.block_hadamard(x, block), block), x,
                             rtol=1e-5, atol=1e-5)


def test_transforms_cancel_in_the_hq_product():
  x = outlier_input(jax.random.key(2), (7, 64))
  w = np.asarray(jax.random.normal(jax.random.key(3), (64, 9)), np.float32)
  for block in (2, 8, 32, 64):
    y = hq.block_hadamard(x, block) @ hq.block_hadamard(w, block, axis=0)
    np.testing.assert_allclose(y, x @ w, rtol=1e-4, atol=1e-3)


def test_traced_block_is_bit_identical_to_the_static_transform():
  x = outlier_input(jax.random.key(4), (5, 48))
  cands = hq.block_candidates(48)
  assert cands == (1, 2, 4, 8, 16)
  f = jax.jit(lambda v, g: hq.block_hadamard_traced(v, g, cands, -1))
  for g in cands:
    chex.assert_trees_all_equal(f(x, jnp.int32(g)), hq.block_hadamard(x, g))


# ---------------------------------------------------------------------------
# HQ fake quantization and LSQ
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('narrow,qmin', [(True, -7), (False, -8)])
def test_hadamard_quantizer_matches_numpy(narrow, qmin):
  x = outlier_input(jax.random.key(5), (6, 32))
  hm = np_block_diag(32, 8)
  want = np_fake_quant(x @ hm, qmin, 7) @ hm.T
  got = hq.hadamard(x, bits=4, block=8, narrow=narrow)
  assert got.shape == x.shape and got.dtype == x.dtype
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # A given step is used as is.
  want = np_fake_quant(x @ hm, qmin, 7, step=0.5) @ hm.T
  np.testing.assert_allclose(hq.hadamard(x, block=8, step=0.5, narrow=narrow), want,
                             rtol=1e-5, atol=1e-5)


def test_hadamard_reduces_the_error_of_outlier_columns():
  x = outlier_input(jax.random.key(6), (64, 64))
  err = lambda block: float(jnp.linalg.norm(hq.hadamard(x, block=block) - x))
  assert err(32) < 0.5 * err(1), (err(32), err(1))


@pytest.mark.parametrize('qmin', [-7, -8])
def test_lsq_step_gradient_matches_the_papers_formula(qmin):
  fmt = hq.lsq_format(4, narrow=qmin == -7)
  v = np.asarray(jax.random.normal(jax.random.key(7), (5, 8)), np.float32) * 3
  g = np.asarray(jax.random.normal(jax.random.key(8), (5, 8)), np.float32)
  s = 0.37
  dx, ds = jax.grad(lambda a, b: jnp.sum(scaling.lsq_fake_quant(a, b, fmt) * g),
                    argnums=(0, 1))(jnp.asarray(v), jnp.float32(s))
  q = v.astype(np.float64) / s
  per = np.where(q < qmin, qmin, np.where(q > 7, 7, np.round(q) - q))
  np.testing.assert_allclose(ds, np.sum(per * g) / math.sqrt(v.size * 7), rtol=1e-4)
  np.testing.assert_allclose(dx, g * ((q >= qmin) & (q <= 7)), atol=1e-6)


def test_lsq_init_step_is_two_mean_abs_over_sqrt_qp():
  v = jax.random.normal(jax.random.key(9), (10, 4))
  want = 2 * np.mean(np.abs(np.asarray(v, np.float64))) / math.sqrt(7) + 1e-10
  np.testing.assert_allclose(hq.lsq_init_step(v, hq.lsq_format(4)), want, rtol=1e-6)


def test_zero_and_nonfinite_inputs():
  chex.assert_trees_all_equal(hq.hadamard(jnp.zeros((3, 8)), block=4), jnp.zeros((3, 8)))
  x = jnp.ones((3, 8)).at[1, 2].set(jnp.nan)
  assert np.isnan(np.asarray(hq.hadamard(x, block=4))).all()


# ---------------------------------------------------------------------------
# block search
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_block_search_matches_numpy_brute_force(seed):
  kx, kw = jax.random.split(jax.random.key(seed))
  x = outlier_input(kx, (24, 32), columns=(seed, 17), scale=10.0 * (seed + 1))
  w = np.asarray(jax.random.normal(kw, (32, 8)), np.float32)
  cands = hq.block_candidates(32)
  want, errors = np_search(x, w, cands)
  got = hq.search_errors(x, w, cands, fmt=hq.lsq_format(4))
  np.testing.assert_allclose(got, errors, rtol=2e-3)
  assert hq.search_block_size(x, w) == want
  assert want > 1  # outliers make the transform worth it


def test_block_candidates_respect_divisibility_and_max_block():
  assert hq.block_candidates(24) == (1, 2, 4, 8)
  assert hq.block_candidates(4096) == tuple(2**k for k in range(11))
  assert hq.block_candidates(4096, max_block=64)[-1] == 64
  assert hq.block_candidates(7) == (1,)


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------
def test_bad_arguments_raise_clear_errors():
  x = jnp.ones((2, 12))
  with pytest.raises(ValueError, match='power of two'):
    hq.block_hadamard(x, 3)
  with pytest.raises(ValueError, match='power of two'):
    hq.block_hadamard(x, 0)
  with pytest.raises(ValueError, match=r'does not divide .* 12'):
    hq.block_hadamard(x, 8)
  with pytest.raises(TypeError, match='block must be an int'):
    hq.block_hadamard(x, 2.0)
  with pytest.raises(TypeError, match='floating'):
    hq.block_hadamard(jnp.ones((2, 4), jnp.int32), 2)
  with pytest.raises(ValueError, match='bits=9'):
    hq.hadamard(x, bits=9, block=4)
  with pytest.raises(ValueError, match='bits=1'):
    hq.hadamard(x, bits=1, block=4)
  with pytest.raises(ValueError, match='k=13'):
    hq.hadamard_matrix(13)
  with pytest.raises(ValueError, match='share D'):
    hq.search_block_size(x, jnp.ones((8, 3)))
  with pytest.raises(ValueError, match='scalar'):
    hq.hadamard(x, block=4, step=jnp.ones(2))
