"""Tests for pallas_kernels.dispatch and its use by qtrain.dot_general(implementation=...).

The kernels are counted in the jaxpr (one `mpmd_map` equation per
`plgpu.kernel` call), so a test of "the kernel ran" can fail.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pallas_kernels import dispatch
from pallas_kernels import int8_matmul as im
from qtrain import dot as qdot
from qtrain import presets

_KERNEL = 'mpmd_map'  # the primitive of a plgpu.kernel call in jax 0.11.2


def _count(fn, *args, prim=_KERNEL) -> int:
  def walk(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
      n += eqn.primitive.name == prim
      for param in eqn.params.values():
        for sub in (param if isinstance(param, (list, tuple)) else (param,)):
          if isinstance(sub, jax.extend.core.ClosedJaxpr):
            n += walk(sub.jaxpr)
          elif isinstance(sub, jax.extend.core.Jaxpr):
            n += walk(sub)
    return n
  return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def test_resolve_picks_xla_on_cpu_and_honours_overrides(monkeypatch):
  monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
  assert dispatch.resolve_implementation(None) == 'xla'
  assert dispatch.resolve_implementation('interpret') == 'interpret'
  monkeypatch.setenv(dispatch.ENV_VAR, 'interpret')
  assert dispatch.resolve_implementation(None) == 'interpret'
  monkeypatch.setenv(dispatch.ENV_VAR, 'cuda')
  with pytest.raises(ValueError, match=r"\$QTRAIN_IMPL='cuda' is unknown"):
    dispatch.resolve_implementation(None)
  with pytest.raises(ValueError, match="implementation='triton' is unknown"):
    dispatch.resolve_implementation('triton')
  with pytest.raises(ValueError, match="'pallas' needs a GPU"):
    dispatch.resolve_implementation('pallas')


def test_matmul_auto_is_xla_on_cpu_and_interpret_runs_the_kernel(monkeypatch):
  monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
  rng = np.random.default_rng(0)
  a = rng.integers(-127, 128, (128, 128)).astype(np.int8)
  b = rng.integers(-127, 128, (128, 256)).astype(np.int8)
  sa, sb = np.float32(0.01), rng.uniform(0.5, 1, 256).astype(np.float32)
  run = lambda impl: functools.partial(dispatch.matmul, a_scale=sa, b_scale=sb,
                                       implementation=impl)
  assert _count(run(None), a, b) == 0
  assert _count(run('interpret'), a, b) == 1
  got = jax.jit(run('interpret'))(a, b)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.jit(run(None))(a, b)))
  with pytest.raises(ValueError, match='int8 x float32'):
    dispatch.matmul(a, b.astype(np.float32))


def _qloss(config, impl, x, w, key):
  y = qdot.dot_general(x, w, (((2,), (0,)), ((), ())), config=config, key=key,
                       implementation=impl)
  return jnp.sum(y * jnp.cos(y)), y


@pytest.mark.parametrize('preset', ['int8', 'int4'])
def test_qtrain_dot_general_interpret_equals_xla(preset):
  """Forward and both gradients bit for bit; all three GEMMs ran on the kernel."""
  config = presets.int8() if preset == 'int8' else presets.int4()
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 64, 256)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((256, 256)), jnp.float32)
  key = jax.random.key(2)
  results = {}
  for impl in ('xla', 'interpret'):
    f = jax.value_and_grad(functools.partial(_qloss, config, impl), argnums=(0, 1), has_aux=True)
    assert _count(f, x, w, key) == (3 if impl == 'interpret' else 0)
    results[impl] = jax.jit(f)(x, w, key)
  (_, y_xla), g_xla = results['xla']
  (_, y_int), g_int = results['interpret']
  np.testing.assert_array_equal(np.asarray(y_int), np.asarray(y_xla))
  for gi, gx in zip(g_int, g_xla):
    np.testing.assert_array_equal(np.asarray(gi), np.asarray(gx))


def test_off_tile_shapes_and_batch_dims_fall_back_to_xla():
  rng = np.random.default_rng(3)
  key = jax.random.key(0)
  x = jnp.asarray(rng.standard_normal((2, 64, 96)), jnp.float32)  # K=96: off the tile
  w = jnp.asarray(rng.standard_normal((96, 256)), jnp.float32)
  f = functools.partial(_qloss, presets.int8(), 'interpret')
  assert _count(f, x, w, key) == 0
  xb = jnp.asarray(rng.standard_normal((2, 128, 128)), jnp.float32)
  wb = jnp.asarray(rng.standard_normal((2, 128, 256)), jnp.float32)
  batched = lambda x, w: qdot.dot_general(x, w, (((2,), (1,)), ((0,), (0,))),
                                          config=presets.int8(), key=key,
                                          implementation='interpret')
  assert _count(batched, xb, wb) == 0
  with pytest.raises(ValueError, match="implementation='gpu' is unknown"):
    qdot.dot_general(x, w, (((2,), (0,)), ((), ())), config=presets.int8(), key=key,
                     implementation='gpu')


def test_convolutions_stay_on_xla(monkeypatch):
  monkeypatch.setenv(dispatch.ENV_VAR, 'interpret')
  x = jnp.ones((2, 8, 8, 128), jnp.float32)
  w = jnp.ones((1, 1, 128, 256), jnp.float32)
  conv = lambda x, w: qdot.conv_general_dilated(
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      config=presets.int8(gradient_rounding='nearest'), int_carrier='native')
  assert _count(jax.grad(lambda x, w: jnp.sum(conv(x, w)), argnums=(0, 1)), x, w) == 0


def _mesh8():
  return jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Explicit,))


def test_sharded_int8_matmul_uses_a_global_scale():
  """8 devices, outlier in shard 0 only: equals the one-device global-scale product."""
  mesh = _mesh8()
  rng = np.random.default_rng(4)
  x = rng.standard_normal((1024, 256)).astype(np.float32)
  x[3, 5] = 40.0
  w = rng.standard_normal((256, 256)).astype(np.float32)
  xs = jax.device_put(x, NamedSharding(mesh, P('data', None)))
  got = jax.jit(functools.partial(dispatch.sharded_int8_matmul, mesh=mesh, axis='data',
                                  implementation='xla'))(xs, w)
  assert got.sharding.spec == P('data', None)
  qx, sx = dispatch._int8_tensor_quantize(jnp.asarray(x), None)
  qw, sw = dispatch._int8_tensor_quantize(jnp.asarray(w), None)
  want = im.reference(qx, qw, a_scale=sx, b_scale=sw)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # Per-shard scales (no pmax) would give other numbers: the test can fail.
  per_shard = []
  for i in range(8):
    q, s = dispatch._int8_tensor_quantize(jnp.asarray(x[i * 128:(i + 1) * 128]), None)
    per_shard.append(np.asarray(im.reference(q, qw, a_scale=s, b_scale=sw)))
  assert not np.array_equal(np.concatenate(per_shard), np.asarray(want))


def test_sharded_matmul_per_row_and_column_scales_on_8_devices():
  mesh = _mesh8()
  rng = np.random.default_rng(5)
  a = rng.integers(-127, 128, (1024, 128)).astype(np.int8)
  b = rng.integers(-127, 128, (128, 256)).astype(np.int8)
  sa = rng.uniform(1e-3, 2e-3, 1024).astype(np.float32)
  sb = rng.uniform(1e-3, 2e-3, 256).astype(np.float32)
  a_s = jax.device_put(a, NamedSharding(mesh, P('data', None)))
  sa_s = jax.device_put(sa, NamedSharding(mesh, P('data')))
  got = jax.jit(lambda a, sa: dispatch.sharded_matmul(
      a, b, mesh=mesh, a_scale=sa, b_scale=sb, row_axis='data', out_dtype=jnp.bfloat16,
      implementation='xla'))(a_s, sa_s)
  want = im.reference(a, b, a_scale=sa, b_scale=sb, out_dtype=jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_interpret_kernel_runs_under_shard_map_on_one_device():
  """Interpret mode under shard_map works on a 1-device mesh (it fails with 8: module doc)."""
  mesh = jax.make_mesh((1,), ('data',), axis_types=(jax.sharding.AxisType.Explicit,),
                       devices=jax.devices()[:1])
  rng = np.random.default_rng(6)
  a = rng.integers(-127, 128, (128, 128)).astype(np.int8)
  b = rng.integers(-127, 128, (128, 256)).astype(np.int8)
  run = functools.partial(dispatch.sharded_matmul, mesh=mesh, a_scale=np.float32(0.5),
                          row_axis='data', implementation='interpret')
  a_s = jax.device_put(a, NamedSharding(mesh, P('data', None)))
  b_s = jax.device_put(b, NamedSharding(mesh, P()))
  got = jax.jit(run)(a_s, b_s)
  np.testing.assert_array_equal(np.asarray(got),
                                np.asarray(im.reference(a, b, a_scale=np.float32(0.5))))


# ---------------------------------------------------------------------------
# qtrain.quantize dispatch (the fused quantize kernels)
# ---------------------------------------------------------------------------
@pytest.mark.parametrize('rounding', ['nearest', 'stochastic'])
def test_qtrain_quantize_interpret_equals_xla(rounding):
  from qtrain import config as qcfg
  from qtrain import formats as qfmts
  import qtrain
  x = jax.random.normal(jax.random.key(4), (128, 256), jnp.float32) * 2 + 0.3
  cfg = qcfg.TensorConfig(format=qfmts.INT8, rounding=rounding)
  key = jax.random.key(9) if rounding == 'stochastic' else None
  want = qtrain.quantize(x, cfg, key=key, implementation='xla')
  got = jax.jit(lambda v: qtrain.quantize(v, cfg, key=key, implementation='interpret'))(x)
  ref = jax.jit(lambda v: qtrain.quantize(v, cfg, key=key))(x)  # auto on CPU = XLA
  np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(ref.codes))
  np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(ref.scale))
  assert np.mean(np.asarray(got.codes) != np.asarray(want.codes)) < 1e-3  # eager x/s vs x*(1/s)
  with pytest.raises(ValueError, match='implementation'):
    qtrain.quantize(x, cfg, key=key, implementation='cuda')
