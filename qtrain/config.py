"""Quantization configs as frozen, hashable data.

`TensorConfig` says how one tensor is quantized; `MatmulConfig(lhs, rhs)` pairs
the two operands of one GEMM; `DotConfig(fwd, dlhs, drhs)` covers the three
GEMMs of a layer (AQT's decomposition):

| GEMM   | computes        | lhs operand              | rhs operand              |
|--------|-----------------|--------------------------|--------------------------|
| fwd    | Y  = X · W      | X (activations)          | W (weights)              |
| dlhs   | dX = dY · Wᵀ    | dY (incoming gradient)   | W residual               |
| drhs   | dW = Xᵀ · dY    | X residual               | dY (incoming gradient)   |

An operand config is a `TensorConfig`, `None` (high precision: the float
operand), or, for the residual slots of dlhs/drhs only, `REUSE` (the default):
the forward's codes and scales are reused, so the backward sees exactly the
values the forward multiplied (what every FQT paper does).

Configs are static arguments of `jax.jit`/`custom_vjp`: change them with
`dataclasses.replace`, never by mutation. The PRNG key is never a config field.
"""

from __future__ import annotations

import dataclasses
from typing import Union

from qtrain import formats as fmts
from qtrain import rounding as rnd
from qtrain import scaling

__all__ = ['TensorConfig', 'MatmulConfig', 'DotConfig', 'Reuse', 'REUSE', 'OperandConfig',
           'GradientEstimator']

_dataclass = dataclasses.dataclass(frozen=True, kw_only=True, slots=True)


@_dataclass
class Reuse:
  """Residual slot marker: reuse the forward pass's codes of this operand."""

  def __repr__(self) -> str:
    return 'REUSE'


REUSE = Reuse()


@_dataclass
class TensorConfig:
  """How one tensor is quantized.

  Attributes:
    format: a `qtrain.formats.Format` (INT4, FP8_E4M3, LOG2_FP4, ...).
    rounding: 'nearest' (round-to-nearest-even; the forward rule) or
      'stochastic' (needs a key; the backward rule of most papers).
    calibration: how the scale is computed (`scaling.AbsMax()` by default;
      fixed-point formats always use their fixed step).
    granularity: which elements share a scale (`scaling.PerTensor()` by default).
    samples: SMP (LUQ §5.1): average this many independent stochastic
      quantizations. Inside a dot each sample runs its own low-bit GEMM and
      the GEMM outputs are averaged (equal, in exact arithmetic, to averaging
      the samples first as the LUQ code does). Needs rounding='stochastic'.
  """
  format: fmts.Format
  rounding: rnd.Rounding = 'nearest'
  calibration: scaling.Calibration = scaling.AbsMax()
  granularity: scaling.Granularity = scaling.PerTensor()
  samples: int = 1

  def __post_init__(self):
    if not isinstance(self.format, fmts.Format):
      raise TypeError(f'format must be a qtrain.formats.Format, got {self.format!r}.')
    rnd.check_rounding(self.rounding)
    if isinstance(self.format, fmts.FixedPointFormat) and isinstance(
        self.calibration, scaling.AbsMax):
      # Fixed point carries its own scale; AbsMax is only the class default.
      object.__setattr__(self, 'calibration', scaling.FixedScale(value=self.format.step))
    if not isinstance(self.calibration, (scaling.AbsMax, scaling.MinMax, scaling.Sawb,
                                         scaling.FixedScale, scaling.Lsq,
                                         scaling.CustomCalibration,
                                         scaling.StatefulCalibration)):
      raise TypeError(f'calibration must be a qtrain.scaling calibration, got '
                      f'{self.calibration!r}.')
    if not isinstance(self.granularity, (scaling.PerTensor, scaling.PerChannel,
                                         scaling.PerBlock)):
      raise TypeError(f'granularity must be PerTensor, PerChannel or PerBlock, got '
                      f'{self.granularity!r}.')
    if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
      raise ValueError(f'samples={self.samples!r} must be an int >= 1.')
    if self.samples > 1 and self.rounding != 'stochastic':
      raise ValueError(f"samples={self.samples} averages stochastic samples; it needs "
                       f"rounding='stochastic', got {self.rounding!r}.")

  @property
  def stochastic(self) -> bool:
    return self.rounding == 'stochastic'


class GradientEstimator:
  """Base class of dY rules that are more than one quantize-then-GEMM.

  Some papers' backward estimators mix rows, split dY into several low-bit
  tensors or sample rows: StatQuant's BHQ (`T⁻¹·Q(T·dY)`), the INT4
  Transformers' bit splitting and leverage-score sampling. Such a rule sits
  in a dY slot (`dlhs.lhs` or `drhs.rhs`) of a `DotConfig`; the backward pass
  calls `estimate` and multiplies the returned (dequantized) estimate with
  the GEMM's residual operand in float32. Every estimator here is linear
  after its quantization step (a transform applied on the rows of dY, a
  sum of two code tensors, a 0/1 mask over rows divided by p), so the float
  GEMM equals, in exact arithmetic, the paper's low-bit GEMM(s) followed by
  that linear map; the GPU kernels (`pallas_kernels`) run the low-bit form.

  Subclass it as a frozen, keyword-only dataclass (configs are static,
  hashed by jit) and implement `estimate`. With
  `DotConfig(share_gradient_sample=True)` both GEMMs call `estimate` with
  the *same key* (so the same random codes, e.g. the INT4 paper's shared
  bit-split codes) and their own `gemm` and `residual` (e.g. a different
  row sampling per GEMM).
  """

  @property
  def stochastic(self) -> bool:
    """True if `estimate` needs a key (the default; override for deterministic rules)."""
    return True

  def estimate(self, g, key, *, gemm: str, residual, kept: tuple[int, ...]):
    """Returns the estimate of dY that this GEMM multiplies.

    Args:
      g: float32 dY, the layer's output gradient (shape of the layer output).
      key: a PRNG key (None only if `stochastic` is False).
      gemm: 'dlhs' (dX = dY·Wᵀ) or 'drhs' (dW = Xᵀ·dY).
      residual: the other operand of this GEMM as float32 values: the
        (dequantized) weight for 'dlhs', the (dequantized) input for 'drhs',
        in the forward operand's own shape.
      kept: the axes of dY that this GEMM does not contract (a scale that
        varies only along them factors out of the GEMM).

    Returns:
      float32 array of g.shape: an (unbiased, for the papers' rules)
      estimate of g made of dequantized low-bit values.
    """
    raise NotImplementedError


OperandConfig = Union[TensorConfig, None, Reuse, GradientEstimator]


def _check_operand(name: str, value, allow_reuse: bool) -> None:
  if value is None or isinstance(value, TensorConfig):
    return
  if isinstance(value, GradientEstimator):
    if name in ('lhs', 'rhs', 'dlhs.lhs', 'drhs.rhs'):
      return
    raise ValueError(f'{name}: a GradientEstimator is only valid in the dY slots (dlhs.lhs, '
                     f'drhs.rhs), got {value!r}.')
  if isinstance(value, Reuse):
    if allow_reuse:
      return
    raise ValueError(f'{name}=REUSE is only valid for the residual slots '
                     '(dlhs.rhs and drhs.lhs).')
  raise TypeError(f'{name} must be a TensorConfig, None or REUSE, got {value!r}.')


@_dataclass
class MatmulConfig:
  """The operand configs of one GEMM (None = high precision)."""
  lhs: OperandConfig = None
  rhs: OperandConfig = None

  def __post_init__(self):
    _check_operand('lhs', self.lhs, allow_reuse=True)
    _check_operand('rhs', self.rhs, allow_reuse=True)


@_dataclass
class DotConfig:
  """Quantization of the forward GEMM and of both backward GEMMs.

  Attributes:
    fwd: MatmulConfig(lhs=X rule, rhs=W rule), usually round-to-nearest.
    dlhs: MatmulConfig(lhs=dY rule for dX, rhs=W residual: REUSE/None/rule).
    drhs: MatmulConfig(lhs=X residual: REUSE/None/rule, rhs=dY rule for dW).
      Using different dY rules here and in dlhs gives two differently rounded
      gradient copies (Sun et al.'s Two-Phase Rounding); a per-channel dY rule
      here only is DA-INT8's GVQ.
    share_gradient_sample: quantize dY once with the dlhs rule and feed the
      same sample to both backward GEMMs (LUQ). Otherwise the two GEMMs get
      independent noise. Requires identical per-tensor dY rules.
  """
  fwd: MatmulConfig = MatmulConfig()
  dlhs: MatmulConfig = MatmulConfig(rhs=REUSE)
  drhs: MatmulConfig = MatmulConfig(lhs=REUSE)
  share_gradient_sample: bool = False

  def __post_init__(self):
    for name in ('fwd', 'dlhs', 'drhs'):
      if not isinstance(getattr(self, name), MatmulConfig):
        raise TypeError(f'{name} must be a MatmulConfig, got {getattr(self, name)!r}.')
    _check_operand('fwd.lhs', self.fwd.lhs, allow_reuse=False)
    _check_operand('fwd.rhs', self.fwd.rhs, allow_reuse=False)
    _check_operand('dlhs.lhs', self.dlhs.lhs, allow_reuse=False)
    _check_operand('drhs.rhs', self.drhs.rhs, allow_reuse=False)
    for name, rule in (('dlhs.rhs', self.dlhs.rhs), ('drhs.lhs', self.drhs.lhs)):
      if isinstance(rule, GradientEstimator):
        raise ValueError(f'{name}: a GradientEstimator is only valid in the dY slots '
                         f'(dlhs.lhs, drhs.rhs), got {rule!r}.')
    for fwd_rule, res_rule, name in ((self.fwd.lhs, self.drhs.lhs, 'drhs.lhs'),
                                     (self.fwd.rhs, self.dlhs.rhs, 'dlhs.rhs')):
      if isinstance(res_rule, Reuse) and isinstance(fwd_rule, TensorConfig) and (
          fwd_rule.samples > 1):
        raise ValueError(f'{name}=REUSE cannot reuse a forward rule with samples > 1 (an '
                         'average of samples is not on the grid); give a residual rule.')
    for name in ('fwd.lhs', 'fwd.rhs', 'dlhs.rhs', 'drhs.lhs'):
      gemm, side = name.split('.')
      rule = getattr(getattr(self, gemm), side)
      if isinstance(rule, TensorConfig) and isinstance(rule.calibration,
                                                       scaling.StatefulCalibration):
        raise ValueError(f'{name}: a StatefulCalibration is only supported in the dY slots '
                         '(dlhs.lhs, drhs.rhs), where the backward pass carries its state.')
    if self.share_gradient_sample:
      if self.dlhs.lhs != self.drhs.rhs:
        raise ValueError('share_gradient_sample=True needs dlhs.lhs == drhs.rhs (one rule, '
                         f'one sample); got {self.dlhs.lhs!r} and {self.drhs.rhs!r}.')
      g = self.dlhs.lhs
      if isinstance(g, TensorConfig) and not isinstance(g.granularity, scaling.PerTensor):
        raise ValueError('share_gradient_sample=True needs a PerTensor gradient rule: a '
                         'per-channel scale of dY cannot factor out of both GEMMs.')

  @property
  def needs_key(self) -> bool:
    """True if any rule is stochastic (then `key` is required)."""
    rules = (self.fwd.lhs, self.fwd.rhs, self.dlhs.lhs, self.dlhs.rhs, self.drhs.lhs,
             self.drhs.rhs)
    return any(isinstance(r, (TensorConfig, GradientEstimator)) and r.stochastic
               for r in rules)

  @property
  def stateful_slots(self) -> tuple[str, ...]:
    """The backward GEMMs ('dlhs', 'drhs') whose dY rule is a StatefulCalibration.

    These are the keys of the `grad_state` dict `qtrain.dot_general` needs.
    With share_gradient_sample one sample (and one state) serves both GEMMs:
    only 'dlhs'.
    """
    slots = []
    for gemm, rule in (('dlhs', self.dlhs.lhs), ('drhs', self.drhs.rhs)):
      if isinstance(rule, TensorConfig) and isinstance(rule.calibration,
                                                       scaling.StatefulCalibration):
        slots.append(gemm)
    if self.share_gradient_sample:
      slots = [s for s in slots if s == 'dlhs']
    return tuple(slots)
