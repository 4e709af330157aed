"""Shared oracles of dot_test.py and conv_test.py (not a test module itself).

1. Reference quantizers (absmax INT8 codes and scales, in numpy) and the
   division conventions XLA may use (see `DIVISIONS`).
2. Noise models and sample-size-derived bounds for the stochastic-gradient
   tests.

A stochastic gradient rule replaces each element g_i of the cotangent by a
random value Q_i with E[Q_i] = g_i that only takes the two grid neighbours
lo_i < hi_i of g_i (in g's units): Q_i = lo_i + h_i·B_i with h_i = hi_i - lo_i
and B_i ~ Bernoulli(p_i), p_i = (g_i - lo_i)/h_i. The elements are independent,
so the per-element variance is h²p(1-p) and the fourth cumulant
h⁴p(1-p)(1-6p(1-p)). A backward GEMM is a fixed linear map J of that noise
(the QAT backward, whose operands are the forward's dequantized codes), so the
covariance of one gradient sample is C = J·diag(v)·Jᵀ and its
(a, a, b, b) fourth cumulant is K4 = J²·diag(c4)·(J²)ᵀ. Every tolerance below
is a multiple `SIGMAS` of a standard deviation computed from C, K4 and the
number of samples n, never a hand-tuned number.
"""

from __future__ import annotations

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np

# Width of every acceptance band, in standard deviations of the statistic. The
# statistics are means of many (weakly dependent) terms, close to Gaussian:
# a 6σ band fails by chance with probability ~2e-9 (and <= 1/36 by Chebyshev
# whatever the distribution); the seeds are fixed, so a pass is reproducible.
SIGMAS = 6.0


# ---------------------------------------------------------------------------
# reference quantizers
# ---------------------------------------------------------------------------
F32 = np.float32

# XLA rewrites a division by a broadcast value, x / broadcast(s), into the
# multiplication x · fl(1/s) by the correctly rounded reciprocal
# (AlgebraicSimplifier). Whether the rewrite applies depends on jit and on
# shapes (a (1, 1) scale divided eagerly stays an IEEE division; the same under
# jit does not), so the library's max|x|/127 and x/s each evaluate to one of
# two float32 values. The references therefore enumerate both conventions for
# each division and the tests accept a match with any of them, bit for bit,
# and nothing else. Where both conventions agree (power-of-two scales) there
# is a single reference.
DIVISIONS = ('ieee', 'reciprocal')


def div(a, b, mode: str) -> np.ndarray:
  a, b = np.asarray(a, F32), np.asarray(b, F32)
  return a / b if mode == 'ieee' else a * (F32(1) / b)


def unique(arrays):
  out = []
  for a in arrays:
    if not any(all(np.array_equal(x, y) for x, y in zip(a, b)) for b in out):
      out.append(a)
  return out


def absmax_candidates(a, keep_axes=(), qmax: int = 127) -> list[tuple[np.ndarray, np.ndarray]]:
  """Absmax codes (int64) and float32 scales (rank of a, 1 on reduced axes), per convention."""
  a = np.asarray(a, F32)
  reduced = tuple(d for d in range(a.ndim) if d not in keep_axes)
  amax = np.max(np.abs(a), axis=reduced, keepdims=True)
  amax = np.where(amax == 0, F32(1), amax).astype(F32)  # all-zero groups: scale 1
  out = []
  for scale_div in DIVISIONS:
    s = div(amax, qmax, scale_div)
    for code_div in DIVISIONS:
      q = np.clip(np.round(div(a, s, code_div)), -qmax, qmax).astype(np.int64)
      out.append((q, s))
  return unique(out)


def absmax_int8(a, keep_axes=()) -> tuple[np.ndarray, np.ndarray]:
  """The IEEE-division absmax INT8 reference (for statistics, where ulps do not matter)."""
  return absmax_candidates(a, keep_axes)[0]


def codes_candidates(a, s, lo: int, hi: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """Round-to-nearest codes of a for a given float32 scale s, per convention."""
  a, s = np.asarray(a, F32), np.asarray(s, F32)
  return unique([(np.clip(np.round(div(a, s, d)), lo, hi).astype(np.int64), s)
                 for d in DIVISIONS])


def pow2_groups(seed: int, shape, keep_axes=()) -> np.ndarray:
  """Random data whose absmax in every scale group is 127·2^k (k per group).

  Then max|x|/127 = 2^k exactly and x/s is exact, under both conventions.
  """
  rng = np.random.default_rng(seed)
  group_shape = tuple(shape[d] if d in keep_axes else 1 for d in range(len(shape)))
  top = 127 * np.exp2(rng.integers(-9, -3, size=group_shape)).astype(F32)
  a = (rng.uniform(-0.99, 0.99, size=shape) * top).astype(F32)
  first = tuple(slice(None) if d in keep_axes else 0 for d in range(len(shape)))
  a[first] = top[first] * np.where(rng.random(top[first].shape) < 0.5, -1, 1)
  return a


def assert_one_of(got, candidates) -> None:
  """got equals one of the candidate references bit for bit (else: diff to the nearest)."""
  got = np.asarray(got)
  if any(np.array_equal(got, c) for c in candidates):
    return
  nearest = min(candidates, key=lambda c: int(np.sum(got != c)))
  chex.assert_trees_all_equal(got, nearest)


# ---------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NoiseModel:
  """Second- and fourth-order statistics of one flattened gradient sample."""
  cov: np.ndarray  # (M, M) covariance C
  cum4: np.ndarray  # (M, M) cum(e_a, e_a, e_b, e_b)

  @property
  def var(self) -> np.ndarray:
    return np.diag(self.cov)

  @property
  def rho2_sum(self) -> float:
    """Σ_ab ρ_ab²: M for independent elements, up to M² for identical ones."""
    d = self.var
    return float(np.sum(self.cov ** 2 / np.outer(d, d)))

  def kurt_sum(self) -> float:
    """Σ_ab cum4_ab / (σ_a² σ_b²)."""
    d = self.var
    return float(np.sum(self.cum4 / np.outer(d, d)))


def two_point(lo: np.ndarray, hi: np.ndarray, g: np.ndarray):
  """Step h and up-probability p of an unbiased two-point rounding of g in [lo, hi]."""
  lo, hi, g = (np.asarray(a, np.float64) for a in (lo, hi, g))
  h = hi - lo
  p = np.where(h > 0, (g - lo) / np.where(h > 0, h, 1.0), 0.0)
  return h, p


def int_sr(g: np.ndarray, step: np.ndarray):
  """(h, p) of stochastic rounding of g onto the grid step·Z (step broadcastable)."""
  g = np.asarray(g, np.float64)
  step = np.broadcast_to(np.asarray(step, np.float64), g.shape)
  lo = np.floor(g / step) * step
  return two_point(lo, lo + step, g)


def log2_sr(g: np.ndarray, alpha: float, max_exponent: int):
  """(h, p) of LUQ's rounding of g onto {0, ±alpha·2^k, 0 <= k <= max_exponent}.

  Below alpha: stochastic underflow between 0 and alpha; between powers of two:
  stochastic rounding in the linear domain; at or above the top level: none.
  """
  a = np.abs(np.asarray(g, np.float64)) / alpha
  k = np.floor(np.log2(np.where(a >= 1, a, 1.0)))
  lo = np.where(a < 1, 0.0, 2.0 ** k)
  hi = np.where(a < 1, 1.0, 2.0 ** (k + 1))
  top = 2.0 ** max_exponent
  lo = np.where(a >= top, a, lo)
  hi = np.where(a >= top, a, hi)
  return two_point(lo * alpha, hi * alpha, a * alpha)


def noise_model(jac: np.ndarray, h: np.ndarray, p: np.ndarray, samples: int = 1) -> NoiseModel:
  """Statistics of J·e for independent two-point noise e (averaged over `samples` draws)."""
  jac = np.asarray(jac, np.float64)
  h, p = np.ravel(h), np.ravel(p)
  q = p * (1 - p)
  v = h ** 2 * q / samples
  c4 = h ** 4 * q * (1 - 6 * q) / samples ** 3
  j2 = jac ** 2
  return NoiseModel(cov=(jac * v) @ jac.T, cum4=(j2 * c4) @ j2.T)


def t_variance_factor(n: int) -> float:
  """Var(t²)/2 for Student's t with n-1 degrees of freedom (1 for a Gaussian)."""
  nu = n - 1
  return nu ** 2 * (nu - 1) / ((nu - 2) ** 2 * (nu - 4))


def check_unbiased(samples: np.ndarray, ref: np.ndarray, model: NoiseModel) -> dict:
  """z-test of the per-element sample mean of `samples` (n, ...) against `ref`.

  z_a = (mean_a - ref_a) / (s_a / sqrt(n)) with the sample standard deviation
  s_a is Student-t with n-1 degrees of freedom if the estimator is unbiased:
  E[z²] = (n-1)/(n-3), Var(z²) = 2·t_variance_factor(n). Elements sharing
  noise are correlated (Cov(z_a², z_b²) = 2ρ_ab² for Gaussian z), so
  sd(mean z²) = sqrt(2·t_variance_factor(n)·Σρ²) / M.

  Also checks that the sample variance matches the model's:
  mean_a(s_a²/σ_a²) = 1 ± SIGMAS·sqrt(Σ_ab [2ρ_ab²/(n-1) + K_ab/n]) / M.

  Returns the statistics (for messages and further checks).
  """
  samples = np.asarray(samples, np.float64)
  n = samples.shape[0]
  flat = samples.reshape(n, -1)
  ref = np.asarray(ref, np.float64).ravel()
  m = ref.size
  mean = flat.mean(0)
  var = flat.var(0, ddof=1)
  z2 = (mean - ref) ** 2 / (var / n)
  expected = (n - 1) / (n - 3)
  sd = math.sqrt(2 * t_variance_factor(n) * model.rho2_sum) / m
  mean_z2 = float(np.mean(z2))
  assert abs(mean_z2 - expected) <= SIGMAS * sd, (
      f'biased: mean(z²)={mean_z2:.4f}, expected {expected:.4f} ± {SIGMAS * sd:.4f} '
      f'(M={m}, n={n}, Σρ²={model.rho2_sum:.1f})')
  ratio = float(np.mean(var / model.var))
  sd_ratio = math.sqrt(2 * model.rho2_sum / (n - 1) + model.kurt_sum() / n) / m
  assert abs(ratio - 1) <= SIGMAS * sd_ratio, (
      f'variance: mean(s²/σ²)={ratio:.4f}, expected 1 ± {SIGMAS * sd_ratio:.4f}')
  return dict(mean_z2=mean_z2, var_ratio=ratio, mean=mean.reshape(samples.shape[1:]))


def mse_moments(model: NoiseModel, n: int) -> tuple[float, float]:
  """Mean and sd of mean_a(ē_a²) for ē the mean of n independent samples' errors.

  E = tr(C)/(M n); Var(Σ_a ē_a²) = 2 Σ_ab (C_ab/n)² + Σ_ab K4_ab/n³.
  """
  m = model.cov.shape[0]
  mean = float(np.trace(model.cov)) / (m * n)
  var = (2 * float(np.sum(model.cov ** 2)) / n ** 2 + float(np.sum(model.cum4)) / n ** 3) / m ** 2
  return mean, math.sqrt(var)


def check_rate(mean_small: np.ndarray, n_small: int, mean_large: np.ndarray, n_large: int,
               ref: np.ndarray, model: NoiseModel) -> float:
  """RMS error of the mean falls as 1/sqrt(n): rms(n_small)/rms(n_large) ≈ sqrt(n_large/n_small).

  The two means must come from disjoint keys. The interval for the ratio
  follows from the moments of each mean squared error (`mse_moments`).
  """
  ref = np.asarray(ref, np.float64)
  mse_s = float(np.mean((np.asarray(mean_small, np.float64) - ref) ** 2))
  mse_l = float(np.mean((np.asarray(mean_large, np.float64) - ref) ** 2))
  ms, ss = mse_moments(model, n_small)
  ml, sl = mse_moments(model, n_large)
  assert ms - SIGMAS * ss > 0 and ml - SIGMAS * sl > 0, 'too few elements for the rate test'
  lo = math.sqrt((ms - SIGMAS * ss) / (ml + SIGMAS * sl))
  hi = math.sqrt((ms + SIGMAS * ss) / (ml - SIGMAS * sl))
  ratio = math.sqrt(mse_s / mse_l)
  assert lo <= ratio <= hi, (
      f'rms(n={n_small})/rms(n={n_large}) = {ratio:.3f}, expected in [{lo:.3f}, {hi:.3f}] '
      f'(1/sqrt(n) rate: {math.sqrt(n_large / n_small):.3f})')
  return ratio


def vjp_jacobian(fn, primal) -> np.ndarray:
  """Matrix (primal.size, out.size) of the linear map cotangent -> vjp(fn)(cotangent)."""
  out, vjp = jax.vjp(fn, primal)
  eye = jnp.eye(out.size, dtype=jnp.float32)
  jac = jax.jit(jax.vmap(lambda e: vjp(e.reshape(out.shape))[0].ravel()))(eye)
  return np.asarray(jac, np.float64).T


def find_eqns(jaxpr, prim: str = 'dot_general') -> list:
  """All equations of primitive `prim`, recursing into sub-jaxprs (pjit, custom_vjp, scan...)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == prim:
      found.append(eqn)
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else (param,)):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          found += find_eqns(sub.jaxpr, prim)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          found += find_eqns(sub, prim)
  return found
