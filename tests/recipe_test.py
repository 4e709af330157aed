"""Tests for qtrain.recipe.Recipe and the baseline recipes in qtrain.recipes."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qtrain
from qtrain import formats as fmts
from qtrain import optim
from qtrain import recipes
from qtrain import scaling
from qtrain.recipe import Recipe
from qtrain.rules import QuantRule, match_rule

_INT8_RULES = (QuantRule(module_path='conv_init|head', config=None),
               QuantRule(module_path='.*', config=qtrain.presets.int8()))


def _recipe(**changes) -> Recipe:
  fields = dict(name='test', rules=_INT8_RULES)
  fields.update(changes)
  return Recipe(**fields)


class TestRecipeValue:

  def test_frozen_hashable_and_equal_by_value(self):
    r = _recipe()
    with pytest.raises(dataclasses.FrozenInstanceError):
      r.name = 'other'  # type: ignore[misc]
    assert r == _recipe() and hash(r) == hash(_recipe())
    assert r != _recipe(float_last_steps=1)
    assert len({r, _recipe()}) == 1

  def test_lists_are_stored_as_tuples(self):
    tx = optax.identity()
    r = _recipe(rules=list(_INT8_RULES), optimizer_transforms=[tx])
    assert r.rules == _INT8_RULES and r.optimizer_transforms == (tx,)

  def test_replace_swaps_one_part_and_validates_again(self):
    r = _recipe(description='two rules')
    int4_rules = (QuantRule(config=qtrain.presets.int4()),)
    swapped = r.replace(rules=int4_rules)
    assert swapped.rules == int4_rules
    assert (swapped.name, swapped.description) == (r.name, r.description)
    assert dataclasses.replace(r, rules=int4_rules) == swapped
    with pytest.raises(ValueError, match='float_last_steps'):
      r.replace(float_last_steps=-1)
    with pytest.raises(TypeError):
      r.replace(nonexistent=1)

  @pytest.mark.parametrize('changes, error, match', [
      (dict(name=''), ValueError, 'name'),
      (dict(name=3), TypeError, 'name'),
      (dict(rules=QuantRule()), TypeError, 'rules must be a tuple'),
      (dict(rules='.*'), TypeError, 'rules must be a tuple'),
      (dict(rules=(QuantRule(), qtrain.presets.int8())), TypeError, r'rules\[1\]'),
      (dict(rules=()), ValueError, 'rules is empty'),
      (dict(optimizer_transforms=optax.sgd(0.1)), TypeError, 'optimizer_transforms'),
      (dict(optimizer_transforms=(optax.sgd,)), TypeError, r'optimizer_transforms\[0\]'),
      (dict(float_last_steps=-1), ValueError, 'float_last_steps'),
      (dict(float_last_steps=1.5), TypeError, 'float_last_steps'),
      (dict(float_last_steps=True), TypeError, 'float_last_steps'),
      (dict(description=None), TypeError, 'description'),
  ])
  def test_validation(self, changes, error, match):
    with pytest.raises(error, match=match):
      _recipe(**changes)

  def test_keyword_only(self):
    with pytest.raises(TypeError):
      Recipe('test', _INT8_RULES)  # type: ignore[misc]

  def test_str_lists_rules_transforms_and_schedule(self):
    r = _recipe(optimizer_transforms=(
        optim.stochastic_round_params(fmts.fixed_point(24)),
        optim.quantize_state(optax.trace(decay=0.25), fmts.fixed_point(13))),
        float_last_steps=50, description='a test')
    text = str(r)
    assert text.splitlines()[0] == "Recipe 'test': a test"
    assert "0: 'conv_init|head' -> float" in text
    assert "1: '.*' -> fwd x:int8 w:int8 | dlhs dy:int8 SR w:reuse" in text
    assert 'stochastic_round_params, quantize_state' in text
    assert 'float for the last 50 steps' in text
    assert 'none' in str(_recipe()) and 'float for' not in str(_recipe())


class TestWrapOptimizer:

  def test_chains_after_the_optimizer_under_jit(self):
    fmt = fmts.fixed_point(16, 12)
    r = _recipe(optimizer_transforms=(optim.stochastic_round_params(fmt),))
    tx = r.wrap_optimizer(optax.sgd(0.1, momentum=0.9))
    params = {'w': jnp.zeros((4, 3)), 'b': jnp.zeros(3)}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.37), params)
    state = jax.jit(tx.init)(params)
    assert isinstance(state, tuple) and len(state) == 2
    assert isinstance(state[1], optim.StochasticRoundParamsState)
    updates, state = jax.jit(tx.update)(grads, state, params)
    new = optax.apply_updates(params, updates)
    for leaf in jax.tree.leaves(new):
      codes = np.asarray(leaf, np.float64) * 2 ** 12
      np.testing.assert_array_equal(codes, np.round(codes))

  def test_without_transforms_it_is_the_optimizer(self):
    opt = optax.adam(1e-2)
    tx = recipes.fp32().wrap_optimizer(opt)
    params = jnp.arange(3.0)
    got, _ = tx.update(params, tx.init(params), params)
    want, _ = opt.update(params, opt.init(params), params)
    chex.assert_trees_all_equal(got, want)
    assert len(tx.init(params)) == 1  # always a chain: (optimizer_state,)

  def test_rejects_non_transforms(self):
    with pytest.raises(TypeError, match='optimizer'):
      recipes.fp32().wrap_optimizer(optax.sgd)


class TestRulesAt:

  def test_switches_to_float_for_the_last_steps(self):
    r = _recipe(float_last_steps=10)
    assert r.rules_at(0, 100) is r.rules and r.rules_at(89, 100) is r.rules
    for step in (90, 99):
      rules = r.rules_at(step, 100)
      assert [q.module_path for q in rules] == [q.module_path for q in r.rules]
      assert all(q.config is None for q in rules)
      assert r.float_at(step, 100)
      # Every layer matches a float rule (or none, which is float too).
      assert match_rule(rules, 'blocks/3/mlp', 'linear')[1].config is None
    assert not r.float_at(89, 100)

  def test_no_float_phase_by_default(self):
    r = _recipe()
    assert all(r.rules_at(s, 5) is r.rules for s in range(5))

  def test_numpy_and_concrete_jax_ints_are_accepted(self):
    r = _recipe(float_last_steps=2)
    assert r.rules_at(np.int64(3), np.int32(4))[1].config is None
    assert r.rules_at(jnp.asarray(1), 4) is r.rules

  @pytest.mark.parametrize('step, total, error, match', [
      (1.0, 10, TypeError, 'step'),
      (True, 10, TypeError, 'step'),
      (1, 10.0, TypeError, 'total_steps'),
      (-1, 10, ValueError, 'step=-1'),
      (10, 10, ValueError, 'step=10 must be < total_steps=10'),
      (0, 0, ValueError, 'total_steps'),
      (0, 3, ValueError, 'no step would be quantized'),
  ])
  def test_validation(self, step, total, error, match):
    with pytest.raises(error, match=match):
      _recipe(float_last_steps=3).rules_at(step, total)

  def test_traced_step_is_refused(self):
    r = _recipe(float_last_steps=1)
    with pytest.raises(TypeError, match='outside jit'):
      jax.jit(lambda s: r.rules_at(s, 10) and 0)(3)


class TestBaselineRecipes:

  def test_fp32(self):
    r = recipes.fp32()
    assert r.name == 'fp32' and r.optimizer_transforms == () and r.float_last_steps == 0
    assert r.rules == (QuantRule(module_path='.*', config=None),)

  @pytest.mark.parametrize('make, name, config', [
      (recipes.int8, 'int8', qtrain.presets.int8()),
      (lambda: recipes.int8(per_channel_weights=True), 'int8-per-channel',
       qtrain.presets.int8(per_channel_weights=True)),
      (recipes.int4, 'int4', qtrain.presets.int4()),
  ])
  def test_quantized_baselines_cover_every_layer(self, make, name, config):
    r = make()
    assert r.name == name and r.optimizer_transforms == () and r.float_last_steps == 0
    assert r.rules == (QuantRule(module_path='.*', config=config),)
    assert match_rule(r.rules, 'conv_init', 'conv')[1].config == config
    assert r == make() and r.description

  def test_per_channel_weights(self):
    weights = recipes.int8(per_channel_weights=True).rules[0].config.fwd.rhs
    assert isinstance(weights.granularity, scaling.PerChannel)
    assert isinstance(recipes.int8().rules[0].config.fwd.rhs.granularity, scaling.PerTensor)
    with pytest.raises(TypeError, match='per_channel_weights'):
      recipes.int8(per_channel_weights=1)

  def test_a_user_starts_from_a_baseline_and_adds_a_part(self):
    r = recipes.int4().replace(
        name='int4-fnt', float_last_steps=100,
        rules=(QuantRule(module_path='conv_init|head', config=None),) + recipes.int4().rules)
    assert r.rules_at(0, 1000)[1].config == qtrain.presets.int4()
    assert r.rules_at(900, 1000)[1].config is None
    assert "'conv_init|head' -> float" in str(r)


def test_gradient_transforms_run_before_the_optimizer():
  double = optax.scale(2.0)
  r = recipes.fp32().replace(gradient_transforms=[double],
                             optimizer_transforms=(optax.clip(1.5),))
  assert r.gradient_transforms == (double,)
  tx = r.wrap_optimizer(optax.sgd(1.0))
  updates, _ = tx.update(jnp.ones(2), tx.init(jnp.zeros(2)))
  assert updates.tolist() == [-1.5, -1.5]  # scale 2 -> sgd -> clip at 1.5
  assert 'gradient transforms (before the optimizer): scale' in str(r)


def test_final_rules_replace_the_all_float_default():
  final = (QuantRule(module_path='.*', config=qtrain.presets.int4()),)
  r = recipes.int8().replace(float_last_steps=5, final_rules=final)
  assert r.rules_at(94, 100) == r.rules
  assert r.rules_at(95, 100) == final
  assert 'final_rules for the last 5 steps' in str(r)
  with pytest.raises(ValueError, match='final_rules is empty'):
    recipes.int8().replace(final_rules=())
  with pytest.raises(TypeError, match=r'final_rules\[0\]'):
    recipes.int8().replace(final_rules=('x',))


def test_optimizer_field_is_a_function_of_the_learning_rate():
  def paper_sgd(lr):
    return optax.sgd(lr, momentum=0.25)
  r = recipes.fp32().replace(optimizer=paper_sgd)
  assert isinstance(r.optimizer(0.1), optax.GradientTransformation)
  assert 'base optimizer: paper_sgd' in str(r)
  with pytest.raises(TypeError, match='function of the learning rate'):
    recipes.fp32().replace(optimizer=0.1)


def test_prepare_model_runs_after_the_rules_for_nnx_and_is_refused_for_linen():
  from flax import nnx
  import flax.linen as nn
  seen = []

  def mark(model):
    # The hooks exist when prepare_model runs.
    seen.append(type(model.layers[0].dot_general).__name__)

  recipe = recipes.int8().replace(prepare_model=mark, default_lr=0.1)
  model = nnx.Sequential(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
  qtrain.quantize_model(model, recipe)
  assert seen == ['QuantizedDotGeneral']
  qtrain.quantize_model(model, recipe.rules)  # bare rules: not called
  assert len(seen) == 1
  assert 'model preparation: mark' in str(recipe)
  with pytest.raises(ValueError, match='no Linen counterpart'):
    qtrain.quantize_model(nn.Dense(2), recipe)
  with pytest.raises(TypeError, match='function of the model'):
    recipes.int8().replace(prepare_model=3)
  with pytest.raises(ValueError, match='default_lr'):
    recipes.int8().replace(default_lr=-0.1)
