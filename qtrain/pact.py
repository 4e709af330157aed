"""PACT's learned activation clip inside quantized NNX layers (Ultra-low's forward).

`qtrain.dot_general` takes static configs, so a *learned* clip α cannot be a
calibration of its forward lhs rule. Instead, `install_pact(model)` swaps the
dot/conv hook of every layer whose forward activation rule is a
`four_bit.SawbActivation` (the PACT-grid stand-in of `ultra_low()`) for a hook
that owns a trainable α and quantizes the activation itself, before the dot:

| input of the layer      | quantizer                                                 |
|-------------------------|-----------------------------------------------------------|
| non-negative (ReLU out) | `four_bit.pact(x, alpha=α)`: grid {0, α/15, …, α}, PACT's gradients (∂/∂α = 1[x ≥ α]) |
| has negative values     | the layer's SAWB rule (signed INT4 grid), α unused        |

The dot then gets the quantized activation as its (float-carried, exactly
on-grid) lhs with `fwd.lhs=None`; the weight and both backward GEMMs keep the
layer's rules (the dW GEMM reuses the on-grid activation as its residual).

α = `pact_alpha` (an `nnx.Param`, trained by the optimizer like any weight,
initialised to 0) + `pact_offset` (a `PactClip` variable set once, at the
layer's first call, to the SAWB clip of that batch): the clip starts where
the stateless recipe would put it and then follows PACT's gradient. PACT's
L2 penalty on α is not added (the paper's value for Sun et al. is unknown).

References:
  Choi et al., "PACT: Parameterized Clipping Activation for Quantized Neural
  Networks", arXiv:1805.06085, Eq. 1–3.
  Sun et al., "Ultra-Low Precision 4-bit Training of Deep Neural Networks",
  NeurIPS 2020 (forward INT4 with PACT activations: papers-1-4.md §2a, [U]).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from qtrain import config as cfgs
from qtrain import four_bit
from qtrain import nnx_hooks
from qtrain import scaling
from qtrain.quantize import fake_quant

__all__ = ['PactClip', 'PactDot', 'PactConv', 'install_pact', 'pact_alphas']


class PactClip(nnx.Variable):
  """Non-trainable PACT bookkeeping: the clip's initial offset and an 'initialised' flag."""


def _is_pact_rule(rule) -> bool:
  return isinstance(rule, cfgs.TensorConfig) and isinstance(rule.calibration,
                                                            four_bit.SawbActivation)


class _LearnedPact:
  """Mixin: quantize the hook's lhs (activation) with PACT's learned clip, then the dot."""

  def __init__(self, config: cfgs.DotConfig, *, rngs: nnx.Rngs, name: str = '',
               original: Any = None):
    if not _is_pact_rule(config.fwd.lhs):
      raise ValueError(f'{type(self).__name__} needs a forward lhs rule with a '
                       f'four_bit.SawbActivation calibration, got {config.fwd.lhs!r}.')
    self.activation_rule = config.fwd.lhs
    # The dot multiplies the already-quantized activation as it is.
    inner = dataclasses.replace(config, fwd=cfgs.MatmulConfig(lhs=None, rhs=config.fwd.rhs))
    super().__init__(inner, rngs=rngs, name=name, original=original)
    self.pact_alpha = nnx.Param(jnp.zeros((), jnp.float32))
    self.pact_offset = PactClip(jnp.zeros((), jnp.float32))
    self.pact_ready = PactClip(jnp.zeros((), jnp.float32))

  def full_config(self) -> cfgs.DotConfig:
    """The layer's config as installed (with its activation rule)."""
    return dataclasses.replace(self.config, fwd=cfgs.MatmulConfig(
        lhs=self.activation_rule, rhs=self.config.fwd.rhs))

  def alpha(self) -> jax.Array:
    """The current clip α = pact_alpha + pact_offset (float32 scalar)."""
    return self.pact_alpha[...] + self.pact_offset[...]

  def _activation(self, x: jax.Array) -> jax.Array:
    rule = self.activation_rule
    bits = rule.format.bits
    x32 = x.astype(jnp.float32)
    # The SAWB clip of this batch: with unsigned_top=u the unsigned scale is
    # u·clip/(2^b − 1) (four_bit.SawbActivation).
    scale, _ = rule.calibration.compute(jax.lax.stop_gradient(x32), rule.format,
                                        scaling.PerTensor())
    clip = jnp.reshape(scale, ()) * rule.format.qmax / rule.calibration.unsigned_top
    ready = self.pact_ready[...] > 0
    offset = jnp.where(ready, self.pact_offset[...], clip)
    self.pact_offset[...] = offset
    self.pact_ready[...] = jnp.ones((), jnp.float32)
    alpha = self.pact_alpha[...] + offset
    # α must stay positive; below that PACT's grid is empty.
    alpha = jnp.maximum(alpha, jnp.finfo(jnp.float32).tiny)
    positive = four_bit.pact(x32, bits=bits, alpha=alpha)
    signed = fake_quant(x32, rule)
    return jnp.where(jnp.min(x32) >= 0, positive, signed).astype(x.dtype)

  def __call__(self, lhs, rhs, *args, **kwargs):
    return super().__call__(self._activation(lhs), rhs, *args, **kwargs)


class PactConv(_LearnedPact, nnx_hooks.QuantizedConvGeneralDilated):
  """`QuantizedConvGeneralDilated` whose activation is PACT-quantized with a learned clip."""


class PactDot(_LearnedPact, nnx_hooks.QuantizedDotGeneral):
  """`QuantizedDotGeneral` whose activation is PACT-quantized with a learned clip."""


_UPGRADE = ((nnx.Conv, 'conv_general_dilated', nnx_hooks.QuantizedConvGeneralDilated, PactConv),
            (nnx.Linear, 'dot_general', nnx_hooks.QuantizedDotGeneral, PactDot))


def install_pact(model: nnx.Module) -> nnx.Module:
  """Gives every PACT-grid activation rule of `model` a learned clip (in place).

  Call after `qtrain.quantize_model` (the `prepare_model` of `ultra_low()`
  does); build the `nnx.Optimizer` afterwards so that it trains the new
  `pact_alpha` Params. Layers whose forward activation rule is not a
  `four_bit.SawbActivation` (FP8 1×1 convs, float layers) are left alone.
  Idempotent.

  Args:
    model: an NNX model with qtrain hooks.

  Returns:
    The model.

  Raises:
    TypeError: `model` is not an nnx.Module.

  Examples:
    >>> from flax import nnx
    >>> import qtrain
    >>> from qtrain import pact
    >>> from qtrain.recipes.papers.ultra_low import ultra_low
    >>> model = qtrain.models.LeNet(batch_norm=True, rngs=nnx.Rngs(0))
    >>> model = pact.install_pact(qtrain.quantize_model(model, ultra_low().rules))
    >>> type(model.conv2.conv_general_dilated).__name__, float(model.conv2.conv_general_dilated.pact_alpha[...])
    ('PactConv', 0.0)
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f'model must be an nnx.Module, got {type(model).__name__}.')
  for _, module in nnx.iter_modules(model):
    for layer_type, attr, hook_type, new_type in _UPGRADE:
      hook = getattr(module, attr, None) if isinstance(module, layer_type) else None
      if (isinstance(hook, hook_type) and not isinstance(hook, new_type)
          and _is_pact_rule(hook.config.fwd.lhs)):
        setattr(module, attr, nnx.data(new_type(hook.config, rngs=hook.rngs, name=hook.name,
                                                original=hook.original)))
  return model


def pact_alphas(model: nnx.Module) -> dict[str, float]:
  """{layer path: current α} of the PACT hooks of `model` (for logs and tests)."""
  out = {}
  for path, module in nnx.iter_modules(model):
    if isinstance(module, _LearnedPact):
      out['/'.join(map(str, path[:-1]))] = float(module.alpha())
  return out
