"""Post-training quantization of Flax NNX transformers with FQ-ViT's quantizers.

`calibrate(model, batches, recipe)` runs a float copy of `model` over the
calibration batches with observers at every quantized site, then returns a
second copy whose layers compute with the calibrated, fixed scales
(`PtqResult(model, report)`); `model` itself is not changed. Sites
(papers-5-8.md §6.2, official `models/vit_quant.py`):

| layer (NNX)               | quantized                         | how                              |
|---------------------------|-----------------------------------|----------------------------------|
| `Linear`, `LinearGeneral` | input                             | uint8 per tensor, the observer   |
|                           | kernel                            | int8 symmetric per out channel   |
| `MultiHeadAttention`      | Q, K, V (one shared quantizer)    | uint8 per tensor                 |
|                           | logits Q·Kᵀ/√d (+ bias), pre-mask | uint8 per tensor                 |
|                           | probabilities                     | LIS (integer softmax → log2), or |
|                           |                                   | float softmax + uniform uint     |
| `LayerNorm` (last axis)   | input                             | PTF, or uint8 per tensor         |
|                           | the normalisation                 | integer LN (PTF), or float       |
|                           | output                            | uint8 per tensor (LN's s_out)    |

Kept float, as in the paper (§6.3): biases, GELU and other element-wise
functions, residual additions, the 1/√d scaling, embeddings lookups. The
paper keeps no matmul float (patch embedding and head are int8); use
`PtqRecipe.float_layers` to keep layers float by module path. Probabilities
times V run as a float matmul of the dequantized operands (fake quant).

Deviations from the official code (generic NNX models have no explicit
quantizer after every op):

* the residual stream itself stays float: PTF quantizes each LayerNorm's
  *input* (the same tensor the code re-quantizes in place), so the next
  residual addition adds the float sum, not its PTF-quantized copy;
* Linear outputs are not re-quantized where the next op re-quantizes its
  input anyway (the code's `qact` after the patch embedding, proj and fc2,
  which feed a PTF quantizer); Q, K, V and GELU outputs are quantized as in
  the code, but the model's final output (the head's logits, the code's
  `act_out`) stays float;
* all observers see float activations on every batch (the code's last
  calibration batch already runs LIS, §6.6.5);
* for masked attention (BERT padding) the logit observer sees masked
  entries replaced by the smallest unmasked logit, so padding cannot widen
  the range; LIS gives masked entries probability 0.

The quantized model runs with `nnx.jit`; calibrated parameters are
`PtqParam` variables (not `nnx.Param`: an optimizer over the model never
sees them).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from jax import lax

from qtrain import fq_vit
from qtrain._validate import check_int

__all__ = ['PtqRecipe', 'PtqParam', 'PtqReport', 'PtqResult', 'calibrate', 'PtqDotGeneral',
           'PtqAttention', 'PtqLayerNorm']


class PtqParam(nnx.Variable):
  """A calibrated quantization parameter (scale, zero point, PTF α): fixed after `calibrate`."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PtqRecipe:
  """A post-training quantization method (FQ-ViT): what `calibrate` installs.

  Not a `qtrain.Recipe`: nothing is trained. `qtrain.recipes.fq_vit()`
  builds the paper's settings.

  Attributes:
    name: short identifier.
    weight_bits: kernel width, symmetric per output channel (paper: 8).
    act_bits: activation width, uint per tensor (paper: 8).
    attn_bits: attention-probability width (paper: 4, or 8).
    observer: activation observer (`fq_vit.MinMax()`, `Ema()`, `Percentile()`, `Omse()`).
    ptf: Power-of-Two Factor on LayerNorm inputs and integer LayerNorm.
    ptf_k: K of PTF (paper: 3).
    lis: Log-Int-Softmax (integer softmax + log2 codes); False = float
      softmax and a uniform `attn_bits` quantizer with `observer`.
    lis_rounding: LIS log2 rounding, 'arithmetic' (the code) or 'geometric'.
    lis_n: i-exp range 2^-n (code: 30).
    weight_half_step: the code's /127.5 weight denominator (default /127).
    shared_qkv: one quantizer for Q, K and V (the code's fused qkv); False =
      one each.
    float_layers: regex (re.fullmatch on '/'-joined module paths) of layers
      kept float; '' = none (the paper).
    description: free text.
  """
  name: str = 'fq_vit'
  weight_bits: int = 8
  act_bits: int = 8
  attn_bits: int = 4
  observer: fq_vit.MinMax = fq_vit.MinMax()
  ptf: bool = True
  ptf_k: int = 3
  lis: bool = True
  lis_rounding: fq_vit.Log2Rounding = 'arithmetic'
  lis_n: int = 30
  weight_half_step: bool = False
  shared_qkv: bool = True
  float_layers: str = ''
  description: str = ''

  def __post_init__(self):
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f'name must be a non-empty str, got {self.name!r}.')
    for field, lo, hi in (('weight_bits', 2, 8), ('act_bits', 2, 8), ('attn_bits', 2, 8),
                          ('ptf_k', 0, 7), ('lis_n', 1, 30)):
      check_int(field, getattr(self, field), lo, hi)
    if not isinstance(self.observer, fq_vit.MinMax):
      raise TypeError(f'observer must be one of {tuple(fq_vit.OBSERVERS)} as an object '
                      f'(e.g. qtrain.fq_vit.Omse()), got {self.observer!r}.')
    for field in ('ptf', 'lis', 'weight_half_step', 'shared_qkv'):
      if not isinstance(getattr(self, field), bool):
        raise TypeError(f'{field} must be a bool, got {getattr(self, field)!r}.')
    fq_vit._check_rounding(self.lis_rounding)  # pylint: disable=protected-access
    if not isinstance(self.float_layers, str):
      raise TypeError(f'float_layers must be a regex string, got {self.float_layers!r}.')
    try:
      re.compile(self.float_layers)
    except re.error as e:
      raise ValueError(f'float_layers={self.float_layers!r} is not a valid regex: {e}.') from e

  def replace(self, **changes) -> PtqRecipe:
    """A copy with `changes` applied (validated again)."""
    return dataclasses.replace(self, **changes)

  @property
  def observer_name(self) -> str:
    return type(self.observer).__name__

  def __str__(self) -> str:
    softmax = (f'LIS {self.attn_bits}-bit log2 ({self.lis_rounding})' if self.lis else
               f'float softmax + uint{self.attn_bits} ({self.observer_name})')
    ln = f'PTF K={self.ptf_k} + integer LayerNorm' if self.ptf else 'uint per tensor, float LN'
    return (f'PtqRecipe {self.name!r} W{self.weight_bits}/A{self.act_bits}/Attn{self.attn_bits}: '
            f'weights int{self.weight_bits} per channel '
            f'(/{"2^(b-1)-0.5" if self.weight_half_step else "2^(b-1)-1"}), activations '
            f'uint{self.act_bits} per tensor ({self.observer_name}), LayerNorm inputs {ln}, '
            f'attention {softmax}' + (f'; float: {self.float_layers!r}'
                                       if self.float_layers else ''))


@dataclasses.dataclass
class PtqReport:
  """What `calibrate` did.

  Attributes:
    quantized: (path, kind, what) of every quantized site; kind is
      'linear', 'attention' or 'layernorm'.
    kept_float: (path, type name, why) of layers left float.
    batches: number of calibration batches.
  """
  quantized: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
  kept_float: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
  batches: int = 0

  def __str__(self) -> str:
    lines = [f'calibrated on {self.batches} batches; quantized ({len(self.quantized)}):']
    lines += [f'  {p or "<root>"} [{k}]: {w}' for p, k, w in self.quantized]
    lines.append(f'kept float ({len(self.kept_float)}):')
    lines += [f'  {p or "<root>"} ({t}): {w}' for p, t, w in self.kept_float]
    return '\n'.join(lines)


class PtqResult(NamedTuple):
  """The quantized copy of the model and the report."""
  model: nnx.Module
  report: PtqReport


# ----------------------------------------------------------------------------- shared math


def _uq(x, scale, zero_point, bits):
  return fq_vit.uniform_quant(x, fq_vit.AffineParams(scale, zero_point), bits=bits)


def _keep_mask(mask, is_causal: bool, shape) -> jax.Array | None:
  masks = [] if mask is None else [jnp.broadcast_to(mask, shape).astype(bool)]
  if is_causal:
    t, s = shape[-2:]
    masks.append(jnp.broadcast_to(jnp.tril(jnp.ones((t, s), bool)), shape))
  if not masks:
    return None
  out = masks[0]
  for m in masks[1:]:
    out = out & m
  return out


def _attend(query, key, value, *, bias, mask, is_causal, dtype, precision, promote_dtype,
            module, observe=None, hook=None):
  """Attention with optional observation (calibration) or quantization (`hook`)."""
  query, key, value = promote_dtype((query, key, value), dtype=dtype)
  dtype = query.dtype
  if query.ndim < 3 or not query.shape[-2] == key.shape[-2] == value.shape[-2]:
    raise ValueError(f'PTQ attention needs query, key, value [..., length, heads, depth] with '
                     f'equal head counts, got {query.shape}, {key.shape}, {value.shape}.')
  if hook is not None:
    query, key, value = hook.quantize_qkv(query, key, value)
  elif observe is not None:
    observe('qkv', (query, key, value))
  logits = jnp.einsum('...qhd,...khd->...hqk', query, key, precision=precision)
  logits = logits * jnp.asarray(1.0 / math.sqrt(query.shape[-1]), dtype)
  if bias is not None:
    logits = logits + bias
  keep = _keep_mask(mask, is_causal, logits.shape)
  if hook is not None:
    probs = hook.softmax(logits, keep)
  else:
    if observe is not None:
      neutral = logits if keep is None else jnp.where(
          keep, logits, jnp.min(jnp.where(keep, logits, jnp.inf)))
      observe('logits', neutral)
    masked = logits if keep is None else jnp.where(keep, logits, jnp.finfo(dtype).min)
    probs = jax.nn.softmax(masked, axis=-1).astype(dtype)
    if observe is not None:
      observe('probs', probs)
  probs = probs.astype(dtype)
  if module:
    module.sow(nnx.Intermediate, 'attention_weights', probs)
  return jnp.einsum('...hqk,...khd->...qhd', probs, value, precision=precision)


def _check_inference(deterministic, dropout_rate) -> None:
  if not deterministic and dropout_rate > 0.0:
    raise NotImplementedError('post-training quantization is inference-only: attention dropout '
                              'is active; call model.eval() (deterministic=True).')


# ----------------------------------------------------------------------------- calibration hooks

_RECORDER: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar(
    'qtrain_ptq_recorder', default=None)


class _Recorder:
  """Observer states of every site during one calibration run.

  The hooks call `capture` while the model runs, under `nnx.jit` with
  tracers: each capture folds the tensor into the site's observer state
  inside the trace (each call = one observation), so one compiled forward
  updates every observer. `run` passes the states in and out.
  """

  def __init__(self, recipe: PtqRecipe, keep_last: Callable[[str], bool]):
    self.recipe = recipe
    self.keep_last = keep_last
    self.observers: dict[str, fq_vit.MinMax] = {}  # filled while tracing
    self.states: dict[str, fq_vit.ObserverState] = {}
    self.last: dict[str, jax.Array] = {}

  def capture(self, name: str, x, observer: fq_vit.MinMax | None = None) -> None:
    obs = self.observers.setdefault(name, observer or self.recipe.observer)
    if isinstance(x, tuple):  # a fused tensor (Q, K, V): one observation
      x = jnp.concatenate([jnp.ravel(t) for t in x])
    x = lax.stop_gradient(jnp.asarray(x, jnp.float32))
    self.states[name] = obs.update(self.states.get(name, obs.init()), x)
    if self.keep_last(name):
      self.last[name] = x

  def run(self, forward, model, batch, states):
    """forward(model, batch) with the observer states `states` in; (states, last) out."""
    self.states, self.last = dict(states), {}
    forward(model, batch)
    return self.states, self.last

  def params(self, name: str, bits: int) -> fq_vit.AffineParams:
    return _params(self.observers[name], self.states[name], self.last.get(name), bits)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _params(observer, state, last, bits):
  return observer.compute_params(state, last, bits=bits)


@functools.partial(jax.jit, static_argnames=('bits', 'k'))
def _ptf_params(last, lo, hi, *, bits, k):
  return fq_vit.ptf_params(last, bits=bits, k=k, min_val=lo, max_val=hi)


def _record(name: str, x, observer=None) -> None:
  recorder = _RECORDER.get()
  if recorder is not None:
    recorder.capture(name, x, observer)


class _ObserveDot(nnx.Module):
  """Calibration `dot_general`: records the input, computes in float."""

  def __init__(self, name: str):
    self.name = name

  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
               *, out_sharding=None):
    _record(f'{self.name}:input', lhs)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                           out_sharding=out_sharding)


class _ObserveAttention(nnx.Module):
  """Calibration `attention_fn`: records Q/K/V, logits and probabilities."""

  def __init__(self, name: str, shared_qkv: bool, observe_probs: bool):
    self.name = name
    self.shared_qkv = shared_qkv
    self.observe_probs = observe_probs  # only the uniform (non-LIS) softmax quantizer needs them

  def _observe(self, what: str, x) -> None:
    if what == 'probs' and not self.observe_probs:
      return
    if what == 'qkv' and not self.shared_qkv:
      for part, t in zip('qkv', x):
        _record(f'{self.name}:{part}', t)
    else:
      _record(f'{self.name}:{what}', x)

  def __call__(self, query, key, value, bias=None, mask=None, broadcast_dropout=True,
               dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
               precision=None, module=None, promote_dtype=dtypes.promote_dtype,
               is_causal=False):
    del broadcast_dropout, dropout_rng
    _check_inference(deterministic, dropout_rate)
    return _attend(query, key, value, bias=bias, mask=mask, is_causal=is_causal, dtype=dtype,
                   precision=precision, promote_dtype=promote_dtype, module=module,
                   observe=self._observe)


class _ObserveLayerNorm(nnx.Module):
  """Calibration stand-in for an `nnx.LayerNorm`: records input and output."""

  def __init__(self, layer: nnx.LayerNorm, name: str):
    self.layer = layer
    self.name = name

  def __call__(self, x, *, mask=None):
    _record(f'{self.name}:ln_input', x, fq_vit.MinMax())
    y = self.layer(x, mask=mask)
    _record(f'{self.name}:ln_output', y)
    return y


class _ObserveLayerNormPlain(_ObserveLayerNorm):
  """Calibration LayerNorm without PTF: the input takes the recipe's observer."""

  def __call__(self, x, *, mask=None):
    _record(f'{self.name}:ln_input', x)
    return self.layer(x, mask=mask)


# ----------------------------------------------------------------------------- quantized layers


class PtqDotGeneral(nnx.Module):
  """`dot_general` of a calibrated Linear/LinearGeneral: uint input (fixed scale), int kernel.

  Args:
    input_params: the input's AffineParams, or None to keep the input float.
    weight_scale: per-output-channel scale of the kernel (kernel-shaped with
      size-1 contracted axes), computed once at calibration.
    act_bits, weight_bits: widths.
    name: the layer path (a jax.named_scope).
  """

  def __init__(self, *, input_params: fq_vit.AffineParams | None, weight_scale: jax.Array,
               act_bits: int, weight_bits: int, name: str = ''):
    self.quantize_input = input_params is not None
    if input_params is not None:
      self.input_scale = PtqParam(jnp.asarray(input_params.scale))
      self.input_zero_point = PtqParam(jnp.asarray(input_params.zero_point))
    self.weight_scale = PtqParam(jnp.asarray(weight_scale))
    self.act_bits = act_bits
    self.weight_bits = weight_bits
    self.name = name

  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
               *, out_sharding=None):
    with jax.named_scope(self.name or 'ptq'):
      if self.quantize_input:
        lhs = _uq(lhs, self.input_scale[...], self.input_zero_point[...], self.act_bits)
      rhs = fq_vit.weight_quant(rhs, bits=self.weight_bits, scale=self.weight_scale[...])
      return lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                             out_sharding=out_sharding)


class PtqAttention(nnx.Module):
  """`attention_fn` of a calibrated MultiHeadAttention (see the module table).

  Args:
    qkv: AffineParams of Q, K, V — one (shared) or a tuple of three.
    logits: AffineParams of the scaled logits.
    probs: AffineParams of the probabilities (uniform path, lis=False), else None.
    recipe: the PtqRecipe (bits, LIS options).
    name: the layer path.
  """

  def __init__(self, *, qkv, logits: fq_vit.AffineParams, probs: fq_vit.AffineParams | None,
               recipe: PtqRecipe, name: str = ''):
    parts = qkv if isinstance(qkv, tuple) and len(qkv) == 3 else (qkv,) * 3
    self.qkv_scale = PtqParam(jnp.stack([jnp.asarray(p.scale) for p in parts]))
    self.qkv_zero_point = PtqParam(jnp.stack([jnp.asarray(p.zero_point) for p in parts]))
    self.logit_scale = PtqParam(jnp.asarray(logits.scale))
    self.logit_zero_point = PtqParam(jnp.asarray(logits.zero_point))
    self.lis = recipe.lis
    if not recipe.lis:
      self.prob_scale = PtqParam(jnp.asarray(probs.scale))
      self.prob_zero_point = PtqParam(jnp.asarray(probs.zero_point))
    self.act_bits = recipe.act_bits
    self.attn_bits = recipe.attn_bits
    self.lis_rounding = recipe.lis_rounding
    self.lis_n = recipe.lis_n
    self.name = name

  def quantize_qkv(self, query, key, value):
    s, zp = self.qkv_scale[...], self.qkv_zero_point[...]
    return tuple(_uq(t, s[i], zp[i], self.act_bits) for i, t in enumerate((query, key, value)))

  def softmax(self, logits, keep):
    s = self.logit_scale[...]
    logits = _uq(logits, s, self.logit_zero_point[...], self.act_bits)
    if self.lis:
      return fq_vit.log_int_softmax(logits, s, bits=self.attn_bits, n=self.lis_n, mask=keep,
                                    rounding=self.lis_rounding)
    masked = logits if keep is None else jnp.where(keep, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(masked, axis=-1)
    return _uq(probs, self.prob_scale[...], self.prob_zero_point[...], self.attn_bits)

  def __call__(self, query, key, value, bias=None, mask=None, broadcast_dropout=True,
               dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
               precision=None, module=None, promote_dtype=dtypes.promote_dtype,
               is_causal=False):
    del broadcast_dropout, dropout_rng
    _check_inference(deterministic, dropout_rate)
    with jax.named_scope(self.name or 'ptq'):
      return _attend(query, key, value, bias=bias, mask=mask, is_causal=is_causal, dtype=dtype,
                     precision=precision, promote_dtype=promote_dtype, module=module, hook=self)


class PtqLayerNorm(nnx.Module):
  """A calibrated `nnx.LayerNorm` (last-axis): PTF input + integer LN, or uint input + float LN.

  Shares the original layer's `scale`/`bias` variables.

  Args:
    layer: the float nnx.LayerNorm.
    ptf: PtfParams of the input (integer mode), or None.
    input_params: AffineParams of the input (float mode, ptf is None).
    output: AffineParams of the output (integer mode: s_out and the clip).
    act_bits: activation width.
    name: the layer path.
  """

  def __init__(self, layer: nnx.LayerNorm, *, ptf: fq_vit.PtfParams | None,
               input_params: fq_vit.AffineParams | None, output: fq_vit.AffineParams | None,
               act_bits: int, name: str = ''):
    self.scale = layer.scale
    self.bias = layer.bias
    self.epsilon = layer.epsilon
    self.dtype = layer.dtype
    self.integer = ptf is not None
    if ptf is not None:
      self.ptf_base_scale = PtqParam(jnp.asarray(ptf.base_scale))
      self.ptf_zero_point = PtqParam(jnp.asarray(ptf.zero_point))
      self.ptf_alpha = PtqParam(jnp.asarray(ptf.alpha))
      self.out_scale = PtqParam(jnp.asarray(output.scale))
      self.out_zero_point = PtqParam(jnp.asarray(output.zero_point))
    else:
      self.input_scale = PtqParam(jnp.asarray(input_params.scale))
      self.input_zero_point = PtqParam(jnp.asarray(input_params.zero_point))
    self.act_bits = act_bits
    self.name = name

  def _gamma_beta(self):
    gamma = self.scale[...] if self.scale is not None else None
    beta = self.bias[...] if self.bias is not None else None
    return gamma, beta

  def __call__(self, x, *, mask=None):
    if mask is not None:
      raise NotImplementedError('PtqLayerNorm does not support mask.')
    gamma, beta = self._gamma_beta()
    with jax.named_scope(self.name or 'ptq'):
      if not self.integer:
        xq = _uq(x, self.input_scale[...], self.input_zero_point[...], self.act_bits)
        x32 = xq.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * lax.rsqrt(var + self.epsilon)
        shape = (1,) * (x.ndim - 1) + (-1,)
        y = y * gamma.reshape(shape) if gamma is not None else y
        y = y + beta.reshape(shape) if beta is not None else y
        return y.astype(self.dtype or x.dtype)
      params = fq_vit.PtfParams(self.ptf_base_scale[...], self.ptf_zero_point[...],
                                self.ptf_alpha[...])
      codes = fq_vit.ptf_codes(x, bits=self.act_bits, params=params)
      s_out, zp_out = self.out_scale[...], self.out_zero_point[...]
      y_int = fq_vit.int_layer_norm(codes, out_scale=s_out, scale=gamma, bias=beta)
      q = jnp.clip(y_int + zp_out, 0.0, 2.0 ** self.act_bits - 1)
      return ((q - zp_out) * s_out).astype(self.dtype or x.dtype)


# ----------------------------------------------------------------------------- the driver


@dataclasses.dataclass
class _Site:
  path: tuple
  name: str
  kind: str
  module: nnx.Module


_OTHER_MATMULS = (nnx.Conv, nnx.ConvTranspose, nnx.Einsum, nnx.LoRA)
_OTHER_NORMS = (nnx.BatchNorm, nnx.RMSNorm, nnx.GroupNorm)


def _last_axis_only(axes) -> bool:
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  return axes == (-1,)


def _classify(path: tuple, module) -> tuple[str | None, str | None]:
  """(kind, None) for a site FQ-ViT quantizes, (None, why) for one kept float, (None, None) else."""
  if isinstance(module, (nnx.Linear, nnx.LinearGeneral)):
    if getattr(module, 'dot_general_cls', None) is not None or not (
        module.dot_general is None or module.dot_general is lax.dot_general):
      return None, ('its dot_general was replaced already (e.g. by qtrain.quantize_model); '
                    'calibrate the float model')
    return 'linear', None
  if isinstance(module, nnx.MultiHeadAttention):
    if module.attention_fn is not nnx.dot_product_attention:
      return None, 'its attention_fn was replaced already; calibrate the float model'
    return 'attention', None
  if isinstance(module, nnx.LayerNorm):
    if not path:
      return None, 'the model itself is a LayerNorm (nothing to swap it in)'
    if not (_last_axis_only(module.reduction_axes) and _last_axis_only(module.feature_axes)):
      return None, 'LayerNorm over axes other than the last one'
    if module.axis_name is not None:
      return None, 'LayerNorm with cross-device statistics (axis_name)'
    return 'layernorm', None
  if isinstance(module, _OTHER_MATMULS + _OTHER_NORMS):
    return None, f'FQ-ViT quantizes Linear, MultiHeadAttention and LayerNorm only, not ' \
                 f'{type(module).__name__}'
  return None, None


def _find_sites(model: nnx.Module, recipe: PtqRecipe) -> tuple[list[_Site], list]:
  sites, kept = [], []
  for path, module in nnx.iter_modules(model):
    name = '/'.join(map(str, path))
    kind, why = _classify(tuple(path), module)
    if kind is None:
      if why is not None:
        kept.append((name, type(module).__name__, why))
      continue
    if recipe.float_layers and re.fullmatch(recipe.float_layers, name):
      kept.append((name, type(module).__name__, f'float_layers={recipe.float_layers!r}'))
      continue
    sites.append(_Site(path=tuple(path), name=name, kind=kind, module=module))
  return sites, kept


def _replace_child(model: nnx.Module, path: tuple, new) -> None:
  parent = model
  for p in path[:-1]:
    parent = parent[p] if isinstance(p, int) else getattr(parent, p)
  if isinstance(path[-1], int):
    parent[path[-1]] = new
  else:
    setattr(parent, path[-1], new)


def _install_observers(model: nnx.Module, sites: list[_Site], recipe: PtqRecipe) -> None:
  for site in sites:
    if site.kind == 'linear':
      site.module.dot_general = nnx.data(_ObserveDot(site.name))
    elif site.kind == 'attention':
      site.module.attention_fn = nnx.data(_ObserveAttention(site.name, recipe.shared_qkv,
                                                                  not recipe.lis))
  # LayerNorm swaps last: a swap replaces a child that the loop above may still need.
  # Without PTF the LayerNorm input takes the recipe's observer (not MinMax).
  observe = _ObserveLayerNorm if recipe.ptf else _ObserveLayerNormPlain
  for site in sites:
    if site.kind == 'layernorm':
      _replace_child(model, site.path, observe(site.module, site.name))


def _call(model, batch):
  if isinstance(batch, dict):
    return model(**batch)
  if isinstance(batch, (tuple, list)):
    return model(*batch)
  return model(batch)


def _contracted_axes(module) -> tuple[int, ...]:
  if isinstance(module, nnx.Linear):
    return (0,)
  n_batch = len(module.batch_axis)
  n_axis = 1 if isinstance(module.axis, int) else len(module.axis)
  return tuple(range(n_batch, n_batch + n_axis))


def _describe(recipe: PtqRecipe, kind: str, quantize_input: bool = True) -> str:
  obs = recipe.observer_name
  if kind == 'linear':
    x = f'input uint{recipe.act_bits} per tensor ({obs})' if quantize_input else 'input float'
    return f'{x}, kernel int{recipe.weight_bits} per channel'
  if kind == 'attention':
    qkv = 'shared' if recipe.shared_qkv else 'separate'
    soft = (f'LIS uint{recipe.attn_bits} log2 ({recipe.lis_rounding})' if recipe.lis else
            f'float softmax + uint{recipe.attn_bits} ({obs})')
    return f'Q/K/V uint{recipe.act_bits} ({qkv}), logits uint{recipe.act_bits}, {soft}'
  if recipe.ptf:
    return (f'input PTF uint{recipe.act_bits} K={recipe.ptf_k}, integer LayerNorm, output '
            f'uint{recipe.act_bits} ({obs})')
  return f'input uint{recipe.act_bits} per tensor ({obs}), float LayerNorm'


def _build(model: nnx.Module, sites: list[_Site], recorder: _Recorder,
           recipe: PtqRecipe) -> list[tuple[str, str, str]]:
  done = []
  rec = recorder
  for site in sites:
    m = site.module
    if site.kind == 'linear':
      kernel = m.kernel[...]
      contract = _contracted_axes(m)
      keep = tuple(a for a in range(kernel.ndim) if a not in contract)
      scale = fq_vit.weight_scale(kernel, bits=recipe.weight_bits, axis=keep,
                                  half_step=recipe.weight_half_step)
      m.dot_general = nnx.data(PtqDotGeneral(
          input_params=rec.params(f'{site.name}:input', recipe.act_bits), weight_scale=scale,
          act_bits=recipe.act_bits, weight_bits=recipe.weight_bits, name=site.name))
    elif site.kind == 'attention':
      if recipe.shared_qkv:
        qkv = rec.params(f'{site.name}:qkv', recipe.act_bits)
      else:
        qkv = tuple(rec.params(f'{site.name}:{p}', recipe.act_bits) for p in 'qkv')
      probs = None if recipe.lis else rec.params(f'{site.name}:probs', recipe.attn_bits)
      m.attention_fn = nnx.data(PtqAttention(
          qkv=qkv, logits=rec.params(f'{site.name}:logits', recipe.act_bits), probs=probs,
          recipe=recipe, name=site.name))
    done.append((site.name, site.kind, _describe(recipe, site.kind)))
  for site in sites:
    if site.kind != 'layernorm':
      continue
    key = f'{site.name}:ln_input'
    if recipe.ptf:
      state = rec.states[key]
      ptf = _ptf_params(rec.last[key], state.lo, state.hi, bits=recipe.act_bits,
                        k=recipe.ptf_k)
      new = PtqLayerNorm(site.module, ptf=ptf, input_params=None,
                         output=rec.params(f'{site.name}:ln_output', recipe.act_bits),
                         act_bits=recipe.act_bits, name=site.name)
    else:
      new = PtqLayerNorm(site.module, ptf=None, input_params=rec.params(key, recipe.act_bits),
                         output=None, act_bits=recipe.act_bits, name=site.name)
    _replace_child(model, site.path, new)
  return done


def _reached(site: _Site, recorder: _Recorder) -> bool:
  first = {'linear': 'input', 'attention': 'logits', 'layernorm': 'ln_input'}[site.kind]
  return f'{site.name}:{first}' in recorder.states


def calibrate(model: nnx.Module, batches: Iterable[Any], recipe: PtqRecipe | None = None, *,
              forward: Callable[[nnx.Module, Any], Any] | None = None,
              jit: bool = True) -> PtqResult:
  """FQ-ViT post-training quantization of an NNX model (papers-5-8.md §6).

  1. A float copy of `model` in eval mode runs `forward(copy, batch)` on every
     calibration batch (under `nnx.jit` by default) with observers at each site of the module
     table; 2. the observers give fixed scales and zero points (PTF: range
     over all batches, α on the last; OMSE: the last batch); 3. a second copy
     gets the quantized layers and is returned in eval mode.

  Args:
    model: a float `nnx.Module` built from `nnx.Linear`/`LinearGeneral`,
      `nnx.LayerNorm`, `nnx.MultiHeadAttention` (others are kept float and
      reported). Not modified.
    batches: an iterable of model inputs (paper: 10 batches of 100 training
      images); each is passed as `model(batch)`, `model(*batch)` for a
      tuple/list, `model(**batch)` for a dict, unless `forward` is given.
    recipe: a `PtqRecipe` (default: `qtrain.recipes.fq_vit()`'s 8/8/4).
    forward: `forward(model, batch)` runs the model on one batch.
    jit: run the calibration forward under `nnx.jit` (the observed tensors
      are returned as outputs and folded into the observers outside jit);
      False runs it eagerly.

  Returns:
    PtqResult(model, report): the quantized copy and a `PtqReport`.

  Raises:
    TypeError: `model` is not an nnx.Module, `recipe` is not a PtqRecipe, or
      `forward` is not callable.
    ValueError: `batches` is empty, or no site is quantizable (the message
      lists what was kept float and why).
    NotImplementedError: attention dropout active during calibration.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from qtrain import ptq
    >>> rngs = nnx.Rngs(0)
    >>> model = nnx.Sequential(nnx.LayerNorm(8, rngs=rngs), nnx.Linear(8, 2, rngs=rngs))
    >>> x = jax.random.normal(jax.random.key(0), (4, 8))
    >>> qmodel, report = ptq.calibrate(model, [x])
    >>> [(p, k) for p, k, _ in report.quantized]
    [('layers/0', 'layernorm'), ('layers/1', 'linear')]
    >>> bool(jnp.max(jnp.abs(qmodel(x) - model(x))) < 0.1)
    True
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f'model must be a flax.nnx.Module, got {type(model).__name__}.')
  if recipe is None:
    recipe = PtqRecipe()
  if not isinstance(recipe, PtqRecipe):
    raise TypeError(f'recipe must be a qtrain.ptq.PtqRecipe (e.g. qtrain.recipes.fq_vit()), got '
                    f'{type(recipe).__name__}; a qtrain.Recipe is a training recipe.')
  forward = _call if forward is None else forward
  if not callable(forward):
    raise TypeError(f'forward must be a function (model, batch) -> output, got {forward!r}.')
  if isinstance(batches, (jax.Array, jnp.ndarray)) or not isinstance(batches, Iterable):
    raise TypeError('batches must be an iterable of batches (e.g. a list of arrays), got '
                    f'{type(batches).__name__}.')
  batches = list(batches)
  if not batches:
    raise ValueError('batches is empty: calibration needs at least one batch (the paper uses '
                     '10 batches of 100 training images).')
  calib = nnx.clone(model)
  calib.eval()
  sites, kept = _find_sites(calib, recipe)
  if not sites:
    found = '; '.join(f'{p or "<root>"} ({t}): {w}' for p, t, w in kept) or 'none'
    raise ValueError('the model has no site FQ-ViT can quantize (nnx.Linear, LinearGeneral, '
                     f'MultiHeadAttention, last-axis LayerNorm); layers kept float: {found}.')
  needs_last = isinstance(recipe.observer, fq_vit.Omse)
  recorder = _Recorder(recipe, lambda n: needs_last or (recipe.ptf and n.endswith(':ln_input')))
  _install_observers(calib, sites, recipe)
  def run(m, batch, states):
    return recorder.run(forward, m, batch, states)

  token = _RECORDER.set(recorder)
  try:
    # Trace once without compiling to learn the sites and their observers,
    # then run every batch through one compiled forward (fixed state structure).
    nnx.eval_shape(run, calib, batches[0], {})
    states = {name: obs.init() for name, obs in recorder.observers.items()}
    step = nnx.jit(run) if jit else run
    for batch in batches:
      states, last = step(calib, batch, states)
  finally:
    _RECORDER.reset(token)
  recorder.states, recorder.last = states, last
  quantized = nnx.clone(model)
  quantized.eval()
  q_sites, _ = _find_sites(quantized, recipe)
  reached = {s.name for s in sites if _reached(s, recorder)}
  kept += [(s.name, type(s.module).__name__, 'not called during calibration')
           for s in sites if s.name not in reached]
  q_sites = [s for s in q_sites if s.name in reached]
  if not q_sites:
    raise ValueError('no quantizable layer was called during calibration: check `forward`.')
  done = _build(quantized, q_sites, recorder, recipe)
  return PtqResult(quantized, PtqReport(quantized=done, kept_float=kept, batches=len(batches)))
