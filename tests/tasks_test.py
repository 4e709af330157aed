"""Tests of qtrain.tasks: every task's data, model and loss fit together."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qtrain import data as qdata
from qtrain import tasks


@functools.lru_cache(maxsize=None)
def _load(name: str) -> tasks.TaskData:
  try:
    return tasks.get(name).load(limit=64, vocab_size=500, max_len=16)
  except qdata.DatasetNotFoundError as e:
    pytest.skip(f'{name}: {e}')


@pytest.mark.parametrize('name', tasks.names())
def test_task_data_model_and_loss_fit(name):
  task = tasks.get(name)
  data = _load(name)
  assert data.num_train == 64 and len(data.test[0]) > 0
  assert all(len(p) == data.num_train for p in data.train)
  model = task.create_model(task.default_model, data, rngs=nnx.Rngs(0))
  batch = tasks.device_batch(tuple(p[:4] for p in data.train))
  loss, (correct, count) = task.loss(model, batch)
  assert loss.shape == () and np.isfinite(float(loss))
  assert 0 <= int(correct) <= int(count)
  if task.metric == 'accuracy':
    assert int(count) == 4
  else:  # tokens: padding never counts
    labels = batch[-1][:, 1:]
    assert int(count) == int(jnp.sum(labels != qdata.PAD_ID)) > 0
    # Cross-entropy of an untrained model is near log(vocab).
    assert abs(float(loss) - np.log(data.model_kwargs.get('vocab_size',
                                                          data.model_kwargs.get('tgt_vocab')))) < 1.5


def test_text_tasks_shift_inputs_and_labels():
  logits_seen = {}

  class Recorder(nnx.Module):
    def __call__(self, tokens):
      logits_seen['tokens'] = tokens
      return jax.nn.one_hot(tokens, 10) * 0.0

  tokens = jnp.array([[1, 5, 6, 2, 0]], jnp.int32)
  loss, (correct, count) = tasks.get('fortunes').loss(Recorder(), (tokens,))
  np.testing.assert_array_equal(logits_seen['tokens'], tokens[:, :-1])
  assert int(count) == 3  # labels 5, 6, 2; the trailing pad is masked
  np.testing.assert_allclose(float(loss), np.log(10), rtol=1e-6)
  del correct


def test_image_tasks_give_nhwc_float_images():
  data = _load('digits')
  assert data.train[0].shape[1:] == (8, 8, 1) and data.train[0].dtype == np.float32
  assert data.model_kwargs == {'num_classes': 10, 'in_channels': 1}


def test_unknown_names_list_valid_ones():
  with pytest.raises(ValueError, match="unknown task 'mnist'; valid: digits, fashion_mnist"):
    tasks.get('mnist')
  with pytest.raises(ValueError, match='valid for this task: transformer_lm'):
    tasks.get('fortunes').check_model('lenet')
  with pytest.raises(ValueError, match='limit=0'):
    tasks.get('digits').load(limit=0)
