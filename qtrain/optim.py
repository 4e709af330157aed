r"""Optimizer-side quantization as optax `GradientTransformation`s.

An optax transform sees `updates`, its own `state` and `params`; it cannot
change the numerics of a matmul (that is `qtrain.dot_general`'s job). What the
FQT papers do *to the optimizer* fits here, as ordinary optax transforms that
compose with `optax.chain`, run under `jax.jit` and keep their state in a
`NamedTuple`:

| transform                     | what it does                                  | paper           |
|-------------------------------|-----------------------------------------------|-----------------|
| `quantize_updates`            | fake-quantizes every float leaf of `updates`  | WAGEUBN G, U    |
| `stochastic_round_params`     | makes `params + updates` land on a grid       | WAGEUBN weights |
| `quantize_state`              | re-quantizes another transform's float state  | WAGEUBN momentum|
| `scale_by_quantization_error` | scales a leaf by φ(cosine distance to Q(u))   | UI8 DCLRS       |

Randomness: every transform owns a typed PRNG key in its state, made from
`seed` at `init`. Each `update` splits it once, `key, step_key =
jax.random.split(state.key)`, keeps `key` for the next step and gives leaf `i`
(position in `jax.tree.leaves` order) the key `jax.random.fold_in(step_key, i)`,
so leaves and steps get independent noise and a run is reproducible from the
seed. The state key is split every step; per-leaf keys are only derived for
stochastic configs.

Leaves: floating leaves (float32, bfloat16, ...) are transformed; integer and
boolean leaves (counts, PRNG keys, masks) pass through unchanged; complex
leaves raise `TypeError`. One config applies to every float leaf: to treat
some leaves differently use `optax.masked` or `optax.partition`.

Non-finite values follow `qtrain.quantize`'s policy: a NaN or ±Inf anywhere in
a leaf makes that leaf's whole scale group (the whole leaf, per tensor) NaN,
never silently finite, so a training loop's non-finite check sees it.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from qtrain import config as cfgs
from qtrain import formats as fmts
from qtrain import scaling
from qtrain.quantize import fake_quant

__all__ = [
    'QuantizeUpdatesState', 'quantize_updates',
    'StochasticRoundParamsState', 'stochastic_round_params',
    'QuantizeStateState', 'quantize_state',
    'ScaleByQuantizationErrorState', 'scale_by_quantization_error',
]

# optax's `base.NO_PARAMS_MSG`, reproduced so no private optax module is imported.
NO_PARAMS_MSG = (
    'You are using a transformation that requires the current value of '
    'parameters, but you are not passing `params` when calling `update`.')


# ----------------------------------------------------------------- helpers


def _check_seed(seed) -> None:
  if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
    raise TypeError(f'seed must be an int, got {seed!r}.')


def _tensor_config(config, *, format_rounding: str = 'nearest') -> cfgs.TensorConfig:
  """Validates `config` and returns it as a TensorConfig.

  A bare Format becomes TensorConfig(format, rounding=format_rounding) with the
  default calibration (absmax, or the fixed step of a fixed-point format).
  """
  if isinstance(config, fmts.Format):
    return cfgs.TensorConfig(format=config, rounding=format_rounding)
  if not isinstance(config, cfgs.TensorConfig):
    raise TypeError(f'config must be a qtrain.TensorConfig or a qtrain.formats.Format, '
                    f'got {config!r}.')
  if isinstance(config.calibration, scaling.Lsq):
    # Lsq's step is a trained parameter passed in by the caller; an optimizer
    # transform has no such parameter to pass.
    raise ValueError('config.calibration=Lsq() needs a learned step, which an optimizer '
                     'transform does not have; use AbsMax, MinMax, Sawb or FixedScale.')
  return config


def _check_on_grid_config(cfg: cfgs.TensorConfig, fn: str) -> None:
  # An average of several stochastic samples is between grid points, which
  # breaks the "on the grid" promise of the transforms that call this.
  if cfg.samples > 1:
    raise ValueError(f'{fn}: config.samples={cfg.samples} averages samples, and an average '
                     'is not on the grid; use samples=1.')


def _is_float(leaf) -> bool:
  """True for floating leaves; False for integer, bool and key leaves; raises on complex."""
  dtype = jnp.result_type(leaf) if not hasattr(leaf, 'dtype') else leaf.dtype
  if jnp.issubdtype(dtype, jnp.complexfloating):
    raise TypeError(f'complex leaves are not supported (got dtype {dtype}).')
  return bool(jnp.issubdtype(dtype, jnp.floating))


def _leaf_key(step_key: jax.Array, index: int, cfg: cfgs.TensorConfig) -> jax.Array | None:
  return jax.random.fold_in(step_key, index) if cfg.stochastic else None


# The tree helpers below are jitted (the config static): called eagerly, as
# `tx.init(params)` usually is, a stochastic quantizer would otherwise dispatch
# and compile its Threefry rounds primitive by primitive (seconds per call).
# Inside a user's jit they are inlined like any nested jit.
@functools.partial(jax.jit, static_argnames=('cfg',))
def _quantize_tree(tree: Any, cfg: cfgs.TensorConfig, step_key: jax.Array) -> Any:
  """fake_quant of every float leaf of `tree` (leaf i with fold_in(step_key, i))."""
  leaves, treedef = jax.tree.flatten(tree)
  out = [fake_quant(leaf, cfg, key=_leaf_key(step_key, i, cfg)) if _is_float(leaf) else leaf
         for i, leaf in enumerate(leaves)]
  return jax.tree.unflatten(treedef, out)


def _check_real(name: str, value, lo: float, hi: float) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f'{name} must be a real number, got {value!r}.')
  if not (math.isfinite(value) and lo <= value <= hi):
    raise ValueError(f'{name}={value!r} is out of range; allowed: [{lo}, {hi}].')


# ----------------------------------------------------------------- quantize_updates


class QuantizeUpdatesState(NamedTuple):
  """State of `quantize_updates`.

  Attributes:
    key: typed PRNG key (shape ()), split once per update.
  """
  key: jax.Array


def quantize_updates(config: cfgs.TensorConfig | fmts.Format, *,
                     seed: int = 0) -> optax.GradientTransformation:
  """Fake-quantizes every float leaf of the updates onto `config`'s grid.

  Each float leaf `u` (any shape and float dtype) becomes
  `qtrain.fake_quant(u, config, key=k_i)`: same shape and dtype, values
  `code · scale` with codes of `config.format` (a scale per group of
  `config.granularity`, computed from `u` itself unless the format is fixed
  point). Placed before the optimizer it quantizes gradients (WAGEUBN's G,
  gradient compression); placed after it, the weight updates.

  WAGEUBN's own G quantizer is stochastic rounding on a power-of-two-scaled
  8-bit grid that then *drops* the magnitude (G = n/16384, papers-1-4.md §3a);
  `TensorConfig(format=INT8, rounding='stochastic',
  calibration=AbsMax(power_of_two=True))` is the rounding part, the
  normalization belongs to the WAGEUBN recipe.

  Args:
    config: a `qtrain.TensorConfig`, or a bare `Format` (round-to-nearest,
      absmax per tensor; fixed-point formats use their fixed step).
      `rounding='stochastic'` draws fresh noise per leaf and per step;
      `samples > 1` averages that many samples (SMP: the result is then an
      average of grid points, unbiased with lower variance).
    seed: seed of the PRNG key kept in the state.

  Returns:
    An `optax.GradientTransformation` with state `QuantizeUpdatesState(key)`.
    `params` is not needed.

  Raises:
    TypeError: `config` is not a TensorConfig or Format; `seed` is not an int;
      (at update) a leaf is complex.
    ValueError: `config` uses Lsq calibration (needs a learned step).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from qtrain import formats, optim
    >>> tx = optax.chain(optax.sgd(1.0), optim.quantize_updates(formats.fixed_point(8, 2)))
    >>> params = jnp.zeros(3)
    >>> updates, _ = tx.update(jnp.array([1.3, 0.6, 0.2]), tx.init(params), params)
    >>> updates.tolist()  # multiples of 2^-2, round-to-nearest-even
    [-1.25, -0.5, -0.25]

  References:
    Yang et al., "Training High-Performance and Large-Scale Deep Neural
    Networks with Full 8-bit Integers" (WAGEUBN), Neural Networks 125, 2020,
    arXiv:1909.02384.
  """
  cfg = _tensor_config(config)
  _check_seed(seed)

  def init_fn(params):
    del params
    return QuantizeUpdatesState(key=jax.random.key(seed))

  def update_fn(updates, state, params=None):
    del params
    key, step_key = jax.random.split(state.key)
    return _quantize_tree(updates, cfg, step_key), QuantizeUpdatesState(key=key)

  return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------- stochastic_round_params


class StochasticRoundParamsState(NamedTuple):
  """State of `stochastic_round_params`.

  Attributes:
    key: typed PRNG key (shape ()), split once per update.
  """
  key: jax.Array


def _check_grid_dtype(fmt: fmts.Format, dtype) -> None:
  """Raises if a float `dtype` cannot hold every value of a fixed-point grid exactly."""
  # Otherwise `params + updates` is rounded off the grid by the dtype itself.
  # (jnp.finfo, not FixedPointFormat.is_exact_in: np.finfo rejects bfloat16.)
  if not isinstance(fmt, fmts.FixedPointFormat):
    return
  info = jnp.finfo(dtype)
  fits = (fmt.qmax <= 2 ** (info.nmant + 1)  # significant bits of the largest code
          and -fmt.fractional_bits >= info.minexp - info.nmant  # the step is not below subnormals
          and fmt.max_abs_real() <= float(info.max))
  if not fits:
    raise ValueError(f'params of dtype {jnp.dtype(dtype).name} cannot hold the {fmt.name} grid '
                     f'exactly ({fmt.bits} significant bits); use a wider params dtype or fewer '
                     'bits.')


@functools.partial(jax.jit, static_argnames=('cfg',))
def _round_params_tree(updates: Any, params: Any, cfg: cfgs.TensorConfig,
                       step_key: jax.Array) -> Any:
  """Q(p + u) - p for every float leaf (leaf i with fold_in(step_key, i))."""
  leaves, treedef = jax.tree.flatten(updates)
  param_leaves = treedef.flatten_up_to(params)
  out = []
  for i, (u, p) in enumerate(zip(leaves, param_leaves)):
    if not (_is_float(u) and _is_float(p)):
      out.append(u)
      continue
    p = jnp.asarray(p)
    _check_grid_dtype(cfg.format, p.dtype)
    target = fake_quant(p + u, cfg, key=_leaf_key(step_key, i, cfg))
    out.append((target - p).astype(p.dtype))
  return jax.tree.unflatten(treedef, out)


def stochastic_round_params(config: cfgs.TensorConfig | fmts.Format, *,
                            seed: int = 0) -> optax.GradientTransformation:
  r"""Returns updates `u'` such that `params + u'` lies on `config`'s grid.

  For every float leaf, with `p` the params and `u` the incoming update (same
  shape; any float dtypes), the new update is `u' = Q(p + u) - p` in the
  params' dtype, where `Q = qtrain.fake_quant(·, config, key)`. Then
  `optax.apply_updates(p, u') = Q(p + u)`: the stored weights stay on the
  grid (WAGEUBN's 24-bit weights: `fixed_point(24)`). With stochastic rounding
  :math:`E[p + u'] = p + u`: updates smaller than a grid step still move the
  weights in expectation instead of being rounded away.

  Exactness: `p + u'` equals `Q(p + u)` bit for bit whenever `Q(p + u) - p` is
  exact in the params' dtype. For a fixed-point grid of `b <= 24` bits and
  float32 params already on the grid (every step after the first, or from the
  start if the initial params are on the grid) that always holds; on the first
  step from arbitrary float params it holds whenever `Q(p + u)` is within a
  factor 2 of `p` (Sterbenz), and is otherwise off by at most one float ulp.
  For scaled formats (INT8 absmax, ...) the grid moves with the scale of
  `p + u`, so "on the grid" means "a fake-quantized value".

  Args:
    config: a `qtrain.TensorConfig`, or a bare `Format`, which is used with
      `rounding='stochastic'` (and absmax per tensor, or the fixed step of a
      fixed-point format). A TensorConfig is used as given: with
      `rounding='nearest'` the transform is WAGEUBN's deterministic
      `w <- Q(w, 24)` (biased: updates below half a step are lost).
    seed: seed of the PRNG key kept in the state.

  Returns:
    An `optax.GradientTransformation` with state
    `StochasticRoundParamsState(key)`. Its `update` needs `params`. Float
    updates come back in the params' dtype (the exact difference to the grid
    point may not fit a narrower update dtype); integer leaves are returned
    unchanged.

  Raises:
    TypeError: `config` is not a TensorConfig or Format; `seed` is not an int.
    ValueError: `config.samples > 1`; Lsq calibration; (at update) `params` is
      None, or a fixed-point grid that the params' dtype cannot hold exactly
      (e.g. `fixed_point(24)` with bfloat16 params).

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from qtrain import formats, optim
    >>> tx = optax.chain(optax.sgd(0.1),
    ...                  optim.stochastic_round_params(formats.fixed_point(16, 12)))
    >>> params = jnp.array([0.5, -0.25])
    >>> updates, _ = tx.update(jnp.array([0.3, 0.001]), tx.init(params), params)
    >>> new = optax.apply_updates(params, updates)
    >>> bool(jnp.all(new * 2**12 == jnp.round(new * 2**12)))
    True

  References:
    Yang et al., WAGEUBN, arXiv:1909.02384 (24-bit weight update U);
    Gupta et al., "Deep Learning with Limited Numerical Precision", ICML 2015
    (stochastic rounding of weight updates).
  """
  cfg = _tensor_config(config, format_rounding='stochastic')
  _check_on_grid_config(cfg, 'stochastic_round_params')
  _check_seed(seed)

  def init_fn(params):
    del params
    return StochasticRoundParamsState(key=jax.random.key(seed))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(NO_PARAMS_MSG)
    key, step_key = jax.random.split(state.key)
    return _round_params_tree(updates, params, cfg, step_key), StochasticRoundParamsState(key=key)

  return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------- quantize_state


class QuantizeStateState(NamedTuple):
  """State of `quantize_state`.

  Attributes:
    inner_state: the wrapped transform's state, float leaves on the grid.
    key: typed PRNG key (shape ()), split once at init and once per update.
  """
  inner_state: optax.OptState
  key: jax.Array


def quantize_state(inner: optax.GradientTransformation,
                   config: cfgs.TensorConfig | fmts.Format, *,
                   seed: int = 0) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner` and re-quantizes every float leaf of its state after each update.

  `update` runs `inner.update` on the stored (quantized) state, returns its
  updates unchanged, and stores `fake_quant(leaf, config)` for every float
  array leaf of the new inner state; integer leaves (step counts) and PRNG
  keys are left alone. The initial state is quantized the same way, so every
  state this transform hands out is on the grid. This is WAGEUBN's order
  (a ← m·a + G; w ← w − lr·a; a ← Q(a, 13)): the update uses the float
  accumulator, the *stored* accumulator is low precision.

  `quantize_state(optax.trace(decay=0.25), fixed_point(13, k))` is WAGEUBN's
  13-bit momentum. Wrap the moment transform itself, not a whole optimizer:
  every float leaf is quantized with the one config, including e.g. an
  `inject_hyperparams` learning rate or Adam's second moment, for which a
  fixed-point grid is rarely right.

  Args:
    inner: any `optax.GradientTransformation` (extra args are forwarded).
    config: a `qtrain.TensorConfig`, or a bare `Format` (round-to-nearest,
      absmax per tensor, or the fixed step of a fixed-point format, as
      WAGEUBN's Q). Each state leaf is quantized on its own (its own scale
      for scaled formats).
    seed: seed of the PRNG key kept in the state (used by stochastic configs).

  Returns:
    An `optax.GradientTransformationExtraArgs` with state
    `QuantizeStateState(inner_state, key)`. It needs `params` exactly when
    `inner` does.

  Raises:
    TypeError: `inner` is not a GradientTransformation; `config` is not a
      TensorConfig or Format; `seed` is not an int.
    ValueError: `config.samples > 1`; Lsq calibration.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from qtrain import formats, optim
    >>> tx = optim.quantize_state(optax.trace(decay=0.25), formats.fixed_point(13, 4))
    >>> params = jnp.zeros(2)
    >>> _, state = tx.update(jnp.array([0.3, -1.0]), tx.init(params), params)
    >>> state.inner_state.trace.tolist()  # multiples of 2^-4
    [0.3125, -1.0]

  References:
    Yang et al., WAGEUBN, arXiv:1909.02384 (13-bit momentum; code
    `imagenet_main.py`, papers-1-4.md §3a).
  """
  if not isinstance(inner, optax.GradientTransformation):
    raise TypeError(f'inner must be an optax.GradientTransformation, got {inner!r}.')
  cfg = _tensor_config(config)
  _check_on_grid_config(cfg, 'quantize_state')
  _check_seed(seed)
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    key, init_key = jax.random.split(jax.random.key(seed))
    inner_state = _quantize_tree(inner.init(params), cfg, init_key)
    return QuantizeStateState(inner_state=inner_state, key=key)

  def update_fn(updates, state, params=None, **extra_args):
    updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
    key, step_key = jax.random.split(state.key)
    inner_state = _quantize_tree(inner_state, cfg, step_key)
    return updates, QuantizeStateState(inner_state=inner_state, key=key)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------- scale_by_quantization_error


class ScaleByQuantizationErrorState(NamedTuple):
  """State of `scale_by_quantization_error`.

  Attributes:
    key: typed PRNG key (shape ()), split once per update.
    last_scale: pytree of the updates' structure; each leaf a float32 scalar,
      the factor φ applied to that leaf at the last update (1.0 before the
      first update and for non-float leaves). For logging.
  """
  key: jax.Array
  last_scale: optax.Updates


def _cosine_scale(u: jax.Array, q: jax.Array, alpha: float, beta: float) -> jax.Array:
  """φ = clip(exp(-alpha·d), beta, 1) with d = 1 - cos(u, q), a float32 scalar."""
  u32 = u.astype(jnp.float32)
  q32 = q.astype(jnp.float32)
  # Cosine is scale-invariant; dividing by max|u| keeps the sums of squares
  # away from float32 underflow (tiny gradients) and overflow (huge ones).
  # A non-finite u makes m or the sums NaN, and φ stays NaN (never made finite).
  m = jnp.max(jnp.abs(u32), initial=0.0)
  m = jnp.where(m > 0, m, 1.0)
  un, qn = u32 / m, q32 / m
  norm_u, norm_q = jnp.sqrt(jnp.sum(un * un)), jnp.sqrt(jnp.sum(qn * qn))
  # d = ½‖u/‖u‖ - q/‖q‖‖², equal to 1 - cos but accurate to float32's relative
  # precision for small d (1 - cos loses it: d ~ 1e-5 would keep ~2 digits, and
  # alpha = 20 amplifies the error into φ).
  safe_u = jnp.where(norm_u > 0, norm_u, 1.0)
  safe_q = jnp.where(norm_q > 0, norm_q, 1.0)
  d = 0.5 * jnp.sum(jnp.square(un / safe_u - qn / safe_q))
  # Q(u) = 0 for u != 0 (everything underflowed): no direction left, cos = 0.
  # (A NaN norm fails `== 0` and keeps d NaN.)
  d = jnp.where(norm_q == 0, 1.0, jnp.clip(d, 0.0, 2.0))
  # A leaf Q leaves unchanged (already on the grid, all zero, empty) has no
  # deviation; testing it exactly avoids a d of a few ulps from the sums.
  d = jnp.where(jnp.all(q32 == u32), 0.0, d)
  # exp(-alpha·d) <= 1 for d >= 0; the clip's upper bound only guards rounding.
  return jnp.clip(jnp.exp(-alpha * d), beta, 1.0)


@functools.partial(jax.jit, static_argnames=('cfg', 'alpha', 'beta'))
def _scale_tree(updates: Any, cfg: cfgs.TensorConfig, alpha: float, beta: float,
                step_key: jax.Array) -> tuple[Any, Any]:
  """(φ·u per float leaf, φ per leaf); leaf i quantized with fold_in(step_key, i)."""
  leaves, treedef = jax.tree.flatten(updates)
  out, scales = [], []
  for i, u in enumerate(leaves):
    if not _is_float(u):
      out.append(u)
      scales.append(jnp.ones((), jnp.float32))
      continue
    u = jnp.asarray(u)
    phi = _cosine_scale(u, fake_quant(u, cfg, key=_leaf_key(step_key, i, cfg)), alpha, beta)
    # Multiply in float32: φ rounded to bfloat16 first would be off by ~0.4%.
    out.append((u.astype(jnp.float32) * phi).astype(u.dtype))
    scales.append(phi)
  return jax.tree.unflatten(treedef, out), jax.tree.unflatten(treedef, scales)


def scale_by_quantization_error(config: cfgs.TensorConfig | fmts.Format, *,
                                alpha: float = 20.0, beta: float = 0.1,
                                seed: int = 0) -> optax.GradientTransformation:
  r"""Scales each leaf by how much quantization bends its direction (UI8's DCLRS).

  For every float leaf `u` (any shape and float dtype), with `Q(u) =
  qtrain.fake_quant(u, config, key)`:

  .. math::
    d = 1 - \frac{\langle u, Q(u)\rangle}{\|u\|\,\|Q(u)\|}, \qquad
    \varphi(d) = \max(e^{-\alpha d}, \beta), \qquad u' = \varphi(d)\,u.

  φ is computed in float32 per leaf (per layer), lies in [β, 1], and is
  exactly 1 when `Q(u) == u` (a gradient already on the grid, all-zero or
  empty leaves). If `Q(u)` is all zero while `u` is not, d = 1 (cos = 0). A NaN
  or Inf in `u` makes φ and the leaf NaN. With α = 20: d = 0.01 → 0.82,
  d = 0.05 → 0.37, d ≥ 0.115 → β = 0.1.

  Where this differs from the paper: UI8 (Zhu et al.) measures d on the
  *error gradient of each layer inside the backward pass* — the tensor its
  direction-sensitive clipping quantizes — and lowers that layer's learning
  rate by φ(d). An optax transform only sees the weight gradients (or the
  updates) arriving at the optimizer, so this is the closest optimizer-side
  version: the same φ applied per parameter leaf, with d measured by
  quantizing that leaf with `config` (e.g. INT8 with stochastic rounding).
  The exact placement (d from the backward pass's quantizer) will come with
  the UI8 recipe. Whether UI8 applies φ per layer or globally is not
  confirmed (papers-1-4.md §4a); this is per leaf.

  Placement: multiplying the update by φ equals multiplying the learning rate
  by φ for plain SGD. Before `optax.sgd(lr)` (on raw gradients) and after it
  (on -lr·g) give the same d for scaled formats (cosine and absmax scaling
  are invariant to the factor -lr), not for fixed-point grids. With momentum
  or Adam, scaling the gradient is not the same as scaling the learning rate;
  place it after the optimizer for the latter.

  Args:
    config: the quantizer Q, a `qtrain.TensorConfig` or a bare `Format`
      (round-to-nearest, absmax per tensor). `samples > 1` measures d against
      the SMP average.
    alpha: decay rate of φ, a finite real >= 0 (0 turns scaling off).
      UI8: 20.
    beta: lower bound of φ, a real in [0, 1]. UI8: 0.1.
    seed: seed of the PRNG key kept in the state (used by stochastic configs).

  Returns:
    An `optax.GradientTransformation` with state
    `ScaleByQuantizationErrorState(key, last_scale)`. `params` is not needed;
    the updates keep their dtypes.

  Raises:
    TypeError: `config` is not a TensorConfig or Format; `alpha`/`beta` not
      real numbers; `seed` not an int.
    ValueError: `alpha` < 0 or not finite; `beta` outside [0, 1]; Lsq
      calibration.

  Examples:
    >>> import jax.numpy as jnp
    >>> from qtrain import formats, optim
    >>> tx = optim.scale_by_quantization_error(formats.INT4)
    >>> g = jnp.array([1.0, 0.3, -0.05, 0.6])
    >>> scaled, state = tx.update(g, tx.init(g))
    >>> 0.1 <= float(state.last_scale) < 1.0
    True

  References:
    Zhu et al., "Towards Unified INT8 Training for Convolutional Neural
    Network", CVPR 2020, arXiv:1912.12607 (deviation counteractive learning
    rate scaling; α = 20 and β = 0.1 from secondary sources, papers-1-4.md §4).
  """
  cfg = _tensor_config(config)
  _check_real('alpha', alpha, 0.0, math.inf)
  _check_real('beta', beta, 0.0, 1.0)
  _check_seed(seed)
  alpha, beta = float(alpha), float(beta)

  def _ones_like_scale(tree):
    return jax.tree.map(lambda _: jnp.ones((), jnp.float32), tree)

  def init_fn(params):
    return ScaleByQuantizationErrorState(key=jax.random.key(seed),
                                         last_scale=_ones_like_scale(params))

  def update_fn(updates, state, params=None):
    del params
    key, step_key = jax.random.split(state.key)
    updates, last_scale = _scale_tree(updates, cfg, alpha, beta, step_key)
    return updates, ScaleByQuantizationErrorState(key=key, last_scale=last_scale)

  return optax.GradientTransformation(init_fn, update_fn)
