"""Tests for qtrain.conv_transpose against JAX's own convolution VJP.

All inputs are small integers stored as floats, so every product and sum is
exact in float32, int32 and (for the fp8 operands) float32 accumulation; the
explicit transposes must therefore match the float32 autodiff oracle bit for
bit, whatever the operand dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from qtrain.conv_transpose import conv_transpose_lhs, conv_transpose_rhs, resolve_padding

NHWC = ("NHWC", "HWIO", "NHWC")
NCHW = ("NCHW", "OIHW", "NCHW")
NWC = ("NWC", "WIO", "NWC")
NDHWC = ("NDHWC", "DHWIO", "NDHWC")
# Every axis in a different place in each operand, to catch spec mix-ups.
SCRAMBLED = ("HWCN", "IHWO", "CNWH")
ASYM = ((1, 0), (2, 1))


@dataclasses.dataclass(frozen=True)
class Case:
  """One forward convolution configuration."""

  name: str
  dn: tuple[str, str, str]
  in_spatial: tuple[int, ...]
  kernel_spatial: tuple[int, ...]
  strides: tuple[int, ...]
  padding: Any
  batch: int = 2
  in_features: int = 4
  out_features: int = 6
  lhs_dilation: tuple[int, ...] | None = None
  rhs_dilation: tuple[int, ...] | None = None
  feature_group_count: int = 1
  batch_group_count: int = 1

  def _shape(self, spec: str, sizes: dict[str, Any]) -> tuple[int, ...]:
    # lax orders spatial dimensions as they appear in the kernel spec.
    letters = [c for c in self.dn[1] if c not in "OI"]
    sizes = dict(sizes)
    sizes.update(zip(letters, sizes.pop("spatial"), strict=True))
    return tuple(sizes[c] for c in spec)

  @property
  def lhs_shape(self) -> tuple[int, ...]:
    return self._shape(
        self.dn[0], {"N": self.batch, "C": self.in_features, "spatial": self.in_spatial})

  @property
  def rhs_shape(self) -> tuple[int, ...]:
    sizes = {
        "O": self.out_features,
        "I": self.in_features // self.feature_group_count,
        "spatial": self.kernel_spatial,
    }
    return self._shape(self.dn[1], sizes)

  @property
  def num_spatial(self) -> int:
    return len(self.in_spatial)

  def conv_kwargs(self) -> dict[str, Any]:
    """Keyword arguments shared by the oracle and both transposes."""
    ones = (1,) * self.num_spatial
    lhs_dilation = self.lhs_dilation or ones
    rhs_dilation = self.rhs_dilation or ones
    return dict(
        window_strides=self.strides,
        padding=resolve_padding(self.padding, self.lhs_shape, self.rhs_shape, self.strides,
                                lhs_dilation, rhs_dilation, self.dn),
        lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=lax.conv_dimension_numbers(self.lhs_shape, self.rhs_shape, self.dn),
        feature_group_count=self.feature_group_count,
        batch_group_count=self.batch_group_count,
    )


CASES = [
    # NHWC / HWIO, 7x9 so neither stride divides the input evenly.
    Case("nhwc_s11_same", NHWC, (7, 9), (3, 2), (1, 1), "SAME"),
    Case("nhwc_s22_same", NHWC, (7, 9), (3, 2), (2, 2), "SAME"),
    Case("nhwc_s21_valid", NHWC, (7, 9), (3, 2), (2, 1), "VALID"),
    Case("nhwc_s22_asym", NHWC, (7, 9), (3, 2), (2, 2), ASYM),
    Case("nhwc_rhsdil22_same", NHWC, (7, 9), (3, 2), (1, 1), "SAME", rhs_dilation=(2, 2)),
    Case("nhwc_lhsdil21_rhsdil22_s22_asym", NHWC, (7, 9), (3, 2), (2, 2), ASYM,
         lhs_dilation=(2, 1), rhs_dilation=(2, 2)),
    Case("nhwc_groups2_s22_same", NHWC, (7, 9), (3, 2), (2, 2), "SAME", feature_group_count=2),
    Case("nhwc_depthwise_s21_asym", NHWC, (7, 9), (3, 2), (2, 1), ASYM, out_features=8,
         feature_group_count=4),
    Case("nhwc_batchgroups2_s22_valid", NHWC, (7, 9), (3, 2), (2, 2), "VALID", batch=4,
         batch_group_count=2),
    # NCHW / OIHW.
    Case("nchw_s22_same", NCHW, (7, 9), (3, 2), (2, 2), "SAME"),
    Case("nchw_s21_asym", NCHW, (7, 9), (3, 2), (2, 1), ASYM),
    Case("nchw_groups2_rhsdil22_same", NCHW, (7, 9), (3, 2), (1, 1), "SAME",
         rhs_dilation=(2, 2), feature_group_count=2),
    Case("nchw_depthwise_s22_same", NCHW, (7, 9), (3, 2), (2, 2), "SAME", out_features=4,
         feature_group_count=4),
    Case("nchw_batchgroups2_s21_asym", NCHW, (7, 9), (3, 2), (2, 1), ASYM, batch=4,
         batch_group_count=2),
    Case("nchw_batchgroups2_lhsdil21_rhsdil22", NCHW, (7, 9), (3, 2), (2, 2), ASYM, batch=4,
         lhs_dilation=(2, 1), rhs_dilation=(2, 2), batch_group_count=2),
    Case("nchw_groups2_lhsdil21_s21", NCHW, (7, 9), (3, 2), (2, 1), ASYM,
         lhs_dilation=(2, 1), feature_group_count=2),
    # Padding beyond the kernel extent and negative padding (cropping) make the
    # transposed paddings negative.
    Case("nchw_large_and_negative_pad", NCHW, (7, 9), (2, 2), (2, 1), ((3, 1), (-1, 2))),
    # 1-D NWC / WIO.
    Case("nwc_s2_same", NWC, (9,), (3,), (2,), "SAME"),
    Case("nwc_groups2_lhsdil2_asym", NWC, (9,), (3,), (1,), ((2, 1),), lhs_dilation=(2,),
         feature_group_count=2),
    Case("nwc_batchgroups2_rhsdil2_same", NWC, (9,), (3,), (1,), "SAME", batch=4,
         rhs_dilation=(2,), batch_group_count=2),
    # 3-D NDHWC / DHWIO.
    Case("ndhwc_s222_same", NDHWC, (3, 4, 5), (2, 2, 3), (2, 2, 2), "SAME", in_features=2,
         out_features=4),
    # Every axis permuted differently in lhs, rhs and output.
    Case("scrambled_groups2_s21_asym", SCRAMBLED, (7, 9), (3, 2), (2, 1), ASYM,
         feature_group_count=2),
    Case("scrambled_batchgroups2_s22_same", SCRAMBLED, (7, 9), (3, 2), (2, 2), "SAME", batch=4,
         batch_group_count=2),
]

# Cases that between them take every code path and layout; the fp8 and jaxpr
# checks run on these only, to keep the file fast (each XLA:CPU convolution
# costs ~0.1 s to compile).
PATH_CASES = [c for c in CASES if c.name in (
    "nhwc_lhsdil21_rhsdil22_s22_asym", "nchw_depthwise_s22_same",
    "nchw_batchgroups2_s21_asym", "nchw_large_and_negative_pad", "nwc_groups2_lhsdil2_asym",
    "ndhwc_s222_same", "scrambled_groups2_s21_asym")]
assert len(PATH_CASES) == 7


def _ids(cases: list[Case]) -> list[str]:
  return [c.name for c in cases]


def _small_ints(seed: int, shape: tuple[int, ...]) -> jax.Array:
  # Values in [-3, 3] are exact in int8, float8_e4m3fn and float8_e5m2.
  return jnp.asarray(np.random.default_rng(seed).integers(-3, 4, shape), jnp.float32)


@functools.cache
def _oracle(case: Case) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
  """Returns (x, w, g, dx, dw) from jax.vjp of the float32 convolution."""
  # The oracle gets the padding as written (e.g. 'SAME'), so it does not
  # depend on resolve_padding.
  kwargs = case.conv_kwargs() | dict(padding=case.padding)
  x = _small_ints(0, case.lhs_shape)
  w = _small_ints(1, case.rhs_shape)

  def conv(x: jax.Array, w: jax.Array) -> jax.Array:
    return lax.conv_general_dilated(x, w, precision=lax.Precision.HIGHEST, **kwargs)

  g = _small_ints(2, jax.eval_shape(conv, x, w).shape)

  @jax.jit  # One compilation instead of one per primitive keeps the file fast.
  def vjp(x: jax.Array, w: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jax.vjp(conv, x, w)[1](g)

  return x, w, g, *vjp(x, w, g)


def _transposes(case: Case, x: jax.Array, w: jax.Array, g: jax.Array,
                operand_dtype: Any = jnp.float32, **extra: Any) -> tuple[jax.Array, jax.Array]:
  """Casts (x, w, g) to operand_dtype and returns (dX, dW) from qtrain, jitted."""
  kwargs = case.conv_kwargs() | extra

  @jax.jit
  def run(x: jax.Array, w: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    x, w, g = (a.astype(operand_dtype) for a in (x, w, g))
    dx = conv_transpose_lhs(g, w, lhs_shape=case.lhs_shape, **kwargs)
    dw = conv_transpose_rhs(g, x, rhs_shape=case.rhs_shape, **kwargs)
    return dx, dw

  return run(x, w, g)


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_float32_matches_autodiff(case: Case):
  x, w, g, dx_ref, dw_ref = _oracle(case)
  dx, dw = _transposes(case, x, w, g, precision=lax.Precision.HIGHEST)
  chex.assert_trees_all_equal((dx, dw), (dx_ref, dw_ref))
  chex.assert_trees_all_equal_dtypes((dx, dw), (dx_ref, dw_ref))


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_int8_operands_accumulate_exactly_in_int32(case: Case):
  x, w, g, dx_ref, dw_ref = _oracle(case)
  dx, dw = _transposes(case, x, w, g, jnp.int8, preferred_element_type=jnp.int32)
  chex.assert_type((dx, dw), jnp.int32)
  chex.assert_trees_all_equal((dx, dw), (dx_ref.astype(jnp.int32), dw_ref.astype(jnp.int32)))


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2],
                         ids=["float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize("case", PATH_CASES, ids=_ids(PATH_CASES))
def test_fp8_operands_accumulate_exactly_in_float32(case: Case, dtype: Any):
  x, w, g, dx_ref, dw_ref = _oracle(case)
  dx, dw = _transposes(case, x, w, g, dtype, preferred_element_type=jnp.float32)
  chex.assert_type((dx, dw), jnp.float32)
  chex.assert_trees_all_equal((dx, dw), (dx_ref, dw_ref))


def _all_eqns(jaxpr: Any) -> list[Any]:
  """Equations of a jaxpr, including those of nested (e.g. pjit) jaxprs."""
  eqns = []
  for eqn in jaxpr.eqns:
    eqns.append(eqn)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr.
        if hasattr(sub, "eqns"):
          eqns.extend(_all_eqns(sub))
  return eqns


@pytest.mark.parametrize(("dtype", "acc_dtype"), [
    (jnp.int8, jnp.int32),
    (jnp.float8_e4m3fn, jnp.float32),
    (jnp.float8_e5m2, jnp.float32),
], ids=["int8", "float8_e4m3fn", "float8_e5m2"])
@pytest.mark.parametrize("case", PATH_CASES, ids=_ids(PATH_CASES))
def test_jaxpr_convolves_low_bit_operands(case: Case, dtype: Any, acc_dtype: Any):
  x, w, g, _, _ = _oracle(case)
  # Abstract operands: tracing needs no data, and no eager casts to compile.
  x, w, g = (jax.ShapeDtypeStruct(a.shape, dtype) for a in (x, w, g))
  kwargs = case.conv_kwargs() | dict(preferred_element_type=acc_dtype)
  lhs_fn = functools.partial(conv_transpose_lhs, lhs_shape=case.lhs_shape, **kwargs)
  rhs_fn = functools.partial(conv_transpose_rhs, rhs_shape=case.rhs_shape, **kwargs)
  for fn, operands in ((lhs_fn, (g, w)), (rhs_fn, (g, x))):
    eqns = _all_eqns(jax.make_jaxpr(fn)(*operands).jaxpr)
    convs = [e for e in eqns if e.primitive.name == "conv_general_dilated"]
    assert len(convs) == 1, convs
    assert [v.aval.dtype for v in convs[0].invars] == [jnp.dtype(dtype)] * 2
    assert convs[0].outvars[0].aval.dtype == jnp.dtype(acc_dtype)
    # Neither the operands nor the accumulator may be cast anywhere.
    assert not [e for e in eqns if e.primitive.name == "convert_element_type"]


def test_eager_matches_jit():
  # Everything else runs under jit; the custom_vjp backward may also run
  # eagerly, op by op. Batch groups have the most post-processing.
  case = next(c for c in CASES if c.name == "nchw_batchgroups2_s21_asym")
  x, w, g, _, _ = _oracle(case)
  x, w, g = (a.astype(jnp.int8) for a in (x, w, g))
  kwargs = case.conv_kwargs() | dict(preferred_element_type=jnp.int32)
  lhs_fn = functools.partial(conv_transpose_lhs, lhs_shape=case.lhs_shape, **kwargs)
  rhs_fn = functools.partial(conv_transpose_rhs, rhs_shape=case.rhs_shape, **kwargs)
  chex.assert_trees_all_equal(
      (jax.jit(lhs_fn)(g, w), jax.jit(rhs_fn)(g, x)), (lhs_fn(g, w), rhs_fn(g, x)))


@pytest.mark.parametrize(("lhs_shape", "rhs_shape"), [
    ((0, 7, 9, 4), (3, 2, 4, 6)),  # Empty batch.
    ((2, 2, 9, 4), (3, 2, 4, 6)),  # Kernel taller than the input: no output rows.
], ids=["empty_batch", "empty_output_rows"])
def test_zero_size_cotangent_gives_zeros(lhs_shape, rhs_shape):
  case = Case("empty", NHWC, lhs_shape[1:3], rhs_shape[:2], (1, 1), "VALID",
              batch=lhs_shape[0])
  x, w, g, dx_ref, dw_ref = _oracle(case)
  assert g.size == 0
  dx, dw = _transposes(case, x, w, g, jnp.int8, preferred_element_type=jnp.int32)
  chex.assert_type((dx, dw), jnp.int32)
  chex.assert_trees_all_equal((dx, dw), (dx_ref.astype(jnp.int32), dw_ref.astype(jnp.int32)))
  chex.assert_trees_all_equal(dw, jnp.zeros(rhs_shape, jnp.int32))


@pytest.mark.parametrize("padding", ["SAME", "SAME_LOWER", "VALID", ASYM])
@pytest.mark.parametrize("dn", [NHWC, NCHW, SCRAMBLED], ids=lambda dn: "_".join(dn))
def test_resolve_padding_reproduces_lax(dn, padding):
  case = Case("pad", dn, (7, 9), (3, 2), (2, 1), padding, rhs_dilation=(2, 1))
  pads = resolve_padding(padding, case.lhs_shape, case.rhs_shape, case.strides, None,
                         case.rhs_dilation, dn)
  assert all(isinstance(p, tuple) and len(p) == 2 for p in pads)
  assert all(isinstance(v, int) for p in pads for v in p)
  x, w = _small_ints(0, case.lhs_shape), _small_ints(1, case.rhs_shape)
  conv = functools.partial(lax.conv_general_dilated, window_strides=case.strides,
                           rhs_dilation=case.rhs_dilation, dimension_numbers=dn)
  chex.assert_trees_all_equal(conv(x, w, padding=pads), conv(x, w, padding=padding))


def test_resolve_padding_rejects_string_with_lhs_dilation():
  with pytest.raises(ValueError, match="lhs_dilation"):
    resolve_padding("SAME", (1, 7, 9, 4), (3, 2, 4, 6), (1, 1), (2, 1), None, NHWC)


def test_out_sharding_is_forwarded():
  case = Case("sharded", NWC, (9,), (3,), (2,), "SAME")
  x, w, g, dx_ref, dw_ref = _oracle(case)
  mesh = jax.make_mesh((1,), ("x",), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh):
    dx, dw = jax.jit(lambda x, w, g: (
        conv_transpose_lhs(g, w, lhs_shape=case.lhs_shape, out_sharding=P("x"),
                           **case.conv_kwargs()),
        conv_transpose_rhs(g, x, rhs_shape=case.rhs_shape, out_sharding=P(None, None, "x"),
                           **case.conv_kwargs())))(x, w, g)
    assert jax.typeof(dx).sharding.spec == P("x", None, None)
    assert jax.typeof(dw).sharding.spec == P(None, None, "x")
  chex.assert_trees_all_equal((dx, dw), (dx_ref, dw_ref))


def test_rejects_inconsistent_arguments():
  case = CASES[1]
  x, w, g, _, _ = _oracle(case)
  kwargs = case.conv_kwargs()
  with pytest.raises(ValueError, match="Cotangent shape"):
    conv_transpose_lhs(g[:, :-1], w, lhs_shape=case.lhs_shape, **kwargs)
  with pytest.raises(ValueError, match="Cotangent shape"):
    conv_transpose_rhs(g, x[:, :-2], rhs_shape=case.rhs_shape, **kwargs)
  with pytest.raises(ValueError, match="At most one"):
    conv_transpose_rhs(g, x, rhs_shape=case.rhs_shape,
                       **kwargs | dict(feature_group_count=2, batch_group_count=2))
  with pytest.raises(TypeError, match="ConvDimensionNumbers"):
    conv_transpose_lhs(g, w, lhs_shape=case.lhs_shape, **kwargs | dict(dimension_numbers=NHWC))
