"""The recipe registry: names, papers and formats of every registered `Recipe` function.

A recipe function registers itself with `@register(...)`; the `qtrain` command
(`qtrain recipes`, `qtrain train --recipe`, `qtrain compare --recipes`) and
`get` find it by name. The entry records what a comparison table needs next
to the measured numbers: the paper, the forward and backward formats in
words, the model families the paper showed it on, and the degradations the
paper reports (`ReportedDelta`), so a report can print them beside ours.

Examples:
  >>> from qtrain import recipes
  >>> recipes.get('int8').name
  'int8'
  >>> 'fp32' in recipes.names()
  True
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

from qtrain.recipe import Recipe

__all__ = ['RecipeInfo', 'ReportedDelta', 'register', 'get', 'info', 'names', 'registered',
           'FAMILIES']

# Model families a recipe can declare (the zoo's models belong to one each).
FAMILIES = ('cnn', 'mobilenet', 'transformer')

_NAME = re.compile(r'[a-z][a-z0-9_-]*')


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ReportedDelta:
  """One degradation a paper reports: quantized minus float32, in accuracy points.

  Attributes:
    model: the paper's model, e.g. 'ResNet-18'.
    dataset: the paper's dataset, e.g. 'ImageNet'.
    delta_pp: quantized − float32 top-1 accuracy in percentage points (negative
      = worse), or the paper's metric difference where stated in `metric`.
    metric: what `delta_pp` measures ('top-1' unless said otherwise).
    source: where in the paper (table), for the reader to check.
  """
  model: str
  dataset: str
  delta_pp: float
  metric: str = 'top-1'
  source: str = ''

  def __str__(self) -> str:
    return f'{self.delta_pp:+.2f} pp ({self.model}, {self.dataset})'


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RecipeInfo:
  """A registry entry.

  Attributes:
    name: registry name; `factory()` returns a Recipe with this name.
    factory: the recipe function, called without arguments for the paper's
      defaults.
    paper: short citation ('' for baselines).
    forward: forward formats in words, e.g. 'INT4 SAWB, RTN'.
    backward: backward (gradient) formats in words.
    families: model families the method was shown on (subset of `FAMILIES`).
    reported: degradations the paper reports.
    kind: 'train' (a `qtrain.Recipe` for training; `qtrain train` and
      `qtrain compare` run it) or 'ptq' (a post-training `qtrain.ptq.PtqRecipe`
      for `qtrain.ptq.calibrate`; never trained).
    variant: a named variant of another entry (e.g. 'statquant-bhq4'):
      `qtrain compare` runs it only when asked for by name.
  """
  name: str
  factory: Callable[[], Recipe]
  paper: str
  forward: str
  backward: str
  families: tuple[str, ...]
  reported: tuple[ReportedDelta, ...] = ()
  kind: str = 'train'
  variant: bool = False

  def build(self) -> Recipe:
    """Calls the factory with its defaults; checks the type it returns."""
    recipe = self.factory()
    if self.kind == 'train' and not isinstance(recipe, Recipe):
      raise TypeError(f'recipe {self.name!r}: factory returned {type(recipe).__name__}, '
                      'not a qtrain.Recipe.')
    if self.kind == 'ptq' and type(recipe).__name__ != 'PtqRecipe':
      raise TypeError(f'recipe {self.name!r}: factory returned {type(recipe).__name__}, '
                      'not a qtrain.ptq.PtqRecipe.')
    return recipe

  def check_trainable(self) -> None:
    """Raises ValueError if this entry cannot be trained (a post-training recipe)."""
    if self.kind != 'train':
      raise ValueError(f'recipe {self.name!r} is a post-training ({self.kind}) recipe: it '
                       'quantizes a trained model and is not trained; use '
                       'qtrain.ptq.calibrate(model, batches, qtrain.recipes.get('
                       f'{self.name!r})) (or benchmarks/fq_vit_ptq.py).')


_REGISTRY: dict[str, RecipeInfo] = {}


def register(name: str, *, paper: str = '', forward: str, backward: str,
             families: tuple[str, ...] = ('cnn',),
             reported: tuple[ReportedDelta, ...] = (), kind: str = 'train',
             variant: bool = False) -> Callable:
  """Decorator registering a recipe function under `name`.

  Args:
    name: lower-case registry name ([a-z][a-z0-9_-]*), unique.
    paper: short citation of the paper ('' for baselines).
    forward: forward formats in words.
    backward: backward formats in words.
    families: model families the paper showed the method on.
    reported: the paper's reported degradations.
    kind: 'train' or 'ptq' (see `RecipeInfo`).
    variant: a named variant, run by `qtrain compare` only when named.

  Returns:
    A decorator returning the function unchanged.

  Raises:
    ValueError: bad or duplicate name, unknown family.
  """
  if not isinstance(name, str) or not _NAME.fullmatch(name):
    raise ValueError(f'recipe name {name!r} must match {_NAME.pattern}.')
  families = tuple(families)
  bad = [f for f in families if f not in FAMILIES]
  if bad or not families:
    raise ValueError(f'families {families!r} must be a non-empty subset of {FAMILIES}.')
  for r in reported:
    if not isinstance(r, ReportedDelta):
      raise TypeError(f'reported must hold ReportedDelta values, got {r!r}.')
  if kind not in ('train', 'ptq'):
    raise ValueError(f"kind={kind!r} is unknown; allowed: 'train', 'ptq'.")
  if not isinstance(variant, bool):
    raise TypeError(f'variant must be a bool, got {variant!r}.')

  def decorator(fn: Callable[[], Recipe]) -> Callable[[], Recipe]:
    if name in _REGISTRY and _REGISTRY[name].factory is not fn:
      raise ValueError(f'recipe {name!r} is registered already (by '
                       f'{_REGISTRY[name].factory.__module__}).')
    _REGISTRY[name] = RecipeInfo(name=name, factory=fn, paper=paper, forward=forward,
                                 backward=backward, families=families, reported=tuple(reported),
                                 kind=kind, variant=variant)
    return fn

  return decorator


def names() -> tuple[str, ...]:
  """Registered names, in registration order (baselines first)."""
  return tuple(_REGISTRY)


def registered() -> tuple[RecipeInfo, ...]:
  """Every registry entry, in registration order."""
  return tuple(_REGISTRY.values())


def info(name: str) -> RecipeInfo:
  """The entry of `name`.

  Raises:
    ValueError: unknown name; the message lists the registered ones.
  """
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(f'unknown recipe {name!r}; registered: {", ".join(_REGISTRY)}.') from None


def get(name: str):
  """The recipe `name` with its paper's defaults (`info(name).build()`).

  A 'train' entry gives a `qtrain.Recipe`, a 'ptq' entry a `qtrain.ptq.PtqRecipe`.

  Raises:
    ValueError: unknown name; the message lists the registered ones.
  """
  return info(name).build()
