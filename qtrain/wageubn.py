"""WAGEUBN's quantizers (Yang et al. 2020) as pure functions with one signature.

    fn(x, key=None, *, bits=..., **paper_defaults) -> Array

WAGEUBN trains with 8-bit integers everywhere: W(eights), A(ctivations),
G(radients), E(rrors), U(pdates), B(atch)N(orm), plus momentum and LR. Its
quantizers come in three families (papers-1-4.md §3a, read from the official
code `yang-yk/wageubn`, `Quantize.py`):

* direct: Q(x, k) = round(x·2^(k-1)) / 2^(k-1), an absolute fixed-point grid
  with k-1 fraction bits, no scale and no clamp (A, BN, U, momentum);
* clipped direct: C(Q(x, k), k), clamped to ±(1 - 2^(1-k)) (W, LR);
* shift: Sh(x) = 2^round(log2 x), the power of two nearest to x in the log
  domain, normalises the errors (E1, E2) and the weight gradient (G).

| function             | quantity (paper)                   | grid                        |
|----------------------|------------------------------------|-----------------------------|
| `wageubn_direct`     | A, BN μ/σ/x̂/γ/β, U, momentum, G_BN | k·2^(1-b), unclipped        |
| `wageubn_weight`     | W                                  | k·2^(1-b), |k| < 2^(b-1)    |
| `wageubn_activation` | A (BN → ReLU → A)                  | as `wageubn_direct`, b=8    |
| `wageubn_lr`         | learning rate                      | as `wageubn_weight`, b=10   |
| `wageubn_error`      | E1 (flag=False), E2 (flag=True)    | shift-scaled (+ flag bit)   |
| `wageubn_grad`       | G (weight gradients, stochastic)   | n/(128·2^(b-1)), |n| < K    |

`error_identity` puts an E quantizer into a graph: identity forward, the
error quantizer on the cotangent (the official code's `fe1`/`fe2`).

Every function returns dequantized values of x's shape and dtype with a
straight-through (identity) gradient. Rounding is half-to-even (`jnp.round`,
as `tf.round`). Non-finite policy: a NaN or ±Inf in a shift-normalised tensor
(E1, E2, G) makes the whole tensor NaN; the direct quantizers keep NaN/±Inf
elementwise. An all-zero tensor quantizes to zeros.

References:
  Yang, Deng, Wu, Yan, Xie, Li, "Training High-Performance and Large-Scale
  Deep Neural Networks with Full 8-bit Integers", Neural Networks 125:70-82,
  2020, arXiv:1909.02384; official code github.com/yang-yk/wageubn.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qtrain import prng
from qtrain.quantize import check_float

__all__ = ['shift', 'wageubn_direct', 'wageubn_weight', 'wageubn_activation', 'wageubn_lr',
           'wageubn_error', 'wageubn_grad', 'error_identity']

# float32 nearest to 1/sqrt(2); it lies *below* 1/sqrt(2), so `m > _INV_SQRT2`
# is exactly `m >= 1/sqrt(2)` for float32 m (no float32 equals 1/sqrt(2)).
_INV_SQRT2 = np.float32(0.7071067811865476)


def _check_bits(bits, lo: int = 2, hi: int = 32, name: str = 'bits') -> None:
  if isinstance(bits, bool) or not isinstance(bits, int):
    raise TypeError(f'{name} must be an int, got {bits!r}.')
  if not lo <= bits <= hi:
    raise ValueError(f'{name}={bits} is out of range; allowed: {lo}..{hi}.')


def _ste(x: jax.Array, y: jax.Array) -> jax.Array:
  """Value y, identity gradient to x (the official code's custom gradients)."""
  y = jax.lax.stop_gradient(y.astype(x.dtype))
  return y + (x - jax.lax.stop_gradient(x))


def _q(x32: jax.Array, bits: int) -> jax.Array:
  """Q(x, bits) on float32 values (exact: scaling by a power of two)."""
  return jnp.ldexp(jnp.round(jnp.ldexp(x32, bits - 1)), 1 - bits)


def shift(x: jax.Array) -> jax.Array:
  """Sh(x) = 2^round(log2 x) for x > 0, computed exactly from the binary exponent.

  With x = m·2^e (m in [0.5, 1)), round(log2 x) is e when m >= 1/sqrt(2) and
  e - 1 otherwise; no float log is involved, so the result never depends on
  the backend's log2 accuracy. Zero maps to 1 (the zero guard); NaN/±Inf give
  NaN.

  Args:
    x: float array of non-negative values (typically max|e|).

  Returns:
    float32 array of powers of two, shape of x.

  Examples:
    >>> import jax.numpy as jnp
    >>> from qtrain import wageubn
    >>> wageubn.shift(jnp.array([0.7, 0.71, 3.0, 0.0])).tolist()
    [0.5, 1.0, 4.0, 1.0]
  """
  x = jnp.asarray(x, jnp.float32)
  m, e = jnp.frexp(jnp.where(x == 0, 1.0, x))
  e = jnp.where(m > _INV_SQRT2, e, e - 1)
  out = jnp.ldexp(jnp.ones_like(x), e)
  return jnp.where(jnp.isfinite(x), out, jnp.nan)


def _tensor_shift(x32: jax.Array) -> jax.Array:
  """Sh(max|x|) of the whole tensor, NaN if any element is non-finite."""
  amax = jnp.max(jnp.abs(x32), initial=0.0)
  return shift(jnp.where(jnp.all(jnp.isfinite(x32)), amax, jnp.nan))


def wageubn_direct(x: jax.Array, key: jax.Array | None = None, *, bits: int = 8) -> jax.Array:
  """WAGEUBN's direct quantization Q(x, bits) = round(x·2^(bits-1)) / 2^(bits-1).

  Unclipped, no scale (papers-1-4.md §3f pitfalls 1-2): activations (bits=8),
  BN mean and std (16), normalised BN value, γ and β (8), BN gradients (15),
  momentum (13) and stored weights (24).

  Args:
    x: float array.
    key: unused (deterministic); accepted for the uniform signature.
    bits: 2..32 (bits-1 fraction bits).

  Returns:
    Dequantized array, shape and dtype of x (identity gradient).

  Raises:
    TypeError: non-float x or non-int bits.
    ValueError: bits out of range.

  Examples:
    >>> import jax.numpy as jnp
    >>> from qtrain import wageubn
    >>> wageubn.wageubn_direct(jnp.array([0.3, 1.5, -2.004]), bits=4).tolist()
    [0.25, 1.5, -2.0]
  """
  del key
  check_float(x)
  _check_bits(bits)
  x = jnp.asarray(x)
  return _ste(x, _q(jax.lax.stop_gradient(x).astype(jnp.float32), bits))


def wageubn_weight(x: jax.Array, key: jax.Array | None = None, *, bits: int = 8) -> jax.Array:
  """Weight quantization W_q = C(Q(W, bits), bits): grid {-(2^(b-1)-1)..2^(b-1)-1}/2^(b-1).

  Args:
    x: float array (a weight tensor).
    key: unused (deterministic).
    bits: 2..32.

  Returns:
    Dequantized array in [-1 + 2^(1-bits), 1 - 2^(1-bits)], shape and dtype
    of x (identity gradient, as the official `fw`).

  Examples:
    >>> import jax.numpy as jnp
    >>> from qtrain import wageubn
    >>> wageubn.wageubn_weight(jnp.array([0.3, 2.0, -1.0]), bits=3).tolist()
    [0.25, 0.75, -0.75]
  """
  del key
  check_float(x)
  _check_bits(bits)
  x = jnp.asarray(x)
  lim = 1.0 - 2.0 ** (1 - bits)
  return _ste(x, jnp.clip(_q(jax.lax.stop_gradient(x).astype(jnp.float32), bits), -lim, lim))


def wageubn_activation(x: jax.Array, key: jax.Array | None = None, *,
                       bits: int = 8) -> jax.Array:
  """Activation quantization A_q = Q(A, bits), unclipped (the official `fa`).

  Same as `wageubn_direct`; a saturating int8 version would clip every
  activation above 127/128 (papers-1-4.md §3f pitfall 2).
  """
  return wageubn_direct(x, key, bits=bits)


def wageubn_lr(x: jax.Array, key: jax.Array | None = None, *, bits: int = 10) -> jax.Array:
  """Learning-rate quantization lr_q = C(Q(lr, bits), bits) (the official `flr`).

  With bits=10 the LR is a multiple of 1/512 below 1, e.g. 0.05 -> 26/512.
  """
  return wageubn_weight(x, key, bits=bits)


def wageubn_error(x: jax.Array, key: jax.Array | None = None, *, bits: int = 8,
                  flag: bool = True) -> jax.Array:
  """WAGEUBN's shift quantizers of backward errors: E2 (flag=True) and E1 (flag=False).

  With R = Sh(max|x|) (`shift`, per tensor):

  * E1 (flag=False; errors arriving at an activation):
    R · clamp(Q(x/R, bits), -1, 1), values R·k/2^(bits-1), |k| <= 2^(bits-1).
  * E2 (flag=True; errors at a conv output, fed to both backward GEMMs):
    s = R / 2^(bits-1), u = x/s; where |u| < 1 the value is
    s·clamp(Q(u, bits), -1, 1) (bits-1 fraction bits below one step), else
    s·clamp(round(u), ±(2^(bits-1) - 1)). A sign, a flag and a (bits-1)-bit
    magnitude: small errors are not flushed to zero (pitfall 4).

  Because Sh rounds log2 to nearest, R can be up to √2 below max|x|, so the
  largest errors saturate by up to ~30% (pitfall 3), as in the paper.

  Args:
    x: float array (an error / gradient tensor).
    key: unused (deterministic).
    bits: 2..16.
    flag: True for E2, False for E1.

  Returns:
    Dequantized array, shape and dtype of x. All-zero -> zeros; a NaN or ±Inf
    anywhere -> all NaN.

  Examples:
    >>> import jax.numpy as jnp
    >>> from qtrain import wageubn
    >>> e = jnp.array([1.0, 0.3, 0.001])
    >>> wageubn.wageubn_error(e, bits=4).tolist()  # s = 1/8: 8s, 2s, 0.001/s = 0.008 -> 0
    [0.875, 0.25, 0.0]
    >>> wageubn.wageubn_error(jnp.array([1.0, 0.3, 0.01]), bits=4).tolist()  # 0.08 -> 1/8 step
    [0.875, 0.25, 0.015625]
  """
  del key
  check_float(x)
  _check_bits(bits, 2, 16)
  if not isinstance(flag, bool):
    raise TypeError(f'flag must be a bool, got {flag!r}.')
  x = jnp.asarray(x)
  x32 = jax.lax.stop_gradient(x).astype(jnp.float32)
  r = _tensor_shift(x32)
  if not flag:
    y = r * jnp.clip(_q(x32 / r, bits), -1.0, 1.0)
  else:
    s = jnp.ldexp(r, 1 - bits)
    u = x32 / s
    qmax = 2.0 ** (bits - 1) - 1
    small = jnp.clip(_q(u, bits), -1.0, 1.0)
    large = jnp.clip(jnp.round(u), -qmax, qmax)
    y = s * jnp.where(jnp.abs(u) < 1, small, large)
  return _ste(x, y)


def wageubn_grad(x: jax.Array, key: jax.Array | None = None, *, bits: int = 8,
                 scale: int = 128) -> jax.Array:
  """WAGEUBN's weight-gradient quantizer G: constant scaling + stochastic rounding.

  v = x / Sh(max|x|); n = clamp(SR(K·v), -(K-1), K-1) with K = `scale` (the
  official `g_scale`) and SR(y) = sign(y)·(floor|y| + [frac|y| > U]),
  U ~ U[0, 1); G = n / (128 · 2^(bits-1)) (n/16384 for bits=8).

  The gradient's magnitude is dropped on purpose (pitfall 5): G carries only
  its direction, and the step size is lr·K/16384. K acts as an extra LR
  factor (the official schedule decays it 128, 128, 32, 8, 2 with the LR).

  Args:
    x: float array (one weight gradient).
    key: PRNG key (required: the rounding is stochastic). Noise is
      `qtrain.prng.uniform(key, x.shape)`.
    bits: 2..16 (the denominator 128·2^(bits-1)).
    scale: K, an int >= 2.

  Returns:
    Array of x's shape and dtype with values n/(128·2^(bits-1)), |n| <= K-1.
    E[n] = K·v where |K·v| <= K - 1. All-zero -> zeros; non-finite -> all NaN.

  Raises:
    ValueError: key is None; bits or scale out of range.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from qtrain import wageubn
    >>> g = wageubn.wageubn_grad(jnp.array([0.5, -0.25]), jax.random.key(0))
    >>> (g * 16384).tolist()  # v = [1, -0.5] (Sh(0.5) = 0.5): n = clamp(128v) = [127, -64]
    [127.0, -64.0]
  """
  check_float(x)
  check_grad_options(bits, scale)
  if key is None:
    raise ValueError('wageubn_grad: key is required (stochastic rounding; got key=None).')
  x = jnp.asarray(x)
  x32 = jax.lax.stop_gradient(x).astype(jnp.float32)
  y = scale * (x32 / _tensor_shift(x32))
  u = prng.uniform(key, x.shape)
  mag = jnp.abs(y)
  low = jnp.floor(mag)
  n = jnp.sign(y) * (low + (mag - low > u).astype(jnp.float32))
  n = jnp.clip(n, -(scale - 1), scale - 1)
  return _ste(x, n / (128.0 * 2.0 ** (bits - 1)))


def check_grad_options(bits, scale) -> None:
  """Validates `wageubn_grad`'s bits (2..16) and scale (int >= 2), naming them."""
  _check_bits(bits, 2, 16)
  if isinstance(scale, bool) or not isinstance(scale, int):
    raise TypeError(f'scale must be an int, got {scale!r}.')
  if scale < 2:
    raise ValueError(f'scale={scale} must be >= 2 (the clamp is ±(scale - 1)).')


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _error_identity(x, bits, flag):
  return x


def _error_identity_fwd(x, bits, flag):
  return x, None


def _error_identity_bwd(bits, flag, _, g):
  return (wageubn_error(g, bits=bits, flag=flag),)


_error_identity.defvjp(_error_identity_fwd, _error_identity_bwd)


def error_identity(x: jax.Array, *, bits: int = 8, flag: bool = True) -> jax.Array:
  """Identity forward; `wageubn_error(cotangent, bits=bits, flag=flag)` backward.

  The official code's `fe1` (flag=False: after an activation's quantizer, so
  the error reaching the activation is E1-quantized) and `fe2` (flag=True: on
  a conv output, so both backward GEMMs of that conv get E2-quantized dY).
  Usable in any JAX code, e.g. inside a Linen model.

  Args:
    x: float array.
    bits: 2..16.
    flag: True for E2, False for E1.

  Returns:
    x, unchanged.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from qtrain import wageubn
    >>> g = jax.grad(lambda x: jnp.sum(wageubn.error_identity(x, bits=4) * jnp.array([1., .3])))
    >>> g(jnp.zeros(2)).tolist()
    [0.875, 0.25]
  """
  check_float(x)
  _check_bits(bits, 2, 16)
  if not isinstance(flag, bool):
    raise TypeError(f'flag must be a bool, got {flag!r}.')
  return _error_identity(jnp.asarray(x), bits, flag)
