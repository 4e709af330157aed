"""Tests of qtrain.train: the loop, resume, non-finite stop, metrics, data parallelism."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from qtrain import checkpoint as ckpt
from qtrain import data as qdata
from qtrain import tasks
from qtrain.train import NonFiniteLossError, TrainConfig, train

# 256 digits, batch 32: 8 steps per epoch, a run of 2 epochs is 16 steps.
_SMALL = dict(task='digits', epochs=2, batch_size=32, limit=256, log_every=4)


def _params(model) -> dict:
  return {'/'.join(map(str, k)): np.asarray(v)
          for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _all_state(model) -> list[np.ndarray]:
  return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype,
                                                                     jax.dtypes.prng_key) else x)
          for x in jax.tree.leaves(nnx.state(model))]


@pytest.fixture(scope='module')
def digits_data():
  return tasks.get('digits').load(limit=256)


def test_run_writes_config_metrics_and_checkpoints(tmp_path, digits_data):
  config = TrainConfig(recipe='int8', **_SMALL)
  result = train(config, out_dir=str(tmp_path), task_data=digits_data, progress=False)
  assert result.steps == 16 and 0.0 <= result.test_metric <= 1.0
  assert np.isfinite(result.final_loss)
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['recipe'] == 'int8' and saved['model'] == 'lenet'
  records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  train_records = [r for r in records if 'loss' in r]
  evals = [r for r in records if r.get('eval')]
  # log_every=4 and flushes at epoch ends: steps 4, 8, 12, 16.
  assert [r['step'] for r in train_records] == [4, 8, 12, 16]
  assert [r['step'] for r in evals] == [8, 16] and evals[-1]['test_metric'] == result.test_metric
  assert ckpt.all_steps(tmp_path / 'checkpoints') == [8, 16]


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path, digits_data):
  # int8: stochastic rounding, so the RNG counters must be restored too.
  config = TrainConfig(recipe='int8', checkpoint_every=3, keep_checkpoints=10, **_SMALL)
  full_dir, crashed = tmp_path / 'full', tmp_path / 'crashed'
  full = train(config, out_dir=str(full_dir), task_data=digits_data, progress=False)
  # The "crashed" run: the same run with everything after its step-6 checkpoint lost.
  shutil.copytree(full_dir, crashed)
  for step in ckpt.all_steps(crashed / 'checkpoints'):
    if step > 6:
      shutil.rmtree(crashed / 'checkpoints' / str(step))
  resumed = train(config, out_dir=str(crashed), task_data=digits_data, resume=True,
                  progress=False)
  assert resumed.resumed_from == 6 and resumed.steps == 16
  for a, b in zip(_all_state(full.model), _all_state(resumed.model), strict=True):
    np.testing.assert_array_equal(a, b)  # weights, BN stats, RNG counters
  assert resumed.losses == full.losses and resumed.evals == full.evals
  steps = lambda d: [json.loads(x)['step'] for x in (d / 'metrics.jsonl').read_text().splitlines()]
  assert steps(crashed) == steps(full_dir)  # records after step 6 rewritten once, not twice


def test_resume_refuses_a_different_config(tmp_path, digits_data):
  train(TrainConfig(recipe='fp32', **_SMALL), out_dir=str(tmp_path), task_data=digits_data,
        progress=False)
  other = TrainConfig(recipe='fp32', **{**_SMALL, 'epochs': 3}, lr=1e-3)
  with pytest.raises(ValueError, match='config.json differs'):
    train(other, out_dir=str(tmp_path), task_data=digits_data, resume=True, progress=False)


def test_existing_out_dir_is_refused_unless_overwrite(tmp_path, digits_data):
  (tmp_path / 'note.txt').write_text('keep me')
  config = TrainConfig(**{**_SMALL, 'epochs': 1})
  with pytest.raises(FileExistsError, match='overwrite'):
    train(config, out_dir=str(tmp_path), task_data=digits_data, progress=False)
  assert (tmp_path / 'note.txt').exists()
  train(config, out_dir=str(tmp_path), task_data=digits_data, overwrite=True, progress=False)
  assert not (tmp_path / 'note.txt').exists()


def test_nan_in_the_loss_stops_training_naming_the_step(digits_data):
  bad_step = 5  # epoch 0, batch 5
  idx = list(qdata.batch_indices(digits_data.num_train, 32, seed=0, epoch=0))[bad_step]
  x = digits_data.train[0].copy()
  x[idx[0]] = np.nan  # one example of that batch: its loss is NaN, earlier ones are not
  poisoned = dataclasses.replace(digits_data, train=(x, digits_data.train[1]))
  with pytest.raises(NonFiniteLossError, match=f'at step {bad_step};') as e:
    train(TrainConfig(recipe='int8', **_SMALL), task_data=poisoned, progress=False)
  assert e.value.step == bad_step and np.isnan(e.value.loss)


def test_data_parallel_matches_single_device(digits_data):
  one = train(TrainConfig(recipe='fp32', **_SMALL), task_data=digits_data, progress=False)
  two = train(TrainConfig(recipe='fp32', devices=2, **_SMALL), task_data=digits_data,
              progress=False)
  a, b = _params(one.model), _params(two.model)
  for k in a:  # float32 sums in another order: close, not equal
    np.testing.assert_allclose(a[k], b[k], rtol=2e-3, atol=2e-4, err_msg=k)
  assert abs(one.test_metric - two.test_metric) <= 2 / 360


def test_final_float_phase_requantizes(digits_data):
  from qtrain import recipes  # pylint: disable=import-outside-toplevel
  recipe = recipes.int8().replace(float_last_steps=4)
  result = train(TrainConfig(recipe='int8', **_SMALL), task_data=digits_data, recipe=recipe,
                 progress=False)
  # After the switch no layer has a quantization hook left.
  hooks = [m for _, m in nnx.iter_graph(result.model) if type(m).__name__.startswith('Quantized')]
  assert result.steps == 16 and not hooks


@pytest.mark.parametrize('changes, match', [
    (dict(task='imagenet'), "unknown task 'imagenet'; valid: digits, fashion_mnist"),
    (dict(model='vgg'), "unknown model 'vgg'; valid names: lenet"),
    (dict(model='seq2seq'), "does not fit task 'digits'; valid for this task: lenet"),
    (dict(recipe='int3'), "unknown recipe 'int3'; registered: fp32, int8"),
    (dict(epochs=0), 'epochs=0 must be an int >= 1'),
    (dict(lr=-1.0), 'lr=-1.0 must be None or a positive'),
    (dict(devices=3, batch_size=64), 'divisible by devices=3'),
    (dict(devices=1000), 'only 8 local devices'),
])
def test_bad_config_is_refused(changes, match):
  with pytest.raises(ValueError, match=match):
    TrainConfig(**changes)


def test_batch_larger_than_the_data_is_refused(digits_data):
  with pytest.raises(ValueError, match='exceeds the 256 training examples'):
    train(TrainConfig(**{**_SMALL, 'batch_size': 512}), task_data=digits_data, progress=False)


def test_recipe_with_its_own_optimizer_runs_at_its_default_lr(tmp_path, digits_data):
  result = train(TrainConfig(recipe='wageubn', **{**_SMALL, 'epochs': 1}), out_dir=str(tmp_path),
                 task_data=digits_data, progress=False)
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['lr'] == 0.05 and saved['recipe'] == 'wageubn'
  # prepare_model ran: the BatchNorm layers are WAGEUBN's.
  from qtrain import batchnorm  # pylint: disable=import-outside-toplevel
  assert isinstance(result.model.stem_bn, batchnorm.QuantizedBatchNorm)
