"""Which layers get which quantization: regex rules on module paths.

A `QuantRule` pairs a regular expression over a layer's module path (the
attribute path joined by '/', e.g. 'blocks/0/attn/query') and optional op
kinds with a `DotConfig`; `config=None` keeps the matched layers in high
precision (the first conv and last classifier of most papers). Rules are tried
in order and the first match wins (Qwix's convention); `match_rule` returns it.
`QuantizationReport` lists what was quantized, what stayed float and why, and
the rules that matched nothing (usually a typo in a regex).
"""

from __future__ import annotations

import dataclasses
import re

from qtrain.config import DotConfig

__all__ = ['OP_KINDS', 'SHAPE_KINDS', 'conv_shape_kinds', 'QuantRule', 'match_rule', 'QuantizationReport']

# What a rule can target: dense layers (Linear, LinearGeneral, Dense,
# DenseGeneral, attention projections), convolutions, einsum layers, and the
# two matmuls inside attention (scores QKᵀ and probabilities·V).
OP_KINDS = ('linear', 'conv', 'einsum', 'attention')
# Shape kinds refine 'conv' by the layer's kernel: a rule naming one matches
# only those convolutions (e.g. Ultra-low's FP8 1×1 convs), whatever their names.
#   conv1x1: every spatial kernel size 1, no feature groups;
#   depthwise_conv: feature_group_count == input features > 1.
SHAPE_KINDS = ('conv1x1', 'depthwise_conv')


def conv_shape_kinds(kernel_size, feature_group_count: int, in_features: int | None) -> tuple:
  """The SHAPE_KINDS of a convolution layer from its hyper-parameters.

  Args:
    kernel_size: int or sequence of ints (spatial kernel size).
    feature_group_count: the layer's feature groups.
    in_features: input features, or None if unknown (Linen before binding);
      then a grouped conv with groups equal to its output features counts as
      depthwise (depth multiplier 1).

  Returns:
    A tuple of SHAPE_KINDS names (possibly empty).
  """
  sizes = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
  groups = int(feature_group_count or 1)
  kinds = []
  if groups == 1 and all(int(k) == 1 for k in sizes):
    kinds.append('conv1x1')
  if groups > 1 and (in_features is None or groups == int(in_features)):
    kinds.append('depthwise_conv')
  return tuple(kinds)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class QuantRule:
  """One rule: layers whose path fully matches `module_path` (and kind in `op_kinds`).

  Attributes:
    module_path: regular expression matched with `re.fullmatch` against the
      '/'-joined module path ('' for the root module). '.*' matches all.
    config: the DotConfig for matched layers; None keeps them in high precision.
    op_kinds: subset of OP_KINDS + SHAPE_KINDS; empty means every kind except
      'attention' (attention-internal matmuls are quantized only when a rule
      names them). A shape kind ('conv1x1', 'depthwise_conv') matches only
      the convolutions of that shape.
  """
  module_path: str = '.*'
  config: DotConfig | None = None
  op_kinds: tuple[str, ...] = ()

  def __post_init__(self):
    if not isinstance(self.module_path, str):
      raise TypeError(f'module_path must be a regex string, got {self.module_path!r}.')
    try:
      re.compile(self.module_path)
    except re.error as e:
      raise ValueError(f'module_path={self.module_path!r} is not a valid regex: {e}.') from e
    if self.config is not None and not isinstance(self.config, DotConfig):
      raise TypeError(f'config must be a qtrain.DotConfig or None, got {self.config!r}.')
    if isinstance(self.op_kinds, str):
      object.__setattr__(self, 'op_kinds', (self.op_kinds,))
    bad = [k for k in self.op_kinds if k not in OP_KINDS + SHAPE_KINDS]
    if bad:
      raise ValueError(f'op_kinds {bad} are unknown; allowed: {OP_KINDS + SHAPE_KINDS}.')

  def matches(self, path: str, op_kind: str, shape_kinds: tuple[str, ...] = ()) -> bool:
    kinds = self.op_kinds or tuple(k for k in OP_KINDS if k != 'attention')
    kind_ok = op_kind in kinds or any(k in kinds for k in shape_kinds)
    return kind_ok and re.fullmatch(self.module_path, path) is not None


def match_rule(rules, path: str, op_kind: str,
               shape_kinds: tuple[str, ...] = ()) -> tuple[int, QuantRule] | None:
  """Returns (index, rule) of the first rule matching (path, op_kind), or None."""
  for i, rule in enumerate(rules):
    if rule.matches(path, op_kind, shape_kinds):
      return i, rule
  return None


@dataclasses.dataclass
class QuantizationReport:
  """What `quantize_model` did.

  Attributes:
    quantized: (path, op_kind, rule index) of every layer given a quantized hook.
    kept_float: (path, op_kind, reason) of every layer left in high precision:
      matched by a rule with config=None, or matched by no rule.
    unused_rules: indices of rules that matched no layer.
    unsupported: (path, type name, why) of layers qtrain cannot hook.
  """
  quantized: list[tuple[str, str, int]] = dataclasses.field(default_factory=list)
  kept_float: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
  unused_rules: list[int] = dataclasses.field(default_factory=list)
  unsupported: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)

  def __str__(self) -> str:
    lines = [f'quantized ({len(self.quantized)}):']
    lines += [f'  {p or "<root>"} [{k}] <- rule {i}' for p, k, i in self.quantized]
    lines.append(f'kept in high precision ({len(self.kept_float)}):')
    lines += [f'  {p or "<root>"} [{k}]: {why}' for p, k, why in self.kept_float]
    if self.unused_rules:
      lines.append(f'rules that matched nothing: {self.unused_rules}')
    if self.unsupported:
      lines.append('unsupported layers:')
      lines += [f'  {p or "<root>"} ({t}): {why}' for p, t, why in self.unsupported]
    return '\n'.join(lines)
