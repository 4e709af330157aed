"""Flax NNX hooks: a stateful quantized `dot_general` with its own RNG stream.

`nnx.Linear` & co. call `self.dot_general(x, kernel, dimension_numbers,
precision=..., out_sharding=...)` and pass no key, so the key must live in the
hook. `QuantizedDotGeneral` holds the `DotConfig` and an `nnx.Rngs` stream and
draws a fresh key per call; under `nnx.jit` the stream's counter is model
state, so every step and every layer gets new noise without retracing.
Assign it wrapped in `nnx.data(...)`: `dot_general` is a static attribute of
NNX layers otherwise. (`qtrain.quantize_model` automates this by module path.)
"""

from __future__ import annotations

from flax import nnx

from qtrain.config import DotConfig
from qtrain.dot import conv_general_dilated, dot_general

__all__ = ['QuantizedDotGeneral', 'QuantizedConvGeneralDilated']


class QuantizedDotGeneral(nnx.Module):
  """A drop-in `dot_general` for NNX layers that quantizes by `config`.

  Args:
    config: the layer's DotConfig.
    rngs: an `nnx.Rngs` with a `quant` stream (used only if the config is stochastic).

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

  def __init__(self, config: DotConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.rngs = rngs

  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
               *, out_sharding=None):
    key = self.rngs.quant() if self.config.needs_key else None
    return dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type,
                       config=self.config, key=key, out_sharding=out_sharding)


class QuantizedConvGeneralDilated(nnx.Module):
  """A drop-in `conv_general_dilated` for `nnx.Conv` that quantizes by `config`.

  Args:
    config: the layer's DotConfig (fwd = conv, dlhs = input grad, drhs = kernel grad).
    rngs: an `nnx.Rngs` with a `quant` stream.
  """

  def __init__(self, config: DotConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.rngs = rngs

  def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, batch_group_count=1,
               precision=None, preferred_element_type=None, *, out_sharding=None):
    key = self.rngs.quant() if self.config.needs_key else None
    return conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                dimension_numbers, feature_group_count, batch_group_count,
                                precision, preferred_element_type, config=self.config, key=key,
                                out_sharding=out_sharding)
