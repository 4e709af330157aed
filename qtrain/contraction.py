"""The two contractions qtrain quantizes, described as static data.

`DotOp` (for `lax.dot_general`) and `ConvOp` (for `lax.conv_general_dilated`)
tell the custom_vjp in `qtrain.dot` everything it needs that depends on the
contraction: which axes of each operand survive into the output (so a scale
constant along the contracted axes factors out of the GEMM), where they land,
and how to run the forward contraction and its two transposes on low-bit
operands without changing their dtypes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qtrain import conv_transpose

__all__ = ['DotOp', 'ConvOp', 'move_scale']


def move_scale(s: jax.Array, src_dims, dst_dims, dst_ndim: int) -> jax.Array:
  """Re-lays out a group scale: axis src_dims[i] of `s` goes to dst_dims[i].

  `s` must have size 1 on every axis not in `src_dims`. The result has rank
  `dst_ndim` with size 1 on every axis not in `dst_dims`.
  """
  src_dims, dst_dims = list(src_dims), list(dst_dims)
  rest = [d for d in range(s.ndim) if d not in src_dims]
  kept = jnp.transpose(s, src_dims + rest)
  kept = kept.reshape(kept.shape[:len(src_dims)])
  order = list(np.argsort(dst_dims))
  kept = jnp.transpose(kept, order)
  shape = [1] * dst_ndim
  for size, d in zip(kept.shape, sorted(dst_dims)):
    shape[d] = size
  return kept.reshape(shape)


def _explicit_spec(x: jax.Array):
  """Per-axis PartitionSpec entries of x under an Explicit mesh, else None."""
  sharding = getattr(jax.typeof(x), 'sharding', None)
  mesh = getattr(sharding, 'mesh', None)
  if mesh is None or getattr(mesh, 'empty', True):
    return None, None
  if jax.sharding.AxisType.Explicit not in tuple(mesh.axis_types):
    return None, None
  spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
  return mesh, spec


def _sharding_from(parts, mesh):
  """NamedSharding from per-axis entries, dropping mesh axes used twice."""
  if mesh is None:
    return None
  used, out = set(), []
  for p in parts:
    names = () if p is None else (p if isinstance(p, tuple) else (p,))
    if any(n in used for n in names):
      out.append(None)
      continue
    used.update(names)
    out.append(p)
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*out))


_LOW_BIT = (jnp.int8, jnp.float8_e4m3fn, jnp.float8_e5m2)


def _dot(lhs, rhs, dims, *, precision, preferred, out_sharding, implementation):
  """lax.dot_general, or `pallas_kernels.dispatch.dot_general` for low-bit codes.

  `implementation` (None = auto, 'xla', 'pallas', 'interpret'; see
  pallas_kernels.dispatch) only matters for int8/FP8 operands; the kernel
  package is imported only when it may be used (auto on a GPU, or asked for).
  """
  low_bit = lhs.dtype in _LOW_BIT and rhs.dtype in _LOW_BIT
  auto_cpu = (implementation is None and jax.default_backend() != 'gpu'
              and not os.environ.get('QTRAIN_IMPL'))
  if not low_bit or implementation == 'xla' or auto_cpu:
    return lax.dot_general(lhs, rhs, dims, precision=precision, preferred_element_type=preferred,
                           out_sharding=out_sharding)
  from pallas_kernels import dispatch  # pylint: disable=g-import-not-at-top
  return dispatch.dot_general(lhs, rhs, dims, precision=precision,
                              preferred_element_type=preferred, out_sharding=out_sharding,
                              implementation=implementation)


def _normalize_dims(dims) -> tuple[tuple[int, ...], tuple[int, ...]]:
  return tuple(int(d) for d in dims[0]), tuple(int(d) for d in dims[1])


@dataclasses.dataclass(frozen=True)
class DotOp:
  """`lax.dot_general` with `dimension_numbers` ((lc, rc), (lb, rb)) and operand ranks."""
  lhs_contract: tuple[int, ...]
  rhs_contract: tuple[int, ...]
  lhs_batch: tuple[int, ...]
  rhs_batch: tuple[int, ...]
  lhs_ndim: int
  rhs_ndim: int

  @classmethod
  def create(cls, dimension_numbers, lhs_ndim: int, rhs_ndim: int) -> 'DotOp':
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc = _normalize_dims((lc, rc))
    lb, rb = _normalize_dims((lb, rb))
    return cls(lc, rc, lb, rb, lhs_ndim, rhs_ndim)

  @property
  def dimension_numbers(self):
    return ((self.lhs_contract, self.rhs_contract), (self.lhs_batch, self.rhs_batch))

  @property
  def lhs_free(self) -> tuple[int, ...]:
    return tuple(d for d in range(self.lhs_ndim)
                 if d not in self.lhs_contract and d not in self.lhs_batch)

  @property
  def rhs_free(self) -> tuple[int, ...]:
    return tuple(d for d in range(self.rhs_ndim)
                 if d not in self.rhs_contract and d not in self.rhs_batch)

  @property
  def out_ndim(self) -> int:
    return len(self.lhs_batch) + len(self.lhs_free) + len(self.rhs_free)

  def _out_groups(self):
    nb, nl = len(self.lhs_batch), len(self.lhs_free)
    batch = tuple(range(nb))
    lfree = tuple(range(nb, nb + nl))
    rfree = tuple(range(nb + nl, self.out_ndim))
    return batch, lfree, rfree

  # -- scale bookkeeping ------------------------------------------------------
  def kept(self, side: str) -> tuple[int, ...]:
    """Non-contracted axes of 'lhs' or 'rhs' (a scale may vary along these)."""
    return self.lhs_batch + self.lhs_free if side == 'lhs' else self.rhs_batch + self.rhs_free

  def out_dims(self, side: str) -> tuple[int, ...]:
    """Output axes that the kept axes of `side` become."""
    batch, lfree, rfree = self._out_groups()
    return batch + (lfree if side == 'lhs' else rfree)

  def grad_kept(self, gemm: str) -> tuple[int, ...]:
    """Axes of the output cotangent not contracted in the 'dlhs' / 'drhs' GEMM."""
    batch, lfree, rfree = self._out_groups()
    return batch + (lfree if gemm == 'dlhs' else rfree)

  def grad_dst(self, gemm: str) -> tuple[int, ...]:
    """Where `grad_kept(gemm)` land in the dX (lhs) / dW (rhs) layout."""
    return self.kept('lhs' if gemm == 'dlhs' else 'rhs')

  # -- contractions -----------------------------------------------------------
  def forward(self, lhs, rhs, *, precision, preferred, out_sharding, implementation=None):
    return _dot(lhs, rhs, self.dimension_numbers, precision=precision, preferred=preferred,
                out_sharding=out_sharding, implementation=implementation)

  def transpose_lhs(self, g, rhs, *, precision, preferred, implementation=None):
    """dX = contraction of g with rhs, returned in lhs layout."""
    batch, lfree, rfree = self._out_groups()
    dims = ((rfree, self.rhs_free), (batch, self.rhs_batch))
    # Result layout: batch, lhs free, then rhs contracting axes in rhs order.
    rc_sorted = sorted(self.rhs_contract)
    result_axes = list(self.lhs_batch) + list(self.lhs_free) + [
        self.lhs_contract[self.rhs_contract.index(r)] for r in rc_sorted]
    mesh, gspec = _explicit_spec(g)
    _, rspec = _explicit_spec(rhs)
    sharding = None
    if mesh is not None:
      parts = [gspec[d] for d in batch + lfree] + [rspec[r] for r in rc_sorted]
      sharding = _sharding_from(parts, mesh)
    out = _dot(g, rhs, dims, precision=precision, preferred=preferred, out_sharding=sharding,
               implementation=implementation)
    return jnp.transpose(out, list(np.argsort(result_axes)))

  def transpose_rhs(self, g, lhs, *, precision, preferred, implementation=None):
    """dW = contraction of lhs with g, returned in rhs layout."""
    batch, lfree, rfree = self._out_groups()
    dims = ((self.lhs_free, lfree), (self.lhs_batch, batch))
    lc_sorted = sorted(self.lhs_contract)
    result_axes = list(self.rhs_batch) + [
        self.rhs_contract[self.lhs_contract.index(c)] for c in lc_sorted] + list(self.rhs_free)
    mesh, lspec = _explicit_spec(lhs)
    _, gspec = _explicit_spec(g)
    sharding = None
    if mesh is not None:
      parts = [gspec[d] for d in batch] + [lspec[c] for c in lc_sorted] + [
          gspec[d] for d in rfree]
      sharding = _sharding_from(parts, mesh)
    out = _dot(lhs, g, dims, precision=precision, preferred=preferred, out_sharding=sharding,
               implementation=implementation)
    return jnp.transpose(out, list(np.argsort(result_axes)))


@dataclasses.dataclass(frozen=True)
class ConvOp:
  """`lax.conv_general_dilated` with every static argument resolved."""
  window_strides: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  lhs_dilation: tuple[int, ...]
  rhs_dilation: tuple[int, ...]
  dimension_numbers: Any  # lax.ConvDimensionNumbers (a hashable NamedTuple)
  feature_group_count: int
  batch_group_count: int
  lhs_shape: tuple[int, ...]
  rhs_shape: tuple[int, ...]
  int_carrier: str = 'native'  # or 'float32': integer codes carried as exact float32

  @property
  def lhs_ndim(self) -> int:
    return len(self.lhs_shape)

  @property
  def rhs_ndim(self) -> int:
    return len(self.rhs_shape)

  @property
  def out_ndim(self) -> int:
    return len(self.lhs_shape)

  def kept(self, side: str) -> tuple[int, ...]:
    lhs_spec, rhs_spec, _ = self.dimension_numbers
    # Per-sample (lhs N) and per-output-channel (rhs O) scales factor out,
    # unless batch groups mix samples into features.
    if side == 'lhs':
      return (lhs_spec[0],) if self.batch_group_count == 1 else ()
    return (rhs_spec[0],)

  def out_dims(self, side: str) -> tuple[int, ...]:
    _, _, out_spec = self.dimension_numbers
    if side == 'lhs':
      return (out_spec[0],) if self.batch_group_count == 1 else ()
    return (out_spec[1],)

  def grad_kept(self, gemm: str) -> tuple[int, ...]:
    return self.out_dims('lhs' if gemm == 'dlhs' else 'rhs')

  def grad_dst(self, gemm: str) -> tuple[int, ...]:
    return self.kept('lhs' if gemm == 'dlhs' else 'rhs')

  def _static(self):
    return dict(window_strides=self.window_strides, padding=self.padding,
                lhs_dilation=self.lhs_dilation, rhs_dilation=self.rhs_dilation,
                dimension_numbers=self.dimension_numbers,
                feature_group_count=self.feature_group_count,
                batch_group_count=self.batch_group_count)

  def forward(self, lhs, rhs, *, precision, preferred, out_sharding, implementation=None):
    del implementation  # convolutions always run on XLA (no Pallas conv kernel)
    return lax.conv_general_dilated(lhs, rhs, precision=precision,
                                    preferred_element_type=preferred,
                                    out_sharding=out_sharding, **self._static())

  def _grad_sharding(self, g, gemm: str, ndim: int):
    mesh, gspec = _explicit_spec(g)
    if mesh is None:
      return None
    parts = [None] * ndim
    for src, dst in zip(self.grad_kept(gemm), self.grad_dst(gemm)):
      parts[dst] = gspec[src]
    return _sharding_from(parts, mesh)

  def transpose_lhs(self, g, rhs, *, precision, preferred, implementation=None):
    del implementation
    return conv_transpose.conv_transpose_lhs(
        g, rhs, lhs_shape=self.lhs_shape, precision=precision,
        preferred_element_type=preferred,
        out_sharding=self._grad_sharding(g, 'dlhs', self.lhs_ndim), **self._static())

  def transpose_rhs(self, g, lhs, *, precision, preferred, implementation=None):
    del implementation
    return conv_transpose.conv_transpose_rhs(
        g, lhs, rhs_shape=self.rhs_shape, precision=precision,
        preferred_element_type=preferred,
        out_sharding=self._grad_sharding(g, 'drhs', self.rhs_ndim), **self._static())
