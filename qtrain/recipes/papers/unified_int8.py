"""Unified INT8 training (Zhu et al., CVPR 2020) as a `Recipe`.

See `unified_int8` for what is quantized how, and `qtrain.clipping` for the
clipping (DSGC) and learning-rate scaling (DCLRS) parts.
"""

from __future__ import annotations

import numbers
import re

import jax.numpy as jnp
from flax import nnx

from qtrain import clipping
from qtrain import config as cfgs
from qtrain import nnx_hooks
from qtrain import optim
from qtrain import rounding as rnd
from qtrain.recipe import Recipe
from qtrain.recipes.registry import ReportedDelta, register
from qtrain.rules import QuantRule

__all__ = ['unified_int8', 'unified_int8_config', 'layer_deviations', 'deviation_update_args']

PAPER = ('Zhu et al., "Towards Unified INT8 Training for Convolutional Neural Network", '
         'CVPR 2020, arXiv:1912.12607')

# The paper's tables were not read; these are its MobileNetV2 drops as quoted
# by secondary sources (papers-1-4.md §4e).
_REPORTED = (
    ReportedDelta(model='MobileNetV2', dataset='ImageNet', delta_pp=-1.19,
                  source='Zhu et al. 2020, ImageNet classification table (via secondary '
                         'sources, papers-1-4.md §4e)'),
    ReportedDelta(model='MobileNetV2', dataset='CIFAR-10', delta_pp=-1.01,
                  source='Zhu et al. 2020, CIFAR-10 table (via secondary sources, '
                         'papers-1-4.md §4e)'),
)


def unified_int8_config(*, gradient_rounding: rnd.Rounding = 'stochastic',
                        num_candidates: int = clipping.NUM_CANDIDATES,
                        min_ratio: float = clipping.MIN_RATIO,
                        period: int | None = None) -> cfgs.DotConfig:
  """The DotConfig of one UI8 layer.

  Forward: X and W on the symmetric INT8 grid [-127, 127], absmax per
  tensor, round-to-nearest. Backward: dY quantized once per layer and step
  onto the same grid with the cosine-optimal clip (`clipping.CosineClip`,
  per tensor) and `gradient_rounding`; that one sample feeds both the dX and
  the dW GEMM, whose other operands are the forward codes.

  Args:
    gradient_rounding: 'stochastic' (UI8, [S]) or 'nearest'.
    num_candidates, min_ratio: the clip search grid (`clipping.candidate_ratios`).
    period: None = search every step (`clipping.CosineClip`, stateless);
      an int = UI8's periodic search, the clip kept as per-layer state
      between searches (`clipping.PeriodicCosineClip`; the dot then needs
      `grad_state`, which NNX hooks hold).

  Returns:
    A `DotConfig`.
  """
  rnd.check_rounding(gradient_rounding)
  int8 = clipping.symmetric_int(8)
  fwd = cfgs.TensorConfig(format=int8)
  if period is None:
    calibration = clipping.CosineClip(num_candidates=num_candidates, min_ratio=min_ratio)
  else:
    calibration = clipping.PeriodicCosineClip(period=period, num_candidates=num_candidates,
                                              min_ratio=min_ratio)
  grad = cfgs.TensorConfig(format=int8, rounding=gradient_rounding, calibration=calibration)
  return cfgs.DotConfig(fwd=cfgs.MatmulConfig(lhs=fwd, rhs=fwd),
                        dlhs=cfgs.MatmulConfig(lhs=grad, rhs=cfgs.REUSE),
                        drhs=cfgs.MatmulConfig(lhs=cfgs.REUSE, rhs=grad),
                        share_gradient_sample=True)


def layer_deviations(model) -> dict[str, jnp.ndarray]:
  """Each quantized layer's current DSGC deviation d, read from its gradient state.

  Args:
    model: an NNX model whose hooks use `clipping.PeriodicCosineClip` dY
      rules (the default `unified_int8()`), after at least one backward pass
      has written their state (`qtrain.nnx_hooks.apply_grad_state`).

  Returns:
    {'/'-joined module path of the layer (the hook's parent): d}, d a float32
    scalar (the mean over the rule's scale groups; one group per tensor in
    UI8). The dX slot's state is read when both backward GEMMs have one.
    Layers whose state does not exist yet or holds no 'deviation' are left
    out (their updates are not scaled). Works inside `nnx.jit`.
  """
  out = {}
  for path, hook in nnx.iter_modules(model):
    if not isinstance(hook, nnx_hooks.HOOK_TYPES):
      continue
    state = hook.grad_state_value()
    if not state:
      continue
    slot = state.get('dlhs', state.get('drhs'))
    if not isinstance(slot, dict) or 'deviation' not in slot:
      continue
    out['/'.join(map(str, path[:-1]))] = jnp.mean(slot['deviation'])
  return out


def deviation_update_args(model) -> dict:
  """`Recipe.update_args` of UI8: {'deviation': layer_deviations(model)}."""
  return {'deviation': layer_deviations(model)}


@register('unified_int8', paper=PAPER,
          forward='INT8 symmetric, absmax per tensor, RTN (first conv and FC float)',
          backward='INT8 symmetric per tensor, cosine-distance clip (DSGC) searched every '
                   '100 steps, SR; one sample for dX and dW; each layer\'s LR scaled by '
                   'max(exp(-20 d), 0.1) with its DSGC deviation d',
          families=('cnn', 'mobilenet'), reported=_REPORTED)
def unified_int8(*, gradient_rounding: rnd.Rounding = 'stochastic',
                 num_candidates: int = clipping.NUM_CANDIDATES,
                 min_ratio: float = clipping.MIN_RATIO, lr_scaling: bool = True,
                 alpha: float = clipping.ALPHA, beta: float = clipping.BETA,
                 keep_float: str = 'stem|head', conv_only: bool = True,
                 period: int | None = clipping.PERIOD) -> Recipe:
  r"""Unified INT8 training (UI8): INT8 forward and backward with DSGC and DCLRS.

  Layers: the module paths matching `keep_float` (the zoo's first conv
  `stem` and classifier `head`) stay float, as in the paper's standard
  setting; with `conv_only` the other dense layers stay float too (the paper
  quantizes convolutions); every other convolution uses
  `unified_int8_config`: INT8 forward (absmax per tensor, RTN), INT8
  gradients clipped by Direction Sensitive Gradient Clipping (the clip that
  minimises the cosine distance between float and quantized dY) with
  stochastic rounding, one gradient sample for both backward GEMMs.

  Optimizer: with `lr_scaling`, Deviation Counteractive LR Scaling chained
  after the optimizer: each quantized layer's update is multiplied by
  φ(d) = max(exp(-α·d), β), d = that layer's DSGC cosine deviation of dY
  kept in its gradient state (`clipping.scale_by_deviation(by_path=True)`
  fed by `layer_deviations` through `Recipe.update_args`; the training loop
  passes it). Float layers are not scaled.

  Differences from the paper (documented, see `qtrain.clipping`):

  * the clip is searched every `period` steps (default `clipping.PERIOD` =
    100; the paper's period is unconfirmed) and kept in between as per-layer
    state (NNX models; the loop threads it). `period=None` searches from
    each step's gradient instead (stateless: needed for Linen models).
  * d is the deviation measured at the layer's last backward pass: at a
    search step the searched clip's distance, in between the kept clip's
    distance on the current dY (`clipping.cosine_clip_update`). Which of the
    two the paper feeds DCLRS between searches is unconfirmed.
  * with `period=None` (stateless search) d cannot leave the backward pass;
    the recipe then falls back to a proxy, `optim.scale_by_quantization_error`
    (d measured by quantizing each parameter's *update* with the same INT8
    cosine-clip rule): weight gradients are much less sharp than dY, so φ
    stays near 1 where the paper's would drop.
  * search grid, rounding inside the search, BN and forward clipping are
    unconfirmed (papers-1-4.md §4): absmax forward, BN float.

  Args:
    gradient_rounding: rounding of dY, 'stochastic' (UI8) or 'nearest'.
    num_candidates: clip candidates per search (>= 1).
    min_ratio: smallest candidate as a fraction of max|dY|, in (0, 1].
    lr_scaling: chain DCLRS after the optimizer (per-layer d; the update
      proxy when `period` is None).
    alpha, beta: φ's decay and floor (UI8: 20 and 0.1).
    keep_float: regex (full match on the module path) of the layers kept
      float: the first conv and the classifier.
    conv_only: quantize only convolutions (the paper); False also quantizes
      the other dense layers.
    period: UI8's periodic search every `period` steps (default 100) with
      the clip kept in between as per-layer state
      (`clipping.PeriodicCosineClip`; NNX models); None = search every step
      (stateless, `clipping.CosineClip`; works with Linen too).

  Returns:
    Recipe 'unified_int8'.

  Raises:
    TypeError / ValueError: bad options (naming them).

  Examples:
    >>> from qtrain.recipes.papers.unified_int8 import unified_int8
    >>> r = unified_int8()
    >>> [rule.module_path for rule in r.rules]
    ['stem|head', '.*', '.*']

  References:
    Zhu et al., CVPR 2020, arXiv:1912.12607 (§4 of papers-1-4.md).
  """
  for name, value in (('lr_scaling', lr_scaling), ('conv_only', conv_only)):
    if not isinstance(value, bool):
      raise TypeError(f'{name} must be a bool, got {value!r}.')
  if not isinstance(keep_float, str):
    raise TypeError(f'keep_float must be a regex string, got {keep_float!r}.')
  try:
    re.compile(keep_float)
  except re.error as e:
    raise ValueError(f'keep_float={keep_float!r} is not a valid regex: {e}.') from e
  for name, value in (('alpha', alpha), ('beta', beta)):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      raise TypeError(f'{name} must be a real number, got {value!r}.')
  config = unified_int8_config(gradient_rounding=gradient_rounding,
                               num_candidates=num_candidates, min_ratio=min_ratio,
                               period=period)
  rules = [QuantRule(module_path=keep_float, config=None)]
  if conv_only:
    rules += [QuantRule(module_path='.*', config=config, op_kinds=('conv',)),
              QuantRule(module_path='.*', config=None)]
  else:
    rules += [QuantRule(module_path='.*', config=config)]
  transforms = ()
  update_args = None
  if lr_scaling and period is not None:
    transforms = (clipping.scale_by_deviation(alpha=alpha, beta=beta, by_path=True),)
    update_args = deviation_update_args
  elif lr_scaling:
    # Stateless search: d stays inside the backward pass; measure it on updates.
    probe = cfgs.TensorConfig(format=clipping.symmetric_int(8),
                              calibration=clipping.CosineClip(num_candidates=num_candidates,
                                                              min_ratio=min_ratio))
    transforms = (optim.scale_by_quantization_error(probe, alpha=alpha, beta=beta),)
  search = 'per step' if period is None else f'every {period} steps'
  dclrs = ('per-layer d' if period is not None else 'update proxy') if lr_scaling else 'off'
  return Recipe(name='unified_int8', rules=tuple(rules), optimizer_transforms=transforms,
                update_args=update_args,
                description=f'{PAPER}: INT8 fwd/bwd, DSGC {search}, DCLRS ({dclrs})')
