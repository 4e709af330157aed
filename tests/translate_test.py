"""Tests of qtrain.translate: greedy decoding (length, EOS, equivalence), detokenizing, BLEU."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qtrain import data as qdata
from qtrain import models, tasks, translate
from qtrain.train import TrainConfig, train

EOS, PAD = qdata.EOS_ID, qdata.PAD_ID


@functools.lru_cache(maxsize=None)
def _bible(max_len: int = 96):
  try:
    return tasks.get('bible_en_es').load(limit=128, vocab_size=600, max_len=max_len)
  except qdata.DatasetNotFoundError as e:
    pytest.skip(str(e))


class _Length(nnx.Module):
  def __init__(self, max_len):
    self.max_len = max_len


class _Scripted(nnx.Module):
  """Emits 10, 11, 12, ... and EOS as its k-th token, k = src[:, 0] (0 = never)."""

  def __init__(self, max_len: int, vocab: int = 64):
    self.tgt_embed = _Length(max_len)
    self.vocab = vocab

  def encode(self, src):
    return src.astype(jnp.float32)[..., None]

  def decode(self, memory, src, tgt):
    del memory
    b, t = tgt.shape
    pos = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
    stop = jnp.broadcast_to(src[:, :1], (b, t))
    tokens = jnp.where(pos + 1 == stop, EOS, 10 + pos)
    return jax.nn.one_hot(tokens, self.vocab)


def test_greedy_decode_stops_at_eos_and_respects_max_length():
  model = _Scripted(max_len=8)
  src = np.array([[3, 5], [1, 5], [0, 5]], np.int32)  # EOS 3rd, 1st, never
  out = translate.greedy_decode(model, src, max_new_tokens=5)
  np.testing.assert_array_equal(out, [[10, 11, EOS, PAD, PAD],
                                      [EOS, PAD, PAD, PAD, PAD],
                                      [10, 11, 12, 13, 14]])
  assert translate.greedy_decode(model, src).shape == (3, 7)  # target length 8 minus BOS
  with pytest.raises(ValueError, match=r'max_new_tokens=8 must be an int in \[1, 7\]'):
    translate.greedy_decode(model, src, max_new_tokens=8)
  with pytest.raises(ValueError, match='src must be an int'):
    translate.greedy_decode(model, src.astype(np.float32))


def test_greedy_decode_stops_early_when_every_row_is_done(monkeypatch):
  steps = []
  original = translate._next_tokens  # pylint: disable=protected-access

  def counting(*args):
    steps.append(1)
    return original(*args)

  monkeypatch.setattr(translate, '_next_tokens', counting)
  out = translate.greedy_decode(_Scripted(max_len=8), np.array([[2, 1], [1, 1]], np.int32),
                                max_new_tokens=6)
  np.testing.assert_array_equal(out, [[10, EOS, PAD, PAD, PAD, PAD],
                                      [EOS, PAD, PAD, PAD, PAD, PAD]])
  assert len(steps) == 2


def test_fixed_buffer_decoding_matches_growing_prefix_decoding():
  model = models.Seq2SeqTransformer(40, 40, d_model=16, num_heads=2, num_layers=1, max_len=10,
                                    rngs=nnx.Rngs(3))
  src = jax.random.randint(jax.random.key(0), (3, 6), 3, 40).at[1, 4:].set(PAD)
  out = translate.greedy_decode(model, src, max_new_tokens=4)
  # Reference: rerun the model on the growing prefix, no padding buffer.
  forward = nnx.jit(lambda m, s, t: m(s, t))
  tgt = jnp.full((3, 1), qdata.BOS_ID, jnp.int32)
  done = np.zeros(3, bool)
  expected = np.full((3, 4), PAD, np.int32)
  for t in range(4):
    nxt = np.asarray(jnp.argmax(forward(model, src, tgt)[:, -1], -1))
    expected[:, t] = np.where(done, PAD, nxt)
    done |= nxt == EOS
    tgt = jnp.concatenate([tgt, jnp.asarray(nxt, jnp.int32)[:, None]], axis=1)
  np.testing.assert_array_equal(out, expected)


def test_bleu_of_the_references_themselves_is_100():
  data = _bible()
  tgt = data.test[1][:64]
  fits = (tgt != PAD).sum(1) < tgt.shape[1]  # not truncated by max_len
  assert fits.sum() >= 20
  decoded = translate.detokenize(data.tokenizer, tgt[fits][:, 1:])  # drop BOS, cut at EOS
  refs = [str(r) for r, f in zip(data.test_text[1][:64], fits) if f]
  assert decoded == refs  # byte-level BPE round-trips exactly
  assert translate.corpus_bleu(decoded, refs) == pytest.approx(100.0)
  # ...and the metric can tell: references paired with the wrong verses score low.
  assert translate.corpus_bleu(decoded, refs[1:] + refs[:1]) < 20.0


def test_detokenize_cuts_at_eos_and_drops_special_tokens():
  data = _bible()
  ids = qdata.encode_texts(data.tokenizer, ['En el principio'], 12, add_bos=True, add_eos=True)
  row = np.concatenate([ids[:, 1:], np.full((1, 3), 77, np.int32)], axis=1)  # junk after EOS
  assert translate.detokenize(data.tokenizer, row) == ['En el principio']


def test_corpus_bleu_rejects_mismatched_lists():
  with pytest.raises(ValueError, match='as many hypotheses as references'):
    translate.corpus_bleu(['a b c d'], ['a b c d', 'e f g h'])
  with pytest.raises(ValueError, match='as many hypotheses'):
    translate.corpus_bleu([], [])


def test_bleu_of_a_briefly_trained_model_is_finite():
  full = _bible(32)
  # A 128-pair test split keeps the per-epoch evaluation cheap.
  data = dataclasses.replace(full, test=tuple(p[:128] for p in full.test),
                             test_text=tuple(p[:128] for p in full.test_text))
  result = train(TrainConfig(task='bible_en_es', epochs=1, batch_size=32, limit=128, width=1,
                             eval_batch_size=512),
                 task_data=data, progress=False)
  scored = translate.bleu(result.model, data, limit=24, batch_size=16, max_new_tokens=12)
  assert np.isfinite(scored.score) and 0.0 <= scored.score <= 100.0
  assert len(scored.hypotheses) == len(scored.references) == 24
  assert scored.references[0] == str(data.test_text[1][0])
  with pytest.raises(ValueError, match='no tokenizer'):
    translate.bleu(result.model, tasks.get('digits').load(limit=64))
