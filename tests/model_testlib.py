"""Shared helpers of the quantize_model tests: data, jaxpr inspection, tiny train loops."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax import extend as jex

GEMM_PRIMITIVES = ('dot_general', 'conv_general_dilated')


@functools.lru_cache(maxsize=None)
def digits(n: int = 512) -> tuple[np.ndarray, np.ndarray]:
  """The first n scikit-learn digits as float32 [n, 8, 8] in [0, 1] and int32 labels."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  data = load_digits()
  x = (data.images[:n] / 16.0).astype(np.float32)
  return x, data.target[:n].astype(np.int32)


def batches(steps: int, batch_size: int = 32, seed: int = 0):
  """`steps` random (x [B, 8, 8], y [B]) batches of digits, the same for every model."""
  x, y = digits()
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, len(x), batch_size)
    yield jnp.asarray(x[idx]), jnp.asarray(y[idx])


@dataclasses.dataclass(frozen=True)
class Gemm:
  """One dot_general / conv of a jaxpr: its scope, primitive, operand dtypes and shapes."""
  scope: str
  primitive: str
  dtypes: tuple[str, str]
  shapes: tuple[tuple[int, ...], tuple[int, ...]]

  @property
  def quantized(self) -> bool:
    return 'qtrain/' in self.scope

  @property
  def gemm(self) -> str:
    """'fwd', 'dlhs' or 'drhs' for qtrain GEMMs, '' otherwise."""
    for name in ('fwd', 'dlhs', 'drhs'):
      if f'qtrain/{name}' in self.scope:
        return name
    return ''

  def in_layer(self, path: str) -> bool:
    """True if the GEMM runs under the named scope of layer `path` (whole segments)."""
    # 'transpose(jvp(blocks/0/fc))/qtrain/drhs' -> 'blocks/0/fc/qtrain/drhs'
    plain = re.sub(r'\w+\(|\)', '', self.scope)
    return f'/{path}/qtrain/' in f'/{plain}'


def gemms(closed_jaxpr) -> list[Gemm]:
  """Every dot_general and conv of a (closed) jaxpr, sub-jaxprs included."""
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in GEMM_PRIMITIVES:
        found.append(Gemm(str(eqn.source_info.name_stack), eqn.primitive.name,
                          tuple(v.aval.dtype.name for v in eqn.invars),
                          tuple(tuple(v.aval.shape) for v in eqn.invars)))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (list, tuple)) else (param,):
          if isinstance(sub, jex.core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jex.core.Jaxpr):
            walk(sub)

  walk(closed_jaxpr.jaxpr)
  return found


def low_bit_dtypes(preset: str, gemm: str, primitive: str) -> set[str]:
  """Operand dtypes the `gemm` ('fwd', 'dlhs', 'drhs') of a quantized layer may have.

  qtrain.dot.gemm_dtypes picks the narrowest exact carrier: integer codes of
  both operands (INT8 x INT8, and INT4 x INT4 in int4's forward) ride int8
  (s8 x s8 -> s32); the int4 preset's LUQ log-FP4 gradients ride float8
  (mixed e4m3/e5m2 convolutions as bfloat16, which XLA requires).
  """
  integer = preset == 'int8' or gemm == 'fwd'
  if not integer:
    return {'float8_e4m3fn', 'float8_e5m2', 'bfloat16'}
  if primitive == 'conv_general_dilated' and jax.default_backend() == 'cpu':
    # XLA:CPU runs int8 convolutions 10-25x slower than float32 ones, so on
    # CPU qtrain carries a conv's integer codes as exact float32 values.
    return {'float32'}
  return {'int8'}


def assert_layer_gemms(found: list[Gemm], path: str, preset: str) -> None:
  """Layer `path` runs its fwd and drhs (and dlhs, where needed) GEMMs on low-bit operands."""
  mine = [g for g in found if g.in_layer(path)]
  assert {'fwd', 'drhs'} <= {g.gemm for g in mine}, (path, [g.scope for g in found])
  for g in mine:
    assert set(g.dtypes) <= low_bit_dtypes(preset, g.gemm, g.primitive), (path, g)


def assert_float_layer(found: list[Gemm], kernel_shape: tuple[int, ...]) -> None:
  """The forward GEMM with this kernel runs in float32 outside any qtrain scope."""
  fwd = [g for g in found if g.shapes[1] == tuple(kernel_shape)]
  assert fwd, kernel_shape
  for g in fwd:
    assert not g.quantized and g.dtypes == ('float32', 'float32'), g


def assert_finite_tree(tree) -> None:
  leaves = jax.tree.leaves(tree)
  assert leaves and all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)


def assert_learns(losses: list[float]) -> None:
  """Finite losses whose last-10 mean is clearly below the first-5 mean."""
  losses = np.asarray(losses)
  assert np.all(np.isfinite(losses)), losses
  assert losses[-10:].mean() < 0.8 * losses[:5].mean(), losses
