"""Explicit transposed convolutions for low-bit backward passes.

qtrain's quantized convolution is a ``jax.custom_vjp`` whose backward pass
computes the input gradient (dX) and the weight gradient (dW) from *quantized*
operands: int8 codes accumulated in int32, or float8 codes accumulated in
float32. JAX's own transpose rule for ``conv_general_dilated`` cannot be used
for that, because it casts the operands to the cotangent dtype and the result
back to the primal dtype. The two functions here express the same transposes
as plain ``lax.conv_general_dilated`` calls that keep the operand dtypes
exactly as given and return the result in the accumulation dtype.

Derivation (one spatial dimension; the others are independent). The forward
convolution has input length ``n`` dilated by ``a`` (``lhs_dilation``),
padding ``(lo, hi)``, a kernel of length ``k`` dilated by ``d``
(``rhs_dilation``) and stride ``s``. Writing ``xp`` for the dilated and
padded input, its output is::

  y[o] = sum_j w[j] * xp[o * s + j * d],   o = 0 .. m - 1,
  m = floor((n_a + lo + hi - k_d) / s) + 1,

with ``n_a = (n - 1) * a + 1`` and ``k_d = (k - 1) * d + 1``. The element
``x[i]`` sits at ``xp[i * a + lo]``.

* dX: ``dx[i] = sum_{o, j : o * s + j * d = i * a + lo} g[o] * w[j]``. With
  ``g`` dilated by ``s`` (``gs[o * s] = g[o]``) this is
  ``dx[i] = sum_j gs[i * a + lo - j * d] * w[j]``, and reversing the kernel
  (``j -> k - 1 - j``) turns it into a correlation of ``gs`` with the flipped
  kernel: stride ``a``, lhs dilation ``s``, rhs dilation ``d``, low padding
  ``k_d - 1 - lo``, and high padding chosen so that exactly ``n`` outputs
  come out: ``(n - 1) * a + k_d - m_s - pad_lo`` with ``m_s = (m - 1) * s + 1``.
* dW: ``dw[j] = sum_o g[o] * xp[j * d + o * s]`` is a correlation of ``xp``
  with ``g`` used as the kernel: stride ``d``, lhs dilation ``a``, rhs
  dilation ``s``, low padding ``lo`` and high padding
  ``(k - 1) * d + m_s - n_a - lo`` so that exactly ``k`` outputs come out.

Either padding may be negative (e.g. when the forward stride skips trailing
inputs, or the forward padding exceeds the kernel extent); XLA crops then.

Channels behave like a matmul ``[batch, in] x [in, out] -> [batch, out]``:
dX contracts over ``out`` (the kernel's in/out roles swap), dW contracts over
``batch`` (the input's batch/feature roles swap). Feature groups turn into
feature groups of the dX convolution once the group factor is moved from the
kernel's output-feature axis to its input-feature axis, and into batch groups
of the dW convolution. Batch groups are the mirror image of that.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["conv_transpose_lhs", "conv_transpose_rhs", "resolve_padding"]

Padding = Sequence[tuple[int, int]]


def resolve_padding(
    padding: str | Padding,
    lhs_shape: Sequence[int],
    rhs_shape: Sequence[int],
    window_strides: Sequence[int],
    lhs_dilation: Sequence[int] | None,
    rhs_dilation: Sequence[int] | None,
    dimension_numbers: Any,
) -> list[tuple[int, int]]:
  """Turns a convolution's padding argument into explicit (lo, hi) pairs.

  The result is the padding ``lax.conv_general_dilated`` would use for the
  same arguments, so a forward convolution with the resolved padding is the
  same computation as one with the string.

  Args:
    padding: ``'SAME'``, ``'SAME_LOWER'``, ``'VALID'`` or a sequence of
      ``(lo, hi)`` pairs, one per spatial dimension.
    lhs_shape: shape of the convolution input.
    rhs_shape: shape of the kernel.
    window_strides: stride per spatial dimension.
    lhs_dilation: input dilation per spatial dimension, or None for all 1s.
    rhs_dilation: kernel dilation per spatial dimension, or None for all 1s.
    dimension_numbers: anything ``lax.conv_dimension_numbers`` accepts
      (None, a tuple of layout strings, or a ``lax.ConvDimensionNumbers``).

  Returns:
    A list of ``(lo, hi)`` integer pairs, one per spatial dimension.

  Raises:
    ValueError: for string padding together with an lhs dilation other than 1
      (``lax.conv_general_dilated`` rejects that combination too), or for an
      explicit padding of the wrong length.
  """
  dn = lax.conv_dimension_numbers(tuple(lhs_shape), tuple(rhs_shape), dimension_numbers)
  num_spatial = len(lhs_shape) - 2
  lhs_dilation = _ones_if_none(lhs_dilation, num_spatial)
  rhs_dilation = _ones_if_none(rhs_dilation, num_spatial)
  if isinstance(padding, str):
    if any(f != 1 for f in lhs_dilation):
      # Mirrors lax.conv_general_dilated: a string padding has no agreed
      # meaning for a transposed (input-dilated) convolution.
      raise ValueError(
          f"String padding {padding!r} is not supported with lhs_dilation "
          f"{tuple(lhs_dilation)}; pass explicit (lo, hi) pairs instead.")
    in_spatial = [lhs_shape[i] for i in dn.lhs_spec[2:]]
    window = [
        _dilated(rhs_shape[i], f) for i, f in zip(dn.rhs_spec[2:], rhs_dilation, strict=True)
    ]
    pads = lax.padtype_to_pads(in_spatial, window, tuple(window_strides), padding)
  else:
    pads = list(padding)
  if len(pads) != num_spatial:
    raise ValueError(f"Expected {num_spatial} (lo, hi) padding pairs, got {len(pads)}: {pads}")
  return [(int(lo), int(hi)) for lo, hi in pads]


def conv_transpose_lhs(
    g: jax.Array,
    rhs: jax.Array,
    *,
    lhs_shape: Sequence[int],
    window_strides: Sequence[int],
    padding: Padding,
    lhs_dilation: Sequence[int],
    rhs_dilation: Sequence[int],
    dimension_numbers: lax.ConvDimensionNumbers,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: lax.PrecisionLike = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
) -> jax.Array:
  """Cotangent of a convolution with respect to its input (dX).

  Computes ``vjp(lambda x: conv_general_dilated(x, rhs, ...), x)(g)`` as one
  ``lax.conv_general_dilated`` whose operands are ``g`` and ``rhs`` in the
  dtypes given (no conversion), e.g. int8 codes with
  ``preferred_element_type=jnp.int32``.

  Args:
    g: cotangent of the convolution output, laid out per
      ``dimension_numbers.out_spec``.
    rhs: the forward kernel, laid out per ``dimension_numbers.rhs_spec``.
    lhs_shape: shape of the forward input; the result has this shape.
    window_strides: forward stride per spatial dimension.
    padding: forward padding as explicit ``(lo, hi)`` pairs (see
      ``resolve_padding``).
    lhs_dilation: forward input dilation per spatial dimension.
    rhs_dilation: forward kernel dilation per spatial dimension.
    dimension_numbers: forward ``lax.ConvDimensionNumbers``.
    feature_group_count: forward feature group count.
    batch_group_count: forward batch group count.
    precision: forwarded to ``lax.conv_general_dilated``; a pair still applies
      its second entry to ``rhs``.
    preferred_element_type: accumulation and result dtype, or None for the
      operands' dtype.
    out_sharding: forwarded to ``lax.conv_general_dilated``. With
      ``batch_group_count > 1`` it applies to that convolution's output, whose
      batch axis is ``batch_group_count`` times smaller and feature axis that
      much larger than in ``lhs_shape``, before the batch is regrouped.

  Returns:
    dX with shape ``lhs_shape`` and dtype ``preferred_element_type`` (or the
    operand dtype when that is None).

  Raises:
    ValueError: if the arguments describe no valid forward convolution.
  """
  lhs_shape = tuple(int(s) for s in lhs_shape)
  lhs_spec, rhs_spec, out_spec = _check_dimension_numbers(dimension_numbers)
  _check_groups(feature_group_count, batch_group_count)
  geometry = _geometry(lhs_shape, rhs.shape, g.shape, dimension_numbers, window_strides,
                       padding, lhs_dilation, rhs_dilation, batch_group_count)

  if g.size == 0 or rhs.size == 0 or math.prod(lhs_shape) == 0:
    # Nothing reaches the input; avoid degenerate (empty) convolutions.
    return jnp.zeros(
        lhs_shape, _result_dtype(g, rhs, preferred_element_type), out_sharding=out_sharding)

  # The dX convolution contracts over the forward output features, so the
  # kernel's "in" and "out" roles swap.
  t_rhs_spec = (rhs_spec[1], rhs_spec[0]) + tuple(rhs_spec[2:])
  groups = 1
  kernel = rhs
  if feature_group_count > 1 or batch_group_count > 1:
    # The kernel's output features are [groups, per-group outputs]. After the
    # swap those per-group outputs are what each group contracts over, and the
    # group factor must index the dX features, so it moves (major) onto the
    # kernel's input-feature axis, which is the dX convolution's output axis.
    groups = max(feature_group_count, batch_group_count)
    kernel = _move_factor(kernel, rhs_spec[0], rhs_spec[1], groups)

  pads = []
  for i in range(geometry.num_spatial):
    n, k_d, m_s = geometry.in_size[i], geometry.kernel_extent[i], geometry.out_extent[i]
    a = geometry.lhs_dilation[i]
    pad_lo = k_d - 1 - geometry.padding[i][0]
    pad_hi = (n - 1) * a + k_d - m_s - pad_lo
    pads.append((pad_lo, pad_hi))

  out = lax.conv_general_dilated(
      g,
      lax.rev(kernel, tuple(rhs_spec[2:])),  # Correlation with the flipped kernel.
      window_strides=geometry.lhs_dilation,
      padding=pads,
      lhs_dilation=geometry.window_strides,
      rhs_dilation=geometry.rhs_dilation,
      dimension_numbers=lax.ConvDimensionNumbers(
          lhs_spec=tuple(out_spec), rhs_spec=t_rhs_spec, out_spec=tuple(lhs_spec)),
      feature_group_count=groups,
      batch_group_count=1,
      precision=precision,
      preferred_element_type=preferred_element_type,
      out_sharding=out_sharding,
  )
  if batch_group_count > 1:
    # Batch group j produced features [j, C]; in the forward input those are
    # the batch rows [j, N / groups], so the factor goes back onto the batch.
    out = _move_factor(out, lhs_spec[1], lhs_spec[0], batch_group_count)
  _check_result_shape(out, lhs_shape, "conv_transpose_lhs", "lhs_shape")
  return out


def conv_transpose_rhs(
    g: jax.Array,
    lhs: jax.Array,
    *,
    rhs_shape: Sequence[int],
    window_strides: Sequence[int],
    padding: Padding,
    lhs_dilation: Sequence[int],
    rhs_dilation: Sequence[int],
    dimension_numbers: lax.ConvDimensionNumbers,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: lax.PrecisionLike = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
) -> jax.Array:
  """Cotangent of a convolution with respect to its kernel (dW).

  Computes ``vjp(lambda w: conv_general_dilated(lhs, w, ...), w)(g)`` as one
  ``lax.conv_general_dilated`` whose operands are ``lhs`` and ``g`` in the
  dtypes given (no conversion), e.g. int8 codes with
  ``preferred_element_type=jnp.int32``.

  Args:
    g: cotangent of the convolution output, laid out per
      ``dimension_numbers.out_spec``.
    lhs: the forward input, laid out per ``dimension_numbers.lhs_spec``.
    rhs_shape: shape of the forward kernel; the result has this shape.
    window_strides: forward stride per spatial dimension.
    padding: forward padding as explicit ``(lo, hi)`` pairs (see
      ``resolve_padding``).
    lhs_dilation: forward input dilation per spatial dimension.
    rhs_dilation: forward kernel dilation per spatial dimension.
    dimension_numbers: forward ``lax.ConvDimensionNumbers``.
    feature_group_count: forward feature group count.
    batch_group_count: forward batch group count.
    precision: forwarded to ``lax.conv_general_dilated``; a pair still applies
      its first entry to ``lhs``.
    preferred_element_type: accumulation and result dtype, or None for the
      operands' dtype.
    out_sharding: forwarded to ``lax.conv_general_dilated``.

  Returns:
    dW with shape ``rhs_shape`` and dtype ``preferred_element_type`` (or the
    operand dtype when that is None). A zero-size ``g`` gives zeros.

  Raises:
    ValueError: if the arguments describe no valid forward convolution.
  """
  rhs_shape = tuple(int(s) for s in rhs_shape)
  lhs_spec, rhs_spec, out_spec = _check_dimension_numbers(dimension_numbers)
  _check_groups(feature_group_count, batch_group_count)
  geometry = _geometry(lhs.shape, rhs_shape, g.shape, dimension_numbers, window_strides,
                       padding, lhs_dilation, rhs_dilation, batch_group_count)

  if g.size == 0 or lhs.size == 0 or math.prod(rhs_shape) == 0:
    # An empty cotangent or input contributes nothing; skipping the
    # convolution also avoids a degenerate one with an empty kernel.
    return jnp.zeros(
        rhs_shape, _result_dtype(lhs, g, preferred_element_type), out_sharding=out_sharding)

  # The dW convolution contracts over the batch: the input's batch axis acts
  # as its feature axis, the cotangent's batch axis as the kernel's input
  # features, and the result's batch/feature axes are the kernel's in/out.
  t_lhs_spec = (lhs_spec[1], lhs_spec[0]) + tuple(lhs_spec[2:])
  t_g_spec = (out_spec[1], out_spec[0]) + tuple(out_spec[2:])
  t_out_spec = (rhs_spec[1], rhs_spec[0]) + tuple(rhs_spec[2:])
  # Forward feature groups pair input-channel group j with output-channel
  # group j; input channels are now the batch, so they become batch groups.
  # Forward batch groups pair batch group j with output group j; the batch
  # is now the contracted feature, so they become feature groups.
  new_feature_groups = batch_group_count
  new_batch_groups = feature_group_count

  pads = []
  for i in range(geometry.num_spatial):
    n_a = _dilated(geometry.in_size[i], geometry.lhs_dilation[i])
    k_d, m_s = geometry.kernel_extent[i], geometry.out_extent[i]
    pad_lo = geometry.padding[i][0]
    pad_hi = k_d - 1 + m_s - n_a - pad_lo
    pads.append((pad_lo, pad_hi))

  out = lax.conv_general_dilated(
      lhs,
      g,
      window_strides=geometry.rhs_dilation,
      padding=pads,
      lhs_dilation=geometry.lhs_dilation,
      rhs_dilation=geometry.window_strides,
      dimension_numbers=lax.ConvDimensionNumbers(
          lhs_spec=t_lhs_spec, rhs_spec=t_g_spec, out_spec=t_out_spec),
      feature_group_count=new_feature_groups,
      batch_group_count=new_batch_groups,
      precision=precision,
      preferred_element_type=preferred_element_type,
      out_sharding=out_sharding,
  )
  _check_result_shape(out, rhs_shape, "conv_transpose_rhs", "rhs_shape")
  return out


@dataclasses.dataclass(frozen=True)
class _Geometry:
  """Per-spatial-dimension sizes of a validated forward convolution.

  Attributes:
    window_strides: forward strides ``s``.
    lhs_dilation: forward input dilations ``a``.
    rhs_dilation: forward kernel dilations ``d``.
    padding: forward ``(lo, hi)`` pairs.
    in_size: undilated input sizes ``n``.
    kernel_extent: dilated kernel sizes ``k_d``.
    out_extent: output sizes dilated by the stride, ``m_s``.
  """

  window_strides: tuple[int, ...]
  lhs_dilation: tuple[int, ...]
  rhs_dilation: tuple[int, ...]
  padding: tuple[tuple[int, int], ...]
  in_size: tuple[int, ...]
  kernel_extent: tuple[int, ...]
  out_extent: tuple[int, ...]

  @property
  def num_spatial(self) -> int:
    return len(self.in_size)


def _geometry(
    lhs_shape: Sequence[int],
    rhs_shape: Sequence[int],
    out_shape: Sequence[int],
    dn: lax.ConvDimensionNumbers,
    window_strides: Sequence[int],
    padding: Padding,
    lhs_dilation: Sequence[int],
    rhs_dilation: Sequence[int],
    batch_group_count: int,
) -> _Geometry:
  """Checks that ``out_shape`` is the forward output shape; returns the sizes.

  The padding formulas produce a result of the requested shape even for an
  inconsistent cotangent, so without this check a wrong call would silently
  compute garbage.

  Raises:
    ValueError: on mismatched ranks, parameter lengths or cotangent shape.
  """
  lhs_spec, rhs_spec, out_spec = dn
  num_spatial = len(lhs_shape) - 2
  if not len(rhs_shape) == len(out_shape) == len(lhs_shape):
    raise ValueError(
        f"Rank mismatch: lhs {tuple(lhs_shape)}, rhs {tuple(rhs_shape)}, "
        f"cotangent {tuple(out_shape)}.")
  params = dict(window_strides=window_strides, padding=padding,
                lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation)
  for name, value in params.items():
    if len(value) != num_spatial:
      raise ValueError(f"{name} needs {num_spatial} entries, got {value!r}.")
  strides = tuple(int(s) for s in window_strides)
  lhs_dil = tuple(int(f) for f in lhs_dilation)
  rhs_dil = tuple(int(f) for f in rhs_dilation)
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)

  in_size = tuple(lhs_shape[i] for i in lhs_spec[2:])
  kernel_extent = tuple(_dilated(rhs_shape[i], f) for i, f in zip(rhs_spec[2:], rhs_dil))
  batch = lhs_shape[lhs_spec[0]]
  if batch % batch_group_count:
    raise ValueError(
        f"Batch size {batch} is not divisible by batch_group_count {batch_group_count}.")
  expected = [0] * len(out_shape)
  expected[out_spec[0]] = batch // batch_group_count
  expected[out_spec[1]] = rhs_shape[rhs_spec[0]]
  for i, o in enumerate(out_spec[2:]):
    span = _dilated(in_size[i], lhs_dil[i]) + pads[i][0] + pads[i][1] - kernel_extent[i]
    expected[o] = max(0, span // strides[i] + 1)
  if tuple(out_shape) != tuple(expected):
    raise ValueError(
        f"Cotangent shape {tuple(out_shape)} does not match the forward output "
        f"shape {tuple(expected)} of lhs {tuple(lhs_shape)} and rhs "
        f"{tuple(rhs_shape)} with {params}.")
  out_extent = tuple(_dilated(out_shape[o], s) for o, s in zip(out_spec[2:], strides))
  return _Geometry(window_strides=strides, lhs_dilation=lhs_dil, rhs_dilation=rhs_dil,
                   padding=pads, in_size=in_size, kernel_extent=kernel_extent,
                   out_extent=out_extent)


def _dilated(size: int, factor: int) -> int:
  """Length of ``size`` elements with ``factor - 1`` holes between neighbours."""
  return 0 if size == 0 else (size - 1) * factor + 1


def _ones_if_none(values: Sequence[int] | None, n: int) -> tuple[int, ...]:
  return (1,) * n if values is None else tuple(int(v) for v in values)


def _move_factor(x: jax.Array, src: int, dst: int, factor: int) -> jax.Array:
  """Splits ``factor`` (major) off axis ``src`` and makes it major on ``dst``.

  The rank is unchanged: axis ``src`` shrinks by ``factor`` and axis ``dst``
  grows by it. Only reshapes and a transpose, so the dtype is kept.

  Args:
    x: array to regroup.
    src: axis whose size is ``factor * rest``, group index major.
    dst: axis that receives the group index as its major part.
    factor: the group count.

  Returns:
    The regrouped array.
  """
  shape = list(x.shape)
  if shape[src] % factor:
    raise ValueError(f"Axis {src} of shape {tuple(shape)} is not divisible by {factor}.")
  split = shape[:src] + [factor, shape[src] // factor] + shape[src + 1:]
  x = jnp.reshape(x, split)
  # Removing the factor axis leaves the original axis order, so placing it at
  # index ``dst`` puts it immediately before (i.e. major to) the target axis.
  x = jnp.moveaxis(x, src, dst)
  merged = list(shape)
  merged[src] //= factor
  merged[dst] *= factor
  return jnp.reshape(x, merged)


def _check_dimension_numbers(dn: Any) -> lax.ConvDimensionNumbers:
  if not isinstance(dn, lax.ConvDimensionNumbers):
    raise TypeError(
        "dimension_numbers must be a lax.ConvDimensionNumbers; convert with "
        f"lax.conv_dimension_numbers(lhs_shape, rhs_shape, dn). Got {dn!r}.")
  return dn


def _check_groups(feature_group_count: int, batch_group_count: int) -> None:
  if feature_group_count < 1 or batch_group_count < 1:
    raise ValueError("Group counts must be >= 1, got "
                     f"feature_group_count={feature_group_count}, "
                     f"batch_group_count={batch_group_count}.")
  if feature_group_count > 1 and batch_group_count > 1:
    raise ValueError("At most one of feature_group_count and batch_group_count "
                     "may exceed 1 (as in lax.conv_general_dilated).")


def _result_dtype(a: jax.Array, b: jax.Array, preferred: Any) -> Any:
  # Same rule as the convolution itself: the preferred type when given, else
  # the (shared) operand type.
  return jnp.dtype(preferred) if preferred is not None else jnp.result_type(a.dtype, b.dtype)


def _check_result_shape(out: jax.Array, shape: tuple[int, ...], fn: str, arg: str) -> None:
  # Guaranteed by the validated geometry; a failure here is a bug in this module.
  if out.shape != shape:
    raise AssertionError(f"{fn} produced shape {out.shape}, expected {arg}={shape}.")
