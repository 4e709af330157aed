"""Bit splitting (BS) and leverage-score sampling (LSS): the INT4 Transformers' backward.

Xi et al. quantize only the output gradient ∇Y of a linear layer in the
backward pass (the forward's INT4 codes of X̂ and Ŵ are reused), in two steps
(paper §4, Eq. 5–8; digest papers-5-8.md §7.2):

| step      | what                                                                  |
|-----------|-----------------------------------------------------------------------|
| BS        | ∇Y ≈ s↑·∇↑ + s↓·∇↓: a per-tensor ~INT8 code t ∈ [−98, 98] split into  |
|           | a high nibble hi = ⌊t/14⌉ (round to nearest) and a low one lo =      |
|           | SR(t − 14·hi) (stochastic rounding), both INT4; s↑ = 14·s↓,          |
|           | s↓ = max|∇Y|/98. Together one INT8 GEMM operand 14·hi + lo.         |
| LSS (dW)  | the 2N stacked rows [s↑∇↑; s↓∇↓] are kept with probability p_i ∝     |
|           | ‖∇↕Y_i‖·‖X̂_i‖ (leverage score), Σp = N, reweighted by 1/p_i      |
| LSS (dX)  | the same rows kept with p_i ∝ ‖∇↕Y_i‖, Σp = N                        |
| capping   | p ← c·N/Σc; repeatedly clamp to 1 and rescale the rest to N (App. A.2) |

Clamp of both nibbles: with ±7 (`clamp=7`, the default here) hi·14 + lo
covers [−105, 105] ⊇ [−98, 98] and the residual SR never clips: BS is then
*exactly* stochastic rounding of ∇Y on the grid max|∇Y|/98 (unbiased; error
variance (127/98)² ≈ 1.68× that of an INT8 [−127, 127] SR quantizer). The
official code clamps both to ±6 (`clamp=6`): values with |t| > 90 (above
90/98 of the max) are clipped to 90 and residuals in (6, 7] to 6, so it is
biased (digest §7.7 item 3).

LSS here is a Bernoulli mask × 1/p over the rows with static shapes: in
exact arithmetic the same as gathering the kept rows into a smaller INT4
GEMM, but with no speedup (the GPU kernels would gather). The released CUDA
kernels in fact disable sampling and keep every non-zero row with p = 1
(`keep_nonzero=True`; numerically the same as BS alone).

Random bits: codes from `fold_in(key, 0)`; the dX mask from `fold_in(key, 1)`,
the dW mask from `fold_in(key, 2)`. With `DotConfig(share_gradient_sample=True)`
both GEMMs receive the same key, hence the same BS codes (as the paper shares
them, App. A.6) and their own masks.

References:
  Xi, Li, Chen, Zhu, "Training Transformers with 4-bit Integers", NeurIPS
  2023, arXiv:2306.11987, §4.1–4.2, Prop. 4.1, App. A.2, A.6. Official code:
  github.com/xijiu9/Train_Transformers_with_INT4,
  `SingleDivide/.../image_classification/special_quantize.py` and
  `Cuda_LSS_HQ/quantize_grad_{weight,input}_LSS+LSQ/*_kernel.cu`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from qtrain import config as cfgs
from qtrain import prng
from qtrain import rounding as rnd
from qtrain import scaling
from qtrain.quantize import check_float

__all__ = ['split_codes', 'bit_split', 'capped_probabilities', 'sample_rows', 'lss',
           'BitSplitLss', 'split_multiplier', 'valid_clamps']


def _check_bits(bits) -> int:
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
    raise TypeError(f'bits must be an int, got {bits!r}.')
  if not 3 <= bits <= 8:
    raise ValueError(f'bits={bits} is out of range; allowed: 3..8 (the width of each '
                     'nibble; 4 in the paper).')
  return int(bits)


def split_multiplier(bits: int = 4) -> int:
  """M = 2^b − 2, the weight of the high nibble (14 at 4 bits); codes t span ±M²/2."""
  return 2 ** _check_bits(bits) - 2


def valid_clamps(bits: int = 4) -> tuple[int, int]:
  """(code's biased clamp M/2 − 1, unbiased clamp M/2): (6, 7) at 4 bits."""
  half = split_multiplier(bits) // 2
  return half - 1, half


def _resolve_clamp(bits: int, clamp) -> int:
  allowed = valid_clamps(bits)
  if clamp is None:
    return allowed[1]
  if isinstance(clamp, bool) or not isinstance(clamp, (int, np.integer)) or clamp not in allowed:
    raise ValueError(f'clamp={clamp!r} is not allowed at bits={bits}; allowed: {allowed[1]} '
                     f'(unbiased, the paper) or {allowed[0]} (the official code, biased).')
  return int(clamp)


def _check_key(key, fn: str) -> None:
  if key is None:
    raise ValueError(f'{fn}: key is required (the low nibble is stochastically rounded).')


def split_codes(g: jax.Array, key: jax.Array, *, bits: int = 4,
                clamp: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Bit-split codes of g: g ≈ (M·hi + lo)·scale (paper Eq. 5, official code).

  t = g/scale with scale = max|g|/(M²/2) (per tensor: t ∈ [−98, 98] at 4
  bits); hi = clamp(⌊t/M⌉) (round half to even, as the Python reference;
  the CUDA kernels round half away from zero: only exact ties differ);
  lo = clamp(SR(t − M·hi)).

  Args:
    g: float array (the output gradient ∇Y), any shape.
    key: PRNG key for the stochastic rounding of lo.
    bits: width of each nibble, 3..8 (4; M = 2^bits − 2).
    clamp: both nibbles are clipped to [−clamp, clamp]: None or M/2 (7 at 4
      bits, unbiased) or M/2 − 1 (6, the official code's, biased).

  Returns:
    (hi, lo, scale): int8 arrays of g's shape and a float32 scalar. An
    all-zero g gives zero codes (scale guarded to 1/(M²/2)); a non-finite g
    gives zero codes and a NaN or Inf scale, so every estimate is NaN.

  Raises:
    TypeError / ValueError: non-float g, bad bits or clamp, missing key.
  """
  check_float(g, 'g')
  bits = _check_bits(bits)
  c = _resolve_clamp(bits, clamp)
  _check_key(key, 'split_codes')
  m = split_multiplier(bits)
  g = jnp.asarray(g, jnp.float32)
  amax = jnp.max(jnp.abs(g), initial=0.0)
  scale = scaling.guard_zero(amax) / (m * m / 2)
  t = g / scale
  t = jnp.where(jnp.isfinite(t), t, 0.0)  # the scale carries NaN/Inf (see Returns)
  hi = jnp.clip(jnp.round(t / m), -c, c)
  u = prng.uniform(key, g.shape)
  lo = jnp.clip(rnd.round_stochastic(t - m * hi, u), -c, c)
  return hi.astype(jnp.int8), lo.astype(jnp.int8), scale


def _ste(g: jax.Array, estimate: jax.Array) -> jax.Array:
  estimate = estimate.astype(g.dtype)
  return jax.lax.stop_gradient(estimate) + (g - jax.lax.stop_gradient(g))


def bit_split(g: jax.Array, key: jax.Array | None = None, *, bits: int = 4,
              clamp: int | None = None) -> jax.Array:
  """BS fake quantization: (M·hi + lo)·scale from `split_codes` (straight-through gradient).

  With the unbiased clamp this equals stochastic rounding of g on the grid
  max|g|/(M²/2) (E[result] = g); with the code's clamp values above
  (M/2 − 1)(M + 1)/(M²/2) of max|g| (90/98 at 4 bits) are clipped.

  Args:
    g: float array.
    key: PRNG key (required).
    bits: nibble width, 3..8 (4).
    clamp: see `split_codes` (None = unbiased, 7 at 4 bits).

  Returns:
    Array of g's shape and dtype.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> g = jnp.array([0.98, -0.5, 0.0])   # max/98 = 0.01: already on the grid
    >>> bit_split(g, jax.random.key(0)).tolist()
    [0.9799999594688416, -0.5, 0.0]
  """
  hi, lo, scale = split_codes(g, key, bits=bits, clamp=clamp)
  m = split_multiplier(bits)
  return _ste(g, (m * hi.astype(jnp.float32) + lo.astype(jnp.float32)) * scale)


def _check_budget(budget, n: int) -> float:
  if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)):
    raise TypeError(f'budget must be a number, got {budget!r}.')
  budget = float(budget)
  if not 0 < budget <= n:
    raise ValueError(f'budget={budget} must be in (0, {n}] (the expected number of kept '
                     f'rows out of {n}).')
  return budget


def capped_probabilities(c: jax.Array, budget: float) -> jax.Array:
  """Sampling probabilities p ∝ c with Σp = budget and every p ≤ 1 (paper App. A.2).

  The paper (and `special_quantize.py`) iterates: p ← c·budget/Σc; while
  some p > 1, set the entries >= 1 to 1 and rescale the others so the total
  is `budget` again. Rescaling only raises the uncapped entries, so its fixed
  point is the "water-filling" p_i = min(1, λ·c_i) with Σp = budget, which
  this computes directly from the sorted scores (the k largest capped, λ =
  (budget − k)/Σ_rest c, the smallest k leaving every uncapped p <= 1):
  the same p up to float rounding, with static shapes and no loop. With
  fewer non-zero scores than the budget each of them gets p = 1 (Σp < budget).

  Args:
    c: float [n], non-negative scores (leverage scores or row norms).
    budget: expected number of kept entries, 0 < budget <= n (N of 2N rows).

  Returns:
    float32 [n] in [0, 1]; zero where c is zero; Σp = budget up to float
    rounding when more than `budget` entries are non-zero. All zeros when c
    is all zero.

  Raises:
    ValueError: c not 1-D, budget out of range.
  """
  c = jax.lax.stop_gradient(jnp.asarray(c, jnp.float32))
  if c.ndim != 1:
    raise ValueError(f'c must be 1-D (one score per row), got shape {c.shape}.')
  n = c.shape[0]
  if n == 0:
    return c
  budget = _check_budget(budget, n)
  desc = -jnp.sort(-c)
  # rest[k] = sum of the scores after the k largest.
  rest = jnp.cumsum(desc[::-1])[::-1]
  k = jnp.arange(n, dtype=jnp.float32)
  lam = (budget - k) / scaling.guard_zero(rest)
  valid = (k < budget) & (rest > 0) & (desc * lam <= 1)
  lam_k = lam[jnp.argmax(valid)]
  p = jnp.minimum(c * lam_k, 1.0)
  few = jnp.sum(c > 0) <= budget
  return jnp.where(few | ~jnp.any(valid), (c > 0).astype(jnp.float32), p)


def sample_rows(c: jax.Array, key: jax.Array | None, *, budget: float,
                keep_nonzero: bool = False) -> tuple[jax.Array, jax.Array]:
  """Bernoulli row mask with `capped_probabilities(c, budget)`.

  Args:
    c: float [n] non-negative scores.
    key: PRNG key (unused, may be None, with keep_nonzero).
    budget: expected number of kept rows.
    keep_nonzero: the released kernels' rule: p = 1 for every row with c > 0,
      0 otherwise (no sampling).

  Returns:
    (mask bool [n], p float32 [n]); mask is False wherever p is 0.
  """
  c = jax.lax.stop_gradient(jnp.asarray(c, jnp.float32))
  if keep_nonzero:
    if c.ndim != 1:
      raise ValueError(f'c must be 1-D (one score per row), got shape {c.shape}.')
    keep = c > 0
    return keep, keep.astype(jnp.float32)
  _check_key(key, 'sample_rows')
  p = capped_probabilities(c, budget)
  return prng.uniform(key, p.shape) < p, p


def _row_weights(mask: jax.Array, p: jax.Array) -> jax.Array:
  return jnp.where(mask, 1.0 / jnp.where(mask, p, 1.0), 0.0)


def lss(g: jax.Array, key: jax.Array | None = None, *, budget: float | None = None,
        residual_norms: jax.Array | None = None, keep_nonzero: bool = False) -> jax.Array:
  """Leverage-score sampling of the rows of g: row i · m_i/p_i, m_i ~ Bernoulli(p_i).

  Rows are all axes but the last (a 1-D g: one element per row). Scores c_i
  = ‖g_i‖, times `residual_norms[i]` (‖X̂_i‖ for the dW GEMM X̂ᵀ·g, Eq. 7);
  p = `capped_probabilities(c, budget)`. Unbiased for the GEMM with the
  residual (E[X̂ᵀ·lss(g)] = X̂ᵀ·g); for g itself only where no residual norm
  is zero (such rows are dropped: they contribute nothing to the GEMM).

  Args:
    g: float array, rows along the leading axes.
    key: PRNG key (required unless keep_nonzero).
    budget: expected kept rows; default half of them (the paper's N of 2N).
    residual_norms: float array of g.shape[:-1], or None.
    keep_nonzero: keep every row with a non-zero score, p = 1 (released kernels).

  Returns:
    Array of g's shape and dtype (straight-through gradient). NaN/Inf in g
    make every entry NaN.

  Raises:
    TypeError / ValueError: non-float g, wrong residual_norms shape, budget
      out of range, missing key.
  """
  check_float(g, 'g')
  g = jnp.asarray(g)
  rows = g.reshape(-1, 1) if g.ndim <= 1 else g.reshape(-1, g.shape[-1])
  n = rows.shape[0]
  c = jnp.linalg.norm(rows.astype(jnp.float32), axis=1)
  if residual_norms is not None:
    want = g.shape[:-1] if g.ndim > 1 else g.shape
    if jnp.shape(residual_norms) != want:
      raise ValueError(f'residual_norms must have shape {want} (one norm per row of g), got '
                       f'{jnp.shape(residual_norms)}.')
    c = c * jnp.asarray(residual_norms, jnp.float32).reshape(-1)
  budget = n / 2 if budget is None else budget
  if n == 0:
    return g
  mask, p = sample_rows(c, key, budget=_check_budget(budget, n), keep_nonzero=keep_nonzero)
  out = rows.astype(jnp.float32) * _row_weights(mask, p)[:, None]
  finite = jnp.all(jnp.isfinite(rows))
  out = jnp.where(finite, out, jnp.nan)
  return _ste(g, out.reshape(g.shape))


def _row_axes(gemm: str, kept: tuple[int, ...], ndim: int) -> int:
  """Number of leading row axes of dY (token axes) for this GEMM; raises if not leading."""
  kept = tuple(sorted(a % ndim for a in kept))
  rows = kept if gemm == 'dlhs' else tuple(a for a in range(ndim) if a not in kept)
  if rows != tuple(range(len(rows))):
    raise NotImplementedError(
        f'BitSplitLss needs the token (row) axes of dY to lead; got rows {rows} of a rank-'
        f'{ndim} dY ({gemm}). Dense layers (x [..., D] · W [D, ...]) satisfy this.')
  return len(rows)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BitSplitLss(cfgs.GradientEstimator):
  """BS + LSS as a dY rule of `qtrain.dot_general` (put it in both dY slots).

  Use `DotConfig(dlhs=MatmulConfig(lhs=est, rhs=REUSE), drhs=MatmulConfig(
  lhs=REUSE, rhs=est), share_gradient_sample=True)`: both GEMMs then see the
  same BS codes; dX samples the 2N stacked rows by ‖∇↕Y_i‖, dW by
  ‖∇↕Y_i‖·‖X̂_i‖ (X̂ = the forward's residual operand), each with Σp = N.

  Attributes:
    bits: nibble width (4).
    clamp: nibble clamp: 7 (unbiased, default at 4 bits; None = M/2) or 6
      (the official code's, biased).
    lss: sample rows (paper) or not (BS only).
    keep_nonzero: with lss, keep every non-zero row with p = 1 (the released
      kernels: the same numbers as lss=False).
  """
  bits: int = 4
  clamp: int | None = None
  lss: bool = True
  keep_nonzero: bool = False

  def __post_init__(self):
    _check_bits(self.bits)
    object.__setattr__(self, 'clamp', _resolve_clamp(self.bits, self.clamp))
    for name in ('lss', 'keep_nonzero'):
      if not isinstance(getattr(self, name), bool):
        raise TypeError(f'{name} must be a bool, got {getattr(self, name)!r}.')

  def estimate(self, g, key, *, gemm: str, residual, kept: tuple[int, ...]):
    """BS (+ LSS) estimate of dY for one backward GEMM (see `GradientEstimator.estimate`)."""
    g = jnp.asarray(g, jnp.float32)
    hi, lo, scale = split_codes(g, jax.random.fold_in(key, 0), bits=self.bits,
                                clamp=self.clamp)
    m = split_multiplier(self.bits)
    if not self.lss or g.size == 0:
      return (m * hi.astype(jnp.float32) + lo.astype(jnp.float32)) * scale
    up = m * hi.astype(jnp.float32) * scale
    down = lo.astype(jnp.float32) * scale
    r = _row_axes(gemm, kept, g.ndim)
    n = math.prod(g.shape[:r])
    up, down = up.reshape(n, -1), down.reshape(n, -1)
    scores = jnp.concatenate([jnp.linalg.norm(up, axis=1), jnp.linalg.norm(down, axis=1)])
    if gemm == 'drhs':
      residual = jnp.asarray(residual, jnp.float32)
      if residual.shape[:r] != g.shape[:r]:
        raise NotImplementedError(f'BitSplitLss: the dW residual {residual.shape} does not '
                                  f'share the token axes {g.shape[:r]} of dY.')
      x_norm = jnp.linalg.norm(residual.reshape(n, -1), axis=1)
      scores = scores * jnp.concatenate([x_norm, x_norm])
    mask_key = jax.random.fold_in(key, 1 if gemm == 'dlhs' else 2)
    mask, p = sample_rows(scores, mask_key, budget=n, keep_nonzero=self.keep_nonzero)
    w = _row_weights(mask, p)
    est = up * w[:n, None] + down * w[n:, None]
    return jnp.where(jnp.isfinite(scale), est, jnp.nan).reshape(g.shape)
