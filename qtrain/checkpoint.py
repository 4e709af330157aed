"""Checkpoints of quantized NNX training, and packed low-bit export of the kernels.

`save_checkpoint` writes the complete training state, so that a restored run
continues bit for bit as if it had never stopped:

- the model's whole NNX state (`nnx.state(model)`): float master weights,
  BatchNorm statistics, learned scales, and the RNG streams (key and counter)
  of every quantization hook, whose counters decide the next
  stochastic-rounding noise;
- the optimizer's whole NNX state (`nnx.state(optimizer)`): optax state and
  `optimizer.step`;
- the checkpoint step and an optional JSON-serializable `extra` dict (data
  position, config, ...).

Layout: `directory/<step>/` with the orbax items `model`, `optimizer` and
`meta`. Orbax writes a step into `<step>.orbax-checkpoint-tmp-*` and renames it
to `<step>` only when every item is on disk (on GCS it writes a
`commit_success.txt` instead), so a save interrupted half-way leaves a
directory that `latest_step`, `all_steps` and `restore_checkpoint` ignore or
reject. Restore goes *into* freshly built objects of the same structure (same
code, same constructor arguments): their arrays supply the shapes, dtypes and
shardings, and `nnx.update` writes the restored values in place.

Typed PRNG keys (`key<fry>`) are stored as their `jax.random.key_data`
(plain uint32 arrays, whatever the orbax version's key support) with the
implementation name in the metadata, and rewrapped with the target key's
implementation, which must match the saved one.

`export_packed` turns every quantized layer's float kernel into the codes and
scales its forward GEMM uses (the layer's `config.fwd.rhs` rule): int8 codes,
or uint8 bytes holding two 4-bit codes each (`qtrain.pack_int4`);
`load_packed` turns an entry back into a `QArray`.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from qtrain import dot
from qtrain import formats as fmts
from qtrain import scaling
from qtrain.config import DotConfig, TensorConfig
from qtrain.nnx_hooks import QuantizedConvGeneralDilated, QuantizedDotGeneral
from qtrain.qarray import QArray, pack_int4, unpack_int4
from qtrain.quantize import quantize

__all__ = ['save_checkpoint', 'restore_checkpoint', 'latest_step', 'all_steps', 'read_extra',
           'export_packed', 'load_packed', 'packed_nbytes']

# Version of the layout written into every checkpoint's `meta` item.
_LAYOUT_VERSION = 1
_META = 'meta'
_MODEL = 'model'
_OPTIMIZER = 'optimizer'


# ---------------------------------------------------------------------------
# state <-> orbax trees
# ---------------------------------------------------------------------------
def _path_str(path) -> str:
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    else:  # FlattenedIndexKey and future kinds
      parts.append(str(getattr(k, 'key', k)))
  return '/'.join(parts)


def _leaves(obj) -> tuple[list[tuple[str, Any]], Any]:
  """The NNX state of `obj` as [(path, leaf)] plus the pure-dict treedef.

  `nnx.to_pure_dict` gives nested dicts keyed by attribute names and list/tuple
  indices; the path joins them with '/'. Empty containers (optax's EmptyState)
  have no leaves and need no storage.
  """
  pure = nnx.to_pure_dict(nnx.state(obj))
  flat, treedef = jax.tree_util.tree_flatten_with_path(pure)
  leaves = [(_path_str(p), leaf) for p, leaf in flat]
  paths = [p for p, _ in leaves]
  if len(set(paths)) != len(paths):
    dup = sorted({p for p in paths if paths.count(p) > 1})
    raise ValueError(f'state paths {dup[:5]} are ambiguous after joining keys with "/" '
                     '(e.g. keys 0 and "0" in one dict); rename the attributes.')
  return leaves, treedef


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _nest(flat: Mapping[str, Any]) -> dict:
  """{'a/b/c': v} -> {'a': {'b': {'c': v}}}: orbax wants string-keyed nested dicts."""
  out: dict = {}
  for path, value in flat.items():
    node = out
    *parents, last = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = value
  return out


def _lookup(tree: Mapping, path: str):
  for p in path.split('/'):
    tree = tree[p]
  return tree


def _describe(path: str, leaf) -> dict:
  if _is_key(leaf):
    data = jax.random.key_data(leaf)
    return {'shape': list(data.shape), 'dtype': str(data.dtype),
            'prng_impl': str(jax.random.key_impl(leaf))}
  arr = np.asarray(leaf) if not isinstance(leaf, jax.Array) else leaf
  if arr.dtype == object:
    raise TypeError(f'state leaf {path!r} is a {type(leaf).__name__}, which a checkpoint '
                    'cannot store; keep only arrays and numbers in NNX Variables.')
  return {'shape': list(arr.shape), 'dtype': str(arr.dtype), 'prng_impl': None}


def _to_storable(leaf):
  if _is_key(leaf):
    return jax.random.key_data(leaf)
  return leaf if isinstance(leaf, (jax.Array, np.ndarray)) else np.asarray(leaf)


def _abstract(leaf):
  """ShapeDtypeStruct (with the target's sharding) that orbax restores into."""
  stored = _to_storable(leaf)
  sharding = stored.sharding if isinstance(stored, jax.Array) else None
  return jax.ShapeDtypeStruct(stored.shape, stored.dtype, sharding=sharding)


def _from_stored(value, target):
  if _is_key(target):
    return jax.random.wrap_key_data(value, impl=str(jax.random.key_impl(target)))
  if isinstance(target, (bool, int, float, complex)):
    return type(target)(np.asarray(value).item())
  return value


def _check_compatible(name: str, saved: Mapping[str, dict], leaves) -> None:
  """Raises ValueError listing how the target's state differs from the saved one."""
  target = {p: _describe(p, leaf) for p, leaf in leaves}
  missing = sorted(set(saved) - set(target))
  unexpected = sorted(set(target) - set(saved))
  changed = [f'{p}: saved {saved[p]}, target {target[p]}' for p in sorted(set(saved) & set(target))
             if saved[p] != target[p]]
  if missing or unexpected or changed:
    lines = [f'{name}: the target does not have the structure of the checkpoint (build it '
             'with the same code and arguments as the saved one).']
    for label, paths in (('in the checkpoint only', missing), ('in the target only', unexpected)):
      if paths:
        lines.append(f'  {label}: {paths[:8]}' + (' ...' if len(paths) > 8 else ''))
    lines += [f'  {c}' for c in changed[:8]]
    raise ValueError('\n'.join(lines))


# ---------------------------------------------------------------------------
# steps and directories
# ---------------------------------------------------------------------------
def _check_step(step) -> int:
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
    raise ValueError(f'step={step!r} must be an int >= 0.')
  return int(step)


def _is_complete(path: epath.Path) -> bool:
  # A finalized orbax directory (renamed from its tmp name, or with
  # commit_success.txt on GCS) that holds qtrain's meta item: a directory
  # named like a step that something else created is not a checkpoint.
  return (path.is_dir() and path.name.isdigit() and ocp.step.is_path_finalized(path)
          and (path / _META).exists())


def all_steps(directory) -> list[int]:
  """Steps of the complete checkpoints in `directory`, ascending ([] if none).

  Interrupted writes (orbax tmp directories) are not listed.
  """
  directory = epath.Path(directory)
  if not directory.exists():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if _is_complete(p))


def latest_step(directory) -> int | None:
  """The newest complete checkpoint step in `directory`, or None if there is none."""
  steps = all_steps(directory)
  return steps[-1] if steps else None


def _check_objects(model, optimizer) -> None:
  if not isinstance(model, nnx.Pytree):
    raise TypeError(f'model must be a Flax NNX Module, got {type(model).__name__}.')
  if optimizer is not None and not isinstance(optimizer, nnx.Pytree):
    raise TypeError(f'optimizer must be an nnx.Optimizer (or another NNX object) or None, got '
                    f'{type(optimizer).__name__}.')


def _checkpointer() -> ocp.Checkpointer:
  # Synchronous on purpose: save returns only once the step directory has been
  # renamed into place, so the caller may rely on it (and tests see no
  # background threads).
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def _resolve_step(directory: epath.Path, step) -> int:
  if step is None:
    step = latest_step(directory)
    if step is None:
      raise FileNotFoundError(f'no complete checkpoint in {directory}.')
    return step
  step = _check_step(step)
  if not _is_complete(directory / str(step)):
    raise FileNotFoundError(f'no complete checkpoint for step {step} in {directory}; complete '
                            f'steps: {all_steps(directory)}.')
  return step


# ---------------------------------------------------------------------------
# save / restore
# ---------------------------------------------------------------------------
def save_checkpoint(directory, step: int, model: nnx.Module,
                    optimizer: nnx.Optimizer | None = None, *,
                    extra: Mapping[str, Any] | None = None, keep: int | None = None,
                    overwrite: bool = False) -> epath.Path:
  """Atomically saves the training state as `directory/<step>`.

  Args:
    directory: the run's checkpoint directory (created if missing; local path
      or any path `etils.epath` understands, e.g. gs://).
    step: the step number, an int >= 0, usually the number of steps trained.
    model: the NNX model; its whole state is saved (weights, BatchNorm
      statistics, learned scales, quantization RNG keys and counters).
    optimizer: an `nnx.Optimizer` (or any NNX object) whose whole state is
      saved, or None.
    extra: optional JSON-serializable dict saved alongside (`read_extra`).
    keep: if given, delete all but the newest `keep` complete checkpoints
      after this one is written.
    overwrite: replace an existing checkpoint of the same step (deleted before
      the new one is written: a crash in between leaves no checkpoint of this
      step, never a partial one). Otherwise an existing step is an error.

  Returns:
    The path of the written step directory.

  Raises:
    ValueError: bad step or keep, or the step exists and overwrite is False.
    TypeError: `extra` is not JSON-serializable or a state leaf is not an array.
  """
  step = _check_step(step)
  _check_objects(model, optimizer)
  if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
    raise ValueError(f'keep={keep!r} must be None or an int >= 1.')
  if extra is not None and not isinstance(extra, Mapping):
    raise TypeError(f'extra must be a dict or None, got {type(extra).__name__}.')
  try:
    extra = json.loads(json.dumps(dict(extra))) if extra is not None else None
  except (TypeError, ValueError) as e:
    raise TypeError(f'extra must be JSON-serializable: {e}.') from e
  directory = epath.Path(directory)
  path = directory / str(step)
  if path.exists() and not overwrite:
    raise ValueError(f'a checkpoint for step {step} exists at {path}; pass overwrite=True '
                     'to replace it.')
  directory.mkdir(parents=True, exist_ok=True)

  meta = {'layout_version': _LAYOUT_VERSION, 'step': step, 'extra': extra, 'leaves': {}}
  items = {}
  for name, obj in ((_MODEL, model), (_OPTIMIZER, optimizer)):
    if obj is None:
      continue
    leaves, _ = _leaves(obj)
    meta['leaves'][name] = {p: _describe(p, leaf) for p, leaf in leaves}
    items[name] = ocp.args.StandardSave(_nest({p: _to_storable(leaf) for p, leaf in leaves}))
  items[_META] = ocp.args.JsonSave(meta)
  with _checkpointer() as ckptr:
    ckptr.save(path, args=ocp.args.Composite(**items), force=overwrite)

  if keep is not None and jax.process_index() == 0:  # one deleter in multi-host runs
    for old in all_steps(directory)[:-keep]:
      (directory / str(old)).rmtree()
  return path


def _read_meta(path: epath.Path) -> dict:
  with _checkpointer() as ckptr:
    meta = ckptr.restore(path, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))[_META]
  if meta.get('layout_version') != _LAYOUT_VERSION:
    raise ValueError(f'{path}: checkpoint layout version {meta.get("layout_version")!r} is not '
                     f'the supported {_LAYOUT_VERSION}.')
  return meta


def restore_checkpoint(directory, model: nnx.Module, optimizer: nnx.Optimizer | None = None, *,
                       step: int | None = None) -> int:
  """Restores a checkpoint in place into freshly built `model` (and `optimizer`).

  Build the objects exactly as for the saved run (same code, same arguments,
  same sharding: the restored arrays take the shardings of the targets'
  arrays), then restore; training continues bit-identically.

  Args:
    directory: the checkpoint directory given to `save_checkpoint`.
    model: target model; every NNX Variable is overwritten.
    optimizer: target optimizer, or None to restore the model only.
    step: which step; None restores the latest complete one.

  Returns:
    The restored step.

  Raises:
    FileNotFoundError: no complete checkpoint (for `step`) in `directory`.
    ValueError: the targets' state differs in structure, shape, dtype or PRNG
      implementation from the checkpoint, or the checkpoint has no optimizer
      state but an optimizer was given.
  """
  _check_objects(model, optimizer)
  directory = epath.Path(directory)
  step = _resolve_step(directory, step)
  path = directory / str(step)
  meta = _read_meta(path)
  targets = {_MODEL: model}
  if optimizer is not None:
    if _OPTIMIZER not in meta['leaves']:
      raise ValueError(f'{path} holds no optimizer state (saved with optimizer=None); restore '
                       'with optimizer=None.')
    targets[_OPTIMIZER] = optimizer

  plan, items = {}, {}
  for name, obj in targets.items():
    leaves, treedef = _leaves(obj)
    _check_compatible(name, meta['leaves'][name], leaves)
    plan[name] = (leaves, treedef)
    items[name] = ocp.args.StandardRestore(_nest({p: _abstract(leaf) for p, leaf in leaves}))
  with _checkpointer() as ckptr:
    restored = ckptr.restore(path, args=ocp.args.Composite(**items))

  for name, obj in targets.items():
    leaves, treedef = plan[name]
    values = [_from_stored(_lookup(restored[name], p), leaf) for p, leaf in leaves]
    state = nnx.state(obj)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, values))
    nnx.update(obj, state)
  return step


def read_extra(directory, step: int | None = None) -> dict | None:
  """The `extra` dict saved with a checkpoint (latest complete step by default)."""
  directory = epath.Path(directory)
  return _read_meta(directory / str(_resolve_step(directory, step)))['extra']


# ---------------------------------------------------------------------------
# packed export
# ---------------------------------------------------------------------------
def _hook_config(module) -> DotConfig | None:
  for attr, cls in (('dot_general', QuantizedDotGeneral),
                    ('conv_general_dilated', QuantizedConvGeneralDilated)):
    hook = getattr(module, attr, None)
    if isinstance(hook, cls):
      return hook.config
  return None


def _kernel_kept_axes(module, ndim: int) -> tuple[int, ...] | None:
  """Non-contracted kernel axes of the layer's GEMM (where a scale may vary)."""
  if isinstance(module, nnx.Conv):
    return (ndim - 1,)  # HWIO: one scale per output feature O (qtrain's ConvOp)
  if isinstance(module, nnx.Linear):
    return (1,)  # kernel [in, out], contracted on axis 0
  if isinstance(module, nnx.LinearGeneral):
    # kernel [*batch, *in_features, *out_features], contracted on the in_features axes.
    nb, n_in = len(module.batch_axis), len(module.in_features)
    return tuple(i for i in range(ndim) if not nb <= i < nb + n_in)
  return None


def _weight_rule(path: str, module, rule: TensorConfig, ndim: int) -> TensorConfig:
  """The forward rhs rule made concrete for the kernel, exactly as `qtrain.dot` does."""
  if isinstance(rule.granularity, scaling.PerChannel) and rule.granularity.axes is None:
    kept = _kernel_kept_axes(module, ndim)
    if kept is None:
      raise ValueError(f'{path}: PerChannel(axes=None) on a {type(module).__name__} needs the '
                       'GEMM layout; export knows it for nnx.Linear, LinearGeneral and Conv.')
  else:
    kept = _kernel_kept_axes(module, ndim) or tuple(range(ndim))
  return dot.resolve_rule(rule, kept, ndim, path)


def _nibble_kind(fmt: fmts.Format) -> str | None:
  """'signed' / 'unsigned' if every code is an integer that fits a nibble, else None."""
  v = fmt.values()
  if not np.all(v == np.round(v)):
    return None
  if v.min() >= -8 and v.max() <= 7:
    return 'signed'
  if v.min() >= 0 and v.max() <= 15:
    return 'unsigned'
  return None


def _entry(q: QArray, pack: bool) -> dict:
  codes = q.codes
  kind = _nibble_kind(q.format) if pack else None
  if kind is not None:
    if codes.shape[-1] % 2:  # pack_int4 pairs neighbours along the last axis
      codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, 1)])
    codes = pack_int4(codes, axis=-1)
  g = q.granularity
  return {
      'codes': np.asarray(codes),
      'scale': np.asarray(q.scale),
      'zero_point': None if q.zero_point is None else np.asarray(q.zero_point),
      'format': q.format.name,
      'packed': kind is not None,
      'shape': tuple(q.shape),
      'dtype': np.dtype(q.dtype).name,
      'channel_axes': tuple(g.axes) if isinstance(g, scaling.PerChannel) else None,
  }


def export_packed(model: nnx.Module,
                  configs: DotConfig | Mapping[str, DotConfig | None] | None = None, *,
                  pack: bool = True, key: jax.Array | None = None) -> dict[str, dict]:
  """Quantizes every quantized layer's kernel by its forward weight rule, for export.

  The codes and scales are exactly those the layer's forward GEMM multiplies
  (`config.fwd.rhs`, with PerChannel resolved to the output channels as in
  `qtrain.dot_general`), so `load_packed(entry).dequantize()` equals the
  fake-quantized kernel.

  Args:
    model: an NNX model. Layers are found by module path ('layers/0',
      'blocks/3/mlp', ...).
    configs: None uses each layer's quantization hook (`QuantizedDotGeneral` /
      `QuantizedConvGeneralDilated`; einsum and attention hooks are not
      exported); a DotConfig applies to every layer with a `kernel` and a
      `dot_general` or `conv_general_dilated` attribute; a dict maps module
      paths to DotConfigs (None skips the layer).
    pack: store integer codes that fit 4 bits two per byte (uint8, low nibble
      first, along the last axis, zero-padded to an even length).
    key: PRNG key, needed only if a weight rule is stochastic.

  Returns:
    {module path: entry}, each entry a dict of numpy arrays and plain values:
    'codes' (int8 / storage dtype, or uint8 if 'packed'), 'scale' (float32,
    rank of the kernel, size 1 on shared axes), 'zero_point' (None unless
    MinMax), 'format' (format name, e.g. 'int4'), 'packed', 'shape' (of the
    kernel), 'dtype' (of the kernel), 'channel_axes' (None = per tensor).
    Layers whose forward weight operand stays float are left out.

  Raises:
    ValueError: unknown paths in `configs`, a stochastic weight rule without
      `key`, or a rule the quantized dot cannot run (Lsq, PerBlock).
  """
  if configs is not None and not isinstance(configs, (DotConfig, Mapping)):
    raise TypeError(f'configs must be None, a DotConfig or a dict of them, got {configs!r}.')
  modules = {'/'.join(str(p) for p in path): m for path, m in nnx.iter_modules(model)}
  if isinstance(configs, Mapping):
    unknown = sorted(set(configs) - set(modules))
    if unknown:
      raise ValueError(f'configs names unknown module paths {unknown}; known: {sorted(modules)}.')
    for p, c in configs.items():
      if c is not None and not isinstance(c, DotConfig):
        raise TypeError(f'configs[{p!r}] must be a DotConfig or None, got {c!r}.')
  jobs = []  # (path, kernel, concrete rule)
  for path, module in modules.items():
    if isinstance(module, (QuantizedDotGeneral, QuantizedConvGeneralDilated)):
      continue
    if configs is None:
      config = _hook_config(module)
    elif isinstance(configs, DotConfig):
      # Layers with a kernel and a dot/conv hook point (hooks themselves have no kernel).
      hookable = hasattr(module, 'dot_general') or hasattr(module, 'conv_general_dilated')
      has_kernel = isinstance(getattr(module, 'kernel', None), nnx.Variable)
      config = configs if hookable and has_kernel else None
    else:
      config = configs.get(path)
    if config is None or config.fwd.rhs is None:
      continue
    kernel = getattr(module, 'kernel', None)
    if not isinstance(kernel, nnx.Variable):
      raise ValueError(f'{path}: a quantized {type(module).__name__} without a `kernel` '
                       'parameter cannot be exported.')
    kernel = kernel[...]
    rule = _weight_rule(path, module, config.fwd.rhs, kernel.ndim)
    if rule.samples != 1:
      raise ValueError(f'{path}: a weight rule with samples={rule.samples} has no single set '
                       'of codes to export.')
    if rule.stochastic and key is None:
      raise ValueError(f'{path}: the weight rule rounds stochastically; pass key=.')
    jobs.append((path, kernel, rule))
  quantized = _quantize_all([k for _, k, _ in jobs], tuple(r for _, _, r in jobs), key)
  return {path: _entry(q, pack) for (path, _, _), q in zip(jobs, quantized)}


@functools.partial(jax.jit, static_argnums=1)
def _quantize_all(kernels, rules, key):
  # One compiled computation for all kernels (eager quantize dispatches dozens
  # of small ops per kernel); the forward GEMM quantizes its weight under jit too.
  return [quantize(k, r, key=None if key is None else jax.random.fold_in(key, i))
          for i, (k, r) in enumerate(zip(kernels, rules))]


_FORMATS = {f.name: f for f in vars(fmts).values() if isinstance(f, fmts.Format)}


def _format_from_name(name: str) -> fmts.Format:
  if name in _FORMATS:
    return _FORMATS[name]
  if m := re.fullmatch(r'(u?)int(\d+)(n?)', name):
    return fmts.IntFormat(bits=int(m.group(2)), signed=not m.group(1), narrow=bool(m.group(3)))
  if m := re.fullmatch(r'fixed(\d+)\.(\d+)', name):
    return fmts.fixed_point(int(m.group(1)), int(m.group(2)))
  raise ValueError(f'format {name!r} is not a named qtrain format; pass fmt= to load_packed.')


def load_packed(entry: Mapping[str, Any], *, fmt: fmts.Format | None = None) -> QArray:
  """Turns an `export_packed` entry back into a `QArray` (codes unpacked).

  Args:
    entry: one value of `export_packed`'s result.
    fmt: the Format of the codes, needed only for formats without a
      registered name (custom log or float formats).

  Returns:
    A QArray whose `dequantize()` is the fake-quantized kernel.
  """
  missing = {'codes', 'scale', 'format', 'packed', 'shape', 'dtype'} - set(entry)
  if missing:
    raise ValueError(f'entry lacks the fields {sorted(missing)}.')
  fmt = fmt if fmt is not None else _format_from_name(entry['format'])
  if fmt.name != entry['format']:
    raise ValueError(f"fmt={fmt.name!r} does not match the entry's format {entry['format']!r}.")
  shape = tuple(entry['shape'])
  codes = jnp.asarray(entry['codes'])
  if entry['packed']:
    codes = unpack_int4(codes, axis=-1)[..., :shape[-1]]
    if _nibble_kind(fmt) == 'unsigned':  # unpack_int4 sign-extends nibbles 8..15
      codes = codes.astype(jnp.int16) & 0xF
  codes = codes.astype(fmt.storage_dtype)
  if codes.shape != shape:
    raise ValueError(f'codes have shape {codes.shape} after unpacking, entry says {shape}.')
  axes = entry.get('channel_axes')
  granularity = scaling.PerTensor() if axes is None else scaling.PerChannel(axes=tuple(axes))
  zp = entry.get('zero_point')
  return QArray(codes=codes, scale=jnp.asarray(entry['scale'], jnp.float32),
                zero_point=None if zp is None else jnp.asarray(zp, jnp.float32), format=fmt,
                granularity=granularity, dtype=jnp.dtype(entry['dtype']))


def packed_nbytes(exported: Mapping[str, Mapping[str, Any]]) -> int:
  """Bytes of codes, scales and zero points in an `export_packed` result."""
  total = 0
  for e in exported.values():
    for k in ('codes', 'scale', 'zero_point'):
      if e.get(k) is not None:
        total += int(math.prod(e[k].shape)) * np.dtype(e[k].dtype).itemsize
  return total
