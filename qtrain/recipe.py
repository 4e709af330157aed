"""`Recipe`: one training method as a frozen value (rules + optimizer transforms + schedule).

A recipe bundles what a paper changes about training:

* `rules`: which layers get which `DotConfig` (`QuantRule`s, first match wins),
  the model side, applied by `quantize_model` / the NNX hooks;
* `gradient_transforms`: optax transforms chained *before* the user's
  optimizer, i.e. on the raw gradients (WAGEUBN's weight-gradient
  quantizer G);
* `optimizer_transforms`: optax transforms chained *after* the user's
  optimizer (`qtrain.optim`: 24-bit weights, 13-bit momentum, ...), the
  optimizer side;
* schedule hooks: `float_last_steps` switches to `final_rules` (default: all
  float) for the last N steps (LUQ's high-precision fine-tuning, FNT).

Recipes are built like optax optimizers: small named parts, each a frozen
value that can be printed, compared and swapped. Change one part with
`recipe.replace(rules=...)` (= `dataclasses.replace`); validation runs again.
Paper recipes are functions in `qtrain.recipes` returning a `Recipe`.

Examples:
  >>> from qtrain import recipes
  >>> r = recipes.int8()
  >>> r.replace(name='int8-fnt', float_last_steps=100).float_last_steps
  100
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import optax

from qtrain import config as cfgs
from qtrain import formats as fmts
from qtrain import scaling
from qtrain.rules import QuantRule

__all__ = ['Recipe']


def _as_tuple(name: str, value, item_type: type, item_name: str) -> tuple:
  """`value` as a tuple of `item_type`; a single item or a string is refused."""
  if isinstance(value, (item_type, str)) or not isinstance(value, Sequence):
    raise TypeError(f'{name} must be a tuple of {item_name}, got {value!r}.')
  bad = [(i, v) for i, v in enumerate(value) if not isinstance(v, item_type)]
  if bad:
    i, v = bad[0]
    raise TypeError(f'{name}[{i}] must be a {item_name}, got {v!r}.')
  return tuple(value)


def _check_int(name: str, value, lo: int) -> int:
  # operator.index accepts Python and NumPy ints and concrete integer jax
  # arrays, and refuses floats and traced values (rules are static).
  if isinstance(value, bool):
    raise TypeError(f'{name} must be an int, got {value!r}.')
  try:
    value = operator.index(value)
  except TypeError as e:
    raise TypeError(f'{name} must be an int (a concrete value: choose rules outside jit), '
                    f'got {value!r}.') from e
  if value < lo:
    raise ValueError(f'{name}={value} must be >= {lo}.')
  return value


def _short_repr(obj) -> str:
  """'Sawb()' rather than 'Sawb(c1=None, c2=None)' when every field is at its default."""
  fields = dataclasses.fields(obj) if dataclasses.is_dataclass(obj) else ()
  if all(f.default is not dataclasses.MISSING and getattr(obj, f.name) == f.default
         for f in fields):
    return f'{type(obj).__name__}()'
  return repr(obj)


def _describe_tensor(t: cfgs.OperandConfig) -> str:
  if t is None:
    return 'float'
  if isinstance(t, cfgs.Reuse):
    return 'reuse'
  if isinstance(t, cfgs.GradientEstimator):
    return _short_repr(t)
  parts = [t.format.name]
  if t.stochastic:
    parts.append('SR')
  if t.samples > 1:
    parts.append(f'x{t.samples}')
  # Only a calibration other than TensorConfig's default is worth a word.
  default = (scaling.FixedScale(value=t.format.step)
             if isinstance(t.format, fmts.FixedPointFormat) else scaling.AbsMax())
  if t.calibration != default:
    parts.append(_short_repr(t.calibration))
  if not isinstance(t.granularity, scaling.PerTensor):
    parts.append(repr(t.granularity))
  return ' '.join(parts)


def _describe_dot(c: cfgs.DotConfig | None) -> str:
  if c is None:
    return 'float'
  text = (f'fwd x:{_describe_tensor(c.fwd.lhs)} w:{_describe_tensor(c.fwd.rhs)} | '
          f'dlhs dy:{_describe_tensor(c.dlhs.lhs)} w:{_describe_tensor(c.dlhs.rhs)} | '
          f'drhs x:{_describe_tensor(c.drhs.lhs)} dy:{_describe_tensor(c.drhs.rhs)}')
  return text + (' | shared dy sample' if c.share_gradient_sample else '')


def _rule_lines(rules: tuple[QuantRule, ...]) -> list[str]:
  lines = []
  for i, rule in enumerate(rules):
    kinds = f" [{', '.join(rule.op_kinds)}]" if rule.op_kinds else ''
    lines.append(f'    {i}: {rule.module_path!r}{kinds} -> {_describe_dot(rule.config)}')
  return lines


def _transform_name(tx: optax.GradientTransformation) -> str:
  # A GradientTransformation carries no name; the factory's name is the first
  # component of its closures' qualified name ('quantize_updates.<locals>...').
  qualname = getattr(tx.update, '__qualname__', '') or type(tx).__name__
  return qualname.split('.<locals>')[0]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Recipe:
  """A quantized-training method: layer rules, optimizer transforms, schedule.

  Frozen and hashable; change a part with `replace(...)` (validated again).
  Equality compares the rules by value and the optimizer transforms by
  identity (they hold functions).

  Attributes:
    name: short identifier, e.g. 'int8' or 'luq'.
    rules: `QuantRule`s tried in order, first match wins (a list is stored as
      a tuple). A rule with `config=None` keeps its layers in float.
    optimizer_transforms: optax transforms chained after the user's optimizer
      by `wrap_optimizer` (a list is stored as a tuple).
    gradient_transforms: optax transforms chained before the user's
      optimizer by `wrap_optimizer`: they see the raw gradients.
    float_last_steps: during the last N steps of a run the layers follow
      `final_rules` (`rules_at`), the schedule of LUQ's high-precision
      fine-tuning (FNT). 0 = never. Gradient and optimizer transforms stay on.
    final_rules: the rules of the final phase; None = `rules` with every
      config None (all float, same paths matched). LUQ's FNT keeps the
      weights in INT4 and gives them here.
    optimizer: the paper's own base optimizer as a function of the learning
      rate (e.g. WAGEUBN's SGD with momentum 0.25 on a 10-bit LR), used by
      the training loop instead of its default; None = the loop's default.
      Gradient and optimizer transforms wrap it as any other optimizer.
    default_lr: the learning rate the paper runs `optimizer` at, used by
      `qtrain.train` when the user gives none; None = the loop's default.
    prepare_model: a function applied in place to an NNX model after its
      rules are installed, for what rules cannot express (WAGEUBN's
      quantized BatchNorm and error quantizers). `quantize_model(model,
      recipe)` and `qtrain.train` call it; None = nothing to do.
    update_args: a function of the model returning extra keyword arguments
      for `optimizer.update(model, grads, **update_args(model))`, read after
      the backward pass has written the per-layer gradient state (UI8: each
      layer's DSGC deviation for `clipping.scale_by_deviation`). The
      training loop (`qtrain.train.make_train_step`) calls it inside the
      jitted step; None = no extra arguments.
    description: free text, e.g. the paper reference.
  """
  name: str
  rules: tuple[QuantRule, ...]
  optimizer_transforms: tuple[optax.GradientTransformation, ...] = ()
  gradient_transforms: tuple[optax.GradientTransformation, ...] = ()
  float_last_steps: int = 0
  final_rules: tuple[QuantRule, ...] | None = None
  optimizer: Callable[[float], optax.GradientTransformation] | None = None
  default_lr: float | None = None
  prepare_model: Callable[[Any], Any] | None = None
  update_args: Callable[[Any], dict] | None = None
  description: str = ''

  def __post_init__(self):
    if not isinstance(self.name, str):
      raise TypeError(f'name must be a str, got {self.name!r}.')
    if not self.name:
      raise ValueError('name must not be empty.')
    rules = _as_tuple('rules', self.rules, QuantRule, 'qtrain.QuantRule')
    if not rules:
      raise ValueError("rules is empty; use (QuantRule(module_path='.*', config=None),) "
                       'for an all-float recipe.')
    object.__setattr__(self, 'rules', rules)
    object.__setattr__(self, 'optimizer_transforms', _as_tuple(
        'optimizer_transforms', self.optimizer_transforms, optax.GradientTransformation,
        'optax.GradientTransformation'))
    object.__setattr__(self, 'gradient_transforms', _as_tuple(
        'gradient_transforms', self.gradient_transforms, optax.GradientTransformation,
        'optax.GradientTransformation'))
    if self.final_rules is not None:
      final = _as_tuple('final_rules', self.final_rules, QuantRule, 'qtrain.QuantRule')
      if not final:
        raise ValueError('final_rules is empty; use None for all-float final steps.')
      object.__setattr__(self, 'final_rules', final)
    object.__setattr__(self, 'float_last_steps',
                       _check_int('float_last_steps', self.float_last_steps, 0))
    if self.optimizer is not None and not callable(self.optimizer):
      raise TypeError(f'optimizer must be a function of the learning rate or None, got '
                      f'{self.optimizer!r}.')
    if self.default_lr is not None and not (
        isinstance(self.default_lr, (int, float)) and not isinstance(self.default_lr, bool)
        and math.isfinite(self.default_lr) and self.default_lr > 0):
      raise ValueError(f'default_lr={self.default_lr!r} must be None or a positive number.')
    if self.prepare_model is not None and not callable(self.prepare_model):
      raise TypeError(f'prepare_model must be a function of the model or None, got '
                      f'{self.prepare_model!r}.')
    if self.update_args is not None and not callable(self.update_args):
      raise TypeError(f'update_args must be a function of the model or None, got '
                      f'{self.update_args!r}.')
    if not isinstance(self.description, str):
      raise TypeError(f'description must be a str, got {self.description!r}.')

  def replace(self, **changes) -> Recipe:
    """Returns a copy with `changes` applied (`dataclasses.replace`; validated again).

    Args:
      **changes: field values, e.g. `rules=(...)` or `float_last_steps=500`.

    Returns:
      A new Recipe.

    Raises:
      TypeError: an unknown field or a value of the wrong type.
      ValueError: as the constructor.
    """
    return dataclasses.replace(self, **changes)

  def wrap_optimizer(self, optimizer: optax.GradientTransformation
                     ) -> optax.GradientTransformationExtraArgs:
    """Returns `optax.chain(*gradient_transforms, optimizer, *optimizer_transforms)`.

    Always a chain, also without transforms, so the optimizer state's
    structure is `(*gradient_states, optimizer_state, *transform_states)`
    for every recipe.

    Args:
      optimizer: the user's optimizer, e.g. `optax.sgd(0.1, momentum=0.9)`.

    Returns:
      The chained `optax.GradientTransformationExtraArgs`.

    Raises:
      TypeError: `optimizer` is not an optax.GradientTransformation.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from qtrain import recipes
      >>> tx = recipes.fp32().wrap_optimizer(optax.sgd(0.5))
      >>> updates, _ = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
      >>> updates.tolist()
      [-0.5, -0.5]
    """
    if not isinstance(optimizer, optax.GradientTransformation):
      raise TypeError(f'optimizer must be an optax.GradientTransformation, got {optimizer!r}.')
    return optax.chain(*self.gradient_transforms, optimizer, *self.optimizer_transforms)

  def float_at(self, step: int, total_steps: int) -> bool:
    """Whether `step` (0-based, of `total_steps`) is in the final float phase.

    Args:
      step: the current step, 0 <= step < total_steps.
      total_steps: steps in the whole run, >= 1 and > float_last_steps.

    Returns:
      True during the last `float_last_steps` steps.

    Raises:
      TypeError: `step` or `total_steps` is not a concrete int.
      ValueError: out of range, or `float_last_steps >= total_steps` (a run
        without a single quantized step is almost surely a mistake).
    """
    step = _check_int('step', step, 0)
    total_steps = _check_int('total_steps', total_steps, 1)
    if step >= total_steps:
      raise ValueError(f'step={step} must be < total_steps={total_steps}.')
    if self.float_last_steps >= total_steps:
      raise ValueError(f'float_last_steps={self.float_last_steps} >= total_steps='
                       f'{total_steps}: no step would be quantized.')
    return step >= total_steps - self.float_last_steps

  def rules_at(self, step: int, total_steps: int) -> tuple[QuantRule, ...]:
    """The rules to use at `step` of a run of `total_steps` steps.

    Outside the final phase these are `self.rules`. During the last
    `float_last_steps` steps they are `final_rules`, or when that is None the
    same rules with `config=None`: every layer float, the same module paths
    matched (so `quantize_model`'s report and unused-rule check look the same
    in both phases). Rules are
    static: switching them means re-applying them to the model (a new trace),
    once, at step `total_steps - float_last_steps`.

    Args:
      step: the current step, 0 <= step < total_steps (a Python or NumPy int).
      total_steps: steps in the whole run, > float_last_steps.

    Returns:
      A tuple of QuantRule.

    Raises:
      TypeError: `step` or `total_steps` is not a concrete int.
      ValueError: as `float_at`.

    Examples:
      >>> from qtrain import recipes
      >>> r = recipes.int8().replace(float_last_steps=10)
      >>> r.rules_at(89, 100) == r.rules, r.rules_at(90, 100)[0].config
      (True, None)
    """
    if not self.float_at(step, total_steps):
      return self.rules
    if self.final_rules is not None:
      return self.final_rules
    return tuple(dataclasses.replace(rule, config=None) for rule in self.rules)

  def __str__(self) -> str:
    lines = [f'Recipe {self.name!r}' + (f': {self.description}' if self.description else '')]
    lines.append('  rules (first match wins):')
    lines.extend(_rule_lines(self.rules))
    if self.gradient_transforms:
      names = ', '.join(_transform_name(t) for t in self.gradient_transforms)
      lines.append(f'  gradient transforms (before the optimizer): {names}')
    names = ', '.join(_transform_name(t) for t in self.optimizer_transforms)
    lines.append(f'  optimizer transforms (after the optimizer): {names or "none"}')
    if self.optimizer is not None:
      lr = f' at lr {self.default_lr}' if self.default_lr is not None else ''
      lines.append(f'  base optimizer: {getattr(self.optimizer, "__name__", self.optimizer)}{lr}')
    if self.prepare_model is not None:
      lines.append(f'  model preparation: '
                   f'{getattr(self.prepare_model, "__name__", self.prepare_model)}')
    if self.float_last_steps:
      if self.final_rules is None:
        lines.append(f'  float for the last {self.float_last_steps} steps')
      else:
        lines.append(f'  final_rules for the last {self.float_last_steps} steps:')
        lines.extend(_rule_lines(self.final_rules))
    return '\n'.join(lines)
