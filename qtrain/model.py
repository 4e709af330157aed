"""`quantize_model`: quantize the matmuls of a Flax model by rules on module paths.

One entry point for both Flax APIs:

* **NNX** (`nnx.Module`): the module graph is walked once and the op hooks of
  matched layers are replaced in place by `qtrain.nnx_hooks` modules that
  share one `nnx.Rngs` 'quant' stream (a fresh key per call, no retrace
  under `nnx.jit`):

  | layer                        | hook attribute         | op kind     |
  |------------------------------|------------------------|-------------|
  | `Linear`, `LinearGeneral`    | `dot_general`          | 'linear'    |
  | `Conv`                       | `conv_general_dilated` | 'conv'      |
  | `Einsum`                     | `einsum_op`            | 'einsum'    |
  | `MultiHeadAttention`         | `attention_fn`         | 'attention' |

  The query/key/value/out projections of `MultiHeadAttention` are
  `LinearGeneral` layers ('linear', paths like 'block/attn/query'); its QKᵀ
  and probs·V matmuls are quantized only by a rule whose `op_kinds` names
  'attention'.
* **Linen** (an unbound `nn.Module`): a copy of the module whose methods run
  under `nn.intercept_methods` (`qtrain.linen_hooks`); same parameter tree,
  keys from `apply(..., rngs={'quant': key})`.

Rules are tried in order and the first match wins; a rule with config=None
keeps its layers float. Layers qtrain cannot hook (`ConvTranspose`, `LoRA`,
Linen modules inside `nnx.bridge.ToNNX`, layers whose op was already
replaced by something else) are reported as unsupported, and a rule that
names one explicitly (any module_path but '.*') is an error.

NNX limitations: layers are recognised with `isinstance`, so a subclass whose
`__call__` bypasses the hook is not quantized (`nnx.LoRALinear`'s base matmul
is, its adapter `nnx.LoRA` is reported unsupported); the shared 'quant'
stream is one piece of state referenced by every hook, so models must be
traced in NNX graph mode (the default of `nnx.jit`/`nnx.grad`), and layers
created by `nnx.vmap`/`nnx.scan` (stacked parameters) need the stream split
across the mapped axis by the user (`nnx.StateAxes`); this is untested.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx
from jax import lax

from qtrain import _matching
from qtrain import linen_hooks
from qtrain import nnx_hooks
from qtrain.config import DotConfig
from qtrain.rules import QuantizationReport, QuantRule, conv_shape_kinds

__all__ = ['quantize_model']


@dataclasses.dataclass(frozen=True, kw_only=True)
class _HookSpec:
  """How to quantize one NNX layer type.

  Attributes:
    kind: the op kind rules match ('linear', 'conv', 'einsum', 'attention').
    attr: the layer attribute holding the op.
    hook_type: the `nnx_hooks` class installed there.
    defaults: values of `attr` that mean "flax's own op" (safe to replace).
  """
  kind: str
  attr: str
  hook_type: type
  defaults: tuple[Any, ...]


_NNX_HOOKS: tuple[tuple[type, _HookSpec], ...] = (
    (nnx.Linear, _HookSpec(kind='linear', attr='dot_general', defaults=(lax.dot_general,),
                           hook_type=nnx_hooks.QuantizedDotGeneral)),
    # MultiHeadAttention builds its projections with dot_general=None.
    (nnx.LinearGeneral, _HookSpec(kind='linear', attr='dot_general',
                                  defaults=(None, lax.dot_general),
                                  hook_type=nnx_hooks.QuantizedDotGeneral)),
    (nnx.Conv, _HookSpec(kind='conv', attr='conv_general_dilated',
                         defaults=(lax.conv_general_dilated,),
                         hook_type=nnx_hooks.QuantizedConvGeneralDilated)),
    (nnx.Einsum, _HookSpec(kind='einsum', attr='einsum_op', defaults=(jnp.einsum,),
                           hook_type=nnx_hooks.QuantizedEinsum)),
    (nnx.MultiHeadAttention, _HookSpec(kind='attention', attr='attention_fn',
                                       defaults=(nnx.dot_product_attention,),
                                       hook_type=nnx_hooks.QuantizedAttention)),
)

_ALL_KINDS = ('linear', 'conv', 'einsum')

# Layers with matmuls but no hook: (type, op kinds, why).
_NNX_UNSUPPORTED: tuple[tuple[type, tuple[str, ...], str], ...] = (
    (nnx.ConvTranspose, ('conv',),
     'nnx.ConvTranspose calls lax.conv_transpose directly and has no conv_general_dilated hook'),
    (nnx.LoRA, ('linear',),
     'nnx.LoRA multiplies x @ A @ B with the @ operator and has no dot_general hook'),
    (nnx.bridge.ToNNX, _ALL_KINDS,
     'a Linen module wrapped by nnx.bridge.ToNNX builds its layers at call time; quantize the '
     'Linen module with qtrain.quantize_model before wrapping it (and give ToNNX a '
     "'quant' stream)"),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _NnxSite:
  """A site plus what is needed to (un)install its hook."""
  site: _matching.Site
  module: nnx.Module
  spec: _HookSpec | None = None
  original: Any = None


def _path_str(path) -> str:
  return '/'.join(str(p) for p in path)


def _hook_state(module: nnx.Module, spec: _HookSpec) -> tuple[Any, str | None]:
  """(original op, None) if the layer's op can be replaced, else (None, why not)."""
  current = getattr(module, spec.attr)
  if isinstance(current, spec.hook_type):
    return current.original, None  # installed by an earlier quantize_model
  if any(current is d for d in spec.defaults):
    if getattr(module, 'dot_general_cls', None) is not None:
      return None, 'dot_general_cls is set and takes precedence over the dot_general hook'
    return current, None
  return None, (f'its {spec.attr} was already replaced by {current!r}; qtrain does not '
                'overwrite a custom op')


def _nnx_sites(model: nnx.Module) -> list[_NnxSite]:
  """Every quantizable or unsupported op of an NNX model, in iteration order."""
  sites = []
  for path, module in nnx.iter_modules(model):
    if isinstance(module, nnx_hooks.HOOK_TYPES):
      continue
    path, type_name = _path_str(path), type(module).__name__
    for layer_type, kinds, why in _NNX_UNSUPPORTED:
      if isinstance(module, layer_type):
        sites += [_NnxSite(site=_matching.Site(path=path, kind=k, type_name=type_name,
                                               unsupported=why), module=module) for k in kinds]
    for layer_type, spec in _NNX_HOOKS:
      if isinstance(module, layer_type):
        original, why = _hook_state(module, spec)
        shape_kinds = ()
        if isinstance(module, nnx.Conv):
          shape_kinds = conv_shape_kinds(module.kernel_size, module.feature_group_count,
                                         module.in_features)
        site = _matching.Site(path=path, kind=spec.kind, type_name=type_name, unsupported=why,
                              shape_kinds=shape_kinds)
        sites.append(_NnxSite(site=site, module=module, spec=spec, original=original))
  return sites


def _existing_rngs(model: nnx.Module) -> nnx.Rngs | None:
  for _, module in nnx.iter_modules(model):
    if isinstance(module, nnx_hooks.HOOK_TYPES):
      return module.rngs
  return None


def _check_rngs(rngs) -> nnx.Rngs:
  if not isinstance(rngs, nnx.Rngs):
    raise TypeError(f"rngs must be an nnx.Rngs with a 'quant' stream, got {rngs!r}.")
  try:
    rngs.quant  # pylint: disable=pointless-statement
  except AttributeError as e:
    raise ValueError("rngs has no 'quant' stream (nor a 'default' one): pass e.g. "
                     'nnx.Rngs(quant=0).') from e
  return rngs


def _apply(entry: _NnxSite, decision: _matching.Decision, rngs: nnx.Rngs) -> None:
  module, spec = entry.module, entry.spec
  if spec is None or entry.site.unsupported is not None:
    return
  if decision.config is not None:
    hook = spec.hook_type(decision.config, rngs=rngs, name=entry.site.path,
                          original=entry.original)
    old = getattr(module, spec.attr)
    if (isinstance(old, spec.hook_type) and old.config == decision.config and
        getattr(old, 'grad_state', None) is not None):
      # Same rule re-applied: keep the per-layer gradient state it has built up.
      hook.grad_state = nnx.data(old.grad_state)
    setattr(module, spec.attr, nnx.data(hook))
  elif isinstance(getattr(module, spec.attr), spec.hook_type):
    # Re-quantized as float: put flax's op back, static as it was.
    setattr(module, spec.attr, nnx.static(entry.original))


def _quantize_nnx(model: nnx.Module, rules: tuple[QuantRule, ...],
                  rngs: nnx.Rngs | None) -> QuantizationReport:
  if rngs is None:
    # Re-quantizing keeps the stream of the first call, so noise never repeats.
    rngs = _existing_rngs(model)
    rngs = nnx.Rngs(quant=0) if rngs is None else rngs
  rngs = _check_rngs(rngs)
  entries = _nnx_sites(model)
  decisions = [_matching.decide(rules, e.site) for e in entries]
  errors = [d.error for d in decisions if d.error]
  if errors:
    # Raised before anything is mutated: the model is left as it was.
    raise ValueError('\n'.join(errors))
  for entry, decision in zip(entries, decisions):
    _apply(entry, decision, rngs)
  return _matching.build_report(rules, decisions)


def quantize_model(model, rules_or_recipe: Sequence[QuantRule] | DotConfig | Any, *,
                   rngs: nnx.Rngs | None = None, return_report: bool = False):
  """Quantizes the matmuls of a Flax NNX or Linen model by rules on module paths.

  Args:
    model: an `nnx.Module` (mutated in place and returned) or an unbound
      Linen `nn.Module` (a quantized copy is returned; the original is
      untouched).
    rules_or_recipe: a sequence of `QuantRule` (first match wins; a rule with
      config=None keeps its layers float), a single `DotConfig` (every
      dense/conv/einsum layer), or an object with a `rules` attribute (a
      `qtrain.Recipe`; its optimizer side is not applied here, its
      `prepare_model` is, after the rules, for NNX models).
    rngs: NNX only: an `nnx.Rngs` whose 'quant' stream all hooks share;
      default: the stream of an earlier `quantize_model` on this model, else
      `nnx.Rngs(quant=0)`. Linen takes keys from
      `apply(..., rngs={'quant': key})` instead.
    return_report: NNX only: also return a `QuantizationReport`. Linen layers
      exist only while the model runs: use
      `qtrain.linen_hooks.quantization_report(quantized, *sample_inputs)`.

  Returns:
    The quantized model, or (model, report) if `return_report`.

  Raises:
    TypeError: a model that is neither NNX nor Linen, or bad rules/rngs.
    ValueError: a rule that explicitly matches a layer qtrain cannot
      quantize (the message names the layer, its type and why), an rngs
      without a 'quant' stream, or NNX-only arguments given for Linen.

  Examples:
    >>> from flax import nnx
    >>> from qtrain import presets
    >>> from qtrain.model import quantize_model
    >>> from qtrain.rules import QuantRule
    >>> model = nnx.Sequential(nnx.Linear(4, 8, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
    >>> model, report = quantize_model(
    ...     model, [QuantRule(module_path='layers/2', config=None),
    ...             QuantRule(config=presets.int8())], return_report=True)
    >>> report.quantized, [p for p, *_ in report.kept_float]
    ([('layers/0', 'linear', 1)], ['layers/2'])
  """
  rules = _matching.normalize_rules(rules_or_recipe)
  prepare = getattr(rules_or_recipe, 'prepare_model', None)
  if isinstance(model, nnx.Module):
    report = _quantize_nnx(model, rules, rngs)
    if prepare is not None:
      prepare(model)  # e.g. WAGEUBN's BatchNorm swap, after the hooks exist
    return (model, report) if return_report else model
  if isinstance(model, nn.Module):
    if rngs is not None:
      raise ValueError("rngs is for NNX models; a Linen model takes its keys from "
                       "apply(..., rngs={'quant': key}).")
    if return_report:
      raise ValueError('return_report=True is for NNX models: Linen layers exist only while '
                       'the model runs. Call qtrain.linen_hooks.quantization_report(quantized, '
                       '*sample_inputs) instead.')
    if prepare is not None:
      raise ValueError(f'recipe {rules_or_recipe.name!r} prepares NNX models with '
                       f'{getattr(prepare, "__name__", prepare)}, which has no Linen '
                       'counterpart; build the Linen model with the recipe\'s layers (see its '
                       'docstring) and pass recipe.rules instead.')
    return linen_hooks.quantize_linen(model, rules)
  raise TypeError(f'model must be a flax.nnx.Module or an unbound flax.linen.Module, got '
                  f'{type(model).__name__}.')
