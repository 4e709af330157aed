"""`QArray`: a quantized tensor as a pytree (codes + scale [+ zero point] + static format)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qtrain import formats as fmts
from qtrain import scaling

__all__ = ['QArray', 'pack_int4', 'unpack_int4']


@dataclasses.dataclass(frozen=True, kw_only=True)
class QArray:
  """A quantized array: value = (codes - zero_point) · scale.

  Attributes:
    codes: the grid values in code units, stored in `format.storage_dtype`
      (int8 for INT2..8 and UINT2..7, uint8 for UINT8, float8_e4m3fn/e5m2 for minifloats
      and log formats, int16/int32 for wide fixed point). Same shape as the
      original array.
    scale: float32 scale of each group; rank of `codes` (size 1 on reduced
      axes, number of blocks on a block axis).
    zero_point: None, or float32 integer-valued zero point (MinMax only).
    format: the `qtrain.formats.Format` of the codes (static).
    granularity: the scale granularity (static), needed to expand block scales.
    dtype: dtype of the original array, restored by `dequantize` (static).
  """
  codes: jax.Array
  scale: jax.Array
  zero_point: jax.Array | None = None
  format: fmts.Format = dataclasses.field(metadata=dict(static=True))
  granularity: scaling.Granularity = dataclasses.field(
      default=scaling.PerTensor(), metadata=dict(static=True))
  dtype: np.dtype = dataclasses.field(default=np.dtype(np.float32), metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    return self.codes.shape

  @property
  def ndim(self) -> int:
    return self.codes.ndim

  def dequantize(self) -> jax.Array:
    """Returns (codes - zero_point) · scale in the original dtype."""
    v = self.codes.astype(jnp.float32)
    if self.zero_point is not None:
      v = v - scaling.expand_scale(self.zero_point, v.shape, self.granularity)
    return (v * scaling.expand_scale(self.scale, v.shape, self.granularity)).astype(self.dtype)


jax.tree_util.register_dataclass(
    QArray, data_fields=['codes', 'scale', 'zero_point'],
    meta_fields=['format', 'granularity', 'dtype'])


def pack_int4(codes: jax.Array, axis: int = -1) -> jax.Array:
  """Packs int4 codes (-8..7, any integer dtype) two per byte along `axis`.

  Element 2i goes to the low nibble and 2i+1 to the high nibble of byte i.

  Args:
    codes: integer array with values in [-8, 7]; `codes.shape[axis]` even.
    axis: the axis to pack.

  Returns:
    uint8 array with `shape[axis]` halved.
  """
  axis = axis % codes.ndim
  if codes.shape[axis] % 2:
    raise ValueError(f'codes.shape[{axis}]={codes.shape[axis]} must be even to pack int4.')
  if not jnp.issubdtype(codes.dtype, jnp.integer):
    raise TypeError(f'codes must be an integer array, got {codes.dtype}.')
  c = jnp.moveaxis(codes.astype(jnp.int32) & 0xF, axis, -1)
  c = c.reshape(c.shape[:-1] + (c.shape[-1] // 2, 2))
  packed = (c[..., 0] | (c[..., 1] << 4)).astype(jnp.uint8)
  return jnp.moveaxis(packed, -1, axis)


def unpack_int4(packed: jax.Array, axis: int = -1) -> jax.Array:
  """Inverse of `pack_int4`: uint8 bytes -> int8 codes in [-8, 7], `shape[axis]` doubled."""
  if packed.dtype != jnp.uint8:
    raise TypeError(f'packed must be uint8, got {packed.dtype}.')
  axis = axis % packed.ndim
  p = jnp.moveaxis(packed.astype(jnp.int32), axis, -1)
  nib = jnp.stack([p & 0xF, (p >> 4) & 0xF], axis=-1)
  nib = jnp.where(nib >= 8, nib - 16, nib).astype(jnp.int8)
  nib = nib.reshape(p.shape[:-1] + (p.shape[-1] * 2,))
  return jnp.moveaxis(nib, -1, axis)
