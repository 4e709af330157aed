"""Flax NNX hooks: stateful quantized ops with their own RNG stream.

`nnx.Linear` & co. call `self.dot_general(x, kernel, dimension_numbers,
precision=..., out_sharding=...)` and pass no key, so the key must live in the
hook. Each hook here holds a `DotConfig` and an `nnx.Rngs` with a 'quant'
stream and draws a fresh key per call; under `nnx.jit` the stream's counter is
model state, so every step and every layer gets new noise without retracing.
Assign a hook wrapped in `nnx.data(...)`: the hook attributes of NNX layers
are static otherwise. `qtrain.quantize_model` automates this by module path.

| hook                          | replaces                       | of                        |
|-------------------------------|--------------------------------|---------------------------|
| `QuantizedDotGeneral`         | `dot_general`                  | `Linear`, `LinearGeneral` |
| `QuantizedConvGeneralDilated` | `conv_general_dilated`         | `Conv`                    |
| `QuantizedEinsum`             | `einsum_op`                    | `Einsum`                  |
| `QuantizedAttention`          | `attention_fn`                 | `MultiHeadAttention`      |

Per-layer gradient state: when a dot/conv hook's config has a
`scaling.StatefulCalibration` dY rule (DA-INT8's EMA clip, ...), the hook
holds that rule's state in a `GradState` variable (`hook.grad_state`) and
passes it to the dot as `grad_state`. The state's shape depends on dY's
shape, which is unknown when the hook is installed, so it is created
*lazily*, on the hook's first call (eagerly or under any NNX transform:
graph-mode `nnx.jit`/`nnx.grad` propagate the new variable), or up front by
`init_grad_state(fn, model, *args)` from abstract inputs (no compute, no
BatchNorm update). Create it before a jitted train step (`make_train_step`
does), before `nnx.Optimizer`-independent checkpoint restores, and before
`nnx.scan` loops (whose carry must keep its structure). A state first
created inside `nnx.grad` is not differentiated in that call, so its first
update is dropped.

The new state comes out of `nnx.grad` as the GradState "gradient";
`apply_grad_state(model, grads)` writes it into the model (differentiate
w.r.t. `GRAD_STATE_WRT = nnx.Any(nnx.Param, GradState)` and give the
optimizer only the Params). Einsum and attention hooks do not support
stateful rules yet (they raise).
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes

from qtrain import attention
from qtrain.config import DotConfig
from qtrain.dot import (conv_general_dilated, conv_general_dilated_grad_state, dot_general,
                        dot_general_grad_state)
from qtrain.einsum import einsum

__all__ = ['QuantizedDotGeneral', 'QuantizedConvGeneralDilated', 'QuantizedEinsum',
           'QuantizedAttention', 'HOOK_TYPES', 'GradState', 'GRAD_STATE_WRT',
           'init_grad_state', 'apply_grad_state', 'has_grad_state', 'missing_grad_state']


class GradState(nnx.Variable):
  """One array of the per-layer state of a stateful backward-pass quantizer.

  A hook's `grad_state` is the dot's {gemm: state} pytree with a GradState
  at every leaf (one variable per array, so checkpoints and `nnx.update`
  see plain arrays).

  Not a parameter: the optimizer never sees it. Its "gradient" from
  `nnx.grad` is its next value (`apply_grad_state`).
  """


# What a train step differentiates: parameters, and GradState to get the new state.
GRAD_STATE_WRT = nnx.Any(nnx.Param, GradState)


class _Hook(nnx.Module):
  """Shared state of the hooks: config, RNG stream, scope name, replaced op."""

  def __init__(self, config: DotConfig, *, rngs: nnx.Rngs, name: str = '', original: Any = None):
    if not isinstance(config, DotConfig):
      raise TypeError(f'config must be a qtrain.DotConfig, got {config!r}.')
    self.config = config
    self.rngs = rngs
    # Static: the layer path (a jax.named_scope, so profiles and jaxprs show
    # which layer a low-bit GEMM belongs to) and the op this hook replaced
    # (what quantize_model puts back when a layer is re-quantized as float).
    self.name = name
    self.original = original
    if config.stateful_slots:
      if not isinstance(self, (QuantizedDotGeneral, QuantizedConvGeneralDilated)):
        raise NotImplementedError(
            f'{type(self).__name__}: StatefulCalibration dY rules are supported in dot and conv '
            f'hooks only (config has them in {config.stateful_slots}).')
      # A GradState once the dY shape is known (first call or init_grad_state).
      self.grad_state = nnx.data(None)

  def _grad_state(self, make_initial) -> dict | None:
    """The state to pass to the dot, created by `make_initial()` on first use."""
    if not self.config.stateful_slots:
      return None
    if self.grad_state is None:
      self._set_grad_state(make_initial())
    return self.grad_state_value()

  def _set_grad_state(self, value: dict) -> None:
    self.grad_state = nnx.data(jax.tree.map(GradState, value))

  def grad_state_value(self) -> dict | None:
    """The current {gemm: state} arrays, or None (stateless config or not created yet)."""
    if getattr(self, 'grad_state', None) is None:
      return None
    return jax.tree.map(lambda v: v.get_value(), self.grad_state,
                        is_leaf=lambda v: isinstance(v, nnx.Variable))

  def _key(self) -> jax.Array | None:
    # Deterministic configs draw nothing: the stream's counter then only
    # advances for layers that use noise.
    return self.rngs.quant() if self.config.needs_key else None

  def _scope(self):
    return jax.named_scope(self.name) if self.name else contextlib.nullcontext()


class QuantizedDotGeneral(_Hook):
  """A drop-in `dot_general` for NNX layers that quantizes by `config`.

  Args:
    config: the layer's DotConfig.
    rngs: an `nnx.Rngs` with a `quant` stream (used only if the config is stochastic).
    name: optional `jax.named_scope` for the GEMMs (`quantize_model` uses the layer path).
    original: the op this hook replaced (restored by `quantize_model`).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> import qtrain
    >>> layer = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    >>> layer.dot_general = nnx.data(qtrain.nnx_hooks.QuantizedDotGeneral(
    ...     qtrain.presets.int8(), rngs=nnx.Rngs(quant=1)))
    >>> layer(jnp.ones((3, 4))).shape
    (3, 2)
  """

  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
               *, out_sharding=None):
    state = self._grad_state(lambda: dot_general_grad_state(lhs, rhs, dimension_numbers,
                                                            config=self.config))
    with self._scope():
      return dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                         config=self.config, key=self._key(), out_sharding=out_sharding,
                         grad_state=state)


class QuantizedConvGeneralDilated(_Hook):
  """A drop-in `conv_general_dilated` for `nnx.Conv` that quantizes by `config`.

  Args:
    config: the layer's DotConfig (fwd = conv, dlhs = input grad, drhs = kernel grad).
    rngs: an `nnx.Rngs` with a `quant` stream.
    name: optional `jax.named_scope` for the convolutions.
    original: the op this hook replaced.
  """

  def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, batch_group_count=1,
               precision=None, preferred_element_type=None, *, out_sharding=None):
    state = self._grad_state(lambda: conv_general_dilated_grad_state(
        lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
        feature_group_count, batch_group_count, config=self.config))
    with self._scope():
      return conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                  rhs_dilation, dimension_numbers, feature_group_count,
                                  batch_group_count, precision, preferred_element_type,
                                  config=self.config, key=self._key(),
                                  out_sharding=out_sharding, grad_state=state)


class QuantizedEinsum(_Hook):
  """A drop-in `einsum_op` for `nnx.Einsum`: `qtrain.einsum.einsum` by `config`.

  The layer's input is the first operand (`config.fwd.lhs`), its kernel the
  second (`config.fwd.rhs`).

  Args:
    config: the layer's DotConfig.
    rngs: an `nnx.Rngs` with a `quant` stream.
    name: optional `jax.named_scope` for the contraction.
    original: the op this hook replaced.
  """

  def __call__(self, subscripts, *operands, precision=None, preferred_element_type=None,
               out_sharding=None):
    with self._scope():
      return einsum(subscripts, *operands, precision=precision,
                    preferred_element_type=preferred_element_type, out_sharding=out_sharding,
                    config=self.config, key=self._key())


class QuantizedAttention(_Hook):
  """A drop-in `attention_fn` for `nnx.MultiHeadAttention` with quantized QKᵀ and probs·V.

  See `qtrain.attention.dot_product_attention` for what is supported.

  Args:
    config: DotConfig of both attention matmuls.
    rngs: an `nnx.Rngs` with a `quant` stream (one key per call, folded per matmul).
    name: optional `jax.named_scope` for the two matmuls.
    original: the attention function this hook replaced.
  """

  def __call__(self, query, key, value, bias=None, mask=None, broadcast_dropout=True,
               dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
               precision=None, module=None, promote_dtype=dtypes.promote_dtype,
               is_causal=False):
    with self._scope():
      return attention.dot_product_attention(
          query, key, value, bias, mask, broadcast_dropout, dropout_rng, dropout_rate,
          deterministic, dtype, precision, module, promote_dtype, is_causal,
          config=self.config, quant_key=self._key())


HOOK_TYPES = (QuantizedDotGeneral, QuantizedConvGeneralDilated, QuantizedEinsum,
              QuantizedAttention)


def _stateful_hooks(model) -> list[tuple[tuple, _Hook]]:
  return [(path, m) for path, m in nnx.iter_modules(model)
          if isinstance(m, _Hook) and m.config.stateful_slots]


def has_grad_state(model) -> bool:
  """True if some hook of `model` has a stateful dY rule (created or not)."""
  return bool(_stateful_hooks(model))


def missing_grad_state(model) -> list[str]:
  """Paths of the stateful hooks of `model` whose GradState does not exist yet."""
  return ['/'.join(map(str, p)) for p, h in _stateful_hooks(model) if h.grad_state is None]


def init_grad_state(fn, model, *args, **kwargs) -> list[str]:
  """Creates the missing GradState variables of `model` by tracing `fn` abstractly.

  `fn(model, *args, **kwargs)` (e.g. the loss function, or
  `lambda m, x: m(x)`) runs under `nnx.eval_shape` on a copy of the model:
  nothing is computed and no state of `model` (BatchNorm statistics, RNG
  counters) changes. Each stateful hook met records the initial state for
  the operand shapes it saw; the states are then created on `model`'s own
  hooks. Hooks whose state exists are left as they are.

  Args:
    fn: a function of (model, *args, **kwargs) that calls the model.
    model: an NNX model with qtrain hooks.
    *args, **kwargs: example inputs (arrays or `jax.ShapeDtypeStruct`), with
      the training batch's shapes.

  Returns:
    The module paths of the hooks whose state was created.

  Raises:
    ValueError: a stateful hook that `fn` did not call.
  """
  missing = missing_grad_state(model)
  if not missing:
    return []
  recorded: dict[str, Any] = {}

  def probe(m, *a, **k):
    # The copy's hooks create their states on first call; read them back by path.
    fn(m, *a, **k)
    for path, hook in _stateful_hooks(m):
      if hook.grad_state is not None:
        recorded['/'.join(map(str, path))] = hook.grad_state_value()

  nnx.eval_shape(probe, model, *args, **kwargs)
  created = []
  for path, hook in _stateful_hooks(model):
    name = '/'.join(map(str, path))
    if hook.grad_state is not None:
      continue
    if name not in recorded:
      raise ValueError(f'init_grad_state: the hook at {name} was not called by fn; cannot '
                       'infer the shape of its gradient state.')
    # Recorded states are concrete (made under ensure_compile_time_eval), but
    # eval_shape abstracts its outputs, hence the side channel and the copy.
    hook._set_grad_state(jax.tree.map(jnp.array, recorded[name]))  # pylint: disable=protected-access
    created.append(name)
  return created


def apply_grad_state(model, grads) -> None:
  """Writes the new per-layer states in `grads` (from `nnx.grad`) into `model`.

  Args:
    model: the NNX model that was differentiated.
    grads: the `nnx.State` of gradients w.r.t. (at least) its GradState
      variables, e.g. `nnx.grad(loss, argnums=nnx.DiffState(0, GRAD_STATE_WRT))`.
      A GradState's gradient is its next value (`qtrain.dot_general`'s doc).
      Grads without GradState entries change nothing.
  """
  new = nnx.state(grads, GradState)
  if new:
    nnx.update(model, new)
