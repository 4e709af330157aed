"""Tests of qtrain.recipes.registry."""

import pytest

from qtrain import recipes
from qtrain.recipe import Recipe
from qtrain.recipes import registry


def test_every_registered_factory_builds_a_recipe_of_its_name():
  from qtrain.ptq import PtqRecipe
  for entry in recipes.registered():
    recipe = entry.build()
    assert isinstance(recipe, Recipe if entry.kind == 'train' else PtqRecipe), entry
    assert recipe.name == entry.name, entry
    assert set(entry.families) <= set(recipes.FAMILIES)
    assert entry.forward and entry.backward


def test_baselines_come_first():
  assert recipes.names()[:3] == ('fp32', 'int8', 'int4')


def test_unknown_name_lists_registered_ones():
  with pytest.raises(ValueError, match=r"unknown recipe 'nope'; registered: fp32, int8, int4"):
    recipes.get('nope')


def test_duplicate_and_bad_names_are_refused(monkeypatch):
  monkeypatch.setattr(registry, '_REGISTRY', dict(registry._REGISTRY))
  with pytest.raises(ValueError, match='registered already'):
    recipes.register('int8', forward='x', backward='y')(lambda: recipes.int8())
  with pytest.raises(ValueError, match='must match'):
    recipes.register('Bad Name', forward='x', backward='y')
  with pytest.raises(ValueError, match='families'):
    recipes.register('ok', forward='x', backward='y', families=('rnn',))
  with pytest.raises(TypeError, match='ReportedDelta'):
    recipes.register('ok', forward='x', backward='y', reported=(-1.0,))


def test_register_adds_entry_and_checks_return_type(monkeypatch):
  monkeypatch.setattr(registry, '_REGISTRY', dict(registry._REGISTRY))
  delta = recipes.ReportedDelta(model='ResNet-18', dataset='ImageNet', delta_pp=-1.1)

  @recipes.register('custom', paper='Someone 2024', forward='INT8', backward='INT8',
                    reported=(delta,))
  def custom():
    return recipes.int8().replace(name='custom')

  assert recipes.info('custom').reported == (delta,)
  assert str(delta) == '-1.10 pp (ResNet-18, ImageNet)'
  assert recipes.get('custom').name == 'custom'
  recipes.register('broken', forward='x', backward='y')(lambda: 3)
  with pytest.raises(TypeError, match='not a qtrain.Recipe'):
    recipes.get('broken')


def test_post_training_and_variant_entries_are_not_trained_by_default():
  from qtrain import compare, train
  fq = recipes.info('fq_vit')
  assert fq.kind == 'ptq' and not fq.variant
  assert recipes.info('fq_vit-8-8-8').variant
  assert recipes.info('statquant-bhq4').variant and not recipes.info('statquant').variant
  defaults = compare._default_recipes('vit')  # pylint: disable=protected-access
  assert 'fq_vit' not in defaults and 'statquant' in defaults
  assert not [n for n in defaults if n.startswith('statquant-')]
  with pytest.raises(ValueError, match='post-training'):
    fq.check_trainable()
  with pytest.raises(ValueError, match='post-training'):
    train.TrainConfig(task='digits', recipe='fq_vit')
  with pytest.raises(ValueError, match='post-training'):
    compare.compare(task='digits', recipes=['fq_vit'], epochs=1)
  with pytest.raises(ValueError, match='kind'):
    recipes.register('ok', forward='x', backward='y', kind='infer')
