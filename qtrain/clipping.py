r"""Unified INT8's gradient clipping and learning-rate scaling (Zhu et al., CVPR 2020).

Direction Sensitive Gradient Clipping (DSGC) quantizes a gradient g
symmetrically, ĝ_c = (c/Q)·round(Q·clamp(g, -c, c)/c) with Q = 2^(bits-1) - 1,
and chooses the clip c that minimises the *cosine* distance
d(c) = 1 - ⟨g, ĝ_c⟩/(‖g‖‖ĝ_c‖): a quantized gradient that points the wrong
way misleads training more than one of the wrong length. Deviation
Counteractive Learning Rate Scaling (DCLRS) then multiplies the learning rate
by φ(d) = max(exp(-α·d), β) (α = 20, β = 0.1), so steps along a badly bent
gradient are shortened, never below β of the schedule.

| name                  | what                                                           |
|-----------------------|----------------------------------------------------------------|
| `cosine_distance`     | 1 - cos per scale group, accurate for small distances          |
| `cosine_clip_search`  | the DSGC search: (clip, distance) per group                    |
| `CosineClip`          | the search as a `scaling.CustomCalibration` (DotConfig rules)  |
| `cosine_clip`         | DSGC quantizer, the uniform `fn(x, key, *, bits, ...)` form    |
| `cosine_clip_init/update` | UI8's periodic clip update as a pure state -> state step   |
| `PeriodicCosineClip`  | the periodic update as a `scaling.StatefulCalibration`         |
| `deviation_lr_scale`  | φ(d) = max(exp(-α d), β)                                       |
| `scale_by_deviation`  | DCLRS as an optax transform fed with per-layer d               |

How the parts are wired (state leaves the dot's backward pass only as the
cotangent of its `grad_state` argument, see `qtrain.dot`):

* `CosineClip` searches the clip *every step* from the current gradient. UI8
  searches periodically and reuses the clip in between, to save compute; the
  per-step search costs `num_candidates` extra quantize-and-reduce passes
  over every gradient tensor and follows the gradient without lag. The
  periodic version is `PeriodicCosineClip` (state carried across steps
  through the backward pass; `unified_int8(period=...)`), the same step as
  the pure `cosine_clip_update`.
* DCLRS wants each layer's d from its DSGC search. With the periodic search
  each layer's d is part of its gradient state (`PeriodicCosineClip`), and
  `qtrain.recipes.unified_int8()` hands it to `scale_by_deviation(by_path=
  True)` through `Recipe.update_args` after every backward pass. With the
  stateless per-step search (`period=None`) d cannot leave the backward
  pass, and the recipe falls back to the proxy
  `optim.scale_by_quantization_error` (d measured on each parameter's update).

Unverified details (papers-1-4.md §4, full text not read) and the choices made:
the candidate grid (here geometric, from max|g| down to `min_ratio`·max|g|),
the rounding used inside the search (here round-to-nearest, so the search is
deterministic; the chosen clip is then used with the rule's rounding, SR in
UI8), the update period (`period=100`), and whether φ is per layer (here:
whatever granularity the caller passes d at).

References:
  Zhu, Gong, Yu, Liu, Wang, Li, Yang, Yan, "Towards Unified INT8 Training for
  Convolutional Neural Network", CVPR 2020, arXiv:1912.12607.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from qtrain import config as cfgs
from qtrain import formats as fmts
from qtrain import rounding as rnd
from qtrain import scaling
from qtrain.quantize import check_float, fake_quant

__all__ = [
    'cosine_distance', 'candidate_ratios', 'cosine_clip_search', 'CosineClip', 'cosine_clip',
    'CosineClipState', 'cosine_clip_init', 'cosine_clip_update', 'PeriodicCosineClip',
    'deviation_lr_scale',
    'scale_by_deviation', 'symmetric_int',
]

# UI8's defaults. The candidate grid and the period are not confirmed (module doc).
NUM_CANDIDATES = 41
MIN_RATIO = 1.0 / 32
PERIOD = 100
ALPHA = 20.0
BETA = 0.1


def symmetric_int(bits: int) -> fmts.IntFormat:
  """The symmetric grid [-(2^(bits-1)-1), 2^(bits-1)-1] of the papers' clamp-and-round."""
  if isinstance(bits, bool) or not isinstance(bits, int):
    raise TypeError(f'bits must be an int, got {bits!r}.')
  if not 2 <= bits <= 8:
    raise ValueError(f'bits={bits} is out of range; allowed: 2..8.')
  # narrow: with a clip below max|g|, a full-range grid would send values
  # below -c to -2^(bits-1) and clip the two signs differently.
  return fmts.IntFormat(bits=bits, narrow=True)


def _check_search(num_candidates, min_ratio) -> None:
  if isinstance(num_candidates, bool) or not isinstance(num_candidates, int):
    raise TypeError(f'num_candidates must be an int, got {num_candidates!r}.')
  if num_candidates < 1:
    raise ValueError(f'num_candidates={num_candidates} must be >= 1.')
  if isinstance(min_ratio, bool) or not isinstance(min_ratio, numbers.Real):
    raise TypeError(f'min_ratio must be a real number, got {min_ratio!r}.')
  if not 0.0 < min_ratio <= 1.0:
    raise ValueError(f'min_ratio={min_ratio!r} is out of range; allowed: (0, 1].')


def _check_real(name: str, value, lo: float, hi: float, *, open_lo: bool = False) -> float:
  """`value` as a float in [lo, hi] ((lo, hi] with open_lo); clear errors otherwise."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f'{name} must be a real number, got {value!r}.')
  ok = math.isfinite(value) and (lo < value if open_lo else lo <= value) and value <= hi
  if not ok:
    bracket = '(' if open_lo else '['
    raise ValueError(f'{name}={value!r} is out of range; allowed: {bracket}{lo}, {hi}].')
  return float(value)


def _fake_quant_clipped(x: jax.Array, cfg: cfgs.TensorConfig, key, clip) -> jax.Array:
  """fake_quant(x, cfg) with the scale of an explicit `clip` when given (else cfg's calibration)."""
  scale = None
  if clip is not None:
    check_float(clip, 'clip')
    scale = scaling.guard_zero(jnp.asarray(clip, jnp.float32)) / cfg.format.absmax_target
  return fake_quant(x, cfg, key=key, scale=scale)


def _group_max(x: jax.Array, granularity: scaling.Granularity) -> jax.Array:
  # jnp.max propagates NaN; initial=0 makes empty groups 0.
  return scaling.group_reduce(jnp.abs(x), lambda v, axis, keepdims: jnp.max(
      v, axis=axis, keepdims=keepdims, initial=0.0), granularity)


def _group_sum(x: jax.Array, granularity: scaling.Granularity) -> jax.Array:
  return scaling.group_reduce(x, jnp.sum, granularity)


def cosine_distance(x: jax.Array, y: jax.Array,
                    granularity: scaling.Granularity = scaling.PerTensor()) -> jax.Array:
  """d = 1 - cos(x, y) within each scale group, in float32.

  Computed as ½‖x/‖x‖ - y/‖y‖‖² (equal to 1 - cos, but accurate to float32's
  relative precision for small d, where 1 - cos keeps only a few digits),
  after dividing each group by its max|·| so the sums of squares neither
  underflow nor overflow.

  Args:
    x, y: float arrays of one shape.
    granularity: which elements form one vector (`scaling.PerTensor()`: the
      whole tensor).

  Returns:
    float32 array of the group shape with values in [0, 2]: 0 where both
    groups are zero, 1 where exactly one is (no direction to compare), NaN
    where either holds a NaN or ±Inf.

  Raises:
    TypeError: non-float inputs.
    ValueError: shapes differ.

  Examples:
    >>> import jax.numpy as jnp
    >>> from qtrain import clipping
    >>> float(clipping.cosine_distance(jnp.array([1.0, 0.0]), jnp.array([1.0, 1.0]))[0])
    0.29289...
  """
  check_float(x, 'x')
  check_float(y, 'y')
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(y, jnp.float32)
  if x.shape != y.shape:
    raise ValueError(f'x and y must have one shape, got {x.shape} and {y.shape}.')

  def unit(v):
    m = _group_max(v, granularity)
    v = v / scaling.expand_scale(jnp.where(m > 0, m, 1.0), v.shape, granularity)
    n = jnp.sqrt(_group_sum(v * v, granularity))
    safe = jnp.where(n > 0, n, 1.0)  # a NaN norm fails `> 0`, but v keeps its NaN
    return v / scaling.expand_scale(safe, v.shape, granularity), n

  ux, nx = unit(x)
  uy, ny = unit(y)
  d = jnp.clip(0.5 * _group_sum(jnp.square(ux - uy), granularity), 0.0, 2.0)
  zx, zy = nx == 0, ny == 0
  return jnp.where(zx & zy, 0.0, jnp.where(zx | zy, 1.0, d))


def candidate_ratios(num_candidates: int = NUM_CANDIDATES,
                     min_ratio: float = MIN_RATIO) -> np.ndarray:
  """The clip candidates as fractions of max|g|: geometric, from 1 down to min_ratio.

  Descending, so on equal distances the search keeps the larger clip (less
  clipping). One candidate means plain absmax.
  """
  _check_search(num_candidates, min_ratio)
  if num_candidates == 1:
    return np.ones((1,), np.float32)
  return (min_ratio ** (np.arange(num_candidates) / (num_candidates - 1))).astype(np.float32)


def _codes(x: jax.Array, clip: jax.Array, fmt: fmts.Format,
           granularity: scaling.Granularity) -> jax.Array:
  """Round-to-nearest codes of x for a group-shaped clip (code units)."""
  scale = scaling.guard_zero(clip) / fmt.absmax_target
  units = x / scaling.expand_scale(scale, x.shape, granularity)
  return rnd.round_to_format(units, fmt, 'nearest')


def cosine_clip_search(x: jax.Array, fmt: fmts.Format | None = None,
                       granularity: scaling.Granularity = scaling.PerTensor(), *,
                       num_candidates: int = NUM_CANDIDATES,
                       min_ratio: float = MIN_RATIO) -> tuple[jax.Array, jax.Array]:
  """DSGC: the clip of each group that minimises the cosine distance to its quantization.

  Every candidate c = r·max|x| (r from `candidate_ratios`) quantizes the group
  with round-to-nearest onto `fmt` at scale c / fmt.absmax_target; the
  candidate with the smallest `cosine_distance` to x wins (the larger clip on
  ties). The candidates run one after another (`lax.map`), so memory stays at
  one copy of x.

  Args:
    x: float array (a gradient).
    fmt: the grid; default the symmetric INT8 grid [-127, 127].
    granularity: which elements share a clip (UI8: per tensor).
    num_candidates: size of the grid (>= 1).
    min_ratio: the smallest candidate as a fraction of max|x|, in (0, 1].

  Returns:
    (clip, distance): float32 arrays of the group shape. clip is 0 for an
    all-zero group (distance 0) and NaN for a group holding NaN or ±Inf.
  """
  check_float(x)
  fmt = symmetric_int(8) if fmt is None else fmt
  _check_search(num_candidates, min_ratio)
  return _search(jax.lax.stop_gradient(jnp.asarray(x)).astype(jnp.float32), fmt, granularity,
                 num_candidates, float(min_ratio))


# Jitted with static settings: called eagerly (tests, `cosine_clip` outside
# jit) the `lax.map` would otherwise be traced and compiled on every call.
# Inside a user's jit it is inlined like any nested jit.
@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _search(x32, fmt, granularity, num_candidates, min_ratio):
  ratios = jnp.asarray(candidate_ratios(num_candidates, min_ratio))
  amax = _group_max(x32, granularity)

  def distance(r):
    # cos is invariant to the positive per-group scale: compare with the codes.
    return cosine_distance(x32, _codes(x32, r * amax, fmt, granularity), granularity)

  distances = jax.lax.map(distance, ratios)
  best = jnp.argmin(distances, axis=0)
  clip = ratios[best] * amax
  # A NaN/Inf group: keep the clip non-finite whichever index argmin picked.
  clip = jnp.where(jnp.isfinite(amax), clip, jnp.nan)
  return clip, jnp.take_along_axis(distances, best[None], axis=0)[0]


@dataclasses.dataclass(frozen=True, kw_only=True)
class CosineClip(scaling.CustomCalibration):
  """DSGC as a calibration: scale = (cosine-optimal clip) / fmt.absmax_target.

  Use it in a gradient `TensorConfig` (the dY slots `dlhs.lhs` / `drhs.rhs`
  of a `DotConfig`). The clip is searched from the tensor at hand, every
  time: UI8's periodic update and reuse of the clip are `cosine_clip_update`
  (module doc). Use a symmetric (narrow) integer format, as UI8 does.

  Attributes:
    num_candidates: clip candidates per search.
    min_ratio: smallest candidate as a fraction of max|g|.

  Examples:
    >>> import jax.numpy as jnp, numpy as np
    >>> from qtrain import clipping, config, scaling
    >>> rule = config.TensorConfig(format=clipping.symmetric_int(8), rounding='stochastic',
    ...                            calibration=clipping.CosineClip())
    >>> g = jnp.asarray(np.random.default_rng(0).standard_t(2, 10000), jnp.float32)
    >>> scale, _ = scaling.compute_scale(g, rule.format, rule.calibration)
    >>> bool(scale[0] * 127 < jnp.max(jnp.abs(g)))  # a heavy tail is clipped
    True
  """
  num_candidates: int = NUM_CANDIDATES
  min_ratio: float = MIN_RATIO

  def __post_init__(self):
    _check_search(self.num_candidates, self.min_ratio)

  def compute(self, x, fmt, granularity):
    clip, _ = cosine_clip_search(x, fmt, granularity, num_candidates=self.num_candidates,
                                 min_ratio=self.min_ratio)
    return scaling.guard_zero(clip) / fmt.absmax_target, None


def _granularity(axis) -> scaling.Granularity:
  if axis is None:
    return scaling.PerTensor()
  return scaling.PerChannel(axes=(axis,) if isinstance(axis, int) else tuple(axis))


def cosine_clip(x: jax.Array, key: jax.Array | None = None, *, bits: int = 8,
                rounding: rnd.Rounding = 'stochastic', clip: jax.Array | None = None,
                num_candidates: int = NUM_CANDIDATES, min_ratio: float = MIN_RATIO,
                axis: int | tuple[int, ...] | None = None) -> jax.Array:
  """UI8's direction-sensitive gradient clipping quantizer (fake quantization).

  ĝ = (c/Q)·round(Q·clamp(g, -c, c)/c), Q = 2^(bits-1) - 1, with c the
  cosine-optimal clip of `cosine_clip_search` (or the given `clip`: a value
  kept from an earlier search, UI8's periodic update).

  Args:
    x: float array (a gradient).
    key: PRNG key, required when rounding='stochastic'.
    bits: 2..8 (UI8: 8).
    rounding: 'stochastic' (UI8's gradients, [S]) or 'nearest'. The search
      itself always uses round-to-nearest.
    clip: optional clip of the group shape (or broadcastable to it); skips
      the search.
    num_candidates, min_ratio: the search grid (`candidate_ratios`).
    axis: None = one clip per tensor (UI8); an axis or axes = one per index.

  Returns:
    Dequantized array, shape and dtype of x, values in [-c, c]; the gradient
    is straight-through.

  Raises:
    TypeError / ValueError: bad arguments (naming them); stochastic rounding
      without a key.

  Examples:
    >>> import jax.numpy as jnp
    >>> from qtrain import clipping
    >>> g = jnp.array([0.01, -0.02, 0.03, 4.0])
    >>> clipping.cosine_clip(g, rounding='nearest', bits=4).tolist()
    [0.0, 0.0, 0.0, 4.0]
  """
  check_float(x)
  fmt = symmetric_int(bits)
  rnd.check_rounding(rounding)
  if rounding == 'stochastic' and key is None:
    raise ValueError('cosine_clip: key is required for stochastic rounding (got key=None).')
  calibration = CosineClip(num_candidates=num_candidates, min_ratio=min_ratio)
  cfg = cfgs.TensorConfig(format=fmt, rounding=rounding, calibration=calibration,
                          granularity=_granularity(axis))
  return _fake_quant_clipped(x, cfg, key, clip)


# ----------------------------------------------------------------- periodic update


class CosineClipState(NamedTuple):
  """UI8's per-layer clip state.

  Attributes:
    clip: float32, the group shape: the clip in use.
    deviation: float32, the group shape: cosine distance between the last
      gradient and its round-to-nearest quantization with `clip` (UI8's d_c,
      the input of `deviation_lr_scale`).
    count: int32 scalar, updates so far.
  """
  clip: jax.Array
  deviation: jax.Array
  count: jax.Array


def cosine_clip_init(g: jax.Array, *,
                     granularity: scaling.Granularity = scaling.PerTensor()) -> CosineClipState:
  """An empty state for gradients shaped like `g` (the first update searches)."""
  check_float(g, 'g')
  zeros = jnp.zeros(_group_max(jnp.zeros(jnp.shape(g), jnp.float32), granularity).shape,
                    jnp.float32)
  return CosineClipState(clip=zeros, deviation=zeros, count=jnp.zeros((), jnp.int32))


def cosine_clip_update(state: CosineClipState, g: jax.Array, *, period: int = PERIOD,
                       bits: int = 8,
                       granularity: scaling.Granularity = scaling.PerTensor(),
                       num_candidates: int = NUM_CANDIDATES,
                       min_ratio: float = MIN_RATIO) -> CosineClipState:
  """One step of UI8's periodic clip update (pure: state in, state out; jit-able).

  Every `period`-th update (counts 0, period, 2·period, ...) searches a new
  clip on `g` (`cosine_clip_search`); the others keep the clip and only
  measure the deviation of `g` under it. Quantize the step's gradient with
  `cosine_clip(g, key, clip=new_state.clip)`.

  Inside `qtrain.dot_general` the same step runs as `PeriodicCosineClip`
  (the state travels through the backward pass as `grad_state`).

  Args:
    state: from `cosine_clip_init` or the previous update.
    g: this step's gradient (the shape `state` was made for).
    period: updates between searches, >= 1 (1 = search every step).
    bits, granularity, num_candidates, min_ratio: as in `cosine_clip_search`.

  Returns:
    The new `CosineClipState`.
  """
  if isinstance(period, bool) or not isinstance(period, int) or period < 1:
    raise ValueError(f'period={period!r} must be an int >= 1.')
  if not isinstance(state, CosineClipState):
    raise TypeError(f'state must be a CosineClipState, got {type(state).__name__}.')
  fmt = symmetric_int(bits)
  _check_search(num_candidates, min_ratio)
  g32 = jax.lax.stop_gradient(jnp.asarray(g)).astype(jnp.float32)
  clip, deviation = _periodic_step(state.clip, state.count, g32, fmt, granularity, period,
                                   num_candidates, min_ratio)
  return CosineClipState(clip=clip, deviation=deviation, count=state.count + 1)


def _periodic_step(clip, count, g32, fmt, granularity, period, num_candidates, min_ratio):
  """(clip, deviation) after one periodic update (checked args; count int or float)."""

  def search():
    return cosine_clip_search(g32, fmt, granularity, num_candidates=num_candidates,
                              min_ratio=min_ratio)

  def keep():
    q = _codes(g32, clip, fmt, granularity)
    return clip, cosine_distance(g32, q, granularity)

  return jax.lax.cond(count % period == 0, search, keep)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PeriodicCosineClip(scaling.StatefulCalibration):
  """UI8's periodic DSGC as a stateful calibration of a dY slot.

  State per layer: {'clip', 'deviation' (float32, group shape), 'count'
  (float32 scalar)}; all zeros = no update yet, so the first step searches.
  Each backward pass runs `cosine_clip_update`'s step on the dY it quantizes
  (a search every `period` steps, otherwise the kept clip and its measured
  deviation d) and quantizes with the new clip. The per-layer d is UI8's
  input of `scale_by_deviation`.

  Attributes:
    period: steps between searches (UI8: `PERIOD`).
    num_candidates, min_ratio: the search grid (`candidate_ratios`).
  """
  period: int = PERIOD
  num_candidates: int = NUM_CANDIDATES
  min_ratio: float = MIN_RATIO

  def __post_init__(self):
    if isinstance(self.period, bool) or not isinstance(self.period, int) or self.period < 1:
      raise ValueError(f'period={self.period!r} must be an int >= 1.')
    _check_search(self.num_candidates, self.min_ratio)

  def init_state(self, shape, granularity):
    zeros = jnp.zeros(_group_max(jnp.zeros(shape, jnp.float32), granularity).shape, jnp.float32)
    return {'clip': zeros, 'deviation': zeros, 'count': jnp.zeros((), jnp.float32)}

  def compute(self, x, fmt, granularity, state):
    clip, deviation = _periodic_step(state['clip'], state['count'], x.astype(jnp.float32), fmt,
                                     granularity, self.period, self.num_candidates,
                                     self.min_ratio)
    new_state = {'clip': clip, 'deviation': deviation, 'count': state['count'] + 1.0}
    return scaling.guard_zero(clip) / fmt.absmax_target, None, new_state


# ----------------------------------------------------------------- DCLRS


def deviation_lr_scale(d: jax.Array, *, alpha: float = ALPHA, beta: float = BETA) -> jax.Array:
  """UI8's learning-rate factor φ(d) = max(exp(-α·d), β), in float32.

  Args:
    d: cosine distance(s), any shape (a NaN stays NaN).
    alpha: decay rate, a finite real >= 0 (UI8: 20).
    beta: lower bound, in [0, 1] (UI8: 0.1).

  Examples:
    >>> from qtrain import clipping
    >>> [round(float(clipping.deviation_lr_scale(d)), 4) for d in (0.0, 0.01, 0.05, 0.2)]
    [1.0, 0.8187, 0.3679, 0.1]
  """
  alpha = _check_real('alpha', alpha, 0.0, math.inf)
  beta = _check_real('beta', beta, 0.0, 1.0)
  d = jnp.asarray(d, jnp.float32)
  return jnp.maximum(jnp.exp(-alpha * d), beta)  # maximum propagates NaN


def _path_names(path) -> tuple[str, ...]:
  names = []
  for k in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)))
        break
    else:
      names.append(str(k))
  return tuple(names)


def scale_by_deviation(*, alpha: float = ALPHA, beta: float = BETA,
                       by_path: bool = False) -> optax.GradientTransformationExtraArgs:
  r"""UI8's DCLRS as an optax transform: each layer's update times φ(d) of that layer.

  `update(updates, state, params=None, *, deviation)` multiplies every leaf
  under a leaf of `deviation` by :math:`\max(e^{-\alpha d}, \beta)`.
  `deviation` is a pytree that is a *prefix* of `updates` (one d per layer
  subtree, e.g. {'conv2': d, 'fc1': d}) or a single scalar for all leaves:
  UI8's d_c of each layer's gradient clipping (`CosineClipState.deviation`).
  With `by_path=True`, `deviation` is instead a flat dict {module path: d}
  with '/'-joined paths (e.g. {'conv2': d, 'blocks/0/fc': d}, what
  `qtrain.recipes.papers.unified_int8.layer_deviations` reads from a model's
  per-layer gradient state): a leaf whose path starts with a key is scaled by
  that key's φ (the longest key wins); other leaves (layers without a
  quantized gradient) are left as they are. Chain it *after* the optimizer:
  scaling the update is scaling the learning rate for any optimizer
  (momentum, Adam), unlike scaling the gradient before it.

  The training loop passes d as `optimizer.update(model, grads,
  deviation=d)` (optax.chain forwards extra arguments; `Recipe.update_args`
  produces them from the model after each backward pass).

  Args:
    alpha: decay rate, finite real >= 0 (UI8: 20).
    beta: lower bound of φ, in [0, 1] (UI8: 0.1).
    by_path: read `deviation` as {module path: d} (see above).

  Returns:
    An `optax.GradientTransformationExtraArgs` with `optax.EmptyState`.

  Raises:
    TypeError/ValueError: bad alpha/beta; at update, `deviation` missing or
      not a prefix of `updates` (or, with by_path, not a dict of paths).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from qtrain import clipping
    >>> tx = optax.chain(optax.sgd(1.0), clipping.scale_by_deviation())
    >>> g = {'conv': jnp.ones(2), 'fc': jnp.ones(2)}
    >>> u, _ = tx.update(g, tx.init(g), deviation={'conv': 0.0, 'fc': 0.5})
    >>> u['conv'].tolist(), [round(v, 6) for v in u['fc'].tolist()]
    ([-1.0, -1.0], [-0.1, -0.1])
  """
  alpha = _check_real('alpha', alpha, 0.0, math.inf)
  beta = _check_real('beta', beta, 0.0, 1.0)
  if not isinstance(by_path, bool):
    raise TypeError(f'by_path must be a bool, got {by_path!r}.')

  def init_fn(params):
    del params
    return optax.EmptyState()

  def scale(u, phi):
    dtype = jnp.result_type(u)
    if not jnp.issubdtype(dtype, jnp.floating):
      return u  # counts, keys: not updates to scale
    # Multiply in float32: φ rounded to bfloat16 first would be off by ~0.4%.
    return (jnp.asarray(u, jnp.float32) * phi).astype(dtype)

  def phi_of(d):
    phi = deviation_lr_scale(d, alpha=alpha, beta=beta)
    if phi.ndim:
      raise ValueError(f'deviation leaves must be scalars, got shape {phi.shape}.')
    return phi

  def update_by_path(updates, deviation):
    if not isinstance(deviation, dict) or not all(isinstance(k, str) for k in deviation):
      raise ValueError('with by_path=True, deviation must be a dict {module path: d} with '
                       f"'/'-joined string paths, got {type(deviation).__name__}.")
    keys = sorted(((tuple(k.split('/')) if k else ()), k) for k in deviation)
    phis = {k: phi_of(deviation[k]) for k in deviation}

    def one(path, u):
      names = _path_names(path)
      best = None
      for parts, k in keys:
        if names[:len(parts)] == parts and (best is None or len(parts) > len(best[0])):
          best = (parts, k)
      return u if best is None else scale(u, phis[best[1]])

    return jax.tree_util.tree_map_with_path(one, updates)

  def update_fn(updates, state, params=None, *, deviation: Any = None, **extra_args):
    del params, extra_args
    if deviation is None:
      raise ValueError('scale_by_deviation needs the per-layer cosine deviations: call '
                       'update(..., deviation=d) with d a scalar or a prefix tree of updates'
                       + (' (by_path=True: a dict {module path: d}).' if by_path else '.'))
    if by_path:
      return update_by_path(updates, deviation), state

    def scale_subtree(d, subtree):
      phi = phi_of(d)
      return jax.tree.map(lambda u: scale(u, phi), subtree)

    try:
      return jax.tree.map(scale_subtree, deviation, updates), state
    except ValueError as e:
      if 'deviation leaves' in str(e):
        raise
      raise ValueError(f'deviation must be a scalar or a prefix tree of updates: {e}') from e

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
