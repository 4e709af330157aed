"""Numerics of the 4-bit training papers that `qtrain.numerics` does not have yet.

LUQ (Chmiel et al.) and Ultra-low (Sun et al.) need, beyond `numerics.luq`,
`numerics.sawb` and `numerics.radix4`:

| name                | paper     | what                                                        |
|---------------------|-----------|-------------------------------------------------------------|
| `SawbActivation`    | LUQ, (Sun)| calibration: SAWB clip on a 4-bit activation grid           |
| `sawb_activation`   | LUQ, (Sun)| quantizer with that calibration                             |
| `pact`              | Sun       | PACT activation quantizer with the learned-clip gradient    |
| `gradscale`         | Sun       | GradScale's power-of-two gradient scale (steady state)      |
| `gradscale_update`  | Sun       | one step of GradScale's doubling/halving rule (state)       |
| `hindsight_max`     | LUQ       | in-hindsight max estimate update (state)                    |
| `luq_hindsight`     | LUQ       | LUQ with α from a given (in-hindsight) max                  |

Quantizers follow the uniform signature `fn(x, key=None, *, bits=..., **defaults)
-> Array` and return dequantized values with a straight-through gradient.
Stateful rules (GradScale, in-hindsight max) are pure update functions: the
caller carries the state (see each docstring).

References:
  Chmiel et al., "Accurate Neural Training with 4-bit Matrix Multiplications
  at Standard Formats" (LUQ), arXiv:2112.10769 / ICLR 2023.
  Sun et al., "Ultra-Low Precision 4-bit Training of Deep Neural Networks",
  NeurIPS 2020.
  Choi et al., "PACT: Parameterized Clipping Activation for Quantized Neural
  Networks", arXiv:1805.06085.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from qtrain import config as cfgs
from qtrain import formats as fmts
from qtrain import numerics
from qtrain import rounding as rnd
from qtrain import scaling
from qtrain.quantize import check_float, fake_quant

__all__ = ['HindsightMax', 'SawbActivation', 'sawb_activation', 'activation_config', 'pact', 'gradscale',
           'gradscale_update', 'hindsight_max', 'luq_hindsight']


def _check_bits(bits, lo: int, hi: int) -> None:
  if isinstance(bits, bool) or not isinstance(bits, int):
    raise TypeError(f'bits must be an int, got {bits!r}.')
  if not lo <= bits <= hi:
    raise ValueError(f'bits={bits} is out of range; allowed: {lo}..{hi}.')


@dataclasses.dataclass(frozen=True, kw_only=True)
class SawbActivation(scaling.CustomCalibration):
  """SAWB clip for activations on a true `bits`-bit grid, chosen per tensor.

  clip = c1·sqrt(mean(x²)) − c2·mean|x| (max|x| if clip <= 0, IBM's guard).
  The format must be an unsigned `IntFormat` (UINT4: codes 0..15); the zero
  point picks one of two 16-level grids per scale group:

  * min(x) >= 0 (ReLU outputs, the common case): zero point 0, grid
    [0, 2^b − 1]·s with s = unsigned_top·clip / (2^b − 1). LUQ's code uses
    unsigned_top = 2 (Qn=0, Qp=15, s = 2·clip/15); a PACT-like clip at α = clip
    is unsigned_top = 1.
  * otherwise: zero point 2^(b−1), grid [−2^(b−1), 2^(b−1) − 1]·s with
    s = clip / 2^(b−1) (SAWB's signed 4-bit grid).

  Deviation from the LUQ code (deliberate, papers-1-4.md §1f pitfall 5): the
  code switches permanently to a 24-level grid [−8, 15]·2·clip/23 after the
  first negative input; here the choice is made per call and both grids have
  2^b levels.

  Attributes:
    unsigned_top: the top of the unsigned grid in units of the clip (> 0).
    c1, c2: SAWB coefficients; None = `scaling.SAWB_COEFFICIENTS[bits]`.
  """
  unsigned_top: float = 2.0
  c1: float | None = None
  c2: float | None = None

  def __post_init__(self):
    if not isinstance(self.unsigned_top, (int, float)) or not self.unsigned_top > 0:
      raise ValueError(f'unsigned_top={self.unsigned_top!r} must be a positive number.')

  def compute(self, x, fmt, granularity):
    if not isinstance(fmt, fmts.IntFormat) or fmt.signed:
      raise ValueError(f'SawbActivation needs an unsigned IntFormat (e.g. UINT4), got '
                       f'{fmt.name}.')
    c1, c2 = scaling.Sawb(c1=self.c1, c2=self.c2).coefficients(fmt.bits)
    rms = jnp.sqrt(scaling.group_reduce(x * x, jnp.mean, granularity))
    mabs = scaling.group_reduce(jnp.abs(x), jnp.mean, granularity)
    amax = scaling.group_reduce(jnp.abs(x), jnp.max, granularity)
    clip = c1 * rms - c2 * mabs
    clip = scaling.guard_zero(jnp.where(clip > 0, clip, amax))  # NaN stays NaN
    nonneg = scaling.group_reduce(x, jnp.min, granularity) >= 0
    half = 2.0 ** (fmt.bits - 1)
    scale = jnp.where(nonneg, self.unsigned_top * clip / fmt.qmax, clip / half)
    zero_point = jnp.where(nonneg, 0.0, half).astype(jnp.float32)
    return scale.astype(jnp.float32), zero_point


def activation_config(bits: int = 4, *, unsigned_top: float = 2.0, c1: float | None = None,
                      c2: float | None = None) -> cfgs.TensorConfig:
  """The TensorConfig of `sawb_activation` (for DotConfig forward lhs rules)."""
  _check_bits(bits, 2, 8)
  calibration = SawbActivation(unsigned_top=unsigned_top, c1=c1, c2=c2)
  scaling.Sawb(c1=c1, c2=c2).coefficients(bits)  # validates now, naming c1/c2
  return cfgs.TensorConfig(format=fmts.IntFormat(bits=bits, signed=False),
                           calibration=calibration)


def sawb_activation(x: jax.Array, key: jax.Array | None = None, *, bits: int = 4,
                    unsigned_top: float = 2.0, c1: float | None = None,
                    c2: float | None = None) -> jax.Array:
  """LUQ's forward activation quantizer: SAWB clip, true `bits`-bit grid, RTN.

  See `SawbActivation` for the grid (unsigned [0, 15]·2·clip/15 for
  non-negative tensors, signed [−8, 7]·clip/8 otherwise).

  Args:
    x: float array (activations), quantized per tensor.
    key: unused (round-to-nearest); accepted for the uniform signature.
    bits: 2..8 (coefficients default only for 4).
    unsigned_top: top of the unsigned grid in clips (LUQ's code: 2).
    c1, c2: SAWB coefficients.

  Returns:
    Dequantized array, shape and dtype of x.

  Examples:
    >>> import jax.numpy as jnp
    >>> from qtrain import four_bit
    >>> y = four_bit.sawb_activation(jnp.linspace(0.0, 1.0, 64))
    >>> len(set(y.tolist())) <= 16
    True
  """
  del key
  check_float(x)
  return fake_quant(x, activation_config(bits, unsigned_top=unsigned_top, c1=c1, c2=c2))


def pact(x: jax.Array, key: jax.Array | None = None, *, bits: int = 4,
         alpha: jax.Array | float = 10.0) -> jax.Array:
  """PACT: clamp to [0, α], then round onto 2^bits − 1 uniform steps of α.

  y = clip(x, 0, α); y_q = round(y·(2^b − 1)/α)·α/(2^b − 1), round half to
  even. Gradients (PACT's STE): ∂y_q/∂x = 1 on (0, α), else 0; ∂y_q/∂α = 1
  where x >= α, else 0; pass `alpha` as a trainable parameter to learn it
  (PACT adds an L2 penalty on α; that is the caller's loss).

  Args:
    x: float array (activations).
    key: unused (round-to-nearest); accepted for the uniform signature.
    bits: 2..8.
    alpha: positive clip level (scalar or broadcastable to x); a jax value
      receives the gradient above.

  Returns:
    Array of x's shape and dtype on the grid {0, α/(2^b−1), ..., α}.

  Raises:
    ValueError: bad bits, or a concrete non-positive alpha.

  References:
    Choi et al., PACT, arXiv:1805.06085 (Eq. 1–3); Sun et al. use IBM's
    PACT for activations (papers-1-4.md §2a, unverified).

  Examples:
    >>> import jax.numpy as jnp
    >>> from qtrain import four_bit
    >>> four_bit.pact(jnp.array([-1.0, 0.5, 0.52, 3.0]), bits=2, alpha=1.5).tolist()
    [0.0, 0.5, 0.5, 1.5]
  """
  del key
  check_float(x)
  _check_bits(bits, 2, 8)
  if isinstance(alpha, (int, float)) and not alpha > 0:
    raise ValueError(f'alpha={alpha!r} must be positive.')
  alpha = jnp.asarray(alpha, x.dtype)
  n = 2 ** bits - 1
  # where, not min/max: those split the gradient 1/2-1/2 at ties (x == α).
  y = jnp.where(x >= alpha, alpha, jnp.where(x > 0, x, jnp.zeros_like(x)))
  step = jax.lax.stop_gradient(alpha) / n
  q = rnd.round_nearest_even(jax.lax.stop_gradient(y) / step) * step
  return (y + jax.lax.stop_gradient(q - y)).astype(x.dtype)


def _max_code(bits: int) -> float:
  return numerics.radix4_format(bits).absmax_target


def gradscale(x: jax.Array, *, bits: int = 4) -> jax.Array:
  """GradScale's steady-state scale of a gradient for radix-4 FP4: a power of two.

  s = 2^ceil(log2(max|x| / Max)) with Max = 4^kmax (64 for 4 bits), so
  max|x|/s lies in (Max/2, Max]: the fixed point of `gradscale_update`
  computed from the current tensor (what `scaling.AbsMax(power_of_two=True)`
  gives inside the quantized dot). The quantizer divides by s
  (`numerics.radix4(x, scale=s)`); Sun et al.'s multiplier is 1/s.

  Args:
    x: float array (one layer's gradient).
    bits: 3..5, the radix-4 format width.

  Returns:
    float32 scalar; 1/Max for an all-zero x; NaN/Inf if x has NaN/Inf.
  """
  check_float(x)
  fmt = numerics.radix4_format(bits)
  scale, _ = scaling.compute_scale(x, fmt, scaling.AbsMax(power_of_two=True))
  return scale.reshape(())


def gradscale_update(scale: jax.Array, x: jax.Array, *, bits: int = 4) -> jax.Array:
  """One step of Sun et al.'s per-layer GradScale rule (power-of-two steps).

  With m = max|x|/scale (code units) and Max the largest radix-4 magnitude:
  m > Max (overflow) halves the scale's multiplier (scale ← 2·scale);
  m <= Max/2 (range under-used) doubles it (scale ← scale/2); otherwise the
  scale is kept. Repeated on a fixed tensor it reaches `gradscale(x)`. An
  all-zero x keeps the scale (there is nothing to align); a non-finite max
  keeps it too, so one bad step does not poison later ones (the quantized
  gradient of that step is NaN anyway).

  Args:
    scale: positive float scalar, the current divisor (carry it across steps
      per layer, e.g. in a Flax variable).
    x: the layer's gradient of this step.
    bits: 3..5.

  Returns:
    The next scale (float32 scalar).

  Raises:
    ValueError: a concrete non-positive scale.
  """
  check_float(x)
  check_float(scale, 'scale')
  if not isinstance(scale, jax.core.Tracer) and not bool(jnp.all(jnp.asarray(scale) > 0)):
    raise ValueError(f'scale={scale!r} must be positive.')
  top = _max_code(bits)
  scale = jnp.asarray(scale, jnp.float32).reshape(())
  m = jnp.max(jnp.abs(jax.lax.stop_gradient(x)).astype(jnp.float32), initial=0.0) / scale
  new = jnp.where(m > top, scale * 2, jnp.where(m <= top / 2, scale / 2, scale))
  return jnp.where(jnp.isfinite(m) & (m > 0), new, scale)


def hindsight_max(estimate: jax.Array | None, x: jax.Array, *, momentum: float) -> jax.Array:
  """LUQ's in-hindsight max: the estimate to use at the *next* step.

  m̂_{t+1} = (1 − η)·max|x_t| + η·m̂_t (LUQ §7, η = momentum). The quantizer
  of step t+1 uses m̂_{t+1} (`luq_hindsight(..., max_value=m̂_{t+1})`), so no
  reduction over the tensor is on its critical path. With estimate=None
  (the first step) the estimate is max|x_t|.

  Args:
    estimate: the current estimate m̂_t (scalar), or None at the first step.
    x: this step's gradient δ_t.
    momentum: η in [0, 1]. The paper's value (its App. A.5.5) was not
      available to us, so there is no default.

  Returns:
    float32 scalar. A non-finite max|x| makes it non-finite (visible).

  Raises:
    ValueError: momentum outside [0, 1].
  """
  check_float(x)
  if not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
    raise ValueError(f'momentum={momentum!r} must be a number in [0, 1].')
  m = jnp.max(jnp.abs(jax.lax.stop_gradient(x)).astype(jnp.float32), initial=0.0)
  if estimate is None:
    return m
  return (1 - momentum) * m + momentum * jnp.asarray(estimate, jnp.float32).reshape(())


def luq_hindsight(x: jax.Array, key: jax.Array | None = None, *, bits: int = 4,
                  max_value: jax.Array) -> jax.Array:
  """LUQ with α = max_value / 2^(2^(bits−1)−1) from a given (in-hindsight) max.

  As `numerics.luq`, except the top level is `max_value` rather than this
  tensor's max|x|: values above it saturate to ±max_value (biased: the price
  of the estimate, LUQ §7), values below round unbiasedly (stochastic
  underflow below α, logarithmic SR above).

  Args:
    x: float array (a gradient).
    key: PRNG key (required: the rule is stochastic).
    bits: 2..6.
    max_value: positive scalar, e.g. `hindsight_max(...)` of the previous step.

  Returns:
    Array of x's shape and dtype with magnitudes in {0} ∪ {α·2^k}.

  Raises:
    ValueError: missing key; bad bits.
  """
  check_float(x)
  if key is None:
    raise ValueError('luq_hindsight: key is required for stochastic rounding (got key=None).')
  cfg = numerics.luq_config(bits)
  scale = jnp.asarray(max_value, jnp.float32) / cfg.format.absmax_target
  return fake_quant(x, cfg, key=key, scale=scale)


@dataclasses.dataclass(frozen=True, kw_only=True)
class HindsightMax(scaling.StatefulCalibration):
  """LUQ's in-hindsight max as a stateful calibration of a gradient slot.

  Per layer the state is {'max': m̂_t, 'count': updates so far} (float32
  scalars; all zeros = no update yet). Step t quantizes with the scale of
  the estimate m̂_t carried from earlier steps (the first step uses its own
  max|dY|), so values above it saturate, and hands out
  m̂_{t+1} = (1 − η)·max|dY_t| + η·m̂_t (`hindsight_max`). The grid is the
  format's: with `numerics.luq_config`'s LogFormat the top level is m̂_t.
  Per tensor only.

  Attributes:
    momentum: η in [0, 1]. LUQ's value (its App. A.5.5) was not available;
      `qtrain.recipes.luq(hindsight_momentum=...)` makes the caller choose.
  """
  momentum: float

  def __post_init__(self):
    if isinstance(self.momentum, bool) or not isinstance(self.momentum, (int, float)) or not (
        0 <= self.momentum <= 1):
      raise ValueError(f'momentum={self.momentum!r} must be a number in [0, 1].')

  def init_state(self, shape, granularity):
    if not isinstance(granularity, scaling.PerTensor):
      raise ValueError(f'HindsightMax is per tensor, got {granularity!r}.')
    return {'max': jnp.zeros((), jnp.float32), 'count': jnp.zeros((), jnp.float32)}

  def compute(self, x, fmt, granularity, state):
    current = hindsight_max(None, x, momentum=self.momentum)
    fresh = state['count'] == 0
    estimate = jnp.where(fresh, current, state['max'])
    new_max = jnp.where(fresh, current, hindsight_max(state['max'], x, momentum=self.momentum))
    scale = scaling.guard_zero(estimate) / fmt.absmax_target
    scale = jnp.reshape(scale, (1,) * x.ndim)  # the group shape of a per-tensor scale
    return scale, None, {'max': new_max, 'count': state['count'] + 1.0}
