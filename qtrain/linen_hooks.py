"""Flax Linen wiring of `quantize_model`: method interception, same parameter tree.

Linen layers are created while the model runs, so they cannot be patched
ahead of time. `quantize_linen(model, rules)` returns a copy of `model` whose
class is a subclass of the original (same name, same fields) whose
`__call__` and public methods run under `nn.intercept_methods`. The
interceptor sees every layer call; for a matched layer it sets the layer's
own op field for the duration of that call:

| layer                           | field(s) set                               | op kind     |
|---------------------------------|--------------------------------------------|-------------|
| `Dense`, `DenseGeneral`         | `dot_general`                              | 'linear'    |
| `Conv`                          | `conv_general_dilated`                     | 'conv'      |
| `MultiHeadDotProductAttention`  | `qk_attn_weights_einsum_cls`,              | 'attention' |
|                                 | `attn_weights_value_einsum_cls`            |             |

So the layer's own code runs (initializers, promote_dtype, padding modes,
masks, bias), only its matmul is `qtrain.dot_general` /
`conv_general_dilated` / `qtrain.einsum.einsum`, and the parameter tree is the
one of the unquantized model: checkpoints interchange. Keys come from
`layer.make_rng('quant')`, i.e. `apply(..., rngs={'quant': key})`; during
`init` the original op runs. Each GEMM runs under `jax.named_scope(<layer
path>)`.

Limitations: a method passed to `apply` must be a name or a bound method of
the quantized module (`method=CNN.encode` bypasses the interception);
submodules called directly from outside the model (`bound.dense(x)`) are not
intercepted; layers whose op field the user already set are left alone.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
from flax.nnx.bridge import wrappers as nnx_bridge

from qtrain import _matching
from qtrain.config import DotConfig
from qtrain.dot import conv_general_dilated, dot_general
from qtrain.einsum import einsum
from qtrain.rules import QuantizationReport, QuantRule, conv_shape_kinds

__all__ = ['quantize_linen', 'quantization_report']

# Collects the decisions of every intercepted call while quantization_report runs.
_SINK: contextvars.ContextVar[list | None] = contextvars.ContextVar('qtrain_linen_sink',
                                                                    default=None)
# The interceptor of the innermost quantized model being run: only it acts,
# so a quantized model nested in another one keeps its own rules.
_OWNER: contextvars.ContextVar[Any] = contextvars.ContextVar('qtrain_owner', default=None)
# The layer whose call is being decided: when a quantized model's methods call
# each other, its interceptor is entered twice and must act once per call.
_DECIDED: contextvars.ContextVar[nn.Module | None] = contextvars.ContextVar('qtrain_decided',
                                                                            default=None)


@dataclasses.dataclass(frozen=True)
class _Bound:
  """`fn` with config and key bound; its type marks an op qtrain installed."""
  fn: Callable[..., jax.Array]
  config: DotConfig
  key: Any

  def __call__(self, *args, **kwargs):
    return self.fn(*args, config=self.config, key=self.key, **kwargs)


@dataclasses.dataclass(frozen=True)
class _Factory:
  """A `*_einsum_cls` value: a zero-argument factory of a bound einsum."""
  op: _Bound

  def __call__(self):
    return self.op


def _fold(key, i: int):
  return None if key is None else jax.random.fold_in(key, i)


def _dense_fields(config, key) -> dict[str, Any]:
  return {'dot_general': _Bound(dot_general, config, key)}


def _conv_fields(config, key) -> dict[str, Any]:
  return {'conv_general_dilated': _Bound(conv_general_dilated, config, key)}


def _attention_fields(config, key) -> dict[str, Any]:
  return {'qk_attn_weights_einsum_cls': _Factory(_Bound(einsum, config, _fold(key, 0))),
          'attn_weights_value_einsum_cls': _Factory(_Bound(einsum, config, _fold(key, 1)))}


@dataclasses.dataclass(frozen=True, kw_only=True)
class _LinenSpec:
  """How to quantize one Linen layer type: the fields that must be unset, and the patch."""
  kind: str
  hook_fields: tuple[str, ...]
  patch: Callable[[DotConfig, Any], dict[str, Any]]


_LINEN_HOOKS: tuple[tuple[type, _LinenSpec], ...] = (
    (nn.Dense, _LinenSpec(kind='linear', hook_fields=('dot_general', 'dot_general_cls'),
                          patch=_dense_fields)),
    (nn.DenseGeneral, _LinenSpec(kind='linear', hook_fields=('dot_general', 'dot_general_cls'),
                                 patch=_dense_fields)),
    (nn.Conv, _LinenSpec(kind='conv',
                         hook_fields=('conv_general_dilated', 'conv_general_dilated_cls'),
                         patch=_conv_fields)),
    (nn.MultiHeadDotProductAttention, _LinenSpec(
        kind='attention',
        hook_fields=('qk_attn_weights_einsum_cls', 'attn_weights_value_einsum_cls'),
        patch=_attention_fields)),
)

_LINEN_UNSUPPORTED: tuple[tuple[type, tuple[str, ...], str], ...] = (
    (nn.ConvTranspose, ('conv',),
     'nn.ConvTranspose calls lax.conv_transpose directly and has no conv hook'),
    (nn.ConvLocal, ('conv',),
     'nn.ConvLocal runs lax.conv_general_dilated_local, which has no hook'),
    (nn.Einsum, ('einsum',), 'linen nn.Einsum calls jnp.einsum directly and has no einsum hook'),
    (nnx_bridge.ToLinen, ('linear', 'conv', 'einsum'),
     'an NNX module wrapped by nnx.bridge.ToLinen is built inside the wrapper, out of reach'),
)


def _why_unhookable(module: nn.Module, spec: _LinenSpec) -> str | None:
  """Why this layer's op cannot be replaced, or None if it can."""
  for field in spec.hook_fields:
    value = getattr(module, field)
    if value is not None:
      return f'its {field} is already set to {value!r}; qtrain does not overwrite a custom op'
  if spec.kind == 'attention':
    try:
      params = inspect.signature(module.attention_fn).parameters
    except (TypeError, ValueError):  # not introspectable: flax would pass it nothing either
      params = {}
    if 'qk_attn_weights_einsum' not in params:
      return (f'its attention_fn {module.attention_fn!r} takes no qk_attn_weights_einsum '
              'argument, so its matmuls cannot be swapped')
    if module.precision is not None:
      return ('precision is set, which flax forbids together with the attention einsum '
              'hooks')
  return None


def _sites(module: nn.Module) -> list[tuple[_matching.Site, _LinenSpec | None]]:
  path, type_name = '/'.join(module.path), type(module).__name__
  out = []
  for layer_type, kinds, why in _LINEN_UNSUPPORTED:
    if isinstance(module, layer_type):
      out += [(_matching.Site(path=path, kind=k, type_name=type_name, unsupported=why), None)
              for k in kinds]
  for layer_type, spec in _LINEN_HOOKS:
    if isinstance(module, layer_type):
      shape_kinds = ()
      if isinstance(module, nn.Conv):
        shape_kinds = conv_shape_kinds(module.kernel_size, module.feature_group_count, None)
      site = _matching.Site(path=path, kind=spec.kind, type_name=type_name,
                            unsupported=_why_unhookable(module, spec), shape_kinds=shape_kinds)
      out.append((site, spec))
  return out


@contextlib.contextmanager
def _patched(module: nn.Module, values: dict[str, Any]):
  """Sets dataclass fields of a bound (frozen) module for the duration of one call.

  The bound module instance belongs to this apply call only, so the change
  is invisible outside the call; it is undone even if the call raises.
  """
  old = {name: getattr(module, name) for name in values}
  for name, value in values.items():
    object.__setattr__(module, name, value)
  try:
    yield
  finally:
    for name, value in old.items():
      object.__setattr__(module, name, value)


def _layer_key(module: nn.Module, config: DotConfig, path: str):
  if not config.needs_key:
    return None
  if not module.has_rng('quant'):
    raise ValueError(f"layer '{path or '<root>'}' has a stochastic DotConfig and needs a "
                     "'quant' PRNG key: call apply(..., rngs={'quant': key}).")
  return module.make_rng('quant')


class _Interceptor:
  """The `nn.intercept_methods` interceptor of one quantized model."""

  def __init__(self, rules: tuple[QuantRule, ...]):
    self.rules = rules

  def __call__(self, next_fun, args, kwargs, context):
    module = context.module
    method = getattr(context.orig_method, 'func', context.orig_method)
    if (context.method_name != '__call__' or _OWNER.get() is not self or
        _DECIDED.get() is module or getattr(method, '_qtrain_entry', False)):
      # Not a layer call, not ours (a nested quantized model's), already
      # decided, or the entry of a nested quantized model (its own interceptor
      # sees the layer call right after).
      return next_fun(*args, **kwargs)
    token = _DECIDED.set(module)
    try:
      return self._intercept(module, next_fun, args, kwargs)
    finally:
      _DECIDED.reset(token)

  def _intercept(self, module, next_fun, args, kwargs):
    for site, spec in _sites(module):
      decision = _matching.decide(self.rules, site)
      sink = _SINK.get()
      if sink is not None:
        sink.append(decision)
      if decision.error:
        raise ValueError(decision.error)
      if spec is None or decision.config is None or module.is_initializing():
        continue
      values = spec.patch(decision.config, _layer_key(module, decision.config, site.path))
      scope = jax.named_scope(site.path) if site.path else contextlib.nullcontext()
      with _patched(module, values), scope:
        return next_fun(*args, **kwargs)
    return next_fun(*args, **kwargs)


def _methods_to_wrap(cls: type) -> list[str]:
  """`__call__` and the public methods the user's own classes define."""
  fields = {f.name for f in dataclasses.fields(cls)}
  names = {'__call__'} if callable(getattr(cls, '__call__', None)) else set()
  for klass in cls.__mro__:
    if not issubclass(klass, nn.Module) or klass.__module__.startswith('flax.'):
      continue
    for name, value in vars(klass).items():
      if not name.startswith('_') and name != 'setup' and name not in fields and (
          inspect.isfunction(value)):
        names.add(name)
  return sorted(names)


def _intercepting(fn: Callable, interceptor: _Interceptor) -> Callable:
  def method(self, *args, **kwargs):
    token = _OWNER.set(interceptor)
    try:
      with nn.intercept_methods(interceptor):
        return fn(self, *args, **kwargs)
    finally:
      _OWNER.reset(token)
  # Name and docs only: copying __dict__ would copy flax's `compact` marker
  # and make this wrapper a second compact method.
  method.__name__, method.__qualname__ = fn.__name__, fn.__qualname__
  method.__doc__ = fn.__doc__
  method.__signature__ = inspect.signature(fn)
  method._qtrain_entry = True  # pylint: disable=protected-access
  return method


def quantize_linen(model: nn.Module, rules: Sequence[QuantRule]) -> nn.Module:
  """A copy of an unbound Linen module whose dense/conv/attention matmuls are quantized.

  Use `qtrain.quantize_model`, which validates the rules and dispatches here.

  Args:
    model: an unbound Linen module (not inside another module's setup).
    rules: `QuantRule`s, first match wins, matched on '/'.join(layer.path).

  Returns:
    A module of a subclass of type(model) (same class name, same field
    values): `init` gives the same variables as `model.init`, and `apply`
    runs the matched layers' GEMMs through qtrain.

  Raises:
    ValueError: a bound module or one with a parent.
  """
  if model.scope is not None:
    raise ValueError('quantize_model needs an unbound Linen module (quantize the model before '
                     f'init/bind), got a bound {type(model).__name__}.')
  if model.parent is not None:
    raise ValueError(f'quantize_model got a {type(model).__name__} created inside another '
                     "module's setup or compact method; quantize it outside and pass it in as "
                     'an attribute, or quantize the outer model.')
  base = getattr(type(model), '_qtrain_base', type(model))
  interceptor = _Interceptor(tuple(rules))
  namespace = {'__module__': base.__module__, '__qualname__': base.__qualname__,
               '__doc__': base.__doc__, '_qtrain_base': base, '_qtrain_rules': tuple(rules)}
  for name in _methods_to_wrap(base):
    namespace[name] = _intercepting(getattr(base, name), interceptor)
  # Same class name: a module's auto-generated name ('CNN_0') must not change,
  # or the parameter tree of a model that embeds it would.
  cls = type(base.__name__, (base,), namespace)
  values = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
            if f.init and f.name != 'parent'}
  return cls(**values)


def quantization_report(model: nn.Module, *args, init_rngs: dict | None = None,
                        **kwargs) -> QuantizationReport:
  """What `quantize_model` does to a Linen model, found by tracing `init` on sample inputs.

  Nothing is computed: `init` runs under `jax.eval_shape`.

  Args:
    model: a module returned by `quantize_model` for Linen.
    *args: sample inputs of `model.__call__` (arrays or ShapeDtypeStructs).
    init_rngs: the rngs of `model.init` (default: 'params' and 'dropout' keys).
    **kwargs: keyword arguments of `model.__call__`.

  Returns:
    The QuantizationReport (quantized, kept float, unused rules, unsupported).

  Raises:
    TypeError: a module that was not quantized by `quantize_model`.
    ValueError: as `apply` would (a rule explicitly naming an unsupported layer).
  """
  rules = getattr(type(model), '_qtrain_rules', None)
  if rules is None:
    raise TypeError(f'{type(model).__name__} was not returned by qtrain.quantize_model.')
  sink: list[_matching.Decision] = []
  token = _SINK.set(sink)
  try:
    rngs = init_rngs or {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
    jax.eval_shape(lambda: model.init(rngs, *args, **kwargs))
  finally:
    _SINK.reset(token)
  return _matching.build_report(rules, sink)
