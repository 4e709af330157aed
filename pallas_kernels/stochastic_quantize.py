"""Fused stochastic-rounding quantize kernels (Mosaic GPU, Hopper) with in-kernel Threefry bits.

`quantize(x, config, key=key, implementation=...)` returns the same `QArray`
as `qtrain.quantize(x, config, key=key, stream=stream)` for the stochastic
configs below, bit for bit: the kernel draws element i's uniform from
`qtrain.prng`'s counter layout itself,

    u_i = (threefry2x32(seed[0], seed[1], x0=i, x1=stream)[0] >> 8) · 2^-24,
    seed = qtrain.prng.seed_from_key(key), i = row-major flat index of x,

with `qtrain.prng.threefry2x32` (uint32 add/shift/or/xor only) called inside
the kernel on the tile's global indices, so no random bits travel through HBM
and the bits do not depend on the tiling.

| rule                      | formats                           | code (u: the uniform above, v = x·(1/s)) |
|---------------------------|-----------------------------------|-------------------------------------------|
| SR to integers            | signed `IntFormat`, bits 2..8     | lo = floor(clip(v)), lo + [u < clip(v) − lo] |
| LUQ (log SR, Chmiel et al.) | signed radix-2 `LogFormat` (LUQ's `LOG2_FP4`: α·2^0..α·2^7) | \\|v\\| < 2^min: 0 or 2^min (stochastic underflow); else lo = 2^⌊log2\\|v\\|⌋, up to 2·lo w.p. (\\|v\\|−lo)/lo; ≥ 2^max: 2^max |

Scale: `AbsMax` (LUQ's α = max|x|/2^max_exponent is `AbsMax` on `LOG2_FP4`)
by the pass-1 kernel of `pallas_kernels.quantize`, or `Sawb` (XLA);
per tensor or per row. Shapes, dtypes, division convention and NaN policy:
as `pallas_kernels.quantize` (floor is emulated by truncation, and
⌊log2 a⌋ by masking the float32 exponent bits: Mosaic GPU has no floor/frexp
lowering).

References:
  Chmiel et al., "Logarithmic Unbiased Quantization", arXiv:2112.10769, §4
  (stochastic underflow T_α and logarithmic SR); Gupta et al., 2015 (SR).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qtrain import config as cfgs
from qtrain import formats as fmts
from qtrain import numerics
from qtrain import prng
from qtrain import scaling
from qtrain.qarray import QArray
from qtrain.quantize import as_tensor_config, check_float
from qtrain.quantize import quantize_xla as xla_quantize
from pallas_kernels import _common
from pallas_kernels import quantize as pq

__all__ = ['TuningConfig', 'can_use', 'quantize', 'quantize_stochastic_pallas', 'reference',
           'gpu_checks', 'gpu_timings', 'main']

# Fewer columns per register tile than round-to-nearest: Threefry keeps about
# four live uint32 words per element (64 x 64 tile = 32 elements per thread).
TuningConfig = pq.TuningConfig
DEFAULT_TUNING = pq.TuningConfig(block_rows=64, block_cols=256, tile_cols=64)
_MAX_SIZE = 2**32


def _uniform_tile(words, stream: int, n: int, row0, col0, shape) -> jax.Array:
  """`qtrain.prng.uniform` of the tile's elements, from their global flat indices."""
  rows = lax.broadcasted_iota(jnp.uint32, shape, 0) + row0.astype(jnp.uint32)
  cols = lax.broadcasted_iota(jnp.uint32, shape, 1) + col0.astype(jnp.uint32)
  index = rows * np.uint32(n) + cols
  bits, _ = prng.threefry2x32(words[0], words[1], index, np.uint32(stream))
  return lax.shift_right_logical(bits, np.uint32(8)).astype(jnp.float32) * np.float32(2.0**-24)


def _floor(x: jax.Array) -> jax.Array:
  # Truncation toward zero, then one down for negative non-integers: exact for |x| < 2^31
  # (the values are clipped to the format's range first).
  t = x.astype(jnp.int32).astype(jnp.float32)
  return jnp.where(t > x, t - 1.0, t)


def _pow2_floor(a: jax.Array) -> jax.Array:
  """2^⌊log2 a⌋ for normal positive float32 `a` (mantissa bits cleared)."""
  bits = lax.bitcast_convert_type(a, jnp.uint32) & np.uint32(0x7F800000)
  return lax.bitcast_convert_type(bits, jnp.float32)


def _stochastic_tile(fmt: fmts.Format, out_dtype, stream: int, n: int) -> Callable:
  """Tile function of stochastic rounding onto `fmt` (see the module table)."""

  def tile_fn(xt, inv, words, row0, col0):
    v = xt * inv[:, None]
    u = _uniform_tile(words, stream, n, row0, col0, xt.shape)
    if isinstance(fmt, fmts.IntFormat):
      xc = jnp.clip(v, float(fmt.qmin), float(fmt.qmax))
      lo = _floor(xc)
      q = lo + (u < xc - lo).astype(jnp.float32)
      q = jnp.where(q == 0, jnp.zeros_like(q), q)  # no -0 integer codes (fp8 carriers)
    else:  # signed radix-2 LogFormat, shift 0 (qtrain.rounding.round_log)
      bottom = np.float32(2.0**fmt.min_exponent)
      top = np.float32(2.0**fmt.max_exponent)
      a = jnp.abs(v)
      under = a < bottom
      lo_n = jnp.clip(_pow2_floor(a), bottom, top)
      lo = jnp.where(under, 0.0, lo_n)
      hi = jnp.where(under, bottom, 2.0 * lo_n)
      up = u * (hi - lo) < a - lo
      q = jnp.sign(v) * jnp.where(a >= top, top, jnp.where(up, hi, lo))
    return pq._finite_or_zero(v, q).astype(out_dtype)  # pylint: disable=protected-access

  return tile_fn


def _unsupported(x, cfg, codes_dtype, tuning) -> str | None:
  why = pq._unsupported(tuple(x.shape), x.dtype, cfg, codes_dtype, tuning,  # pylint: disable=protected-access
                        rounding='stochastic')
  if why is None and math.prod(x.shape) >= _MAX_SIZE:
    why = f'x has {math.prod(x.shape)} elements; the Threefry counter is one uint32 word (< 2**32)'
  return why


def can_use(x: jax.Array | jax.ShapeDtypeStruct, config: cfgs.TensorConfig, *, codes_dtype=None,
            tuning: TuningConfig = DEFAULT_TUNING) -> bool:
  """True if `quantize_stochastic_pallas` supports this array and config; never raises."""
  try:
    cfg = as_tensor_config(config)
  except TypeError:
    return False
  return _unsupported(x, cfg, codes_dtype, tuning) is None


def quantize_stochastic_pallas(x: jax.Array, config: cfgs.TensorConfig, key: jax.Array, *,
                               stream: int = 0, codes_dtype=None,
                               tuning: TuningConfig = DEFAULT_TUNING,
                               interpret: bool = False) -> QArray:
  """Stochastic quantization of `x` by the Pallas kernels (module table).

  Args:
    x: float32/bfloat16/float16 array of rank >= 2 (tiling as `pallas_kernels.quantize`).
    config: a `TensorConfig` with rounding='stochastic', samples=1: signed int
      format or signed radix-2 LogFormat (`qtrain.numerics.luq_config(4)`);
      AbsMax or Sawb; per tensor or per row.
    key: a single PRNG key (typed or legacy), as for `qtrain.quantize`.
    stream: `qtrain.prng` counter stream, in [0, 2**32).
    codes_dtype: None (the format's storage dtype) or float8_e4m3fn for int
      formats of <= 5 bits.
    tuning: tile sizes.
    interpret: GPU-interpret mode (runs on CPU).

  Returns:
    `QArray` equal to `qtrain.quantize(x, config, key=key, stream=stream)`
    under jit: codes bit for bit, scale of the group shape.

  Raises:
    TypeError: `x` not floating, `key` not a key.
    ValueError: unsupported config/shape (named), a batch of keys, or a bad stream.
  """
  check_float(x)
  cfg = as_tensor_config(config)
  why = _unsupported(x, cfg, codes_dtype, tuning)
  if why:
    raise ValueError(f'quantize_stochastic_pallas: {why}.')
  seed = prng.seed_from_key(key)
  if seed.shape != (2,):
    raise ValueError(f'key must be a single key, got a batch of shape {seed.shape[:-1]}.')
  if not 0 <= int(stream) < _MAX_SIZE:
    raise ValueError(f'stream={stream} must be in [0, 2**32).')
  out_dtype = jnp.dtype(cfg.format.storage_dtype if codes_dtype is None else codes_dtype)
  m, n = math.prod(x.shape[:-1]), x.shape[-1]
  scale, inv = pq.calibrate(x, cfg, tuning=tuning, interpret=interpret)
  seed4 = jnp.concatenate([seed.astype(jnp.uint32), jnp.zeros((2,), jnp.uint32)])
  codes = pq._map_tiles(  # pylint: disable=protected-access
      _stochastic_tile(cfg.format, out_dtype, int(stream), n), x.reshape(m, n), inv, seed4,
      out_dtype=out_dtype, tuning=tuning, interpret=interpret, name='_stochastic_quantize_kernel')
  return QArray(codes=codes.reshape(x.shape), scale=scale, format=cfg.format,
                granularity=cfg.granularity, dtype=x.dtype)


def reference(x: jax.Array, config: cfgs.TensorConfig, key: jax.Array, *, stream: int = 0,
              codes_dtype=None) -> QArray:
  """The XLA path: `qtrain.quantize(x, config, key=key, stream=stream)`."""
  return pq.reference(x, config, key=key, stream=stream, codes_dtype=codes_dtype)


def quantize(x: jax.Array, config: cfgs.TensorConfig, *, key=None, scale=None, stream: int = 0,
             codes_dtype=None, implementation: str | None = None,
             tuning: TuningConfig = DEFAULT_TUNING) -> QArray:
  """`qtrain.quantize` for stochastic configs with a choice of implementation.

  Args and Raises as `pallas_kernels.quantize.quantize`; `key` is required.
  """
  cfg = as_tensor_config(config)
  if key is None:
    raise ValueError("key is required: config.rounding is 'stochastic' (got key=None).")
  supported = scale is None and can_use(x, cfg, codes_dtype=codes_dtype, tuning=tuning)
  impl = pq.resolve(implementation, supported)
  if impl == 'xla':
    q = xla_quantize(x, cfg, key=key, scale=scale, stream=stream)
    return q if codes_dtype is None else dataclasses.replace(q, codes=q.codes.astype(codes_dtype))
  if scale is not None:
    raise ValueError("scale= is not supported by the Pallas kernels; use implementation='xla'.")
  return quantize_stochastic_pallas(x, cfg, key, stream=stream, codes_dtype=codes_dtype,
                                    tuning=tuning, interpret=impl == 'interpret')


# ---------------------------------------------------------------------------------------------
# GPU checks and benchmark.


def _check_configs() -> list[tuple[str, cfgs.TensorConfig, Any]]:
  return [
      ('int8_sr_tensor', cfgs.TensorConfig(format=fmts.INT8, rounding='stochastic'), None),
      ('int4_sr_row_fp8carrier', cfgs.TensorConfig(
          format=fmts.INT4, rounding='stochastic', granularity=scaling.PerChannel(axes=(0,))),
       jnp.float8_e4m3fn),
      ('luq_fp4_tensor', numerics.luq_config(4), None),
  ]


def gpu_checks() -> list[dict]:
  """Kernel vs `qtrain.quantize` (same key, both jitted) on fresh random inputs."""
  rows = []
  key = jax.random.key(int(time.time()))
  for shape in ((256, 1024), (4, 128, 768), (8192, 4096)):
    for name, cfg, cd in _check_configs():
      cfg = pq._row_config(cfg, len(shape))  # pylint: disable=protected-access
      key, kx, kq = jax.random.split(key, 3)
      x = jax.random.normal(kx, shape, jnp.float32) * 3 + 0.5
      got = jax.jit(lambda x, k, c=cfg, d=cd: quantize_stochastic_pallas(x, c, k, codes_dtype=d,
                                                                         stream=1))(x, kq)
      want = jax.jit(lambda x, k, c=cfg, d=cd: reference(x, c, k, codes_dtype=d, stream=1))(x, kq)
      mism = pq._code_mismatches(got.codes, want.codes)  # pylint: disable=protected-access
      serr = float(jnp.max(jnp.abs(got.scale - want.scale)))
      rows.append(dict(name=f'stochastic_quantize/{name}', shape=shape, mismatches=mism,
                       max_scale_abs_err=serr, passed=bool(mism == 0 and serr == 0)))
  return rows


def gpu_timings() -> list[dict]:
  """Median time and HBM bandwidth (both passes) against a copy of the same bytes."""
  rows = []
  for shape in ((8192, 4096), (16384, 8192)):
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    k = jax.random.key(1)
    for name, cfg, cd in _check_configs():
      cfg = pq._row_config(cfg, len(shape))  # pylint: disable=protected-access
      out_bytes = jnp.dtype(cfg.format.storage_dtype if cd is None else cd).itemsize
      moved = x.size * (2 * x.dtype.itemsize + out_bytes)
      rows.append(pq.timing_row(
          f'stochastic_quantize/{name}', shape,
          lambda x, c=cfg, d=cd: quantize_stochastic_pallas(x, c, k, codes_dtype=d), x, moved,
          lambda x, c=cfg, d=cd: reference(x, c, k, codes_dtype=d)))
  return rows


def main(argv=None) -> None:
  """Benchmark on a Hopper GPU, or a CUDA lowering smoke test on CPU."""
  del argv
  if not _common.is_hopper():
    x = jax.ShapeDtypeStruct((8192, 4096), jnp.float32)
    k = jax.random.key(0)
    for name, cfg, cd in _check_configs():
      _common.lower_for_cuda(
          lambda x, c=cfg, d=cd: quantize_stochastic_pallas(x, c, k, codes_dtype=d), x)
      print(f'{name}: lowers for CUDA at {x.shape}')
    return
  for row in gpu_checks() + gpu_timings():
    print(row)


if __name__ == '__main__':
  main(sys.argv)
