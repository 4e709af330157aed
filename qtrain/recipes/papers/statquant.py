"""StatQuant (Chen et al., NeurIPS 2020) as a `Recipe`: unbiased PTQ / PSQ / BHQ gradients.

`statquant(kind, bits)` quantizes every dense and conv layer (first conv and
classifier included, as the official `-c quantize` ResNets; BatchNorm,
pooling, residual adds and the loss stay float) with:

| GEMM       | lhs operand                                | rhs operand                           |
|------------|--------------------------------------------|---------------------------------------|
| Y = X·W    | X: uint8 per-tensor min/max (zero pt), RTN | W: uint8 per-tensor zero-aligned, RTN |
| dX = dY·Wᵀ | dY: PTQ / PSQ / BHQ at `bits`, SR          | W: the forward codes                  |
| dW = Xᵀ·dY | X: the forward codes                       | dY: 8-bit PTQ or per column, SR       |

The two backward GEMMs quantize dY independently ("gradient bifurcation",
the code's `conv2d_biprec`): different quantizer, bits and noise. PTQ dY
rules are `TensorConfig`s (integer codes with a zero point reach the GEMM);
PSQ, BHQ and the per-column rule are `qtrain.config.GradientEstimator`s
(`qtrain.statquant`), whose dequantized estimate is multiplied in float32.

Registered names: 'statquant' (= BHQ, 5-bit dX gradients, the paper's
headline setting) and one entry per variant for `qtrain compare`:
'statquant-{ptq,psq,bhq}{8,5,4}', e.g.

    qtrain compare --task fashion_mnist --model lenet --recipes \\
        fp32,statquant-ptq8,statquant-psq8,statquant-bhq8,statquant-ptq5,statquant-bhq5

References:
  Chen, Gai, Yao, Mahoney, Gonzalez, "A Statistical Framework for
  Low-bitwidth Training of Deep Neural Networks", NeurIPS 2020,
  arXiv:2010.14298; code github.com/cjf00000/StatQuant
  (`image_classification/quantize.py`, `main.py`, `README.md`).
"""

from __future__ import annotations

import re

from qtrain import statquant as sq
from qtrain.config import REUSE, DotConfig, MatmulConfig
from qtrain.recipe import Recipe
from qtrain.recipes.registry import ReportedDelta, register
from qtrain.rules import QuantRule

__all__ = ['statquant', 'statquant_config', 'KINDS', 'VARIANTS']

PAPER = ('Chen et al., "A Statistical Framework for Low-bitwidth Training of Deep Neural '
         'Networks" (StatQuant), NeurIPS 2020, arXiv:2010.14298')

KINDS = ('ptq', 'psq', 'bhq')

# The registered (kind, bits) variants: the paper's 8-bit baseline and 5-bit
# headline, plus 4 bits (the code supports any --bbits; 4-bit runs are unverified).
VARIANTS = tuple((kind, bits) for bits in (8, 5, 4) for kind in KINDS)

_FORWARD = ('INT8: activations uint8 per-tensor min/max, weights uint8 per-tensor '
            'zero-aligned, RTN (every layer)')

# Only the abstract was read: "5-bit BHQ ... only 0.5% below QAT" on ResNet-50.
# That is a difference to QAT (not to float32) and an upper bound; the paper's
# tables (per-bit PTQ/PSQ/BHQ, CIFAR-10, IWSLT) were not available, so no
# other number is recorded (papers-5-8.md §5.6).
_HEADLINE = ReportedDelta(model='ResNet-50', dataset='ImageNet', delta_pp=-0.5,
                          metric='top-1 vs QAT, not fp32 ("within 0.5%")',
                          source='StatQuant abstract (5-bit BHQ vs QAT)')


def _check_kind(kind) -> str:
  if kind not in KINDS:
    raise ValueError(f'kind={kind!r} is unknown; allowed: {KINDS}.')
  return kind


def _check_flag(name: str, value) -> None:
  if not isinstance(value, bool):
    raise TypeError(f'{name} must be a bool, got {value!r}.')


def statquant_config(kind: str = 'bhq', bits: int = 5, *, weight_grad_bits: int = 8,
                     per_sample_weight_grad: bool | None = None,
                     forward_bits: int = 8) -> DotConfig:
  """The DotConfig of one StatQuant layer (see the module table).

  Args:
    kind: the dX GEMM's dY quantizer: 'ptq' (per tensor, zero-aligned),
      'psq' (per sample) or 'bhq' (block Householder).
    bits: bits of that quantizer, 2..8 (paper: 8 and 5; 4 unverified).
    weight_grad_bits: bits of the dW GEMM's dY quantizer (the code's
      `--bwbits`, default 8, independent of `bits`), 2..8.
    per_sample_weight_grad: the dW GEMM's dY rule: False = PTQ, True = one
      min/max range per column over the batch (a simulation for convs,
      `statquant.per_column`). None = as the official run modes, where
      `--persample=True` switches both paths: False for 'ptq', True for
      'psq' and 'bhq'.
    forward_bits: bits of the forward X and W codes (the code's
      `--abits`/`--wbits`, 8), 2..8.

  Returns:
    A DotConfig with independent dY samples for the two backward GEMMs.

  Raises:
    TypeError, ValueError: bad options, naming them.
  """
  _check_kind(kind)
  sq.check_bits(bits, 'bits')
  sq.check_bits(weight_grad_bits, 'weight_grad_bits')
  sq.check_bits(forward_bits, 'forward_bits')
  if per_sample_weight_grad is None:
    per_sample_weight_grad = kind != 'ptq'
  _check_flag('per_sample_weight_grad', per_sample_weight_grad)
  grad_dx = {'ptq': lambda: sq.ptq_config(bits), 'psq': lambda: sq.PsqEstimator(bits=bits),
             'bhq': lambda: sq.BhqEstimator(bits=bits)}[kind]()
  grad_dw = (sq.PerColumnEstimator(bits=weight_grad_bits) if per_sample_weight_grad
             else sq.ptq_config(weight_grad_bits))
  fwd = MatmulConfig(lhs=sq.activation_config(forward_bits),
                     rhs=sq.ptq_config(forward_bits, 'nearest'))
  return DotConfig(fwd=fwd, dlhs=MatmulConfig(lhs=grad_dx, rhs=REUSE),
                   drhs=MatmulConfig(lhs=REUSE, rhs=grad_dw), share_gradient_sample=False)


@register('statquant', paper=PAPER, forward=_FORWARD,
          backward='dX: BHQ 5-bit dY (block Householder + per-sample min/max), SR; '
                   'dW: independent 8-bit per-column dY, SR',
          families=('cnn', 'transformer'), reported=(_HEADLINE,))
def statquant(kind: str = 'bhq', bits: int = 5, *, weight_grad_bits: int = 8,
              per_sample_weight_grad: bool | None = None, forward_bits: int = 8,
              float_layers: str | None = None) -> Recipe:
  """StatQuant's recipe (Chen et al., NeurIPS 2020): unbiased FQT with PTQ/PSQ/BHQ gradients.

  Defaults are the paper's headline: BHQ with 5-bit dX gradients, 8-bit
  forward, 8-bit dW gradients, every layer quantized (first conv and last
  FC too; BN float), no optimizer transform (the paper uses plain SGD with
  momentum, the training loop's choice here). `kind`/`bits` select the
  code's run modes (README): PTQ = `--persample=False --hadamard=False`,
  PSQ = `--persample=True`, BHQ = `--persample=True --hadamard=True`.

  Faithfulness notes: rows of PSQ/BHQ are the leading axis of dY (samples,
  the code's `view(N, -1)`; in a transformer one row is a whole sequence,
  not a token); BHQ groups are formed per device batch, as the code's per
  GPU batch. Forward activations use an integer zero point (the code's
  real offset min − 1e-8 is equal for ReLU outputs and zero-crossing
  tensors). The PTQ zero alignment guards the code's 0/0 (see
  `qtrain.statquant.ZeroAlignedMinMax`). Biases stay float (the code keeps
  16-bit biases or, in convs, float ones). Attention's QKᵀ and probs·V are
  not quantized (the rule has no 'attention' op kind; the paper's
  transformer setting was not available). Reported Δ: only the abstract's
  "within 0.5% of QAT" for 5-bit BHQ on ResNet-50 (a difference to QAT);
  the paper's tables were not available, so no other number is recorded.

  Args:
    kind: 'ptq', 'psq' or 'bhq' (dX GEMM's dY quantizer).
    bits: its bits, 2..8.
    weight_grad_bits: dW GEMM's dY bits, 2..8 (default 8).
    per_sample_weight_grad: dW GEMM's dY per column (True) or PTQ (False);
      None = as the code's run mode (False for 'ptq', True otherwise).
    forward_bits: forward X/W bits, 2..8 (default 8).
    float_layers: regex (full match on the module path) of layers kept float;
      None (default) quantizes every layer, as the paper.

  Returns:
    Recipe 'statquant' for the defaults, else 'statquant-{kind}{bits}'
    (plus '-custom' when another option differs from its default).

  Raises:
    TypeError, ValueError: bad options, naming them.

  Examples:
    >>> from qtrain.recipes.papers.statquant import statquant
    >>> r = statquant('ptq', 8)
    >>> r.name, type(r.rules[0].config.dlhs.lhs.calibration).__name__
    ('statquant-ptq8', 'ZeroAlignedMinMax')
  """
  config = statquant_config(kind, bits, weight_grad_bits=weight_grad_bits,
                            per_sample_weight_grad=per_sample_weight_grad,
                            forward_bits=forward_bits)
  if float_layers is not None:
    if not isinstance(float_layers, str):
      raise TypeError(f'float_layers must be a regex string or None, got {float_layers!r}.')
    try:
      re.compile(float_layers)
    except re.error as e:
      raise ValueError(f'float_layers={float_layers!r} is not a valid regex: {e}.') from e
  head = (QuantRule(module_path=float_layers, config=None),) if float_layers else ()
  rules = head + (QuantRule(module_path='.*', config=config),)
  per_column = isinstance(config.drhs.rhs, sq.PerColumnEstimator)
  custom = (weight_grad_bits != 8 or forward_bits != 8 or float_layers is not None or
            per_column != (kind != 'ptq'))
  name = 'statquant' if (kind, bits) == ('bhq', 5) and not custom else f'statquant-{kind}{bits}'
  name += '-custom' if custom else ''
  dw = 'per-column' if per_column else 'PTQ'
  return Recipe(name=name, rules=rules,
                description=f'StatQuant (Chen et al., NeurIPS 2020): INT{forward_bits} fwd, '
                            f'{kind.upper()} {bits}-bit dY for dX, {dw} '
                            f'{weight_grad_bits}-bit dY for dW, SR')


def _register_variant(kind: str, bits: int) -> None:
  name = f'statquant-{kind}{bits}'
  dw = 'PTQ' if kind == 'ptq' else 'per-column'

  def factory() -> Recipe:
    return statquant(kind, bits).replace(name=name)

  factory.__name__ = factory.__qualname__ = name.replace('-', '_')
  factory.__doc__ = f'`statquant({kind!r}, {bits})` under the registry name {name!r}.'
  register(name, paper=PAPER, forward=_FORWARD,
           backward=f'dX: {kind.upper()} {bits}-bit dY, SR; dW: independent 8-bit {dw} dY, SR',
           families=('cnn', 'transformer'),
           reported=(_HEADLINE,) if (kind, bits) == ('bhq', 5) else (), variant=True)(factory)


for _kind, _bits in VARIANTS:
  _register_variant(_kind, _bits)
