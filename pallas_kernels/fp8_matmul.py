"""4-bit GEMMs on Hopper FP8 tensor cores (e4m3/e5m2 wgmma -> f32) with scales in the epilogue.

Hopper has no INT4 MMA, but the 4-bit codes of qtrain's papers are exact in
float8_e4m3fn (DESIGN.md §4, `qtrain.dot.gemm_dtypes`), so their GEMMs run
as FP8 wgmma at 2x the bf16 rate:

| codes (paper)                      | values                 | carrier      |
|------------------------------------|------------------------|--------------|
| INT4 (LUQ fwd, Ultra-low fwd, Xi)  | -8 ... 7               | e4m3         |
| radix-2 log FP4 (LUQ bwd)          | 0, ±2^0 ... ±2^7       | e4m3 or e5m2 |
| radix-4 FP4 (Ultra-low bwd)        | 0, ±4^-3 ... ±4^3      | e4m3 or e5m2 |

out[i, j] = (sum_k a[i, k] * b[k, j] in f32) * (a_scale[i] * b_scale[j]),
with the scale shapes and the `b_layout` of `int8_matmul` (a [M, K]; b [K, N]
or [N, K]); any mix of e4m3 and e5m2 operands (wgmma accepts mixed FP8).
The kernel is `_common.wgmma_matmul` with an f32 `plgpu.ACC`.

Exactness: each product of two 4-bit codes is exact in f32; the sum is
exact while every partial sum fits f32's 24-bit significand (INT4 x INT4:
|a·b| <= 64, so K < 2^18; log codes: K·2^14 < 2^24). Interpret mode then
equals `reference()` bit for bit. On the GPU the FP8 wgmma accumulator keeps
fewer bits than f32 (DeepSeek-V3 report, §3.3.2: about 14 bits on H800), so
GPU results are checked against the bound |err| <= 2^-12 · sum_k |a·b| · scale
(+ one bf16 rounding for bf16 output).

Not done: packed int4 input (`qtrain.pack_int4` puts element 2i in the low
and 2i+1 in the high nibble of a byte). Unpacking needs an interleave of two
register vectors in the WGMMA operand layout, which Mosaic GPU 0.11.2 does
not offer; operands are unpacked by XLA to e4m3 (1 byte/element) first.
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

__all__ = ['Fp8MatmulTuning', 'DEFAULT_TUNING', 'CANDIDATES', 'FP8_DTYPES', 'can_use',
           'fp8_matmul', 'reference', 'error_bound', 'gpu_checks', 'gpu_timings', 'main']

FP8_DTYPES = (jnp.float8_e4m3fn, jnp.float8_e5m2)
_ALLOWED = tuple((x, y) for x in FP8_DTYPES for y in FP8_DTYPES)
_OUT = (jnp.float32, jnp.bfloat16)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fp8MatmulTuning(_common.WgmmaTuning):
  """Tiling of the FP8 kernel (see `_common.WgmmaTuning`); tile_k=128 is one 128-byte row."""
  tile_k: int = 128


DEFAULT_TUNING = Fp8MatmulTuning()
CANDIDATES = (DEFAULT_TUNING,
              Fp8MatmulTuning(grid_tile_width=16),
              Fp8MatmulTuning(grid_minor_dim='m', grid_tile_width=4),
              Fp8MatmulTuning(tile_n=64))


def _check(a_shape, b_shape, a_dtype, b_dtype, out_dtype, b_layout, tuning):
  if jnp.dtype(out_dtype) not in [jnp.dtype(d) for d in _OUT]:
    raise ValueError(f'out_dtype={jnp.dtype(out_dtype).name} must be float32 or bfloat16.')
  return _common.check_gemm(a_shape, b_shape, a_dtype, b_dtype, out_dtype, tuning,
                            allowed=_ALLOWED, b_layout=b_layout, name='fp8_matmul')


def can_use(a, b, *, out_dtype=jnp.float32, b_layout: str = 'kn',
            tuning: Fp8MatmulTuning | None = None, interpret: bool = False) -> bool:
  """True if `fp8_matmul` runs these operands here (see `int8_matmul.can_use`)."""
  if not interpret and not _common.is_hopper():
    return False
  try:
    _check(a.shape, b.shape, a.dtype, b.dtype, out_dtype, b_layout, tuning or DEFAULT_TUNING)
  except ValueError:
    return False
  return True


def fp8_matmul(a: jax.Array, b: jax.Array, *, a_scale=None, b_scale=None,
               out_dtype=jnp.float32, b_layout: str = 'kn',
               tuning: Fp8MatmulTuning | None = None, interpret=False) -> jax.Array:
  """Scaled FP8 GEMM: (a @ b in f32) * a_scale * b_scale, on Hopper wgmma.

  Args:
    a: float8_e4m3fn or float8_e5m2 [M, K] (e.g. 4-bit codes cast exactly).
    b: float8_e4m3fn or float8_e5m2, [K, N] (`b_layout='kn'`) or [N, K] ('nk').
    a_scale: None (1), per-tensor ([] / [1]) or per-row ([M] / [M, 1]) float scales.
    b_scale: None, per-tensor or per-column ([N] / [1, N]) float scales.
    out_dtype: float32 or bfloat16.
    b_layout: 'kn' or 'nk'.
    tuning: `Fp8MatmulTuning` (default `DEFAULT_TUNING`).
    interpret: True (or `plgpu.InterpretGPUParams`): Mosaic GPU interpret mode.

  Returns:
    [M, N] array of out_dtype (exactness: module docstring).

  Raises:
    ValueError: non-FP8 operands, wrong ranks, K mismatch, a dimension that is
      not a multiple of its tile (named in the message), bad out_dtype,
      b_layout, scale shape or tiling.
  """
  tuning = tuning or DEFAULT_TUNING
  m, n, _ = _check(a.shape, b.shape, a.dtype, b.dtype, out_dtype, b_layout, tuning)
  bt = b.T if b_layout == 'kn' else b
  rs = _common.as_vector(a_scale, m, 'a_scale', 'row of a (M)')
  cs = _common.as_vector(b_scale, n, 'b_scale', 'column of b (N)')
  return _common.wgmma_matmul(a, bt, rs, cs, acc_dtype=jnp.float32, out_dtype=out_dtype,
                              tuning=tuning, interpret=interpret)


def reference(a: jax.Array, b: jax.Array, *, a_scale=None, b_scale=None, out_dtype=jnp.float32,
              b_layout: str = 'kn') -> jax.Array:
  """XLA version of `fp8_matmul` (same arguments): f32 `dot_general`, then one scale multiply."""
  dims = (((1,), (0,) if b_layout == 'kn' else (1,)), ((), ()))
  acc = lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
  m, n = acc.shape
  rs = _common.as_vector(a_scale, m, 'a_scale', 'row of a (M)')
  cs = _common.as_vector(b_scale, n, 'b_scale', 'column of b (N)')
  return (acc * (rs[:, None] * cs[None, :])).astype(out_dtype)


def error_bound(a, b, *, a_scale=None, b_scale=None, out_dtype=jnp.float32,
                b_layout: str = 'kn') -> jax.Array:
  """Per-element GPU tolerance: 2^-12 · sum_k |a·b| · |scale| (+ 2^-8 |ref| for bf16 out)."""
  absum = reference(jnp.abs(a.astype(jnp.float32)).astype(jnp.float32),
                    jnp.abs(b.astype(jnp.float32)), a_scale=a_scale, b_scale=b_scale,
                    b_layout=b_layout)
  bound = jnp.abs(absum) * 2.0 ** -12
  if jnp.dtype(out_dtype) == jnp.dtype(jnp.bfloat16):
    bound = bound + 2.0 ** -8 * jnp.abs(absum)
  return bound


# ---------------------------------------------------------------------------
# GPU check hooks (benchmarks/gpu_check.py) and benchmark
# ---------------------------------------------------------------------------
def log2_codes(key, shape, dtype) -> jax.Array:
  """Random signed radix-2 log FP4 codes {0, ±2^0..±2^7} (LUQ's gradient grid) as `dtype`."""
  ke, ks, kz = jax.random.split(key, 3)
  mag = 2.0 ** jax.random.randint(ke, shape, 0, 8).astype(jnp.float32)
  sign = jnp.where(jax.random.bernoulli(ks, 0.5, shape), -1.0, 1.0)
  zero = jax.random.bernoulli(kz, 0.1, shape)
  return jnp.where(zero, 0.0, sign * mag).astype(dtype)


def _inputs(key, m, n, k, b_dtype=jnp.float8_e4m3fn):
  """INT4 codes (a) x log FP4 codes (b, [N, K]) with per-row/column scales."""
  ka, kb, kr, kc = jax.random.split(key, 4)
  a = _common.random_codes(ka, (m, k), jnp.float8_e4m3fn, -8, 7)
  bt = log2_codes(kb, (n, k), b_dtype)
  rs = jax.random.uniform(kr, (m,), jnp.float32, 1e-3, 2e-3)
  cs = jax.random.uniform(kc, (n,), jnp.float32, 1e-3, 2e-3)
  return a, bt, rs, cs


def gpu_checks(dry_run: bool = False) -> list[dict]:
  """Kernel vs `reference` on fresh 4-bit codes (INT4 x log FP4; e4m3 and e5m2 carriers).

  Returns:
    Rows {kernel, m, n, k, b_dtype, scales, out_dtype, max_abs_err, exact,
    ok}: ok means within `error_bound` on a GPU and bit for bit in interpret
    mode.
  """
  interpret = dry_run or not _common.is_hopper()
  shapes = [(128, 256, 256)] if dry_run else [(128, 256, 256), (1024, 1024, 1024),
                                              (2048, 4096, 1536), (4096, 4096, 4096)]
  rows = []
  for i, (m, n, k) in enumerate(shapes):
    for b_dtype in FP8_DTYPES[:1] if dry_run else FP8_DTYPES:
      a, bt, rs, cs = _inputs(jax.random.key(200 + i), m, n, k, b_dtype)
      cases = [('tensor', rs[:1], cs[:1], jnp.float32), ('row+column', rs, cs, jnp.bfloat16)]
      for scales, sa, sb, od in cases:
        kw = dict(a_scale=sa, b_scale=sb, out_dtype=od, b_layout='nk')
        got = jax.jit(functools.partial(fp8_matmul, interpret=interpret, **kw))(a, bt)
        want = reference(a, bt, **kw)
        diff = jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))
        exact = bool(jnp.array_equal(got, want))
        within = bool(jnp.all(diff <= error_bound(a, bt, **kw)))
        rows.append(dict(kernel='fp8_matmul', m=m, n=n, k=k, b_dtype=jnp.dtype(b_dtype).name,
                         scales=scales, out_dtype=jnp.dtype(od).name,
                         max_abs_err=float(jnp.max(diff)), exact=exact,
                         ok=exact if interpret else within,
                         tolerance='bit-exact' if interpret else '2^-12 sum|ab| scale'))
  return rows


def gpu_timings(dry_run: bool = False) -> list[dict]:
  """Kernel (bf16 out, row+column scales) vs XLA bf16 dot and XLA fp8 dot + scales."""
  interpret = dry_run or not _common.is_hopper()

  def run_kernel(tuning, a, bt, rs, cs):
    return fp8_matmul(a, bt, a_scale=rs, b_scale=cs, out_dtype=jnp.bfloat16, b_layout='nk',
                      tuning=tuning, interpret=interpret)

  def run_xla(a, bt, rs, cs):
    return reference(a, bt, a_scale=rs, b_scale=cs, out_dtype=jnp.bfloat16, b_layout='nk')

  cands = CANDIDATES[:1] if dry_run else CANDIDATES
  return _common.benchmark_gemm('fp8_matmul', _inputs, run_kernel, run_xla, dry_run=dry_run,
                                candidates=cands)


def main(argv=None) -> None:
  """`python -m pallas_kernels.fp8_matmul [--dry-run]`: checks and timings as JSON lines."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--dry-run', action='store_true', help='interpret mode, tiny shapes')
  args = parser.parse_args(argv)
  for row in gpu_checks(args.dry_run) + gpu_timings(args.dry_run):
    print(json.dumps(row))


if __name__ == '__main__':
  main()
