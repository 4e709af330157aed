"""INT8 GEMM on Hopper tensor cores (s8 x s8 -> s32 wgmma) with dequantization in the epilogue.

out[i, j] = (sum_k a[i, k] * b[k, j]) * (a_scale[i] * b_scale[j])

| scale      | shape accepted             | meaning                         |
|------------|----------------------------|---------------------------------|
| per tensor | [] or [1] (or None = 1)    | one scale for the operand       |
| per row    | a_scale [M] or [M, 1]      | one scale per row of a          |
| per column | b_scale [N] or [1, N]      | one scale per column of b       |

Layout: a is [M, K] int8 (row-major, K-major for wgmma). b is [K, N] int8
(`b_layout='kn'`, transposed to [N, K] by XLA before the kernel, since 8-bit
wgmma needs a K-major B) or already [N, K] (`b_layout='nk'`, no copy; what a
weight stored as [out, in] or the dX = dY·Wᵀ GEMM gives for free).

The kernel (`_common.wgmma_matmul`): warp-specialised persistent Mosaic GPU
kernel (`plgpu.kernel`, `plgpu.emit_pipeline_warp_specialized`, `plgpu.wgmma`
into an s32 `plgpu.ACC`, TMA loads/stores), 128x256 output tile per CTA by
default. The s32 accumulator is exact (|a·b| <= 2^14, so K < 2^17 terms
never overflow); the epilogue converts it to f32 (exact below 2^24, rounded
to nearest above, as XLA's `astype` does) and multiplies once by the
combined scale, so the f32 output equals `reference()` bit for bit, and the
bf16 output is that value rounded once. `out_dtype=int32` (no scales)
stores the raw accumulator.

On CPU the kernel runs in Mosaic GPU interpret mode (`interpret=True`); on
other GPUs `can_use` is False and `pallas_kernels.dispatch` uses XLA.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import _common

__all__ = ['Int8MatmulTuning', 'DEFAULT_TUNING', 'CANDIDATES', 'can_use', 'int8_matmul',
           'reference', 'gpu_checks', 'gpu_timings', 'main']

_ALLOWED = ((jnp.int8, jnp.int8),)
_OUT = (jnp.float32, jnp.bfloat16, jnp.int32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Int8MatmulTuning(_common.WgmmaTuning):
  """Tiling of the INT8 kernel (see `_common.WgmmaTuning`); tile_k=128 is one 128-byte row."""
  tile_k: int = 128


DEFAULT_TUNING = Int8MatmulTuning()
# Tried by the GPU check at every benchmark shape (fastest reported).
CANDIDATES = (DEFAULT_TUNING,
              Int8MatmulTuning(grid_tile_width=16),
              Int8MatmulTuning(grid_minor_dim='m', grid_tile_width=4),
              Int8MatmulTuning(tile_n=64))


def _check(a_shape, b_shape, a_dtype, b_dtype, out_dtype, b_layout, tuning, scaled):
  if jnp.dtype(out_dtype) not in [jnp.dtype(d) for d in _OUT]:
    raise ValueError(f'out_dtype={jnp.dtype(out_dtype).name} must be float32, bfloat16 or int32.')
  if jnp.dtype(out_dtype) == jnp.dtype(jnp.int32) and scaled:
    raise ValueError('out_dtype=int32 returns the raw accumulator: a_scale and b_scale must be '
                     'None.')
  return _common.check_gemm(a_shape, b_shape, a_dtype, b_dtype, out_dtype, tuning,
                            allowed=_ALLOWED, b_layout=b_layout, name='int8_matmul')


def can_use(a, b, *, out_dtype=jnp.float32, b_layout: str = 'kn',
            tuning: Int8MatmulTuning | None = None, interpret: bool = False) -> bool:
  """True if `int8_matmul` runs these operands here (else dispatch falls back to XLA).

  Args:
    a, b: arrays or `jax.ShapeDtypeStruct`s (only shape and dtype are read).
    out_dtype, b_layout, tuning: as in `int8_matmul`.
    interpret: True skips the platform check (interpret mode runs anywhere);
      False needs a Hopper (sm_90) GPU.

  Returns:
    Whether shapes, dtypes and tiling are supported (and the platform, unless
    interpret).
  """
  if not interpret and not _common.is_hopper():
    return False
  try:
    _check(a.shape, b.shape, a.dtype, b.dtype, out_dtype, b_layout, tuning or DEFAULT_TUNING,
           scaled=False)
  except ValueError:
    return False
  return True


def int8_matmul(a: jax.Array, b: jax.Array, *, a_scale=None, b_scale=None,
                out_dtype=jnp.float32, b_layout: str = 'kn',
                tuning: Int8MatmulTuning | None = None, interpret=False) -> jax.Array:
  """Scaled INT8 GEMM: (a @ b in int32) * a_scale * b_scale, on Hopper wgmma.

  Args:
    a: int8 [M, K].
    b: int8 [K, N] (`b_layout='kn'`) or [N, K] (`b_layout='nk'`).
    a_scale: None (1), a per-tensor scale ([] or [1]) or per-row scales
      ([M] or [M, 1]); float.
    b_scale: None, per-tensor, or per-column scales ([N] or [1, N]); float.
    out_dtype: float32, bfloat16, or int32 (raw accumulator; no scales).
    b_layout: 'kn' or 'nk' (module docstring).
    tuning: `Int8MatmulTuning` (default `DEFAULT_TUNING`).
    interpret: True (or `plgpu.InterpretGPUParams`) runs Mosaic GPU interpret
      mode, e.g. on CPU.

  Returns:
    [M, N] array of out_dtype; equal to `reference(...)` bit for bit.

  Raises:
    ValueError: non-int8 operands, wrong ranks, K mismatch, M/N/K not a
      multiple of the tile (the message names the dimension and the tile), a
      bad out_dtype/b_layout/scale shape or tiling.
  """
  tuning = tuning or DEFAULT_TUNING
  scaled = a_scale is not None or b_scale is not None
  m, n, _ = _check(a.shape, b.shape, a.dtype, b.dtype, out_dtype, b_layout, tuning, scaled)
  bt = b.T if b_layout == 'kn' else b
  if jnp.dtype(out_dtype) == jnp.dtype(jnp.int32):
    rs = cs = None
  else:
    rs = _common.as_vector(a_scale, m, 'a_scale', 'row of a (M)')
    cs = _common.as_vector(b_scale, n, 'b_scale', 'column of b (N)')
  return _common.wgmma_matmul(a, bt, rs, cs, acc_dtype=jnp.int32, out_dtype=out_dtype,
                              tuning=tuning, interpret=interpret)


def reference(a: jax.Array, b: jax.Array, *, a_scale=None, b_scale=None, out_dtype=jnp.float32,
              b_layout: str = 'kn') -> jax.Array:
  """XLA version of `int8_matmul` (same arguments): int32 `dot_general`, then one scale multiply."""
  dims = (((1,), (0,) if b_layout == 'kn' else (1,)), ((), ()))
  acc = lax.dot_general(a, b, dims, preferred_element_type=jnp.int32)
  if jnp.dtype(out_dtype) == jnp.dtype(jnp.int32):
    return acc
  m, n = acc.shape
  rs = _common.as_vector(a_scale, m, 'a_scale', 'row of a (M)')
  cs = _common.as_vector(b_scale, n, 'b_scale', 'column of b (N)')
  return (acc.astype(jnp.float32) * (rs[:, None] * cs[None, :])).astype(out_dtype)


# ---------------------------------------------------------------------------
# GPU check hooks (benchmarks/gpu_check.py) and benchmark
# ---------------------------------------------------------------------------
def _inputs(key, m, n, k):
  ka, kb, kr, kc = jax.random.split(key, 4)
  a = _common.random_codes(ka, (m, k), jnp.int8, -127, 127)
  bt = _common.random_codes(kb, (n, k), jnp.int8, -127, 127)
  rs = jax.random.uniform(kr, (m,), jnp.float32, 1e-3, 2e-3)
  cs = jax.random.uniform(kc, (n,), jnp.float32, 1e-3, 2e-3)
  return a, bt, rs, cs


def gpu_checks(dry_run: bool = False) -> list[dict]:
  """Kernel vs `reference` on fresh random codes: several shapes, scale kinds, out dtypes.

  Returns:
    Rows {kernel, m, n, k, scales, out_dtype, max_abs_err, ok}; ok means bit
    for bit equal (integer accumulation; the epilogue is the same f32 ops).
  """
  interpret = dry_run or not _common.is_hopper()
  shapes = [(128, 256, 256)] if dry_run else [(128, 256, 256), (1024, 1024, 1024),
                                              (2048, 4096, 1536), (4096, 4096, 4096)]
  rows = []
  for i, (m, n, k) in enumerate(shapes):
    a, bt, rs, cs = _inputs(jax.random.key(100 + i), m, n, k)
    cases = [('tensor', rs[:1], cs[:1], jnp.float32), ('row+column', rs, cs, jnp.bfloat16),
             ('row+column', rs, cs, jnp.float32), ('none', None, None, jnp.int32)]
    for scales, sa, sb, od in cases[:2] if dry_run else cases:
      run = jax.jit(functools.partial(int8_matmul, a_scale=sa, b_scale=sb, out_dtype=od,
                                      b_layout='nk', interpret=interpret))
      got = run(a, bt)
      want = reference(a, bt, a_scale=sa, b_scale=sb, out_dtype=od, b_layout='nk')
      err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))))
      rows.append(dict(kernel='int8_matmul', m=m, n=n, k=k, scales=scales,
                       out_dtype=jnp.dtype(od).name, max_abs_err=err,
                       ok=bool(jnp.array_equal(got, want)), tolerance='bit-exact'))
  return rows


def gpu_timings(dry_run: bool = False) -> list[dict]:
  """Kernel (bf16 out, row+column scales) vs XLA bf16 dot and XLA int8 dot + scales."""
  interpret = dry_run or not _common.is_hopper()

  def run_kernel(tuning, a, bt, rs, cs):
    return int8_matmul(a, bt, a_scale=rs, b_scale=cs, out_dtype=jnp.bfloat16, b_layout='nk',
                       tuning=tuning, interpret=interpret)

  def run_xla(a, bt, rs, cs):
    return reference(a, bt, a_scale=rs, b_scale=cs, out_dtype=jnp.bfloat16, b_layout='nk')

  cands = CANDIDATES[:1] if dry_run else CANDIDATES
  return _common.benchmark_gemm('int8_matmul', _inputs, run_kernel, run_xla, dry_run=dry_run,
                                candidates=cands)


def main(argv=None) -> None:
  """`python -m pallas_kernels.int8_matmul [--dry-run]`: checks and timings as JSON lines."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dry-run', action='store_true', help='interpret mode, tiny shapes')
  args = parser.parse_args(argv)
  for row in gpu_checks(args.dry_run) + gpu_timings(args.dry_run):
    print(json.dumps(row))


if __name__ == '__main__':
  main()
