"""Shared pieces of the Hopper GEMM kernels: tuning, validation, wgmma body, interpret, lowering.

`int8_matmul` (s8 x s8 -> s32) and `fp8_matmul` (e4m3/e5m2 -> f32) are the
same kernel with different operand and accumulator dtypes, so its body lives
here once (`wgmma_matmul`); each kernel module adds its tuning defaults,
`can_use`, wrapper, reference and benchmark.

| piece                | what                                                                    |
|----------------------|-------------------------------------------------------------------------|
| `WgmmaTuning`        | tile sizes, pipeline depth, epilogue tiles, tile order, CTA count       |
| `check_gemm`         | shape/dtype/tiling validation; ValueError naming the dimension          |
| `wgmma_matmul`       | the kernel: warp-specialised, persistent, TMA-pipelined wgmma + scales  |
| `interpret_params`   | `interpret=True` -> `plgpu.InterpretGPUParams()` (GPU-interpret on CPU) |
| `lower_for_cuda`     | cross-lowers a function for an H100 without a GPU (CI gate)             |
| `is_hopper`          | the platform check of every `can_use`                                   |
| `time_ms`            | median wall time of a jitted call (used by the GPU check script)        |

Kernel design (after `jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu`,
re-written for 8-bit operands): a persistent grid of one CTA per SM walks the
output tiles in a planar-snake order; in each CTA one producer warpgroup
streams A [tile_m, tile_k] and B [2*tile_n, tile_k] tiles by TMA into a
`max_concurrent_steps`-deep SMEM ring (`plgpu.emit_pipeline_warp_specialized`)
and two consumer warpgroups each run `plgpu.wgmma` on a [tile_m, tile_n] half
with the accumulator in registers (`plgpu.ACC`, s32 or f32). 8-bit wgmma needs
both operands K-major, so B is stored [N, K] and passed as `b_smem.T`
(gpu-kernels.md §2.2). The epilogue converts the accumulator to f32, multiplies
by `row_scale[i] * col_scale[j]` (loaded by TMA into SMEM while the main loop
runs, then into registers in the WGMMA row/column layouts), casts to the output
dtype and writes [64, epi_tile_n] sub-tiles through a double-buffered SMEM
slot by TMA.

GPU-interpret mode (`interpret=True`) runs the very same kernel on the CPU,
bit for bit for integer accumulation (gpu-kernels.md §2.3); it uses
`lax.axis_index`, never `pl.program_id` (which reads 0 in interpret mode).
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

__all__ = ['WgmmaTuning', 'check_gemm', 'gemm_problems', 'wgmma_matmul', 'interpret_params',
           'lower_for_cuda', 'is_hopper', 'num_sms', 'smem_bytes', 'time_ms', 'as_vector',
           'random_codes', 'benchmark_gemm', 'SMEM_BYTES', 'H100']

# Usable dynamic SMEM per CTA on H100/H200 (227 KiB; the lowering reports 232448).
SMEM_BYTES = 232448
# The abstract device used to cross-lower for CUDA on a machine without a GPU.
H100 = dict(device_kind='NVIDIA H100 80GB HBM3', num_cores=132)
_MAX_AUTO_STAGES = 6


@dataclasses.dataclass(frozen=True, kw_only=True)
class WgmmaTuning:
  """Tiling of the warp-specialised wgmma GEMM (one CTA tile = tile_m x 2*tile_n).

  Attributes:
    tile_m: rows of A per CTA (and per consumer warpgroup); multiple of 64.
    tile_n: columns of the output per consumer warpgroup (two per CTA);
      multiple of epi_tile_n, at most 256.
    tile_k: K per pipeline step; 128 bytes of 8-bit operand (128B swizzle).
    max_concurrent_steps: depth of the SMEM ring; None = the most that fits
      in SMEM (at most 6).
    epi_tile_m, epi_tile_n: output sub-tile written per TMA store (epi_tile_m
      must be 64: the WGMMA register layout is 64 rows per warpgroup).
    grid_minor_dim: 'm' or 'n', the faster-moving tile index of the walk.
    grid_tile_width: width of the planar-snake bands (L2 reuse).
    num_ctas: CTAs of the persistent grid; None = number of SMs (2 in
      interpret mode).
  """
  tile_m: int = 128
  tile_n: int = 128
  tile_k: int = 128
  max_concurrent_steps: int | None = None
  epi_tile_m: int = 64
  epi_tile_n: int = 64
  grid_minor_dim: str = 'n'
  grid_tile_width: int = 8
  num_ctas: int | None = None

  @property
  def cta_tile_n(self) -> int:
    return 2 * self.tile_n

  def check(self) -> None:
    """Raises ValueError naming the field for a tiling the kernel cannot run."""
    for name in ('tile_m', 'tile_n', 'tile_k', 'epi_tile_m', 'epi_tile_n', 'grid_tile_width'):
      v = getattr(self, name)
      if not isinstance(v, int) or v <= 0:
        raise ValueError(f'{name}={v!r} must be a positive int.')
    if self.tile_m % 64:
      raise ValueError(f'tile_m={self.tile_m} must be a multiple of 64 (wgmma M per warpgroup).')
    if self.epi_tile_m != 64:
      raise ValueError(f'epi_tile_m={self.epi_tile_m} must be 64 (one WGMMA row block).')
    if self.tile_n > 256 or self.tile_n % self.epi_tile_n or self.epi_tile_n % 8:
      raise ValueError(f'tile_n={self.tile_n} must be <= 256 and a multiple of epi_tile_n='
                       f'{self.epi_tile_n}, itself a multiple of 8.')
    if self.tile_k % 32:
      raise ValueError(f'tile_k={self.tile_k} must be a multiple of 32 (8-bit wgmma K).')
    if self.grid_minor_dim not in ('m', 'n'):
      raise ValueError(f"grid_minor_dim={self.grid_minor_dim!r} must be 'm' or 'n'.")
    if self.max_concurrent_steps is not None and self.max_concurrent_steps < 1:
      raise ValueError(f'max_concurrent_steps={self.max_concurrent_steps} must be >= 1 or None.')
    if self.num_ctas is not None and self.num_ctas < 1:
      raise ValueError(f'num_ctas={self.num_ctas} must be >= 1 or None.')


def smem_bytes(tuning: WgmmaTuning, in_itemsize: int, out_dtype, stages: int) -> int:
  """SMEM the kernel allocates (ring + epilogue slots + scales), without barriers."""
  t = tuning
  ring = stages * (t.tile_m + t.cta_tile_n) * t.tile_k * in_itemsize
  slots = min(2, (t.tile_m * t.tile_n) // (t.epi_tile_m * t.epi_tile_n))
  out = 2 * slots * t.epi_tile_m * t.epi_tile_n * jnp.dtype(out_dtype).itemsize
  return ring + out + 2 * (t.tile_m + t.tile_n) * 4


def _stages(tuning: WgmmaTuning, in_itemsize: int, out_dtype) -> int:
  if tuning.max_concurrent_steps is not None:
    return tuning.max_concurrent_steps
  slack = 1024  # barriers and alignment
  for s in range(_MAX_AUTO_STAGES, 1, -1):
    if smem_bytes(tuning, in_itemsize, out_dtype, s) + slack <= SMEM_BYTES:
      return s
  return 2


def check_gemm(a_shape, b_shape, a_dtype, b_dtype, out_dtype, tuning: WgmmaTuning, *,
               allowed: tuple, b_layout: str = 'kn', name: str = 'matmul') -> tuple[int, int, int]:
  """Validates a GEMM for the wgmma kernel; returns (M, N, K).

  Raises:
    ValueError: wrong rank, mismatched K, a dimension that is not a multiple
      of its tile (naming the dimension and tile), unsupported dtypes, a bad
      `b_layout`, or a tiling whose SMEM footprint exceeds the H100's.
  """
  tuning.check()
  if b_layout not in ('kn', 'nk'):
    raise ValueError(f"b_layout={b_layout!r} must be 'kn' (b is [K, N]) or 'nk' (b is [N, K]).")
  if len(a_shape) != 2 or len(b_shape) != 2:
    raise ValueError(f'{name}: a and b must be 2-D, got a{tuple(a_shape)} and b{tuple(b_shape)}.')
  m, k = a_shape
  kb, n = b_shape if b_layout == 'kn' else b_shape[::-1]
  if k != kb:
    raise ValueError(f'{name}: K differs: a{tuple(a_shape)} has K={k}, b{tuple(b_shape)} '
                     f'(layout {b_layout!r}) has K={kb}.')
  if (jnp.dtype(a_dtype), jnp.dtype(b_dtype)) not in [(jnp.dtype(x), jnp.dtype(y))
                                                       for x, y in allowed]:
    ok = ', '.join(f'{jnp.dtype(x).name} x {jnp.dtype(y).name}' for x, y in allowed)
    raise ValueError(f'{name}: operand dtypes {jnp.dtype(a_dtype).name} x '
                     f'{jnp.dtype(b_dtype).name} are not supported; allowed: {ok}.')
  for dim, size, tile, field in (('M', m, tuning.tile_m, 'tile_m'),
                                 ('N', n, tuning.cta_tile_n, '2*tile_n'),
                                 ('K', k, tuning.tile_k, 'tile_k')):
    if size <= 0 or size % tile:
      raise ValueError(f'{name}: {dim}={size} is not a multiple of the tile {tile} ({field}).')
  itemsize = jnp.dtype(a_dtype).itemsize
  need = smem_bytes(tuning, itemsize, out_dtype, _stages(tuning, itemsize, out_dtype))
  if need > SMEM_BYTES:
    raise ValueError(f'{name}: tiling {tuning} needs {need} bytes of SMEM > {SMEM_BYTES}; '
                     'lower max_concurrent_steps or the tiles.')
  return m, n, k


def as_vector(scale, size: int, name: str, axis_name: str) -> jax.Array:
  """A per-tensor ([] / [1]) or per-row/column ([size] / [size,1] / [1,size]) scale as f32 [size].

  Raises:
    ValueError: a scale of any other shape (naming `name` and `axis_name`).
    TypeError: a non-float scale.
  """
  if scale is None:
    return jnp.ones((size,), jnp.float32)
  scale = jnp.asarray(scale)
  if not jnp.issubdtype(scale.dtype, jnp.floating):
    raise TypeError(f'{name} must be a float array, got {scale.dtype}.')
  if scale.size == 1:
    return jnp.broadcast_to(scale.reshape(()).astype(jnp.float32), (size,))
  if scale.size == size and max(scale.shape) == size:
    return scale.reshape((size,)).astype(jnp.float32)
  raise ValueError(f'{name} of shape {scale.shape} must be a scalar (per tensor) or hold one '
                   f'value per {axis_name} ({size}).')


def is_hopper() -> bool:
  """True if JAX's default device is an sm_90 GPU (H100/H200/H800/GH200)."""
  if jax.default_backend() != 'gpu':
    return False
  dev = jax.devices()[0]
  cc = getattr(dev, 'compute_capability', None)
  if cc is not None:
    return str(cc).split('.')[0] == '9'
  kind = dev.device_kind.upper()
  return any(h in kind for h in ('H100', 'H200', 'H800', 'H20'))


def num_sms() -> int:
  """SMs of the (abstract, under `lower_for_cuda`) GPU; 132 if unknown."""
  abstract = jax.sharding.get_abstract_mesh().abstract_device
  if abstract is not None:
    return abstract.num_cores
  count = getattr(jax.devices()[0], 'core_count', None)
  return int(count) if count else H100['num_cores']


def interpret_params(interpret) -> Any:
  """`interpret` as `plgpu.kernel` takes it: None, or GPU-interpret params."""
  if interpret is None or interpret is False:
    return None
  if interpret is True:
    return plgpu.InterpretGPUParams()
  if isinstance(interpret, plgpu.InterpretGPUParams):
    return interpret
  raise TypeError(f'interpret must be a bool or plgpu.InterpretGPUParams, got {interpret!r}.')


def lower_for_cuda(fn: Callable, *args, device_kind: str = H100['device_kind'],
                   num_cores: int = H100['num_cores']):
  """`jax.jit(fn).trace(*args).lower(lowering_platforms=('cuda',))` on any machine.

  Runs the Mosaic GPU lowering (dtype/layout checks, SMEM budget) for an
  abstract Hopper device (gpu-kernels.md §2.1). `args` are arrays or
  `jax.ShapeDtypeStruct`s.
  """
  dev = AbstractDevice(device_kind=device_kind, num_cores=num_cores, platform='gpu')
  mesh = AbstractMesh((1,), ('x',), (AxisType.Explicit,), abstract_device=dev)
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=('cuda',))


def _transforms(minor: int, dtype):
  bits = jnp.dtype(dtype).itemsize * 8
  swizzle = plgpu.find_swizzle(minor * bits)
  return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def wgmma_matmul(a: jax.Array, bt: jax.Array, row_scale: jax.Array | None,
                 col_scale: jax.Array | None, *, acc_dtype, out_dtype, tuning: WgmmaTuning,
                 interpret=False) -> jax.Array:
  """out[i, j] = (sum_k a[i, k] * bt[j, k]) (as f32) * (row_scale[i] * col_scale[j]).

  The caller has validated shapes (`check_gemm`). With `out_dtype=int32`
  (integer accumulation only) both scales must be None and the accumulator
  is stored as is.

  Args:
    a: [M, K] 8-bit operand (K-major).
    bt: [N, K] 8-bit operand (K-major, i.e. B transposed).
    row_scale: f32 [M] or None; col_scale: f32 [N] or None.
    acc_dtype: jnp.int32 (int8 operands) or jnp.float32 (fp8 operands).
    out_dtype: float32, bfloat16 (or int32 without scales).
    tuning: the tiling.
    interpret: run in Mosaic GPU interpret mode (CPU).

  Returns:
    [M, N] array of out_dtype.
  """
  t = tuning
  m, k = a.shape
  n = bt.shape[0]
  scaled = jnp.dtype(out_dtype) != jnp.dtype(jnp.int32)
  if not scaled and (row_scale is not None or col_scale is not None):
    raise ValueError('out_dtype=int32 stores the raw accumulator: scales must be None.')
  if scaled:
    row_scale = jnp.ones((m,), jnp.float32) if row_scale is None else row_scale
    col_scale = jnp.ones((n,), jnp.float32) if col_scale is None else col_scale
  tm, tn, tk = t.tile_m, t.tile_n, t.tile_k
  cta_n = t.cta_tile_n
  m_iters, n_iters, k_iters = m // tm, n // cta_n, k // tk
  stages = min(_stages(t, jnp.dtype(a.dtype).itemsize, out_dtype), k_iters)
  a_tr, b_tr = _transforms(tk, a.dtype), _transforms(tk, bt.dtype)
  out_tr = _transforms(t.epi_tile_n, out_dtype)
  n_slots = min(2, (tm * tn) // (t.epi_tile_m * t.epi_tile_n))
  minor = 0 if t.grid_minor_dim == 'm' else 1
  interpret = interpret_params(interpret)
  if t.num_ctas is not None:
    num_ctas = t.num_ctas
  else:
    num_ctas = 2 if interpret is not None else num_sms()
  num_ctas = max(1, min(num_ctas, m_iters * n_iters))

  def pipeline(body, context):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(k_iters,), memory_registers=40, max_concurrent_steps=stages,
        in_specs=[plgpu.BlockSpec((tm, tk), lambda kk: (0, kk), transforms=a_tr,
                                  memory_space=plgpu.SMEM),
                  plgpu.BlockSpec((cta_n, tk), lambda kk: (0, kk), transforms=b_tr,
                                  memory_space=plgpu.SMEM)],
        wg_axis='wg', num_compute_wgs=2, compute_context=context)

  def kernel(a_gmem, b_gmem, *refs):
    if scaled:
      rs_gmem, cs_gmem, o_gmem = refs
    else:
      (o_gmem,) = refs
    ignore = lambda *_, **__: None

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore).get_allocations(a_gmem, b_gmem),
        o_smem=plgpu.SMEM((2, n_slots, t.epi_tile_m, t.epi_tile_n), out_dtype,
                          transforms=out_tr),
        rs_smem=plgpu.SMEM((2, tm), jnp.float32),
        cs_smem=plgpu.SMEM((2, tn), jnp.float32),
        bar=plgpu.Barrier(num_barriers=4),
        collective_axes='wg')
    def _scope(allocs, o_smem, rs_smem, cs_smem, bar):
      wg = lax.axis_index('wg')  # never pl.program_id: 0 in interpret mode

      @plgpu.nd_loop((m_iters * n_iters,), collective_axes='sm')
      def _tiles(info):
        (lin,) = info.index
        mi, ni = plgpu.planar_snake(lin, (m_iters, n_iters), minor, t.grid_tile_width)
        m_sl = pl.ds(mi * tm, tm)
        n_sl = pl.ds(ni * cta_n, cta_n)
        wg_n = pl.ds(wg * tn, tn)

        def context(run_pipeline):
          if scaled:  # the scale slices land while the main loop runs
            plgpu.copy_gmem_to_smem(rs_gmem.at[m_sl], rs_smem.at[wg], bar.at[2 * wg])
            plgpu.copy_gmem_to_smem(cs_gmem.at[n_sl].at[wg_n], cs_smem.at[wg],
                                    bar.at[2 * wg + 1])

          @functools.partial(pl.run_scoped, acc_ref=plgpu.ACC((tm, tn), acc_dtype))
          def _acc(acc_ref):
            run_pipeline(acc_ref)
            acc = acc_ref[...]
            if scaled:
              plgpu.barrier_wait(bar.at[2 * wg])
              plgpu.barrier_wait(bar.at[2 * wg + 1])
              r = plgpu.load(rs_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
              c = plgpu.load(cs_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(0))
              # One multiply by the combined scale, as qtrain.dot does.
              scale = (lax.broadcast_in_dim(r, (tm, tn), [0]) *
                       lax.broadcast_in_dim(c, (tm, tn), [1]))
              y = (acc.astype(jnp.float32) * scale).astype(out_dtype)
            else:
              y = acc
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            for em in range(tm // t.epi_tile_m):
              for en in range(tn // t.epi_tile_n):
                sm = slice(em * t.epi_tile_m, (em + 1) * t.epi_tile_m)
                sn = slice(en * t.epi_tile_n, (en + 1) * t.epi_tile_n)
                slot = (em * (tn // t.epi_tile_n) + en) % n_slots
                plgpu.wait_smem_to_gmem(n_slots - 1, wait_read_only=True)
                o_smem[wg, slot] = y[sm, sn]
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(o_smem.at[wg, slot],
                                        o_gmem.at[m_sl, n_sl].at[:, wg_n].at[sm, sn])

        def step(_, a_smem, b_smem, acc_ref):
          plgpu.wgmma(acc_ref, a_smem, b_smem.at[wg_n].T)  # 8-bit B must be K-major
          plgpu.wgmma_wait(0)
          return acc_ref

        pipeline(step, context)(a_gmem.at[m_sl, :], b_gmem.at[n_sl, :], allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  call = plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((m, n), out_dtype),
      grid=(num_ctas,), grid_names=('sm',), num_threads=3, thread_name='wg',
      compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
      interpret=interpret)
  return call(a, bt, row_scale, col_scale) if scaled else call(a, bt)


def gemm_problems(dry_run: bool) -> list[tuple[str, int, int, int]]:
  """(label, M, N, K) of the GPU check: cubes and a transformer MLP (tokens 8192, d 4096)."""
  if dry_run:
    return [('cube-256', 256, 256, 256)]
  d, tokens = 4096, 8192
  return [('cube-1024', 1024, 1024, 1024), ('cube-4096', 4096, 4096, 4096),
          ('cube-8192', 8192, 8192, 8192), ('mlp-up', tokens, 4 * d, d),
          ('mlp-down', tokens, d, 4 * d)]


def time_ms(fn: Callable, *args, iters: int = 20, warmup: int = 3) -> float:
  """Median wall time in ms of `fn(*args)` (jitted by the caller), warm-up excluded."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return float(statistics.median(times))


def random_codes(key, shape, dtype, lo: int, hi: int) -> jax.Array:
  """Random integer codes in [lo, hi] (never all zero) as `dtype`."""
  return jax.random.randint(key, shape, lo, hi + 1, jnp.int32).astype(dtype)



def benchmark_gemm(name: str, make_inputs: Callable, run_kernel: Callable, run_xla_lowbit: Callable,
                   *, dry_run: bool, candidates: tuple[WgmmaTuning, ...]) -> list[dict]:
  """Timing rows of one GEMM kernel against XLA's bf16 dot and XLA's own low-bit dot.

  Args:
    name: kernel name for the rows.
    make_inputs: (key, m, n, k) -> (a [M,K], bt [N,K], row_scale [M], col_scale [N]).
    run_kernel: (tuning, a, bt, rs, cs) -> [M, N] bf16 (the scaled kernel).
    run_xla_lowbit: (a, bt, rs, cs) -> [M, N] bf16 (XLA's low-bit dot + scales).
    dry_run: interpret mode at a tiny shape, 2 iterations (proves the script).
    candidates: tunings tried at every shape; the fastest is reported.

  Returns:
    One dict per problem with ms and TFLOP/s of the kernel, XLA bf16 and XLA
    low-bit dots and the speed-up of the kernel over XLA bf16.
  """
  rows = []
  iters, warmup = (1, 0) if dry_run else (30, 3)
  for label, m, n, k in gemm_problems(dry_run):
    a, bt, rs, cs = make_inputs(jax.random.key(m + n + k), m, n, k)
    a16, b16 = a.astype(jnp.bfloat16), bt.T.astype(jnp.bfloat16)
    bf16 = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.bfloat16))
    t_bf16 = time_ms(bf16, a16, b16, iters=iters, warmup=warmup)
    t_xla = time_ms(jax.jit(run_xla_lowbit), a, bt, rs, cs, iters=iters, warmup=warmup)
    best, best_t = None, float('inf')
    for tuning in candidates:
      try:
        check_gemm(a.shape, bt.shape, a.dtype, bt.dtype, jnp.bfloat16, tuning,
                   allowed=((a.dtype, bt.dtype),), b_layout='nk', name=name)
        fn = jax.jit(functools.partial(run_kernel, tuning))
        t = time_ms(fn, a, bt, rs, cs, iters=iters, warmup=warmup)
      except Exception as e:  # pylint: disable=broad-except  # a tiling may not fit
        rows.append(dict(kernel=name, problem=label, tuning=str(tuning),
                         error=f'{type(e).__name__}: {str(e)[:200]}'))
        continue
      if t < best_t:
        best, best_t = tuning, t
    flops = 2.0 * m * n * k
    tf = lambda ms: flops / ms / 1e9
    rows.append(dict(kernel=name, problem=label, m=m, n=n, k=k, kernel_ms=best_t,
                     xla_bf16_ms=t_bf16, xla_lowbit_ms=t_xla, kernel_tflops=tf(best_t),
                     xla_bf16_tflops=tf(t_bf16), xla_lowbit_tflops=tf(t_xla),
                     speedup_vs_bf16=t_bf16 / best_t, speedup_vs_xla_lowbit=t_xla / best_t,
                     tuning=str(best)))
  return rows
