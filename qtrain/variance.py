"""Gradient variance diagnostic: minibatch-sampling vs quantization variance, per parameter.

StatQuant (Chen et al., NeurIPS 2020) shows that the fully quantized
(FQT) gradient is an unbiased estimate of the QAT gradient (same forward,
exact backward) and that its variance splits into the QAT gradient's
minibatch-sampling variance plus a quantization term; gradient quantization
is harmless while the second is small against the first. `measure_variance`
measures that split for any recipe, the way the official
`image_classification/debug.py::fast_dump_2` does:

| quantity     | definition (per parameter, summed over its elements)                 |
|--------------|-----------------------------------------------------------------------|
| `grad_norm_sq` | ‖ḡ‖², ḡ = mean over batches b of the QAT gradient g_b              |
| `sample_var` | mean_b ‖g_b − ḡ‖² (QAT gradient, exact backward)                       |
| `quant_var`  | mean_{b,r} ‖ĝ_{b,r} − g_b‖², ĝ_{b,r} = FQT gradient of batch b, key r  |
| `overall_var`| sample_var + quant_var                                                |

The QAT counterpart of a recipe (`qat_counterpart`) keeps every forward
rule and sets the dY slots of every DotConfig to None (exact backward GEMMs
on the forward codes). Each gradient is computed on a functional copy of the
model (`nnx.split`/`merge` under `jax.jit`): BatchNorm statistics, gradient
states and RNG counters of the caller's model never change; the 'quant'
stream is reseeded per (batch, repeat), so every repeat draws new noise.

Example:
  >>> report = measure_variance(model, loss, batches, recipes.get('statquant'))  # doctest: +SKIP
  >>> print(report)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qtrain import _matching
from qtrain import config as cfgs
from qtrain import nnx_hooks
from qtrain import recipes as recipe_registry
from qtrain.model import quantize_model
from qtrain.recipe import Recipe
from qtrain.rules import QuantRule

__all__ = ['LayerVariance', 'VarianceReport', 'measure_variance', 'qat_counterpart',
           'qat_config']


class LayerVariance(NamedTuple):
  """The variance split of one parameter (see the module table).

  Attributes:
    path: parameter path, e.g. 'conv2/kernel'.
    quantized: whether the layer owning it has a quantized op (a qtrain hook).
    size: number of elements.
    grad_norm_sq: ‖mean QAT gradient‖².
    sample_var: minibatch-sampling variance of the QAT gradient (summed).
    quant_var: quantization variance of the FQT gradient around the QAT one (summed).
  """
  path: str
  quantized: bool
  size: int
  grad_norm_sq: float
  sample_var: float
  quant_var: float

  @property
  def overall_var(self) -> float:
    return self.sample_var + self.quant_var


@dataclasses.dataclass(frozen=True, kw_only=True)
class VarianceReport:
  """Per-parameter variance split plus totals (`measure_variance`).

  Attributes:
    recipe: name of the recipe measured.
    layers: one LayerVariance per parameter, in the model's state order.
    num_batches: batches the sampling variance is taken over.
    repeats: quantization keys per batch.
  """
  recipe: str
  layers: tuple[LayerVariance, ...]
  num_batches: int
  repeats: int

  @property
  def sample_var(self) -> float:
    return float(sum(v.sample_var for v in self.layers))

  @property
  def quant_var(self) -> float:
    return float(sum(v.quant_var for v in self.layers))

  @property
  def overall_var(self) -> float:
    return self.sample_var + self.quant_var

  @property
  def grad_norm_sq(self) -> float:
    return float(sum(v.grad_norm_sq for v in self.layers))

  def layer(self, path: str) -> LayerVariance:
    """The entry of parameter `path`; KeyError listing the paths otherwise."""
    for v in self.layers:
      if v.path == path:
        return v
    raise KeyError(f'no parameter {path!r}; paths: {", ".join(v.path for v in self.layers)}.')

  def format_table(self, *, quantized_only: bool = False) -> str:
    """A fixed-width table: one row per parameter, then the totals.

    Args:
      quantized_only: list only the parameters of quantized layers (the
        totals still cover every parameter).

    Returns:
      The table as a string (no trailing newline).
    """
    head = ('parameter', 'q', 'size', '|mean g|^2', 'sample var', 'quant var', 'overall var',
            'quant/sample')
    rows = []
    for v in self.layers:
      if quantized_only and not v.quantized:
        continue
      rows.append((v.path, 'y' if v.quantized else '-', str(v.size), f'{v.grad_norm_sq:.3e}',
                   f'{v.sample_var:.3e}', f'{v.quant_var:.3e}', f'{v.overall_var:.3e}',
                   _ratio(v.quant_var, v.sample_var)))
    rows.append(('total', '', str(sum(v.size for v in self.layers)), f'{self.grad_norm_sq:.3e}',
                 f'{self.sample_var:.3e}', f'{self.quant_var:.3e}', f'{self.overall_var:.3e}',
                 _ratio(self.quant_var, self.sample_var)))
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    fmt = lambda r: '  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                              for i, (c, w) in enumerate(zip(r, widths)))
    title = (f'Gradient variance of {self.recipe!r}: {self.num_batches} batches (sampling), '
             f'{self.repeats} keys per batch (quantization)')
    rule = '-' * len(fmt(head))
    return '\n'.join([title, fmt(head), rule] + [fmt(r) for r in rows[:-1]] + [rule,
                                                                                fmt(rows[-1])])

  def __str__(self) -> str:
    return self.format_table()


def _ratio(a: float, b: float) -> str:
  return f'{a / b:.3g}' if b > 0 else ('0' if a == 0 else 'inf')


# ---------------------------------------------------------------------------
# the QAT counterpart of a recipe
# ---------------------------------------------------------------------------
def qat_config(config: cfgs.DotConfig | None) -> cfgs.DotConfig | None:
  """`config` with float dY in both backward GEMMs: the QAT counterpart of one layer.

  The forward rules stay; the dY slots become None, the residual slots
  REUSE (the backward multiplies by the forward's codes: the straight-through
  QAT gradient), unless REUSE is invalid there (a forward rule with
  samples > 1), where the residual rule is kept.

  Args:
    config: a DotConfig or None (float layer).

  Returns:
    The QAT DotConfig, or None.
  """
  if config is None:
    return None
  if not isinstance(config, cfgs.DotConfig):
    raise TypeError(f'config must be a qtrain.DotConfig or None, got {config!r}.')
  base = dataclasses.replace(config, dlhs=dataclasses.replace(config.dlhs, lhs=None),
                             drhs=dataclasses.replace(config.drhs, rhs=None),
                             share_gradient_sample=False)
  try:
    return dataclasses.replace(base, dlhs=dataclasses.replace(base.dlhs, rhs=cfgs.REUSE),
                               drhs=dataclasses.replace(base.drhs, lhs=cfgs.REUSE))
  except ValueError:
    return base


def _qat_rules(rules: tuple[QuantRule, ...]) -> tuple[QuantRule, ...]:
  return tuple(dataclasses.replace(r, config=qat_config(r.config)) for r in rules)


def qat_counterpart(recipe: Recipe | Sequence[QuantRule] | cfgs.DotConfig | str):
  """The QAT counterpart of a recipe: same forward, exact backward (float dY).

  Every DotConfig of the rules goes through `qat_config`. A Recipe keeps its
  other parts (`prepare_model` included: a backward quantizer that it
  installs outside the DotConfigs, such as WAGEUBN's E1/E2 hooks, stays on,
  as do gradient/optimizer transforms, which this module does not apply).

  Args:
    recipe: a Recipe, a registered recipe name, a sequence of QuantRule, or
      one DotConfig.

  Returns:
    The same kind of value (a name gives a Recipe) named '<name>-qat'.
  """
  if isinstance(recipe, str):
    recipe = recipe_registry.get(recipe)
  if isinstance(recipe, Recipe):
    final = None if recipe.final_rules is None else _qat_rules(recipe.final_rules)
    return recipe.replace(name=f'{recipe.name}-qat', rules=_qat_rules(recipe.rules),
                          final_rules=final)
  if isinstance(recipe, cfgs.DotConfig):
    return qat_config(recipe)
  return _qat_rules(_matching.normalize_rules(recipe))


# ---------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------
def _loss_value(out):
  return out[0] if isinstance(out, (tuple, list)) else out


def _as_batch(batch) -> tuple:
  return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _quantized_owners(model) -> set[str]:
  owners = set()
  for path, module in nnx.iter_modules(model):
    if isinstance(module, nnx_hooks.HOOK_TYPES):
      owners.add('/'.join(map(str, path[:-1])))
  return owners


def _gradient_fn(loss_fn: Callable):

  def grads(graphdef, state, batch, key):
    model = nnx.merge(graphdef, state)  # a copy: nothing flows back to the caller
    nnx.reseed(model, quant=key)
    g = nnx.grad(lambda m: _loss_value(loss_fn(m, *batch)))(model)
    flat = nnx.to_flat_state(nnx.state(g, nnx.Param))
    return {'/'.join(map(str, p)): v.get_value() for p, v in flat}

  return jax.jit(grads, static_argnums=0)


def _prepare(model, recipe, seed: int, loss_fn, batch):
  copy = quantize_model(nnx.clone(model), recipe, rngs=nnx.Rngs(quant=seed))
  scalar = lambda m, *b: _loss_value(loss_fn(m, *b))
  nnx_hooks.init_grad_state(scalar, copy, *batch)  # stateful dY rules use their initial state
  return copy


def _check_int(name: str, value, lo: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < lo:
    raise ValueError(f'{name}={value!r} must be an int >= {lo}.')
  return value


def measure_variance(model: nnx.Module, loss_fn: Callable[..., Any], batches: Sequence[Any],
                     recipe: Recipe | Sequence[QuantRule] | cfgs.DotConfig | str, *,
                     repeats: int = 10, seed: int = 0) -> VarianceReport:
  """Measures the sampling / quantization split of the gradient variance of `recipe`.

  For every batch b: the QAT gradient g_b (the recipe's forward, exact
  backward; `qat_counterpart`) once, and the recipe's own (FQT) gradient
  ĝ_{b,r} for `repeats` quantization keys r. Then per parameter (module
  table): ‖ḡ‖², sample var = mean_b ‖g_b − ḡ‖², quant var = mean_{b,r}
  ‖ĝ_{b,r} − g_b‖² (`debug.py::fast_dump_2` of the StatQuant code: 1/n
  normalisation, sums over elements). Cost: num_batches·(repeats + 1)
  gradient evaluations, two compilations.

  The caller's model is not changed: both recipes are applied to clones,
  and every gradient runs on a functional copy (BatchNorm statistics in
  training mode update only the copy). The model's mode (train/eval) is
  used as it is. A stateful dY rule (DA-INT8's EMA) uses its initial state
  throughout. A recipe whose forward is stochastic draws different forward
  noise in the QAT and FQT passes (this is then part of quant var).
  `gradient_transforms` of a recipe are not applied: the raw gradients are
  measured.

  Args:
    model: an NNX model (float or quantized by an earlier `quantize_model`;
      the recipe's rules replace its hooks on the clones).
    loss_fn: `loss_fn(model, *batch)` -> scalar loss, or a tuple whose first
      element is the loss (the `qtrain.tasks` losses take the batch as one
      tuple: wrap them, `lambda m, *b: task.loss(m, b)`).
    batches: a sequence of batches; each a tuple of `loss_fn` arguments (a
      single array is taken as a 1-tuple). Same shapes for all. Sampling
      variance needs >= 2 batches (it is 0 with one).
    recipe: a Recipe, a registered name, QuantRules or one DotConfig.
    repeats: quantization keys per batch (>= 1).
    seed: seed of the quantization keys.

  Returns:
    A VarianceReport (print it for a table).

  Raises:
    TypeError: model is not an NNX module.
    ValueError: no batches, repeats < 1, a negative seed.
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f'model must be a flax.nnx.Module, got {type(model).__name__}.')
  _check_int('repeats', repeats, 1)
  _check_int('seed', seed, 0)
  batches = [_as_batch(b) for b in batches]
  if not batches:
    raise ValueError('batches is empty; give at least one batch (two for a sampling variance).')
  if isinstance(recipe, str):
    recipe = recipe_registry.get(recipe)
  name = recipe.name if isinstance(recipe, Recipe) else 'rules'
  qat = _prepare(model, qat_counterpart(recipe), seed, loss_fn, batches[0])
  fqt = _prepare(model, recipe, seed, loss_fn, batches[0])
  owners = _quantized_owners(fqt)
  fn = _gradient_fn(loss_fn)
  qat_def, qat_state = nnx.split(qat)
  fqt_def, fqt_state = nnx.split(fqt)
  base = jax.random.key(seed)
  qat_grads, quant = [], {}
  for b, batch in enumerate(batches):
    batch = tuple(jnp.asarray(p) for p in batch)
    kb = jax.random.fold_in(base, b)
    g = {k: np.asarray(v, np.float64) for k, v in fn(qat_def, qat_state, batch,
                                                        jax.random.fold_in(kb, 0)).items()}
    qat_grads.append(g)
    for r in range(repeats):
      gq = fn(fqt_def, fqt_state, batch, jax.random.fold_in(kb, r + 1))
      for k, v in gq.items():
        quant[k] = quant.get(k, 0.0) + float(np.sum((np.asarray(v, np.float64) - g[k]) ** 2))
  layers = []
  for k in qat_grads[0]:
    stack = np.stack([g[k] for g in qat_grads])
    mean = stack.mean(axis=0)
    layers.append(LayerVariance(
        path=k, quantized=k.rsplit('/', 1)[0] in owners if '/' in k else False,
        size=int(mean.size), grad_norm_sq=float(np.sum(mean ** 2)),
        sample_var=float(np.sum((stack - mean) ** 2) / len(batches)),
        quant_var=quant[k] / (len(batches) * repeats)))
  return VarianceReport(recipe=name, layers=tuple(layers), num_batches=len(batches),
                        repeats=repeats)
