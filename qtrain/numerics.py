"""The papers' tensor quantizers as pure functions with one signature.

    fn(x, key=None, *, bits=..., **paper_defaults) -> Array

Each returns *dequantized* values of x's shape and dtype (fake quantization
with a straight-through gradient), so it can be dropped into any JAX code.
`key` is required where the rule is stochastic. For the low-bit GEMMs
themselves use `qtrain.dot_general` with a `DotConfig` built from the same
formats (`qtrain.presets`).

| function          | paper                                  | grid                                   |
|-------------------|----------------------------------------|----------------------------------------|
| `int_symmetric`   | UI8, DA-INT8, StatQuant forward        | int, absmax scale                      |
| `int_asymmetric`  | FQ-ViT (MinMax), activations           | uint, min-max scale + zero point       |
| `sawb`            | LUQ forward (INT4 W and A)             | int, SAWB clip                         |
| `luq`             | LUQ backward (neural gradients)        | 0, ±α·2^k, α = max|x|/2^(2^(bits-1)-1) |
| `radix4`          | Ultra-low backward (+TPR phase)        | 0, ±s·4^k (phase 1: ±s·2·4^k)          |
| `fixed_point`     | WAGEUBN W, A, BN, U, LR, momentum      | k·2^-fractional_bits, no scale         |
| `stochastic_round`| generic SR (WAGEUBN G, UI8 gradients)  | any format, absmax scale               |

The paper recipes' own quantizers live in one module per paper and are
re-exported here with the same signature:

| function          | paper (module)                          | what                                   |
|-------------------|-----------------------------------------|----------------------------------------|
| `sawb_activation` | LUQ (`qtrain.four_bit`)                 | INT4 SAWB, unsigned grid for x >= 0    |
| `pact`            | Ultra-low (`qtrain.four_bit`)           | PACT clip α, learned α gradient        |
| `luq_hindsight`   | LUQ (`qtrain.four_bit`)                 | LUQ with a given (in-hindsight) max    |
| `gradscale`       | Ultra-low (`qtrain.four_bit`)           | per-layer power-of-two gradient scale  |
| `cosine_clip`     | Unified INT8 (`qtrain.clipping`)        | INT8 with the cosine-optimal clip      |
| `gvq`             | DA-INT8 (`qtrain.gvq`)                  | per-channel INT8, magnitude-aware clip |
| `wageubn_weight`, `wageubn_activation`, `wageubn_error`, `wageubn_grad`, `wageubn_lr`, `wageubn_direct` | WAGEUBN (`qtrain.wageubn`) | fixed point, shift (E1/E2), constant scaling + SR (G) |
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qtrain import config as cfgs
from qtrain import formats as fmts
from qtrain import prng
from qtrain import rounding as rnd
from qtrain import scaling
from qtrain.quantize import check_float, fake_quant

__all__ = ['int_symmetric', 'int_asymmetric', 'sawb', 'luq', 'radix4', 'fixed_point',
           'stochastic_round']


def _check_bits(bits, lo: int, hi: int) -> None:
  if isinstance(bits, bool) or not isinstance(bits, int):
    raise TypeError(f'bits must be an int, got {bits!r}.')
  if not lo <= bits <= hi:
    raise ValueError(f'bits={bits} is out of range; allowed: {lo}..{hi}.')


def _check_key(key, rounding: str, fn: str) -> None:
  rnd.check_rounding(rounding)
  if rounding == 'stochastic' and key is None:
    raise ValueError(f'{fn}: key is required for stochastic rounding (got key=None).')


def _granularity(axis) -> scaling.Granularity:
  return scaling.PerTensor() if axis is None else scaling.PerChannel(
      axes=(axis,) if isinstance(axis, int) else tuple(axis))


def int_symmetric(x: jax.Array, key: jax.Array | None = None, *, bits: int = 8,
                  narrow: bool = True, rounding: rnd.Rounding = 'nearest',
                  axis: int | tuple[int, ...] | None = None) -> jax.Array:
  """Symmetric integer quantization with an absmax scale.

  Args:
    x: float array, any shape.
    key: PRNG key, required when rounding='stochastic'.
    bits: 2..8.
    narrow: symmetric grid [-(2^(b-1)-1), 2^(b-1)-1] (default) or full range.
    rounding: 'nearest' or 'stochastic'.
    axis: None = per tensor; an axis (or axes) = one scale per index there.

  Returns:
    Dequantized array, shape and dtype of x.

  Examples:
    >>> import jax.numpy as jnp
    >>> from qtrain import numerics
    >>> numerics.int_symmetric(jnp.array([1.0, -0.6, 0.3]), bits=2).tolist()
    [1.0, -1.0, 0.0]
  """
  check_float(x)
  _check_bits(bits, 2, 8)
  _check_key(key, rounding, 'int_symmetric')
  cfg = cfgs.TensorConfig(format=fmts.IntFormat(bits=bits, narrow=narrow), rounding=rounding,
                          granularity=_granularity(axis))
  return fake_quant(x, cfg, key=key)


def int_asymmetric(x: jax.Array, key: jax.Array | None = None, *, bits: int = 8,
                   rounding: rnd.Rounding = 'nearest',
                   axis: int | tuple[int, ...] | None = None) -> jax.Array:
  """Asymmetric (min-max, zero point) unsigned integer quantization.

  The range [min(x, 0), max(x, 0)] maps onto [0, 2^bits - 1]; zero is exact.
  Arguments as in `int_symmetric`.
  """
  check_float(x)
  _check_bits(bits, 2, 8)
  _check_key(key, rounding, 'int_asymmetric')
  cfg = cfgs.TensorConfig(format=fmts.IntFormat(bits=bits, signed=False), rounding=rounding,
                          calibration=scaling.MinMax(), granularity=_granularity(axis))
  return fake_quant(x, cfg, key=key)


def sawb(x: jax.Array, key: jax.Array | None = None, *, bits: int = 4,
         c1: float | None = None, c2: float | None = None,
         rounding: rnd.Rounding = 'nearest') -> jax.Array:
  """SAWB quantization (LUQ's forward INT4 for weights and activations).

  clip = c1·sqrt(mean(x²)) - c2·mean|x| per tensor (falls back to max|x| if
  clip <= 0); step = clip / 2^(bits-1); grid: full-range signed ints
  [-2^(bits-1), 2^(bits-1)-1], round-to-nearest-even.

  Difference from the LUQ code (documented, deliberate): the code rounds onto
  [-8, 8], 17 levels, which is not a 4-bit grid; here the top level is 7, a
  real int4, with the same step clip/8.

  Args:
    x: float array.
    key: PRNG key, required when rounding='stochastic'.
    bits: 2..8; default coefficients exist for 4 (c1=12.1, c2=12.2, LUQ's).
    c1, c2: SAWB coefficients (required for bits other than 4).
    rounding: 'nearest' (the paper) or 'stochastic'.

  Returns:
    Dequantized array, shape and dtype of x.

  References:
    Chmiel et al., arXiv:2112.10769 §3.3; Choi et al., arXiv:1807.06964.
  """
  check_float(x)
  _check_bits(bits, 2, 8)
  _check_key(key, rounding, 'sawb')
  calibration = scaling.Sawb(c1=c1, c2=c2)
  calibration.coefficients(bits)  # validates now, naming c1/c2
  cfg = cfgs.TensorConfig(format=fmts.IntFormat(bits=bits), rounding=rounding,
                          calibration=calibration)
  return fake_quant(x, cfg, key=key)


def luq_format(bits: int) -> fmts.LogFormat:
  """LUQ's radix-2 log grid for `bits` (sign + bits-1 exponent bits): 2^0..2^(2^(bits-1)-1)."""
  _check_bits(bits, 2, 6)
  if bits == 4:
    return fmts.LOG2_FP4
  return fmts.LogFormat(radix=2, min_exponent=0, max_exponent=2 ** (bits - 1) - 1)


def luq_config(bits: int = 4, samples: int = 1) -> cfgs.TensorConfig:
  """The TensorConfig of `luq` (for DotConfig backward rules)."""
  return cfgs.TensorConfig(format=luq_format(bits), rounding='stochastic', samples=samples)


def luq(x: jax.Array, key: jax.Array | None = None, *, bits: int = 4,
        samples: int = 1) -> jax.Array:
  """Logarithmic unbiased quantization of neural gradients (LUQ).

  α = max|x| / 2^(2^(bits-1)-1) (the *absolute* max: the official code's
  signed max is a bug, papers-1-4.md §1f); values below α underflow
  stochastically to 0 or ±α; above, they round stochastically between
  neighbouring powers of two times α. Unbiased: E[luq(x)] = x. Zero takes an
  extra code beyond the 2^(bits-1) magnitudes, as in the official code.

  Args:
    x: float array (a gradient), any shape.
    key: PRNG key (required: the rule is stochastic).
    bits: 2..6 (4: magnitudes α·2^0..α·2^7).
    samples: SMP, average this many independent samples (variance / samples).

  Returns:
    Array of x's shape and dtype whose nonzero magnitudes are α·2^k.

  References:
    Chmiel et al., "Accurate Neural Training with 4-bit Matrix
    Multiplications at Standard Formats" (LUQ), arXiv:2112.10769, §4–5.
  """
  check_float(x)
  cfg = luq_config(bits, samples)
  _check_key(key, 'stochastic', 'luq')
  return fake_quant(x, cfg, key=key)


def radix4_format(bits: int = 4, phase: int = 0) -> fmts.LogFormat:
  """Sun et al.'s radix-4 [1, bits-1, 0] grid; phase 1 is the odd TPR grid (2·4^k)."""
  _check_bits(bits, 3, 5)
  if phase not in (0, 1):
    raise ValueError(f'phase={phase!r} is unknown; allowed: 0 (even grid), 1 (odd grid).')
  n = 2 ** (bits - 1) - 1  # magnitudes; one exponent code is zero
  kmax = (n - 1) // 2
  return fmts.LogFormat(radix=4, min_exponent=kmax - n + 1, max_exponent=kmax, shift=phase)


def radix4(x: jax.Array, key: jax.Array | None = None, *, bits: int = 4, phase: int = 0,
           scale: jax.Array | None = None) -> jax.Array:
  """Radix-4 FP4 quantization of gradients (Sun et al., Ultra-low 4-bit).

  Magnitudes s·4^k (k = -3..3 for 4 bits) and zero; round-to-nearest in the
  linear domain, i.e. between 4^(n-1) and 4^n at the midpoint 0.625·4^n.
  Phase 1 (Two-Phase Rounding's odd grid) rounds onto s·2·4^k with the same
  scale s, so the two phases' errors partly cancel when they feed the two
  backward GEMMs.

  Args:
    x: float array (a gradient).
    key: unused (the rule is deterministic); accepted for the uniform signature.
    bits: 3..5 (sign + bits-1 exponent bits, one exponent code for zero).
    phase: 0 (even grid 4^k) or 1 (odd grid 2·4^k).
    scale: per-tensor scale s; default is the power of two 2^ceil(log2(max|x|/4^kmax)),
      the steady state of the per-layer GradScale rule (max|x|/s in (Max/2, Max]).

  Returns:
    Dequantized array, shape and dtype of x.

  References:
    Sun et al., NeurIPS 2020, §3 (radix-4 FP4, GradScale, TPR).
  """
  del key
  check_float(x)
  cfg = cfgs.TensorConfig(format=radix4_format(bits, phase),
                          calibration=scaling.AbsMax(power_of_two=True))
  return fake_quant(x, cfg, scale=scale)


def fixed_point(x: jax.Array, key: jax.Array | None = None, *, bits: int = 8,
                fractional_bits: int | None = None, saturate: bool = True,
                rounding: rnd.Rounding = 'nearest') -> jax.Array:
  """Fixed-point quantization with a fixed step 2^-fractional_bits (WAGEUBN's Q).

  Q(x, k) = round(x · 2^(k-1)) / 2^(k-1) for the default fractional_bits =
  bits - 1. With saturate=True codes are clipped to ±(2^(bits-1) - 1) (the
  weights' C(Q(W, 8), 8)); saturate=False leaves the range unbounded, as the
  WAGEUBN code does for activations and BN outputs.

  Args:
    x: float array.
    key: PRNG key, required when rounding='stochastic'.
    bits: 2..32.
    fractional_bits: default bits - 1.
    saturate: clip to the bits-bit range.
    rounding: 'nearest' or 'stochastic'.

  Returns:
    Dequantized array, shape and dtype of x.

  References:
    Yang et al., "Training High-Performance and Large-Scale Deep Neural
    Networks with Full 8-bit Integers" (WAGEUBN), arXiv:1909.02384.
  """
  check_float(x)
  _check_bits(bits, 2, 32)
  _check_key(key, rounding, 'fixed_point')
  fmt = fmts.fixed_point(bits, fractional_bits)
  if saturate:
    return fake_quant(x, cfgs.TensorConfig(format=fmt, rounding=rounding), key=key)
  units = jax.lax.stop_gradient(x).astype(jnp.float32) / fmt.step
  if rounding == 'nearest':
    q = rnd.round_nearest_even(units)
  else:
    q = rnd.round_stochastic(units, prng.uniform(key, x.shape))
  y = (q * fmt.step).astype(x.dtype)
  return jax.lax.stop_gradient(y) + (x - jax.lax.stop_gradient(x))


def stochastic_round(x: jax.Array, key: jax.Array | None = None, *, bits: int = 8,
                     format: fmts.Format | None = None) -> jax.Array:  # pylint: disable=redefined-builtin
  """Unbiased stochastic rounding onto a grid scaled by max|x| (per tensor).

  Args:
    x: float array.
    key: PRNG key (required).
    bits: width of the default grid, a narrow symmetric int (2..8).
    format: any `qtrain.formats.Format` instead of the int grid.

  Returns:
    Dequantized array, shape and dtype of x, with E[result] = x.
  """
  check_float(x)
  _check_bits(bits, 2, 8)
  _check_key(key, 'stochastic', 'stochastic_round')
  fmt = format if format is not None else fmts.IntFormat(bits=bits, narrow=True)
  return fake_quant(x, cfgs.TensorConfig(format=fmt, rounding='stochastic'), key=key)


# Re-exports of the paper modules (imported last: they build on this module).
# pylint: disable=wrong-import-position
from qtrain.four_bit import (gradscale, gradscale_update, hindsight_max,  # noqa: E402
                             luq_hindsight, pact, sawb_activation)
from qtrain.clipping import cosine_clip, cosine_clip_search, cosine_distance  # noqa: E402
from qtrain.gvq import gvq, magnitude_aware_clip  # noqa: E402
from qtrain.wageubn import (wageubn_activation, wageubn_direct, wageubn_error,  # noqa: E402
                            wageubn_grad, wageubn_lr, wageubn_weight)

from qtrain.statquant import bhq, per_column, psq  # noqa: E402
from qtrain.statquant import ptq as statquant_ptq  # noqa: E402
from qtrain.fq_vit import (i_exp, int_layer_norm, log2_quant, log_int_softmax,  # noqa: E402
                           minmax_quant, ptf, ptf_codes, weight_quant)

from qtrain.hadamard import hadamard  # noqa: E402
from qtrain.bit_split import bit_split, lss  # noqa: E402

__all__ += ['hadamard', 'bit_split', 'lss']
__all__ += ['bhq', 'per_column', 'psq', 'statquant_ptq', 'log2_quant', 'ptf', 'ptf_codes',
            'log_int_softmax', 'i_exp', 'int_layer_norm', 'minmax_quant', 'weight_quant']
__all__ += ['sawb_activation', 'pact', 'luq_hindsight', 'gradscale', 'gradscale_update',
            'hindsight_max', 'cosine_clip', 'cosine_clip_search', 'cosine_distance', 'gvq',
            'magnitude_aware_clip', 'wageubn_weight', 'wageubn_activation', 'wageubn_error',
            'wageubn_grad', 'wageubn_lr', 'wageubn_direct']
