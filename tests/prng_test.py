"""Tests for qtrain.prng: Threefry correctness, key handling, determinism, statistics."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# JAX's own Threefry implementation is the bit-exact oracle.
from jax._src.random.threefry2x32 import threefry_2x32 as jax_threefry_2x32

from qtrain import prng

# Random123 known-answer vectors for Threefry-2x32-20: (key, counter, output).
_KNOWN_ANSWERS = (
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
)


def _random_words(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  return rng.integers(0, 2**32, size=shape, dtype=np.uint32)


def _oracle(key0: jax.Array, key1: jax.Array, x0: jax.Array,
            x1: jax.Array) -> tuple[jax.Array, jax.Array]:
  """JAX's threefry for scalar keys: it hashes counts[:n] and counts[n:] as (x0, x1)."""
  n = x0.shape[0]
  out = jax_threefry_2x32((key0, key1), jnp.concatenate([x0, x1]))
  return out[:n], out[n:]


@pytest.mark.parametrize("key, ctr, expected", _KNOWN_ANSWERS)
def test_threefry_known_answers(key, ctr, expected):
  words = lambda pair: [np.uint32(w) for w in pair]
  got = prng.threefry2x32(*words(key), *words(ctr))
  oracle = _oracle(*words(key), np.uint32(ctr[:1]), np.uint32(ctr[1:]))
  # The vectors were typed in by hand: check them against JAX as well.
  assert [int(o[0]) for o in oracle] == list(expected)
  assert [int(g) for g in got] == list(expected)


def test_threefry_matches_jax_scalar_keys():
  rng = np.random.default_rng(0)
  for _ in range(4):
    key0, key1 = _random_words(rng, (2,))
    x0, x1 = _random_words(rng, (2, 4096))
    got = prng.threefry2x32(key0, key1, x0, x1)
    chex.assert_trees_all_equal(got, _oracle(key0, key1, x0, x1))


def test_threefry_matches_jax_elementwise_keys():
  rng = np.random.default_rng(1)
  keys0, keys1 = _random_words(rng, (2, 256))
  x0, x1 = _random_words(rng, (2, 256, 64))
  got = prng.threefry2x32(keys0[:, None], keys1[:, None], x0, x1)
  want = jax.vmap(_oracle)(keys0, keys1, x0, x1)
  chex.assert_trees_all_equal(got, want)


def test_threefry_broadcasts_and_accepts_ints():
  y0, y1 = prng.threefry2x32(0, 0, jnp.zeros((3, 1), jnp.uint32), jnp.zeros((1, 5), jnp.uint32))
  chex.assert_shape((y0, y1), (3, 5))
  assert (np.asarray(y0) == 0x6B200159).all() and (np.asarray(y1) == 0x99BA4EFE).all()


@pytest.mark.parametrize("bad", [jnp.zeros(3, jnp.int32), np.zeros(3, np.float32), 1.5])
def test_threefry_rejects_non_uint32(bad):
  with pytest.raises(TypeError, match="x0"):
    prng.threefry2x32(0, 0, bad, 0)


def test_threefry_rejects_out_of_range_int():
  with pytest.raises(ValueError, match="key1"):
    prng.threefry2x32(0, 2**32, 0, 0)


def test_threefry_jits():
  rng = np.random.default_rng(2)
  args = tuple(_random_words(rng, (4, 100)))
  chex.assert_trees_all_equal(jax.jit(prng.threefry2x32)(*args), prng.threefry2x32(*args))


def test_random_bits_is_threefry_of_flat_index():
  key = jax.random.key(7)
  seed = prng.seed_from_key(key)
  index = np.arange(3 * 5 * 2, dtype=np.uint32).reshape(3, 5, 2)
  for stream in (0, 1, 2**32 - 1):
    want, _ = prng.threefry2x32(seed[0], seed[1], index, np.uint32(stream))
    chex.assert_trees_all_equal(prng.random_bits(key, (3, 5, 2), stream=stream), want)


def test_random_bits_prefix_is_stable_across_shapes():
  # Element i depends only on i, so a flat draw is a prefix of a longer one.
  key = jax.random.key(3)
  chex.assert_trees_all_equal(
      prng.random_bits(key, (4, 6)).ravel(), prng.random_bits(key, 100)[:24])


def test_typed_and_legacy_keys_agree():
  for seed in (0, 1, 123456789):
    typed = prng.random_bits(jax.random.key(seed), (8, 8))
    legacy = prng.random_bits(jax.random.PRNGKey(seed), (8, 8))
    wrapped = prng.random_bits(jax.random.wrap_key_data(jax.random.PRNGKey(seed)), (8, 8))
    chex.assert_trees_all_equal(typed, legacy, wrapped)


def test_seed_from_key_threefry_is_key_data():
  key = jax.random.key(42)
  chex.assert_trees_all_equal(prng.seed_from_key(key), jax.random.key_data(key))
  chex.assert_trees_all_equal(prng.seed_from_key(jax.random.PRNGKey(42)), jax.random.PRNGKey(42))


def test_seed_from_key_other_impl():
  key = jax.random.key(0, impl="rbg")
  seed = prng.seed_from_key(key)
  chex.assert_shape(seed, (2,))
  chex.assert_type(seed, jnp.uint32)
  chex.assert_trees_all_equal(seed, jax.jit(prng.seed_from_key)(key))
  other = prng.seed_from_key(jax.random.key(1, impl="rbg"))
  assert not np.array_equal(seed, other)
  chex.assert_trees_all_equal(seed, jax.random.bits(key, (2,), jnp.uint32))
  # A batch of such keys is mapped like jax.random maps key arrays, i.e. as
  # vmap does. (JAX's rbg itself differs between vmap and a loop.)
  keys = jax.random.split(key, 3)
  chex.assert_trees_all_equal(prng.seed_from_key(keys), jax.vmap(prng.seed_from_key)(keys))
  chex.assert_shape(prng.seed_from_key(keys.reshape(1, 3)), (1, 3, 2))


def test_seed_from_key_batched():
  keys = jax.random.split(jax.random.key(0), 5)
  chex.assert_trees_all_equal(prng.seed_from_key(keys), jax.random.key_data(keys))
  chex.assert_shape(prng.seed_from_key(jax.random.split(jax.random.PRNGKey(0), 5)), (5, 2))


@pytest.mark.parametrize("bad", [
    None,
    1.0,
    0,
    np.zeros(2, np.float32),
    jnp.zeros(2, jnp.int32),
    jnp.zeros(3, jnp.uint32),
    jnp.zeros((), jnp.uint32),
    [0, 0],
])
def test_seed_from_key_rejects_non_keys(bad):
  with pytest.raises(TypeError, match="key"):
    prng.seed_from_key(bad)
  with pytest.raises(TypeError, match="key"):
    prng.random_bits(bad, (2,))


def test_random_bits_rejects_batched_key():
  with pytest.raises(ValueError, match="key"):
    prng.random_bits(jax.random.split(jax.random.key(0), 2), (2,))


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
@pytest.mark.parametrize("fn", [prng.random_bits, prng.uniform])
def test_jit_matches_eager(fn, impl):
  key = jax.random.key(5, impl=impl)
  for stream in (0, 3):
    eager = fn(key, (17, 33), stream=stream)
    jitted = jax.jit(lambda k, s=stream: fn(k, (17, 33), stream=s))(key)
    chex.assert_trees_all_equal(eager, jitted)


@pytest.mark.parametrize("make_keys", [
    lambda: jax.random.split(jax.random.key(9), 6),
    lambda: jax.random.split(jax.random.PRNGKey(9), 6),
])
def test_vmap_matches_loop(make_keys):
  keys = make_keys()
  batched = jax.vmap(lambda k: prng.uniform(k, (4, 10), stream=1))(keys)
  looped = np.stack([prng.uniform(k, (4, 10), stream=1) for k in keys])
  chex.assert_trees_all_equal(batched, looped)


def test_streams_and_keys_differ():
  key = jax.random.key(0)
  by_stream = [np.asarray(prng.random_bits(key, (1024,), stream=s)) for s in range(3)]
  by_key = [np.asarray(prng.random_bits(jax.random.key(s), (1024,))) for s in (1, 2)]
  draws = by_stream + by_key
  for i in range(len(draws)):
    # Distinct words within one draw, too: the index is really varying.
    assert len(np.unique(draws[i])) > 1000
    for j in range(i):
      # Independent 32-bit words collide at rate 2**-32, so equal words flag a bug.
      assert (draws[i] == draws[j]).sum() <= 1


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), 0])
def test_empty_and_scalar_shapes(shape):
  key = jax.random.key(0)
  bits = prng.random_bits(key, shape)
  want_shape = (shape,) if isinstance(shape, int) else shape
  chex.assert_shape(bits, want_shape)
  chex.assert_type(bits, jnp.uint32)
  chex.assert_shape(jax.jit(lambda k: prng.uniform(k, shape))(key), want_shape)
  if shape == ():
    # A scalar is element 0.
    seed = prng.seed_from_key(key)
    assert int(bits) == int(prng.threefry2x32(seed[0], seed[1], np.uint32(0), np.uint32(0))[0])


@pytest.mark.parametrize("shape", [(2**32,), (2**16, 2**16), (2**31, 3), (-1, 2)])
def test_bad_shape_raises(shape):
  with pytest.raises(ValueError, match="shape"):
    prng.random_bits(jax.random.key(0), shape)


def test_shape_with_huge_zero_dim_is_empty():
  chex.assert_shape(prng.random_bits(jax.random.key(0), (0, 2**40)), (0, 2**40))


def test_bad_stream_raises():
  with pytest.raises(ValueError, match="stream"):
    prng.random_bits(jax.random.key(0), (2,), stream=-1)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint32, jnp.bool_, jnp.complex64])
def test_uniform_rejects_non_float_dtype(dtype):
  with pytest.raises(ValueError, match="dtype"):
    prng.uniform(jax.random.key(0), (2,), dtype=dtype)


def test_uniform_is_top_24_bits():
  key = jax.random.key(11)
  bits = np.asarray(prng.random_bits(key, (500,), stream=2))
  want = (bits >> 8).astype(np.float64) * 2.0**-24
  got = prng.uniform(key, (500,), stream=2)
  chex.assert_type(got, jnp.float32)
  np.testing.assert_array_equal(np.asarray(got, np.float64), want)


def test_uniform_statistics():
  n = 200_000
  u = np.asarray(prng.uniform(jax.random.key(2024), (n,)), np.float64)
  assert u.min() >= 0.0 and u.max() < 1.0
  assert abs(u.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
  assert scipy.stats.kstest(u, "uniform").pvalue > 1e-3


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_uniform_never_reaches_one(dtype):
  u = prng.uniform(jax.random.key(1), (4096,), dtype=dtype)
  chex.assert_type(u, dtype)
  u = np.asarray(u, np.float32)
  assert u.min() >= 0.0 and u.max() < 1.0
  # The all-ones word gives the largest value; it must stay below 1 in dtype.
  num_bits = min(24, jnp.finfo(dtype).nmant + 1)
  largest = np.float32((2**num_bits - 1) * 2.0**-num_bits)
  assert float(jnp.asarray(largest, dtype)) < 1.0


def test_sharded_matches_unsharded():
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
  mesh = jax.make_mesh((8,), ("data",))
  sharding = NamedSharding(mesh, P("data", None))
  key = jax.random.key(17)
  fn = lambda k: prng.uniform(k, (64, 32), stream=1)
  sharded_fn = jax.jit(fn, out_shardings=sharding)
  sharded = sharded_fn(key)
  assert sharded.sharding.is_equivalent_to(sharding, 2)
  chex.assert_trees_all_equal(np.asarray(sharded), np.asarray(fn(key)))
  for shard in sharded.addressable_shards:
    np.testing.assert_array_equal(shard.data, np.asarray(fn(key))[shard.index])
  # Each device computes its own rows from the global iota: no communication.
  hlo = sharded_fn.lower(key).compile().as_text()
  assert "all-gather" not in hlo and "all-to-all" not in hlo


def test_threefry_in_pallas_kernel_matches_random_bits():
  # The reason this module exists: a kernel redraws the bits of its own tile
  # from (seed, global index, stream). Interpret mode only checks that it
  # traces inside a kernel body; the Triton/Mosaic lowering needs a GPU.
  from jax.experimental import pallas as pl

  key = jax.random.key(3)
  rows, cols, block_rows, stream = 64, 32, 8, 1

  def kernel(seed_ref, out_ref):
    row0 = (pl.program_id(0) * block_rows).astype(jnp.uint32)
    row = jax.lax.broadcasted_iota(jnp.uint32, (block_rows, cols), 0) + row0
    col = jax.lax.broadcasted_iota(jnp.uint32, (block_rows, cols), 1)
    bits, _ = prng.threefry2x32(seed_ref[0], seed_ref[1], row * np.uint32(cols) + col,
                                np.uint32(stream))
    out_ref[...] = bits

  out = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((rows, cols), jnp.uint32),
      grid=(rows // block_rows,),
      out_specs=pl.BlockSpec((block_rows, cols), lambda i: (i, 0)),
      interpret=True,
  )(prng.seed_from_key(key))
  chex.assert_trees_all_equal(out, prng.random_bits(key, (rows, cols), stream=stream))
