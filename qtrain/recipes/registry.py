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
  """
  name: str
  factory: Callable[[], Recipe]
  paper: str
  forward: str
  backward: str
  families: tuple[str, ...]
  reported: tuple[ReportedDelta, ...] = ()

  def build(self) -> Recipe:
    """Calls the factory with its defaults; checks the name it returns."""
    recipe = self.factory()
    if not isinstance(recipe, Recipe):
      raise TypeError(f'recipe {self.name!r}: factory returned {type(recipe).__name__}, '
                      'not a qtrain.Recipe.')
    return recipe


_REGISTRY: dict[str, RecipeInfo] = {}


def register(name: str, *, paper: str = '', forward: str, backward: str,
             families: tuple[str, ...] = ('cnn',),
             reported: tuple[ReportedDelta, ...] = ()) -> Callable:
  """Decorator registering a recipe function under `name`.

  Args:
    name: lower-case registry name ([a-z][a-z0-9_-]*), unique.
    paper: short citation of the paper ('' for baselines).
    forward: forward formats in words.
    backward: backward formats in words.
    families: model families the paper showed the method on.
    reported: the paper's reported degradations.

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

  def decorator(fn: Callable[[], Recipe]) -> Callable[[], Recipe]:
    if name in _REGISTRY and _REGISTRY[name].factory is not fn:
      raise ValueError(f'recipe {name!r} is registered already (by '
                       f'{_REGISTRY[name].factory.__module__}).')
    _REGISTRY[name] = RecipeInfo(name=name, factory=fn, paper=paper, forward=forward,
                                 backward=backward, families=families, reported=tuple(reported))
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


def get(name: str) -> Recipe:
  """The recipe `name` with its paper's defaults (`info(name).build()`).

  Raises:
    ValueError: unknown name; the message lists the registered ones.
  """
  return info(name).build()
