"""Counter-based random bits for stochastic rounding.

Stochastic rounding needs one fresh random word per tensor element. Drawing
them with `jax.random.bits` ties the bits to JAX's own counter layout, which a
fused Pallas GPU kernel cannot reproduce cheaply. This module instead defines
the bits of element `i` directly as

    random_bits(key, shape, stream=s).ravel()[i]
        == threefry2x32(seed[0], seed[1], x0=i, x1=s)[0]

where `seed = seed_from_key(key)` and `i` is the row-major flat index. A kernel
that knows `(seed, i, s)` can therefore draw the identical word on its own, and
because every element is computed independently from an iota-derived global
index, the result does not depend on `jit`, on `vmap`, or on how GSPMD shards
the computation.

Everything is written with uint32 add, rotate and xor only (no 64-bit ops), so
`threefry2x32` itself can be called from inside a Pallas kernel.

These bits are deliberately *not* the same as `jax.random.bits(key, shape)`:
the point is a layout that is trivial to reproduce, not compatibility.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["threefry2x32", "seed_from_key", "random_bits", "uniform"]

# Random123 Threefry-2x32 rotation constants, used in groups of four rounds
# that alternate between the two rows.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
# Key-schedule parity constant from the Skein/Threefish specification.
_KEY_PARITY = 0x1BD11BDA
# 20 rounds = 5 groups of 4, with a key injection after each group.
_NUM_GROUPS = 5
# Counters and element indices are single uint32 words.
_MAX_SIZE = 2**32
# uniform() never uses more than 24 bits: every k * 2**-24 with k < 2**24 is
# exact in float32, so the largest value is 1 - 2**-24 and never rounds to 1.
_MAX_UNIFORM_BITS = 24


def _as_uint32(name: str, x: Any) -> jax.Array:
  """Returns `x` as a uint32 array, refusing silent conversions from other dtypes."""
  if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
    if not 0 <= int(x) < _MAX_SIZE:
      raise ValueError(f"`{name}` must fit in uint32, got {x}.")
    return jnp.uint32(x)
  dtype = getattr(x, "dtype", None)
  if dtype != np.uint32:
    got = type(x).__name__ if dtype is None else dtype
    raise TypeError(f"`{name}` must be a uint32 array, got {got}.")
  return x


def _rotate_left(x: jax.Array, distance: int) -> jax.Array:
  """Rotates each uint32 word of `x` left by a static `distance` in (0, 32)."""
  return lax.shift_left(x, np.uint32(distance)) | lax.shift_right_logical(
      x, np.uint32(32 - distance))


def threefry2x32(key0: jax.Array, key1: jax.Array, x0: jax.Array,
                 x1: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Threefry-2x32 block cipher with 20 rounds (Random123).

  Encrypts the counter block `(x0, x1)` under the key `(key0, key1)`
  elementwise. Uses only uint32 add, shift, or and xor so that the same code
  lowers inside a Pallas kernel. Matches `jax.random`'s internal threefry hash
  bit for bit.

  Args:
    key0: First key word, uint32 array (or Python int).
    key1: Second key word, uint32 array (or Python int).
    x0: First counter word, uint32 array (or Python int).
    x1: Second counter word, uint32 array (or Python int).

  Returns:
    `(y0, y1)`: the two uint32 output words, each with the broadcast shape of
    the four inputs.

  Raises:
    TypeError: If an array argument is not uint32.
    ValueError: If an int argument does not fit in uint32.

  Examples:
    >>> y0, y1 = threefry2x32(0, 0, 0, 0)
    >>> hex(int(y0)), hex(int(y1))
    ('0x6b200159', '0x99ba4efe')
  """
  key0 = _as_uint32("key0", key0)
  key1 = _as_uint32("key1", key1)
  x0 = _as_uint32("x0", x0)
  x1 = _as_uint32("x1", x1)

  # The third schedule word makes the xor of all three equal the parity
  # constant, so no key word is ever all-zero in every injection.
  ks = (key0, key1, key0 ^ key1 ^ np.uint32(_KEY_PARITY))
  x0 = x0 + ks[0]
  x1 = x1 + ks[1]
  for group in range(_NUM_GROUPS):
    for rotation in _ROTATIONS[group % 2]:
      x0 = x0 + x1
      x1 = _rotate_left(x1, rotation) ^ x0
    # Key injection s uses key words s and s+1 (mod 3) plus the counter s, so
    # that successive injections differ even for a symmetric key.
    s = group + 1
    x0 = x0 + ks[s % 3]
    x1 = x1 + ks[(s + 1) % 3] + np.uint32(s)
  return x0, x1


def _is_typed_key(key: Any) -> bool:
  dtype = getattr(key, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _is_two_uint32_words(x: Any) -> bool:
  shape = getattr(x, "shape", None)
  return shape is not None and len(shape) >= 1 and shape[-1] == 2 and x.dtype == np.uint32


def _bits_from_typed_key(key: jax.Array) -> jax.Array:
  """Draws two seed words from a typed key of a non-threefry implementation."""
  draw = lambda k: jax.random.bits(k, (2,), jnp.uint32)
  # jax.random.bits takes a single key; map it over any batch dimensions the
  # way jax.random does for key arrays, so seed_from_key(keys) equals
  # jax.vmap(seed_from_key)(keys).
  for _ in range(key.ndim):
    draw = jax.vmap(draw)
  return draw(key)


def seed_from_key(key: jax.Array) -> jax.Array:
  """Converts a JAX PRNG key into the two uint32 seed words used here.

  Args:
    key: A typed key (`jax.random.key(...)`) of any implementation, or a
      legacy raw key (`jax.random.PRNGKey(...)`, uint32 with trailing
      dimension 2). Leading batch dimensions are allowed.

  Returns:
    uint32 array of shape `key_batch_shape + (2,)`. For threefry keys (typed
    or legacy) this is the key data itself, so `jax.random.key(n)` and
    `jax.random.PRNGKey(n)` give the same seed. Other implementations
    (e.g. `rbg`) have no 2-word key data, so two words are drawn from the key
    with `jax.random.bits`; the seed then inherits that implementation's
    semantics, e.g. JAX's `rbg` gives different bits under `jax.vmap` than
    in a Python loop over the same keys (threefry keys do not).

  Raises:
    TypeError: If `key` is neither a typed key nor a uint32 array with
      trailing dimension 2.

  Examples:
    >>> seed_from_key(jax.random.key(3)).tolist()
    [0, 3]
  """
  if _is_typed_key(key):
    data = jax.random.key_data(key)
    if _is_two_uint32_words(data):
      return data
    return _bits_from_typed_key(key)
  if _is_two_uint32_words(key):
    return jnp.asarray(key)
  raise TypeError(
      "`key` must be a typed PRNG key (jax.random.key) or a legacy uint32[..., 2] key "
      f"(jax.random.PRNGKey); got {getattr(key, 'dtype', type(key))}"
      f"{list(key.shape) if hasattr(key, 'shape') else ''}.")


def _canonical_shape(shape: int | Sequence[int]) -> tuple[int, ...]:
  """Validates `shape` and returns it as a tuple of non-negative ints."""
  try:
    dims = (operator.index(shape),) if not isinstance(shape, Sequence) else tuple(
        operator.index(d) for d in shape)
  except TypeError as e:
    raise TypeError(f"`shape` must be an int or a sequence of ints, got {shape!r}.") from e
  if any(d < 0 for d in dims):
    raise ValueError(f"`shape` must have non-negative dimensions, got {dims}.")
  if math.prod(dims) >= _MAX_SIZE:
    raise ValueError(
        f"`shape` {dims} has {math.prod(dims)} elements; the element index is a single "
        "uint32 word, so the size must be < 2**32. Draw larger arrays in pieces with "
        "different keys or streams.")
  return dims


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """Row-major flat index of every element, as uint32, built from iotas.

  Built from `broadcasted_iota` rather than a reshaped `arange` so that GSPMD
  can partition it: each device computes only its own slice of the global
  index. The caller guarantees size < 2**32, so strides and sums fit in uint32.
  """
  index = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for dim in reversed(range(len(shape))):
    index = index + lax.broadcasted_iota(jnp.uint32, shape, dim) * np.uint32(stride)
    stride *= shape[dim]
  return index


def random_bits(key: jax.Array, shape: int | Sequence[int], *, stream: int = 0) -> jax.Array:
  """Uniform random uint32 words, one per element, from (seed, index, stream).

  Element with row-major flat index `i` gets
  `threefry2x32(seed[0], seed[1], x0=i, x1=stream)[0]` with
  `seed = seed_from_key(key)`, so a kernel can redraw it from `i` alone.

  Args:
    key: A single PRNG key, typed or legacy (see `seed_from_key`). Use
      `jax.vmap` for a batch of keys.
    shape: Output shape; the size must be < 2**32.
    stream: Names an independent stream of bits for the same key and element,
      e.g. one for stochastic underflow and another for stochastic rounding.
      A Python int in [0, 2**32).

  Returns:
    uint32 array of shape `shape`.

  Raises:
    TypeError: If `key` is not a PRNG key, or `shape` is not a shape.
    ValueError: If `key` is a batch of keys, `shape` has a negative dimension
      or 2**32 or more elements, or `stream` does not fit in uint32.

  Examples:
    >>> bits = random_bits(jax.random.key(0), (2, 3), stream=1)
    >>> bits.shape, bits.dtype
    ((2, 3), dtype('uint32'))
  """
  seed = seed_from_key(key)
  if seed.shape != (2,):
    raise ValueError(
        f"`key` must be a single key, got a batch of shape {seed.shape[:-1]}; use jax.vmap.")
  shape = _canonical_shape(shape)
  stream = operator.index(stream)
  if not 0 <= stream < _MAX_SIZE:
    raise ValueError(f"`stream` must be in [0, 2**32), got {stream}.")
  if math.prod(shape) == 0:
    return jnp.zeros(shape, jnp.uint32)
  bits, _ = threefry2x32(seed[0], seed[1], _flat_index(shape), np.uint32(stream))
  return bits


def uniform(key: jax.Array,
            shape: int | Sequence[int],
            *,
            stream: int = 0,
            dtype: Any = jnp.float32) -> jax.Array:
  """Uniform floats in [0, 1) from `random_bits`.

  Uses the top `b` bits of each word, `(bits >> (32 - b)) * 2**-b`, with
  `b = min(24, mantissa bits + 1)` of `dtype`, so every value is exact in
  `dtype` and the largest is `1 - 2**-b`: the result never rounds up to 1.0.
  For float32 that is `(bits >> 8) * 2**-24`.

  Args:
    key: A single PRNG key, typed or legacy (see `seed_from_key`).
    shape: Output shape; the size must be < 2**32.
    stream: Independent stream index, see `random_bits`.
    dtype: Floating output dtype.

  Returns:
    Array of `shape` and `dtype` with values in [0, 1).

  Raises:
    ValueError: If `dtype` is not a floating dtype, or as `random_bits`.
    TypeError: As `random_bits`.

  Examples:
    >>> u = uniform(jax.random.key(0), (1000,))
    >>> bool((u >= 0).all() & (u < 1).all())
    True
  """
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"`dtype` must be a floating dtype, got {dtype}.")
  num_bits = min(_MAX_UNIFORM_BITS, jnp.finfo(dtype).nmant + 1)
  bits = random_bits(key, shape, stream=stream)
  # The integer has at most 24 bits, so the float32 conversion and the scaling
  # by a power of two are exact; so is the final cast, by choice of num_bits.
  top = lax.shift_right_logical(bits, np.uint32(32 - num_bits))
  return (top.astype(jnp.float32) * np.float32(2.0**-num_bits)).astype(dtype)
