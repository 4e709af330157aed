"""Scales: how a tensor is mapped onto a format's grid.

Two independent choices, both frozen data:

* a *granularity* says which elements share one scale:
  `PerTensor()`, `PerChannel(axes)` (one scale per index of `axes`, any axes;
  per row/sample is `PerChannel(axes=(0,))`), `PerBlock(axis, block_size)`
  (one scale per contiguous block along `axis`, per index of the other axes);
* a *calibration* says how the scale is computed from the elements of a group:
  `AbsMax` (symmetric, optional power-of-two), `MinMax` (asymmetric with zero
  point), `Sawb` (statistics-aware weight binning), `FixedScale` (a constant,
  e.g. a fixed-point step), `Lsq` (a learned step passed in by the caller),
  a subclass of `CustomCalibration` (a paper's own clip rule, e.g. a
  clip searched per step), or a subclass of `StatefulCalibration` (a rule
  whose state is carried across training steps; backward dY slots of a
  `DotConfig` only, see `qtrain.dot.dot_general`'s `grad_state`).

Scales have the input's rank (size 1 on the reduced axes; `n_blocks` on a block
axis) so they broadcast against the input, or against it after
`expand_scale` for blocks.

Zero-guard and NaN policy: a group whose statistic is exactly 0 (all-zero
tensor) has the statistic replaced by 1 (scale 1/target, finite and nonzero),
so it quantizes to zeros, never NaN; a group whose
statistic is NaN or ±Inf keeps that non-finite scale, so the group
dequantizes to NaN and the problem stays visible.

References:
  Choi et al., "Bridging the Accuracy Gap for 2-bit Quantized Neural
  Networks (QNN)", arXiv:1807.06964 (SAWB).
  Esser et al., "Learned Step Size Quantization", ICLR 2020 (LSQ).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Union

import jax
import jax.numpy as jnp

from qtrain import formats as fmts

__all__ = [
    'PerTensor', 'PerChannel', 'PerBlock', 'Granularity', 'AbsMax', 'MinMax', 'Sawb',
    'FixedScale', 'Lsq', 'CustomCalibration', 'StatefulCalibration', 'Calibration',
    'group_reduce', 'expand_scale',
    'guard_zero', 'compute_scale', 'lsq_fake_quant', 'SAWB_COEFFICIENTS',
]

_dataclass = dataclasses.dataclass(frozen=True, kw_only=True, slots=True)


@_dataclass
class PerTensor:
  """One scale for the whole tensor."""


@_dataclass
class PerChannel:
  """One scale per index of `axes` (statistics reduced over all other axes).

  Attributes:
    axes: the axes that keep their own scale, e.g. (0,) = per row/sample,
      (-1,) = per output channel of an HWIO kernel. `None` is only meaningful
      inside `qtrain.dot_general`/`conv_general_dilated`, where it means "every
      non-contracting axis" (the granularity whose scale factors out of the
      GEMM exactly).
  """
  axes: tuple[int, ...] | None = None

  def __post_init__(self):
    if self.axes is not None:
      if isinstance(self.axes, int):
        object.__setattr__(self, 'axes', (self.axes,))
      if not all(isinstance(a, int) for a in self.axes):
        raise TypeError(f'axes must be a tuple of ints or None, got {self.axes!r}.')


@_dataclass
class PerBlock:
  """One scale per block of `block_size` consecutive elements along `axis`."""
  block_size: int
  axis: int = -1

  def __post_init__(self):
    if not isinstance(self.block_size, int) or self.block_size <= 0:
      raise ValueError(f'block_size={self.block_size!r} must be a positive int.')


Granularity = Union[PerTensor, PerChannel, PerBlock]


@_dataclass
class AbsMax:
  """scale = max|x| / fmt.absmax_target; optionally rounded up to a power of two.

  With `power_of_two=True` the scale is 2^ceil(log2(max|x| / target)), so
  max|x|/scale lies in (target/2, target]: the steady state of Sun et al.'s
  per-layer GradScale rule.
  """
  power_of_two: bool = False


@_dataclass
class MinMax:
  """Asymmetric range [min(x, 0), max(x, 0)] mapped onto [qmin, qmax] with a zero point."""


# Coefficients (c1, c2) of the SAWB clip c1·sqrt(E[x²]) - c2·E|x| by bit width.
# 4: the values of the LUQ reference code (papers-1-4.md §1a). Other widths
# need explicit coefficients.
SAWB_COEFFICIENTS = {4: (12.1, 12.2)}


@_dataclass
class Sawb:
  """Statistics-aware weight binning: clip = c1·sqrt(mean(x²)) - c2·mean|x|.

  scale = clip / fmt.max_value (the largest magnitude, 8 for int4, as in the
  LUQ code where s = 2·clip/(Qp - Qn) with Qn = -8, Qp = 8). A clip <= 0
  (near-constant magnitudes, e.g. ±c gives -0.1c) falls back to max|x|, as
  IBM's reference SAWB does; the LUQ code has no such guard.

  Attributes:
    c1, c2: regression coefficients; None takes `SAWB_COEFFICIENTS[bits]`.
  """
  c1: float | None = None
  c2: float | None = None

  def coefficients(self, bits: int) -> tuple[float, float]:
    if self.c1 is not None and self.c2 is not None:
      return self.c1, self.c2
    if bits not in SAWB_COEFFICIENTS:
      raise ValueError(f'SAWB has no default coefficients for bits={bits}; pass c1 and c2 '
                       f'(defaults exist for bits in {sorted(SAWB_COEFFICIENTS)}).')
    return SAWB_COEFFICIENTS[bits]


@_dataclass
class FixedScale:
  """A constant scale (e.g. 2^-7 for 8-bit fixed point)."""
  value: float

  def __post_init__(self):
    if not (isinstance(self.value, (int, float)) and math.isfinite(self.value) and self.value > 0):
      raise ValueError(f'value={self.value!r} must be a positive finite number.')


@_dataclass
class Lsq:
  """Learned step size: the caller passes the step (a parameter) as `scale=`."""


class CustomCalibration:
  """Base class of calibrations defined outside this module (paper clip rules).

  Subclass it as a frozen, keyword-only dataclass (configs are static, hashed
  by jit) and implement `compute`. `compute_scale` calls it with the
  stop-gradient float32 tensor; the result follows the module's conventions:
  a float32 scale of the group shape (`group_reduce`'s output shape), the
  zero-guard for all-zero groups (`guard_zero`), and NaN/Inf groups kept
  non-finite.

  Examples:
    >>> import dataclasses, jax.numpy as jnp
    >>> from qtrain import formats, scaling
    >>> @dataclasses.dataclass(frozen=True, kw_only=True)
    ... class HalfMax(scaling.CustomCalibration):
    ...   def compute(self, x, fmt, granularity):
    ...     amax = scaling.group_reduce(jnp.abs(x), jnp.max, granularity)
    ...     return scaling.guard_zero(amax / 2) / fmt.absmax_target, None
    >>> scale, _ = scaling.compute_scale(jnp.array([-4.0, 2.0]), formats.INT8, HalfMax())
    >>> round(float(scale[0] * 127), 4)
    2.0
  """
  __slots__ = ()

  def compute(self, x: jax.Array, fmt: fmts.Format, granularity: Granularity
              ) -> tuple[jax.Array, jax.Array | None]:
    """Returns (scale, zero_point or None) of float32 `x` for `fmt` (see the class doc)."""
    raise NotImplementedError(f'{type(self).__name__} must implement compute().')


class StatefulCalibration:
  """Base class of calibrations with per-layer state carried across steps.

  A paper rule such as DA-INT8's EMA clip or UI8's periodic clip search
  computes this step's scale from this step's tensor *and* a state kept
  from the previous step, and returns the updated state. Subclass it as a
  frozen, keyword-only dataclass (configs are static, hashed by jit) and
  implement `init_state` and `compute`.

  Where it can be used: only in the dY slots of a `DotConfig`
  (`dlhs.lhs`, `drhs.rhs`). `qtrain.dot_general`/`conv_general_dilated`
  take the state as `grad_state` and hand the updated state out as that
  argument's cotangent (the NNX hooks keep it in a
  `qtrain.nnx_hooks.GradState` variable). `compute_scale` and `quantize`
  cannot call it (they have no state) and raise.

  State rules: a pytree of float32 arrays (a cotangent carries it out of
  the backward pass, and integer inputs have no cotangent values, so a
  counter is a float32 count, exact up to 2^24 steps); all-zero must mean
  "no update yet" (a layer that took no part in a step's loss gets a zero
  cotangent, i.e. its state is reset to zeros).
  """
  __slots__ = ()

  def init_state(self, shape: tuple[int, ...], granularity: Granularity) -> dict:
    """The state before the first step for tensors of `shape`.

    Args:
      shape: the shape of the tensor quantized (dY).
      granularity: the resolved granularity (PerChannel axes concrete).

    Returns:
      A pytree of float32 arrays (see the class doc).
    """
    raise NotImplementedError(f'{type(self).__name__} must implement init_state().')

  def compute(self, x: jax.Array, fmt: fmts.Format, granularity: Granularity, state
              ) -> tuple[jax.Array, jax.Array | None, dict]:
    """Returns (scale, zero_point or None, new_state) of float32 `x`.

    The scale follows `CustomCalibration`'s conventions (group shape,
    zero-guard, non-finite kept); zero_point must be None for now (the dot
    passes the scale to `quantize`, which has no zero-point input).
    """
    raise NotImplementedError(f'{type(self).__name__} must implement compute().')


Calibration = Union[AbsMax, MinMax, Sawb, FixedScale, Lsq, CustomCalibration,
                    StatefulCalibration]


def _normalize_axes(axes, ndim: int, name: str = 'axes') -> tuple[int, ...]:
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f'{name}={axes} is out of range for an array of rank {ndim}.')
    out.append(a % ndim)
  return tuple(sorted(set(out)))


def _block_view(x: jax.Array, g: PerBlock) -> tuple[jax.Array, int]:
  axis = _normalize_axes((g.axis,), x.ndim, 'axis')[0]
  n = x.shape[axis]
  if n % g.block_size:
    raise ValueError(f'block_size={g.block_size} must divide the size {n} of axis {axis}.')
  shape = x.shape[:axis] + (n // g.block_size, g.block_size) + x.shape[axis + 1:]
  return x.reshape(shape), axis


def group_reduce(x: jax.Array, fn, granularity: Granularity) -> jax.Array:
  """Applies a reduction `fn(x, axis=..., keepdims=True)` within each scale group.

  Returns:
    Array of x's rank: size 1 on reduced axes, n_blocks on a block axis.
  """
  if isinstance(granularity, PerTensor):
    return fn(x, axis=tuple(range(x.ndim)), keepdims=True)
  if isinstance(granularity, PerChannel):
    if granularity.axes is None:
      raise ValueError('PerChannel(axes=None) is only defined inside a dot/conv; '
                       'outside, name the axes that keep their own scale.')
    keep = _normalize_axes(granularity.axes, x.ndim)
    return fn(x, axis=tuple(a for a in range(x.ndim) if a not in keep), keepdims=True)
  if isinstance(granularity, PerBlock):
    xb, axis = _block_view(x, granularity)
    return jnp.squeeze(fn(xb, axis=axis + 1, keepdims=True), axis + 1)
  raise TypeError(f'granularity must be PerTensor, PerChannel or PerBlock, got {granularity!r}.')


def expand_scale(scale: jax.Array, shape: tuple[int, ...], granularity: Granularity) -> jax.Array:
  """Broadcasts a group-shaped scale to `shape` (repeats blocks)."""
  if isinstance(granularity, PerBlock):
    axis = _normalize_axes((granularity.axis,), len(shape), 'axis')[0]
    scale = jnp.repeat(scale, granularity.block_size, axis=axis)
  return jnp.broadcast_to(scale, shape)


def guard_zero(stat: jax.Array) -> jax.Array:
  """`stat` with zeros (and subnormals, which XLA flushes to zero) replaced by 1.

  The zero-guard of the module doc; NaN statistics stay NaN (policy above).
  """
  tiny = jnp.finfo(jnp.result_type(stat, jnp.float32)).tiny
  return jnp.where(jnp.abs(stat) < tiny, jnp.ones_like(stat), stat)


def _mean(x, axis, keepdims):
  return jnp.mean(x, axis=axis, keepdims=keepdims)


# max/min with identity 0: the same result for the statistics below (which
# compare with 0 anyway), and defined for empty arrays. XLA:CPU's vectorised
# max/min reductions drop NaN (a NaN in a 128×512 tensor gives a finite max;
# found by the Pallas quantize kernels' tests), so NaN is re-imposed
# explicitly: the policy is that a NaN anywhere in a scale group makes its
# scale NaN.
def _nan_if_any(x, stat, axis, keepdims):
  return jnp.where(jnp.any(jnp.isnan(x), axis=axis, keepdims=keepdims),
                   jnp.asarray(jnp.nan, stat.dtype), stat)


def _max0(x, axis, keepdims):
  return _nan_if_any(x, jnp.max(x, axis=axis, keepdims=keepdims, initial=0.0), axis, keepdims)


def _min0(x, axis, keepdims):
  return _nan_if_any(x, jnp.min(x, axis=axis, keepdims=keepdims, initial=0.0), axis, keepdims)


def compute_scale(x: jax.Array, fmt: fmts.Format, calibration: Calibration,
                  granularity: Granularity = PerTensor()) -> tuple[jax.Array, jax.Array | None]:
  """Computes (scale, zero_point) of `x` for `fmt`.

  Args:
    x: float array.
    fmt: target format.
    calibration: AbsMax, MinMax, Sawb, FixedScale or a CustomCalibration
      (Lsq scales come from the caller).
    granularity: which elements share a scale.

  Returns:
    (scale, zero_point): float32 arrays of the group shape; zero_point is None
    except for MinMax, where it is an integer-valued float32 array.
  """
  x32 = jax.lax.stop_gradient(x).astype(jnp.float32)
  if isinstance(fmt, fmts.FixedPointFormat) and not isinstance(calibration, FixedScale):
    raise ValueError(f'{fmt.name} has a fixed scale (step {fmt.step}); use '
                     f'FixedScale({fmt.step}) or the default calibration of quantize.')
  if isinstance(calibration, AbsMax):
    amax = group_reduce(jnp.abs(x32), _max0, granularity)
    scale = guard_zero(amax) / fmt.absmax_target
    if calibration.power_of_two:
      # 2^ceil(log2 s) from the binary exponent: exp2/log2 are not exact on all backends.
      mant, exp = jnp.frexp(scale)
      exp = jnp.where(mant == 0.5, exp - 1, exp)
      scale = jnp.where(jnp.isfinite(scale), jnp.ldexp(jnp.ones_like(scale), exp), scale)
    return scale, None
  if isinstance(calibration, Sawb):
    c1, c2 = calibration.coefficients(fmt.bits)
    rms = jnp.sqrt(group_reduce(x32 * x32, _mean, granularity))
    mabs = group_reduce(jnp.abs(x32), _mean, granularity)
    clip = c1 * rms - c2 * mabs
    amax = group_reduce(jnp.abs(x32), _max0, granularity)
    clip = jnp.where(clip > 0, clip, amax)  # IBM's guard; NaN clip -> amax (NaN too)
    return guard_zero(clip) / fmt.max_value, None
  if isinstance(calibration, MinMax):
    if not isinstance(fmt, fmts.IntFormat):
      raise ValueError(f'MinMax calibration needs an IntFormat, got {fmt.name}.')
    lo = jnp.minimum(group_reduce(x32, _min0, granularity), 0.0)
    hi = jnp.maximum(group_reduce(x32, _max0, granularity), 0.0)
    scale = guard_zero(hi - lo) / (fmt.qmax - fmt.qmin)
    zero_point = jnp.clip(fmt.qmin - jnp.round(lo / scale), fmt.qmin, fmt.qmax)
    return scale, zero_point
  if isinstance(calibration, FixedScale):
    # A fixed scale still reports non-finite groups (NaN policy). Not via a sum:
    # a sum of huge finite values overflows.
    finite = group_reduce(jnp.isfinite(x32), jnp.all, granularity)
    scale = jnp.full(finite.shape, calibration.value, jnp.float32)
    return jnp.where(finite, scale, jnp.nan), None
  if isinstance(calibration, Lsq):
    raise ValueError('Lsq calibration needs the learned step: pass scale=... to quantize.')
  if isinstance(calibration, CustomCalibration):
    return calibration.compute(x32, fmt, granularity)
  if isinstance(calibration, StatefulCalibration):
    raise ValueError(f'{type(calibration).__name__} is a StatefulCalibration: it needs its '
                     'per-layer state, which only the dY slots of a DotConfig receive (pass '
                     'grad_state to qtrain.dot_general, or call calibration.compute(x, fmt, '
                     'granularity, state) yourself).')
  raise TypeError(f'calibration must be AbsMax, MinMax, Sawb, FixedScale, Lsq or a '
                  f'CustomCalibration, got {calibration!r}.')


def lsq_fake_quant(x: jax.Array, step: jax.Array, fmt: fmts.IntFormat,
                   grad_scale: float | None = None) -> jax.Array:
  """LSQ fake quantization with the step-size gradient of Esser et al.

  Forward: clip(round(x/step), qmin, qmax) · step. Backward: x gets the
  clipped straight-through gradient (1 inside [qmin·s, qmax·s], else 0); the
  step gets, per element, round(x/s) - x/s inside the range and qmin or qmax
  outside, multiplied by grad_scale = 1/sqrt(numel(x)·qmax) (the paper's
  default) and summed over the elements sharing the step.

  Args:
    x: float array.
    step: positive float array broadcastable to x (per-tensor: shape ()).
    fmt: integer format giving qmin/qmax.
    grad_scale: multiplier of the step gradient; default 1/sqrt(x.size·qmax).

  Returns:
    Fake-quantized array of x's shape and dtype.
  """
  if not isinstance(fmt, fmts.IntFormat):
    raise TypeError(f'LSQ needs an IntFormat, got {fmt!r}.')
  if grad_scale is None:
    grad_scale = 1.0 / math.sqrt(max(x.size, 1) * fmt.qmax)
  # Gradient scaling trick: value of `step`, gradient scaled by grad_scale.
  s = step * grad_scale + jax.lax.stop_gradient(step - step * grad_scale)
  v = jnp.clip(x / s, fmt.qmin, fmt.qmax)
  v = v + jax.lax.stop_gradient(jnp.round(v) - v)
  return (v * s).astype(x.dtype)
