"""`quantize`, `dequantize` and `fake_quant`: from float tensors to codes and back.

Non-finite policy: if a scale group contains NaN or ±Inf its scale becomes NaN
and its codes 0, so the whole group dequantizes to NaN: bad values are never
silently made finite, and a training loop's non-finite-loss check sees them.
All-zero groups get a finite nonzero scale (statistic guarded to 1) and quantize to
exact zeros. Empty arrays work.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

import jax
import jax.numpy as jnp

from qtrain import config as cfgs
from qtrain import formats as fmts
from qtrain import rounding as rnd
from qtrain import scaling
from qtrain.qarray import QArray

__all__ = ['quantize', 'quantize_xla', 'dequantize', 'fake_quant', 'as_tensor_config', 'check_float']

Ste = Literal['plain', 'clipped']


def check_float(x, name: str = 'x') -> None:
  """Raises TypeError naming `name` if `x` is not a floating array."""
  dtype = jnp.result_type(x)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f'{name} must be a floating-point array, got dtype {dtype}.')


def as_tensor_config(config) -> cfgs.TensorConfig:
  """Accepts a TensorConfig or a bare Format (round-to-nearest, absmax, per tensor)."""
  if isinstance(config, cfgs.TensorConfig):
    return config
  if isinstance(config, fmts.Format):
    return cfgs.TensorConfig(format=config)
  raise TypeError(f'config must be a qtrain.TensorConfig or a qtrain.formats.Format, '
                  f'got {config!r}.')


def _sample_key(key, i: int, samples: int):
  return key if samples == 1 else jax.random.fold_in(key, i)


def quantize(x: jax.Array, config: cfgs.TensorConfig | fmts.Format, *,
             key: jax.Array | None = None, scale: jax.Array | None = None,
             stream: int = 0, implementation: str | None = None) -> QArray:
  """Quantizes `x` to a `QArray`.

  `implementation` picks the backend: None (auto: the fused Pallas kernels of
  `pallas_kernels.quantize` / `.stochastic_quantize` on a Hopper GPU when they
  accept the shape and config, or when the environment variable QTRAIN_IMPL
  is set; XLA otherwise, always on CPU), 'xla' (`quantize_xla`), 'pallas' or
  'interpret' (the kernels in Mosaic GPU interpret mode, on CPU). Every
  backend returns the same codes and scales (the kernels' tests check it bit
  for bit). The other arguments are those of `quantize_xla`, documented here.

  Args:
    x: float array of any shape (float32, bfloat16, float16, ...).
    config: a `TensorConfig` (format, rounding, calibration, granularity) or a
      bare `Format` (round-to-nearest, absmax, per tensor).
    key: PRNG key; required when `config.rounding == 'stochastic'`. With
      `config.samples > 1` this returns the first sample (`fake_quant` and the
      dot average all of them).
    scale: optional float scale of the group shape (or broadcastable to it),
      used instead of calibrating: a learned LSQ step, a GradScale state, a
      delayed scale. Required for `Lsq` calibration.
    stream: `qtrain.prng` counter stream of the stochastic noise.

  Returns:
    QArray with codes of x's shape in `config.format.storage_dtype`.

  Raises:
    TypeError: `x` is not floating, or `config` is not a config/format.
    ValueError: stochastic rounding without `key`; Lsq without `scale`; bad
      granularity for x's shape.

  Examples:
    >>> import jax.numpy as jnp, qtrain
    >>> q = qtrain.quantize(jnp.array([0.5, -1.0, 0.25]), qtrain.formats.INT8)
    >>> q.codes.dtype, q.codes.tolist()
    (dtype('int8'), [64, -127, 32])
  """
  if implementation not in (None, 'xla', 'pallas', 'interpret'):
    raise ValueError(f"implementation={implementation!r} is unknown; allowed: None (auto), "
                     "'xla', 'pallas', 'interpret'.")
  auto_xla = (implementation is None and jax.default_backend() != 'gpu'
              and not os.environ.get('QTRAIN_IMPL'))
  if implementation == 'xla' or auto_xla:
    return quantize_xla(x, config, key=key, scale=scale, stream=stream)
  # The kernels fall back to quantize_xla themselves for what they cannot take.
  from pallas_kernels import quantize as kernels  # pylint: disable=g-import-not-at-top
  return kernels.quantize(x, config, key=key, scale=scale, stream=stream,
                          implementation=implementation)


def quantize_xla(x: jax.Array, config: cfgs.TensorConfig | fmts.Format, *,
                 key: jax.Array | None = None, scale: jax.Array | None = None,
                 stream: int = 0) -> QArray:
  """`quantize` on XLA (the reference implementation; see `quantize` for the arguments)."""
  check_float(x)
  cfg = as_tensor_config(config)
  x = jnp.asarray(x)
  if cfg.stochastic and key is None:
    raise ValueError("key is required: config.rounding is 'stochastic' (got key=None).")
  key = _sample_key(key, 0, cfg.samples) if key is not None else None
  zero_point = None
  calibrated = scale is None and not isinstance(cfg.calibration, scaling.FixedScale)
  if scale is None:
    scale, zero_point = scaling.compute_scale(x, cfg.format, cfg.calibration, cfg.granularity)
  else:
    check_float(scale, 'scale')
    scale = jax.lax.stop_gradient(jnp.asarray(scale, jnp.float32))
    group = scaling.group_reduce(jnp.zeros(x.shape, jnp.float32), jnp.sum, cfg.granularity)
    scale = jnp.broadcast_to(scale, group.shape)
  # A zero or subnormal scale (a clip EMA decaying on a dead channel) is
  # flushed to zero by XLA on CPU and GPU, and 0/0 would turn the group's
  # zeros into NaN: such groups get scale 1 (the all-zero guard). NaN stays NaN.
  scale = jnp.where(jnp.abs(scale) < jnp.finfo(jnp.float32).tiny, jnp.ones_like(scale), scale)
  x32 = jax.lax.stop_gradient(x).astype(jnp.float32)
  full_scale = scaling.expand_scale(scale, x.shape, cfg.granularity)
  units = x32 / full_scale
  # A finite x whose units overflow (a tiny given scale) saturates like any other
  # out-of-range value rather than being reported as non-finite.
  overflow = jnp.isinf(units) & jnp.isfinite(x32) & (full_scale != 0)
  units = jnp.where(overflow, jnp.sign(units) * jnp.finfo(jnp.float32).max, units)
  if zero_point is not None:
    units = units + scaling.expand_scale(zero_point, x.shape, cfg.granularity)
  codes = rnd.round_to_format(units, cfg.format, cfg.rounding, key=key, stream=stream)
  finite = jnp.isfinite(codes) & jnp.isfinite(full_scale)
  if calibrated:
    # max/mean statistics already carry any NaN/Inf of their group into the
    # scale, so this saves a second reduction over x.
    group_finite = jnp.isfinite(scale)
  else:
    group_finite = scaling.group_reduce(finite, jnp.all, cfg.granularity)
  scale = jnp.where(group_finite, scale, jnp.nan)
  codes = jnp.where(finite, codes, 0).astype(cfg.format.storage_dtype)
  return QArray(codes=codes, scale=scale, zero_point=zero_point, format=cfg.format,
                granularity=cfg.granularity, dtype=x.dtype)


def dequantize(q: QArray) -> jax.Array:
  """Returns the real values (codes - zero_point) · scale of `q`, in its original dtype."""
  if not isinstance(q, QArray):
    raise TypeError(f'q must be a QArray, got {type(q).__name__}.')
  return q.dequantize()


def _in_range(x: jax.Array, q: QArray) -> jax.Array:
  """Mask of elements inside the representable range (for the clipped STE)."""
  values = q.format.values()
  lo, hi = float(values[0]), float(values[-1])
  units = x.astype(jnp.float32) / scaling.expand_scale(q.scale, x.shape, q.granularity)
  if q.zero_point is not None:
    units = units + scaling.expand_scale(q.zero_point, x.shape, q.granularity)
  return (units >= lo) & (units <= hi)


def fake_quant(x: jax.Array, config: cfgs.TensorConfig | fmts.Format, *,
               key: jax.Array | None = None, scale: jax.Array | None = None,
               ste: Ste = 'plain') -> jax.Array:
  """Quantize-dequantize with a straight-through gradient.

  Args:
    x: float array.
    config: TensorConfig or Format (see `quantize`). With `samples > 1` the
      output is the mean of that many independent stochastic samples (SMP).
    key: PRNG key, required for stochastic rounding.
    scale: optional scale (see `quantize`). With `Lsq` calibration it is the
      learned step and receives LSQ's gradient.
    ste: 'plain' (identity gradient) or 'clipped' (zero gradient where x lies
      outside the format's range: PACT-style mask).

  Returns:
    Array of x's shape and dtype holding dequantized values.
  """
  check_float(x)
  cfg = as_tensor_config(config)
  if ste not in ('plain', 'clipped'):
    raise ValueError(f"ste={ste!r} is unknown; allowed: ('plain', 'clipped').")
  if isinstance(cfg.calibration, scaling.Lsq):
    if scale is None:
      raise ValueError('scale (the learned LSQ step) is required for Lsq calibration.')
    if cfg.stochastic:
      raise ValueError("Lsq calibration supports rounding='nearest' only.")
    return scaling.lsq_fake_quant(x, scale, cfg.format)
  if cfg.stochastic and key is None:
    raise ValueError("key is required: config.rounding is 'stochastic' (got key=None).")
  samples = []
  for i in range(cfg.samples):
    sample_key = _sample_key(key, i, cfg.samples) if key is not None else None
    q = quantize(x, cfg if cfg.samples == 1 else _one_sample(cfg), key=sample_key, scale=scale)
    samples.append(q)
  y = sum(q.dequantize().astype(jnp.float32) for q in samples) / cfg.samples
  y = y.astype(x.dtype)
  if ste == 'clipped':
    mask = _in_range(jax.lax.stop_gradient(x), samples[0])
    x = jnp.where(mask, x, jax.lax.stop_gradient(x))
  # Forward value exactly y (x - x = 0); `x + sg(y - x)` is not y when |y| << |x|
  # (a saturated value), most visibly in bfloat16.
  return jax.lax.stop_gradient(y) + (x - jax.lax.stop_gradient(x))


def _one_sample(cfg: cfgs.TensorConfig) -> cfgs.TensorConfig:
  return dataclasses.replace(cfg, samples=1)
