"""`wageubn()`: WAGEUBN's full 8-bit integer training (Yang et al. 2020) as a `Recipe`.

What goes where (papers-1-4.md §3, official code `yang-yk/wageubn`):

| paper quantity        | here                                                           |
|-----------------------|----------------------------------------------------------------|
| W: C(Q(W, 8), 8)      | rules `fwd.rhs`: fixed8.7 (saturating); all but first/last     |
| A: Q(A, 8), unclipped | rules `fwd.lhs`: 7 fraction bits in a 16-bit container         |
| E2 on layer outputs   | `prepare_model`: `error_identity(flag=True)` on the output; the |
|                       | dY slots carry the E2 values as exact int16 codes (shared)     |
| E1 on layer inputs    | `prepare_model`: `error_identity(flag=False)` on the input     |
| BN (16/16/8/8/8 bits) | `prepare_model`: `qtrain.batchnorm.swap_batch_norm`            |
| weight decay 1e-4     | `gradient_transforms[0]`, in the gradient, BN γ/β excluded     |
| G (8-bit, SR, K=128)  | `gradient_transforms[1]`: `quantize_gradients` (γ/β: Q(g, 15)) |
| SGD, momentum 0.25    | `optimizer(lr)`: `wageubn_sgd` (10-bit LR, 13-bit momentum)    |
| U: weights Q(w, 24)   | `optimizer_transforms[0]`: `fixed_point_params`                |
| first conv, last FC   | float: rule config=None, float gradients/momentum/weights      |

Usage (NNX): the recipe's rules cannot replace BatchNorm layers nor wrap a
layer's input and output; the recipe's `prepare_model` does that, and
`quantize_model(model, recipe)` calls it after installing the rules:

    model = qtrain.models.LeNet(batch_norm=True, rngs=nnx.Rngs(0))
    recipe = qtrain.recipes.wageubn()
    qtrain.quantize_model(model, recipe)          # rules, then BN swap + E1/E2
    tx = recipe.wrap_optimizer(recipe.optimizer(recipe.default_lr))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

Quantizing with bare rules (`quantize_model(model, recipe.rules)`) skips
it: call `prepare_model(model)` yourself then (it is idempotent). Linen models use
`qtrain.batchnorm.LinenQuantizedBatchNorm` and `qtrain.wageubn.error_identity`
in their definition instead.

References:
  Yang, Deng, Wu, Yan, Xie, Li, "Training High-Performance and Large-Scale
  Deep Neural Networks with Full 8-bit Integers", Neural Networks 125:70-82,
  2020, arXiv:1909.02384.
"""

from __future__ import annotations

import functools
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from qtrain import batchnorm
from qtrain import config as cfgs
from qtrain import formats as fmts
from qtrain import nnx_hooks
from qtrain import optim
from qtrain import scaling
from qtrain import wageubn as wq
from qtrain.recipe import Recipe
from qtrain.recipes.registry import register
from qtrain.rules import QuantRule

__all__ = ['wageubn', 'prepare_model', 'param_labels', 'quantize_gradients', 'wageubn_sgd',
           'fixed_point_params', 'ErrorQuantizedConv', 'ErrorQuantizedDot', 'FLOAT_LAYERS']

# The model zoo names its first conv 'stem' and its classifier 'head'.
FLOAT_LAYERS = 'stem|head'

# E2 values are s·k/2^(b-1) with |k| <= (2^(b-1) - 1)·2^(b-1) (16256 for b=8):
# exact int16 codes under a power-of-two absmax scale (see `wageubn`).
_E2_CARRIER = cfgs.TensorConfig(format=fmts.IntFormat(bits=16, narrow=True),
                                calibration=scaling.AbsMax(power_of_two=True))


# ----------------------------------------------------------------- parameter groups


def _names(path) -> list[str]:
  out = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      out.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      out.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      out.append(str(k.idx))
    else:
      out.append(str(getattr(k, 'key', k)))
  if out and out[-1] == 'value':  # an nnx.Variable's value
    out = out[:-1]
  if out and out[0] == 'params':  # a Linen variables dict
    out = out[1:]
  return out


def param_labels(tree: Any, float_layers: str = FLOAT_LAYERS) -> Any:
  """Labels every leaf 'float', 'bn' or 'quant' (WAGEUBN's three parameter groups).

  A leaf's module path is its '/'-joined tree path without the leaf name
  (and without an NNX Variable's 'value' or Linen's leading 'params').
  'float': module path fullmatches `float_layers` (the first conv and the
  classifier). 'bn': a module holding a leaf named 'scale' (BatchNorm γ/β).
  'quant': everything else.

  Args:
    tree: params, gradients or updates (same structure).
    float_layers: regex of the float layers' module paths.

  Returns:
    A tree of the same structure with string leaves.
  """
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  names = [_names(p) for p, _ in flat]
  norm_modules = {'/'.join(n[:-1]) for n in names if n and n[-1] == 'scale'}

  def label(path, _):
    n = _names(path)
    module = '/'.join(n[:-1])
    if re.fullmatch(float_layers, module):
      return 'float'
    return 'bn' if module in norm_modules else 'quant'

  return jax.tree_util.tree_map_with_path(label, tree)


# ----------------------------------------------------------------- optax transforms


class QuantizeGradientsState(NamedTuple):
  """State of `quantize_gradients`: a typed PRNG key, split once per update."""
  key: jax.Array


def quantize_gradients(*, bits: int = 8, scale: int = 128, bn_bits: int = 15,
                       float_layers: str = FLOAT_LAYERS,
                       seed: int = 0) -> optax.GradientTransformation:
  """WAGEUBN's gradient quantization, per parameter group (before the optimizer).

  'quant' leaves: `wageubn_grad` (G: direction only, K = `scale`, SR) with
  leaf i's key `fold_in(step_key, i)`; 'bn' leaves: Q(g, bn_bits); 'float'
  leaves unchanged (`param_labels`). Non-float leaves pass through.

  Args:
    bits: G's width (denominator 128·2^(bits-1)).
    scale: K (the official `g_scale`; 128 for the first 60 of 100 epochs).
    bn_bits: width of the BN γ/β gradients (15).
    float_layers: regex of the float layers.
    seed: seed of the state's PRNG key.

  Returns:
    An `optax.GradientTransformation`.
  """
  wq.check_grad_options(bits, scale)
  wq._check_bits(bn_bits, 2, 32, 'bn_bits')  # pylint: disable=protected-access
  optim._check_seed(seed)  # pylint: disable=protected-access

  def init_fn(params):
    del params
    return QuantizeGradientsState(key=jax.random.key(seed))

  def update_fn(updates, state, params=None):
    del params
    key, step_key = jax.random.split(state.key)
    labels = param_labels(updates, float_layers)
    leaves, treedef = jax.tree.flatten(updates)
    out = []
    for i, (g, lab) in enumerate(zip(leaves, treedef.flatten_up_to(labels))):
      if not jnp.issubdtype(jnp.result_type(g), jnp.floating) or lab == 'float':
        out.append(g)
      elif lab == 'bn':
        out.append(wq.wageubn_direct(g, bits=bn_bits))
      else:
        out.append(wq.wageubn_grad(g, jax.random.fold_in(step_key, i), bits=bits, scale=scale))
    return jax.tree.unflatten(treedef, out), QuantizeGradientsState(key=key)

  return optax.GradientTransformation(init_fn, update_fn)


def fixed_point_params(*, bits: int = 24,
                       float_layers: str = FLOAT_LAYERS) -> optax.GradientTransformation:
  """Updates u' = Q(p + u, bits) - p for non-float leaves: stored weights stay on 2^(1-bits).

  WAGEUBN's U: w <- Q(w, 24), round-to-nearest and *unclipped* (BN γ may
  exceed 1), applied after the update (pitfall 7). `optim.stochastic_round_params`
  with `fixed_point(24)` would clip to (-1, 1). Float-group leaves pass
  unchanged. `p + u'` equals Q(p + u) exactly when p is on the grid and the
  difference is representable (always for float32 weights of magnitude above
  the update); from off-grid float initial weights the first step can be off
  by one float32 ulp.

  Args:
    bits: 2..24 (float32 holds the grid exactly).
    float_layers: regex of the float layers.

  Returns:
    An `optax.GradientTransformation` (stateless; needs params).
  """
  wq._check_bits(bits, 2, 24)  # pylint: disable=protected-access (float32 holds 24 bits)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(optim.NO_PARAMS_MSG)
    labels = param_labels(updates, float_layers)

    def one(u, p, lab):
      if lab == 'float' or not jnp.issubdtype(jnp.result_type(u), jnp.floating):
        return u
      return (wq.wageubn_direct(p + u, bits=bits) - p).astype(jnp.result_type(p))

    return jax.tree.map(one, updates, params, labels), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def wageubn_sgd(learning_rate, *, momentum: float = 0.25, lr_bits: int = 10,
                momentum_bits: int = 13,
                float_layers: str = FLOAT_LAYERS) -> optax.GradientTransformation:
  """WAGEUBN's base optimizer: SGD with momentum 0.25, 10-bit LR, 13-bit momentum.

  a <- m·a + g; w <- w - lr_q·a; the *stored* a of non-float leaves is Q(a,
  momentum_bits) (`optim.quantize_state`; a fixed point with momentum_bits-1
  fraction bits in a 24-bit container, i.e. unclipped below ±2^(25-bits)).
  lr_q = C(Q(lr, lr_bits), lr_bits) (`wageubn_lr`): 0.05 -> 26/512.

  Args:
    learning_rate: a float or an optax schedule (quantized per step).
    momentum: m (0.25 in the paper).
    lr_bits: LR width (10).
    momentum_bits: momentum width (13), 2..24.
    float_layers: regex of the float layers (float momentum).

  Returns:
    An `optax.GradientTransformation`.

  Raises:
    ValueError: a float learning rate that quantizes to 0 (below 2^-lr_bits).
  """
  if isinstance(momentum_bits, bool) or not isinstance(momentum_bits, int) or not (
      2 <= momentum_bits <= 24):
    raise ValueError(f'momentum_bits={momentum_bits!r} must be an int in 2..24.')
  if callable(learning_rate):
    lr = lambda count: wq.wageubn_lr(jnp.asarray(learning_rate(count), jnp.float32),
                                     bits=lr_bits)
  else:
    lr = float(wq.wageubn_lr(jnp.float32(learning_rate), bits=lr_bits))
    if lr == 0:
      raise ValueError(f'learning_rate={learning_rate!r} quantizes to 0 with lr_bits='
                       f'{lr_bits} (the grid step is 2^-{lr_bits - 1}).')
  q_momentum = optim.quantize_state(
      optax.trace(decay=momentum),
      fmts.FixedPointFormat(bits=24, fractional_bits=momentum_bits - 1))
  labels = functools.partial(param_labels, float_layers=float_layers)
  return optax.chain(
      optax.partition({'float': optax.trace(decay=momentum), 'bn': q_momentum,
                       'quant': q_momentum}, labels),
      optax.scale_by_learning_rate(lr))


# ----------------------------------------------------------------- E1/E2 hooks


class _ErrorQuantized:
  """Mixin: WAGEUBN's E1 on a hook's input error and E2 on its output error."""

  def __init__(self, config: cfgs.DotConfig, *, rngs: nnx.Rngs, name: str = '',
               original: Any = None, e1_bits: int = 8, e2_bits: int = 8):
    super().__init__(config, rngs=rngs, name=name, original=original)
    self.e1_bits, self.e2_bits = e1_bits, e2_bits

  def __call__(self, lhs, rhs, *args, **kwargs):
    lhs = wq.error_identity(lhs, bits=self.e1_bits, flag=False)
    return wq.error_identity(super().__call__(lhs, rhs, *args, **kwargs), bits=self.e2_bits)


class ErrorQuantizedConv(_ErrorQuantized, nnx_hooks.QuantizedConvGeneralDilated):
  """`QuantizedConvGeneralDilated` plus WAGEUBN's E1 on the input and E2 on the output.

  Backward: the error reaching the layer input (dX) is E1-quantized (the
  official `fe1`, after `fa`); the error at the output (dY) is E2-quantized
  before both backward GEMMs (`fe2`). Forward unchanged.

  Args:
    config, rngs, name, original: as the base hook.
    e1_bits, e2_bits: widths of E1 and E2 (8).
  """


class ErrorQuantizedDot(_ErrorQuantized, nnx_hooks.QuantizedDotGeneral):
  """`QuantizedDotGeneral` plus E1 on the input and E2 on the output (see ErrorQuantizedConv)."""


_UPGRADE = ((nnx.Conv, 'conv_general_dilated', nnx_hooks.QuantizedConvGeneralDilated,
             ErrorQuantizedConv),
            (nnx.Linear, 'dot_general', nnx_hooks.QuantizedDotGeneral, ErrorQuantizedDot))


def prepare_model(model: nnx.Module, *, e1_bits: int = 8, e2_bits: int = 8,
                  batch_norm: bool = True, **bn_options) -> nnx.Module:
  """The NNX half of WAGEUBN that rules cannot express; call after `quantize_model`.

  1. Every `nnx.BatchNorm` becomes `qtrain.batchnorm.QuantizedBatchNorm`
     (same Variables, ε = 2^-15 on the std) unless `batch_norm=False`.
  2. Every quantized `nnx.Conv`/`nnx.Linear` hook (installed by
     `quantize_model`) is wrapped with E1 on its input error and E2 on its
     output error (`ErrorQuantizedConv`/`ErrorQuantizedDot`); float layers
     (first conv, classifier) are left alone.

  Idempotent. Call it before building the `nnx.Optimizer`.

  Args:
    model: an NNX model already passed through `quantize_model(model, wageubn())`.
    e1_bits, e2_bits: widths of E1 and E2 (8).
    batch_norm: swap the BatchNorm layers.
    **bn_options: passed to `swap_batch_norm` (epsilon, mean_bits, ...).

  Returns:
    The model (mutated in place).

  Raises:
    TypeError: `model` is not an nnx.Module.
    ValueError: bad widths.

  Examples:
    >>> from flax import nnx
    >>> import qtrain
    >>> from qtrain.recipes.papers.wageubn import prepare_model, wageubn
    >>> model = qtrain.models.LeNet(batch_norm=True, rngs=nnx.Rngs(0))
    >>> model = prepare_model(qtrain.quantize_model(model, wageubn()))
    >>> type(model.conv2.conv_general_dilated).__name__, type(model.stem_bn).__name__
    ('ErrorQuantizedConv', 'QuantizedBatchNorm')
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f'model must be an nnx.Module, got {type(model).__name__}.')
  for name, b in (('e1_bits', e1_bits), ('e2_bits', e2_bits)):
    wq._check_bits(b, 2, 16, name)  # pylint: disable=protected-access
  if batch_norm:
    batchnorm.swap_batch_norm(model, **bn_options)
  for _, module in nnx.iter_modules(model):
    for layer_type, attr, hook_type, new_type in _UPGRADE:
      hook = getattr(module, attr, None) if isinstance(module, layer_type) else None
      if isinstance(hook, hook_type) and (
          not isinstance(hook, new_type) or (hook.e1_bits, hook.e2_bits) != (e1_bits, e2_bits)):
        setattr(module, attr, nnx.data(new_type(hook.config, rngs=hook.rngs, name=hook.name,
                                                original=hook.original, e1_bits=e1_bits,
                                                e2_bits=e2_bits)))
  return model


# ----------------------------------------------------------------- the recipe


@register('wageubn', paper='Yang et al., "Training High-Performance and Large-Scale DNNs with '
          'Full 8-bit Integers" (WAGEUBN), Neural Networks 2020',
          forward='8-bit fixed point W, A, BN (no scales)',
          backward='E1/E2 8-bit shift (+flag), G 8-bit constant scaling + SR',
          families=('cnn',), reported=())
def wageubn(*, weight_bits: int = 8, activation_bits: int = 8, grad_bits: int = 8,
            grad_scale: int = 128, bn_grad_bits: int = 15, momentum: float = 0.25,
            momentum_bits: int = 13, update_bits: int = 24, lr_bits: int = 10,
            weight_decay: float = 1e-4, float_layers: str = FLOAT_LAYERS,
            seed: int = 0) -> Recipe:
  """WAGEUBN (Yang et al. 2020): W, A, G, E, U, BN and momentum all in 8-bit-ish integers.

  Rules: `float_layers` (first conv and classifier) float; every other
  dense/conv layer runs its forward GEMM on fixed-point A (7 fraction bits,
  unclipped: a 16-bit container) × W (C(Q(W, 8), 8)), and its backward GEMMs
  on the E2-quantized error (carried as int16 codes; one sample shared by
  both GEMMs) with the forward codes reused. E1, E2 and the quantized BN
  come from `prepare_model(model)`, which `quantize_model(model, recipe)`
  runs after the rules (see the module doc); with bare rules and without
  it the dY slots are a 16-bit quantizer, not E2.

  Optimizer side: weight decay and G before the base optimizer, the base
  optimizer `recipe.optimizer(lr)` (SGD momentum 0.25, 10-bit LR, 13-bit
  momentum), 24-bit weight storage after it. Train with
  `recipe.wrap_optimizer(recipe.optimizer(lr))`; the paper uses lr 0.05 at
  batch 64 on ImageNet (`recipe.default_lr`). Because G drops the gradient's magnitude, the step is
  about lr·K/16384 per weight regardless of the loss scale.

  Args:
    weight_bits: W width (8).
    activation_bits: A fraction bits + 1 (8).
    grad_bits: G width (8).
    grad_scale: G's K (128; the paper decays it with the LR: 128, 128, 32, 8, 2).
    bn_grad_bits: width of BN γ/β gradients (15).
    momentum: SGD momentum (0.25).
    momentum_bits: stored momentum width (13).
    update_bits: stored weight width (24).
    lr_bits: LR width (10).
    weight_decay: L2 coefficient added to the gradients of all but BN γ/β (1e-4).
    float_layers: regex (fullmatch) of the float layers' module paths.
    seed: seed of G's stochastic rounding.

  Returns:
    Recipe 'wageubn'.

  Raises:
    TypeError / ValueError: bad widths or options (named).

  Examples:
    >>> from qtrain.recipes.papers.wageubn import wageubn
    >>> r = wageubn()
    >>> r.rules[0].module_path, r.rules[0].config
    ('stem|head', None)
  """
  for name, b, hi in (('weight_bits', weight_bits, 16), ('activation_bits', activation_bits, 16),
                      ('lr_bits', lr_bits, 24)):
    wq._check_bits(b, 2, hi, name)  # pylint: disable=protected-access
  if not isinstance(float_layers, str):
    raise TypeError(f'float_layers must be a regex string, got {float_layers!r}.')
  if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or (
      weight_decay < 0):
    raise ValueError(f'weight_decay={weight_decay!r} must be a number >= 0.')
  if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not (
      0 <= momentum < 1):
    raise ValueError(f'momentum={momentum!r} must be in [0, 1).')
  activation = cfgs.TensorConfig(
      format=fmts.FixedPointFormat(bits=16, fractional_bits=activation_bits - 1))
  weight = cfgs.TensorConfig(format=fmts.fixed_point(weight_bits))
  config = cfgs.DotConfig(fwd=cfgs.MatmulConfig(lhs=activation, rhs=weight),
                          dlhs=cfgs.MatmulConfig(lhs=_E2_CARRIER, rhs=cfgs.REUSE),
                          drhs=cfgs.MatmulConfig(lhs=cfgs.REUSE, rhs=_E2_CARRIER),
                          share_gradient_sample=True)
  rules = (QuantRule(module_path=float_layers, config=None),
           QuantRule(module_path='.*', config=config))
  grads = []
  if weight_decay:
    labels = functools.partial(param_labels, float_layers=float_layers)
    mask = lambda p: jax.tree.map(lambda lab: lab != 'bn', labels(p))
    grads.append(optax.add_decayed_weights(float(weight_decay), mask=mask))
  grads.append(quantize_gradients(bits=grad_bits, scale=grad_scale, bn_bits=bn_grad_bits,
                                  float_layers=float_layers, seed=seed))
  optimizer = functools.partial(wageubn_sgd, momentum=float(momentum), lr_bits=lr_bits,
                                momentum_bits=momentum_bits, float_layers=float_layers)
  functools.update_wrapper(optimizer, wageubn_sgd)
  return Recipe(name='wageubn', rules=rules, gradient_transforms=tuple(grads),
                optimizer=optimizer, default_lr=0.05, prepare_model=prepare_model,
                optimizer_transforms=(fixed_point_params(bits=update_bits,
                                                         float_layers=float_layers),),
                description='WAGEUBN (Yang et al. 2020): 8-bit fixed-point W/A/BN, E1/E2 '
                            'shift errors, G constant scaling + SR, 13-bit momentum, 24-bit '
                            'weights, 10-bit LR; BN swap and E1/E2 by prepare_model')
