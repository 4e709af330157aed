"""Tests for qtrain.recipes.unified_int8: registry entry, wiring per GEMM, optimizer, training."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import model_testlib as lib
import recipe_training_testlib as training
from qtrain import clipping
from qtrain import config as cfgs
from qtrain import models
from qtrain import recipes
from qtrain.dot import dot_general
from qtrain.model import quantize_model
from qtrain.quantize import fake_quant
from qtrain.recipes import registry
from qtrain.recipes.papers.unified_int8 import unified_int8, unified_int8_config

_DN = (((1,), (0,)), ((), ()))
_INT8 = cfgs.TensorConfig(format=clipping.symmetric_int(8))


def _operands(n: int = 1024, k: int = 16, m: int = 12):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(n, k)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, m)) * 0.3, jnp.float32)
  # Sharp dY: with ~12k Laplace samples the cosine-optimal INT8 clip is below max|dY|.
  g = jnp.asarray(np.random.default_rng(0).laplace(size=(n, m)) * 1e-3, jnp.float32)
  return x, w, g


def test_registered_with_paper_formats_and_reported_deltas():
  info = registry.info('unified_int8')
  assert info.factory is unified_int8 and info.build().name == 'unified_int8'
  assert '1912.12607' in info.paper and 'cnn' in info.families
  assert {(r.model, r.dataset, r.delta_pp) for r in info.reported} == {
      ('MobileNetV2', 'ImageNet', -1.19), ('MobileNetV2', 'CIFAR-10', -1.01)}
  assert all(r.source for r in info.reported)


def test_defaults_are_the_papers():
  config = unified_int8().rules[1].config
  assert config == unified_int8_config(period=clipping.PERIOD)
  g = config.dlhs.lhs
  assert g.format == clipping.symmetric_int(8) and g.rounding == 'stochastic'
  # Searched periodically, the clip kept in between as per-layer state.
  assert isinstance(g.calibration, clipping.PeriodicCosineClip)
  assert g.calibration.period == clipping.PERIOD == 100
  stateless = unified_int8(period=None).rules[1].config.dlhs.lhs
  assert isinstance(stateless.calibration, clipping.CosineClip)
  assert config.share_gradient_sample and config.drhs.rhs == g
  assert config.fwd.lhs == config.fwd.rhs == _INT8


def test_dot_forward_and_both_backward_gemms_use_the_cosine_clipped_gradient():
  x, w, g = _operands()
  cfg = unified_int8_config(gradient_rounding='nearest')
  y, vjp = jax.vjp(lambda a, b: dot_general(a, b, _DN, config=cfg), x, w)
  dx, dw = vjp(g)
  xq, wq = fake_quant(x, _INT8), fake_quant(w, _INT8)
  gq = clipping.cosine_clip(g, rounding='nearest')
  clip, _ = clipping.cosine_clip_search(g)
  assert float(clip.ravel()[0]) < float(jnp.max(jnp.abs(g)))  # DSGC really clips here
  # Same codes, another float32 summation order: tolerance relative to the largest entry.
  for got, want in ((y, xq @ wq), (dx, gq @ wq.T), (dw, xq.T @ gq)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))
  # Not the plain absmax INT8 gradient.
  assert not np.allclose(dw, xq.T @ fake_quant(g, _INT8), rtol=1e-3)


def test_stochastic_gradient_sample_is_shared_by_dx_and_dw():
  x, w, g = _operands(n=32, k=12)  # square W: the sample can be recovered from dX
  cfg = unified_int8_config()
  _, vjp = jax.vjp(lambda a, b: dot_general(a, b, _DN, config=cfg, key=jax.random.key(5)), x, w)
  dx, dw = vjp(g)
  wq = np.asarray(fake_quant(w, _INT8), np.float64)
  xq = np.asarray(fake_quant(x, _INT8), np.float64)
  sample = np.asarray(dx, np.float64) @ np.linalg.inv(wq.T)
  clip, _ = clipping.cosine_clip_search(g)
  s = float(clip.ravel()[0]) / 127
  codes = sample / s
  np.testing.assert_allclose(codes, np.round(codes), atol=2e-2)  # on the clip's grid
  assert np.max(np.abs(np.round(codes))) <= 127
  np.testing.assert_allclose(dw, xq.T @ (np.round(codes) * s), rtol=1e-4, atol=1e-9)
  # Stochastic: a neighbour of the nearest code, and not always the nearest.
  nearest = np.asarray(clipping.cosine_clip(g, rounding='nearest')) / s
  assert np.all(np.abs(np.round(codes) - np.clip(np.asarray(g) / s, -127, 127)) < 1)
  assert np.any(np.round(codes) != np.round(nearest))


def _lenet():
  return models.LeNet(10, 1, batch_norm=True, rngs=nnx.Rngs(0))


@pytest.mark.parametrize('conv_only, quantized', [(True, ['conv2']), (False, ['conv2', 'fc1'])])
def test_first_conv_and_classifier_stay_float(conv_only, quantized):
  model, report = quantize_model(_lenet(), unified_int8(conv_only=conv_only).rules,
                                 return_report=True)
  assert sorted(p for p, _, _ in report.quantized) == quantized
  assert {'stem', 'head'} <= {p for p, _, _ in report.kept_float}
  x = jnp.asarray(training.digits_images()[0][:8])
  y = jnp.asarray(training.digits_images()[1][:8])
  graphdef, state = nnx.split(model)
  loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
  found = lib.gemms(jax.make_jaxpr(lambda s: nnx.grad(loss)(nnx.merge(graphdef, s)))(state))
  for path in quantized:
    assert {g.gemm for g in found if g.in_layer(path)} == {'fwd', 'dlhs', 'drhs'}, path
  for path in ('stem', 'head'):
    assert not any(g.in_layer(path) for g in found)
  if not conv_only:  # dense layers run INT8 codes in every GEMM (convs use f32 carriers on CPU)
    assert all(set(g.dtypes) == {'int8'} for g in found if g.in_layer('fc1'))
  assert sum(g.quantized for g in found) == 3 * len(quantized)


def test_stateless_search_falls_back_to_the_update_proxy():
  recipe = unified_int8(period=None)
  assert len(recipe.optimizer_transforms) == 1 and not recipe.gradient_transforms
  assert recipe.update_args is None
  assert unified_int8(lr_scaling=False).optimizer_transforms == ()
  assert unified_int8(lr_scaling=False).update_args is None
  tx = recipe.wrap_optimizer(optax.sgd(0.1))
  params = {'w': jnp.asarray(np.random.default_rng(3).standard_t(2, 512), jnp.float32)}
  state = tx.init(params)
  updates, state = tx.update(params, state, params)
  phi = float(state[-1].last_scale['w'])
  assert 0.1 <= phi < 1.0
  np.testing.assert_allclose(updates['w'], -0.1 * phi * params['w'], rtol=1e-6)


def test_lr_scaling_uses_each_layers_backward_deviation():
  """DCLRS with d from each layer's DSGC state: conv2's update is scaled, float layers not."""
  from qtrain.recipes.papers import unified_int8 as ui8_module
  from qtrain import nnx_hooks
  recipe = unified_int8(period=1, conv_only=False)
  assert recipe.update_args is ui8_module.deviation_update_args
  x = jnp.asarray(training.digits_images()[0][:32])
  y = jnp.asarray(training.digits_images()[1][:32])
  loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
  model = quantize_model(_lenet(), recipe.rules, rngs=nnx.Rngs(quant=1))
  assert ui8_module.layer_deviations(model) == {}  # no state yet: nothing scaled
  nnx_hooks.init_grad_state(loss, model)
  grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx_hooks.GRAD_STATE_WRT))(model)
  nnx_hooks.apply_grad_state(model, grads)
  devs = ui8_module.layer_deviations(model)
  assert sorted(devs) == ['conv2', 'fc1']
  for name in devs:
    state = getattr(model, name)
    hook = state.conv_general_dilated if name == 'conv2' else state.dot_general
    expected = float(hook.grad_state_value()['dlhs']['deviation'].mean())
    assert float(devs[name]) == expected and 0.0 < expected < 0.5
  lr = 0.1
  opt = nnx.Optimizer(model, recipe.wrap_optimizer(optax.sgd(lr)), wrt=nnx.Param)
  before = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  g = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(grads, nnx.Param))}
  opt.update(model, grads, **recipe.update_args(model))
  after = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  for path in before:
    layer = path[0]
    phi = (float(clipping.deviation_lr_scale(devs[layer])) if layer in devs else 1.0)
    np.testing.assert_allclose(after[path] - before[path], -lr * phi * g[path], rtol=2e-5,
                               atol=1e-7, err_msg=str(path))
  assert any(float(clipping.deviation_lr_scale(d)) < 1.0 for d in devs.values())


def test_scale_by_deviation_by_path_matches_the_longest_module_prefix():
  tx = clipping.scale_by_deviation(by_path=True)
  u = {'a': {'b': jnp.ones(2), 'c': jnp.ones(2)}, 'd': jnp.ones(2)}
  out, _ = tx.update(u, tx.init(u), deviation={'a': 0.0, 'a/c': 0.5})
  np.testing.assert_allclose(out['a']['b'], 1.0)
  np.testing.assert_allclose(out['a']['c'], 0.1, rtol=1e-6)
  np.testing.assert_allclose(out['d'], 1.0)
  with pytest.raises(ValueError, match='by_path'):
    tx.update(u, tx.init(u), deviation=[0.1])
  with pytest.raises(ValueError, match='by_path'):
    tx.update(u, tx.init(u))


@pytest.mark.parametrize('kwargs, err', [
    (dict(gradient_rounding='up'), ValueError), (dict(num_candidates=0), ValueError),
    (dict(min_ratio=2.0), ValueError), (dict(beta=2.0), ValueError),
    (dict(alpha='20'), TypeError), (dict(conv_only=1), TypeError),
    (dict(keep_float='('), ValueError), (dict(lr_scaling=None), TypeError)])
def test_bad_options(kwargs, err):
  with pytest.raises(err):
    unified_int8(**kwargs)


@pytest.mark.slow
def test_backward_quantization_changes_the_layer_gradient():
  """Fails if the gradient rules were dropped (forward-only INT8 would pass 'differs from fp32')."""
  x = jnp.asarray(training.digits_images()[0][:64])
  y = jnp.asarray(training.digits_images()[1][:64])
  loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
  full = unified_int8().rules
  fwd_only_cfg = dataclasses.replace(full[1].config, dlhs=cfgs.MatmulConfig(rhs=cfgs.REUSE),
                                     drhs=cfgs.MatmulConfig(lhs=cfgs.REUSE),
                                     share_gradient_sample=False)
  fwd_only = (full[0], dataclasses.replace(full[1], config=fwd_only_cfg), full[2])
  grads = {}
  for name, rules in (('full', full), ('fwd_only', fwd_only)):
    model = quantize_model(_lenet(), rules, rngs=nnx.Rngs(quant=1))
    grads[name] = np.asarray(nnx.grad(loss)(model).conv2.kernel[...])
  diff = np.linalg.norm(grads['full'] - grads['fwd_only']) / np.linalg.norm(grads['fwd_only'])
  assert 1e-3 < diff < 0.5


def test_trains_close_to_fp32_with_different_gradients():
  fp32 = training.train_digits_cnn(recipes.fp32())
  ui8 = training.train_digits_cnn(unified_int8())
  assert np.all(np.isfinite(ui8.losses))
  # Measured (seed 0, 100 steps): fp32 0.964, unified_int8 0.972.
  assert ui8.accuracy >= fp32.accuracy - 0.03, (ui8.accuracy, fp32.accuracy)
  assert training.max_relative_grad_difference(ui8, fp32) > 0.01
