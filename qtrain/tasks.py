"""Training tasks: a dataset, the models that fit it, a loss and a test metric.

A task turns a `qtrain.data` dataset into fixed-shape numpy arrays (images,
token ids) and says how a model of the zoo is built for it and scored. The
training loop (`qtrain.train`) and the `qtrain` command only talk to tasks.

| task              | data                          | models                           | metric   |
|-------------------|-------------------------------|----------------------------------|----------|
| `digits`          | sklearn digits, 8×8×1         | lenet (+BN), resnet20, mbv2, vit | accuracy |
| `fashion_mnist`   | Fashion-MNIST, 28×28×1        | lenet (+BN), resnet20, mbv2, vit | accuracy |
| `fortunes`        | fortune texts, BPE tokens     | transformer_lm                   | token    |
| `bible_en_es`     | KJV→RV1909 verses, BPE tokens | seq2seq                          | token    |
| `fortunes_topics` | 6 fortune topics, WordPiece   | minilm, bert_tiny                | accuracy |

(mbv2 = mobilenetv2; token = next-token accuracy.)

Every metric is "higher is better" and in [0, 1]; padding never counts. The
ViT is `qtrain.vit`. `fortunes_topics` classifies a
fortune into one of `qtrain.data.fortunes.CLASSIFICATION_TOPICS` (computers,
definitions, politics, science, songs-poems, work: the topic files with at
least 600 entries and a distinct subject; 4,932 texts, 20% held out by the
seed), tokenized with all-MiniLM-L6-v2's uncased WordPiece tokenizer to 64
ids ([CLS] ... [SEP], padded with 0). `minilm` fine-tunes the pretrained
encoder with a fresh head; `bert_tiny` is a random-init 2-layer BERT on the
same tokens, for tests and smoke runs. BLEU for `bible_en_es` is in
`qtrain.translate` (it needs `TaskData.tokenizer` and `test_text`).

Examples:
  >>> from qtrain import tasks
  >>> task = tasks.get('digits')
  >>> task.default_model, task.metric
  ('lenet', 'accuracy')
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qtrain import bert
from qtrain import data as qdata
from qtrain import models
from qtrain.data.fortunes import CLASSIFICATION_TOPICS

__all__ = ['Task', 'TaskData', 'TASKS', 'get', 'names']

Batch = tuple[np.ndarray, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class TaskData:
  """A task's arrays, host-side.

  Attributes:
    train: tuple of arrays with a common leading axis N_train (the batch parts).
    test: the same for N_test.
    model_kwargs: constructor arguments the data fixes (classes, channels, vocab).
    info: facts for reports (sizes, vocabulary, sequence length).
    tokenizer: the text tasks' `tokenizers.Tokenizer` (decodes ids), else None.
    test_text: the test split's raw strings, (sources, references) for
      `bible_en_es` (BLEU scores against them), else None.
  """
  train: Batch
  test: Batch
  model_kwargs: dict[str, Any]
  info: dict[str, Any]
  tokenizer: Any = dataclasses.field(default=None, repr=False)
  test_text: Batch | None = dataclasses.field(default=None, repr=False)

  @property
  def num_train(self) -> int:
    return len(self.train[0])


def _subset(parts: Batch, limit: int | None) -> Batch:
  return parts if limit is None else tuple(p[:limit] for p in parts)


# ---------------------------------------------------------------------------
# losses: (model, batch) -> (mean loss, (correct, counted))
# ---------------------------------------------------------------------------
def _classification_loss(model, batch):
  x, y = batch
  logits = model(x)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  correct = jnp.sum(jnp.argmax(logits, -1) == y)
  return loss, (correct, jnp.asarray(y.shape[0], jnp.int32))


def _token_loss(logits, labels):
  mask = labels != qdata.PAD_ID
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  count = jnp.sum(mask)
  loss = jnp.sum(jnp.where(mask, per_token, 0.0)) / jnp.maximum(count, 1)
  correct = jnp.sum((jnp.argmax(logits, -1) == labels) & mask)
  return loss, (correct, count)


def _lm_loss(model, batch):
  (tokens,) = batch
  return _token_loss(model(tokens[:, :-1]), tokens[:, 1:])


def _seq2seq_loss(model, batch):
  src, tgt = batch
  return _token_loss(model(src, tgt[:, :-1]), tgt[:, 1:])


# ---------------------------------------------------------------------------
# data preparation
# ---------------------------------------------------------------------------
def _images(x: np.ndarray, side: int) -> np.ndarray:
  return x.reshape(-1, side, side, 1).astype(np.float32)


def _prepare_digits(*, data_dir, seed, limit, vocab_size, max_len):
  del data_dir, vocab_size, max_len  # ships with scikit-learn; fixed size
  ds = qdata.load_digits(seed=seed)
  train = _subset((_images(ds.x_train, 8), ds.y_train), limit)
  return TaskData(train=train, test=(_images(ds.x_test, 8), ds.y_test),
                  model_kwargs={'num_classes': 10, 'in_channels': 1},
                  info={'input': '8x8x1', 'train': len(train[0]), 'test': len(ds.y_test)})


def _prepare_fashion(*, data_dir, seed, limit, vocab_size, max_len):
  del seed, vocab_size, max_len  # the official 60k/10k split
  ds = qdata.load_fashion_mnist(data_dir=data_dir)
  train = _subset((ds.x_train, ds.y_train), limit)
  return TaskData(train=train, test=(ds.x_test, ds.y_test),
                  model_kwargs={'num_classes': 10, 'in_channels': 1},
                  info={'input': '28x28x1', 'train': len(train[0]), 'test': len(ds.y_test)})


def _prepare_fortunes(*, data_dir, seed, limit, vocab_size, max_len):
  ds = qdata.load_fortunes(data_dir=data_dir, seed=seed)
  train_texts = list(ds.x_train[:limit] if limit is not None else ds.x_train)
  tok = qdata.train_tokenizer(train_texts, vocab_size=vocab_size)
  # +1: the model sees max_len tokens and predicts the next max_len.
  enc = lambda texts: qdata.encode_texts(tok, list(texts), max_len + 1, add_bos=True,
                                         add_eos=True)
  return TaskData(train=(enc(train_texts),), test=(enc(ds.x_test),),
                  model_kwargs={'vocab_size': tok.get_vocab_size(), 'max_len': max_len},
                  info={'vocab': tok.get_vocab_size(), 'max_len': max_len,
                        'train': len(train_texts), 'test': len(ds.x_test)})


def _prepare_bible(*, data_dir, seed, limit, vocab_size, max_len):
  ds = qdata.load_bible_pairs(data_dir=data_dir, seed=seed)
  src, tgt = ds.x_train, ds.y_train
  if limit is not None:
    src, tgt = src[:limit], tgt[:limit]
  tok = qdata.train_tokenizer(list(src) + list(tgt), vocab_size=vocab_size)
  train = qdata.encode_pairs(tok, list(src), list(tgt), max_len=max_len + 1)
  test = qdata.encode_pairs(tok, list(ds.x_test), list(ds.y_test), max_len=max_len + 1)
  # Sources are max_len + 1 long too: the decoder input drops one, the source doesn't.
  vocab = tok.get_vocab_size()
  return TaskData(train=train, test=test,
                  model_kwargs={'src_vocab': vocab, 'tgt_vocab': vocab, 'max_len': max_len + 1},
                  info={'vocab': vocab, 'max_len': max_len, 'train': len(src),
                        'test': len(ds.x_test)},
                  tokenizer=tok, test_text=(ds.x_test, ds.y_test))


def _prepare_fortunes_topics(*, data_dir, seed, limit, vocab_size, max_len):
  del vocab_size  # MiniLM's fixed WordPiece vocabulary
  ds = qdata.load_fortunes(data_dir=data_dir, seed=seed, topics=CLASSIFICATION_TOPICS)
  tok = bert.load_tokenizer(max_len=max_len)
  x_train, y_train = _subset((ds.x_train, ds.y_train), limit)
  enc = lambda texts: bert.encode_texts(tok, list(texts), max_len)
  return TaskData(train=(enc(x_train), y_train), test=(enc(ds.x_test), ds.y_test),
                  model_kwargs={'num_classes': len(ds.class_names)},
                  info={'classes': list(ds.class_names), 'max_len': max_len,
                        'train': len(x_train), 'test': len(ds.x_test)},
                  tokenizer=tok, test_text=(ds.x_test,))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Task:
  """A registered task.

  Attributes:
    name: registry name (the `--task` value).
    dataset: the `qtrain.data` dataset it reads.
    models: zoo models that fit (the first is the default).
    metric: name of the test metric (higher is better, in [0, 1]).
    family: model family for recipe defaults ('cnn' or 'transformer').
    loss: (model, batch) -> (mean loss, (correct, counted)).
    prepare: keyword-only (data_dir, seed, limit, vocab_size, max_len) -> TaskData.
    max_len: default tokens per sequence of `load` (text tasks).
  """
  name: str
  dataset: str
  models: tuple[str, ...]
  metric: str
  family: str
  loss: Callable = dataclasses.field(repr=False)
  prepare: Callable[..., TaskData] = dataclasses.field(repr=False)
  max_len: int = 48

  @property
  def default_model(self) -> str:
    return self.models[0]

  def check_model(self, model: str) -> None:
    """Raises ValueError naming the valid models if `model` does not fit this task."""
    if model not in models.MODELS:
      raise ValueError(f'unknown model {model!r}; valid names: {", ".join(models.MODELS)}.')
    if model not in self.models:
      raise ValueError(f'model {model!r} does not fit task {self.name!r}; valid for this '
                       f'task: {", ".join(self.models)}.')

  def load(self, *, data_dir: str | os.PathLike[str] | None = None, seed: int = 0,
           limit: int | None = None, vocab_size: int = 2000,
           max_len: int | None = None) -> TaskData:
    """Loads and encodes the data.

    Args:
      data_dir: where to look first for the dataset's files.
      seed: split (and tokenizer corpus) seed.
      limit: keep only the first `limit` training examples (quick runs).
      vocab_size: BPE vocabulary (text tasks).
      max_len: tokens per sequence (text tasks); None = the task's `max_len`.

    Returns:
      TaskData.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
      raise ValueError(f'limit={limit!r} must be None or an int >= 1.')
    return self.prepare(data_dir=data_dir, seed=seed, limit=limit, vocab_size=vocab_size,
                        max_len=self.max_len if max_len is None else max_len)

  def create_model(self, model: str, task_data: TaskData, *, rngs: nnx.Rngs,
                   **overrides: Any) -> nnx.Module:
    """Builds `model` for this task's data (classes, channels, vocabulary).

    LeNet gets BatchNorm after each convolution: every CNN of the papers
    normalizes, and WAGEUBN quantizes BatchNorm itself. The ViT gets the
    image size (its position table depends on the number of patches).
    """
    self.check_model(model)
    extra = {}
    if model == 'lenet':
      extra['batch_norm'] = True
    elif model == 'vit':
      extra['image_size'] = int(task_data.train[0].shape[1])
    kwargs = {**task_data.model_kwargs, **extra, **overrides}
    return models.create(model, **kwargs, rngs=rngs)


_CNNS = ('lenet', 'resnet20', 'mobilenetv2')
_IMAGE_MODELS = _CNNS + ('vit',)

TASKS: dict[str, Task] = {
    t.name: t for t in (
        Task(name='digits', dataset='digits', models=_IMAGE_MODELS, metric='accuracy',
             family='cnn', loss=_classification_loss, prepare=_prepare_digits),
        Task(name='fashion_mnist', dataset='fashion_mnist', models=_IMAGE_MODELS,
             metric='accuracy', family='cnn', loss=_classification_loss,
             prepare=_prepare_fashion),
        Task(name='fortunes', dataset='fortunes', models=('transformer_lm',),
             metric='token accuracy', family='transformer', loss=_lm_loss,
             prepare=_prepare_fortunes),
        Task(name='bible_en_es', dataset='bible_en_es', models=('seq2seq',),
             metric='token accuracy', family='transformer', loss=_seq2seq_loss,
             prepare=_prepare_bible),
        Task(name='fortunes_topics', dataset='fortunes', models=('minilm', 'bert_tiny'),
             metric='accuracy', family='transformer', loss=_classification_loss,
             prepare=_prepare_fortunes_topics, max_len=64),
    )
}


def names() -> tuple[str, ...]:
  return tuple(TASKS)


def get(name: str) -> Task:
  """The task `name`; ValueError listing the valid names otherwise."""
  try:
    return TASKS[name]
  except KeyError:
    raise ValueError(f'unknown task {name!r}; valid: {", ".join(TASKS)}.') from None


def device_batch(batch: Batch, sharding: jax.sharding.Sharding | None = None) -> Batch:
  """Moves a host batch to the device(s), split along the batch axis by `sharding`."""
  if sharding is None:
    return tuple(jnp.asarray(p) for p in batch)
  return tuple(jax.device_put(p, sharding) for p in batch)
