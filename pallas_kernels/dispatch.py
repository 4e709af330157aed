"""Which backend computes a low-bit GEMM: the Pallas kernels on Hopper, XLA everywhere else.

| implementation | what runs                                                            |
|----------------|----------------------------------------------------------------------|
| None (auto)    | $QTRAIN_IMPL if set, else 'pallas' on a Hopper GPU, else 'xla'       |
| 'xla'          | `lax.dot_general` (exact int8 -> int32; the CPU path)                |
| 'pallas'       | `int8_matmul` / `fp8_matmul` on the GPU where `can_use` accepts;     |
|                | XLA for the rest (other dtypes, shapes off the tiles, batch dims)    |
| 'interpret'    | the same kernels in Mosaic GPU interpret mode (runs on CPU; slow)    |

The choice is made at trace time (gpu-kernels.md §4). Kernels are picked by
operand dtypes: int8 x int8 -> `int8_matmul`, FP8 x FP8 (e4m3/e5m2, mixed)
-> `fp8_matmul`.

`dot_general` is the hook `qtrain.dot_general(..., implementation=...)` uses
for its code x code GEMMs (forward, dX, dW; `qtrain.contraction.DotOp`): a
contraction with no batch dimensions is reshaped to [M, K] x [N, K] (lhs free
axes -> M, rhs free axes -> N, contracting axes -> K; XLA transposes the
operands where their layout differs), runs unscaled (int32 or f32
accumulator, exactly the value of XLA's dot) and is reshaped back, so the
result equals the XLA path bit for bit; qtrain applies its scales after.
Convolutions always stay on XLA.

Sharding: a Pallas call is not partitionable, so under plain `jit` with
sharded inputs XLA all-gathers its operands and runs it replicated
(gpu-kernels.md §7). Run it per shard with `shard_map`: `sharded_matmul`
(codes and scales given) and `sharded_int8_matmul` (float inputs; the
per-tensor absmax is made global with `lax.pmax`, the scale semantics of the
XLA path under GSPMD). Contracting (K) axes must not be sharded.
"""

from __future__ import annotations

import math
import os
from types import ModuleType

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from pallas_kernels import _common
from pallas_kernels import fp8_matmul as fp8_mod
from pallas_kernels import int8_matmul as int8_mod

__all__ = ['IMPLEMENTATIONS', 'ENV_VAR', 'resolve_implementation', 'kernel_for', 'matmul',
           'dot_general', 'sharded_matmul', 'sharded_int8_matmul']

IMPLEMENTATIONS = ('xla', 'pallas', 'interpret')
ENV_VAR = 'QTRAIN_IMPL'


def resolve_implementation(implementation: str | None) -> str:
  """'xla', 'pallas' or 'interpret' for an `implementation` argument.

  Args:
    implementation: one of IMPLEMENTATIONS, or None: $QTRAIN_IMPL if set,
      else 'pallas' on a Hopper GPU and 'xla' otherwise.

  Raises:
    ValueError: an unknown name (also from $QTRAIN_IMPL), or 'pallas' when
      JAX's backend is not a GPU (use 'interpret' on CPU).
  """
  source = 'implementation'
  if implementation is None:
    implementation = os.environ.get(ENV_VAR) or None
    source = f'${ENV_VAR}'
  if implementation is None:
    return 'pallas' if _common.is_hopper() else 'xla'
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f'{source}={implementation!r} is unknown; allowed: None, '
                     + ', '.join(repr(i) for i in IMPLEMENTATIONS) + '.')
  if implementation == 'pallas' and jax.default_backend() != 'gpu':
    raise ValueError(f"{source}='pallas' needs a GPU (backend is {jax.default_backend()!r}); "
                     "use 'interpret' to run the kernels on CPU, or 'xla'.")
  return implementation


def kernel_for(a_dtype, b_dtype) -> ModuleType | None:
  """The kernel module for these operand dtypes (int8_matmul / fp8_matmul), or None."""
  a_dtype, b_dtype = jnp.dtype(a_dtype), jnp.dtype(b_dtype)
  if a_dtype == b_dtype == jnp.dtype(jnp.int8):
    return int8_mod
  fp8 = [jnp.dtype(d) for d in fp8_mod.FP8_DTYPES]
  if a_dtype in fp8 and b_dtype in fp8:
    return fp8_mod
  return None


def _run(mod, a, b, *, a_scale, b_scale, out_dtype, b_layout, impl, tuning):
  """The kernel of `mod` if impl allows and can_use accepts, else its XLA reference."""
  interpret = impl == 'interpret'
  kwargs = dict(out_dtype=out_dtype, b_layout=b_layout)
  if impl != 'xla' and mod.can_use(a, b, tuning=tuning, interpret=interpret, **kwargs):
    fn = int8_mod.int8_matmul if mod is int8_mod else fp8_mod.fp8_matmul
    return fn(a, b, a_scale=a_scale, b_scale=b_scale, tuning=tuning, interpret=interpret,
              **kwargs)
  return mod.reference(a, b, a_scale=a_scale, b_scale=b_scale, **kwargs)


def matmul(a: jax.Array, b: jax.Array, *, a_scale=None, b_scale=None, out_dtype=jnp.float32,
           b_layout: str = 'kn', implementation: str | None = None, tuning=None) -> jax.Array:
  """Scaled low-bit GEMM on the chosen backend (int8 x int8 or FP8 x FP8 codes).

  Args:
    a, b, a_scale, b_scale, out_dtype, b_layout, tuning: as in
      `int8_matmul.int8_matmul` / `fp8_matmul.fp8_matmul`.
    implementation: see the module table.

  Returns:
    [M, N] out_dtype; the kernel where usable, else the module's XLA
    `reference` (same value; bit for bit for int8).

  Raises:
    ValueError: dtypes without a kernel (naming them), or a bad implementation.
  """
  mod = kernel_for(a.dtype, b.dtype)
  if mod is None:
    raise ValueError(f'no low-bit GEMM for {jnp.dtype(a.dtype).name} x '
                     f'{jnp.dtype(b.dtype).name}; operands must be int8 x int8 or FP8 x FP8.')
  impl = resolve_implementation(implementation)
  return _run(mod, a, b, a_scale=a_scale, b_scale=b_scale, out_dtype=out_dtype,
              b_layout=b_layout, impl=impl, tuning=tuning)


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, *, precision=None,
                preferred_element_type=None, out_sharding=None,
                implementation: str | None = None) -> jax.Array:
  """`lax.dot_general` that runs a code x code GEMM on a Pallas kernel where possible.

  The kernel runs when the resolved implementation is not 'xla', there are
  no batch dimensions and no `out_sharding`, the operands are int8 x int8
  with `preferred_element_type=int32` or FP8 x FP8 with float32, and the
  [M, K] x [N, K] problem fits the kernel's tiles; everything else is plain
  `lax.dot_general`. The result has lax.dot_general's shape and dtype and,
  for the kernel's cases, its exact value (integer accumulation; FP8 codes
  whose partial sums are exact in f32).

  Args:
    lhs, rhs, dimension_numbers, precision, preferred_element_type,
      out_sharding: as in `lax.dot_general`.
    implementation: see the module table.

  Returns:
    The contraction.
  """
  impl = resolve_implementation(implementation)
  plain = lambda: lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                  preferred_element_type=preferred_element_type,
                                  out_sharding=out_sharding)
  (lc, rc), (lb, rb) = dimension_numbers
  mod = kernel_for(lhs.dtype, rhs.dtype)
  if impl == 'xla' or mod is None or out_sharding is not None or lb or rb:
    return plain()
  want = jnp.int32 if mod is int8_mod else jnp.float32
  if preferred_element_type is None or jnp.dtype(preferred_element_type) != jnp.dtype(want):
    return plain()
  lc, rc = tuple(int(d) % lhs.ndim for d in lc), tuple(int(d) % rhs.ndim for d in rc)
  lfree = [d for d in range(lhs.ndim) if d not in lc]
  rfree = [d for d in range(rhs.ndim) if d not in rc]
  m = math.prod(lhs.shape[d] for d in lfree)
  n = math.prod(rhs.shape[d] for d in rfree)
  k = math.prod(lhs.shape[d] for d in lc)
  a_struct = jax.ShapeDtypeStruct((m, k), lhs.dtype)
  b_struct = jax.ShapeDtypeStruct((n, k), rhs.dtype)
  out_dtype = jnp.dtype(want)
  if not mod.can_use(a_struct, b_struct, out_dtype=out_dtype, b_layout='nk',
                     interpret=impl == 'interpret'):
    return plain()
  # Contracting axes in matching order on both sides, so K lines up.
  a = jnp.transpose(lhs, lfree + list(lc)).reshape(m, k)
  bt = jnp.transpose(rhs, rfree + list(rc)).reshape(n, k)
  out = _run(mod, a, bt, a_scale=None, b_scale=None, out_dtype=out_dtype, b_layout='nk',
             impl=impl, tuning=None)
  shape = tuple(lhs.shape[d] for d in lfree) + tuple(rhs.shape[d] for d in rfree)
  return out.reshape(shape)


def sharded_matmul(a: jax.Array, b: jax.Array, *, mesh: jax.sharding.Mesh, a_scale=None,
                   b_scale=None, row_axis: str | None = None, col_axis: str | None = None,
                   out_dtype=jnp.float32, implementation: str | None = None,
                   tuning=None) -> jax.Array:
  """`matmul` per shard under `shard_map`: a's rows over `row_axis`, b's columns over `col_axis`.

  Args:
    a: [M, K] codes, rows sharded over mesh axis `row_axis` (or replicated).
    b: [K, N] codes, columns sharded over `col_axis` (or replicated).
    mesh: the device mesh.
    a_scale: None, per-tensor (replicated) or per-row [M] (sharded like a's rows).
    b_scale: None, per-tensor or per-column [N] (sharded like b's columns).
    row_axis, col_axis: mesh axis names or None. K is never sharded (the
      kernels do not reduce across devices).
    out_dtype, implementation, tuning: as in `matmul`.

  Returns:
    [M, N] out_dtype sharded P(row_axis, col_axis); each device ran the kernel
    on its [M/r, K] x [K, N/c] block with no collective.
  """
  def spec_of(scale, axis):
    if scale is None or jnp.size(scale) == 1:
      return P()
    return P(axis)

  a_scale = None if a_scale is None else jnp.asarray(a_scale).reshape(-1)
  b_scale = None if b_scale is None else jnp.asarray(b_scale).reshape(-1)

  def local(a_, b_, sa, sb):
    return matmul(a_, b_, a_scale=sa, b_scale=sb, out_dtype=out_dtype, b_layout='kn',
                  implementation=implementation, tuning=tuning)

  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(row_axis, None), P(None, col_axis),
                                                 spec_of(a_scale, row_axis),
                                                 spec_of(b_scale, col_axis)),
                     out_specs=P(row_axis, col_axis), check_vma=False)
  return fn(a, b, a_scale, b_scale)


def _int8_tensor_quantize(x, axis):
  """Symmetric per-tensor int8 codes with absmax over all shards of `axis` (None: local)."""
  amax = jnp.max(jnp.abs(x.astype(jnp.float32)))
  if axis is not None:
    amax = lax.pmax(amax, axis)
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  codes = jnp.clip(jnp.round(x.astype(jnp.float32) / scale), -127, 127).astype(jnp.int8)
  return codes, scale


def sharded_int8_matmul(x: jax.Array, w: jax.Array, *, mesh: jax.sharding.Mesh,
                        axis: str = 'data', implementation: str | None = None,
                        out_dtype=jnp.float32) -> jax.Array:
  """Y = Q(x) Q(w) with per-tensor int8 absmax scales, x's rows sharded over `axis`.

  The scale of x is the absmax over *all* shards (`lax.pmax`), so every device
  multiplies codes on the same grid and the result equals the single-device
  (and GSPMD) computation; a per-shard absmax would differ where shards
  differ in range (gpu-kernels.md §7).

  Args:
    x: float [M, K], rows sharded over mesh axis `axis`.
    w: float [K, N], replicated.
    mesh: the mesh; axis: the mesh axis of x's rows.
    implementation: as in `matmul`; out_dtype: float32 or bfloat16.

  Returns:
    [M, N] out_dtype, sharded P(axis, None).
  """
  def local(x_, w_):
    xq, sx = _int8_tensor_quantize(x_, axis)
    wq, sw = _int8_tensor_quantize(w_, None)
    return matmul(xq, wq, a_scale=sx, b_scale=sw, out_dtype=out_dtype, b_layout='kn',
                  implementation=implementation)

  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(axis, None), P()), out_specs=P(axis, None),
                     check_vma=False)
  return fn(x, w)
