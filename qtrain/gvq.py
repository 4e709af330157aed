r"""Distribution-adaptive INT8's gradient quantizer (Zhao et al., AAAI 2021).

Gradient Vectorized Quantization (GVQ) quantizes the output gradient dY that
feeds the weight-gradient GEMM dW = Xᵀ·dY with one clip per *output channel*
(a per-channel scale of dY factors out of that GEMM, whose reduction runs
over samples and positions); the dX GEMM keeps a per-tensor scale. The clip of
each channel follows the Magnitude-aware Clipping Strategy (MCS):

* a distribution test: the channel is Gaussian-like if P(|g| > σ_c) > λ
  (σ_c its standard deviation, λ = 0.3), else "inverted-T" (sharp, long tail);
* Gaussian-like channels: s = max|g| (no clipping);
* inverted-T channels: s_t = (1 - k·A)·s_{t-1} + A·max|g|_t with k = 1, A = 0.8.

| name                          | what                                            |
|-------------------------------|-------------------------------------------------|
| `gaussian_like`               | the distribution test per scale group           |
| `magnitude_aware_clip`        | per-step (stateless) MCS clip                   |
| `MagnitudeAwareClip`          | the same as a `scaling.CustomCalibration`       |
| `gvq`                         | GVQ quantizer, uniform `fn(x, key, *, bits)`    |
| `magnitude_aware_clip_init/update` | MCS with its EMA, pure state -> state     |
| `MagnitudeAwareClipEMA`       | the EMA as a `scaling.StatefulCalibration`      |

Two ways to run MCS inside the quantized dot:

* `MagnitudeAwareClipEMA` (the default of `qtrain.recipes.da_int8()`): the
  paper's EMA, with s_{t-1} carried across steps as per-layer state through
  the backward pass (`qtrain.dot_general`'s `grad_state`; NNX models keep it
  in `qtrain.nnx_hooks.GradState` variables). Same update as
  `magnitude_aware_clip_update`.
* `MagnitudeAwareClip`: stateless, the clip from the current gradient alone:
  the EMA's fixed point for the current max, s = max|g|/k, for inverted-T
  channels. With the paper's k = 1 that is max|g| for every channel, i.e.
  per-channel absmax.

Unverified details (papers-5-8.md §8, paper body not read) and the choices
made: σ_c is the population standard deviation of the channel's gradient in
the current batch and P is the fraction of its elements with |g| > σ_c; the
first update of an inverted-T channel (no s_{t-1}) takes max|g|; the grid is
the symmetric [-127, 127] of the papers' formula; rounding is nearest (the
written formula) unless asked otherwise.

References:
  Zhao, Huang, Zhang, Wu, Ye, Li, Tan, Chen, Xie, "Distribution Adaptive INT8
  Quantization for Training CNNs", AAAI 2021, arXiv:2102.04782.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qtrain import config as cfgs
from qtrain import rounding as rnd
from qtrain import scaling
# pylint: disable-next=protected-access
from qtrain.clipping import _check_real, _fake_quant_clipped, symmetric_int
from qtrain.quantize import check_float

__all__ = ['gaussian_like', 'magnitude_aware_clip', 'MagnitudeAwareClip', 'gvq',
           'MagnitudeAwareClipState', 'magnitude_aware_clip_init',
           'magnitude_aware_clip_update', 'MagnitudeAwareClipEMA']

LAMBDA = 0.3
K = 1.0
A = 0.8


def _mean(v, axis, keepdims):
  return jnp.mean(v, axis=axis, keepdims=keepdims)


def _max0(v, axis, keepdims):
  return jnp.max(v, axis=axis, keepdims=keepdims, initial=0.0)


def _stats(g: jax.Array, granularity: scaling.Granularity):
  """(max|g|, Gaussian-like mask) of each group; g float32."""
  mean = scaling.group_reduce(g, _mean, granularity)
  centered = g - scaling.expand_scale(mean, g.shape, granularity)
  sigma = jnp.sqrt(scaling.group_reduce(centered * centered, _mean, granularity))
  above = (jnp.abs(g) > scaling.expand_scale(sigma, g.shape, granularity)).astype(jnp.float32)
  frac = scaling.group_reduce(above, _mean, granularity)
  return scaling.group_reduce(jnp.abs(g), _max0, granularity), frac


def gaussian_like(g: jax.Array, granularity: scaling.Granularity = scaling.PerTensor(), *,
                  lam: float = LAMBDA) -> jax.Array:
  """DA-INT8's distribution test: P(|g| > σ) > λ within each group.

  Args:
    g: float array (a gradient).
    granularity: the groups (GVQ: `scaling.PerChannel(axes=(channel_axis,))`).
    lam: threshold λ in [0, 1] (DA-INT8: 0.3; an exact Gaussian gives ≈ 0.317).

  Returns:
    bool array of the group shape: True = Gaussian-like, False = inverted-T
    (also for all-zero, NaN or Inf groups, where the fraction is 0 or undefined).

  Examples:
    >>> import jax.numpy as jnp
    >>> from qtrain import gvq, scaling
    >>> g = jnp.array([[1.0, -1.0, 0.5, -0.5], [0.0, 0.0, 0.01, 3.0]])
    >>> gvq.gaussian_like(g, scaling.PerChannel(axes=(0,)))[:, 0].tolist()
    [True, False]
  """
  check_float(g, 'g')
  lam = _check_real('lam', lam, 0.0, 1.0)
  _, frac = _stats(jnp.asarray(g, jnp.float32), granularity)
  return frac > lam


def magnitude_aware_clip(g: jax.Array, granularity: scaling.Granularity = scaling.PerTensor(),
                         *, lam: float = LAMBDA, k: float = K) -> jax.Array:
  """The per-step (stateless) MCS clip of each group.

  Gaussian-like groups: max|g|. Inverted-T groups: max|g|/k, the fixed point
  of s_t = (1 - kA)·s_{t-1} + A·max|g| for the current max (the module doc
  says why there is no s_{t-1} here). With k = 1 both are max|g|.

  Args:
    g: float array (a gradient).
    granularity: the groups.
    lam: distribution-test threshold λ (0.3).
    k: MCS constant, > 0 (1).

  Returns:
    float32 clip of the group shape: 0 for all-zero groups, NaN for groups
    with NaN or Inf.
  """
  check_float(g, 'g')
  lam = _check_real('lam', lam, 0.0, 1.0)
  k = _check_real('k', k, 0.0, math.inf, open_lo=True)
  amax, frac = _stats(jax.lax.stop_gradient(jnp.asarray(g)).astype(jnp.float32), granularity)
  clip = jnp.where(frac > lam, amax, amax / k)
  return jnp.where(jnp.isfinite(amax), clip, jnp.nan)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MagnitudeAwareClip(scaling.CustomCalibration):
  """MCS as a calibration: scale = magnitude_aware_clip(g) / fmt.absmax_target.

  Put it with `granularity=scaling.PerChannel()` in the dW GEMM's gradient
  slot (`DotConfig.drhs.rhs`) for GVQ. Stateless (per step); the paper's EMA
  is `MagnitudeAwareClipEMA` (module doc).

  Attributes:
    lam: distribution-test threshold λ (DA-INT8: 0.3).
    k: MCS constant (DA-INT8: 1).

  Examples:
    >>> import jax.numpy as jnp
    >>> from qtrain import gvq, scaling, formats
    >>> g = jnp.array([[1.0, -2.0], [0.5, 4.0]])
    >>> s, _ = scaling.compute_scale(g, formats.INT8, gvq.MagnitudeAwareClip(),
    ...                              scaling.PerChannel(axes=(1,)))
    >>> (s * 127).tolist()  # k = 1: per-channel max|g|
    [[1.0, 4.0]]
  """
  lam: float = LAMBDA
  k: float = K

  def __post_init__(self):
    _check_real('lam', self.lam, 0.0, 1.0)
    _check_real('k', self.k, 0.0, math.inf, open_lo=True)

  def compute(self, x, fmt, granularity):
    clip = magnitude_aware_clip(x, granularity, lam=self.lam, k=self.k)
    return scaling.guard_zero(clip) / fmt.absmax_target, None


def gvq(x: jax.Array, key: jax.Array | None = None, *, bits: int = 8, axis: int = -1,
        rounding: rnd.Rounding = 'nearest', lam: float = LAMBDA, k: float = K,
        clip: jax.Array | None = None) -> jax.Array:
  """Gradient vectorized quantization: one MCS clip per index of `axis` (fake quantization).

  ĝ = (s_c/Q)·round(Q·clamp(g, -s_c, s_c)/s_c) per channel c, Q = 2^(bits-1) - 1.

  Args:
    x: float array (an output gradient dY, channels on `axis`).
    key: PRNG key, required when rounding='stochastic'.
    bits: 2..8 (DA-INT8: 8).
    axis: the output-channel axis (-1 for NHWC / [..., features]).
    rounding: 'nearest' (the papers' formula) or 'stochastic'.
    lam, k: MCS constants (`magnitude_aware_clip`).
    clip: optional per-channel clip (e.g. `MagnitudeAwareClipState.clip`),
      shape of the group or broadcastable to it; skips the stateless rule.

  Returns:
    Dequantized array, shape and dtype of x; straight-through gradient.

  Raises:
    TypeError / ValueError: bad arguments (naming them); stochastic rounding
      without a key.

  Examples:
    >>> import jax.numpy as jnp
    >>> from qtrain import gvq
    >>> g = jnp.array([[0.25, 100.0], [-0.5, 1.0]])
    >>> gvq.gvq(g, bits=2).tolist()  # per-column clips 0.5 and 100
    [[0.0, 100.0], [-0.5, 0.0]]
  """
  check_float(x)
  fmt = symmetric_int(bits)
  rnd.check_rounding(rounding)
  if isinstance(axis, bool) or not isinstance(axis, int):
    raise TypeError(f'axis must be an int, got {axis!r}.')
  if rounding == 'stochastic' and key is None:
    raise ValueError('gvq: key is required for stochastic rounding (got key=None).')
  cfg = cfgs.TensorConfig(format=fmt, rounding=rounding,
                          calibration=MagnitudeAwareClip(lam=lam, k=k),
                          granularity=scaling.PerChannel(axes=(axis,)))
  return _fake_quant_clipped(x, cfg, key, clip)


# ----------------------------------------------------------------- the EMA (stateful)


class MagnitudeAwareClipState(NamedTuple):
  """MCS's per-layer, per-channel state.

  Attributes:
    clip: float32 of the group shape, s_{t-1} (0 before the first update).
    count: int32 scalar, updates so far.
  """
  clip: jax.Array
  count: jax.Array


def magnitude_aware_clip_init(g: jax.Array, *, axis: int = -1) -> MagnitudeAwareClipState:
  """An empty state for gradients shaped like `g`, channels on `axis`."""
  check_float(g, 'g')
  group = scaling.group_reduce(jnp.zeros(jnp.shape(g), jnp.float32), jnp.sum,
                               scaling.PerChannel(axes=(axis,)))
  return MagnitudeAwareClipState(clip=jnp.zeros(group.shape, jnp.float32),
                                 count=jnp.zeros((), jnp.int32))


def magnitude_aware_clip_update(state: MagnitudeAwareClipState, g: jax.Array, *,
                                axis: int = -1, lam: float = LAMBDA, k: float = K,
                                a: float = A) -> MagnitudeAwareClipState:
  """One MCS step (pure: state in, state out; jit-able).

  Per channel: Gaussian-like → s_t = max|g_t|; inverted-T → s_t =
  (1 - k·a)·s_{t-1} + a·max|g_t| (max|g_t| at the first update). Quantize the
  step's gradient with `gvq(g, clip=new_state.clip, axis=axis)`.

  Inside the dot the same step runs as `MagnitudeAwareClipEMA`.

  Args:
    state: from `magnitude_aware_clip_init` or the previous update.
    g: this step's gradient dY.
    axis: the channel axis.
    lam: distribution-test threshold (0.3).
    k, a: MCS constants (1 and 0.8).

  Returns:
    The new `MagnitudeAwareClipState`. A NaN/Inf gradient makes its
    channel's clip NaN from then on (visible, never silently finite).
  """
  if not isinstance(state, MagnitudeAwareClipState):
    raise TypeError(f'state must be a MagnitudeAwareClipState, got {type(state).__name__}.')
  check_float(g, 'g')
  lam = _check_real('lam', lam, 0.0, 1.0)
  k = _check_real('k', k, 0.0, math.inf, open_lo=True)
  a = _check_real('a', a, 0.0, 1.0)
  granularity = scaling.PerChannel(axes=(axis,))
  g32 = jax.lax.stop_gradient(jnp.asarray(g)).astype(jnp.float32)
  clip = _mcs_step(state.clip, state.count, g32, granularity, lam=lam, k=k, a=a)
  return MagnitudeAwareClipState(clip=clip, count=state.count + 1)


def _mcs_step(clip, count, g32, granularity, *, lam, k, a) -> jax.Array:
  """s_t of every group from s_{t-1} = clip after `count` updates (checked args)."""
  amax, frac = _stats(g32, granularity)
  ema = (1.0 - k * a) * clip + a * amax
  # No s_{t-1} before the first update: take max|g| (module doc).
  new = jnp.where((frac > lam) | (count == 0), amax, ema)
  return jnp.where(jnp.isfinite(amax), new, jnp.nan)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MagnitudeAwareClipEMA(scaling.StatefulCalibration):
  """MCS with the paper's EMA as a stateful calibration of a dY slot.

  State per layer: {'clip': s_{t-1} of each group (float32, group shape),
  'count': updates so far (float32 scalar)}; all zeros = no update yet.
  Each backward pass runs `magnitude_aware_clip_update`'s step on the dY it
  quantizes and quantizes with the *new* clip: scale = s_t / absmax_target.
  Put it with `granularity=scaling.PerChannel()` in `DotConfig.drhs.rhs`
  (GVQ); the dot then needs `grad_state` (NNX hooks hold it).

  Attributes:
    lam: distribution-test threshold λ (DA-INT8: 0.3).
    k: MCS constant (DA-INT8: 1).
    a: EMA weight A (DA-INT8: 0.8).

  Examples:
    >>> import jax.numpy as jnp
    >>> from qtrain import gvq, scaling, formats
    >>> cal, gran = gvq.MagnitudeAwareClipEMA(), scaling.PerChannel(axes=(1,))
    >>> state = cal.init_state((4, 1), gran)
    >>> g = jnp.array([[0.0], [0.0], [0.0], [4.0]])  # inverted-T: P(|g| > σ) = 0.25
    >>> _, _, state = cal.compute(g, formats.INT8, gran, state)
    >>> scale, _, state = cal.compute(g / 4, formats.INT8, gran, state)
    >>> round(float(state['clip'][0, 0]), 4), float(state['count'])  # 0.2·4 + 0.8·1
    (1.6, 2.0)
  """
  lam: float = LAMBDA
  k: float = K
  a: float = A

  def __post_init__(self):
    _check_real('lam', self.lam, 0.0, 1.0)
    _check_real('k', self.k, 0.0, math.inf, open_lo=True)
    _check_real('a', self.a, 0.0, 1.0)

  def init_state(self, shape, granularity):
    group = scaling.group_reduce(jnp.zeros(shape, jnp.float32), jnp.sum, granularity)
    return {'clip': jnp.zeros(group.shape, jnp.float32), 'count': jnp.zeros((), jnp.float32)}

  def compute(self, x, fmt, granularity, state):
    clip = _mcs_step(state['clip'], state['count'], x.astype(jnp.float32), granularity,
                     lam=self.lam, k=self.k, a=self.a)
    new_state = {'clip': clip, 'count': state['count'] + 1.0}
    return scaling.guard_zero(clip) / fmt.absmax_target, None, new_state
