"""Quantized two-operand `einsum` on top of `qtrain.dot_general`.

`einsum('bd,df->bf', x, w, config=cfg, key=k)` is `jnp.einsum` whose one
contraction runs through `qtrain.dot_general`, so the forward and both
backward GEMMs are low-bit. The first operand is always the dot's lhs and
the second its rhs: `config.fwd.lhs` quantizes the first operand (the
activations in `nnx.Einsum`) and `config.fwd.rhs` the second (the kernel).

`jnp.einsum(..., _dot_general=...)` cannot give that guarantee: it puts the
operands in whichever order avoids a transpose (it tries (rhs, lhs) first),
which would hand the weight rule to the activations. So the subscripts are
resolved here into one `dot_general` plus reshapes, with `jnp.einsum`'s
semantics: labels in a single operand and not in the output are summed
first, repeated labels take the diagonal, and a shared label of size 1 on one
side broadcasts against the other.
"""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp

from qtrain import config as cfgs
from qtrain.dot import dot_general

__all__ = ['einsum', 'parse']

_ELLIPSIS = '...'


def _split(subscripts: str) -> tuple[list[str], str | None]:
  """Input terms and the output term (None when implicit) of an einsum string."""
  subscripts = subscripts.replace(' ', '')
  inputs, arrow, output = subscripts.partition('->')
  return inputs.split(','), (output if arrow else None)


def _check_term(term: str, where: str) -> None:
  body = term.replace(_ELLIPSIS, '', 1)
  if _ELLIPSIS in body or '.' in body:
    raise ValueError(f"einsum: {where} term {term!r} has a stray '.'; only one '...' is allowed.")
  bad = [c for c in body if not c.isalpha()]
  if bad:
    raise ValueError(f'einsum: {where} term {term!r} has invalid labels {bad}; use letters.')


def _expand(term: str, ndim: int, ellipsis: str, where: str) -> str:
  """Replaces '...' by the trailing `ndim - len(term) + 3` letters of `ellipsis`."""
  if _ELLIPSIS not in term:
    if len(term) != ndim:
      raise ValueError(f'einsum: {where} term {term!r} has {len(term)} labels for an operand '
                       f'of rank {ndim}.')
    return term
  n = ndim - (len(term) - len(_ELLIPSIS))
  if n < 0:
    raise ValueError(f'einsum: {where} term {term!r} has more labels than the operand has '
                     f'axes ({ndim}).')
  return term.replace(_ELLIPSIS, ellipsis[len(ellipsis) - n:] if n else '')


def parse(subscripts: str, lhs_ndim: int, rhs_ndim: int) -> tuple[str, str, str]:
  """Resolves a two-operand einsum string into explicit labels.

  Args:
    subscripts: e.g. 'bd,df->bf', '...qhd,...khd->...hqk' or implicit 'ij,jk'.
    lhs_ndim: rank of the first operand.
    rhs_ndim: rank of the second operand.

  Returns:
    (lhs labels, rhs labels, output labels), one letter per axis; '...' is
    replaced by letters unused elsewhere, right-aligned across operands as in
    NumPy broadcasting.

  Raises:
    ValueError: not exactly two operands, bad labels, ranks that do not
      match the terms, or output labels that are repeated or in no operand.
  """
  if not isinstance(subscripts, str):
    raise TypeError(f'einsum: subscripts must be a str, got {subscripts!r}.')
  inputs, output = _split(subscripts)
  if len(inputs) != 2:
    raise ValueError(f'einsum: {subscripts!r} has {len(inputs)} operands; qtrain.einsum '
                     'quantizes one contraction of exactly two (chain calls for more).')
  for term, where in zip(inputs + ([output] if output is not None else []),
                         ('first', 'second', 'output')):
    _check_term(term, where)
  used = set(''.join(inputs) + (output or ''))
  free = [c for c in string.ascii_letters if c not in used]
  n_ell = max(lhs_ndim, rhs_ndim)
  ellipsis = ''.join(free[:n_ell])
  lhs = _expand(inputs[0], lhs_ndim, ellipsis, 'first')
  rhs = _expand(inputs[1], rhs_ndim, ellipsis, 'second')
  if output is None:
    # NumPy's implicit mode: broadcast axes first, then the labels that
    # appear exactly once, in alphabetical order.
    counts = {c: (lhs + rhs).count(c) for c in set(lhs + rhs)}
    ell = ''.join(c for c in ellipsis if c in lhs or c in rhs)
    out = ell + ''.join(sorted(c for c, n in counts.items() if n == 1 and c not in ellipsis))
  else:
    n_out = max(len(lhs) - len(inputs[0].replace(_ELLIPSIS, '')),
                len(rhs) - len(inputs[1].replace(_ELLIPSIS, '')))
    out = output.replace(_ELLIPSIS, ellipsis[len(ellipsis) - n_out:] if n_out else '')
  if len(set(out)) != len(out):
    raise ValueError(f'einsum: output of {subscripts!r} repeats a label.')
  missing = [c for c in out if c not in lhs and c not in rhs]
  if missing:
    raise ValueError(f'einsum: output labels {missing} of {subscripts!r} are in no operand.')
  return lhs, rhs, out


def _squeeze_broadcast(x, names: str, other, other_names: str):
  """Drops size-1 axes of x whose label has size > 1 in the other operand (broadcasting)."""
  drop = [i for i, c in enumerate(names)
          if x.shape[i] == 1 and c in other_names and other.shape[other_names.index(c)] != 1]
  if not drop:
    return x, names
  return jnp.squeeze(x, drop), ''.join(c for i, c in enumerate(names) if i not in drop)


def _reduce(x, names: str, keep: str):
  """Takes diagonals of repeated labels and sums labels not in `keep` (one operand)."""
  target = ''.join(c for i, c in enumerate(names) if c in keep and c not in names[:i])
  if target == names:
    return x, names
  return jnp.einsum(f'{names}->{target}', x), target


def _dot_sharding(out_sharding, out: str, dot_names: str):
  """`out_sharding` re-laid out from the einsum output order to the dot's."""
  if out_sharding is None or dot_names == out:
    return out_sharding
  if isinstance(out_sharding, jax.sharding.NamedSharding):
    spec = tuple(out_sharding.spec) + (None,) * (len(out) - len(out_sharding.spec))
    perm = jax.sharding.PartitionSpec(*(spec[out.index(c)] for c in dot_names))
    return jax.sharding.NamedSharding(out_sharding.mesh, perm)
  if isinstance(out_sharding, jax.sharding.PartitionSpec):
    spec = tuple(out_sharding) + (None,) * (len(out) - len(out_sharding))
    return jax.sharding.PartitionSpec(*(spec[out.index(c)] for c in dot_names))
  raise NotImplementedError(f'einsum: out_sharding must be a NamedSharding or PartitionSpec, '
                            f'got {out_sharding!r}.')


def einsum(subscripts: str, *operands, precision=None, preferred_element_type=None,
           out_sharding=None, config: cfgs.DotConfig | None = None,
           key: jax.Array | None = None) -> jax.Array:
  """`jnp.einsum` of two operands whose contraction is a quantized `dot_general`.

  Signature-compatible with `nnx.Einsum`'s `einsum_op` hook (plus `config`
  and `key`). The first operand is the dot's lhs (quantized by
  `config.fwd.lhs`), the second its rhs (`config.fwd.rhs`), whatever the
  subscripts, so per-operand rules always land where they are meant to.

  Args:
    subscripts: two-operand einsum string, explicit ('bd,df->bf') or
      implicit ('ij,jk'), with '...' broadcasting.
    *operands: exactly two float arrays.
    precision: precision of high-precision GEMMs (as in `jnp.einsum`).
    preferred_element_type: output dtype (default: result type of the operands).
    out_sharding: NamedSharding or PartitionSpec of the output (einsum order).
    config: a `DotConfig`; None runs the plain contraction.
    key: PRNG key, required if any rule of `config` is stochastic.

  Returns:
    The einsum, shape and dtype as `jnp.einsum`'s.

  Raises:
    ValueError: not two operands, malformed subscripts, mismatched label sizes,
      or a stochastic config without key.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from qtrain import presets
    >>> from qtrain.einsum import einsum
    >>> x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
    >>> einsum('bd,df->bf', x, w, config=presets.int8(), key=jax.random.key(0)).shape
    (2, 4)
  """
  if len(operands) != 2:
    raise ValueError(f'einsum: expected two operands, got {len(operands)}.')
  lhs, rhs = (jnp.asarray(o) for o in operands)
  lhs_names, rhs_names, out = parse(subscripts, lhs.ndim, rhs.ndim)
  lhs, lhs_names = _squeeze_broadcast(lhs, lhs_names, rhs, rhs_names)
  rhs, rhs_names = _squeeze_broadcast(rhs, rhs_names, lhs, lhs_names)
  lhs, lhs_names = _reduce(lhs, lhs_names, rhs_names + out)
  rhs, rhs_names = _reduce(rhs, rhs_names, lhs_names + out)
  for c in set(lhs_names) & set(rhs_names):
    a, b = lhs.shape[lhs_names.index(c)], rhs.shape[rhs_names.index(c)]
    if a != b:
      raise ValueError(f'einsum: label {c!r} of {subscripts!r} has size {a} in the first '
                       f'operand and {b} in the second.')
  batch = ''.join(c for c in out if c in lhs_names and c in rhs_names)
  contract = ''.join(c for c in lhs_names if c in rhs_names and c not in out)
  lhs_free = ''.join(c for c in lhs_names if c not in rhs_names)
  rhs_free = ''.join(c for c in rhs_names if c not in lhs_names)
  axes = lambda names, labels: tuple(names.index(c) for c in labels)
  dims = ((axes(lhs_names, contract), axes(rhs_names, contract)),
          (axes(lhs_names, batch), axes(rhs_names, batch)))
  dot_names = batch + lhs_free + rhs_free
  y = dot_general(lhs, rhs, dims, precision, preferred_element_type, config=config, key=key,
                  out_sharding=_dot_sharding(out_sharding, out, dot_names))
  if dot_names != out:
    y = jnp.transpose(y, [dot_names.index(c) for c in out])
  return y
