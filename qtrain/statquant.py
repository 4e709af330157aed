"""StatQuant's gradient quantizers (Chen et al., NeurIPS 2020): PTQ, PSQ, BHQ.

StatQuant quantizes the output gradient dY of every layer with an *unbiased*
stochastic quantizer before each backward GEMM, so the fully quantized
gradient is an unbiased estimate of the QAT gradient, and chooses the
quantizer with the smallest variance at a given bit width. Every quantizer
here views dY as a matrix of N rows (the leading axis: samples; the official
code's `x.view(N, -1)`) and maps a range onto the 2^b − 1 bins of an
unsigned b-bit code with stochastic rounding (SR):

| function     | statistic                                 | used for (official code)           |
|--------------|-------------------------------------------|------------------------------------|
| `ptq`        | one zero-aligned min/max range per tensor | dY of both GEMMs (PTQ); forward W  |
| `psq`        | one min/max range per row (sample)        | dY of the dX GEMM (PSQ)            |
| `per_column` | one min/max range per column, over rows   | dY of the dW GEMM (`--persample`)  |
| `bhq`        | Householder blocks T, per-row min/max     | dY of the dX GEMM: T⁻¹·Q(T·dY)     |

All return dequantized float values of x's shape and dtype with a
straight-through gradient (`qtrain.numerics` signature). Per-element SR noise
comes from `qtrain.prng.uniform(key, ...)`. The `*Estimator` classes put PSQ,
BHQ and the per-column quantizer in the dY slots of a `qtrain.DotConfig`
(`qtrain.config.GradientEstimator`); PTQ also exists as a plain
`TensorConfig` (`ptq_config`: a zero-aligned scale and integer zero point,
so its dY codes reach an integer GEMM). Inside a dot the rows are the
leading axis of the layer output: samples for Dense and NHWC/NCHW convs, a
whole sequence for a transformer's (B, L, C) activations (the code's choice;
the INT4-transformer paper uses tokens).

BHQ (`bhq_plan`): rows are sorted by range λ; the largest rows become
"leaders", each paired with a group of small "followers"; a Householder
reflection per group spreads the leader over the group, and two diagonal
scales s ∝ w^(−1/3) balance leader and followers. The transform T is a dense
N×N float32 matrix built with static shapes (sort, cumulative sums, an N×N
group mask; no data-dependent shapes), so it runs under `jit`: O(N²) memory
and 2·N²·D extra flops for T·G and T⁻¹·Q, N = per-device batch (the official
code also multiplies by a dense N×N T). Exact integer allocation of followers
replaces the code's float cumulative rounding, which can fail its own check.

References:
  Chen, Gai, Yao, Mahoney, Gonzalez, "A Statistical Framework for
  Low-bitwidth Training of Deep Neural Networks", NeurIPS 2020,
  arXiv:2010.14298. Official code: github.com/cjf00000/StatQuant
  (`image_classification/preconditioner.py`, `quantizers/quantizers.cpp`).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from qtrain import config as cfgs
from qtrain import formats as fmts
from qtrain import prng
from qtrain import rounding as rnd
from qtrain import scaling
from qtrain.quantize import check_float, fake_quant

__all__ = ['EPS', 'check_bits', 'ptq', 'psq', 'per_column', 'bhq', 'bhq_plan', 'bhq_transform',
           'BhqPlan', 'ZeroAlignedMinMax', 'ptq_config', 'activation_config', 'PtqEstimator',
           'PsqEstimator', 'BhqEstimator', 'PerColumnEstimator']

# The official code widens every min/max range by this absolute margin.
EPS = 1e-8

_HIGHEST = lax.Precision.HIGHEST


def check_bits(bits, name: str = 'bits') -> int:
  """Returns `bits` if it is an int in 2..8; TypeError/ValueError naming `name` otherwise."""
  if isinstance(bits, bool) or not isinstance(bits, int):
    raise TypeError(f'{name} must be an int, got {bits!r}.')
  if not 2 <= bits <= 8:
    raise ValueError(f'{name}={bits} is out of range; allowed: 2..8.')
  return bits


def _check_key(key, fn: str) -> None:
  if key is None:
    raise ValueError(f'{fn}: key is required (stochastic rounding), got key=None.')


def _rows(x: jax.Array) -> jax.Array:
  """x as float32 (N, D) with N = x.shape[0] (the code's view(N, -1))."""
  n = x.shape[0] if x.ndim else 1
  return x.astype(jnp.float32).reshape(n, -1)


def _straight_through(x: jax.Array, y: jax.Array) -> jax.Array:
  y = y.reshape(x.shape).astype(x.dtype)
  return lax.stop_gradient(y) + (x - lax.stop_gradient(x))


# ---------------------------------------------------------------------------
# min/max quantizers
# ---------------------------------------------------------------------------
# Identities ±inf keep empty groups defined (and non-finite: nothing to scale).
def _min(x, axis, keepdims):
  return jnp.min(x, axis=axis, keepdims=keepdims, initial=jnp.inf)


def _max(x, axis, keepdims):
  return jnp.max(x, axis=axis, keepdims=keepdims, initial=-jnp.inf)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ZeroAlignedMinMax(scaling.CustomCalibration):
  """StatQuant's per-group zero-aligned min/max range (`ScalarPreconditioner`).

  With mn = min(min(x) − 1e-8, 0), mx = max(max(x) + 1e-8, 0) and B = qmax of
  an unsigned format: k = ⌊−mn·B/(mx − mn)⌋ is the code of zero and the step
  is Δ = −mn/k, so 0 maps exactly to the integer k and [mn, (B − k)·Δ] ⊇
  [min, max] (nothing is clipped; SR stays unbiased).

  The official code divides by k, which is 0 when the tensor is (almost)
  non-negative: k = 0 with mn = 0 gives 0/0 = NaN, k = 0 with
  0 < −mn < one step gives an infinite range. Guard (documented deviation):
  mn = 0 → k = 0, Δ = mx/B (the later INT4-training code's patch); a
  negative part smaller than one step → k = 1, Δ = mx/(B − 1), which keeps
  every value inside the range (the INT4 patch would clip it to 0).

  Returns (scale Δ, zero point k) of the group shape; a group with a NaN or
  ±Inf gets a NaN scale (it dequantizes to NaN).
  """

  def compute(self, x, fmt, granularity):
    if not (isinstance(fmt, fmts.IntFormat) and not fmt.signed):
      raise ValueError(f'ZeroAlignedMinMax needs an unsigned IntFormat, got {fmt.name}.')
    bins = float(fmt.qmax)
    lo = scaling.group_reduce(x, _min, granularity)
    hi = scaling.group_reduce(x, _max, granularity)
    mn = jnp.minimum(lo - EPS, 0.0)
    mx = jnp.maximum(hi + EPS, 0.0)
    k = jnp.floor(-mn * bins / (mx - mn))
    aligned = k >= 1
    k_safe = jnp.where(aligned, k, 1.0)
    step = jnp.where(aligned, -mn / k_safe, jnp.where(mn == 0, mx / bins, mx / (bins - 1)))
    zero = jnp.where(aligned, k, jnp.where(mn == 0, 0.0, 1.0))
    finite = jnp.isfinite(lo) & jnp.isfinite(hi)
    return jnp.where(finite, step, jnp.nan), jnp.where(finite, zero, 0.0)


def ptq_config(bits: int = 8, rounding: rnd.Rounding = 'stochastic') -> cfgs.TensorConfig:
  """The TensorConfig of `ptq`: unsigned b-bit codes, zero-aligned per-tensor range.

  Args:
    bits: 2..8.
    rounding: 'stochastic' (gradients) or 'nearest' (StatQuant's forward weights).

  Returns:
    A per-tensor `TensorConfig`; inside a dot its codes minus the zero point
    run an integer GEMM.
  """
  check_bits(bits)
  return cfgs.TensorConfig(format=fmts.IntFormat(bits=bits, signed=False), rounding=rounding,
                           calibration=ZeroAlignedMinMax())


def activation_config(bits: int = 8) -> cfgs.TensorConfig:
  """StatQuant's forward activation rule: per-tensor asymmetric min/max, nearest.

  The code's `ScalarPreconditionerAct` uses the real offset z = min(x) − 1e-8,
  which is not an integer zero point; this uses `scaling.MinMax` (range
  [min(x, 0), max(x, 0)], integer zero point), identical for ReLU outputs and
  for any tensor whose range contains 0 up to one step's alignment of zero.

  Args:
    bits: 2..8.

  Returns:
    A per-tensor `TensorConfig` with round-to-nearest.
  """
  check_bits(bits)
  return cfgs.TensorConfig(format=fmts.IntFormat(bits=bits, signed=False),
                           calibration=scaling.MinMax())


def ptq(x: jax.Array, key: jax.Array | None = None, *, bits: int = 8,
        rounding: rnd.Rounding = 'stochastic') -> jax.Array:
  """Per-tensor zero-aligned min/max quantization (StatQuant's PTQ).

  Args:
    x: float array, any shape.
    key: PRNG key, required for rounding='stochastic'.
    bits: 2..8 (B = 2^bits − 1 bins).
    rounding: 'stochastic' (the gradient quantizer, unbiased) or 'nearest'
      (the forward weight quantizer).

  Returns:
    Dequantized values, shape and dtype of x; exact zeros stay exact zeros.

  Raises:
    TypeError, ValueError: bad bits, a non-float x, a missing key.

  References:
    Chen et al. 2020; `preconditioner.py::ScalarPreconditioner` (see
    `ZeroAlignedMinMax` for the 0/0 guard).
  """
  check_float(x)
  return fake_quant(x, ptq_config(bits, rounding), key=key)


def _minmax_sr(x2: jax.Array, u: jax.Array, bins: float, axis: int) -> jax.Array:
  """SR of float32 x2 onto [min − 1e-8, max + 1e-8] split into `bins` steps, per `axis` slice.

  A slice whose min equals its max (e.g. all zeros) is returned exactly: the
  code's 1e-8 margin vanishes in float32 for |x| > ~0.1 and its 0/0 gives
  NaN. A slice with NaN/Inf becomes NaN.
  """
  lo = jnp.min(x2, axis=axis, keepdims=True)
  hi = jnp.max(x2, axis=axis, keepdims=True)
  z = lo - EPS
  const = hi == lo
  step = jnp.where(const, 1.0, (hi + EPS - z) / bins)
  q = jnp.clip(rnd.round_stochastic((x2 - z) / step, u), 0.0, bins)
  y = jnp.where(const, x2, q * step + z)
  return jnp.where(jnp.isfinite(lo) & jnp.isfinite(hi), y, jnp.nan)


def _minmax(x, key, bits, axis, fn):
  check_float(x)
  check_bits(bits)
  _check_key(key, fn)
  if x.size == 0:
    return x
  x2 = _rows(lax.stop_gradient(x))
  u = prng.uniform(key, x2.shape)
  return _straight_through(x, _minmax_sr(x2, u, float(2 ** bits - 1), axis))


def psq(x: jax.Array, key: jax.Array | None = None, *, bits: int = 8) -> jax.Array:
  """Per-sample quantization (StatQuant's PSQ): one min/max range per row.

  Rows are x.shape[0] (samples; the rest is flattened, as the code's
  `view(N, -1)`). Row i: z = min_i − 1e-8, Δ = (max_i + 1e-8 − z)/B, SR of
  (x − z)/Δ onto {0..B}, back to q·Δ + z. Unbiased.

  Args:
    x: float array (a gradient), leading axis = samples.
    key: PRNG key (required).
    bits: 2..8.

  Returns:
    Dequantized values, shape and dtype of x. Constant rows (all-zero ones
    included) are returned exactly; a row with NaN/Inf becomes NaN.

  References:
    Chen et al. 2020; `preconditioner.py::DiagonalPreconditioner(left=True)`.
  """
  return _minmax(x, key, bits, 1, 'psq')


def per_column(x: jax.Array, key: jax.Array | None = None, *, bits: int = 8) -> jax.Array:
  """StatQuant's per-column gradient quantizer: one min/max range per column over the batch.

  The weight-gradient path of the code's `--persample=True` runs (PSQ and
  BHQ): x viewed as (N, D), column j gets z_j = min_i x_ij − 1e-8 and
  Δ_j = (max_i x_ij + 1e-8 − z_j)/B. For a conv gradient a column is one
  (h, w, channel) position, so its scale varies along the axes the dW GEMM
  contracts: a simulation, not a GEMM-compatible factorization.

  Args:
    x: float array (a gradient), leading axis = samples.
    key: PRNG key (required).
    bits: 2..8.

  Returns:
    Dequantized values, shape and dtype of x (constant columns exact, NaN
    columns NaN).

  References:
    Chen et al. 2020; `preconditioner.py::DiagonalPreconditioner(left=False)`.
  """
  return _minmax(x, key, bits, 0, 'per_column')


# ---------------------------------------------------------------------------
# block Householder quantizer
# ---------------------------------------------------------------------------
class BhqPlan(NamedTuple):
  """BHQ's grouping and transform for N rows (`bhq_plan`).

  Attributes:
    order: int32 [N], rows sorted by range, descending (position p holds row order[p]).
    num_leaders: int32 scalar G: sorted positions 0..G−1 are leaders.
    allocation: int32 [N], c_i = followers given to leaders 0..i (cumulative;
      c_{G−1} = N − G; entries i >= G repeat N − G).
    group: int32 [N], group of each sorted position (leader i leads group i).
    size: int32 [N], size of the group of each sorted position (>= 2).
    scale: float32 [N], the diagonal scale s of each row (original order).
    transform: float32 [N, N], T (original row order).
    inverse: float32 [N, N], T⁻¹.
  """
  order: jax.Array
  num_leaders: jax.Array
  allocation: jax.Array
  group: jax.Array
  size: jax.Array
  scale: jax.Array
  transform: jax.Array
  inverse: jax.Array


def _householder_max(size: jax.Array) -> jax.Array:
  """max |H_sz| of H = I − 2vvᵀ mapping e1 to 1/√sz·1 (entries in closed form).

  H[0, :] = H[:, 0] = 1/√sz; among followers H[j, k] = δ_jk − 1/(sz − √sz)
  (off-diagonal entries exist only for sz >= 3).
  """
  r = jnp.sqrt(size)
  c = 1.0 / (size - r)
  off = jnp.where(size >= 3, c, 0.0)
  return jnp.maximum(jnp.maximum(1.0 / r, jnp.abs(1.0 - c)), off)


def bhq_plan(ranges: jax.Array) -> BhqPlan:
  """BHQ's transform from per-row ranges λ (the C++ `get_transform`, jit-friendly).

  Steps (Chen et al. 2020, `quantizers/quantizers.cpp::get_transform`):

  1. sort λ descending; m = the first m >= 1 with m·λ_(N−m)/S_m > 1, S_m the
     sum of the N − m largest (the C++ stop rule, strict `>`); G = N − m
     leaders, m followers. Capped at m = N − 1 (N = 2, where the C++ loop
     reads out of bounds).
  2. leader i gets a share m·λ_(i)/S_G of the followers; the cumulative
     counts are c_i = round(m·Σ_{k<=i} λ_(k) / Σ_{k<G} λ_(k)) (round half up,
     as `roundf`), computed as a ratio of partial sums so c_{G−1} = m
     exactly, then forced to 1 + c_{i−1} <= c_i <= m − (G − 1 − i) so every
     group has at least one follower (the stop rule makes every share > 1;
     float rounding could still tie two counts). Leader i takes the followers
     at sorted positions G + c_{i−1} .. G + c_i − 1 (the largest followers go
     to the largest leader); sz_i = 1 + c_i − c_{i−1}.
  3. per group, H_sz = I − 2vvᵀ with v ∝ 1/√sz·1 − e1 (maps e1 to
     1/√sz·1); w1 = λ_leader/√sz, w2 = λ_(first follower)·max|H_sz|;
     s1 = w1^(−1/3), s2 = (w2/(sz − 1))^(−1/3), both times
     sqrt(1/s1² + 1/s2²).
  4. T = Pᵀ·blockdiag(H)·P·diag(s), T⁻¹ = diag(1/s)·Pᵀ·blockdiag(H)·P (H is
     symmetric and orthogonal), P grouping the rows.

  Args:
    ranges: float [N] per-row ranges (the code's max − min + 1e-8); values
      below 1e-8 and non-finite ones are taken as 1e-8.

  Returns:
    BhqPlan. N = 1: T = T⁻¹ = [[1]], one group of size 1.

  Raises:
    ValueError: ranges is not one-dimensional.
  """
  lam = jnp.asarray(ranges, jnp.float32)
  if lam.ndim != 1:
    raise ValueError(f'ranges must be one-dimensional (one range per row), got shape '
                     f'{lam.shape}.')
  n = lam.shape[0]
  if n <= 1:
    one = jnp.ones((n, n), jnp.float32)
    z = jnp.zeros((n,), jnp.int32)
    return BhqPlan(order=z, num_leaders=jnp.int32(n), allocation=z, group=z,
                   size=jnp.ones((n,), jnp.int32), scale=jnp.ones((n,), jnp.float32),
                   transform=one, inverse=one)
  # Ranges >= 1e-8 (the code's margin, always there in bhq) keep the plan well
  # defined; non-finite ones are replaced too (bhq() reports non-finite input).
  lam = jnp.where(jnp.isfinite(lam), jnp.maximum(lam, EPS), EPS)
  order = jnp.argsort(-lam, stable=True).astype(jnp.int32)
  v = lam[order]
  csum = jnp.cumsum(v)
  # 1. leaders: for m = 1..N-1, S_m = csum[N-m-1] is the sum of the N-m largest.
  m_all = jnp.arange(1, n, dtype=jnp.int32)
  share = m_all.astype(jnp.float32) * v[n - 1 - m_all] / csum[n - 1 - m_all]
  stop = share > 1
  m = jnp.where(jnp.any(stop), m_all[jnp.argmax(stop)], n - 1)
  g = n - m
  # 2. exact integer allocation of the m followers.
  i = jnp.arange(n, dtype=jnp.int32)
  is_leader = i < g
  c = jnp.floor(m.astype(jnp.float32) * csum / csum[g - 1] + 0.5).astype(jnp.int32)
  c = lax.cummax(jnp.maximum(c - i, 1)) + i  # c_i >= c_{i-1} + 1, c_0 >= 1
  c = jnp.minimum(c, m - (g - 1 - i))  # room for one follower per later leader
  c = jnp.where(is_leader, c, m)
  prev = jnp.concatenate([jnp.zeros((1,), jnp.int32), c[:-1]])
  group_size = 1 + c - prev  # valid for leaders
  # Group of each sorted position: leaders their own; follower j = p - G joins
  # the first leader i with c_i > j, i.e. group = #{i < G : c_i <= j}.
  j = i - g
  below = (c[None, :] <= j[:, None]) & is_leader[None, :]
  group = jnp.where(is_leader, i, jnp.sum(below, axis=1, dtype=jnp.int32))
  size = group_size[group]
  # 3. scales.
  sz = size.astype(jnp.float32)
  hmax = _householder_max(sz)
  lam1 = v[group]
  lam2 = v[jnp.clip(g + prev[group], 0, n - 1)]
  s1 = (lam1 / jnp.sqrt(sz)) ** (-1.0 / 3)
  s2 = (lam2 * hmax / (sz - 1)) ** (-1.0 / 3)
  norm = jnp.sqrt(1 / (s1 * s1) + 1 / (s2 * s2))
  s_sorted = jnp.where(is_leader, s1, s2) * norm
  # 4. blockdiag(H) in sorted positions: entries depend only on group
  # membership and on who is the leader.
  same = group[:, None] == group[None, :]
  lead = is_leader[:, None] | is_leader[None, :]
  inv_sqrt = (1.0 / jnp.sqrt(sz))[:, None]
  follower = (i[:, None] == i[None, :]).astype(jnp.float32) - (1.0 / (sz - jnp.sqrt(sz)))[:, None]
  block = jnp.where(same, jnp.where(lead, inv_sqrt, follower), 0.0)
  t_sorted = block * s_sorted[None, :]
  t_inv_sorted = block.T * (1.0 / s_sorted)[:, None]
  inv = jnp.argsort(order).astype(jnp.int32)
  scale = s_sorted[inv]
  return BhqPlan(order=order, num_leaders=g.astype(jnp.int32),
                 allocation=c.astype(jnp.int32), group=group, size=size.astype(jnp.int32),
                 scale=scale, transform=t_sorted[inv][:, inv],
                 inverse=t_inv_sorted[inv][:, inv])


def _row_ranges(x2: jax.Array) -> jax.Array:
  return jnp.max(x2, axis=1) - jnp.min(x2, axis=1) + EPS


def bhq_transform(g: jax.Array) -> tuple[jax.Array, jax.Array]:
  """BHQ's (T, T⁻¹) for a gradient g (rows = g.shape[0]), see `bhq_plan`.

  Args:
    g: float array, leading axis = samples.

  Returns:
    (T, T⁻¹), float32 [N, N] with T⁻¹·T = I up to float rounding.
  """
  check_float(g)
  plan = bhq_plan(_row_ranges(_rows(lax.stop_gradient(g))))
  return plan.transform, plan.inverse


def bhq(x: jax.Array, key: jax.Array | None = None, *, bits: int = 8) -> jax.Array:
  """Block Householder quantization (StatQuant's BHQ): T⁻¹·Q_row(T·G).

  G = x viewed as (N, D), rows = samples; T from the per-row ranges
  (`bhq_plan`); Q_row = the per-row min/max SR quantizer of `psq`. Unbiased
  (T depends on G only, not on the noise): E[bhq(G)] = T⁻¹·T·G = G. T and
  T⁻¹ multiply in float32 (precision HIGHEST), as the code's dense matmuls.

  Args:
    x: float array (a gradient), leading axis = samples.
    key: PRNG key (required).
    bits: 2..8.

  Returns:
    Dequantized values, shape and dtype of x; all-zero input gives zeros;
    any NaN/Inf makes the whole output NaN (T mixes rows).

  References:
    Chen et al. 2020; `preconditioner.py::BlockwiseHouseholderPreconditioner`,
    `quantizers/quantizers.cpp::get_transform`.
  """
  check_float(x)
  check_bits(bits)
  _check_key(key, 'bhq')
  if x.size == 0:
    return x
  x2 = _rows(lax.stop_gradient(x))
  plan = bhq_plan(_row_ranges(x2))
  y = jnp.matmul(plan.transform, x2, precision=_HIGHEST)
  yq = _minmax_sr(y, prng.uniform(key, y.shape), float(2 ** bits - 1), 1)
  out = jnp.matmul(plan.inverse, yq, precision=_HIGHEST)
  out = jnp.where(jnp.all(jnp.isfinite(x2)), out, jnp.nan)
  return _straight_through(x, out)


# ---------------------------------------------------------------------------
# dY rules for qtrain.DotConfig
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class _Estimator(cfgs.GradientEstimator):
  """A StatQuant quantizer in a dY slot; the GEMM multiplies its estimate in float32."""
  bits: int = 8

  def __post_init__(self):
    check_bits(self.bits)

  def _quantize(self, g, key):
    raise NotImplementedError

  def estimate(self, g, key, *, gemm, residual, kept):
    del gemm, residual, kept  # the quantizer depends on dY only
    return self._quantize(g.astype(jnp.float32), key)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PtqEstimator(_Estimator):
  """`ptq` as a GradientEstimator (same samples as `ptq_config` for the same key)."""

  def _quantize(self, g, key):
    return ptq(g, key, bits=self.bits)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PsqEstimator(_Estimator):
  """`psq` in a dY slot. Its per-sample offset z_i is not an integer zero
  point, so the dX GEMM is simulated in float32 (a low-bit GEMM plus a
  rank-1 offset term in exact arithmetic)."""

  def _quantize(self, g, key):
    return psq(g, key, bits=self.bits)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BhqEstimator(_Estimator):
  """`bhq` in a dY slot (dlhs.lhs): T⁻¹·Q(T·dY), multiplied with W in float32."""

  def _quantize(self, g, key):
    return bhq(g, key, bits=self.bits)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PerColumnEstimator(_Estimator):
  """`per_column` in a dY slot (drhs.rhs): a simulation (see `per_column`)."""

  def _quantize(self, g, key):
    return per_column(g, key, bits=self.bits)
