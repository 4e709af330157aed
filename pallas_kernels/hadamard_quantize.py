"""Fused block Hadamard transform + LSQ int4 quantize (Mosaic GPU, Hopper): the HQ forward.

The INT4 Transformers paper's Hadamard quantizer (papers-5-8.md §7.1, Xi et
al. §3.3) multiplies the contraction axis D of X by the block-diagonal
`Ĥ = BlockDiag(H_k, ..., H_k)`, H_0 = [1], H_k = (1/√2)[[H, H], [H, −H]]
(orthogonal, symmetric, block g = 2^k), then LSQ-quantizes with a learned
per-tensor step s: q = clamp(round(v/s), −8, 7) (the official code's bounds).
This kernel does both in one pass over HBM: x in, int4 codes out.

| piece        | how                                                                        |
|--------------|----------------------------------------------------------------------------|
| transform    | per (64, g) tile: x split into three bfloat16 pieces (x = p0 + p1 + p2 exactly for normal float32), `plgpu.wgmma` of each against the ±1 matrix H_g (exact products) accumulating in float32, times 2^(−k/2) |
| quantize     | v·(1/s) (the division convention of `pallas_kernels.quantize`), RNE, clamp [−2^(b−1), 2^(b−1)−1] |
| output       | codes (int8, or float8_e4m3fn for the FP8 GEMM; exact) and the step        |
| shapes       | x (..., D) float32/bfloat16, rows a multiple of 64; D a multiple of g and of the column block; g in {16, 32, 64, 128} |

Exactness: the float32 sums of the transform are not bit-identical to XLA's
matmul (`reference`), so a code can differ by one where v/s lies within a few
float32 ulps of a rounding boundary; elsewhere the codes are equal (tested
with that exact exclusion rule).

NaN policy: codes of non-finite transformed values are 0 (a NaN spreads over
its whole Hadamard block), and the returned scale is NaN if any transformed
value of the tensor is non-finite (a per-tile flag written by the kernel), as
`qtrain.quantize` does with a given scale.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from qtrain import formats as fmts
from qtrain.qarray import QArray
from qtrain.quantize import check_float
from pallas_kernels import _common
from pallas_kernels import quantize as pq

__all__ = ['TuningConfig', 'can_use', 'hadamard_matrix', 'hadamard_quantize', 'reference',
           'gpu_checks', 'gpu_timings', 'main', 'BLOCK_SIZES']

BLOCK_SIZES = (16, 32, 64, 128)
_ROWS = 64
_F32_MAX = float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TuningConfig:
  """Columns of x per CTA (a multiple of the Hadamard block, at most 256; clipped to D)."""
  block_cols: int = 128

  def __post_init__(self):
    if not 16 <= self.block_cols <= 256:
      raise ValueError(f'block_cols={self.block_cols} must be in [16, 256].')


def hadamard_matrix(block_size: int, *, normalized: bool = True) -> np.ndarray:
  """Sylvester Hadamard matrix H_k of size g = 2^k (float32), orthogonal if normalized.

  Args:
    block_size: g, a power of two >= 1.
    normalized: (1/√2)^k·(±1 entries) if True (H_k of the paper), else the ±1 matrix.

  Returns:
    (g, g) float32 numpy array, symmetric.
  """
  if not isinstance(block_size, int) or block_size < 1 or block_size & (block_size - 1):
    raise ValueError(f'block_size={block_size!r} must be a power of two >= 1.')
  h = np.ones((1, 1), np.float64)
  while h.shape[0] < block_size:
    h = np.block([[h, h], [h, -h]])
  if normalized:
    h = h / math.sqrt(block_size)
  return h.astype(np.float32)


def _transforms(minor: int, dtype):
  bits = jnp.dtype(dtype).itemsize * 8
  swizzle = plgpu.find_swizzle(minor * bits)
  return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def _unsupported(shape, dtype, block_size, bits, codes_dtype, tuning) -> str | None:
  if not jnp.issubdtype(dtype, jnp.floating):
    return f'x must be a floating-point array, got dtype {jnp.dtype(dtype)}'
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
    return f'x.dtype={jnp.dtype(dtype)} is not supported; allowed: float32, bfloat16'
  if block_size not in BLOCK_SIZES:
    return f'block_size={block_size!r} is not supported; allowed: {BLOCK_SIZES}'
  if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
    return f'bits={bits!r} is out of range; allowed: 2..8'
  if codes_dtype is not None and jnp.dtype(codes_dtype) not in (
      jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn)):
    return f'codes_dtype={codes_dtype} is not supported; allowed: int8, float8_e4m3fn'
  if codes_dtype is not None and jnp.dtype(codes_dtype) == jnp.dtype(jnp.float8_e4m3fn) and bits > 5:
    return f'float8_e4m3fn holds int codes of <= 5 bits exactly, got bits={bits}'
  if len(shape) < 2:
    return f'x must have rank >= 2, got shape {tuple(shape)}'
  m, d = math.prod(shape[:-1]), shape[-1]
  bn = min(tuning.block_cols, d)
  if m % _ROWS:
    return f'rows M={m} (product of the leading dimensions) must be a multiple of 64'
  if d % block_size or bn % block_size or d % bn:
    return (f'last dimension D={d} must be a multiple of block_size={block_size} and of '
            f'block_cols={bn} (itself a multiple of block_size)')
  return None


def can_use(x, step=None, *, block_size: int = 32, bits: int = 4, codes_dtype=None,
            tuning: TuningConfig = TuningConfig()) -> bool:
  """True if `hadamard_quantize` supports these arguments; never raises."""
  del step
  return _unsupported(tuple(x.shape), x.dtype, block_size, bits, codes_dtype, tuning) is None


def _kernel_call(x2d: jax.Array, inv: jax.Array, *, g: int, bits: int, out_dtype,
                 tuning: TuningConfig, interpret: bool):
  m, d = x2d.shape
  bn = min(tuning.block_cols, d)
  qmin, qmax = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
  # (x @ H±1) · 2^(-k/2) · (1/s): the normalization folded into one float32 factor per step.
  norm = np.float32(1.0 / math.sqrt(g))

  def _hadamard_quantize_kernel(x_gmem, h_gmem, inv_gmem, o_gmem, flag_gmem):
    def scoped(x_smem, h_smem, inv_smem, a_smem, o_smem, flag_smem, bar):
      i = lax.axis_index('m')
      j = lax.axis_index('n')
      plgpu.copy_gmem_to_smem(x_gmem.at[pl.ds(i * _ROWS, _ROWS), pl.ds(j * bn, bn)], x_smem, bar)
      plgpu.copy_gmem_to_smem(h_gmem, h_smem, bar)
      plgpu.copy_gmem_to_smem(inv_gmem, inv_smem, bar)
      plgpu.barrier_wait(bar)
      factor = inv_smem[0] * norm
      worst = None
      for c in range(bn // g):  # static: at most 16 blocks of the transform per CTA
        cols = pl.ds(c * g, g)
        x = x_smem[:, cols].astype(jnp.float32)
        # Three bfloat16 pieces hold a normal float32 exactly; their products with ±1 are exact.
        p0 = x.astype(jnp.bfloat16)
        r = x - p0.astype(jnp.float32)
        p1 = r.astype(jnp.bfloat16)
        p2 = (r - p1.astype(jnp.float32)).astype(jnp.bfloat16)

        def transform(acc_ref, pieces=(p0, p1, p2)):
          for p in pieces:
            a_smem[...] = p
            plgpu.commit_smem()
            plgpu.wgmma(acc_ref, a_smem, h_smem)
            plgpu.wgmma_wait(0)  # a_smem is rewritten by the next piece
          return acc_ref[...]

        v = pl.run_scoped(transform, plgpu.ACC((_ROWS, g), jnp.float32)) * factor
        q = jnp.clip(jnp.round(v), qmin, qmax)
        q = jnp.where(q == 0, jnp.zeros_like(q), q)  # no -0 codes (fp8 carrier)
        a = jnp.abs(v)
        o_smem[:, cols] = jnp.where(a <= _F32_MAX, q, jnp.zeros_like(q)).astype(out_dtype)
        # Per-row max|v| with NaN -> +Inf: the wrapper's non-finite flag.
        row = jnp.max(jnp.where(a == a, a, jnp.inf), axis=1)
        worst = row if worst is None else jnp.maximum(worst, row)
      flag_smem[...] = worst
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(i * _ROWS, _ROWS), pl.ds(j * bn, bn)])
      plgpu.copy_smem_to_gmem(flag_smem, flag_gmem.at[j, pl.ds(i * _ROWS, _ROWS)])
      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(
        scoped, plgpu.SMEM((_ROWS, bn), x2d.dtype),
        plgpu.SMEM((g, g), jnp.bfloat16, transforms=_transforms(g, jnp.bfloat16)),
        plgpu.SMEM((4,), jnp.float32),
        plgpu.SMEM((_ROWS, g), jnp.bfloat16, transforms=_transforms(g, jnp.bfloat16)),
        plgpu.SMEM((_ROWS, bn), out_dtype), plgpu.SMEM((_ROWS,), jnp.float32),
        plgpu.Barrier(num_arrivals=3))

  call = plgpu.kernel(
      _hadamard_quantize_kernel,
      out_type=(jax.ShapeDtypeStruct((m, d), out_dtype),
                jax.ShapeDtypeStruct((d // bn, m), jnp.float32)),
      grid=(m // _ROWS, d // bn), grid_names=('m', 'n'),
      interpret=_common.interpret_params(interpret))
  h = jnp.asarray(hadamard_matrix(g, normalized=False), jnp.bfloat16)
  return call(x2d, h, jnp.broadcast_to(inv, (4,)))


def _as_step(step) -> jax.Array:
  check_float(step, 'step')
  step = jnp.asarray(step, jnp.float32)
  if step.size != 1:
    raise ValueError(f'step must be a per-tensor scalar, got shape {step.shape}.')
  return step.reshape(())


def hadamard_quantize(x: jax.Array, step: jax.Array | float, *, block_size: int = 32,
                      bits: int = 4, codes_dtype=None, tuning: TuningConfig = TuningConfig(),
                      interpret: bool = False) -> QArray:
  """int_s(X·Ĥ): block Hadamard along the last axis, then LSQ quantization, fused.

  Args:
    x: (..., D) float32/bfloat16; prod(leading) a multiple of 64, D a multiple
      of `block_size` and of the column block.
    step: the per-tensor LSQ step s (positive scalar, float).
    block_size: g = 2^k in {16, 32, 64, 128} (the paper's typical g is 32).
    bits: code width; codes in [−2^(bits−1), 2^(bits−1)−1] (4: the code's [−8, 7]).
    codes_dtype: None/int8, or float8_e4m3fn (bits <= 5) for the FP8 GEMM.
    tuning: columns per CTA.
    interpret: GPU-interpret mode (CPU).

  Returns:
    `QArray` of `IntFormat(bits)`, codes of x's shape (values of X·Ĥ in code
    units), scale = step of shape (1,)*ndim (NaN if a transformed value is
    non-finite).

  Raises:
    TypeError: `x` or `step` not floating.
    ValueError: unsupported shape, block_size, bits or codes_dtype (named), or
      a non-scalar step.

  References:
    Xi et al., "Training Transformers with 4-bit Integers", §3.3 (HQ) and §3.1
    (LSQ); official code `quantize.py::QLinear.forward` and the
    `quantize_forward_easy` kernel (clamp to [−8, 7]).
  """
  check_float(x)
  step = _as_step(step)
  why = _unsupported(tuple(x.shape), x.dtype, block_size, bits, codes_dtype, tuning)
  if why:
    raise ValueError(f'hadamard_quantize: {why}.')
  out_dtype = jnp.dtype(jnp.int8 if codes_dtype is None else codes_dtype)
  m, d = math.prod(x.shape[:-1]), x.shape[-1]
  inv = (1.0 / step).astype(jnp.float32)
  codes, worst = _kernel_call(x.reshape(m, d), inv, g=block_size, bits=bits,
                              out_dtype=out_dtype, tuning=tuning, interpret=interpret)
  finite = jnp.all(worst <= _F32_MAX) & jnp.isfinite(step)
  scale = jnp.where(finite, step, jnp.nan).reshape((1,) * x.ndim)
  return QArray(codes=codes.reshape(x.shape), scale=scale, format=fmts.IntFormat(bits=bits),
                dtype=x.dtype)


def reference(x: jax.Array, step, *, block_size: int = 32, bits: int = 4,
              codes_dtype=None) -> QArray:
  """Plain jnp: v = x.reshape(..., D/g, g) @ H_g (float32, HIGHEST), q = clamp(round(v·(1/s)))."""
  check_float(x)
  step = _as_step(step)
  g = block_size
  h = jnp.asarray(hadamard_matrix(g))
  x32 = x.astype(jnp.float32)
  v = jnp.matmul(x32.reshape(x.shape[:-1] + (x.shape[-1] // g, g)), h,
                 precision=lax.Precision.HIGHEST).reshape(x.shape)
  units = v * (1.0 / step)
  q = jnp.clip(jnp.round(units), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
  finite = jnp.isfinite(units)
  q = jnp.where(finite, q, 0).astype(jnp.int8 if codes_dtype is None else codes_dtype)
  scale = jnp.where(jnp.all(finite) & jnp.isfinite(step), step, jnp.nan)
  return QArray(codes=q, scale=scale.reshape((1,) * x.ndim), format=fmts.IntFormat(bits=bits),
                dtype=x.dtype)


def boundary_units(x: jax.Array, step, block_size: int) -> np.ndarray:
  """v/s in float64 (numpy): the exact code units, used to find near-tie elements in checks."""
  xs = np.asarray(x, np.float64)
  h = hadamard_matrix(block_size, normalized=False).astype(np.float64) / math.sqrt(block_size)
  v = (xs.reshape(xs.shape[:-1] + (xs.shape[-1] // block_size, block_size)) @ h).reshape(xs.shape)
  return v / float(step)


def count_mismatches(got: QArray, x, step, block_size: int, bits: int,
                     atol: float = 1e-4) -> tuple[int, int]:
  """(mismatches away from rounding boundaries, near-boundary elements) vs exact float64 codes."""
  u = boundary_units(x, step, block_size)
  want = np.clip(np.round(u), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
  frac = np.abs(u - np.floor(u) - 0.5)
  near = (frac < atol * np.maximum(1.0, np.abs(u))) & (np.abs(u) < 2 ** (bits - 1) + 1)
  codes = np.asarray(got.codes.astype(jnp.float32), np.float64)
  return int(np.sum((codes != want) & ~near)), int(np.sum(near))


# ---------------------------------------------------------------------------------------------
# GPU checks and benchmark.


def gpu_checks() -> list[dict]:
  """Kernel vs exact float64 codes (away from ties) and vs `reference` on fresh random inputs."""
  rows = []
  key = jax.random.key(int(time.time()))
  for shape in ((256, 1024), (4, 128, 768), (8192, 4096)):
    for g in (32, 128):
      key, sub = jax.random.split(key)
      x = jax.random.normal(sub, shape, jnp.float32)
      step = float(2 * jnp.mean(jnp.abs(x)) / math.sqrt(7))  # the code's LSQ init
      got = jax.jit(lambda x, g=g: hadamard_quantize(x, step, block_size=g))(x)
      off, near = count_mismatches(got, x, step, g, 4)
      ref = jax.jit(lambda x, g=g: reference(x, step, block_size=g))(x)
      diff = int(jnp.sum(got.codes != ref.codes))
      rows.append(dict(name=f'hadamard_quantize/g{g}', shape=shape, mismatches=off,
                       near_ties=near, mismatches_vs_reference=diff, passed=off == 0))
  return rows


def gpu_timings() -> list[dict]:
  """Median time and HBM bandwidth (x in, int8 codes out) against a copy of the same bytes."""
  rows = []
  for shape in ((8192, 4096), (16384, 8192)):
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32)
    for g in (32, 128):
      moved = x.size * (x.dtype.itemsize + 1)
      rows.append(pq.timing_row(
          f'hadamard_quantize/g{g}', shape, lambda x, g=g: hadamard_quantize(x, 0.1, block_size=g),
          x, moved, lambda x, g=g: reference(x, 0.1, block_size=g)))
  return rows


def main(argv=None) -> None:
  """Benchmark on a Hopper GPU, or a CUDA lowering smoke test on CPU."""
  del argv
  if not _common.is_hopper():
    x = jax.ShapeDtypeStruct((8192, 4096), jnp.float32)
    for g in BLOCK_SIZES:
      _common.lower_for_cuda(lambda x, g=g: hadamard_quantize(x, 0.1, block_size=g), x)
      print(f'g={g}: lowers for CUDA at {x.shape}')
    return
  for row in gpu_checks() + gpu_timings():
    print(row)


if __name__ == '__main__':
  main(sys.argv)
