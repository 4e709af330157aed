"""The INT4 Transformers' forward as an NNX hook: Hadamard quantizer + learned LSQ steps.

`HadamardLsqDotGeneral` replaces the `dot_general` of an `nnx.Linear` /
`nnx.LinearGeneral` (Xi et al. §3, official `QLinear.forward`):

    x_h = X·Ĥ,  w_h = Ĥᵀ·W                      (float, differentiable: autograd
                                                  sends the gradients back through Ĥ)
    x_q = LSQ(x_h; s_X),  w_q = LSQ(w_h; s_W)     (INT4 grid, learned steps, clip-mask
                                                  STE in the Hadamard domain)
    Y   = qtrain.dot_general(x_q, w_q, config)    (the backward's dY rule, e.g. BS+LSS)

The forward GEMM of that dot runs in float (`config.fwd` must be float):
x_q and w_q are already s·k with INT4 codes k, so the float product equals
s_X·s_W·(k_X·k_W), the INT4×INT4→INT32 GEMM, up to float32 rounding of each
s·k and of the sums (exact integer sums while K·8·8 < 2^24). The hook asks
for `Precision.HIGHEST` when the layer gives none, so a GPU does not round
the operands to TF32.

Per layer the hook holds:

| variable                 | kind       | what                                                  |
|--------------------------|------------|-------------------------------------------------------|
| `step_x`, `step_w`       | nnx.Param  | LSQ steps (trained by the optimizer, checkpointed);   |
|                          |            | used as |s| (the code's `s.data = |s|`), gradient as is |
| `initialized`            | Int4State  | 0 until the first call, which sets the steps to LSQ's |
|                          |            | init 2·mean|v|/√Q_P (+1e-10) and searches the block   |
| `block_size`             | Int4State  | the block in use (searched: 0 until the first call)   |
| `calls`                  | Int4State  | training calls counted for the cold start             |

Jit: the block-size search needs the first batch's values, and the first
call usually happens inside a jitted train step. So the search runs *inside*
the trace, under `lax.cond` on `initialized` (executed once), over the
static candidate blocks {1, 2, ..., ≤ max_block} dividing D (one `lax.map`
body); its result is model state, and the transform runs the butterfly
stages of the largest candidate, each masked by `stage < block`
(`hadamard.block_hadamard_traced`: bit-identical to the static transform, up
to log2(max candidate) cheap elementwise stages per call instead of
log2(block)). `qtrain.train` needs nothing else. To make the block static (a
retrace; only its own stages), call `init_int4_transformer(fn, model, batch)`
before training, or `freeze_block_sizes(model)` after the first step.

Cold start (App. A.4, for training from scratch): during the first
`cold_start_steps` training calls (not in `model.eval()` mode) the steps are
reset to LSQ's init value from the current tensors every call and get no
gradient. The paper does not state N [U]; default 0 (the fine-tuning code:
init once).

Re-applying the rules (`quantize_model` twice) re-creates the hooks: their
steps are re-initialized at the next call.

References:
  Xi, Li, Chen, Zhu, "Training Transformers with 4-bit Integers", NeurIPS
  2023, arXiv:2306.11987, §3, App. A.3–A.5. Official code:
  `SingleDivide/.../image_classification/quantize.py` (`QLinear`).
  Esser et al., "Learned Step Size Quantization", ICLR 2020.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jax import lax

from qtrain import hadamard as hq
from qtrain import nnx_hooks
from qtrain.bit_split import BitSplitLss
from qtrain import scaling
from qtrain.config import DotConfig
from qtrain.dot import dot_general

__all__ = ['Int4State', 'HadamardLsqDotGeneral', 'check_options', 'install_hadamard_lsq',
           'hadamard_lsq_hooks',
           'init_int4_transformer', 'freeze_block_sizes', 'reset_int4_transformer']


class Int4State(nnx.Variable):
  """Per-layer int32 state of `HadamardLsqDotGeneral` (not trained; checkpointed)."""


def check_options(*, bits: int = 4, block: int | None = None, max_block: int = hq.MAX_BLOCK,
                  narrow: bool = True, cold_start_steps: int = 0):
  """Validates the options of `HadamardLsqDotGeneral`; returns the LSQ grid (`IntFormat`).

  Raises:
    TypeError / ValueError: bits outside 2..8, a block or max_block that is
      not a power of two, a non-bool narrow, cold_start_steps < 0 (named).
  """
  fmt = hq.lsq_format(bits, narrow=narrow)
  if not isinstance(narrow, bool):
    raise TypeError(f'narrow must be a bool, got {narrow!r}.')
  if block is not None:
    hq._check_block(block)  # pylint: disable=protected-access
  hq._check_block(max_block)  # pylint: disable=protected-access
  if isinstance(cold_start_steps, bool) or not isinstance(cold_start_steps, int) or (
      cold_start_steps < 0):
    raise ValueError(f'cold_start_steps={cold_start_steps!r} must be an int >= 0.')
  return fmt


def _contraction(lhs, rhs, dimension_numbers) -> int:
  """D (the flattened contraction size); raises for layouts other than x[..., D]·W[D, ...]."""
  (lc, rc), (lb, rb) = dimension_numbers
  lc, rc = tuple(a % lhs.ndim for a in lc), tuple(a % rhs.ndim for a in rc)
  k = len(lc)
  if lb or rb or lc != tuple(range(lhs.ndim - k, lhs.ndim)) or rc != tuple(range(k)):
    raise NotImplementedError(
        'HadamardLsqDotGeneral supports x [..., D] · W [D, ...] (contracting the trailing '
        f'axes of x with the leading axes of W, no batch axes), got {dimension_numbers} for '
        f'shapes {lhs.shape} and {rhs.shape}.')
  d = math.prod(lhs.shape[lhs.ndim - k:])
  if d != math.prod(rhs.shape[:k]):
    raise ValueError(f'contraction sizes differ: lhs {lhs.shape} vs rhs {rhs.shape}.')
  return d


class HadamardLsqDotGeneral(nnx_hooks.QuantizedDotGeneral):
  """HQ + LSQ forward, then `qtrain.dot_general` with `config`'s backward (module doc).

  Args:
    config: the layer's DotConfig; its forward must be float (fwd.lhs =
      fwd.rhs = None): the operands arrive on the INT4 grid. Its dY slots
      hold the backward rule (`qtrain.bit_split.BitSplitLss` in the recipe).
    rngs: an `nnx.Rngs` with a 'quant' stream (the backward's SR and sampling).
    name, original: as `QuantizedDotGeneral`.
    bits: LSQ width, 2..8 (4).
    block: a fixed Hadamard block (power of two dividing D; 1 = no
      transform), or None to search it at the first call.
    max_block: largest block the search tries (1024).
    narrow: LSQ grid [−Q_P, Q_P] (paper, True) or [−Q_P − 1, Q_P] (code).
    cold_start_steps: training calls with re-initialized, untrained steps.

  Raises:
    ValueError: a quantized forward in `config`, bad options.
  """

  def __init__(self, config: DotConfig, *, rngs: nnx.Rngs, name: str = '', original: Any = None,
               bits: int = 4, block: int | None = None, max_block: int = hq.MAX_BLOCK,
               narrow: bool = True, cold_start_steps: int = 0):
    super().__init__(config, rngs=rngs, name=name, original=original)
    if config.fwd.lhs is not None or config.fwd.rhs is not None:
      raise ValueError('HadamardLsqDotGeneral quantizes the forward operands itself (HQ + '
                       'LSQ): config.fwd must be float (MatmulConfig(lhs=None, rhs=None)), got '
                       f'{config.fwd!r}.')
    self.fmt = check_options(bits=bits, block=block, max_block=max_block, narrow=narrow,
                             cold_start_steps=cold_start_steps)
    self.bits, self.narrow, self.max_block = bits, narrow, max_block
    self.block = None if block is None else int(block)
    self.cold_start_steps = cold_start_steps
    self.deterministic = False  # set by model.eval() / model.train()
    self.step_x = nnx.Param(jnp.float32(1.0))
    self.step_w = nnx.Param(jnp.float32(1.0))
    self.initialized = Int4State(jnp.int32(0))
    self.block_size = Int4State(jnp.int32(block or 0))
    self.calls = Int4State(jnp.int32(0))

  def settings(self) -> dict:
    """The constructor options (what `install_hadamard_lsq` compares)."""
    return {'bits': self.bits, 'block': self.block, 'max_block': self.max_block,
            'narrow': self.narrow, 'cold_start_steps': self.cold_start_steps}

  def _transform(self, d: int):
    """transform(v, axis): the block-diagonal Hadamard in use (static or searched block)."""
    if self.block is not None:
      hq._check_block(self.block, d, 'the contraction D')  # pylint: disable=protected-access
      return functools.partial(_static_transform, block=self.block)
    cands = hq.block_candidates(d, self.max_block)
    if len(cands) == 1:
      self.block_size.set_value(jnp.int32(1))
      return functools.partial(_static_transform, block=1)
    block = self.block_size.get_value()
    return lambda v, axis: hq.block_hadamard_traced(v, block, cands, axis)

  def _search(self, x2, w2, d: int, first) -> None:
    if self.block is not None:
      return
    cands = hq.block_candidates(d, self.max_block)
    if len(cands) == 1:
      return
    table = jnp.asarray(cands, jnp.int32)
    current = self.block_size.get_value()
    # Operands without tangents: autodiff then leaves the search branch alone.
    searched = lax.cond(
        first, lambda x, w, _: table[jnp.argmin(hq.search_errors(x, w, cands, fmt=self.fmt))],
        lambda x, w, c: c, lax.stop_gradient(x2), lax.stop_gradient(w2), current)
    self.block_size.set_value(searched)

  def _steps(self, xh, wh, first):
    """Effective (s_X, s_W) and the write-back of the Params (module doc)."""
    reinit = first
    calls = self.calls.get_value()
    if self.cold_start_steps and not self.deterministic:
      reinit = reinit | (calls < self.cold_start_steps)
      self.calls.set_value(jnp.where(calls < self.cold_start_steps, calls + 1, calls))
    out = []
    for param, v in ((self.step_x, xh), (self.step_w, wh)):
      p = param.get_value()
      init = hq.lsq_init_step(v, self.fmt)
      # Value |p| with p's own gradient: the code's `s.data = |s|` before use.
      learned = p + lax.stop_gradient(jnp.abs(p) - p)
      out.append(jnp.where(reinit, init, learned))
      param.set_value(jnp.where(reinit, init, jnp.abs(p)))
    return out

  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
               *, out_sharding=None):
    d = _contraction(lhs, rhs, dimension_numbers)
    k = len(dimension_numbers[0][0])
    x2 = lhs.reshape(lhs.shape[:lhs.ndim - k] + (d,))
    w2 = rhs.reshape((d,) + rhs.shape[k:])
    first = self.initialized.get_value() == 0
    with self._scope():
      self._search(x2, w2, d, first)
      transform = self._transform(d)
      xh, wh = transform(x2, -1), transform(w2, 0)
      s_x, s_w = self._steps(xh, wh, first)
      self.initialized.set_value(jnp.int32(1))
      xq = scaling.lsq_fake_quant(xh, s_x.astype(xh.dtype), self.fmt)
      wq = scaling.lsq_fake_quant(wh, s_w.astype(wh.dtype), self.fmt)
      # Float GEMM of on-grid values (module doc): no TF32 rounding of s·k on GPUs.
      precision = lax.Precision.HIGHEST if precision is None else precision
      return dot_general(xq.reshape(lhs.shape), wq.reshape(rhs.shape), dimension_numbers,
                         precision, preferred_element_type, config=self.config,
                         key=self._key(), out_sharding=out_sharding)


def _static_transform(v, axis, *, block):
  return hq.block_hadamard(v, block, axis)


def _is_bs_config(config: DotConfig) -> bool:
  return (isinstance(config.dlhs.lhs, BitSplitLss) and config.fwd.lhs is None
          and config.fwd.rhs is None)


def hadamard_lsq_hooks(model: nnx.Module) -> list[tuple[str, HadamardLsqDotGeneral]]:
  """(module path, hook) of every `HadamardLsqDotGeneral` in `model`."""
  return [('/'.join(map(str, p)), m) for p, m in nnx.iter_modules(model)
          if isinstance(m, HadamardLsqDotGeneral)]


def install_hadamard_lsq(model: nnx.Module, *, bits: int = 4, block: int | None = None,
                         max_block: int = hq.MAX_BLOCK, narrow: bool = True,
                         cold_start_steps: int = 0) -> nnx.Module:
  """Upgrades the recipe's dot hooks to `HadamardLsqDotGeneral` (the recipe's prepare_model).

  Every `QuantizedDotGeneral` on an `nnx.Linear`/`nnx.LinearGeneral` whose
  config has a float forward and a `BitSplitLss` dY rule (what
  `quantize_model(model, int4_transformer())` installs) becomes a
  `HadamardLsqDotGeneral` with the same config, RNG stream, name and original
  op; other hooks and float layers are left alone. Idempotent: a hook that
  already has these settings is kept (with its learned steps).

  Args:
    model: an NNX model after `quantize_model`.
    bits, block, max_block, narrow, cold_start_steps: see `HadamardLsqDotGeneral`.

  Returns:
    The model (mutated in place).

  Raises:
    TypeError: `model` is not an nnx.Module.
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f'model must be an nnx.Module, got {type(model).__name__}.')
  check_options(bits=bits, block=block, max_block=max_block, narrow=narrow,
                cold_start_steps=cold_start_steps)
  settings = {'bits': bits, 'block': block, 'max_block': max_block, 'narrow': narrow,
              'cold_start_steps': cold_start_steps}
  for _, module in nnx.iter_modules(model):
    if not isinstance(module, (nnx.Linear, nnx.LinearGeneral)):
      continue
    hook = getattr(module, 'dot_general', None)
    if not isinstance(hook, nnx_hooks.QuantizedDotGeneral) or not _is_bs_config(hook.config):
      continue
    if isinstance(hook, HadamardLsqDotGeneral) and hook.settings() == settings:
      continue
    module.dot_general = nnx.data(HadamardLsqDotGeneral(
        hook.config, rngs=hook.rngs, name=hook.name, original=hook.original, **settings))
  return model


def freeze_block_sizes(model: nnx.Module) -> dict[str, int]:
  """Turns every searched block into a static int of its hook (only its own butterfly stages).

  Returns:
    {module path: block} of all HadamardLsqDotGeneral hooks.

  Raises:
    ValueError: a hook that searches its block and has not been called yet.
  """
  out = {}
  for path, hook in hadamard_lsq_hooks(model):
    if hook.block is None:
      if int(hook.initialized.get_value()) == 0:
        raise ValueError(f'freeze_block_sizes: the hook at {path} has not searched its block '
                         'yet; run one forward pass first (init_int4_transformer).')
      hook.block = int(hook.block_size.get_value())
    out[path] = hook.block
  return out


def init_int4_transformer(fn, model: nnx.Module, *args, freeze: bool = True,
                          **kwargs) -> dict[str, int]:
  """Runs `fn(model, *args, **kwargs)` once (jitted) to initialize every HQ/LSQ hook.

  The first call of each hook searches its block and sets its LSQ steps from
  this batch (the official first forward pass); with `freeze` the blocks
  then become static (`freeze_block_sizes`). Optional: hooks initialize
  themselves at their first call anyway. `fn` should only run the forward
  pass (e.g. `lambda m, x: m(x)`): other state it touches (BatchNorm
  statistics, RNG counters) changes too.

  Args:
    fn: function of (model, *args, **kwargs) calling the model.
    model: an NNX model with HadamardLsqDotGeneral hooks.
    *args, **kwargs: a representative batch.
    freeze: make the searched blocks static afterwards.

  Returns:
    {module path: block} (the searched value, also when not frozen).
  """
  nnx.jit(fn)(model, *args, **kwargs)
  if freeze:
    return freeze_block_sizes(model)
  return {path: int(h.block_size.get_value()) for path, h in hadamard_lsq_hooks(model)}


def reset_int4_transformer(model: nnx.Module, *, search: bool = True) -> None:
  """Re-initializes every hook at its next call (the paper's pre-training reset, App. A.5).

  Args:
    model: an NNX model with HadamardLsqDotGeneral hooks.
    search: also search the block again (a static block set by
      `freeze_block_sizes` goes back to searching; one given to the hook's
      constructor as `block=` is kept only if search is False).
  """
  for _, hook in hadamard_lsq_hooks(model):
    hook.initialized.set_value(jnp.int32(0))
    hook.calls.set_value(jnp.int32(0))
    if search:
      hook.block = None
