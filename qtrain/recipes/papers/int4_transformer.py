"""`int4_transformer()`: Xi et al.'s INT4 transformer training (HQ + LSQ fwd, BS + LSS bwd).

What goes where (digest papers-5-8.md §7.3–7.5; Y = X·W, W ∈ R^{D×C}):

| part         | paper                                    | here                                  |
|--------------|------------------------------------------|---------------------------------------|
| forward      | int4(XĤ)·int4(ĤᵀW)·s_X·s_W, learned LSQ  | `prepare_model`: HadamardLsqDotGeneral |
|              | steps s_X, s_W per layer                 | (`qtrain.lsq_linear`)                 |
| dX = ∇Y·Wᵀ   | BS codes of ∇Y, LSS p ∝ ‖∇↕Y_i‖,          | rule `dlhs.lhs`: `BitSplitLss`;       |
|              | × int4(ĤᵀW) of the forward               | W residual REUSE (the forward's w_q)  |
| dW = Xᵀ·∇Y   | the same BS codes, p ∝ ‖∇↕Y_i‖·‖X̂_i‖,    | rule `drhs.rhs`: the same estimator,  |
|              | × int4(XĤ) of the forward                | shared key (share_gradient_sample)    |
| LSQ masks, Ĥ | Hadamard-domain clip masks, then ×Ĥ      | autograd through the hook             |
| step grads   | from the dX/dW results, ×1/√(numel·Q_P)  | `scaling.lsq_fake_quant`              |
| float        | last classifier, non-linear ops; QKᵀ and | rule `float_layers` → float; the      |
|              | PV (released code)                       | attention BMMs are not hooked         |

The rules put the backward (`int4_transformer_config`) on every
`nnx.Linear`/`LinearGeneral` but `float_layers`; the forward needs learned
per-layer steps and a transform of both operands, which a rule cannot hold,
so `prepare_model` (run by `quantize_model(model, recipe)` and `qtrain.train`
after the rules) upgrades those hooks to `HadamardLsqDotGeneral`. Its LSQ steps
are `nnx.Param`s: trained by the optimizer with the model's learning rate (as
in the code), checkpointed. The block search and LSQ init run inside the first
(jitted) step; see `qtrain.lsq_linear`.

Defaults are the paper's intent where code and paper differ: LSQ grid
[−7, 7] (code [−8, 7]: `lsq_range=(-8, 7)`), bit-split clamp ±7 (unbiased; code
±6: `bs_clamp=6`), LSS on (the released kernels keep every non-zero row:
`keep_nonzero=True`, numerically the same as `lss=False`).

Not covered: the embedding layers' LSQ ("simply LSQ" in the paper; `nnx.Embed`
has no matmul hook), and the pre-training reset of block and steps after two
epochs (`qtrain.lsq_linear.reset_int4_transformer` does it on request).

References:
  Xi, Li, Chen, Zhu, "Training Transformers with 4-bit Integers", NeurIPS
  2023, arXiv:2306.11987. Code: github.com/xijiu9/Train_Transformers_with_INT4.
"""

from __future__ import annotations

import functools

from qtrain import hadamard as hq
from qtrain import lsq_linear
from qtrain.bit_split import BitSplitLss
from qtrain.config import REUSE, DotConfig, MatmulConfig
from qtrain.recipe import Recipe
from qtrain.recipes.registry import ReportedDelta, register
from qtrain.rules import QuantRule

__all__ = ['int4_transformer', 'int4_transformer_config', 'prepare_model', 'FLOAT_LAYERS']

# The zoo's classifier / LM head (TransformerLM, Seq2SeqTransformer): the paper keeps the
# last classifier layer in full precision (§3).
FLOAT_LAYERS = 'head'

_T1 = 'Xi et al. 2023 Table 1 (HQ+LSS − FP)'


def _delta(model, dataset, delta, metric) -> ReportedDelta:
  return ReportedDelta(model=model, dataset=dataset, delta_pp=delta, metric=metric, source=_T1)


_REPORTED = (
    _delta('BERT-base', 'GLUE-dev', -1.86, 'GLUE avg'),
    _delta('BERT-large', 'GLUE-dev', -2.32, 'GLUE avg'),
    _delta('BERT-base', 'SQuAD v1', -0.72, 'F1'),
    _delta('BERT-base', 'SQuAD v2', -1.41, 'F1'),
    _delta('BERT-base', 'Adversarial QA', -2.29, 'F1'),
    _delta('BERT-base', 'SWAG', -2.35, 'accuracy'),
    _delta('BERT-base', 'CoNLL-2003', -1.48, 'accuracy'),
    _delta('Transformer-base', 'WMT14 En-De', -0.93, 'SacreBLEU'),
    _delta('ViT-B/32', 'CIFAR-10', -0.41, 'top-1'),
    _delta('ViT-L/32', 'CIFAR-10', -0.51, 'top-1'),
    _delta('ViT-B/32', 'CIFAR-100', -2.16, 'top-1'),
    _delta('ViT-L/32', 'CIFAR-100', -1.94, 'top-1'),
    _delta('ViT-B/32', 'ImageNet-1k', -2.70, 'top-1'),
    _delta('ViT-L/32', 'ImageNet-1k', -1.56, 'top-1'),
    _delta('ViT-L/16', 'ImageNet-1k', -1.94, 'top-1'),
    _delta('DeiT-Small (pre-training)', 'ImageNet-1k', -3.92, 'top-1'),
)


def _check_bool(name: str, value) -> bool:
  if not isinstance(value, bool):
    raise TypeError(f'{name} must be a bool, got {value!r}.')
  return value


def _lsq_narrow(bits: int, lsq_range) -> bool:
  q = 2 ** (bits - 1) - 1
  allowed = {(-q, q): True, (-q - 1, q): False}
  try:
    return allowed[tuple(lsq_range)]
  except (TypeError, KeyError):
    raise ValueError(f'lsq_range={lsq_range!r} is not allowed at bits={bits}; allowed: '
                     f'{(-q, q)} (paper, Q_N = Q_P) or {(-q - 1, q)} (official code).') from None


def int4_transformer_config(*, bits: int = 4, lss: bool = True, keep_nonzero: bool = False,
                            bs_clamp: int | None = None) -> DotConfig:
  """The backward half of a layer: BS (+ LSS) of dY in both GEMMs, one shared sample.

  The forward is float here: the operands arrive already HQ/LSQ-quantized
  from `qtrain.lsq_linear.HadamardLsqDotGeneral`, whose residuals (the INT4
  x_q, w_q) the backward GEMMs reuse.

  Args:
    bits: nibble width of the bit split (4).
    lss: leverage-score sampling on (paper) or BS only.
    keep_nonzero: the released kernels' p = 1 for every non-zero row.
    bs_clamp: nibble clamp, None/7 (unbiased) or 6 (official code).

  Returns:
    A DotConfig with share_gradient_sample=True.
  """
  est = BitSplitLss(bits=bits, clamp=bs_clamp, lss=_check_bool('lss', lss),
                    keep_nonzero=_check_bool('keep_nonzero', keep_nonzero))
  return DotConfig(fwd=MatmulConfig(lhs=None, rhs=None),
                   dlhs=MatmulConfig(lhs=est, rhs=REUSE),
                   drhs=MatmulConfig(lhs=REUSE, rhs=est), share_gradient_sample=True)


def prepare_model(model, *, bits: int = 4, block: int | None = None,
                  max_block: int = hq.MAX_BLOCK, narrow: bool = True, cold_start_steps: int = 0):
  """The forward half: HQ + LSQ hooks on the layers the rules quantized (idempotent).

  `qtrain.lsq_linear.install_hadamard_lsq` with these options; the recipe
  binds them. Call it after `quantize_model(model, recipe.rules)` if you
  install bare rules (`quantize_model(model, recipe)` calls it for you).

  Returns:
    The model (mutated in place).
  """
  return lsq_linear.install_hadamard_lsq(model, bits=bits, block=block, max_block=max_block,
                                         narrow=narrow, cold_start_steps=cold_start_steps)


@register('int4_transformer', paper='Xi, Li, Chen, Zhu, "Training Transformers with 4-bit '
          'Integers", NeurIPS 2023, arXiv:2306.11987',
          forward='INT4 LSQ (learned per-tensor steps) after a block Hadamard transform (HQ)',
          backward='bit splitting (2×INT4 = INT8 codes, SR low nibble) + leverage-score '
          'sampling, one sample shared by dX and dW',
          families=('transformer',), reported=_REPORTED)
def int4_transformer(*, bits: int = 4, block: int | None = None, max_block: int = hq.MAX_BLOCK,
                     lss: bool = True, keep_nonzero: bool = False, bs_clamp: int | None = None,
                     lsq_range: tuple[int, int] | None = None, cold_start_steps: int = 0,
                     float_layers: str | None = FLOAT_LAYERS) -> Recipe:
  """Xi et al.'s INT4 training of transformers (see the module doc for the GEMMs).

  Args:
    bits: INT4 width of the LSQ grid and of each bit-split nibble (4; 3..8).
    block: fixed Hadamard block (a power of two dividing every quantized
      layer's D), or None (default) to search it per layer at the first call
      (g ∈ {1, ..., max_block}, App. A.5).
    max_block: largest block searched (1024).
    lss: leverage-score sampling (paper: on).
    keep_nonzero: keep all non-zero rows with p = 1 (released kernels).
    bs_clamp: bit-split nibble clamp: None = 2^(b−1) − 1 (7, unbiased) or
      2^(b−1) − 2 (6, the official code's, biased).
    lsq_range: (−Q_N, Q_P): None = the paper's (−7, 7); (−8, 7) = the code's.
    cold_start_steps: training calls during which the LSQ steps are reset to
      2·mean|x|/√Q_P and not learned (App. A.4, from-scratch training; 0 = off).
    float_layers: regex (fullmatch) of the layers kept float (the zoo's
      classifier 'head'); None quantizes every dense layer.

  Returns:
    Recipe 'int4_transformer' (its `prepare_model` installs the forward hooks).

  Raises:
    TypeError / ValueError: bad options (named).

  Examples:
    >>> from qtrain.recipes.papers.int4_transformer import int4_transformer
    >>> r = int4_transformer()
    >>> r.rules[0].module_path, r.rules[1].config.dlhs.lhs
    ('head', BitSplitLss(bits=4, clamp=7, lss=True, keep_nonzero=False))
  """
  config = int4_transformer_config(bits=bits, lss=lss, keep_nonzero=keep_nonzero,
                                   bs_clamp=bs_clamp)
  narrow = True if lsq_range is None else _lsq_narrow(bits, lsq_range)
  if float_layers is not None and not isinstance(float_layers, str):
    raise TypeError(f'float_layers must be a regex string or None, got {float_layers!r}.')
  # Validate the forward options now rather than at the first call.
  fmt = lsq_linear.check_options(bits=bits, block=block, max_block=max_block, narrow=narrow,
                                 cold_start_steps=cold_start_steps)
  prepare = functools.partial(prepare_model, bits=bits, block=block, max_block=max_block,
                              narrow=narrow, cold_start_steps=cold_start_steps)
  functools.update_wrapper(prepare, prepare_model)
  head = (QuantRule(module_path=float_layers, config=None),) if float_layers else ()
  rules = head + (QuantRule(module_path='.*', config=config),)
  sampling = ('LSS keep-nonzero' if keep_nonzero else 'LSS') if lss else 'no LSS'
  return Recipe(name='int4_transformer', rules=rules, prepare_model=prepare,
                description=f'INT4 transformers (Xi et al. 2023): HQ + LSQ [{fmt.qmin}, '
                            f'{fmt.qmax}] fwd, BS ±{config.dlhs.lhs.clamp} + {sampling} bwd')
