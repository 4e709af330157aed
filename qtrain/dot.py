"""Quantized `dot_general` and `conv_general_dilated`: one custom_vjp, three GEMMs.

Forward: both operands are quantized by `config.fwd` (round-to-nearest in
the papers) and multiplied as low-bit codes (int8 with int32 accumulation, or
fp8 with float32 accumulation; see `gemm_dtypes`), then scaled.

Backward: the incoming gradient dY is quantized separately for the dX GEMM
(`config.dlhs.lhs`) and the dW GEMM (`config.drhs.rhs`), with independent
noise unless `config.share_gradient_sample`; the forward codes are reused as
residuals (`REUSE`). A residual scale that varies along the backward GEMM's
contracted axes (a per-channel weight scale in dX = dY·Wᵀ) cannot factor out of
that GEMM, so it is folded into dY before dY is quantized: the GEMM still runs
on the forward codes.

Per-layer state (`grad_state`): a dY rule whose calibration is a
`scaling.StatefulCalibration` (DA-INT8's EMA clip, UI8's periodic clip
search) computes its scale from dY and a state kept from the previous step.
The state is a primal argument that the forward ignores; the backward pass
computes the new state from the dY it quantizes and returns it as that
argument's *cotangent* (the "overwrite with gradient" pattern of flax's fp8
ops): `jax.grad` w.r.t. the state gives the next step's state. Hence: the
state must be float32; a layer used twice in one loss gets the *sum* of its
two new states (not supported); a layer outside the loss gets zeros.

The PRNG key is an ordinary primal argument with a `None` cotangent (a key in
`nondiff_argnums` fails under jit). Each operand slot draws from
`fold_in(key, slot)`: 0/1 forward lhs/rhs, 2 dY for dX, 3 W residual, 4 X
residual, 5 dY for dW.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from qtrain import config as cfgs
from qtrain import conv_transpose
from qtrain import formats as fmts
from qtrain import scaling
from qtrain.contraction import ConvOp, DotOp, move_scale
from qtrain.qarray import QArray
from qtrain.quantize import check_float, quantize

__all__ = ['dot_general', 'conv_general_dilated', 'gemm_dtypes', 'dot_general_grad_state',
           'conv_general_dilated_grad_state']

_SLOT = {'fwd.lhs': 0, 'fwd.rhs': 1, 'dlhs.lhs': 2, 'dlhs.rhs': 3, 'drhs.lhs': 4, 'drhs.rhs': 5}


@dataclasses.dataclass(frozen=True)
class _Options:
  precision: Any
  preferred_element_type: Any
  out_sharding: Any
  implementation: str | None = None  # code x code GEMMs: pallas_kernels.dispatch


def _is_int_like(fmt: fmts.Format) -> bool:
  return isinstance(fmt, (fmts.IntFormat, fmts.FixedPointFormat))


@functools.lru_cache(maxsize=None)
def gemm_dtypes(a: fmts.Format, b: fmts.Format, a_shifted: bool = False,
                b_shifted: bool = False) -> tuple[Any, Any, Any]:
  """Operand and accumulation dtypes of a GEMM between codes of formats a and b.

  The narrowest exact choice: int8 x int8 -> int32 when both are integer grids
  that fit int8; else each operand in float8_e4m3fn or float8_e5m2 (mixed
  allowed, as on Hopper) -> float32, which carries INT4 codes and log/FP4 codes
  exactly (DESIGN §4); else bfloat16 -> float32; else float32. `*_shifted`
  marks codes with a zero point subtracted (int16 range).
  """
  if _is_int_like(a) and _is_int_like(b):
    if not (a_shifted or b_shifted) and a.is_exact_in(np.int8) and b.is_exact_in(np.int8):
      return jnp.int8, jnp.int8, jnp.int32
    if a.is_exact_in(np.int16) and b.is_exact_in(np.int16):
      return jnp.int16, jnp.int16, jnp.int32
  if not (a_shifted or b_shifted):
    fp8 = (jnp.float8_e4m3fn, jnp.float8_e5m2)
    da = next((d for d in fp8 if a.is_exact_in(d)), None)
    db = next((d for d in fp8 if b.is_exact_in(d)), None)
    if da is not None and db is not None:
      return da, db, jnp.float32
    if a.is_exact_in(jnp.bfloat16) and b.is_exact_in(jnp.bfloat16):
      return jnp.bfloat16, jnp.bfloat16, jnp.float32
  return jnp.float32, jnp.float32, jnp.float32


def _gemm_operand(q: QArray, dtype) -> jax.Array:
  codes = q.codes
  if q.zero_point is not None:
    zp = scaling.expand_scale(q.zero_point, codes.shape, q.granularity)
    return (codes.astype(jnp.int32) - zp.astype(jnp.int32)).astype(dtype)
  return codes.astype(dtype)


def resolve_rule(rule: cfgs.TensorConfig, kept: tuple[int, ...], ndim: int,
                 where: str) -> cfgs.TensorConfig:
  """Makes a rule's granularity concrete for one operand of one GEMM.

  `kept` are the operand's non-contracted axes: PerChannel(axes=None) becomes
  PerChannel(kept); explicit axes must lie within them. PerBlock and Lsq rules
  raise (they cannot be applied inside the GEMM); `where` names the operand.
  """
  g = rule.granularity
  if isinstance(g, scaling.PerBlock):
    raise NotImplementedError(
        f'{where}: PerBlock scales inside dot_general/conv_general_dilated are not '
        'supported yet (use PerTensor or PerChannel, or fake_quant the operand).')
  if isinstance(rule.calibration, scaling.Lsq):
    raise ValueError(f'{where}: Lsq calibration needs the learned step; apply '
                     'qtrain.fake_quant(x, rule, scale=step) to the operand instead.')
  if isinstance(g, scaling.PerChannel):
    axes = kept if g.axes is None else tuple(a % ndim for a in g.axes)
    if not set(axes) <= set(kept):
      raise ValueError(f'{where}: PerChannel axes {g.axes} include a contracted axis; a '
                       f'scale may only vary along the non-contracted axes {kept}.')
    return dataclasses.replace(rule, granularity=scaling.PerChannel(axes=tuple(axes)))
  return rule


def _quantize_samples(x, rule, key, slot: str, kept, where: str, scale=None) -> list[QArray]:
  rule = resolve_rule(rule, kept, x.ndim, where)
  k = None if key is None else jax.random.fold_in(key, _SLOT[slot])
  if rule.samples == 1:
    return [quantize(x, rule, key=k, scale=scale)]
  one = dataclasses.replace(rule, samples=1)
  return [quantize(x, one, key=jax.random.fold_in(k, i), scale=scale)
          for i in range(rule.samples)]


def _is_stateful(rule) -> bool:
  return isinstance(rule, cfgs.TensorConfig) and isinstance(rule.calibration,
                                                            scaling.StatefulCalibration)


def _quantize_grad(g, rule, key, slot: str, kept, state):
  """Quantized samples of dY and the dY rule's new state (None if stateless)."""
  if not _is_stateful(rule):
    return _quantize_samples(g, rule, key, slot, kept, slot), None
  resolved = resolve_rule(rule, kept, g.ndim, slot)
  expected = jax.eval_shape(lambda: resolved.calibration.init_state(g.shape,
                                                                    resolved.granularity))
  got = jax.tree.map(lambda v: jax.ShapeDtypeStruct(jnp.shape(v), jnp.float32), state)
  want = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, jnp.float32), expected)
  if jax.tree.structure(got) != jax.tree.structure(want) or got != want:
    raise ValueError(f'{slot}: grad_state does not fit dY of shape {g.shape}: expected '
                     f'{want}, got {got} (the state is made for one dY shape; a different '
                     'batch size under a per-sample dY rule needs a new state).')
  g32 = jax.lax.stop_gradient(g).astype(jnp.float32)
  scale, zero_point, new_state = resolved.calibration.compute(
      g32, resolved.format, resolved.granularity, state)
  if zero_point is not None:
    raise NotImplementedError(f'{slot}: {type(rule.calibration).__name__} returned a zero '
                              'point; stateful calibrations must be symmetric for now.')
  # The state travels out as a cotangent: keep its structure and dtypes exactly.
  new_state = jax.tree.map(lambda new, old: jnp.asarray(new, jnp.float32).reshape(
      jnp.shape(old)), new_state, state)
  return _quantize_samples(g, rule, key, slot, kept, slot, scale=scale), new_state


def _init_grad_state(op, cfg: cfgs.DotConfig, out_shape) -> dict:
  """{gemm: calibration.init_state(dY shape, resolved granularity)} of cfg's stateful slots."""
  state = {}
  for gemm in cfg.stateful_slots:
    rule = cfg.dlhs.lhs if gemm == 'dlhs' else cfg.drhs.rhs
    slot = 'dlhs.lhs' if gemm == 'dlhs' else 'drhs.rhs'
    resolved = resolve_rule(rule, op.grad_kept(gemm), len(out_shape), slot)
    # Concrete even when called under a trace: the state is a model variable.
    with jax.ensure_compile_time_eval():
      init = resolved.calibration.init_state(tuple(out_shape), resolved.granularity)
      state[gemm] = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), init)
  return state


def _check_grad_state(cfg: cfgs.DotConfig, grad_state) -> None:
  slots = cfg.stateful_slots
  if not slots:
    if grad_state is not None:
      raise ValueError('grad_state was given but the config has no StatefulCalibration dY '
                       'rule; pass grad_state=None.')
    return
  if grad_state is None:
    raise ValueError(f'config has StatefulCalibration dY rules in {slots} and needs their '
                     "per-layer state: pass grad_state={gemm: state} (initial state from "
                     'qtrain.dot.dot_general_grad_state / conv_general_dilated_grad_state; '
                     'NNX hooks keep it for you).')
  if not isinstance(grad_state, dict) or set(grad_state) != set(slots):
    keys = sorted(grad_state) if isinstance(grad_state, dict) else type(grad_state).__name__
    raise ValueError(f'grad_state must be a dict with exactly the keys {sorted(slots)} (the '
                     f'stateful dY slots of the config), got {keys}.')
  for path, leaf in jax.tree_util.tree_leaves_with_path(grad_state):
    if jnp.result_type(leaf) != jnp.float32:
      raise TypeError(f'grad_state{jax.tree_util.keystr(path)} must be float32 (it returns as '
                      f'a cotangent), got {jnp.result_type(leaf)}.')


def _codes_product(run, a: QArray, b: QArray, op) -> jax.Array:
  da, db, acc = gemm_dtypes(a.format, b.format, a.zero_point is not None,
                            b.zero_point is not None)
  if acc == jnp.int32 and getattr(op, 'int_carrier', 'native') == 'float32':
    da = db = acc = jnp.float32
  if isinstance(op, ConvOp) and da != db:
    # lax.conv_general_dilated rejects mixed fp8 operands (dot_general accepts
    # them); bfloat16 holds every e4m3 and e5m2 value exactly.
    da = db = jnp.bfloat16
  return run(_gemm_operand(a, da), _gemm_operand(b, db), acc).astype(jnp.float32)


def _mixed_product(run, a, b) -> jax.Array:
  a = a.dequantize().astype(jnp.float32) if isinstance(a, QArray) else a
  b = b.dequantize().astype(jnp.float32) if isinstance(b, QArray) else b
  dtype = jnp.result_type(a, b)
  return run(a.astype(dtype), b.astype(dtype), jnp.float32).astype(jnp.float32)


# ---------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------
def _forward(lhs, rhs, key, op, cfg: cfgs.DotConfig, opts: _Options):
  lq = rq = None
  if cfg.fwd.lhs is not None:
    lq = _quantize_samples(lhs, cfg.fwd.lhs, key, 'fwd.lhs', op.kept('lhs'), 'fwd.lhs')
  if cfg.fwd.rhs is not None:
    rq = _quantize_samples(rhs, cfg.fwd.rhs, key, 'fwd.rhs', op.kept('rhs'), 'fwd.rhs')
  out_dtype = opts.preferred_element_type or jnp.result_type(lhs, rhs)
  with jax.named_scope('qtrain/fwd'):
    acc = None
    for a in (lq or [lhs]):
      for b in (rq or [rhs]):
        if isinstance(a, QArray) and isinstance(b, QArray):
          run = functools.partial(_run_forward, op, None, opts.out_sharding,
                                  implementation=opts.implementation)
          y = _codes_product(run, a, b, op)
          # One multiply by the combined scale: XLA reassociates a chain of
          # multiplies differently under jit and eager (last-bit differences).
          y = y * (_out_scale(op, a, 'lhs') * _out_scale(op, b, 'rhs'))
        else:
          run = functools.partial(_run_forward, op, opts.precision, opts.out_sharding)
          y = _mixed_product(run, a, b)
        acc = y if acc is None else acc + y
    y = acc / (len(lq or [0]) * len(rq or [0]))
  return y.astype(out_dtype), (lq, rq)


def _run_forward(op, precision, out_sharding, a, b, preferred, implementation=None):
  return op.forward(a, b, precision=precision, preferred=preferred, out_sharding=out_sharding,
                    implementation=implementation)


def _out_scale(op, q: QArray, side: str) -> jax.Array:
  return move_scale(q.scale, op.kept(side), op.out_dims(side), op.out_ndim)


# ---------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------
def _residual(x_float, fwd_q, rule, key, slot: str, kept_bwd, where: str):
  """The residual operand of a backward GEMM: QArray (codes) or float array."""
  if isinstance(rule, cfgs.Reuse):
    return fwd_q[0] if fwd_q is not None else x_float
  if rule is None:
    return x_float
  if not isinstance(rule.granularity, scaling.PerTensor) or rule.samples != 1:
    raise ValueError(f'{where}: a re-quantized residual must be PerTensor with samples=1.')
  return _quantize_samples(x_float, rule, key, slot, kept_bwd, where)[0]


def _backward_gemm(op, gemm: str, g, grad_rule, residual, key, shared, opts, out_ndim,
                   state=None, share_key=False):
  """(dX (gemm='dlhs') or dW (gemm='drhs'), new dY-rule state or None) from the cotangent g."""
  side = 'rhs' if gemm == 'dlhs' else 'lhs'  # the residual's side in the forward
  if isinstance(grad_rule, cfgs.GradientEstimator):
    return _estimated_gemm(op, gemm, g, grad_rule, residual, key, opts, share_key), None
  residual_scale = None
  if isinstance(residual, QArray) and (grad_rule is not None or shared is not None):
    # Both operands will be codes: apply the residual scale after the GEMM if
    # it is a scalar; otherwise it cannot factor out of this GEMM, so fold it
    # into dY before dY is quantized.
    if residual.scale.size == 1:
      residual_scale = residual.scale
    elif shared is not None:
      raise ValueError('share_gradient_sample=True needs per-tensor forward scales: a '
                       'per-channel residual scale must be folded into dY per GEMM.')
    else:
      g = g * move_scale(residual.scale, op.kept(side), op.out_dims(side), op.out_ndim)
  new_state = None
  if grad_rule is None:
    grads = [g]
  elif shared is not None:
    grads = shared
  else:
    slot = 'dlhs.lhs' if gemm == 'dlhs' else 'drhs.rhs'
    # A stateful rule sees this g: dY with any folded residual scale (above).
    grads, new_state = _quantize_grad(g, grad_rule, key, slot, op.grad_kept(gemm), state)
  transpose = op.transpose_lhs if gemm == 'dlhs' else op.transpose_rhs
  run_codes = lambda a, b, pref: transpose(a, b, precision=None, preferred=pref,
                                          implementation=opts.implementation)
  run_float = lambda a, b, pref: transpose(a, b, precision=opts.precision, preferred=pref)
  acc = None
  for gq in grads:
    if isinstance(gq, QArray) and isinstance(residual, QArray):
      d = _codes_product(run_codes, gq, residual, op)
      scale = move_scale(gq.scale, op.grad_kept(gemm), op.grad_dst(gemm), out_ndim)
      if residual_scale is not None:
        scale = scale * residual_scale.reshape(())
      d = d * scale  # one multiply by the combined scale (see _forward)
    else:  # at least one float operand: dequantize, multiply in float
      d = _mixed_product(run_float, gq, residual)
    acc = d if acc is None else acc + d
  return acc / len(grads), new_state


def _estimated_gemm(op, gemm: str, g, estimator, residual, key, opts, share_key: bool):
  """dX or dW from a GradientEstimator's dY estimate, multiplied in float32.

  Under share_gradient_sample both GEMMs use the dlhs slot's key, so the
  estimator draws the same codes for both (see GradientEstimator).
  """
  r = residual.dequantize() if isinstance(residual, QArray) else residual
  r = r.astype(jnp.float32)
  slot = 'dlhs.lhs' if (gemm == 'dlhs' or share_key) else 'drhs.rhs'
  k = None if key is None else jax.random.fold_in(key, _SLOT[slot])
  g_hat = estimator.estimate(g, k, gemm=gemm, residual=r, kept=op.grad_kept(gemm))
  if jnp.shape(g_hat) != g.shape:
    raise ValueError(f'{type(estimator).__name__}.estimate returned shape {jnp.shape(g_hat)} '
                     f'for dY of shape {g.shape}.')
  transpose = op.transpose_lhs if gemm == 'dlhs' else op.transpose_rhs
  with jax.named_scope(type(estimator).__name__):
    return transpose(jnp.asarray(g_hat, jnp.float32), r, precision=opts.precision,
                     preferred=jnp.float32).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _qcontract(lhs, rhs, key, grad_state, op, cfg, opts):
  del grad_state  # the forward does not use it
  return _forward(lhs, rhs, key, op, cfg, opts)[0]


def _qcontract_fwd(lhs, rhs, key, grad_state, op, cfg, opts):
  y, (lq, rq) = _forward(lhs, rhs, key, op, cfg, opts)
  keep_lhs = lq is None or not isinstance(cfg.drhs.lhs, cfgs.Reuse)
  keep_rhs = rq is None or not isinstance(cfg.dlhs.rhs, cfgs.Reuse)
  res = (lq, rq, lhs if keep_lhs else None, rhs if keep_rhs else None, key,
         jnp.zeros((0,), lhs.dtype), jnp.zeros((0,), rhs.dtype), grad_state)
  return y, res


def _qcontract_bwd(op, cfg, opts, res, g):
  lq, rq, lhs, rhs, key, lhs_tag, rhs_tag, grad_state = res
  state = grad_state or {}
  new_state = {}
  g = g.astype(jnp.float32)
  shared = None
  if cfg.share_gradient_sample and isinstance(cfg.dlhs.lhs, cfgs.TensorConfig):
    shared, new = _quantize_grad(g, cfg.dlhs.lhs, key, 'dlhs.lhs', op.grad_kept('dlhs'),
                                 state.get('dlhs'))
    if new is not None:
      new_state['dlhs'] = new
  with jax.named_scope('qtrain/dlhs'):
    w = _residual(rhs, rq, cfg.dlhs.rhs, key, 'dlhs.rhs', (), 'dlhs.rhs')
    dlhs, new = _backward_gemm(op, 'dlhs', g, cfg.dlhs.lhs, w, key, shared, opts, op.lhs_ndim,
                               state.get('dlhs'), cfg.share_gradient_sample)
    if new is not None:
      new_state['dlhs'] = new
  with jax.named_scope('qtrain/drhs'):
    x = _residual(lhs, lq, cfg.drhs.lhs, key, 'drhs.lhs', (), 'drhs.lhs')
    drhs, new = _backward_gemm(op, 'drhs', g, cfg.drhs.rhs, x, key, shared, opts, op.rhs_ndim,
                               state.get('drhs'), cfg.share_gradient_sample)
    if new is not None:
      new_state['drhs'] = new
  # The new state is the state's cotangent ("overwrite with gradient").
  state_ct = None if grad_state is None else new_state
  return dlhs.astype(lhs_tag.dtype), drhs.astype(rhs_tag.dtype), None, state_ct


_qcontract.defvjp(_qcontract_fwd, _qcontract_bwd)


# ---------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------
def _check_common(lhs, rhs, config, key, grad_state=None):
  check_float(lhs, 'lhs')
  check_float(rhs, 'rhs')
  if config is not None and not isinstance(config, cfgs.DotConfig):
    raise TypeError(f'config must be a qtrain.DotConfig or None, got {config!r}.')
  if config is not None and config.needs_key and key is None:
    raise ValueError('key is required: config has a stochastic rule (got key=None).')
  if config is None and grad_state is not None:
    raise ValueError('grad_state was given but config is None (nothing is quantized).')
  if config is not None:
    _check_grad_state(config, grad_state)


def _check_dot_dims(lhs, rhs, dimension_numbers) -> None:
  (lc, rc), (lb, rb) = dimension_numbers
  for name, dl, dr in (('contracting', lc, rc), ('batch', lb, rb)):
    if len(dl) != len(dr):
      raise ValueError(f'dimension_numbers: lhs and rhs {name} dimensions differ in number: '
                       f'{tuple(dl)} vs {tuple(dr)}.')
    for a, b in zip(dl, dr):
      if lhs.shape[a] != rhs.shape[b]:
        raise ValueError(f'{name} dimensions do not match: lhs.shape[{a}]={lhs.shape[a]} vs '
                         f'rhs.shape[{b}]={rhs.shape[b]} (lhs {lhs.shape}, rhs {rhs.shape}).')


def _dot_op(lhs, rhs, dimension_numbers) -> DotOp:
  _check_dot_dims(lhs, rhs, dimension_numbers)
  return DotOp.create(dimension_numbers, lhs.ndim, rhs.ndim)


def dot_general_grad_state(lhs, rhs, dimension_numbers, *, config: cfgs.DotConfig) -> dict | None:
  """The initial `grad_state` of `dot_general(lhs, rhs, dimension_numbers, config=config)`.

  Args:
    lhs, rhs: the operands (arrays or anything with .shape/.ndim, e.g.
      `jax.ShapeDtypeStruct`); only shapes are read.
    dimension_numbers: as in `dot_general`.
    config: the layer's DotConfig.

  Returns:
    None if no dY rule of `config` is a `scaling.StatefulCalibration`, else
    {gemm: state} for `config.stateful_slots`: concrete float32 arrays (also
    when called under a trace), from each calibration's `init_state`.
  """
  if not config.stateful_slots:
    return None
  op = _dot_op(lhs, rhs, dimension_numbers)
  out = jax.eval_shape(functools.partial(lax.dot_general, dimension_numbers=dimension_numbers),
                       jax.ShapeDtypeStruct(lhs.shape, jnp.float32),
                       jax.ShapeDtypeStruct(rhs.shape, jnp.float32))
  return _init_grad_state(op, config, out.shape)


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers,
                precision=None, preferred_element_type=None, *,
                config: cfgs.DotConfig | None = None, key: jax.Array | None = None,
                out_sharding=None, grad_state: dict | None = None,
                implementation: str | None = None) -> jax.Array:
  """`lax.dot_general` with quantized forward and backward GEMMs.

  Same positional signature as `jax.lax.dot_general`, so it can be passed as
  the `dot_general` hook of Flax layers (with `functools.partial` for config
  and key).

  Args:
    lhs: float array (e.g. activations X, shape [..., K]).
    rhs: float array (e.g. weights W, shape [K, ...]).
    dimension_numbers: ((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch)).
    precision: precision of the high-precision GEMMs (operands left float).
    preferred_element_type: output dtype (default: result type of lhs, rhs).
    config: a `DotConfig`; None runs plain `lax.dot_general`.
    key: PRNG key (typed or legacy), required if any rule is stochastic. Fold
      in step and layer; never reuse a key across steps.
    out_sharding: sharding of the output, forwarded to the forward GEMM.
    grad_state: per-layer state of the config's `StatefulCalibration` dY
      rules, {gemm: state} for `config.stateful_slots` (initial value:
      `dot_general_grad_state`); None when the config has none. The forward
      ignores it; its *gradient* is the new state, computed in the backward
      pass from this step's dY (module doc).
    implementation: backend of the code x code GEMMs (forward, dX, dW): None
      (auto: Pallas kernels on a Hopper GPU, XLA elsewhere), 'xla', 'pallas'
      or 'interpret' (the kernels in Mosaic GPU interpret mode, on CPU). The
      kernels take int8 x int8 and FP8 x FP8 contractions without batch
      dimensions whose shapes fit their tiles and give XLA's exact value; the
      rest runs on XLA (`pallas_kernels.dispatch`).

  Returns:
    The contraction, shape as `lax.dot_general`'s. Gradients flow to lhs and
    rhs through the quantized backward GEMMs; the key gets none; grad_state
    gets its next value.

  Raises:
    TypeError: non-float operands, a bad config, a non-float32 state.
    ValueError: missing key, contracting/batch dimensions of different sizes,
      or a grad_state missing, unexpected or of the wrong keys/shapes; an
      unknown implementation.
  """
  _check_common(lhs, rhs, config, key, grad_state)
  if implementation not in (None, 'xla', 'pallas', 'interpret'):
    raise ValueError(f"implementation={implementation!r} is unknown; allowed: None (auto), "
                     "'xla', 'pallas', 'interpret'.")
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  _check_dot_dims(lhs, rhs, dimension_numbers)
  if config is None:
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type,
                           out_sharding=out_sharding)
  op = DotOp.create(dimension_numbers, lhs.ndim, rhs.ndim)
  opts = _Options(precision, preferred_element_type, out_sharding, implementation)
  return _qcontract(lhs, rhs, key, grad_state, op, config, opts)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides, padding,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None, *,
                         config: cfgs.DotConfig | None = None, key: jax.Array | None = None,
                         out_sharding=None, int_carrier: str = 'auto',
                         grad_state: dict | None = None) -> jax.Array:
  """`lax.conv_general_dilated` with quantized forward and backward convolutions.

  Same signature as `jax.lax.conv_general_dilated` plus `config` and `key`
  (see `dot_general`). The backward convolutions run on low-bit operands via
  `qtrain.conv_transpose`. Per-channel scales: per sample for lhs (N axis),
  per output feature for rhs (O axis).

  Args:
    lhs: float input, e.g. [N, H, W, C] with dimension_numbers ('NHWC', 'HWIO', 'NHWC').
    rhs: float kernel.
    window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, batch_group_count, precision,
      preferred_element_type, out_sharding: as in `lax.conv_general_dilated`.
    config: a `DotConfig` (fwd = conv, dlhs = input gradient, drhs = kernel
      gradient); None runs the plain convolution.
    key: PRNG key, required if any rule is stochastic.
    int_carrier: dtype that carries integer codes into the convolutions:
      'native' (int8 operands, int32 accumulation), 'float32' (the same codes
      as float32 operands: exact while partial sums stay below 2^24 in
      magnitude, i.e. always for int8 codes (|code| <= 128) with at most 1,024
      terms per output; beyond that float32 accumulation rounds, as an FP8 GEMM's does), or
      'auto' (default): 'float32' on the CPU backend, where XLA's int8
      convolutions run 10-25x slower than float32 ones (benchmarks/RESULTS.md),
      'native' elsewhere.
    grad_state: state of the config's stateful dY rules (see `dot_general`;
      initial value: `conv_general_dilated_grad_state`).

  Returns:
    The convolution output.
  """
  _check_common(lhs, rhs, config, key, grad_state)
  lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
  if config is None:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, precision, preferred_element_type,
        out_sharding=out_sharding)
  op = _conv_op(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                dimension_numbers, feature_group_count, batch_group_count, int_carrier)
  opts = _Options(precision, preferred_element_type, out_sharding)
  return _qcontract(lhs, rhs, key, grad_state, op, config, opts)


def _conv_op(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
             feature_group_count, batch_group_count, int_carrier) -> ConvOp:
  nsp = lhs.ndim - 2
  lhs_dilation = tuple(lhs_dilation or (1,) * nsp)
  rhs_dilation = tuple(rhs_dilation or (1,) * nsp)
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  pads = conv_transpose.resolve_padding(padding, lhs.shape, rhs.shape, tuple(window_strides),
                                        lhs_dilation, rhs_dilation, dn)
  if int_carrier not in ('auto', 'native', 'float32'):
    raise ValueError(f"int_carrier={int_carrier!r} is unknown; allowed: 'auto', 'native', "
                     "'float32'.")
  if int_carrier == 'auto':
    int_carrier = 'float32' if jax.default_backend() == 'cpu' else 'native'
  op = ConvOp(tuple(window_strides), tuple(tuple(p) for p in pads), lhs_dilation, rhs_dilation,
              dn, feature_group_count, batch_group_count, tuple(lhs.shape), tuple(rhs.shape),
              int_carrier)
  return op


def conv_general_dilated_grad_state(lhs, rhs, window_strides, padding, lhs_dilation=None,
                                    rhs_dilation=None, dimension_numbers=None,
                                    feature_group_count: int = 1, batch_group_count: int = 1,
                                    *, config: cfgs.DotConfig) -> dict | None:
  """The initial `grad_state` of `conv_general_dilated(...)` with these arguments.

  Args:
    lhs, rhs: the operands (only `.shape`/`.ndim` are read).
    window_strides ... batch_group_count: as in `conv_general_dilated`.
    config: the layer's DotConfig.

  Returns:
    None if `config` has no stateful dY rule, else {gemm: state} (concrete
    float32 arrays; see `dot_general_grad_state`).
  """
  if not config.stateful_slots:
    return None
  op = _conv_op(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                dimension_numbers, feature_group_count, batch_group_count, 'float32')
  out = jax.eval_shape(
      lambda a, b: lax.conv_general_dilated(a, b, window_strides, padding, lhs_dilation,
                                            rhs_dilation, dimension_numbers,
                                            feature_group_count, batch_group_count),
      jax.ShapeDtypeStruct(lhs.shape, jnp.float32), jax.ShapeDtypeStruct(rhs.shape, jnp.float32))
  return _init_grad_state(op, config, out.shape)
