"""Distribution-adaptive INT8 training (Zhao et al., AAAI 2021) as a `Recipe`.

See `da_int8` for what is quantized how, and `qtrain.gvq` for the
magnitude-aware clip and its EMA (per-layer state carried across steps).
"""

from __future__ import annotations

import re

from qtrain import clipping
from qtrain import config as cfgs
from qtrain import gvq
from qtrain import rounding as rnd
from qtrain import scaling
from qtrain.recipe import Recipe
from qtrain.recipes.registry import ReportedDelta, register
from qtrain.rules import QuantRule

__all__ = ['da_int8', 'da_int8_config']

PAPER = ('Zhao et al., "Distribution Adaptive INT8 Quantization for Training CNNs", '
         'AAAI 2021, arXiv:2102.04782')

# The paper's tables were not read; numbers as quoted by secondary sources
# (papers-5-8.md §8.5).
_REPORTED = (
    ReportedDelta(model='ResNet-50', dataset='ImageNet', delta_pp=+0.09,
                  source='Zhao et al. 2021, ImageNet table (76.50 -> 76.59; via secondary '
                         'sources, papers-5-8.md §8.5)'),
    ReportedDelta(model='MobileNetV2', dataset='ImageNet', delta_pp=-0.52,
                  source='Zhao et al. 2021, ImageNet table (via secondary sources, '
                         'papers-5-8.md §8.5)'),
    ReportedDelta(model='MobileNetV2', dataset='CIFAR-10', delta_pp=-0.36,
                  source='Zhao et al. 2021, CIFAR-10 table (via secondary sources, '
                         'papers-5-8.md §8.5)'),
)


def da_int8_config(*, lam: float = gvq.LAMBDA, k: float = gvq.K, a: float = gvq.A,
                   gradient_rounding: rnd.Rounding = 'nearest',
                   ema: bool = True) -> cfgs.DotConfig:
  """The DotConfig of one DA-INT8 layer.

  Forward: X and W on the symmetric INT8 grid [-127, 127], absmax per
  tensor, round-to-nearest. dX GEMM: dY with one absmax scale per tensor.
  dW GEMM: dY with one magnitude-aware clip per output channel (GVQ):
  two differently quantized copies of dY. Both backward GEMMs reuse the
  forward codes.

  Args:
    lam, k: MCS constants (0.3 and 1).
    a: the EMA weight A (0.8); used only with `ema`.
    gradient_rounding: rounding of both dY copies ('nearest', the written
      formula; the paper's mode is unconfirmed).
    ema: True: the paper's EMA clip, per-layer state carried across steps
      (`gvq.MagnitudeAwareClipEMA`; the dot needs `grad_state`, which
      `qtrain.quantize_model`'s NNX hooks hold). False: the stateless
      per-step clip (`gvq.MagnitudeAwareClip`).

  Returns:
    A `DotConfig`.
  """
  rnd.check_rounding(gradient_rounding)
  int8 = clipping.symmetric_int(8)
  fwd = cfgs.TensorConfig(format=int8)
  grad_dx = cfgs.TensorConfig(format=int8, rounding=gradient_rounding)
  # PerChannel(axes=None): inside the dot, the axes of dY not contracted in
  # dW = Xᵀ·dY, i.e. the output channel (features of a dense, C of a conv).
  if not isinstance(ema, bool):
    raise TypeError(f'ema must be a bool, got {ema!r}.')
  clip = gvq.MagnitudeAwareClipEMA(lam=lam, k=k, a=a) if ema else gvq.MagnitudeAwareClip(
      lam=lam, k=k)
  grad_dw = cfgs.TensorConfig(format=int8, rounding=gradient_rounding, calibration=clip,
                              granularity=scaling.PerChannel())
  return cfgs.DotConfig(fwd=cfgs.MatmulConfig(lhs=fwd, rhs=fwd),
                        dlhs=cfgs.MatmulConfig(lhs=grad_dx, rhs=cfgs.REUSE),
                        drhs=cfgs.MatmulConfig(lhs=cfgs.REUSE, rhs=grad_dw))


@register('da_int8', paper=PAPER,
          forward='INT8 symmetric, absmax per tensor, RTN (first conv and FC float)',
          backward='INT8: dX GEMM per-tensor dY; dW GEMM per-output-channel dY (GVQ) with '
                   'the magnitude-aware clip (per-layer EMA state); RTN',
          families=('cnn', 'mobilenet'), reported=_REPORTED)
def da_int8(*, lam: float = gvq.LAMBDA, k: float = gvq.K, a: float = gvq.A,
            gradient_rounding: rnd.Rounding = 'nearest',
            keep_float: str = 'stem|head', ema: bool = True) -> Recipe:
  """Distribution-adaptive INT8 training (DA-INT8): GVQ + magnitude-aware clipping.

  Layers: the module paths matching `keep_float` (the zoo's first conv
  `stem` and classifier `head`) stay float; every other dense and conv
  layer uses `da_int8_config`: INT8 forward per tensor, per-tensor dY for
  the dX GEMM, per-output-channel dY (Gradient Vectorized Quantization) with
  the Magnitude-aware Clipping Strategy for the dW GEMM. No optimizer
  transform.

  Differences from the paper (documented, see `qtrain.gvq`):

  * the EMA per layer and channel, s_t = (1 - kA)·s_{t-1} + A·max|g|
    (A = 0.8) for inverted-T channels, runs in the backward pass with its
    state carried across steps (`ema=True`, the default; the state lives
    in `qtrain.nnx_hooks.GradState` variables and is written back by the
    train step, see `qtrain.nnx_hooks.apply_grad_state`). NNX models only:
    Linen models have no place for the state (use `ema=False`, the
    stateless per-step clip, which with k = 1 is per-channel absmax).
  * which layers stay float is unconfirmed for DA-INT8 (papers-5-8.md §8.3):
    the default follows UI8's standard setting (first conv and classifier),
    which DA-INT8 compares against; BN stays float. Rounding mode and the
    dX path's clip rule are unconfirmed: nearest and absmax.

  Args:
    lam: distribution-test threshold λ (0.3).
    k: MCS constant (1).
    a: EMA weight A (0.8).
    gradient_rounding: 'nearest' or 'stochastic' for both dY copies.
    keep_float: regex (full match on the module path) of the float layers.
    ema: the paper's EMA clip with per-layer state (True) or the stateless
      per-step clip (False).

  Returns:
    Recipe 'da_int8'.

  Raises:
    TypeError / ValueError: bad options (naming them).

  Examples:
    >>> from qtrain.recipes.papers.da_int8 import da_int8
    >>> r = da_int8()
    >>> r.rules[1].config.drhs.rhs.granularity
    PerChannel(axes=None)

  References:
    Zhao et al., AAAI 2021, arXiv:2102.04782 (§8 of papers-5-8.md).
  """
  if not isinstance(keep_float, str):
    raise TypeError(f'keep_float must be a regex string, got {keep_float!r}.')
  try:
    re.compile(keep_float)
  except re.error as e:
    raise ValueError(f'keep_float={keep_float!r} is not a valid regex: {e}.') from e
  config = da_int8_config(lam=lam, k=k, a=a, gradient_rounding=gradient_rounding, ema=ema)
  rules = (QuantRule(module_path=keep_float, config=None),
           QuantRule(module_path='.*', config=config))
  return Recipe(name='da_int8', rules=rules,
                description=f'{PAPER}: INT8 fwd, per-tensor dY for dX, GVQ dY for dW')
