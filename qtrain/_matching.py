"""Rule resolution shared by the NNX and Linen wiring of `quantize_model`.

One `Site` is one op qtrain could quantize: a layer path, an op kind and,
for layers qtrain cannot hook, why not. `decide` applies the rules to a site
(first match wins) and says what to do; `build_report` turns the decisions
into a `QuantizationReport`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from qtrain.config import DotConfig
from qtrain.rules import SHAPE_KINDS, QuantizationReport, QuantRule, match_rule

__all__ = ['Site', 'Decision', 'normalize_rules', 'decide', 'build_report']

_log = logging.getLogger('qtrain')


def normalize_rules(rules_or_recipe) -> tuple[QuantRule, ...]:
  """Rules from a rule sequence, a single rule or DotConfig, or an object with `.rules`.

  Args:
    rules_or_recipe: a sequence of `QuantRule`; a `QuantRule`; a `DotConfig`
      (one rule '.*' for every layer); or an object with a `rules` attribute
      (a `qtrain.Recipe`).

  Returns:
    The rules as a tuple, in matching order.

  Raises:
    TypeError: anything else, naming the offending item.
  """
  if isinstance(rules_or_recipe, DotConfig):
    return (QuantRule(config=rules_or_recipe),)
  if isinstance(rules_or_recipe, QuantRule):
    return (rules_or_recipe,)
  if hasattr(rules_or_recipe, 'rules') and not isinstance(rules_or_recipe, Sequence):
    rules_or_recipe = rules_or_recipe.rules
  if isinstance(rules_or_recipe, (str, bytes)) or not isinstance(rules_or_recipe, Sequence):
    raise TypeError('rules_or_recipe must be a sequence of qtrain.QuantRule, a DotConfig or a '
                    f'Recipe (an object with .rules), got {rules_or_recipe!r}.')
  for i, rule in enumerate(rules_or_recipe):
    if not isinstance(rule, QuantRule):
      raise TypeError(f'rules[{i}] must be a qtrain.QuantRule, got {rule!r}.')
  return tuple(rules_or_recipe)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Site:
  """One op of a model: where it is, what kind, and why it cannot be hooked (if so)."""
  path: str
  kind: str
  type_name: str
  unsupported: str | None = None
  shape_kinds: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Decision:
  """What the rules say about a site.

  Attributes:
    site: the site.
    rule_index: index of the first matching rule, or None.
    config: the DotConfig to install; None keeps the op float (or untouched).
    reason: why the op stays float ('' when it is quantized).
    error: a message when a rule names an unsupported layer explicitly.
  """
  site: Site
  rule_index: int | None
  config: DotConfig | None
  reason: str = ''
  error: str | None = None


def _explicit(rule: QuantRule) -> bool:
  # '.*' means "everything that can be quantized": it sweeps over unsupported
  # layers silently; any narrower regex names layers on purpose.
  return rule.module_path != '.*'


def decide(rules: Sequence[QuantRule], site: Site) -> Decision:
  """Applies the rules to one site (first match wins)."""
  match = match_rule(rules, site.path, site.kind, site.shape_kinds)
  if match is None:
    reason = 'no rule matched'
    if site.kind == 'attention':
      reason += " (attention matmuls need a rule with op_kinds=('attention',))"
    return Decision(site=site, rule_index=None, config=None, reason=reason)
  index, rule = match
  if rule.config is None:
    return Decision(site=site, rule_index=index, config=None,
                    reason=f'rule {index} has config=None')
  if site.unsupported is not None:
    error = None
    if _explicit(rule):
      error = (f"rule {index} (module_path={rule.module_path!r}) matches layer "
               f"'{site.path or '<root>'}' ({site.type_name}, {site.kind}), which qtrain "
               f'cannot quantize: {site.unsupported}. Keep it float with '
               f'QuantRule(module_path=..., config=None) or narrow the regex.')
    return Decision(site=site, rule_index=index, config=None, reason='unsupported', error=error)
  return Decision(site=site, rule_index=index, config=rule.config)


def build_report(rules: Sequence[QuantRule], decisions: Sequence[Decision]) -> QuantizationReport:
  """The report of a set of decisions; logs a warning for rules that matched nothing."""
  report = QuantizationReport()
  used, seen = set(), set()
  for d in decisions:
    s = d.site
    if (s.path, s.kind) in seen:
      continue
    seen.add((s.path, s.kind))
    if d.rule_index is not None:
      used.add(d.rule_index)
    if s.unsupported is not None:
      report.unsupported.append((s.path, s.type_name, s.unsupported))
    elif d.config is not None:
      report.quantized.append((s.path, s.kind, d.rule_index))
    else:
      report.kept_float.append((s.path, s.kind, d.reason))
  report.unused_rules = [i for i in range(len(rules)) if i not in used]
  for i in report.unused_rules:
    if rules[i].module_path == '.*' and set(rules[i].op_kinds) <= set(SHAPE_KINDS):
      continue  # "every 1x1 conv, if any": a model without one is no typo
    # A rule that matches nothing is almost always a typo in its regex.
    # The path pattern identifies the rule; the full config would fill a screen.
    kinds = f' {list(rules[i].op_kinds)}' if rules[i].op_kinds else ''
    _log.warning('qtrain.quantize_model: rule %d (module_path=%r%s) matched no layer.', i,
                 rules[i].module_path, kinds)
  return report
