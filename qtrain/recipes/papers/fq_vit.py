"""FQ-ViT (Lin et al., IJCAI 2022): post-training quantization of vision transformers.

`fq_vit()` returns the paper's settings as a `qtrain.ptq.PtqRecipe`, the
input of `qtrain.ptq.calibrate(model, batches, recipe)`. It is *not* a
training `qtrain.Recipe`: it is registered as a post-training entry
(`kind='ptq'`, names 'fq_vit' = 8/8/4 and the variant 'fq_vit-8-8-8'), which
`qtrain recipes` lists and `qtrain train`/`compare` refuse.

| setting | weights            | activations       | LayerNorm input           | attention  |
|---------|--------------------|-------------------|---------------------------|------------|
| 8/8/4   | int8 per out chan. | uint8 per tensor, | PTF uint8, K = 3,         | LIS, 4-bit |
|         |                    | MinMax observer   | integer LayerNorm         | log2       |
| 8/8/8   | same               | same              | same                      | LIS, 8-bit |

The paper's baselines are the same recipe with `ptf=False, lis=False` and
another observer ('ema', 'percentile', 'omse'): uint8 LayerNorm inputs with a
float LayerNorm, and a float softmax with a uniform uint8 output.

References:
  Lin, Zhang, Sun, Li, Zhou, "FQ-ViT: Post-Training Quantization for Fully
  Quantized Vision Transformer", IJCAI 2022, arXiv 2111.13824; official code
  `megvii-research/FQ-ViT` (`config.py`, `test_quant.py`).
"""

from __future__ import annotations

from qtrain import fq_vit as numerics
from qtrain.ptq import PtqRecipe
from qtrain.recipes.registry import ReportedDelta, register

__all__ = ['fq_vit', 'fq_vit_888', 'REPORTED']

_SOURCE = 'FQ-ViT README "Results on ImageNet" (FQ-ViT row minus FP row)'

# ImageNet top-1 degradations of the paper's FQ-ViT rows (papers-5-8.md §6.5).
REPORTED = tuple(
    ReportedDelta(model=model, dataset='ImageNet', delta_pp=delta, source=f'{_SOURCE}, {bits}')
    for bits, deltas in (
        ('8/8/8', (-0.60, -0.68, -0.65, -1.22, -0.78, -0.84, -0.49, -0.63)),
        ('8/8/4', (-1.14, -1.45, -1.00, -1.85, -0.92, -1.31, -0.73, -1.22)))
    for model, delta in zip(('DeiT-T', 'DeiT-S', 'DeiT-B', 'ViT-B', 'ViT-L', 'Swin-T', 'Swin-S',
                             'Swin-B'), deltas))


_FORWARD = ('W8 per output channel, A8 per tensor (MinMax); PTF uint8 LayerNorm inputs (K=3) '
            'with integer LayerNorm; attention probabilities by Log-Int-Softmax (log2)')
_PAPER = ('Lin et al., "FQ-ViT: Post-Training Quantization for Fully Quantized Vision '
          'Transformer", IJCAI 2022')


def _reported(bits: str) -> tuple[ReportedDelta, ...]:
  return tuple(d for d in REPORTED if d.source.endswith(bits))


@register('fq_vit', paper=_PAPER, forward=_FORWARD + ', 4-bit',
          backward='none (post-training quantization)', families=('transformer',),
          reported=_reported('8/8/4'), kind='ptq')
def fq_vit(attn_bits: int = 4, *, observer: str = 'minmax', ptf: bool = True, lis: bool = True,
           weight_half_step: bool = False, lis_rounding: numerics.Log2Rounding = 'arithmetic',
           float_layers: str = '') -> PtqRecipe:
  """FQ-ViT post-training quantization: W8/A8 with PTF LayerNorm inputs and LIS attention.

  Args:
    attn_bits: attention-probability bits, 4 (the paper's headline 8/8/4) or 8 (8/8/8).
    observer: activation observer, 'minmax' (the paper's "Ours"), 'ema',
      'percentile' or 'omse' (its baselines).
    ptf: Power-of-Two Factor LayerNorm inputs + integer LayerNorm (False: uint8
      per tensor, float LayerNorm).
    lis: Log-Int-Softmax (False: float softmax + uniform `attn_bits` quantizer).
    weight_half_step: the official code's /127.5 weight scale (default /127).
    lis_rounding: LIS log2 rounding, 'arithmetic' (the code) or 'geometric'.
    float_layers: regex of module paths kept float ('' = none, as the paper).

  Returns:
    A `qtrain.ptq.PtqRecipe` named 'fq_vit' (8/8/4) or 'fq_vit-8-8-8', with
    '-<observer>', '-noptf', '-nolis' appended for the non-default options.

  Raises:
    TypeError / ValueError: bad values, naming the argument.

  Examples:
    >>> from qtrain.recipes.papers.fq_vit import fq_vit
    >>> fq_vit().attn_bits, fq_vit(8).name
    (4, 'fq_vit-8-8-8')
  """
  if isinstance(attn_bits, bool) or not isinstance(attn_bits, int):
    raise TypeError(f'attn_bits must be an int, got {attn_bits!r}.')
  if attn_bits not in (4, 8):
    raise ValueError(f'attn_bits={attn_bits} is not a setting of the paper; allowed: 4 (8/8/4), '
                     '8 (8/8/8). Other widths: qtrain.ptq.PtqRecipe(attn_bits=...).')
  if observer not in numerics.OBSERVERS:
    raise ValueError(f'observer={observer!r} is unknown; allowed: {tuple(numerics.OBSERVERS)}.')
  name = 'fq_vit' + ('' if attn_bits == 4 else '-8-8-8')
  name += '' if observer == 'minmax' else f'-{observer}'
  name += ('' if ptf else '-noptf') + ('' if lis else '-nolis')
  return PtqRecipe(
      name=name, weight_bits=8, act_bits=8, attn_bits=attn_bits,
      observer=numerics.make_observer(observer), ptf=ptf, ptf_k=3, lis=lis,
      lis_rounding=lis_rounding, lis_n=30, weight_half_step=weight_half_step,
      shared_qkv=True, float_layers=float_layers,
      description=f'FQ-ViT 8/8/{attn_bits} (Lin et al., IJCAI 2022)')


@register('fq_vit-8-8-8', paper=_PAPER, forward=_FORWARD + ', 8-bit',
          backward='none (post-training quantization)', families=('transformer',),
          reported=_reported('8/8/8'), kind='ptq', variant=True)
def fq_vit_888() -> PtqRecipe:
  """`fq_vit(8)` (the paper's 8/8/8 setting) under the registry name 'fq_vit-8-8-8'."""
  return fq_vit(8)
