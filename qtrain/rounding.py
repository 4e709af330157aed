"""Rounding onto a format's grid, in code units.

Every function here is pure and elementwise. Inputs are already divided by
their scale ("code units"); outputs are values of the format's grid in the same
units and dtype. Stochastic rules take an explicit uniform sample `u` in [0, 1)
of the same shape, so tests can feed deterministic, equi-spaced noise and
kernels can feed the counter-based bits of `qtrain.prng`; `round_to_format`
draws `u` from a key for you.

Policies (pinned by tests):
  * Non-finite inputs stay non-finite: NaN -> NaN, ±Inf -> ±Inf. Nothing here
    turns a NaN into a finite value (`astype(float4_e2m1fn)` would give -0).
  * Finite inputs beyond the largest magnitude saturate to it (round-to-nearest
    and stochastic alike), so a stochastic rule only ever returns one of the two
    grid neighbours of the clipped input.
  * Round-to-nearest breaks ties to the even neighbour (even integer, even
    mantissa, even exponent).

References:
  Gupta et al., "Deep Learning with Limited Numerical Precision", 2015 (SR).
  Chmiel et al., "Logarithmic Unbiased Quantization", arXiv:2112.10769 (§4:
  stochastic underflow and logarithmic SR).
  Sun et al., "Ultra-Low Precision 4-bit Training of Deep Neural Networks",
  NeurIPS 2020 (radix-4 FP4, rounding at the linear midpoint 0.625·4^n).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from qtrain import formats as fmts
from qtrain import prng

__all__ = [
    'Rounding', 'ROUNDING_MODES', 'round_nearest_even', 'round_stochastic',
    'stochastic_underflow', 'round_log', 'round_float', 'round_int', 'round_to_format',
]

Rounding = Literal['nearest', 'stochastic']
ROUNDING_MODES = ('nearest', 'stochastic')


def check_rounding(rounding: str) -> None:
  """Raises ValueError naming `rounding` if it is not a known mode."""
  if rounding not in ROUNDING_MODES:
    raise ValueError(f'rounding={rounding!r} is unknown; allowed: {ROUNDING_MODES}.')


def _keep_nonfinite(x: jax.Array, q: jax.Array) -> jax.Array:
  return jnp.where(jnp.isfinite(x), q, x)


def round_nearest_even(x: jax.Array) -> jax.Array:
  """Rounds to the nearest integer, ties to even (IEEE default; = `jnp.round`)."""
  return jnp.round(x)


def round_stochastic(x: jax.Array, u: jax.Array) -> jax.Array:
  """Unbiased stochastic rounding to an integer neighbour.

  Returns floor(x) + 1 with probability frac(x) (exactly: when u < frac(x)),
  so E[result] = x up to the resolution of `u` (2^-24 for `prng.uniform`).

  Args:
    x: float array, any shape.
    u: uniform samples in [0, 1), same shape as `x`.

  Returns:
    Integer-valued array of x's dtype; only floor(x) or ceil(x).
  """
  lo = jnp.floor(x)
  return lo + (u < x - lo).astype(x.dtype)


def stochastic_underflow(x: jax.Array, threshold: jax.Array | float,
                         u: jax.Array) -> jax.Array:
  """LUQ's T_alpha: |x| < threshold becomes sign(x)·threshold w.p. |x|/threshold, else 0.

  Values with |x| >= threshold pass unchanged. Unbiased.
  """
  ax = jnp.abs(x)
  small = ax < threshold
  keep = u * threshold < ax
  return jnp.where(small, jnp.where(keep, jnp.sign(x) * threshold, 0).astype(x.dtype), x)


def round_int(x: jax.Array, qmin: float, qmax: float, rounding: Rounding = 'nearest',
              u: jax.Array | None = None) -> jax.Array:
  """Clips to [qmin, qmax], then rounds to an integer (RNE or SR)."""
  xc = jnp.clip(x, qmin, qmax)
  q = round_nearest_even(xc) if rounding == 'nearest' else round_stochastic(xc, u)
  return _keep_nonfinite(x, q)


def _floor_log2(ax: jax.Array) -> jax.Array:
  # frexp is exact: ax = m · 2^e with m in [0.5, 1), so floor(log2 ax) = e - 1.
  _, e = jnp.frexp(ax)
  return e - 1


def round_float(x: jax.Array, fmt: fmts.FloatFormat, rounding: Rounding = 'nearest',
                u: jax.Array | None = None) -> jax.Array:
  """Rounds onto a minifloat grid (normals and subnormals), saturating at ±max.

  The grid spacing in binade [2^e, 2^(e+1)) is 2^(e - mantissa_bits), floored
  at the subnormal spacing; the value is rounded to an integer multiple of that
  spacing (exact power-of-two scaling), RNE or SR.
  """
  ax = jnp.minimum(jnp.abs(x), fmt.max_value)
  e = jnp.maximum(_floor_log2(ax), fmt.min_normal_exponent)
  ulp_exp = e - fmt.mantissa_bits
  y = jnp.ldexp(ax, -ulp_exp)
  r = round_nearest_even(y) if rounding == 'nearest' else round_stochastic(y, u)
  q = jnp.minimum(jnp.ldexp(r, ulp_exp), fmt.max_value)
  return _keep_nonfinite(x, jnp.sign(x) * q.astype(x.dtype))


def round_log(x: jax.Array, *, radix: int, min_exponent: int, max_exponent: int,
              shift: int = 0, rounding: Rounding = 'nearest',
              u: jax.Array | None = None) -> jax.Array:
  """Rounds |x| onto {0} ∪ {2^shift · radix^k : min_exponent <= k <= max_exponent}.

  Between neighbours lo = 2^shift·radix^k and hi = radix·lo the rule works in
  the *linear* domain: round-to-nearest switches at the arithmetic midpoint
  (lo + hi)/2 (0.625·4^(k+1) for radix 4, 1.5·2^k for radix 2), stochastic
  rounding goes up with probability (|x| - lo)/(hi - lo) and is unbiased.
  Below the smallest level the neighbours are 0 and that level, which makes
  stochastic rounding LUQ's stochastic underflow. Above the largest level
  values saturate. The sign is kept.

  Args:
    x: float array in code units.
    radix: 2 or 4.
    min_exponent, max_exponent: exponent range k of the magnitudes.
    shift: power-of-two shift of the whole grid (Ultra-low's odd TPR phase is
      shift=1 on the radix-4 grid).
    rounding: 'nearest' or 'stochastic'.
    u: uniform samples in [0, 1) for stochastic rounding.

  Returns:
    Array of x's shape and dtype on the grid.
  """
  log2_radix = {2: 1, 4: 2}[radix]
  ax = jnp.abs(x)
  floor_log2 = _floor_log2(jnp.where(ax > 0, ax, 1.0)) - shift
  k = jnp.clip(jnp.floor_divide(floor_log2, log2_radix), min_exponent, max_exponent)
  top = jnp.ldexp(jnp.ones_like(ax), max_exponent * log2_radix + shift)
  bottom = jnp.ldexp(jnp.ones_like(ax), min_exponent * log2_radix + shift)
  under = ax < bottom
  lo = jnp.where(under, 0.0, jnp.ldexp(jnp.ones_like(ax), k * log2_radix + shift))
  hi = jnp.where(under, bottom, lo * radix)
  if rounding == 'nearest':
    mid = (lo + hi) / 2
    # Ties go to the even exponent; at the underflow midpoint, to zero.
    hi_even = jnp.logical_and(~under, (k + 1) % 2 == 0)
    up = (ax > mid) | ((ax == mid) & hi_even)
  else:
    up = u * (hi - lo) < ax - lo
  q = jnp.where(ax >= top, top, jnp.where(up, hi, lo))
  return _keep_nonfinite(x, (jnp.sign(x) * q).astype(x.dtype))


def round_to_format(x: jax.Array, fmt: fmts.Format, rounding: Rounding = 'nearest', *,
                    u: jax.Array | None = None, key: jax.Array | None = None,
                    stream: int = 0) -> jax.Array:
  """Rounds code-unit values onto `fmt`'s grid.

  Args:
    x: float array in code units (already divided by the scale).
    fmt: any `qtrain.formats.Format`.
    rounding: 'nearest' (round-to-nearest-even) or 'stochastic'.
    u: uniform samples in [0, 1), shape of x; drawn from `key` if None.
    key: PRNG key (typed or legacy); required for stochastic rounding when `u`
      is not given.
    stream: counter stream of `qtrain.prng` used when drawing from `key`.

  Returns:
    Array with x's shape and dtype whose finite values all belong to
    `fmt.values()`.

  Raises:
    ValueError: unknown `rounding`, or stochastic rounding without `key`/`u`.
    TypeError: non-floating `x` or an unknown format.
  """
  check_rounding(rounding)
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise TypeError(f'x must be a floating array, got dtype {jnp.result_type(x)}.')
  if rounding == 'stochastic' and u is None:
    if key is None:
      raise ValueError('key is required for stochastic rounding (got key=None).')
    u = prng.uniform(key, jnp.shape(x), stream=stream, dtype=jnp.float32)
  compute = x.astype(jnp.float32) if jnp.finfo(x.dtype).bits < 32 else x
  if isinstance(fmt, fmts.IntFormat):
    q = round_int(compute, fmt.qmin, fmt.qmax, rounding, u)
  elif isinstance(fmt, fmts.FixedPointFormat):
    q = round_int(compute, -fmt.qmax, fmt.qmax, rounding, u)
  elif isinstance(fmt, fmts.FloatFormat):
    q = round_float(compute, fmt, rounding, u)
  elif isinstance(fmt, fmts.LogFormat):
    q = round_log(compute, radix=fmt.radix, min_exponent=fmt.min_exponent,
                  max_exponent=fmt.max_exponent, shift=fmt.shift, rounding=rounding, u=u)
    if not fmt.signed_values:
      # Negative finite values clamp to 0; -Inf stays -Inf (non-finite policy).
      q = jnp.where((q < 0) & jnp.isfinite(q), jnp.zeros_like(q), q)
  else:
    raise TypeError(f'fmt must be a qtrain.formats.Format, got {fmt!r}.')
  return q.astype(x.dtype)
