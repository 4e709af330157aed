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


# ---------------------------------------------------------------------------- fortunes_topics


def test_fortunes_topics_are_the_documented_subset_with_wordpiece_ids():
  from qtrain.data.fortunes import CLASSIFICATION_TOPICS  # pylint: disable=import-outside-toplevel
  data = _load('fortunes_topics')
  assert data.info['classes'] == list(CLASSIFICATION_TOPICS)
  assert data.model_kwargs == {'num_classes': len(CLASSIFICATION_TOPICS)}
  x, y = data.train
  assert x.dtype == np.int32 and x.shape == (64, 16) and (x[:, 0] == 101).all()  # [CLS]
  # Every row ends in [SEP] (102) before its padding, truncated rows included.
  last = np.asarray([row[row != 0][-1] for row in x])
  assert (last == 102).all()
  assert y.dtype == np.int32 and set(np.unique(data.test[1])) == set(range(len(
      CLASSIFICATION_TOPICS)))


def test_fortunes_topics_split_is_seeded_and_disjoint():
  a = qdata.load_fortunes(seed=0, topics=('science', 'politics'))
  b = qdata.load_fortunes(seed=0, topics=('science', 'politics'))
  c = qdata.load_fortunes(seed=1, topics=('science', 'politics'))
  assert list(a.x_test) == list(b.x_test) and list(a.x_test) != list(c.x_test)
  assert a.class_names == ('politics', 'science')
  assert len(a.x_train) + len(a.x_test) == 703 + 625
  assert set(map(int, a.y_train)) == {0, 1}


def test_fortunes_topics_rejects_unknown_or_small_topics():
  with pytest.raises(ValueError, match=r"topics \['nonsense'\] are missing"):
    qdata.load_fortunes(topics=('science', 'nonsense'))
  with pytest.raises(ValueError, match=r"\['pratchett'\] are missing or have fewer"):
    qdata.load_fortunes(topics=('pratchett',))
  with pytest.raises(TypeError, match='not one string'):
    qdata.load_fortunes(topics='science')


def test_fortunes_topics_tiny_bert_trains():
  import optax  # pylint: disable=import-outside-toplevel
  task = tasks.get('fortunes_topics')
  data = _load('fortunes_topics')
  assert task.models == ('minilm', 'bert_tiny') and task.max_len == 64
  model = task.create_model('bert_tiny', data, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
  batch = tasks.device_batch(tuple(p[:16] for p in data.train))

  @nnx.jit
  def step(model, optimizer):
    (loss, _), grads = nnx.value_and_grad(task.loss, has_aux=True)(model, batch)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(10)]
  assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_image_tasks_accept_vit():
  data = _load('digits')
  model = tasks.get('digits').create_model('vit', data, rngs=nnx.Rngs(0))
  logits = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(data.train[0][:2]))
  assert logits.shape == (2, 10)
