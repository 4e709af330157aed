"""Fused absmax/SAWB quantize kernel (Mosaic GPU, Hopper): codes + scale in two passes over HBM.

`quantize(x, config, implementation=...)` returns the same `qtrain.QArray` as
`qtrain.quantize(x, config)` (codes bit for bit, scales equal) for the
round-to-nearest configs below, computed by two Pallas kernels:

| pass | kernel            | reads      | writes                                   |
|------|-------------------|------------|------------------------------------------|
| 1    | `_absmax_kernel`  | x          | per-row partial max\\|x\\|, (N/block_cols, M) f32 |
| 2    | `_quantize_kernel`| x, 1/scale | codes (M, N) int8 / fp8                  |

(SAWB's statistics are two float means whose last bits depend on the
summation order, so pass 1 for SAWB is `qtrain.scaling.compute_scale` itself,
in XLA, and the scale is the library's by construction.)

Supported (everything else: `can_use` is False and the wrapper raises):

| what          | values                                                               |
|---------------|----------------------------------------------------------------------|
| x             | float32 / bfloat16 / float16, rank >= 2, flattened to (M, N) = (prod(leading), last) |
| shape         | M a multiple of 64 (WGMMA register layout), N a multiple of 16 and of the column block |
| format        | signed `IntFormat` (bits 2..8, narrow or not), `FP8_E4M3`, `FP8_E5M2` |
| calibration   | `AbsMax` (incl. power_of_two), `Sawb`                                 |
| granularity   | `PerTensor`, or per row = `PerChannel(axes=all leading axes)`         |
| rounding      | 'nearest' (stochastic: `pallas_kernels.stochastic_quantize`)          |
| codes dtype   | the format's storage dtype; int formats of <= 5 bits may ask for float8_e4m3fn (exact: the FP8 GEMM carrier) |
| arch          | sm90 (H100/H200); GPU-interpret mode on CPU                          |

Division convention: code units are `x * (1/s)` with `1/s` rounded once to
float32. That is what XLA compiles qtrain's `x / s` into under `jit` (checked
on XLA:CPU: 0 differences with `x * (1/s)`, ~10% 1-ulp differences with IEEE
`x / s`), and, being a multiply, no compiler can rewrite it: interpret mode,
XLA and Mosaic GPU all compute the same units. Eager (un-jitted)
`qtrain.quantize` divides exactly and can differ from both in ~1e-5 of the
codes (ties moved by one ulp).

NaN policy (= `qtrain.quantize`): a scale group holding NaN or ±Inf gets scale
NaN and codes 0 (pass 1 maps NaN to +Inf so that the max is non-finite
whatever the hardware max does with NaN). All-zero groups get scale
1/target and zero codes.

Design (memory bound): each CTA TMA-copies one (block_rows, block_cols) tile
of x into SMEM, walks it in (64, tile_cols) register tiles in the WGMMA layout
(rows x 1/s broadcast from the row layout), writes codes to SMEM and TMA-copies
them out. Tiles are independent, so several CTAs per SM overlap loads,
arithmetic and stores. Grid = (M / block_rows, N / block_cols).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _common
from qtrain import config as cfgs
from qtrain import formats as fmts
from qtrain.quantize import as_tensor_config, check_float
from qtrain.quantize import quantize_xla as xla_quantize
from qtrain import scaling
from qtrain.qarray import QArray

__all__ = ['TuningConfig', 'can_use', 'quantize', 'quantize_pallas', 'reference', 'absmax_rows',
           'gpu_checks', 'gpu_timings', 'main', 'IMPLEMENTATIONS']

IMPLEMENTATIONS = (None, 'xla', 'pallas', 'interpret')
_X_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_FP8 = {fmts.FP8_E4M3: jnp.float8_e4m3fn, fmts.FP8_E5M2: jnp.float8_e5m2}
# Rows of one register tile: the WGMMA layout is 64 rows per warpgroup.
_TILE_ROWS = 64
# TMA copies at most 256 elements along each dimension.
_MAX_TMA_DIM = 256
_SMEM_BYTES = 232448
_F32_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TuningConfig:
  """Tile sizes of the quantize kernels (clipped to the array's shape).

  Attributes:
    block_rows: rows per CTA (TMA tile); multiple of 64, at most 256.
    block_cols: columns per CTA (TMA tile); at most 256.
    tile_cols: columns per register tile inside a CTA (64 rows x tile_cols
      values live in registers at once: 128 per thread at 64 x 256); must
      divide block_cols and be a multiple of 8.
  """
  block_rows: int = 64
  block_cols: int = 256
  tile_cols: int = 256

  def __post_init__(self):
    if self.block_rows % _TILE_ROWS or not 0 < self.block_rows <= _MAX_TMA_DIM:
      raise ValueError(f'block_rows={self.block_rows} must be a multiple of 64 in [64, 256].')
    if not 16 <= self.block_cols <= _MAX_TMA_DIM:
      raise ValueError(f'block_cols={self.block_cols} must be in [16, 256].')
    if self.tile_cols % 8 or self.block_cols % self.tile_cols:
      raise ValueError(f'tile_cols={self.tile_cols} must be a multiple of 8 dividing '
                       f'block_cols={self.block_cols}.')


# ---------------------------------------------------------------------------------------------
# Small private helpers shared with stochastic_quantize.py and hadamard_quantize.py.


def _blocks(m: int, n: int, tuning: TuningConfig) -> tuple[int, int, int]:
  """(block_rows, block_cols, tile_cols) clipped to an (m, n) array."""
  bm = min(tuning.block_rows, m)
  bn = min(tuning.block_cols, n)
  tn = min(tuning.tile_cols, bn)
  return bm, bn, tn


def _check_2d(m: int, n: int, x_dtype, tuning: TuningConfig, out_dtypes=()) -> None:
  """Raises ValueError naming the dimension that the kernels cannot tile."""
  if jnp.dtype(x_dtype) not in [jnp.dtype(d) for d in _X_DTYPES]:
    raise ValueError(f'x.dtype={jnp.dtype(x_dtype)} is not supported; allowed: float32, '
                     'bfloat16, float16.')
  bm, bn, tn = _blocks(m, n, tuning)
  if m % _TILE_ROWS or m % bm:
    raise ValueError(f'rows M={m} (product of the leading dimensions) must be a multiple of '
                     f'64 and of block_rows={bm}.')
  if n % 16 or n % bn or bn % tn or tn % 8:
    raise ValueError(f'last dimension N={n} must be a multiple of 16 and of block_cols={bn} '
                     f'(tile_cols={tn}).')
  smem = bm * bn * (jnp.dtype(x_dtype).itemsize + sum(jnp.dtype(d).itemsize for d in out_dtypes))
  if smem + 4 * bm + 1024 > _SMEM_BYTES:
    raise ValueError(f'block {bm}x{bn} needs {smem} bytes of SMEM (> {_SMEM_BYTES}); '
                     'lower block_rows/block_cols.')


def _map_tiles(tile_fn: Callable, x2d: jax.Array, row_vec: jax.Array, seed: jax.Array | None, *,
               out_dtype, tuning: TuningConfig, interpret: bool, name: str) -> jax.Array:
  """Runs `tile_fn` over (64, tile_cols) register tiles of `x2d`; returns the (M, N) result.

  Args:
    tile_fn: `fn(x_tile_f32 (64, tn), row_vec_tile (64,), seed_words, row0, col0) -> (64, tn)`
      array of `out_dtype`; row0/col0 are the global indices of the tile's
      first element (int32 scalars); seed_words is None or (k0, k1) uint32.
    x2d: (M, N) float array.
    row_vec: (M,) float32, one value per row (e.g. 1/scale).
    seed: None or uint32 (4,) (two seed words, padded to TMA's 16 bytes).
  """
  m, n = x2d.shape
  bm, bn, tn = _blocks(m, n, tuning)

  def kernel(*refs):
    if seed is None:
      x_gmem, v_gmem, o_gmem = refs
      seed_gmem = None
    else:
      x_gmem, v_gmem, seed_gmem, o_gmem = refs

    def scoped(x_smem, v_smem, seed_smem, o_smem, bar):
      i = lax.axis_index('m')
      j = lax.axis_index('n')
      plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)], x_smem, bar)
      plgpu.copy_gmem_to_smem(v_gmem.at[pl.ds(i * bm, bm)], v_smem, bar)
      if seed_gmem is not None:
        plgpu.copy_gmem_to_smem(seed_gmem, seed_smem, bar)
      plgpu.barrier_wait(bar)
      words = None if seed_gmem is None else (seed_smem[0], seed_smem[1])
      for r in range(bm // _TILE_ROWS):  # static: bm // 64 <= 4
        rows = pl.ds(r * _TILE_ROWS, _TILE_ROWS)

        @pl.loop(0, bn // tn)
        def _(c):
          cols = pl.ds(c * tn, tn)
          xt = plgpu.layout_cast(x_smem[rows, cols].astype(jnp.float32), plgpu.Layout.WGMMA)
          vt = plgpu.layout_cast(v_smem[rows], plgpu.Layout.WGMMA.reduce(1))
          o_smem[rows, cols] = tile_fn(xt, vt, words, i * bm + r * _TILE_ROWS, j * bn + c * tn)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)])
      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(scoped, plgpu.SMEM((bm, bn), x2d.dtype), plgpu.SMEM((bm,), jnp.float32),
                  plgpu.SMEM((4,), jnp.uint32), plgpu.SMEM((bm, bn), out_dtype),
                  plgpu.Barrier(num_arrivals=2 if seed is None else 3))

  kernel.__name__ = name
  call = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
                      grid=(m // bm, n // bn), grid_names=('m', 'n'),
                      interpret=_common.interpret_params(interpret))
  args = (x2d, row_vec) if seed is None else (x2d, row_vec, seed)
  return call(*args)


def _absmax_kernel_call(x2d: jax.Array, tuning: TuningConfig, interpret: bool) -> jax.Array:
  """Pass 1: (N / block_cols, M) float32 partial max|x| per row and column block; NaN -> +Inf."""
  m, n = x2d.shape
  bm, bn, tn = _blocks(m, n, tuning)

  def _absmax_kernel(x_gmem, o_gmem):
    def scoped(x_smem, o_smem, bar):
      i = lax.axis_index('m')
      j = lax.axis_index('n')
      plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)], x_smem, bar)
      plgpu.barrier_wait(bar)
      for r in range(bm // _TILE_ROWS):
        rows = pl.ds(r * _TILE_ROWS, _TILE_ROWS)

        def step(c, acc):
          xt = x_smem[rows, pl.ds(c * tn, tn)].astype(jnp.float32)
          a = jnp.abs(plgpu.layout_cast(xt, plgpu.Layout.WGMMA))
          # NaN -> +Inf: the group's scale must become non-finite whether the
          # hardware max propagates NaN or not (max.f32 does not).
          a = jnp.where(a == a, a, jnp.inf)
          return jnp.maximum(acc, jnp.max(a, axis=1))

        init = plgpu.layout_cast(jnp.zeros((_TILE_ROWS,), jnp.float32),
                                 plgpu.Layout.WGMMA.reduce(1))
        o_smem[rows] = lax.fori_loop(0, bn // tn, step, init)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[j, pl.ds(i * bm, bm)])
      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(scoped, plgpu.SMEM((bm, bn), x2d.dtype), plgpu.SMEM((bm,), jnp.float32),
                  plgpu.Barrier(num_arrivals=1))

  call = plgpu.kernel(_absmax_kernel, out_type=jax.ShapeDtypeStruct((n // bn, m), jnp.float32),
                      grid=(m // bm, n // bn), grid_names=('m', 'n'),
                      interpret=_common.interpret_params(interpret))
  return call(x2d)


def absmax_rows(x2d: jax.Array, *, tuning: TuningConfig = TuningConfig(),
                interpret: bool = False) -> jax.Array:
  """max|x| of every row of `x2d` by the pass-1 kernel (NaN rows give +Inf).

  Args:
    x2d: (M, N) float32/bfloat16/float16 array (see the module table for M, N).
    tuning: tile sizes.
    interpret: run in GPU-interpret mode (CPU).

  Returns:
    (M,) float32: exact max|x| per row (a max has no rounding), +Inf where the
    row holds NaN or Inf.

  Raises:
    ValueError: the shape or dtype cannot be tiled (names the dimension).
  """
  if x2d.ndim != 2:
    raise ValueError(f'x2d must be 2-D, got shape {x2d.shape}.')
  _check_2d(*x2d.shape, x2d.dtype, tuning)
  return jnp.max(_absmax_kernel_call(x2d, tuning, interpret), axis=0)


# ---------------------------------------------------------------------------------------------
# Config checks.


def _is_per_row(granularity, ndim: int) -> bool:
  if not isinstance(granularity, scaling.PerChannel) or granularity.axes is None:
    return False
  try:
    axes = {a % ndim for a in granularity.axes if -ndim <= a < ndim}
  except TypeError:
    return False
  return len(axes) == len(granularity.axes) and axes == set(range(ndim - 1))


def _unsupported(shape, dtype, cfg: cfgs.TensorConfig, codes_dtype, tuning: TuningConfig, *,
                 rounding: str = 'nearest') -> str | None:
  """Why the kernels cannot run this quantization (None if they can)."""
  if not jnp.issubdtype(dtype, jnp.floating):
    return f'x must be a floating-point array, got dtype {jnp.dtype(dtype)}'
  if len(shape) < 2:
    return f'x must have rank >= 2 (rows x last axis), got shape {tuple(shape)}'
  if cfg.rounding != rounding:
    return f'config.rounding must be {rounding!r} here, got {cfg.rounding!r}'
  if cfg.samples != 1:
    return f'config.samples must be 1, got {cfg.samples}'
  fmt = cfg.format
  if isinstance(fmt, fmts.IntFormat):
    if not fmt.signed or fmt.bits > 8:
      return f'format {fmt.name} is not supported (signed IntFormat with bits <= 8 only)'
  elif isinstance(fmt, fmts.LogFormat) and rounding == 'stochastic':
    if fmt.radix != 2 or fmt.shift or not fmt.signed_values:
      return f'format {fmt.name} is not supported (signed radix-2 LogFormat without shift only)'
  elif not (fmt in _FP8 and rounding == 'nearest'):
    return f'format {fmt.name} is not supported'
  if not isinstance(cfg.calibration, (scaling.AbsMax, scaling.Sawb)):
    return f'calibration {cfg.calibration!r} is not supported (AbsMax, Sawb)'
  if not (isinstance(cfg.granularity, scaling.PerTensor)
          or _is_per_row(cfg.granularity, len(shape))):
    return (f'granularity {cfg.granularity!r} is not supported (PerTensor, or PerChannel over '
            f'all leading axes {tuple(range(len(shape) - 1))})')
  if codes_dtype is not None and jnp.dtype(codes_dtype) != jnp.dtype(fmt.storage_dtype):
    exact_fp8 = (isinstance(fmt, fmts.IntFormat) and fmt.bits <= 5
                 and jnp.dtype(codes_dtype) == jnp.dtype(jnp.float8_e4m3fn))
    if not exact_fp8:
      return (f'codes_dtype={jnp.dtype(codes_dtype)} is not supported for {fmt.name} '
              f'(its storage dtype {fmt.storage_dtype}, or float8_e4m3fn for ints of <= 5 bits)')
  m, n = math.prod(shape[:-1]), shape[-1]
  out = fmt.storage_dtype if codes_dtype is None else codes_dtype
  try:
    _check_2d(m, n, dtype, tuning, (out,))
  except ValueError as e:
    return str(e)
  return None


def can_use(x: jax.Array | jax.ShapeDtypeStruct, config: cfgs.TensorConfig | fmts.Format, *,
            codes_dtype=None, tuning: TuningConfig = TuningConfig()) -> bool:
  """True if `quantize_pallas` supports this array and config (module table); never raises."""
  try:
    cfg = as_tensor_config(config)
  except TypeError:
    return False
  return _unsupported(tuple(x.shape), x.dtype, cfg, codes_dtype, tuning) is None


# ---------------------------------------------------------------------------------------------
# Scales (XLA, on the pass-1 statistic) and the quantize tile functions.


def _group_shape(shape, per_row: bool) -> tuple[int, ...]:
  return tuple(shape[:-1]) + (1,) if per_row else (1,) * len(shape)


def calibrate(x: jax.Array, cfg: cfgs.TensorConfig, *, tuning: TuningConfig,
              interpret: bool) -> tuple[jax.Array, jax.Array]:
  """Returns (scale of the group shape, (M,) float32 1/scale per row); non-finite groups -> NaN.

  AbsMax: pass-1 kernel, then `qtrain.scaling.compute_scale` applied to the
  group maxima (a max of the group maxima is the group max, exactly), so the
  power-of-two rule and the zero guard are the library's own code. Sawb:
  `qtrain.scaling.compute_scale` on x (XLA).
  """
  shape = x.shape
  per_row = _is_per_row(cfg.granularity, x.ndim)
  m, n = math.prod(shape[:-1]), shape[-1]
  group = _group_shape(shape, per_row)
  if isinstance(cfg.calibration, scaling.AbsMax):
    rows = absmax_rows(x.reshape(m, n), tuning=tuning, interpret=interpret)
    amax = rows.reshape(group) if per_row else jnp.max(rows).reshape(group)
    scale, _ = scaling.compute_scale(amax, cfg.format, cfg.calibration,
                                     scaling.PerTensor() if not per_row else cfg.granularity)
  else:
    scale, _ = scaling.compute_scale(x, cfg.format, cfg.calibration, cfg.granularity)
  scale = jnp.where(jnp.isfinite(scale), scale, jnp.nan)
  inv = jnp.broadcast_to((1.0 / scale).reshape(-1), (m,)) if not per_row else (
      1.0 / scale).reshape(m)
  return scale, inv.astype(jnp.float32)


def _finite_or_zero(v: jax.Array, q: jax.Array) -> jax.Array:
  # |v| <= FLT_MAX is False for NaN and ±Inf (Mosaic GPU has no is_finite lowering).
  return jnp.where(jnp.abs(v) <= _F32_MAX, q, jnp.zeros_like(q))


def _round_nearest_tile(fmt: fmts.Format, out_dtype) -> Callable:
  """Tile function of round-to-nearest-even onto `fmt`, codes in `out_dtype`."""

  def tile_fn(xt, inv, words, row0, col0):
    del words, row0, col0
    v = xt * inv[:, None]
    if isinstance(fmt, fmts.IntFormat):
      q = jnp.clip(jnp.round(v), float(fmt.qmin), float(fmt.qmax))
      # round(-0.3) is -0.0: an integer code has no sign of zero (matters for fp8 carriers).
      q = jnp.where(q == 0, jnp.zeros_like(q), q)
    else:
      # The f32 -> fp8 conversion rounds to nearest even, subnormals included,
      # which is qtrain.rounding.round_float once |v| is clipped to max_value.
      q = jnp.clip(v, -fmt.max_value, fmt.max_value)
    return _finite_or_zero(v, q).astype(out_dtype)

  return tile_fn


def quantize_pallas(x: jax.Array, config: cfgs.TensorConfig | fmts.Format, *, codes_dtype=None,
                    tuning: TuningConfig = TuningConfig(), interpret: bool = False) -> QArray:
  """Round-to-nearest quantization of `x` by the Pallas kernels (module table).

  Args:
    x: float32/bfloat16/float16 array of rank >= 2; (prod(leading), last)
      tiles by (64, 16) and the blocks of `tuning`.
    config: a round-to-nearest `TensorConfig` (or bare Format): signed int or
      FP8 format; AbsMax or Sawb; per tensor or per row.
    codes_dtype: None (the format's storage dtype) or float8_e4m3fn for int
      formats of <= 5 bits (INT4 codes for the FP8 GEMM; exact).
    tuning: tile sizes.
    interpret: GPU-interpret mode (runs on CPU).

  Returns:
    `QArray` equal to `qtrain.quantize(x, config)` under jit: codes bit for bit
    (in `codes_dtype` if given), scale of the group shape.

  Raises:
    TypeError: `x` is not floating, or `config` is not a config/format.
    ValueError: an unsupported config or shape (the message names it).
  """
  check_float(x)
  cfg = as_tensor_config(config)
  why = _unsupported(tuple(x.shape), x.dtype, cfg, codes_dtype, tuning)
  if why:
    raise ValueError(f'quantize_pallas: {why}.')
  out_dtype = jnp.dtype(cfg.format.storage_dtype if codes_dtype is None else codes_dtype)
  m, n = math.prod(x.shape[:-1]), x.shape[-1]
  scale, inv = calibrate(x, cfg, tuning=tuning, interpret=interpret)
  codes = _map_tiles(_round_nearest_tile(cfg.format, out_dtype), x.reshape(m, n), inv, None,
                     out_dtype=out_dtype, tuning=tuning, interpret=interpret,
                     name='_quantize_kernel')
  return QArray(codes=codes.reshape(x.shape), scale=scale, format=cfg.format,
                granularity=cfg.granularity, dtype=x.dtype)


def reference(x: jax.Array, config: cfgs.TensorConfig | fmts.Format, *, codes_dtype=None,
              key: jax.Array | None = None, stream: int = 0) -> QArray:
  """The XLA path: `qtrain.quantize(x, config)` (codes cast to `codes_dtype` if given)."""
  q = xla_quantize(x, config, key=key, stream=stream)
  if codes_dtype is not None:
    q = dataclasses.replace(q, codes=q.codes.astype(codes_dtype))
  return q


def resolve(implementation: str | None, supported: bool) -> str:
  """Picks 'xla', 'pallas' or 'interpret' (None: pallas on Hopper when supported, else xla)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'implementation={implementation!r} is unknown; allowed: {IMPLEMENTATIONS}.')
  if implementation is None:
    return 'pallas' if supported and _common.is_hopper() else 'xla'
  return implementation


def quantize(x: jax.Array, config: cfgs.TensorConfig | fmts.Format, *, key=None,
             scale=None, stream: int = 0, codes_dtype=None, implementation: str | None = None,
             tuning: TuningConfig = TuningConfig()) -> QArray:
  """`qtrain.quantize` with a choice of implementation (the lead wires it into qtrain).

  Args:
    x, config, key, scale, stream: as `qtrain.quantize`.
    codes_dtype: see `quantize_pallas`.
    implementation: None (Pallas on Hopper when `can_use`, else XLA), 'xla',
      'pallas' (GPU) or 'interpret' (the Pallas kernels in GPU-interpret mode).
      Stochastic configs go to `pallas_kernels.stochastic_quantize`.
    tuning: tile sizes.

  Returns:
    The `QArray` of `qtrain.quantize`.

  Raises:
    ValueError: unknown implementation; 'pallas'/'interpret' with an
      unsupported config (names it) or with `scale=` (not supported here).
  """
  cfg = as_tensor_config(config)
  if cfg.stochastic:
    from pallas_kernels import stochastic_quantize as sq  # pylint: disable=g-import-not-at-top
    return sq.quantize(x, cfg, key=key, scale=scale, stream=stream, codes_dtype=codes_dtype,
                       implementation=implementation, tuning=tuning)
  supported = scale is None and can_use(x, cfg, codes_dtype=codes_dtype, tuning=tuning)
  impl = resolve(implementation, supported)
  if impl == 'xla':
    if scale is not None:
      q = xla_quantize(x, cfg, scale=scale, stream=stream)
      return q if codes_dtype is None else dataclasses.replace(
          q, codes=q.codes.astype(codes_dtype))
    return reference(x, cfg, codes_dtype=codes_dtype)
  if scale is not None:
    raise ValueError('scale= is not supported by the Pallas quantize kernels; use '
                     "implementation='xla'.")
  return quantize_pallas(x, cfg, codes_dtype=codes_dtype, tuning=tuning,
                         interpret=impl == 'interpret')


# ---------------------------------------------------------------------------------------------
# GPU checks and benchmark (benchmarks/gpu_check.py imports gpu_checks / gpu_timings).

_CHECK_SHAPES = ((256, 1024), (4, 128, 768), (8192, 4096))
_TIMING_SHAPES = ((8192, 4096), (16384, 8192))


def _check_configs() -> list[tuple[str, cfgs.TensorConfig, Any]]:
  return [
      ('int8_absmax_tensor', cfgs.TensorConfig(format=fmts.INT8), None),
      ('int8_absmax_row', cfgs.TensorConfig(format=fmts.INT8,
                                            granularity=scaling.PerChannel(axes=(0,))), None),
      ('int4_sawb_tensor_fp8carrier', cfgs.TensorConfig(format=fmts.INT4,
                                                        calibration=scaling.Sawb()),
       jnp.float8_e4m3fn),
      ('e4m3_absmax_tensor', cfgs.TensorConfig(format=fmts.FP8_E4M3), None),
  ]


def _row_config(cfg: cfgs.TensorConfig, ndim: int) -> cfgs.TensorConfig:
  if isinstance(cfg.granularity, scaling.PerChannel):
    return dataclasses.replace(cfg, granularity=scaling.PerChannel(axes=tuple(range(ndim - 1))))
  return cfg


def _code_mismatches(a: jax.Array, b: jax.Array) -> int:
  """Number of codes whose bit patterns differ (so -0 vs +0 counts for fp8 codes)."""
  b = b.astype(a.dtype)
  if jnp.issubdtype(a.dtype, jnp.floating):
    a, b = (lax.bitcast_convert_type(c, jnp.uint8) for c in (a, b))
  return int(jnp.sum(a != b))


def gpu_checks() -> list[dict]:
  """Kernel vs `qtrain.quantize` (both jitted) on fresh random inputs; one row per case."""
  rows = []
  key = jax.random.key(int(time.time()))
  for shape in _CHECK_SHAPES:
    for name, cfg, cd in _check_configs():
      cfg = _row_config(cfg, len(shape))
      key, sub = jax.random.split(key)
      x = jax.random.normal(sub, shape, jnp.float32) * 3 + 0.5
      got = jax.jit(lambda x, c=cfg, d=cd: quantize_pallas(x, c, codes_dtype=d))(x)
      want = jax.jit(lambda x, c=cfg, d=cd: reference(x, c, codes_dtype=d))(x)
      mism = _code_mismatches(got.codes, want.codes)
      serr = float(jnp.max(jnp.abs(got.scale - want.scale) / want.scale))
      tol = 1e-6 if isinstance(cfg.calibration, scaling.Sawb) else 0.0
      rows.append(dict(name=f'quantize/{name}', shape=shape, mismatches=mism,
                       max_scale_rel_err=serr, passed=bool(serr <= tol and mism == 0)))
  return rows


def _copy_ms(nbytes: int, iters: int = 20) -> float:
  """Median time of a device-to-device copy of `nbytes` (read + write = 2·nbytes moved)."""
  buf = jnp.ones((nbytes // 4,), jnp.float32)
  copy = jax.jit(lambda b: b + 0.0)  # one fused read + write, not elided
  return _common.time_ms(copy, buf, iters=iters)


def timing_row(name: str, shape, fn: Callable, x: jax.Array, moved_bytes: int,
               xla_fn: Callable | None = None) -> dict:
  """One gpu_timings row: median ms, GB/s of `moved_bytes`, ratio to a copy of as many bytes."""
  ms = _common.time_ms(jax.jit(fn), x)
  copy = _copy_ms(moved_bytes // 2)
  row = dict(name=name, shape=tuple(shape), median_ms=ms, gb_per_s=moved_bytes / ms / 1e6,
             copy_gb_per_s=moved_bytes / copy / 1e6, ratio_to_copy=copy / ms)
  if xla_fn is not None:
    row['xla_ms'] = _common.time_ms(jax.jit(xla_fn), x)
  return row


def gpu_timings() -> list[dict]:
  """Median time and achieved HBM bandwidth of both passes together (target >= 0.7 of copy)."""
  rows = []
  for shape in _TIMING_SHAPES:
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    for name, cfg, cd in _check_configs():
      cfg = _row_config(cfg, len(shape))
      out_bytes = jnp.dtype(cfg.format.storage_dtype if cd is None else cd).itemsize
      # Bytes that must move: x twice (statistics pass, quantize pass) + codes.
      moved = x.size * (2 * x.dtype.itemsize + out_bytes)
      rows.append(timing_row(f'quantize/{name}', shape,
                             lambda x, c=cfg, d=cd: quantize_pallas(x, c, codes_dtype=d), x,
                             moved, lambda x, c=cfg, d=cd: reference(x, c, codes_dtype=d)))
  return rows


def main(argv=None) -> None:
  """Benchmark / tuning sweep (GPU), or a CUDA lowering smoke test on CPU."""
  del argv
  if not _common.is_hopper():
    x = jax.ShapeDtypeStruct((8192, 4096), jnp.float32)
    for name, cfg, cd in _check_configs():
      _common.lower_for_cuda(lambda x, c=cfg, d=cd: quantize_pallas(x, c, codes_dtype=d), x)
      print(f'{name}: lowers for CUDA at {x.shape}')
    return
  for row in gpu_checks():
    print(row)
  for row in gpu_timings():
    print(row)
  x = jax.random.normal(jax.random.key(0), (8192, 4096), jnp.float32)
  for bm in (64, 128):
    for bn, tn in ((128, 128), (256, 128), (256, 256)):
      t = TuningConfig(block_rows=bm, block_cols=bn, tile_cols=tn)
      ms = _common.time_ms(jax.jit(lambda x, t=t: quantize_pallas(x, fmts.INT8, tuning=t)), x)
      print(f'tuning {t}: {ms:.3f} ms')


if __name__ == '__main__':
  main(sys.argv)
