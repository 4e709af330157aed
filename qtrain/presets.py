"""Ready-made `DotConfig`s (plain functions; change them with `dataclasses.replace`).

Paper recipes (LUQ, Ultra-low, WAGEUBN, ...) bundle configs like these with
optimizer transforms and live in `qtrain.recipes`; these presets are the
building blocks and the baselines of the benchmarks.
"""

from __future__ import annotations

from qtrain import formats as fmts
from qtrain import numerics
from qtrain import scaling
from qtrain.config import REUSE, DotConfig, MatmulConfig, TensorConfig

__all__ = ['int8', 'int4', 'fp32']


def fp32() -> None:
  """No quantization (the float baseline): `dot_general(config=None)`."""
  return None


def int8(*, gradient_rounding: str = 'stochastic', per_channel_weights: bool = False) -> DotConfig:
  """INT8 forward (absmax, round-to-nearest) and INT8 backward (absmax, SR).

  Args:
    gradient_rounding: rounding of dY in both backward GEMMs.
    per_channel_weights: one weight scale per output channel instead of per tensor.

  Returns:
    A DotConfig with independent gradient noise for the dX and dW GEMMs.
  """
  weight = TensorConfig(format=fmts.INT8, granularity=(
      scaling.PerChannel() if per_channel_weights else scaling.PerTensor()))
  act = TensorConfig(format=fmts.INT8)
  grad = TensorConfig(format=fmts.INT8, rounding=gradient_rounding)
  return DotConfig(fwd=MatmulConfig(lhs=act, rhs=weight),
                   dlhs=MatmulConfig(lhs=grad, rhs=REUSE),
                   drhs=MatmulConfig(lhs=REUSE, rhs=grad))


def int4(*, samples: int = 1) -> DotConfig:
  """4-bit: INT4 SAWB forward, radix-2 log FP4 (LUQ) backward, one shared gradient sample.

  This is LUQ's numerics (without its recipe's schedule); `samples` is SMP.
  """
  fwd = TensorConfig(format=fmts.INT4, calibration=scaling.Sawb())
  grad = numerics.luq_config(4, samples)
  return DotConfig(fwd=MatmulConfig(lhs=fwd, rhs=fwd),
                   dlhs=MatmulConfig(lhs=grad, rhs=REUSE),
                   drhs=MatmulConfig(lhs=REUSE, rhs=grad),
                   share_gradient_sample=True)
