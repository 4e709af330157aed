"""Ready-made `qtrain.Recipe`s, one function each.

The recipes here are plain baselines, one `DotConfig` from `qtrain.presets`
for every layer and no optimizer transforms:

| function | layers                                     | optimizer | schedule |
|----------|--------------------------------------------|-----------|----------|
| `fp32`   | all float                                  | as given  | —        |
| `int8`   | `presets.int8()`: INT8 fwd, INT8 SR bwd    | as given  | —        |
| `int4`   | `presets.int4()`: INT4 SAWB fwd, LUQ bwd   | as given  | —        |

The papers' recipes (`luq()`, `ultra_low()`, `wageubn()`, `unified_int8()`,
`da_int8()`, `statquant()`, `int4_transformer()`, and the post-training
`fq_vit()`, a `qtrain.ptq.PtqRecipe`) live in one module each under
`qtrain.recipes.papers` and are re-exported here, each with the paper's
defaults (float first/last layers, optimizer transforms, schedules) and a
docstring citing it. Start from any recipe and swap one part with
`recipe.replace(...)`.

Every recipe function registers itself (`register`, in
`qtrain.recipes.registry`) with its paper, formats and model families; the
`qtrain` command finds recipes by name there (`get`, `names`, `registered`).

Examples:
  >>> from qtrain import recipes
  >>> print(recipes.fp32())
  Recipe 'fp32': float32 baseline, no quantization
    rules (first match wins):
      0: '.*' -> float
    optimizer transforms (after the optimizer): none
"""

from __future__ import annotations

from qtrain import presets
from qtrain.recipe import Recipe
from qtrain.recipes.registry import (FAMILIES, RecipeInfo, ReportedDelta, get, info, names,
                                     register, registered)
from qtrain.rules import QuantRule

__all__ = ['fp32', 'int8', 'int4', 'FAMILIES', 'RecipeInfo', 'ReportedDelta', 'get', 'info',
           'names', 'register', 'registered']

_ALL_FAMILIES = ('cnn', 'mobilenet', 'transformer')


@register('fp32', forward='float32', backward='float32', families=_ALL_FAMILIES)
def fp32() -> Recipe:
  """The float baseline: every layer in high precision, no optimizer transforms.

  Returns:
    Recipe 'fp32' with the single rule `QuantRule(module_path='.*', config=None)`.
  """
  return Recipe(name='fp32', rules=(QuantRule(module_path='.*', config=None),),
                description='float32 baseline, no quantization')


@register('int8', forward='INT8 absmax, RTN', backward='INT8 absmax, SR', families=_ALL_FAMILIES)
def int8(*, per_channel_weights: bool = False) -> Recipe:
  """Plain INT8 training of every layer (a baseline, not a paper recipe).

  Forward: INT8 absmax, round-to-nearest, for activations and weights.
  Backward: INT8 absmax gradients with stochastic rounding, independent noise
  for the dX and dW GEMMs, forward codes reused (`presets.int8`). No layer is
  kept in float and no optimizer transform is added; Unified INT8 and
  Distribution-adaptive INT8 add clipping, LR scaling and float first/last
  layers in their own recipes.

  Args:
    per_channel_weights: one weight scale per output channel instead of one
      per tensor.

  Returns:
    Recipe 'int8' (or 'int8-per-channel') with one rule '.*'.

  Raises:
    TypeError: `per_channel_weights` is not a bool.
  """
  if not isinstance(per_channel_weights, bool):
    raise TypeError(f'per_channel_weights must be a bool, got {per_channel_weights!r}.')
  name = 'int8-per-channel' if per_channel_weights else 'int8'
  config = presets.int8(per_channel_weights=per_channel_weights)
  return Recipe(name=name, rules=(QuantRule(module_path='.*', config=config),),
                description='INT8 forward (RTN), INT8 backward (SR), every layer')


@register('int4', forward='INT4 SAWB, RTN', backward='radix-2 log FP4 (LUQ), SR',
          families=_ALL_FAMILIES)
def int4() -> Recipe:
  """Plain 4-bit training of every layer with LUQ's numerics (a baseline).

  Forward: INT4 with a SAWB scale, round-to-nearest. Backward: radix-2 log
  FP4 (LUQ) with stochastic underflow and rounding, one gradient sample
  shared by both backward GEMMs (`presets.int4`). Unlike the LUQ paper recipe
  (`qtrain.recipes.luq()`), no layer is kept in float, there is no
  SMP and no high-precision fine-tuning.

  Returns:
    Recipe 'int4' with one rule '.*'.
  """
  return Recipe(name='int4', rules=(QuantRule(module_path='.*', config=presets.int4()),),
                description='INT4 SAWB forward (RTN), LUQ log-FP4 backward (SR), every layer')


# The paper recipes, one module each; importing them registers them.
# pylint: disable=wrong-import-position
# (qtrain.recipes.papers.<paper>; the other parts stay there.)
from qtrain.recipes.papers.luq import fnt_schedule, luq  # noqa: E402
from qtrain.recipes.papers.ultra_low import ultra_low  # noqa: E402
from qtrain.recipes.papers.unified_int8 import unified_int8  # noqa: E402
from qtrain.recipes.papers.da_int8 import da_int8  # noqa: E402
from qtrain.recipes.papers.wageubn import wageubn  # noqa: E402
from qtrain.recipes.papers.statquant import statquant  # noqa: E402
from qtrain.recipes.papers.int4_transformer import int4_transformer  # noqa: E402
from qtrain.recipes.papers.fq_vit import fq_vit  # noqa: E402

__all__ += ['luq', 'fnt_schedule', 'ultra_low', 'unified_int8', 'da_int8', 'wageubn',
            'statquant', 'int4_transformer', 'fq_vit']
