"""FQ-ViT's post-training quantizers: PTF, log2 / Log-Int-Softmax, integer LayerNorm, observers.

Lin et al., "FQ-ViT: Post-Training Quantization for Fully Quantized Vision
Transformer" (IJCAI 2022, arXiv 2111.13824; official code
`megvii-research/FQ-ViT`, `models/ptq/`). Inference-only numerics; the
calibration driver that wires them into a model is `qtrain.ptq`.

| function                         | what                                        | official code  |
|----------------------------------|---------------------------------------------|----------------|
| `minmax_params`                  | asymmetric uint scale, zero point (min-max) | observer/minmax|
| `uniform_quant`, `minmax_quant`  | fake quant, fixed or own min-max parameters | quantizer/unif.|
| `weight_scale`, `weight_quant`   | int8 symmetric per out channel, /127 (code: | observer/minmax|
|                                  | /127.5 with `half_step=True`)               |                |
| `ptf`, `ptf_codes`, `ptf_params` | Power-of-Two Factor: base·2^α per channel   | observer/ptf   |
| `log2_quant`, `log2_codes`       | log2 probabilities, two rounding rules      | quantizer/log2 |
| `i_exp`, `log_int_softmax`       | I-BERT integer exp; LIS: integer softmax    | QIntSoftmax    |
|                                  | straight to log2 codes                      |                |
| `int_layer_norm`                 | LayerNorm on PTF codes, dyadic (M, N)       | QIntLayerNorm  |
| `MinMax`, `Ema`, `Percentile`,   | activation observers (frozen dataclasses,   | observer/*     |
| `Omse`                           | state `ObserverState`)                      |                |

(paths under `models/ptq/`; QIntSoftmax and QIntLayerNorm are in `layers.py`.)

Integer arithmetic is simulated in float32 on integer-valued arrays, as the
official code does in PyTorch: every code, x_int, e_int, M and B is an exact
integer (|value| < 2^24), while the row sums of LIS (Σ e_int, up to ~2^40
with n = 30) and the LayerNorm moments are float32 sums, exact only below
2^24 — the official simulation has the same rounding.

Rounding is round-half-to-even everywhere (torch.round = jnp.round).
Non-finite policy: NaN/Inf in x propagate to the output (never silently
finite); all-zero inputs quantize to zeros.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from qtrain._validate import check_int

__all__ = ['EPS', 'true_divide', 'AffineParams', 'minmax_params', 'uniform_codes',
           'uniform_quant', 'minmax_quant', 'weight_scale', 'weight_quant', 'PtfParams',
           'PtfCodes', 'ptf_params', 'ptf_codes', 'ptf', 'Log2Rounding', 'log2_codes',
           'log2_quant', 'i_exp', 'log_int_softmax_codes', 'log_int_softmax',
           'dyadic_multiplier', 'int_layer_norm', 'ObserverState', 'MinMax', 'Ema',
           'Percentile', 'Omse', 'Observer', 'OBSERVERS', 'make_observer']

EPS = float(np.finfo(np.float32).eps)  # lower bound of every scale (the code's clamp_(eps))

Log2Rounding = Literal['geometric', 'arithmetic']
_LOG2_ROUNDINGS = ('geometric', 'arithmetic')

# I-BERT's second-order fit of exp on [-ln 2, 0]: a·(p + b/a)·p + c, as in the code.
_EXP_COEF = (0.35815147, 0.96963238, 1.0)
_LN2 = 0.6931  # the code's x0 = -0.6931


def _check_float(x, name: str = 'x') -> jax.Array:
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f'{name} must be a floating-point array, got dtype {x.dtype}.')
  return x


def _check_rounding(rounding) -> None:
  if rounding not in _LOG2_ROUNDINGS:
    raise ValueError(f'rounding={rounding!r} is unknown; allowed: {_LOG2_ROUNDINGS}.')


def true_divide(num, den) -> jax.Array:
  """num / den in float32, correctly rounded (IEEE), as PyTorch's division.

  XLA rewrites a division by a constant or by a broadcast scalar into a
  multiplication by its reciprocal (up to 1 ulp off), which moves values
  across exact .5 ties and so changes codes. Making the divisor depend on the
  numerator at run time (den + 0·num) keeps a true division; a non-finite
  numerator then gives NaN (never a finite value).
  """
  num = jnp.asarray(num, jnp.float32)
  den = jnp.asarray(den, jnp.float32)
  shape = jnp.broadcast_shapes(num.shape, den.shape)
  num = jnp.broadcast_to(num, shape)
  return num / (jnp.broadcast_to(den, shape) + 0.0 * num)


def _pow2(e) -> jax.Array:
  """2^e, exactly, for integer-valued float e (jnp.exp2 is not exact on XLA CPU); NaN stays NaN."""
  e = jnp.asarray(e, jnp.float32)
  finite = jnp.isfinite(e)
  out = jnp.ldexp(jnp.ones(e.shape, jnp.float32), jnp.where(finite, e, 0.0).astype(jnp.int32))
  return jnp.where(finite, out, jnp.where(e > 0, jnp.inf, jnp.where(e < 0, 0.0, jnp.nan)))


def _ste(x: jax.Array, y: jax.Array) -> jax.Array:
  """y in the forward pass, identity gradient to x (PTQ needs none; harmless)."""
  y = y.astype(x.dtype)
  return x + jax.lax.stop_gradient(y - x)


# ----------------------------------------------------------------------------- uniform


class AffineParams(NamedTuple):
  """Scale and zero point of an asymmetric uint quantizer (float32, integer-valued zp)."""
  scale: jax.Array
  zero_point: jax.Array


def minmax_params(lo, hi, *, bits: int = 8) -> AffineParams:
  """FQ-ViT's asymmetric min-max parameters (`observer/minmax.py`, unsigned types).

  s = max((hi - lo) / (2^bits - 1), eps), zp = clamp(-round(lo / s), 0, 2^bits - 1).
  The range is *not* widened to include 0 (unlike `qtrain.numerics.int_asymmetric`):
  a tensor with lo > 0 gets zp = 0 and its values below s/2 clip.

  Args:
    lo, hi: float scalars or arrays (one range per element).
    bits: 2..16.

  Returns:
    AffineParams of lo's shape, float32.
  """
  bits = check_int('bits', bits, 2, 16)
  qmax = 2.0 ** bits - 1
  lo = jnp.asarray(lo, jnp.float32)
  hi = jnp.asarray(hi, jnp.float32)
  scale = jnp.maximum(true_divide(hi - lo, qmax), EPS)
  zp = jnp.clip(-jnp.round(true_divide(lo, scale)), 0.0, qmax)
  return AffineParams(scale=scale, zero_point=zp)


def uniform_codes(x: jax.Array, params: AffineParams, *, bits: int = 8) -> jax.Array:
  """Codes q = clamp(round(x / s) + zp, 0, 2^bits - 1), integer-valued float32 (NaN stays NaN)."""
  bits = check_int('bits', bits, 2, 16)
  x = _check_float(x).astype(jnp.float32)
  return jnp.clip(jnp.round(true_divide(x, params.scale)) + params.zero_point, 0.0,
                  2.0 ** bits - 1)


def uniform_quant(x: jax.Array, params: AffineParams, *, bits: int = 8) -> jax.Array:
  """Fake quantization with fixed parameters: (q - zp)·s (`quantizer/uniform.py`).

  Args:
    x: float array.
    params: AffineParams broadcastable to x (per tensor: scalars).
    bits: 2..16.

  Returns:
    Dequantized array of x's shape and dtype (straight-through gradient).
  """
  q = uniform_codes(x, params, bits=bits)
  return _ste(x, (q - params.zero_point) * params.scale)


def minmax_quant(x: jax.Array, key: jax.Array | None = None, *, bits: int = 8) -> jax.Array:
  """Per-tensor asymmetric uint quantization with x's own min/max (FQ-ViT MinMax, activations).

  Args:
    x: float array.
    key: unused (deterministic); accepted for the uniform signature.
    bits: 2..16.

  Returns:
    Dequantized array of x's shape and dtype.
  """
  del key
  x = _check_float(x)
  return uniform_quant(x, minmax_params(jnp.min(x), jnp.max(x), bits=bits), bits=bits)


def weight_scale(w: jax.Array, *, bits: int = 8, axis: int | tuple[int, ...] = -1,
                 half_step: bool = False) -> jax.Array:
  """Per-output-channel symmetric scale max(absmax_c / d, eps), keepdims (see `weight_quant`).

  Args:
    w: float weights.
    bits: 2..16.
    axis: the output-channel axis (or axes) of w.
    half_step: the official code's d = 2^(b-1) - 0.5 (127.5) instead of 2^(b-1) - 1.

  Returns:
    float32 scale of w's rank, size 1 on the reduced axes.
  """
  w = _check_float(w, 'w')
  bits = check_int('bits', bits, 2, 16)
  if not isinstance(half_step, bool):
    raise TypeError(f'half_step must be a bool, got {half_step!r}.')
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  if any(isinstance(a, bool) or not isinstance(a, int) or not -w.ndim <= a < w.ndim
         for a in axes):
    raise ValueError(f'axis={axis!r} is out of range for w of shape {w.shape}.')
  keep = {a % w.ndim for a in axes}
  reduce = tuple(i for i in range(w.ndim) if i not in keep)
  absmax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=reduce, keepdims=True)
  half = 2.0 ** (bits - 1)
  return jnp.maximum(true_divide(absmax, half - 0.5 if half_step else half - 1), EPS)


def weight_quant(w: jax.Array, key: jax.Array | None = None, *, bits: int = 8,
                 axis: int | tuple[int, ...] = -1, half_step: bool = False,
                 scale: jax.Array | None = None) -> jax.Array:
  """Symmetric per-output-channel weight quantization (FQ-ViT: int8, MinMax).

  s_c = max(absmax_c / d, eps), codes clamp(round(w / s_c), -2^(b-1), 2^(b-1) - 1),
  with d = 2^(b-1) - 1 (127: the symmetric grid ±127, the paper's intent) or,
  with half_step=True, the official code's d = (qmax - qmin)/2 = 127.5: then
  +absmax maps to 127.5, rounds to 128 and clips to 127 (half a step lost on
  the positive extreme) while -absmax maps to -127.5 up to the rounding of
  s, i.e. to -128 or -127 (papers-5-8.md §6.6.3).

  Args:
    w: float weights.
    key: unused; accepted for the uniform signature.
    bits: 2..16.
    axis: the output-channel axis (or axes) of w; one scale per index there.
    half_step: the official code's /127.5 denominator.
    scale: a precomputed `weight_scale` (then `axis`, `half_step` are unused).

  Returns:
    Dequantized weights of w's shape and dtype.

  Examples:
    >>> import jax.numpy as jnp
    >>> from qtrain import fq_vit
    >>> w = jnp.array([[1.0], [-0.5]])
    >>> (fq_vit.weight_quant(w) * 127).tolist()  # -63.5 rounds half to even
    [[127.0], [-64.0]]
  """
  del key
  w = _check_float(w, 'w')
  bits = check_int('bits', bits, 2, 16)
  if scale is None:
    scale = weight_scale(w, bits=bits, axis=axis, half_step=half_step)
  half = 2.0 ** (bits - 1)
  q = jnp.clip(jnp.round(true_divide(w, scale)), -half, half - 1)
  return _ste(w, q * scale)


# ----------------------------------------------------------------------------- PTF


class PtfParams(NamedTuple):
  """Power-of-Two Factor parameters: channel c uses the scale base_scale·2^alpha[c].

  Attributes:
    base_scale: float32 scalar s = (max - min) / (2^bits - 1) / 2^K.
    zero_point: float32 scalar (integer-valued), computed with the largest scale 2^K·s.
    alpha: int32 [C], each in 0..K.
  """
  base_scale: jax.Array
  zero_point: jax.Array
  alpha: jax.Array


class PtfCodes(NamedTuple):
  """PTF codes for the integer path: x ≈ (codes - zero_point)·base_scale·2^alpha."""
  codes: jax.Array
  base_scale: jax.Array
  zero_point: jax.Array
  alpha: jax.Array


def _channel_shape(ndim: int, axis: int) -> tuple[int, ...]:
  shape = [1] * ndim
  shape[axis] = -1
  return tuple(shape)


def _norm_axis(x: jax.Array, axis) -> int:
  if isinstance(axis, bool) or not isinstance(axis, int):
    raise TypeError(f'axis must be an int, got {axis!r}.')
  if x.ndim == 0 or not -x.ndim <= axis < x.ndim:
    raise ValueError(f'axis={axis} is out of range for x of shape {x.shape}.')
  return axis % x.ndim


def ptf_params(x: jax.Array, *, bits: int = 8, k: int = 3, min_val=None, max_val=None,
               axis: int = -1) -> PtfParams:
  """Calibrates PTF (papers-5-8.md §6.1; official `observer/ptf.py`).

  s = max((max - min)/(2^bits - 1), eps) / 2^K is the base scale and
  zp = clamp(-round(min / (2^K·s)), 0, 2^bits - 1) the one zero point shared
  by all channels (computed with the *largest* scale). Each channel c takes
  α_c = argmin_{α ∈ 0..K} mean_c((x_c - x̂_c(α))²), with x̂_c(α) =
  (clamp(round(x_c/(2^α s)) + zp, 0, 2^bits - 1) - zp)·2^α s; ties go to
  the smaller α (the code's `list.index(min(...))`).

  The official code takes min/max over *all* calibration batches and the α
  search on the *last* one: pass the running `min_val`/`max_val` and the last
  batch as `x` to reproduce it (`qtrain.ptq.calibrate` does).

  Args:
    x: float array with channels along `axis` (e.g. LayerNorm input [B, T, C]).
    bits: 2..16 (FQ-ViT: uint8).
    k: K >= 0, the largest power-of-two factor (FQ-ViT: 3, four candidates).
    min_val, max_val: the layer-wise range; default x's own min and max.
    axis: the channel axis.

  Returns:
    PtfParams (base_scale, zero_point scalars; alpha int32 [C]).

  Raises:
    TypeError: non-float x, non-int bits/k/axis.
    ValueError: bits or k out of range, bad axis.
  """
  x = _check_float(x)
  bits = check_int('bits', bits, 2, 16)
  k = check_int('k', k, 0, 16)
  axis = _norm_axis(x, axis)
  x32 = x.astype(jnp.float32)
  lo = jnp.min(x32) if min_val is None else jnp.asarray(min_val, jnp.float32)
  hi = jnp.max(x32) if max_val is None else jnp.asarray(max_val, jnp.float32)
  qmax = 2.0 ** bits - 1
  top = jnp.maximum(true_divide(hi - lo, qmax), EPS)  # the code's scale8 (2^K · s)
  base = top / 2.0 ** k  # exact
  zp = jnp.clip(-jnp.round(true_divide(lo, top)), 0.0, qmax)
  reduce = tuple(i for i in range(x.ndim) if i != axis)
  errors = []
  for a in range(k + 1):
    s = base * 2.0 ** a
    xq = (jnp.clip(jnp.round(true_divide(x32, s)) + zp, 0.0, qmax) - zp) * s
    errors.append(jnp.mean(jnp.square(x32 - xq), axis=reduce))
  alpha = jnp.argmin(jnp.stack(errors), axis=0).astype(jnp.int32)
  return PtfParams(base_scale=base, zero_point=zp, alpha=alpha)


def ptf_codes(x: jax.Array, key: jax.Array | None = None, *, bits: int = 8, k: int = 3,
              params: PtfParams | None = None, axis: int = -1) -> PtfCodes:
  """PTF codes q = clamp(round(x / (s·2^α_c)) + zp, 0, 2^bits - 1) and their parameters.

  Args:
    x: float array, channels along `axis`.
    key: unused; accepted for the uniform signature.
    bits: 2..16.
    k: K (only used when `params` is None).
    params: calibrated PtfParams (fixed scales); None = calibrate on x itself.
    axis: the channel axis.

  Returns:
    PtfCodes; codes are integer-valued float32 of x's shape (NaN stays NaN).
  """
  del key
  x = _check_float(x)
  bits = check_int('bits', bits, 2, 16)
  axis = _norm_axis(x, axis)
  if params is None:
    params = ptf_params(x, bits=bits, k=k, axis=axis)
  scale = params.base_scale * _pow2(params.alpha)
  scale = scale.reshape(_channel_shape(x.ndim, axis))
  q = jnp.clip(jnp.round(true_divide(x, scale)) + params.zero_point, 0.0, 2.0 ** bits - 1)
  return PtfCodes(codes=q, base_scale=params.base_scale, zero_point=params.zero_point,
                  alpha=params.alpha)


def ptf(x: jax.Array, key: jax.Array | None = None, *, bits: int = 8, k: int = 3,
        params: PtfParams | None = None, axis: int = -1) -> jax.Array:
  """Power-of-Two Factor fake quantization of LayerNorm inputs (FQ-ViT §PTF).

  One layer-wise range and zero point; channel c's step is base·2^α_c with
  α_c ∈ {0..K} chosen by per-channel MSE (`ptf_params`), so wide channels get
  coarse steps and narrow ones fine steps, at the cost of one bit shift per
  channel in the integer LayerNorm (`int_layer_norm`).

  Args:
    x: float array, channels along `axis`.
    key: unused; accepted for the uniform signature.
    bits: 2..16 (paper: 8).
    k: K >= 0 (paper: 3).
    params: calibrated PtfParams; None = calibrate on x itself.
    axis: the channel axis.

  Returns:
    Dequantized array of x's shape and dtype (straight-through gradient).

  Examples:
    >>> import jax.numpy as jnp
    >>> from qtrain import fq_vit
    >>> x = jnp.array([[0.01, 10.0], [-0.02, -9.0]])
    >>> fq_vit.ptf_params(x, k=3).alpha.tolist()
    [0, 3]
  """
  c = ptf_codes(x, bits=bits, k=k, params=params, axis=axis)
  axis = _norm_axis(x, axis)
  scale = (c.base_scale * _pow2(c.alpha)).reshape(
      _channel_shape(x.ndim, axis))
  return _ste(x, (c.codes - c.zero_point) * scale)


# ----------------------------------------------------------------------------- log2 / LIS


def _log2_round(v: jax.Array, rounding: str) -> jax.Array:
  """round(log2 v) for v > 0 by the geometric or the arithmetic midpoint rule."""
  if rounding == 'geometric':
    return jnp.round(jnp.log2(v))
  # Arithmetic (LIS `log_round`): k = floor(log2 v), +1 iff v - 2^k >= 2^(k-1),
  # i.e. iff the mantissa of v in [0.5, 1) is >= 0.75. frexp gives k exactly,
  # where floor(log2(v)) can be off by one just below a power of two.
  mantissa, exponent = jnp.frexp(v)
  return (exponent - 1).astype(jnp.float32) + (mantissa >= 0.75).astype(jnp.float32)


def _codes_from_inverse(v: jax.Array, bits: int, rounding: str):
  """(codes, zero mask) for probabilities p = 1/v: q = clamp(round(log2 v), 0, 2^b - 1)."""
  levels = 2.0 ** bits
  finite = jnp.isfinite(v) & (v > 0)
  safe = jnp.where(finite, v, 1.0)
  r = _log2_round(safe, rounding)
  zero = (v == jnp.inf) | (finite & (r >= levels))  # p = 0 or below the smallest level
  q = jnp.clip(r, 0.0, levels - 1)
  q = jnp.where(jnp.isnan(v) | (v < 0), jnp.nan, q)
  return q, zero


def log2_codes(p: jax.Array, *, bits: int = 4, rounding: Log2Rounding = 'geometric'):
  """Log2 codes of probabilities: p ≈ 2^-q, q ∈ 0..2^bits - 1, or exactly 0.

  Rounding rules (papers-5-8.md §6.6.1):

  | rounding     | q                                          | midpoint between 2^-k, 2^-(k+1) |
  |--------------|--------------------------------------------|---------------------------------|
  | 'geometric'  | round(-log2 p) (`quantizer/log2.py`)        | 2^-(k+1/2)                      |
  | 'arithmetic' | k = floor(log2(1/p)), +1 iff 1/p >= 1.5·2^k | 1/p = 1.5·2^k (LIS `log_round`) |

  Values whose rounded exponent is >= 2^bits (and p = 0) dequantize to 0.

  Args:
    p: float probabilities (>= 0).
    bits: 1..8.
    rounding: 'geometric' or 'arithmetic'.

  Returns:
    (codes, zero): integer-valued float32 codes (NaN where p is NaN or
    negative) and the bool mask of entries that dequantize to 0.
  """
  p = _check_float(p, 'p')
  bits = check_int('bits', bits, 1, 8)
  _check_rounding(rounding)
  p32 = p.astype(jnp.float32)
  v = jnp.where(p32 > 0, true_divide(1.0, jnp.where(p32 > 0, p32, 1.0)), jnp.inf)
  v = jnp.where(jnp.isnan(p32) | (p32 < 0), jnp.nan, v)
  return _codes_from_inverse(v, bits, rounding)


def _dequantize_log2(q: jax.Array, zero: jax.Array) -> jax.Array:
  return jnp.where(zero, 0.0, _pow2(-q))


def log2_quant(p: jax.Array, key: jax.Array | None = None, *, bits: int = 4,
               rounding: Log2Rounding = 'geometric') -> jax.Array:
  """Log2 quantization of attention probabilities (FQ-ViT): p̂ = 2^-q or 0.

  The default is the float `Log2Quantizer` rule q = clamp(round(-log2 p), 0,
  2^b - 1) (the paper's log2 quantizer formula); 'arithmetic' is the rule the
  integer LIS applies to its integer 1/p (`log2_codes` has the table). With
  b = 4 the levels are {1, 1/2, ..., 2^-15, 0}; p·V then is a sum of shifts.

  Args:
    p: float probabilities in [0, 1], any shape.
    key: unused; accepted for the uniform signature.
    bits: 1..8 (paper: 4).
    rounding: 'geometric' (default) or 'arithmetic'.

  Returns:
    Dequantized array of p's shape and dtype (straight-through gradient).

  Examples:
    >>> import jax.numpy as jnp
    >>> from qtrain import fq_vit
    >>> fq_vit.log2_quant(jnp.array([1.0, 0.3, 0.2, 0.0])).tolist()
    [1.0, 0.25, 0.25, 0.0]
    >>> p = jnp.array([0.3, 0.172])  # 1/p = 3.3, 5.8: 5.8 is in [√2·4, 1.5·4)
    >>> fq_vit.log2_quant(p).tolist(), fq_vit.log2_quant(p, rounding='arithmetic').tolist()
    ([0.25, 0.125], [0.25, 0.25])
  """
  del key
  q, zero = log2_codes(p, bits=bits, rounding=rounding)
  return _ste(p, _dequantize_log2(q, zero))


def i_exp(x_int: jax.Array, scale, *, n: int = 30) -> tuple[jax.Array, jax.Array]:
  """I-BERT's integer exponential as FQ-ViT runs it (`QIntSoftmax.int_softmax.int_exp`).

  For x_int <= 0 (logits minus the row max, in units of `scale`):
  x0 = floor(-0.6931/s); x_int ← max(x_int, n·x0) (exp floored at 2^-n);
  q = floor(x_int/x0), r = x_int - q·x0 ∈ (x0, 0]; with a, b, c =
  0.35815147, 0.96963238, 1: z = r·(r + floor((b/a)/s)) + floor((c/a)/s²)
  ≈ exp(r·s)/(a·s²); e_int = max(floor(z·2^(n-q)), 0).

  Args:
    x_int: integer-valued float array, <= 0.
    scale: the float scale s of x_int (scalar; s < 0.6931, else x0 = -1 and
      the exponent is not resolved below one step).
    n: the exp range 2^-n (code: 30; 20 avoids int32 overflow in a real int32
      kernel, issue #21).

  Returns:
    (e_int, e_scale): integer-valued float32 of x_int's shape and the scalar
    a·s²/2^n, with exp(x_int·s) ≈ e_int·e_scale (relative error of the
    polynomial below ~0.3% on the resolved range, plus the integer floors).
  """
  n = check_int('n', n, 1, 62)
  x_int = _check_float(x_int, 'x_int').astype(jnp.float32)
  s = jnp.asarray(scale, jnp.float32)
  a, b, c = (np.float32(v) for v in _EXP_COEF)
  x0 = jnp.floor(true_divide(np.float32(-_LN2), s))
  x_int = jnp.maximum(x_int, n * x0)
  q = jnp.floor(true_divide(x_int, x0))
  r = x_int - x0 * q
  b_int = jnp.floor(true_divide(np.float32(b / a), s))
  c_int = jnp.floor(true_divide(np.float32(c / a), s * s))
  z = r * (r + b_int) + c_int
  e_int = jnp.maximum(jnp.floor(z * _pow2(n - q)), 0.0)
  return e_int, a * s * s / 2.0 ** n


def log_int_softmax_codes(x: jax.Array, scale, *, bits: int = 4, n: int = 30,
                          mask: jax.Array | None = None,
                          rounding: Log2Rounding = 'arithmetic', axis: int = -1):
  """LIS codes: integer softmax straight to log2 codes, no float softmax formed.

  x_int = round(x/s) - max_j (row max over unmasked entries); e = i_exp(x_int);
  v = round(Σ_j e_j / e_i) (an integer ≈ 1/p_i); q_i = round(log2 v) by
  `rounding` ('arithmetic' = the code's `log_round`: the MSB position, plus
  one if the next bit is set). Masked entries and e_i = 0 give p̂ = 0.

  x/s is rounded first: on-grid logits (x = (q - zp)·s) then give exact
  integers whatever the float error of the division (the code divides
  without rounding; identical for on-grid inputs up to that error).

  Args:
    x: float logits on the grid of `scale` (dequantized uint8 logits).
    scale: the logits' quantization scale s (scalar).
    bits: 1..8 (paper: 4; the 8/8/8 LIS row: 8).
    n: i-exp range (2^-n).
    mask: bool, broadcastable to x, True = attend; None = all.
    rounding: 'arithmetic' (LIS, default) or 'geometric'.
    axis: the softmax axis.

  Returns:
    (codes, zero) as `log2_codes`.
  """
  x = _check_float(x)
  bits = check_int('bits', bits, 1, 8)
  _check_rounding(rounding)
  axis = _norm_axis(x, axis)
  s = jnp.asarray(scale, jnp.float32)
  x_int = jnp.round(true_divide(x, s))
  keep = jnp.ones(x.shape, bool) if mask is None else jnp.broadcast_to(mask, x.shape)
  row_max = jnp.max(jnp.where(keep, x_int, -jnp.inf), axis=axis, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max) | jnp.isnan(row_max), row_max, 0.0)
  e_int, _ = i_exp(jnp.minimum(x_int - row_max, 0.0), s, n=n)
  e_int = jnp.where(keep, e_int, 0.0)
  total = jnp.sum(e_int, axis=axis, keepdims=True)
  positive = e_int > 0
  v = jnp.where(positive, jnp.round(true_divide(total, jnp.where(positive, e_int, 1.0))),
                jnp.inf)
  v = jnp.where(jnp.isnan(x_int) | jnp.isnan(total), jnp.nan, v)
  return _codes_from_inverse(v, bits, rounding)


def log_int_softmax(x: jax.Array, scale, *, bits: int = 4, n: int = 30,
                    mask: jax.Array | None = None, rounding: Log2Rounding = 'arithmetic',
                    axis: int = -1) -> jax.Array:
  """Log-Int-Softmax (FQ-ViT §LIS): softmax(x) as log2-quantized probabilities 2^-q or 0.

  See `log_int_softmax_codes`. Agrees with `log2_quant(softmax(x),
  rounding='arithmetic')` except where i-exp's error or the integer rounding
  of v moves 1/p across a midpoint 1.5·2^k (one code apart), and with the
  default 'geometric' float rule additionally where 1/p ∈ [√2·2^k, 1.5·2^k).

  Args:
    x: float logits on the grid of `scale`.
    scale: the logits' scale (scalar).
    bits, n, mask, rounding, axis: as `log_int_softmax_codes`.

  Returns:
    float32 probabilities of x's shape (no gradient: inference only).

  Examples:
    >>> import jax.numpy as jnp
    >>> from qtrain import fq_vit
    >>> fq_vit.log_int_softmax(jnp.array([0.0, 0.0, -0.5, -4.0]), 0.05).tolist()
    [0.25, 0.25, 0.25, 0.0078125]
  """
  q, zero = log_int_softmax_codes(x, scale, bits=bits, n=n, mask=mask, rounding=rounding,
                                  axis=axis)
  return _dequantize_log2(q, zero)


# ----------------------------------------------------------------------------- integer LN


def dyadic_multiplier(a: jax.Array, *, bits: int = 8) -> tuple[jax.Array, jax.Array]:
  """(M, N) with M/2^N ≈ a > 0 (`QIntLayerNorm.get_MN`).

  N = clamp(bits-1-floor(log2 a), 0, 31), M = clamp(floor(a·2^N), 0, 2^bits-1).

  Unclamped, M ∈ [2^(bits-1), 2^bits) and a - 2^-N < M/2^N <= a: relative
  error below 2^-(bits-1).
  """
  bits = check_int('bits', bits, 2, 16)
  a = jnp.asarray(a, jnp.float32)
  n = jnp.clip(bits - 1 - jnp.floor(jnp.log2(a)), 0.0, 31.0)
  m = jnp.clip(jnp.floor(a * _pow2(n)), 0.0, 2.0 ** bits - 1)
  return m, n


def int_layer_norm(codes: PtfCodes, *, out_scale, scale: jax.Array | None = None,
                   bias: jax.Array | None = None, axis: int = -1,
                   multiplier_bits: int = 8) -> jax.Array:
  """LayerNorm computed on PTF integer codes (FQ-ViT; official `QIntLayerNorm`, mode 'int').

  With x̂ = (q - zp)·2^α (integers in units of the base scale s; the 2^α is a
  bit shift) and C channels:

      μ = s·Σx̂/C,  σ = (s/C)·sqrt(C·Σx̂² - (Σx̂)²)        (no ε)
      A = (s/σ)·γ/s_out → (M, N) = dyadic_multiplier(|A|)
      B = round((β - (μ/σ)·γ)/s_out · 2^N)
      y_int = round((sign(A)·M·x̂ + B) / 2^N)

  y ≈ y_int·s_out; the next quantizer adds its zero point and clips. A, B, M,
  N are per token (dynamic) and computed in float, as in the official
  simulation (the paper's integer kernel derives them with integer sqrt and
  division). A row with σ = 0 (constant token) gives y_int = round(β/s_out),
  the ε → 0 limit of LayerNorm, instead of the code's NaN.

  Args:
    codes: PtfCodes of the LayerNorm input (`ptf_codes`), channels along `axis`.
    out_scale: the output quantizer's scale s_out (scalar).
    scale, bias: γ and β, [C] float, or None (1 and 0).
    axis: the channel axis (normalised over it).
    multiplier_bits: width of M (code: 8).

  Returns:
    y_int, integer-valued float32 of the codes' shape (NaN propagates).
  """
  q = _check_float(codes.codes, 'codes.codes').astype(jnp.float32)
  axis = _norm_axis(q, axis)
  channels = q.shape[axis]
  shape = _channel_shape(q.ndim, axis)
  alpha = codes.alpha.astype(jnp.float32).reshape(shape)
  s = jnp.asarray(codes.base_scale, jnp.float32)
  s_out = jnp.asarray(out_scale, jnp.float32)
  gamma = (jnp.ones((channels,), jnp.float32) if scale is None
           else jnp.asarray(scale, jnp.float32)).reshape(shape)
  beta = (jnp.zeros((channels,), jnp.float32) if bias is None
          else jnp.asarray(bias, jnp.float32)).reshape(shape)
  x_hat = (q - codes.zero_point) * _pow2(alpha)
  sum1 = jnp.sum(x_hat, axis=axis, keepdims=True)
  sum2 = jnp.sum(x_hat * x_hat, axis=axis, keepdims=True)
  mean = true_divide(sum1, channels) * s
  spread = jnp.maximum(channels * sum2 - sum1 * sum1, 0.0)
  std = true_divide(s, channels) * jnp.sqrt(spread)
  flat = std == 0
  std_safe = jnp.where(flat, 1.0, std)
  a = true_divide(true_divide(s, std_safe) * gamma, s_out)
  m, n = dyadic_multiplier(jnp.abs(a), bits=multiplier_bits)
  b = jnp.round(true_divide(beta - true_divide(mean, std_safe) * gamma, s_out) * _pow2(n))
  y = jnp.round((jnp.sign(a) * m * x_hat + b) * _pow2(-n))  # exact: a power of two
  return jnp.where(flat, jnp.round(true_divide(beta, s_out)) + 0.0 * x_hat, y)


# ----------------------------------------------------------------------------- observers


class ObserverState(NamedTuple):
  """Running statistics of an activation observer (per tensor, float32 scalars)."""
  lo: jax.Array
  hi: jax.Array
  count: jax.Array  # int32: batches seen


def _initial_state() -> ObserverState:
  return ObserverState(lo=jnp.array(jnp.inf, jnp.float32), hi=jnp.array(-jnp.inf, jnp.float32),
                       count=jnp.array(0, jnp.int32))


def _ema(old, new, count, momentum):
  return jnp.where(count == 0, new, old + momentum * (new - old))


@dataclasses.dataclass(frozen=True, kw_only=True)
class MinMax:
  """Min of the batch minima and max of the batch maxima (`observer/minmax.py`)."""

  def init(self) -> ObserverState:
    """The empty state (no batch seen)."""
    return _initial_state()

  def update(self, state: ObserverState, x: jax.Array) -> ObserverState:
    """Folds one calibration batch `x` (float, any shape) into `state`."""
    x = _check_float(x).astype(jnp.float32)
    return ObserverState(lo=jnp.minimum(state.lo, jnp.min(x)), hi=jnp.maximum(state.hi, jnp.max(x)),
                         count=state.count + 1)

  def params(self, state: ObserverState, last: jax.Array | None = None, *,
             bits: int = 8) -> AffineParams:
    """Asymmetric uint parameters of the observed range (`last` is unused here).

    Raises:
      ValueError: no batch was observed.
    """
    _check_seen(state)
    return self.compute_params(state, last, bits=bits)

  def compute_params(self, state: ObserverState, last: jax.Array | None = None, *,
                     bits: int = 8) -> AffineParams:
    """`params` without the check that a batch was seen (traceable under jit)."""
    del last
    return minmax_params(state.lo, state.hi, bits=bits)


def _check_seen(state: ObserverState) -> None:
  if int(state.count) == 0:
    raise ValueError('the observer has seen no calibration batch.')


def _check_fraction(name: str, value, *, open_low: bool = True) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise TypeError(f'{name} must be a number, got {value!r}.')
  if not (0.0 < value <= 1.0 if open_low else 0.0 <= value <= 1.0):
    raise ValueError(f'{name}={value!r} must be in (0, 1].')


@dataclasses.dataclass(frozen=True, kw_only=True)
class Ema(MinMax):
  """EMA of the batch min and max: m ← m + momentum·(cur - m), the first batch initialises.

  Attributes:
    momentum: the code's ema_sigma (0.01).
  """
  momentum: float = 0.01

  def __post_init__(self):
    _check_fraction('momentum', self.momentum)

  def update(self, state: ObserverState, x: jax.Array) -> ObserverState:
    x = _check_float(x).astype(jnp.float32)
    return ObserverState(lo=_ema(state.lo, jnp.min(x), state.count, self.momentum),
                         hi=_ema(state.hi, jnp.max(x), state.count, self.momentum),
                         count=state.count + 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Percentile(MinMax):
  """EMA of per-batch quantiles (`observer/percentile.py`, layer-wise only).

  Per batch the `alpha` and 1 - `alpha` quantiles (linear interpolation, as
  torch.quantile) of the whole tensor, then m ← m + momentum·(cur - m).

  Attributes:
    alpha: upper quantile (code: 0.99999).
    momentum: the code's percentile_sigma (0.01).
  """
  alpha: float = 0.99999
  momentum: float = 0.01

  def __post_init__(self):
    _check_fraction('momentum', self.momentum)
    if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
        0.5 <= self.alpha <= 1.0):
      raise ValueError(f'alpha={self.alpha!r} must be in [0.5, 1].')

  def update(self, state: ObserverState, x: jax.Array) -> ObserverState:
    x = _check_float(x).astype(jnp.float32).reshape(-1)
    hi = jnp.quantile(x, self.alpha)
    lo = jnp.quantile(x, 1.0 - self.alpha)
    # jnp.quantile sorts NaN to the end; keep the NaN policy explicit.
    bad = jnp.any(jnp.isnan(x))
    hi, lo = jnp.where(bad, jnp.nan, hi), jnp.where(bad, jnp.nan, lo)
    return ObserverState(lo=_ema(state.lo, lo, state.count, self.momentum),
                         hi=_ema(state.hi, hi, state.count, self.momentum),
                         count=state.count + 1)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Omse(MinMax):
  """Min-max range shrunk by the factor with the least MSE on the last batch (`observer/omse.py`).

  The range (min, max) of all batches is scaled by (1 - shrink·i), i =
  0..steps-1 (both ends), and the candidate with the smallest mean squared
  quantization error on the last calibration batch wins (first on ties).

  Attributes:
    steps: number of candidates (code: 90).
    shrink: shrink step (code: 0.01).
  """
  steps: int = 90
  shrink: float = 0.01

  def __post_init__(self):
    check_int('steps', self.steps, 1, 10_000)
    _check_fraction('shrink', self.shrink)
    if self.shrink * (self.steps - 1) >= 1.0:
      raise ValueError(f'shrink·(steps - 1) = {self.shrink * (self.steps - 1)} must be < 1.')

  def params(self, state: ObserverState, last: jax.Array | None = None, *,
             bits: int = 8) -> AffineParams:
    """The MSE-optimal shrunk range on `last` (required: the last calibration batch)."""
    _check_seen(state)
    if last is None:
      raise ValueError('Omse.params needs the last calibration batch (last=...).')
    return self.compute_params(state, last, bits=bits)

  def compute_params(self, state: ObserverState, last: jax.Array | None = None, *,
                     bits: int = 8) -> AffineParams:
    last = _check_float(last, 'last').astype(jnp.float32)
    factors = 1.0 - self.shrink * jnp.arange(self.steps, dtype=jnp.float32)
    cand = minmax_params(state.lo * factors, state.hi * factors, bits=bits)
    qmax = 2.0 ** check_int('bits', bits, 2, 16) - 1

    def mse(s, zp):
      xq = (jnp.clip(jnp.round(true_divide(last, s)) + zp, 0.0, qmax) - zp) * s
      return jnp.mean(jnp.square(last - xq))

    errors = jax.vmap(mse)(cand.scale, cand.zero_point)
    best = jnp.argmin(errors)
    return AffineParams(scale=cand.scale[best], zero_point=cand.zero_point[best])


Observer = MinMax  # every observer is a MinMax subclass (same init/update/params interface)
OBSERVERS = {'minmax': MinMax, 'ema': Ema, 'percentile': Percentile, 'omse': Omse}


def make_observer(name: str) -> MinMax:
  """The observer named 'minmax', 'ema', 'percentile' or 'omse' with the code's defaults."""
  try:
    return OBSERVERS[name]()
  except (KeyError, TypeError):
    raise ValueError(f'observer={name!r} is unknown; allowed: {tuple(OBSERVERS)}.') from None
