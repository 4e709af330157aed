"""Tests for per-layer state carried across steps through the quantized backward pass.

`scaling.StatefulCalibration` dY rules get their state as `grad_state` of
`qtrain.dot_general`/`conv_general_dilated` and return the new state as its
cotangent; NNX hooks keep it in `nnx_hooks.GradState` variables.

The loss Σ y·c_t makes dY = c_t exactly, so the state after N steps can be
checked against a numpy oracle of the update run on the known dY sequence.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import recipe_training_testlib as training
from qtrain import checkpoint as ckpt
from qtrain import clipping
from qtrain import config as cfgs
from qtrain import formats
from qtrain import gvq
from qtrain import nnx_hooks
from qtrain import presets
from qtrain import scaling
from qtrain.dot import (conv_general_dilated, conv_general_dilated_grad_state, dot_general,
                        dot_general_grad_state)
from qtrain.model import quantize_model
from qtrain.quantize import quantize
from qtrain.recipes.papers.da_int8 import da_int8, da_int8_config
from qtrain.recipes.papers.unified_int8 import unified_int8_config

DN = (((1,), (0,)), ((), ()))
CONV_DN = ('NHWC', 'HWIO', 'NHWC')


# ----------------------------------------------------------------- helpers


@dataclasses.dataclass(frozen=True, kw_only=True)
class _CountingAbsMax(scaling.StatefulCalibration):
  """AbsMax plus a step counter: stateful, but the same scale as AbsMax()."""

  def init_state(self, shape, granularity):
    return {'count': jnp.zeros((), jnp.float32)}

  def compute(self, x, fmt, granularity, state):
    scale, zp = scaling.compute_scale(x, fmt, scaling.AbsMax(), granularity)
    return scale, zp, {'count': state['count'] + 1.0}


def _dy_sequence(shape, steps, seed=0):
  """dY per step: channels (last axis) Gaussian or sparse (inverted-T), magnitudes varying."""
  rng = np.random.default_rng(seed)
  out = []
  for t in range(steps):
    g = rng.normal(size=shape)
    sparse = rng.random(size=shape) < 0.03
    g[..., ::2] = np.where(sparse[..., ::2], rng.normal(size=shape)[..., ::2] * 20, 0.0)
    g *= 10.0 ** rng.uniform(-1, 1)  # the max varies, so the EMA differs from max|g|
    out.append(np.asarray(g, np.float32))
  return out


def _mcs_oracle(gs, lam=gvq.LAMBDA, k=gvq.K, a=gvq.A):
  """numpy MCS EMA per output channel (last axis) over the dY sequence gs."""
  clip, count = np.zeros(gs[0].shape[-1]), 0
  for g in gs:
    g = np.asarray(g, np.float64).reshape(-1, g.shape[-1])
    amax = np.abs(g).max(0)
    sigma = np.sqrt(((g - g.mean(0)) ** 2).mean(0))
    frac = (np.abs(g) > sigma).mean(0)
    clip = np.where((frac > lam) | (count == 0), amax, (1 - k * a) * clip + a * amax)
    count += 1
  return clip, count


def _linear_model(config, features=(16, 6)):
  model = nnx.Linear(*features, rngs=nnx.Rngs(0))
  return quantize_model(model, config, rngs=nnx.Rngs(quant=1))


def _step_fn():
  """One jitted SGD step on loss Σ model(x)·c: dY = c; writes the new GradState back."""

  def loss(model, x, c):
    return jnp.sum(model(x) * c)

  @nnx.jit
  def step(model, opt, x, c):
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx_hooks.GRAD_STATE_WRT))(model, x, c)
    nnx_hooks.apply_grad_state(model, grads)
    opt.update(model, grads)

  return loss, step


def _drhs_clip(model_or_hook):
  return np.asarray(model_or_hook.grad_state_value()['drhs']['clip'])


# ----------------------------------------------------------------- no state: unchanged


def test_stateless_configs_have_no_state_and_no_grad_state_variable():
  for config in (presets.int8(), da_int8_config(ema=False), unified_int8_config()):
    assert config.stateful_slots == ()
    assert dot_general_grad_state(jnp.ones((2, 3)), jnp.ones((3, 4)), DN, config=config) is None
  model = _linear_model(presets.int8())
  assert not nnx_hooks.has_grad_state(model)
  assert not hasattr(model.dot_general, 'grad_state')
  assert not nnx.state(model, nnx_hooks.GradState)


def test_stateful_rule_with_the_same_scale_is_bit_identical_to_the_stateless_rule():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
  key = jax.random.key(0)
  base = presets.int8()
  stateful = dataclasses.replace(base, drhs=dataclasses.replace(
      base.drhs, rhs=dataclasses.replace(base.drhs.rhs, calibration=_CountingAbsMax())))
  state = dot_general_grad_state(x, w, DN, config=stateful)

  def loss(a, b, s, config):
    return jnp.sum(jnp.sin(dot_general(a, b, DN, config=config, key=key, grad_state=s)))

  v0, g0 = jax.jit(jax.value_and_grad(lambda a, b: loss(a, b, None, base), (0, 1)))(x, w)
  v1, g1 = jax.jit(jax.value_and_grad(lambda a, b, s: loss(a, b, s, stateful), (0, 1, 2)))(
      x, w, state)
  np.testing.assert_array_equal(v0, v1)
  np.testing.assert_array_equal(g0[0], g1[0])
  np.testing.assert_array_equal(g0[1], g1[1])
  assert float(g1[2]['drhs']['count']) == 1.0


# ----------------------------------------------------------------- errors


def test_missing_or_unexpected_state_raises_clearly():
  x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
  config = da_int8_config()
  with pytest.raises(ValueError, match='needs their per-layer state'):
    dot_general(x, w, DN, config=config)
  with pytest.raises(ValueError, match='exactly the keys'):
    dot_general(x, w, DN, config=config, grad_state={'dlhs': {}})
  with pytest.raises(ValueError, match='no StatefulCalibration'):
    dot_general(x, w, DN, config=presets.int8(), key=jax.random.key(0), grad_state={})
  bad = {'drhs': {'clip': jnp.zeros((1, 5)), 'count': jnp.zeros(())}}
  with pytest.raises(ValueError, match='does not fit dY'):
    jax.grad(lambda a: dot_general(a, w, DN, config=config, grad_state=bad).sum())(x)
  with pytest.raises(TypeError, match='float32'):
    dot_general(x, w, DN, config=config,
                grad_state={'drhs': {'clip': jnp.zeros((1, 4), jnp.int32),
                                     'count': jnp.zeros(())}})


def test_stateful_calibration_is_rejected_outside_the_dy_slots_and_by_compute_scale():
  rule = cfgs.TensorConfig(format=formats.INT8, calibration=gvq.MagnitudeAwareClipEMA())
  with pytest.raises(ValueError, match='only supported in the dY slots'):
    cfgs.DotConfig(fwd=cfgs.MatmulConfig(lhs=rule))
  with pytest.raises(ValueError, match='StatefulCalibration'):
    quantize(jnp.ones(3), rule)


# ----------------------------------------------------------------- numpy oracle


def test_dense_state_after_n_steps_matches_the_numpy_oracle():
  steps = 6
  model = _linear_model(da_int8_config())
  x = jnp.asarray(np.random.default_rng(1).normal(size=(32, 16)), jnp.float32)
  cs = _dy_sequence((32, 6), steps)
  assert nnx_hooks.init_grad_state(lambda m, a: m(a), model, x) == ['dot_general']
  _, step = _step_fn()
  opt = nnx.Optimizer(model, optax.sgd(1e-3), wrt=nnx.Param)
  for c in cs:
    step(model, opt, x, jnp.asarray(c))
  want, count = _mcs_oracle(cs)
  np.testing.assert_allclose(_drhs_clip(model.dot_general)[0], want, rtol=1e-6)
  assert float(model.dot_general.grad_state_value()['drhs']['count']) == count
  # The oracle's sequence mixes both branches: some channels are not plain max|g|.
  assert not np.allclose(want, np.abs(cs[-1]).max(0))


def test_conv_state_after_n_steps_matches_the_numpy_oracle_with_lazy_creation():
  steps = 5
  model = nnx.Conv(3, 8, (3, 3), rngs=nnx.Rngs(0))
  quantize_model(model, da_int8_config(), rngs=nnx.Rngs(quant=1))
  x = jnp.asarray(np.random.default_rng(2).normal(size=(4, 6, 6, 3)), jnp.float32)
  cs = _dy_sequence((4, 6, 6, 8), steps, seed=5)
  model(x)  # the first eager call creates the state (no backward pass: stays initial)
  hook = model.conv_general_dilated
  assert hook.grad_state_value()['drhs']['clip'].shape == (1, 1, 1, 8)
  assert float(hook.grad_state_value()['drhs']['count']) == 0.0
  _, step = _step_fn()
  opt = nnx.Optimizer(model, optax.sgd(1e-3), wrt=nnx.Param)
  for c in cs:
    step(model, opt, x, jnp.asarray(c))
  want, count = _mcs_oracle(cs)
  np.testing.assert_allclose(_drhs_clip(hook).reshape(-1), want, rtol=1e-6)
  assert float(hook.grad_state_value()['drhs']['count']) == count


def test_functional_state_survives_jit_grad_and_scan():
  steps = 4
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
  cs = jnp.asarray(np.stack(_dy_sequence((32, 6), steps, seed=7)))
  config = da_int8_config()

  def new_state(state, c):
    f = lambda s: jnp.sum(dot_general(x, w, DN, config=config, grad_state=s) * c)
    return jax.grad(f)(state), None

  state0 = dot_general_grad_state(x, w, DN, config=config)
  scanned, _ = jax.jit(lambda s: jax.lax.scan(new_state, s, cs))(state0)
  looped = state0
  for c in cs:
    looped, _ = jax.jit(new_state)(looped, c)
  want, _ = _mcs_oracle(list(np.asarray(cs)))
  np.testing.assert_allclose(scanned['drhs']['clip'][0], want, rtol=1e-6)
  np.testing.assert_array_equal(scanned['drhs']['clip'], looped['drhs']['clip'])
  assert float(scanned['drhs']['count']) == steps


def test_nnx_state_survives_scan_over_steps():
  steps = 4
  model = _linear_model(da_int8_config())
  x = jnp.asarray(np.random.default_rng(1).normal(size=(32, 16)), jnp.float32)
  cs = _dy_sequence((32, 6), steps)
  nnx_hooks.init_grad_state(lambda m, a: m(a), model, x)
  loss, _ = _step_fn()

  @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
  def run(model, c):
    grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx_hooks.GRAD_STATE_WRT))(model, x, c)
    nnx_hooks.apply_grad_state(model, grads)
    return model

  run(model, jnp.asarray(np.stack(cs)))
  np.testing.assert_allclose(_drhs_clip(model.dot_general)[0], _mcs_oracle(cs)[0], rtol=1e-6)


# ----------------------------------------------------------------- checkpoint, sharding


def test_state_survives_a_checkpoint_round_trip(tmp_path):
  model = _linear_model(da_int8_config())
  x = jnp.asarray(np.random.default_rng(1).normal(size=(32, 16)), jnp.float32)
  nnx_hooks.init_grad_state(lambda m, a: m(a), model, x)
  _, step = _step_fn()
  opt = nnx.Optimizer(model, optax.sgd(1e-3), wrt=nnx.Param)
  for c in _dy_sequence((32, 6), 3):
    step(model, opt, x, jnp.asarray(c))
  ckpt.save_checkpoint(tmp_path, 3, model, opt)
  fresh = _linear_model(da_int8_config())
  nnx_hooks.init_grad_state(lambda m, a: m(a), fresh, x)
  fresh_opt = nnx.Optimizer(fresh, optax.sgd(1e-3), wrt=nnx.Param)
  assert ckpt.restore_checkpoint(tmp_path, fresh, fresh_opt) == 3
  np.testing.assert_array_equal(_drhs_clip(fresh.dot_general), _drhs_clip(model.dot_general))
  assert float(fresh.dot_general.grad_state_value()['drhs']['count']) == 3.0


def test_state_with_a_batch_sharded_over_8_devices_matches_one_device():
  devices = jax.devices()[:8]
  assert len(devices) == 8
  mesh = jax.sharding.Mesh(np.array(devices), ('data',))
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  x = jnp.asarray(np.random.default_rng(1).normal(size=(32, 16)), jnp.float32)
  cs = _dy_sequence((32, 6), 4)
  clips = []
  for sharded in (False, True):
    model = _linear_model(da_int8_config())
    nnx_hooks.init_grad_state(lambda m, a: m(a), model, x)
    if sharded:
      nnx.update(model, jax.device_put(nnx.state(model), replicated))
    _, step = _step_fn()
    opt = nnx.Optimizer(model, optax.sgd(1e-3), wrt=nnx.Param)
    put = (lambda a: jax.device_put(a, batch)) if sharded else jnp.asarray
    for c in cs:
      step(model, opt, put(x), put(c))
    clips.append(_drhs_clip(model.dot_general))
  np.testing.assert_allclose(clips[1], clips[0], rtol=1e-6)
  np.testing.assert_allclose(clips[0][0], _mcs_oracle(cs)[0], rtol=1e-6)


# ----------------------------------------------------------------- UI8 periodic search


def test_periodic_cosine_clip_matches_cosine_clip_update_with_shared_sample():
  steps, period = 5, 2
  config = unified_int8_config(period=period, gradient_rounding='nearest')
  assert config.stateful_slots == ('dlhs',)  # one sample, one state for both GEMMs
  model = _linear_model(config)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(32, 16)), jnp.float32)
  cs = _dy_sequence((32, 6), steps, seed=9)
  nnx_hooks.init_grad_state(lambda m, a: m(a), model, x)
  _, step = _step_fn()
  opt = nnx.Optimizer(model, optax.sgd(1e-3), wrt=nnx.Param)
  want = clipping.cosine_clip_init(jnp.asarray(cs[0]))
  for c in cs:
    step(model, opt, x, jnp.asarray(c))
    want = clipping.cosine_clip_update(want, jnp.asarray(c), period=period)
  got = model.dot_general.grad_state_value()['dlhs']
  np.testing.assert_allclose(got['clip'], want.clip, rtol=1e-6)
  np.testing.assert_allclose(got['deviation'], want.deviation, rtol=1e-5, atol=1e-9)
  assert float(got['count']) == steps


# ----------------------------------------------------------------- the DA-INT8 recipe


def test_da_int8_recipe_trains_and_its_clip_state_changes():
  out = training.train_digits_cnn(da_int8(), steps=30)
  assert np.all(np.isfinite(out.losses)) and out.losses[-1] < out.losses[0]
  states = nnx.state(out.model, nnx_hooks.GradState)
  counts = [float(v) for p, v in nnx.to_flat_state(states) if p[-1] == 'count']
  assert counts == [30.0, 30.0]  # conv2 and fc1; stem and head stay float
  clips = [np.asarray(v) for p, v in nnx.to_flat_state(states) if p[-1] == 'clip']
  assert all(np.all(np.isfinite(c)) and np.any(c > 0) for c in clips)


def test_da_int8_clip_state_changes_between_steps():
  model = quantize_model(nnx.Sequential(nnx.Linear(16, 8, rngs=nnx.Rngs(0))), da_int8(),
                         rngs=nnx.Rngs(quant=1))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(32, 16)), jnp.float32)
  nnx_hooks.init_grad_state(lambda m, a: m(a), model, x)
  hook = model.layers[0].dot_general
  _, step = _step_fn()
  opt = nnx.Optimizer(model, optax.sgd(1e-3), wrt=nnx.Param)
  seen = []
  for c in _dy_sequence((32, 8), 3, seed=11):
    step(model, opt, x, jnp.asarray(c))
    seen.append(_drhs_clip(hook))
  assert not np.array_equal(seen[0], seen[1]) and not np.array_equal(seen[1], seen[2])


def test_requantizing_with_the_same_rule_keeps_the_state():
  model = _linear_model(da_int8_config())
  x = jnp.ones((4, 16))
  nnx_hooks.init_grad_state(lambda m, a: m(a), model, x)
  before = model.dot_general.grad_state
  quantize_model(model, da_int8_config())
  assert model.dot_general.grad_state is before
