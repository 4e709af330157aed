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
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax
from flax import nnx
from flax.nnx.nn import dtypes

from qtrain import attention
from qtrain.config import DotConfig
from qtrain.dot import conv_general_dilated, dot_general
from qtrain.einsum import einsum

__all__ = ['QuantizedDotGeneral', 'QuantizedConvGeneralDilated', 'QuantizedEinsum',
           'QuantizedAttention', 'HOOK_TYPES']


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
    with self._scope():
      return dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                         config=self.config, key=self._key(), out_sharding=out_sharding)


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
    with self._scope():
      return conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation,
                                  rhs_dilation, dimension_numbers, feature_group_count,
                                  batch_group_count, precision, preferred_element_type,
                                  config=self.config, key=self._key(),
                                  out_sharding=out_sharding)


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
