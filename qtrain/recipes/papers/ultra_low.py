"""Ultra-low (Sun et al., NeurIPS 2020): INT4 forward, radix-4 FP4 gradients with TPR.

`ultra_low()` returns the paper's recipe, rules tried in this order:

| layers (default regex, zoo names)             | fwd                  | dX GEMM (dY · Wᵀ)           | dW GEMM (Xᵀ · dY)           |
|-----------------------------------------------|----------------------|-----------------------------|-----------------------------|
| `float_layers` 'stem|head'                    | float                | float                       | float                       |
| 1×1 convs (by kernel shape; setting 'resnet') | X, W: FP8 e4m3       | dY: FP8 e5m2                | dY: FP8 e5m2                |
| depthwise convs (by shape); every layer in setting 'mobilenet' | 4-bit as below | dY: radix-4 FP4, even grid | dY: FP8 e5m2      |
| everything else                               | X: UINT4/INT4, W: INT4 SAWB | dY: radix-4 FP4, even grid (TPR phase 0) | dY: radix-4 FP4, odd grid (TPR phase 1) |

Gradients: radix-4 FP4 [1,3,0] (magnitudes 4^−3..4^3 and zero, round to
nearest at the linear midpoint) times a per-layer power-of-two GradScale
`AbsMax(power_of_two=True)`: max|dY|/s in (Max/2, Max], the fixed point of
Sun et al.'s doubling/halving rule (`qtrain.four_bit.gradscale_update`),
computed from the current gradient. Two-Phase Rounding: the dX GEMM gets the
even grid s·4^k, the dW GEMM the odd grid s·2·4^k of the *same* dY.

The 8-bit exceptions are chosen by the layer's *shape*, whatever its name
(`QuantRule` op kinds 'conv1x1' and 'depthwise_conv', `qtrain.rules`), in
one of the paper's two settings:

* `setting='resnet'` (default): every 1×1 convolution runs fully in FP8, as
  in the paper's deep ResNets (ResNet-50/101 bottlenecks and projection
  shortcuts); depthwise convs (none in a ResNet) take FP8 dW gradients.
* `setting='mobilenet'`: the notes we had say the paper's MobileNet-V2 takes
  FP8 gradients in the dW GEMM (of which layers is unverified): every
  quantized layer gets them; no layer is FP8 in the forward. (In
  MobileNetV2 every non-depthwise conv is 1×1, so the ResNet setting there
  would make the network almost all 8-bit.)

`fp8_layers` / `fp8_update_layers` add regexes on module paths for models
whose exceptions are not expressed by shape (`ZOO_1X1_CONVS` and
`ZOO_DEPTHWISE_CONVS` name the zoo's layers).

References:
  Sun, Wang, Chen, Ni, Agrawal, Cui, Venkataramani, El Maghraoui,
  Srinivasan, Gopalakrishnan, "Ultra-Low Precision 4-bit Training of Deep
  Neural Networks", NeurIPS 2020.
"""

from __future__ import annotations

from qtrain import formats as fmts
from qtrain import four_bit
from qtrain import pact as pact_hooks
from qtrain import scaling
from qtrain.config import REUSE, DotConfig, MatmulConfig, TensorConfig
from qtrain.recipe import Recipe
from qtrain.recipes.registry import ReportedDelta, register
from qtrain.rules import QuantRule

__all__ = ['ultra_low', 'ultra_low_config', 'fp8_config', 'gradient_config',
           'ZOO_1X1_CONVS', 'ZOO_DEPTHWISE_CONVS', 'IBM_SAWB_15_LEVELS']

ZOO_1X1_CONVS = r'(.*/)?(expand|project|last_conv)'
ZOO_DEPTHWISE_CONVS = r'(.*/)?depthwise'
# IBM's SAWB coefficients for a symmetric 15-level (4-bit narrow) grid
# (papers-1-4.md §1a, from IBM's fms-model-optimizer).
IBM_SAWB_15_LEVELS = (12.035, 12.03)

_SOURCE = ('LUQ (ICLR 2023) Table 2 quoting Ultra-low; delta vs LUQ\'s own FP32 baseline, '
           'not Sun et al.\'s')


def gradient_config(phase: int = 0) -> TensorConfig:
  """Radix-4 FP4 gradient rule with the per-layer power-of-two GradScale.

  Args:
    phase: 0 = even grid s·4^k, 1 = odd grid s·2·4^k (Two-Phase Rounding).

  Returns:
    A round-to-nearest TensorConfig (what `numerics.radix4(x, phase=phase)` does).

  Raises:
    ValueError: phase not 0 or 1.
  """
  if phase not in (0, 1):
    raise ValueError(f'phase={phase!r} is unknown; allowed: 0 (even grid), 1 (odd grid).')
  fmt = fmts.LOG4_FP4 if phase == 0 else fmts.LOG4_FP4_ODD
  return TensorConfig(format=fmt, calibration=scaling.AbsMax(power_of_two=True))


def _forward() -> MatmulConfig:
  # Activations: PACT's unsigned grid [0, α]·(1/15) with α = the SAWB clip of
  # the tensor (non-learned stand-in for PACT's learned α; signed tensors get
  # the signed INT4 grid). Weights: SAWB on the symmetric 15-level grid.
  act = four_bit.activation_config(4, unsigned_top=1.0)
  c1, c2 = IBM_SAWB_15_LEVELS
  weight = TensorConfig(format=fmts.IntFormat(bits=4, narrow=True),
                        calibration=scaling.Sawb(c1=c1, c2=c2))
  return MatmulConfig(lhs=act, rhs=weight)


def _fp8_gradient() -> TensorConfig:
  return TensorConfig(format=fmts.FP8_E5M2)


def ultra_low_config(*, two_phase_rounding: bool = True, fp8_update: bool = False) -> DotConfig:
  """The 4-bit DotConfig of one layer.

  Args:
    two_phase_rounding: dW gets the odd grid (TPR); False: both even.
    fp8_update: the dW GEMM gets FP8 e5m2 gradients (MobileNet-V2 layers).

  Returns:
    A DotConfig with independent dY roundings for the two backward GEMMs.
  """
  dw = _fp8_gradient() if fp8_update else gradient_config(1 if two_phase_rounding else 0)
  return DotConfig(fwd=_forward(), dlhs=MatmulConfig(lhs=gradient_config(0), rhs=REUSE),
                   drhs=MatmulConfig(lhs=REUSE, rhs=dw))


def fp8_config() -> DotConfig:
  """All-FP8 layer (the 1×1 convs): e4m3 X and W, e5m2 dY, absmax scales, RTN.

  The FP8 formats are those of Sun et al.'s HFP8 (NeurIPS 2019), an
  unverified guess for this paper.
  """
  act = TensorConfig(format=fmts.FP8_E4M3)
  return DotConfig(fwd=MatmulConfig(lhs=act, rhs=act),
                   dlhs=MatmulConfig(lhs=_fp8_gradient(), rhs=REUSE),
                   drhs=MatmulConfig(lhs=REUSE, rhs=_fp8_gradient()))


def _check_regex(name: str, value) -> None:
  if value is not None and not isinstance(value, str):
    raise TypeError(f'{name} must be a regex string or None, got {value!r}.')


@register('ultra_low', paper='Sun et al., "Ultra-Low Precision 4-bit Training of Deep Neural '
          'Networks", NeurIPS 2020',
          forward='INT4 (SAWB weights, PACT activations with a learned clip), RTN; FP8 1x1 convs',
          backward='radix-4 FP4 [1,3,0] with per-layer power-of-two GradScale, Two-Phase '
          'Rounding (even grid for dX, odd grid for dW); FP8 for 1x1 convs and depthwise dW',
          families=('cnn', 'mobilenet', 'transformer'),
          reported=(
              ReportedDelta(model='ResNet-18', dataset='ImageNet', delta_pp=-1.43,
                            source=_SOURCE),
              ReportedDelta(model='ResNet-50', dataset='ImageNet', delta_pp=-2.49,
                            source=_SOURCE + ' (LUQ §1 states 2.49%)'),
              ReportedDelta(model='MobileNet-V2', dataset='ImageNet', delta_pp=-3.05,
                            source=_SOURCE),
              ReportedDelta(model='Transformer-base', dataset='WMT En-De', delta_pp=-2.1,
                            metric='BLEU', source=_SOURCE),
          ))
def ultra_low(*, two_phase_rounding: bool = True, float_layers: str | None = 'stem|head',
              setting: str = 'resnet', learned_clip: bool = True,
              fp8_layers: str | None = None, fp8_update_layers: str | None = None) -> Recipe:
  """Sun et al.'s 4-bit recipe (NeurIPS 2020); see the module doc for the GEMMs.

  Unverified choices (the paper's full text was not available; all documented
  in papers-1-4.md §2): the dX GEMM takes the even TPR phase and dW the odd
  one; GradScale is computed from the current gradient (its steady state),
  not carried from the previous step; activations are PACT-quantized with a
  learned clip α per layer (`learned_clip`, `qtrain.pact.install_pact`: an
  `nnx.Param` initialised to the first batch's SAWB clip, trained by the
  optimizer with PACT's gradient 1[x ≥ α]; signed inputs get the signed
  INT4 grid); weights use SAWB with IBM's 15-level coefficients; FP8 means
  HFP8's e4m3 forward / e5m2 gradients; first conv and classifier float.

  Args:
    two_phase_rounding: odd grid for the dW GEMM (False: even for both).
    float_layers: regex of layers kept float; None: none.
    setting: 'resnet' (FP8 1×1 convs, by shape) or 'mobilenet' (FP8 dW
      gradients in every quantized layer); see the module doc.
    learned_clip: PACT's learned activation clip (NNX models, installed by
      the recipe's `prepare_model`); False: the clip is each tensor's SAWB
      clip, recomputed per step (stateless; what a Linen model gets).
    fp8_layers: extra regex of layers run fully in FP8; None: none.
    fp8_update_layers: extra regex of layers whose dW GEMM takes FP8
      gradients; None: none.

  Returns:
    Recipe 'ultra_low'.

  Raises:
    TypeError / ValueError: a non-bool flag, a non-string regex, an unknown
      setting.

  Examples:
    >>> from qtrain.recipes.papers.ultra_low import ultra_low
    >>> r = ultra_low()
    >>> [(rule.module_path, rule.op_kinds) for rule in r.rules][1:]
    [('.*', ('conv1x1',)), ('.*', ('depthwise_conv',)), ('.*', ())]
    >>> r.rules[-1].config.drhs.rhs.format.name
    'log4_fp4_odd'
  """
  for name, value in (('two_phase_rounding', two_phase_rounding),
                      ('learned_clip', learned_clip)):
    if not isinstance(value, bool):
      raise TypeError(f'{name} must be a bool, got {value!r}.')
  if setting not in ('resnet', 'mobilenet'):
    raise ValueError(f"setting={setting!r} is unknown; allowed: 'resnet', 'mobilenet'.")
  for name, value in (('float_layers', float_layers), ('fp8_layers', fp8_layers),
                      ('fp8_update_layers', fp8_update_layers)):
    _check_regex(name, value)
  four = ultra_low_config(two_phase_rounding=two_phase_rounding)
  fp8_dw = ultra_low_config(two_phase_rounding=two_phase_rounding, fp8_update=True)
  rules = []
  if float_layers:
    rules.append(QuantRule(module_path=float_layers, config=None))
  if fp8_layers:
    rules.append(QuantRule(module_path=fp8_layers, config=fp8_config()))
  if fp8_update_layers:
    rules.append(QuantRule(module_path=fp8_update_layers, config=fp8_dw))
  if setting == 'resnet':
    rules.append(QuantRule(module_path='.*', config=fp8_config(), op_kinds=('conv1x1',)))
    rules.append(QuantRule(module_path='.*', config=fp8_dw, op_kinds=('depthwise_conv',)))
    rules.append(QuantRule(module_path='.*', config=four))
  else:
    rules.append(QuantRule(module_path='.*', config=fp8_dw))
  tpr = 'TPR' if two_phase_rounding else 'no TPR'
  prepare = pact_hooks.install_pact if learned_clip else None
  return Recipe(name='ultra_low', rules=tuple(rules), prepare_model=prepare,
                description=f'Ultra-low (Sun et al., NeurIPS 2020): INT4 fwd, radix-4 FP4 '
                            f'bwd with GradScale, {tpr}, {setting} setting')
