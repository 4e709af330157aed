"""The Hadamard quantizer (HQ) of Xi et al., "Training Transformers with 4-bit Integers".

Outliers in a transformer's activations concentrate in a few feature columns;
a per-tensor INT4 grid sized for them rounds everything else to zero. HQ
spreads each outlier over a block of features with an orthogonal Hadamard
transform before quantizing, along the *contraction* axis D of the GEMM, so
the transforms of both operands cancel in the product (paper §3.3):

    Y = X·W = (X·Ĥ)(Ĥᵀ·W) ≈ s_X s_W · int(X·Ĥ) · int(Ĥᵀ·W)

| name                 | what                                                              |
|----------------------|-------------------------------------------------------------------|
| `hadamard_matrix(k)` | H_k (2^k × 2^k, Sylvester): orthogonal and symmetric              |
| `block_hadamard`     | x·Ĥ along one axis, Ĥ = BlockDiag(H_k, ..., H_k) (Ĥ = Ĥᵀ = Ĥ⁻¹)   |
| `block_hadamard_traced` | the same with a traced block size (jit-friendly search state)   |
| `hadamard`           | HQ fake quantization: transform, LSQ INT quantize, transform back  |
| `lsq_init_step`      | LSQ's initial step 2·mean|v|/√Q_P (+1e-10), on the transformed v  |
| `search_block_size`  | the paper's block-size search (App. A.5): argmin ‖X̄−X‖·‖W̄−W‖       |

`block_hadamard` runs the fast Walsh–Hadamard butterflies (k stages of
sums and differences, then one scale by 2^(−k/2)): O(D·k) per row instead of
the O(D·2^k) of a matmul with Ĥ, and the ±1 part is exact (no matmul
precision setting, e.g. TF32 on GPUs, can change it). For even k the final
scale is a power of two, so the transform of an exactly representable x is
exact up to the float32 rounding of the sums.

Layouts follow Flax: activations x [..., D] (D last), kernels w [D, ...] (D
first); `Ĥᵀ·W` is `block_hadamard(w, block, axis=0)`. A block must be a
power of two dividing D: padding D would change the GEMM, so a block that
does not divide D is refused (ValueError naming both), as the paper's search
skips such blocks.

References:
  Xi, Li, Chen, Zhu, "Training Transformers with 4-bit Integers", NeurIPS
  2023, arXiv:2306.11987, §3.3 and App. A.5. Official code:
  github.com/xijiu9/Train_Transformers_with_INT4,
  `SingleDivide/.../image_classification/quantize.py` (`QLinear.create_H`,
  the search in `QLinear.forward`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qtrain import formats as fmts
from qtrain import scaling
from qtrain._validate import check_int
from qtrain.quantize import check_float

__all__ = ['hadamard_matrix', 'block_hadamard', 'block_hadamard_traced', 'hadamard',
           'lsq_init_step', 'lsq_format', 'block_candidates', 'search_block_size',
           'search_errors', 'MAX_BLOCK']

# The paper searches g ∈ {1, 2, 4, ..., 1024} (the code's `group_search`).
MAX_BLOCK = 1024
_MAX_ORDER = 12  # hadamard_matrix: 4096 x 4096 float32 = 64 MiB, plenty for blocks <= 1024
_INIT_EPS = 1e-10  # the official init adds it so that an all-zero tensor gets a non-zero step


def _check_block(block, dim: int | None = None, what: str = 'the axis') -> int:
  if isinstance(block, bool) or not isinstance(block, (int, np.integer)):
    raise TypeError(f'block must be an int (a power of two), got {block!r}.')
  block = int(block)
  if block < 1 or block & (block - 1):
    raise ValueError(f'block={block} must be a power of two >= 1 (1, 2, 4, ..., '
                     f'{MAX_BLOCK}).')
  if dim is not None and dim % block:
    raise ValueError(f'block={block} does not divide {what} of size {dim}: the '
                     'block-diagonal Hadamard needs D % block == 0 (no padding: it would '
                     'change the GEMM).')
  return block


def _check_bits(bits) -> int:
  return check_int('bits', bits, 2, 8)


def lsq_format(bits: int = 4, *, narrow: bool = True) -> fmts.IntFormat:
  """The LSQ integer grid: [−Q_N, Q_P] with Q_P = 2^(b−1) − 1.

  Args:
    bits: 2..8.
    narrow: True = the paper's Q_N = Q_P ([−7, 7] at 4 bits); False = the
      official code's [−8, 7].

  Returns:
    An `IntFormat`.
  """
  return fmts.IntFormat(bits=_check_bits(bits), narrow=bool(narrow))


def hadamard_matrix(k: int) -> np.ndarray:
  """H_k of the paper's §3.3: H_0 = [1], H_k = [[H, H], [H, −H]]/√2 (Sylvester).

  Args:
    k: the order, 0..12; the matrix is 2^k × 2^k.

  Returns:
    float32 numpy array [2^k, 2^k], orthogonal and symmetric (H_k = H_kᵀ = H_k⁻¹),
    entries ±2^(−k/2); entry (i, j) has the sign (−1)^popcount(i & j).

  Raises:
    TypeError / ValueError: k not an int in 0..12.
  """
  k = check_int('k', k, 0, _MAX_ORDER)
  n = 1 << k
  i = np.arange(n, dtype=np.uint32)
  and_bits = i[:, None] & i[None, :]
  parity = np.zeros_like(and_bits)
  for b in range(k):
    parity ^= (and_bits >> b) & 1
  return (np.where(parity == 1, -1.0, 1.0) / math.sqrt(n)).astype(np.float32)


def _stage(x: jax.Array, h: int) -> jax.Array:
  """One butterfly stage along the last axis: (a, b) -> (a + b, a − b) for pairs at distance h."""
  lead, n = x.shape[:-1], x.shape[-1]
  y = x.reshape(lead + (n // (2 * h), 2, h))
  a, b = y[..., 0, :], y[..., 1, :]
  return jnp.stack([a + b, a - b], axis=-2).reshape(lead + (n,))


def _butterflies(x: jax.Array, block: int) -> jax.Array:
  """x·Ĥ along the last axis (length a multiple of `block`, a power of two)."""
  # Stage h mixes index bit log2(h); the stages h < block make H_k on each block.
  h = block // 2
  while h >= 1:
    x = _stage(x, h)
    h //= 2
  return x * jnp.asarray(1.0 / math.sqrt(block), x.dtype)


def block_hadamard_traced(x: jax.Array, block: jax.Array, candidates: tuple[int, ...],
                          axis: int = -1) -> jax.Array:
  """`block_hadamard` with a traced block size, one of the static `candidates`.

  Runs the butterfly stages of the largest candidate, each kept only where
  its distance is below `block` (`jnp.where`), in the same order and with the
  same scale constants as `block_hadamard`, so the results are bit-identical
  to `block_hadamard(x, int(block))`. No `lax.switch`: one compiled chain for
  every candidate (jit-friendly state-dependent blocks, the NNX hook's search).

  Args:
    x: float array.
    block: int32 scalar (traced or not), an element of `candidates`.
    candidates: static tuple of powers of two dividing x.shape[axis].
    axis: the axis to transform.

  Returns:
    Array of x's shape and dtype.
  """
  check_float(x)
  x = jnp.asarray(x)
  axis %= x.ndim
  for g in candidates:
    _check_block(g, x.shape[axis], f'axis {axis} (shape {x.shape})')
  moved = jnp.moveaxis(x, axis, -1)
  block = jnp.asarray(block, jnp.int32)
  h = max(candidates) // 2
  while h >= 1:
    moved = jnp.where(h < block, _stage(moved, h), moved)
    h //= 2
  table = jnp.asarray([1.0 / math.sqrt(g) for g in candidates], x.dtype)
  scale = table[jnp.argmax(jnp.asarray(candidates, jnp.int32) == block)]
  return jnp.moveaxis(moved * scale, -1, axis)


def block_hadamard(x: jax.Array, block: int, axis: int = -1) -> jax.Array:
  """Multiplies `x` by the block-diagonal Hadamard Ĥ = BlockDiag(H, ..., H) along `axis`.

  For x [..., D] (axis=-1) this is x·Ĥ; for a kernel w [D, ...] (axis=0) it
  is Ĥᵀ·w (Ĥ is symmetric). Ĥ is its own inverse: applying it twice gives x
  back (up to float rounding).

  Args:
    x: float array.
    block: the block size 2^k (1 = identity); must divide x.shape[axis].
    axis: the axis to transform (the GEMM's contraction axis).

  Returns:
    Array of x's shape and dtype.

  Raises:
    TypeError: non-float x, non-int block.
    ValueError: block not a power of two or not dividing the axis (names both).

  Examples:
    >>> import jax.numpy as jnp
    >>> block_hadamard(jnp.array([[1.0, 1.0, 1.0, 1.0, 3.0, 1.0, 3.0, 1.0]]), 4).tolist()
    [[2.0, 0.0, 0.0, 0.0, 4.0, 2.0, 0.0, 0.0]]
  """
  check_float(x)
  x = jnp.asarray(x)
  if not -x.ndim <= axis < max(x.ndim, 1):
    raise ValueError(f'axis={axis} is out of range for an array of rank {x.ndim}.')
  axis %= x.ndim
  dim = x.shape[axis]
  block = _check_block(block, dim, f'axis {axis} (shape {x.shape})')
  if block == 1:
    return x
  return jnp.moveaxis(_butterflies(jnp.moveaxis(x, axis, -1), block), -1, axis)


def lsq_init_step(v: jax.Array, fmt: fmts.IntFormat) -> jax.Array:
  """LSQ's initial step, 2·mean|v|/√Q_P + 1e-10 (official init; paper App. A.4 cold start).

  Args:
    v: float array (already Hadamard-transformed).
    fmt: the LSQ grid (Q_P = fmt.qmax).

  Returns:
    float32 scalar, no gradient. NaN/Inf in v give a NaN/Inf step.
  """
  v = jax.lax.stop_gradient(jnp.asarray(v, jnp.float32))
  mean = jnp.mean(jnp.abs(v)) if v.size else jnp.float32(0)
  return 2.0 * mean / math.sqrt(fmt.qmax) + jnp.float32(_INIT_EPS)


def _fake_quant(v: jax.Array, step: jax.Array, fmt: fmts.IntFormat) -> jax.Array:
  # The search's plain round-then-clamp (no gradient needed).
  return jnp.clip(jnp.round(v / step), fmt.qmin, fmt.qmax) * step


def hadamard(x: jax.Array, key: jax.Array | None = None, *, bits: int = 4, block: int = 32,
             step: jax.Array | float | None = None, axis: int = -1,
             narrow: bool = True) -> jax.Array:
  """HQ fake quantization: Ĥ · Q_LSQ(x·Ĥ) along `axis` (paper §3.3).

  x·Ĥ is quantized on the LSQ grid [−Q_N, Q_P] with step `step` (a learned
  LSQ step; default: LSQ's initial value 2·mean|x·Ĥ|/√Q_P, as the first
  forward pass of the official code), then transformed back, so the result
  is in x's domain. Gradients: x gets LSQ's clipped straight-through
  gradient (mask evaluated in the Hadamard domain, as the code does) sent
  back through Ĥ; a given `step` gets LSQ's step gradient, scaled by
  1/√(numel·Q_P) (`qtrain.scaling.lsq_fake_quant`).

  Args:
    x: float array.
    key: unused (HQ is deterministic); accepted for the uniform signature.
    bits: 2..8 (4 in the paper).
    block: Hadamard block size, a power of two dividing x.shape[axis] (the
      paper's typical 32; `search_block_size` picks one).
    step: the LSQ step (positive scalar), or None for the initial value.
    axis: the contraction axis.
    narrow: the paper's symmetric grid (True, [−7, 7] at 4 bits) or the
      code's [−8, 7] (False).

  Returns:
    Array of x's shape and dtype.

  Raises:
    TypeError / ValueError: bad bits, block, axis (named).
  """
  del key
  fmt = lsq_format(bits, narrow=narrow)
  xh = block_hadamard(x, block, axis)
  s = lsq_init_step(xh, fmt) if step is None else jnp.asarray(step, jnp.float32)
  if jnp.ndim(s) != 0:
    raise ValueError(f'step must be a scalar (one LSQ step per tensor), got shape '
                     f'{jnp.shape(s)}.')
  q = scaling.lsq_fake_quant(xh, s.astype(xh.dtype), fmt)
  return block_hadamard(q, block, axis)


def block_candidates(dim: int, max_block: int = MAX_BLOCK) -> tuple[int, ...]:
  """The blocks the search tries: 1, 2, 4, ... up to max_block, each dividing `dim`.

  Args:
    dim: the contraction size D >= 1.
    max_block: the largest block, a power of two (1024 in the paper).

  Returns:
    A non-empty tuple of consecutive powers of two starting at 1.
  """
  dim = check_int('dim', dim, 1, 2**31 - 1)
  max_block = _check_block(max_block)
  out, g = [], 1
  while g <= max_block and dim % g == 0:
    out.append(g)
    g *= 2
  return tuple(out)


def search_errors(x: jax.Array, w: jax.Array, candidates: tuple[int, ...], *,
                  fmt: fmts.IntFormat) -> jax.Array:
  """‖X̄_g − X‖·‖W̄_g − W‖ for each candidate block g (jit-friendly).

  X̄_g = Q(X·Ĥ_g)·Ĥ_g with Q the LSQ grid at LSQ's initial step for that g
  (the official search), W̄_g likewise along W's first axis. Ĥ_g is
  orthogonal, so ‖X̄_g − X‖ = ‖Q(X·Ĥ_g) − X·Ĥ_g‖: computed without the
  transform back (equal up to float rounding; the code transforms back).

  Args:
    x: float activations [..., D].
    w: float kernel [D, ...].
    candidates: blocks to try (each dividing D).
    fmt: the LSQ grid.

  Returns:
    float32 [len(candidates)], no gradient.
  """
  x = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
  w = jax.lax.stop_gradient(jnp.asarray(w, jnp.float32))

  def error(g):
    # One compiled body for all candidates (lax.map), the block as data.
    out = jnp.float32(1)
    for v, axis in ((x, -1), (w, 0)):
      vh = block_hadamard_traced(v, g, candidates, axis)
      d = _fake_quant(vh, lsq_init_step(vh, fmt), fmt) - vh
      out = out * jnp.sqrt(jnp.sum(d * d))
    return out

  return jax.lax.map(error, jnp.asarray(candidates, jnp.int32))


def search_block_size(x: jax.Array, w: jax.Array, *, bits: int = 4, max_block: int = MAX_BLOCK,
                      narrow: bool = True) -> int:
  """The paper's block-size search (App. A.5, official `QLinear.forward` first pass).

  Tries g ∈ {1, 2, 4, ..., max_block} dividing D and returns the g
  minimizing ‖X̄−X‖·‖W̄−W‖ (the paper states the product of MSEs: the same
  argmin), where X̄, W̄ are HQ fake-quantized at LSQ's initial steps; ties
  go to the smaller block (the code's strict `<`). Needs concrete arrays:
  call it eagerly (the NNX hook `qtrain.lsq_linear` runs the same search
  inside jit and keeps the result as model state).

  Args:
    x: float activations [..., D] (the layer input of the first batch).
    w: float kernel [D, ...] (Flax layout, contraction axis first).
    bits: LSQ width, 2..8.
    max_block: largest block tried, a power of two (1024).
    narrow: LSQ grid [−Q_P, Q_P] (paper) or [−Q_P−1, Q_P] (code).

  Returns:
    The chosen block size (a Python int).

  Raises:
    ValueError: x.shape[-1] != w.shape[0], bad bits/max_block.
    jax.errors.ConcretizationTypeError: called under jit.
  """
  check_float(x)
  check_float(w, 'w')
  x, w = jnp.asarray(x), jnp.asarray(w)
  if x.ndim < 1 or w.ndim < 1 or x.shape[-1] != w.shape[0]:
    raise ValueError(f'x [..., D] and w [D, ...] must share D: got x {x.shape}, w {w.shape}.')
  fmt = lsq_format(bits, narrow=narrow)
  cands = block_candidates(x.shape[-1], max_block)
  return cands[int(jnp.argmin(search_errors(x, w, cands, fmt=fmt)))]
