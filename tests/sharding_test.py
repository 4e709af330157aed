"""Data-parallel training (examples/data_parallel.py) on 8 CPU devices vs one device.

Under jit (GSPMD) qtrain's per-tensor absmax of a batch-sharded tensor is a
global max, the counter-based SR noise is indexed by global element position,
and the int32 partial products of dW are summed across devices before
scaling, so the quantized training itself does not depend on the number of
devices. What can differ is a float sum over the batch, which 8 devices add
in a different order than one: the mean loss (only reported) and, with
biases, the bias gradients.
"""

import importlib.util
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import qtrain
from qtrain import checkpoint

_EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / 'examples' / 'data_parallel.py'
_spec = importlib.util.spec_from_file_location('data_parallel', _EXAMPLE)
dp = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dp)

STEPS, BATCH = 20, 64

needs_8 = pytest.mark.skipif(jax.device_count() < 8,
                             reason='needs 8 devices (tests/conftest.py sets them up on the CPU)')


def _summation_bound(losses: np.ndarray, n: int) -> np.ndarray:
  """Largest |difference| of two float32 means of the same n >= 0 terms summed in two orders.

  Any order of summing n terms has |fl(S) - S| <= γ_{n-1}·Σ|x_i| with
  γ_k = k·u / (1 - k·u), u = 2^-24 (Higham, Accuracy and Stability of
  Numerical Algorithms, §4.2); per-example cross-entropies are >= 0, so
  Σ|x_i| = S, and dividing by n = 64 is exact. Two orders differ by at most
  twice that; S is taken from the computed mean, inflated by (1 + γ) to cover
  its own rounding.
  """
  u = 2.0 ** -24
  gamma = (n - 1) * u / (1 - (n - 1) * u)
  return 2 * gamma * (1 + gamma) * np.abs(losses)


def _host(tree):
  """numpy copies of the leaves (typed PRNG keys as their key data), any sharding."""
  def leaf(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)
  return jax.tree.map(leaf, tree)


@needs_8
def test_int8_training_on_8_devices_is_bit_identical_without_biases(tmp_path):
  mesh8 = dp.make_mesh(jax.devices()[:8])
  losses8, model8 = dp.train(mesh8, steps=STEPS, batch_size=BATCH, use_bias=False)
  losses1, model1 = dp.train(dp.make_mesh(jax.devices()[:1]), steps=STEPS, batch_size=BATCH,
                             use_bias=False)
  # Parameters replicated over the 8 devices, the run really was data-parallel.
  kernel = model8.layers[0].kernel[...]
  assert kernel.sharding.is_fully_replicated and len(kernel.sharding.device_set) == 8
  # Every weight, quantization RNG counter and key equal bit for bit.
  chex.assert_trees_all_equal(_host(nnx.state(model8)), _host(nnx.state(model1)))
  losses8, losses1 = np.asarray(losses8), np.asarray(losses1)
  assert losses1[-1] < 0.8 * losses1[0]
  # The reported mean loss is the one float sum over the batch.
  np.testing.assert_array_less(np.abs(losses8 - losses1), _summation_bound(losses1, BATCH)
                               + np.finfo(np.float32).tiny)

  # A checkpoint written by the 8-device run restores onto one device and
  # onto 8: orbax lays the arrays out as the freshly built target's are.
  checkpoint.save_checkpoint(tmp_path, STEPS, model8)
  for mesh in (dp.make_mesh(jax.devices()[:1]), mesh8):
    with jax.set_mesh(mesh):
      fresh = dp.MLP(64, qtrain.presets.int8(), use_bias=False,
                     rngs=nnx.Rngs(params=0, quant=1))
      dp.replicate(mesh, fresh)
    assert checkpoint.restore_checkpoint(tmp_path, fresh) == STEPS
    chex.assert_trees_all_equal(_host(nnx.state(fresh)), _host(nnx.state(model1)))
    assert fresh.layers[0].kernel[...].sharding.device_set == set(mesh.devices.flat)


@pytest.mark.slow  # two more compilations of the train step (~10 s of CPU)
@needs_8
def test_example_as_shipped_matches_one_device_to_float_rounding():
  # With biases, dL/db = Σ_batch dY is a float sum in a different order on 8
  # devices, so the weights drift apart in the last bits (observed <= 1e-8
  # after 20 steps). Such a drift moves a quantization code only if a value
  # sits within a few ulps of a rounding boundary; it does not in this
  # deterministic run, so each loss still differs only by the summation bound.
  # If a code did flip, the losses would differ by about one quantization step,
  # far above the bound, and this test would say so.
  losses8, model8 = dp.train(dp.make_mesh(jax.devices()[:8]), steps=STEPS, batch_size=BATCH)
  losses1, model1 = dp.train(dp.make_mesh(jax.devices()[:1]), steps=STEPS, batch_size=BATCH)
  losses8, losses1 = np.asarray(losses8), np.asarray(losses1)
  np.testing.assert_array_less(np.abs(losses8 - losses1), _summation_bound(losses1, BATCH)
                               + np.finfo(np.float32).tiny)
  chex.assert_trees_all_close(_host(nnx.state(model8, nnx.Param)),
                              _host(nnx.state(model1, nnx.Param)), atol=1e-6, rtol=0)
  chex.assert_trees_all_equal(_host(nnx.state(model8, nnx.RngState)),
                              _host(nnx.state(model1, nnx.RngState)))


@needs_8
def test_shard_map_scale_is_per_shard_unless_pmax():
  x = np.array(jax.random.normal(jax.random.key(0), (64, 16)))
  x[3, 2] = 40.0  # an outlier on shard 0 only
  mesh = dp.make_mesh(jax.devices()[:8])
  reference = jax.jit(qtrain.fake_quant, static_argnums=1)(x, qtrain.formats.INT8)

  def per_shard(xs):
    return qtrain.fake_quant(xs, qtrain.formats.INT8)

  def global_scale(xs):
    amax = jax.lax.pmax(jnp.max(jnp.abs(xs)), 'data')
    return qtrain.fake_quant(xs, qtrain.formats.INT8, scale=amax / 127.0)

  xs = jax.device_put(x, NamedSharding(mesh, P('data')))

  def run(f):
    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P('data'), out_specs=P('data')))(xs)

  # Shards 1..7 never see the outlier: their scale is finer than the global one.
  assert not np.array_equal(np.asarray(run(per_shard)), np.asarray(reference))
  chex.assert_trees_all_equal(run(global_scale), reference)
