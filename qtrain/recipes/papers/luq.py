"""LUQ (Chmiel et al.): INT4 SAWB forward, logarithmic unbiased FP4 gradients.

`luq()` returns the paper's recipe:

| GEMM | operands                                                                   |
|------|----------------------------------------------------------------------------|
| fwd  | X: INT4 SAWB, RTN (`four_bit.SawbActivation`); W: INT4 SAWB [−8, 7], RTN    |
| dX   | dY: LUQ radix-2 FP4 (α = max|dY|/2^7, stochastic underflow + log SR); W: forward codes |
| dW   | the *same* LUQ sample of dY (or SMP average); X: forward codes              |

Layers matching `float_layers` (default 'stem|head' = the zoo's first conv
and classifier) stay float. Options: `smp=N` averages N independent LUQ
samples (each runs its own FP4 GEMMs; both backward GEMMs see the same N
samples); `fnt=T` switches to high-precision fine-tuning for the last T steps
(weights stay INT4, everything else float) — pair it with `fnt_schedule`.

In-hindsight max (LUQ §7) is `hindsight_momentum=η`: each layer keeps its
max estimate as backward state (`qtrain.four_bit.HindsightMax`, threaded by
`qtrain.train` and any step using `qtrain.nnx_hooks.GRAD_STATE_WRT`).

References:
  Chmiel, Banner, Hoffer, Ben-Yaacov, Soudry, "Accurate Neural Training with
  4-bit Matrix Multiplications at Standard Formats" (ICLR 2023; arXiv
  2112.10769 "Logarithmic Unbiased Quantization").
"""

from __future__ import annotations

import dataclasses

import optax

from qtrain import four_bit
from qtrain import formats as fmts
from qtrain import numerics
from qtrain import scaling
from qtrain.config import REUSE, DotConfig, MatmulConfig, TensorConfig
from qtrain.recipe import Recipe
from qtrain.recipes.registry import ReportedDelta, register
from qtrain.rules import QuantRule

__all__ = ['luq', 'luq_config', 'fnt_config', 'fnt_schedule']

_SOURCE = 'LUQ (ICLR 2023) Table 2, LUQ column vs its baseline'


def _check_count(name: str, value, lo: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise TypeError(f'{name} must be an int, got {value!r}.')
  if value < lo:
    raise ValueError(f'{name}={value} must be >= {lo}.')
  return value


def _weight_rule() -> TensorConfig:
  # 16-level INT4 [-8, 7] with the code's step clip/8 (the code's [-8, 8] has 17 levels).
  return TensorConfig(format=fmts.INT4, calibration=scaling.Sawb())


def luq_config(*, smp: int = 1, hindsight_momentum: float | None = None) -> DotConfig:
  """LUQ's DotConfig for one layer (see the module table).

  Args:
    smp: number of LUQ samples averaged (SMP, LUQ §5.1); 1 = plain LUQ.
    hindsight_momentum: None = α from this step's max|dY|; a number η in
      [0, 1] = LUQ §7's in-hindsight max (`four_bit.HindsightMax`): α from
      the estimate carried from earlier steps as per-layer state (NNX hooks).

  Returns:
    A DotConfig with share_gradient_sample=True.

  Raises:
    ValueError: smp < 1, momentum outside [0, 1].
  """
  _check_count('smp', smp, 1)
  grad = numerics.luq_config(4, smp)
  if hindsight_momentum is not None:
    grad = dataclasses.replace(grad, calibration=four_bit.HindsightMax(
        momentum=hindsight_momentum))
  return DotConfig(fwd=MatmulConfig(lhs=four_bit.activation_config(4), rhs=_weight_rule()),
                   dlhs=MatmulConfig(lhs=grad, rhs=REUSE),
                   drhs=MatmulConfig(lhs=REUSE, rhs=grad),
                   share_gradient_sample=True)


def fnt_config() -> DotConfig:
  """FNT's DotConfig: INT4 SAWB weights (forward and the dX GEMM), everything else float."""
  return DotConfig(fwd=MatmulConfig(lhs=None, rhs=_weight_rule()),
                   dlhs=MatmulConfig(lhs=None, rhs=REUSE),
                   drhs=MatmulConfig(lhs=REUSE, rhs=None))


def fnt_schedule(*, final_lr: float, base_lr: float, steps: int) -> optax.Schedule:
  """LUQ's FNT learning rate: linear rise from final_lr to base_lr, then back down.

  Over the T = `steps` fine-tuning steps, t = 0..T: lr rises linearly from
  LR_T (`final_lr`, the last LR of 4-bit training) to LR_base (`base_lr`) at
  t = T/2, then decreases linearly with the same slope, reaching LR_T at
  t = T (LUQ §5.2). The printed equation is garbled (not continuous at T/2);
  this is the continuous reading of "rise, then decrease with the same slope".

  Use it for the last `fnt` steps of a run with `recipe.float_last_steps =
  fnt`, e.g. `optax.join_schedules([main, fnt_schedule(final_lr=main(total -
  fnt), base_lr=lr0, steps=fnt)], [total - fnt])`, and switch the model to
  `recipe.rules_at(step, total)` at step `total - fnt`. `qtrain.train`
  switches the rules but keeps its constant LR: with LR_T = LR_base the
  rise-and-fall is flat, so that is this schedule for a constant-LR run.

  Args:
    final_lr: LR_T >= 0.
    base_lr: LR_base >= 0 (the peak).
    steps: T >= 2.

  Returns:
    An optax schedule of the step count (0-based within the fine-tuning).

  Raises:
    ValueError: negative LRs or steps < 2.

  Examples:
    >>> from qtrain.recipes.papers.luq import fnt_schedule
    >>> s = fnt_schedule(final_lr=0.0, base_lr=1.0, steps=4)
    >>> [float(s(t)) for t in range(5)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
  """
  _check_count('steps', steps, 2)
  for name, v in (('final_lr', final_lr), ('base_lr', base_lr)):
    if not isinstance(v, (int, float)) or not v >= 0:
      raise ValueError(f'{name}={v!r} must be a non-negative number.')
  half = steps // 2
  return optax.join_schedules(
      [optax.linear_schedule(final_lr, base_lr, half),
       optax.linear_schedule(base_lr, final_lr, steps - half)], [half])


@register('luq', paper='Chmiel et al., "Accurate Neural Training with 4-bit Matrix '
          'Multiplications at Standard Formats" (LUQ), ICLR 2023, arXiv:2112.10769',
          forward='INT4 SAWB, RTN (weights and activations)',
          backward='radix-2 log FP4 [1,3,0] (LUQ: max-based α, stochastic underflow, log SR), '
          'one sample shared by dX and dW',
          families=('cnn', 'mobilenet', 'transformer'),
          reported=(
              ReportedDelta(model='ResNet-18', dataset='ImageNet', delta_pp=-0.61, source=_SOURCE),
              ReportedDelta(model='ResNet-50', dataset='ImageNet', delta_pp=-1.08, source=_SOURCE),
              ReportedDelta(model='MobileNet-V2', dataset='ImageNet', delta_pp=-2.35,
                            source=_SOURCE),
              ReportedDelta(model='ResNeXt-50', dataset='ImageNet', delta_pp=-1.58,
                            source=_SOURCE),
              ReportedDelta(model='ViT-B', dataset='ImageNet', delta_pp=-2.5, source=_SOURCE),
              ReportedDelta(model='Transformer-base', dataset='WMT En-De', delta_pp=-0.33,
                            metric='BLEU', source=_SOURCE),
              ReportedDelta(model='BERT-base', dataset='SQuAD', delta_pp=-1.28, metric='F1',
                            source=_SOURCE),
          ))
def luq(*, smp: int = 1, fnt: int = 0, float_layers: str | None = 'stem|head',
        hindsight_momentum: float | None = None) -> Recipe:
  """LUQ's recipe (Chmiel et al., ICLR 2023), see the module doc for the GEMMs.

  Defaults are the paper's plain "LUQ" column (Table 2). Its best setting is
  `smp=2` (LUQ+SMP) plus `fnt` = 1–3 epochs of steps (Table 3).

  Faithfulness notes: weights use INT4 [−8, 7] with the code's step clip/8
  (the code's grid [−8, 8] has 17 levels); activations use the code's
  unsigned grid [0, 15]·2·clip/15 when non-negative, else a signed INT4 grid,
  per call (`four_bit.SawbActivation`); α comes from max|dY| (the code's
  signed max is a bug); zero takes its own code beside α·2^0..α·2^7, as in the
  code. Which layers the paper keeps float is not stated in the text we had
  (its App. A.4); the default keeps the first conv and the classifier float.
  In-hindsight max (LUQ §7) is the option `hindsight_momentum=η`: α comes
  from the max estimate of earlier steps, kept per layer as backward state
  (`four_bit.HindsightMax`; NNX models, the training loop threads it). The
  paper's η was not available to us, so there is no default.

  Args:
    smp: LUQ samples averaged per gradient (>= 1).
    fnt: steps of high-precision fine-tuning at the end of the run (>= 0):
      `float_last_steps=fnt` with `final_rules` keeping INT4 weights
      (`fnt_config`). The training loop should use `fnt_schedule` for them.
    float_layers: regex of the layers kept float (zoo names: 'stem' = first
      conv, 'head' = classifier); None quantizes every layer.
    hindsight_momentum: None (default) = α from each step's max|dY|; η in
      [0, 1] = the in-hindsight max with momentum η.

  Returns:
    Recipe 'luq'.

  Raises:
    TypeError, ValueError: bad option values.

  Examples:
    >>> from qtrain.recipes.papers.luq import luq
    >>> r = luq(smp=2, fnt=100)
    >>> r.name, r.float_last_steps, r.rules[1].config.dlhs.lhs.samples
    ('luq', 100, 2)
  """
  _check_count('fnt', fnt, 0)
  if float_layers is not None and not isinstance(float_layers, str):
    raise TypeError(f'float_layers must be a regex string or None, got {float_layers!r}.')
  head = (QuantRule(module_path=float_layers, config=None),) if float_layers else ()
  rules = head + (QuantRule(module_path='.*', config=luq_config(
      smp=smp, hindsight_momentum=hindsight_momentum)),)
  final = head + (QuantRule(module_path='.*', config=fnt_config()),) if fnt else None
  smp_text = f', SMP x{smp}' if smp > 1 else ''
  fnt_text = f', FNT last {fnt} steps' if fnt else ''
  return Recipe(name='luq', rules=rules, float_last_steps=fnt, final_rules=final,
                description=f'LUQ (Chmiel et al., ICLR 2023): INT4 SAWB fwd, LUQ log-FP4 '
                            f'bwd{smp_text}{fnt_text}')
