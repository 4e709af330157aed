"""Tests of the `qtrain.models` zoo: shapes, one train step (float and quantized), BN modes, masks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qtrain
from qtrain import models

# Papers keep the first conv and the classifier float; every zoo model names them stem/head.
FIRST_LAST_FLOAT = (qtrain.QuantRule(module_path='stem|head', config=None),
                    qtrain.QuantRule(config=qtrain.presets.int8()))

VOCAB = 32  # tiny vocabularies keep the transformer tests cheap


@nnx.jit
def _forward(model, *inputs):
  # One compile per shape beats eager mode's per-op compiles for these graphs.
  return model(*inputs)


def _num_params(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _images(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _tokens(shape, seed=0, low=1):
  # low=1: no accidental padding (id 0) unless a test puts it there.
  return jax.random.randint(jax.random.key(seed), shape, low, VOCAB, jnp.int32)


# ---------------------------------------------------------------------------- registry


@pytest.mark.parametrize('name, kwargs, expected', [
    ('lenet', {}, 34_622),
    ('resnet20', dict(in_channels=3), 269_722),
    ('mobilenetv2', dict(in_channels=3), 67_402),
    ('transformer_lm', dict(vocab_size=256), 478_976),
    ('seq2seq', dict(src_vocab=256, tgt_vocab=256), 1_057_536),
])
def test_default_parameter_counts(name, kwargs, expected):
  # eval_shape: shapes only, no eager per-shape init compiles.
  model = nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0), **kwargs))
  assert _num_params(model) == expected


def test_create_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match="unknown model 'vgg'.*lenet.*resnet20"):
    models.create('vgg', rngs=nnx.Rngs(0))


def test_registry_maps_to_constructors():
  assert models.MODELS['resnet20'] is models.ResNet20
  assert isinstance(models.create('lenet', width=2, rngs=nnx.Rngs(0)), models.LeNet)


@pytest.mark.parametrize('name, kwargs', [
    ('lenet', {}), ('resnet20', {}), ('mobilenetv2', {}),
    ('transformer_lm', dict(vocab_size=VOCAB)), ('seq2seq', dict(src_vocab=VOCAB, tgt_vocab=VOCAB)),
])
def test_first_and_last_layers_are_named_stem_and_head(name, kwargs):
  model = nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0), **kwargs))
  assert isinstance(model.head, nnx.Linear)
  if name not in ('transformer_lm', 'seq2seq'):
    assert isinstance(model.stem, nnx.Conv)
    assert model.stem.kernel.shape[2] == model.stem.in_features  # the input layer


# ---------------------------------------------------------------------------- shapes


@pytest.mark.parametrize('name, kwargs, shape', [
    ('lenet', {}, (2, 8, 8, 1)),
    ('lenet', {}, (2, 28, 28, 1)),
    ('lenet', dict(in_channels=3, width=2), (2, 32, 32, 3)),
    ('resnet20', dict(in_channels=1), (2, 28, 28, 1)),
    pytest.param('resnet20', dict(in_channels=3), (2, 32, 32, 3), marks=pytest.mark.slow),
    ('mobilenetv2', dict(in_channels=1, stages=((1, 8, 1, 1), (6, 8, 2, 2))), (2, 28, 28, 1)),
    pytest.param('mobilenetv2', dict(in_channels=1), (2, 28, 28, 1), marks=pytest.mark.slow),
    pytest.param('mobilenetv2', dict(in_channels=3, width_mult=0.5), (2, 32, 32, 3),
                 marks=pytest.mark.slow),
])
def test_cnn_output_shape(name, kwargs, shape):
  model = models.create(name, num_classes=7, rngs=nnx.Rngs(0), **kwargs)
  model.eval()
  logits = _forward(model, _images(shape))
  assert logits.shape == (shape[0], 7) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()


def test_lm_output_shape_and_max_len():
  model = models.TransformerLM(VOCAB, d_model=32, num_heads=2, max_len=16, rngs=nnx.Rngs(0))
  logits = _forward(model, _tokens((2, 16)))
  assert logits.shape == (2, 16, VOCAB) and logits.dtype == jnp.float32
  with pytest.raises(ValueError, match='max_len=16'):
    model(_tokens((2, 17)))


def test_seq2seq_output_shape():
  model = models.Seq2SeqTransformer(VOCAB, VOCAB + 5, d_model=16, num_heads=2, num_layers=1,
                                    rngs=nnx.Rngs(0))
  logits = _forward(model, _tokens((3, 9)), _tokens((3, 6), seed=1))
  assert logits.shape == (3, 6, VOCAB + 5) and logits.dtype == jnp.float32


def test_adaptive_avg_pool_bins():
  x = np.arange(2 * 7 * 5 * 3, dtype=np.float32).reshape(2, 7, 5, 3)
  got = np.asarray(models.adaptive_avg_pool(jnp.asarray(x), (4, 2)))
  # Bins along 7 -> 4: [0,2) [1,4) [3,6) [5,7); along 5 -> 2: [0,3) [2,5).
  rows, cols = [(0, 2), (1, 4), (3, 6), (5, 7)], [(0, 3), (2, 5)]
  want = np.stack([np.stack([x[:, r0:r1, c0:c1].mean((1, 2)) for c0, c1 in cols], 1)
                   for r0, r1 in rows], 1)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Exact tiling and upsampling (2 -> 4 repeats each row).
  np.testing.assert_allclose(models.adaptive_avg_pool(jnp.asarray(x[:, :6, :4]), (3, 2)),
                             x[:, :6, :4].reshape(2, 3, 2, 2, 2, 3).mean((2, 4)), rtol=1e-6)
  up = models.adaptive_avg_pool(jnp.asarray(x[:, :2, :2]), (4, 4))
  np.testing.assert_array_equal(up, np.repeat(np.repeat(x[:, :2, :2], 2, 1), 2, 2))


# ---------------------------------------------------------------------------- train steps


def _classification_loss(model, batch):
  x, y = batch
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _lm_loss(model, batch):
  (tokens,) = batch
  logits = model(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def _seq2seq_loss(model, batch):
  src, tgt = batch
  logits = model(src, tgt[:, :-1])
  labels = tgt[:, 1:]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  weights = (labels != models.PAD_ID).astype(jnp.float32)
  return (losses * weights).sum() / weights.sum()


def _sgd_step(model, loss_fn, batch) -> float:
  """One jitted SGD step; returns the loss and checks that the parameters moved."""
  optimizer = nnx.Optimizer(model, optax.sgd(0.05), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, batch):
    loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
    optimizer.update(model, grads)
    return loss

  before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
  loss = float(step(model, optimizer, batch))
  after = nnx.state(model, nnx.Param)
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
  assert sum(moved) > len(moved) // 2, 'most parameters should get a gradient'
  return loss


def _labels(n, classes=10):
  return jnp.arange(n, dtype=jnp.int32) % classes


SMALL_MOBILENET_STAGES = ((1, 8, 1, 1), (6, 8, 2, 2))  # every block kind: t=1, t=6, stride 2, residual

# (model factory, loss, batch). Widths are cut down where that does not
# change the graph (compile time, not FLOPs, dominates on CPU).
TRAIN_CASES = {
    'lenet': (lambda r: models.LeNet(rngs=r), _classification_loss,
              (_images((4, 8, 8, 1)), _labels(4))),
    'resnet20': (lambda r: models.ResNet20(in_channels=1, width=4, rngs=r), _classification_loss,
                 (_images((2, 8, 8, 1)), _labels(2))),
    'mobilenetv2': (lambda r: models.MobileNetV2(in_channels=1, width_mult=0.25, rngs=r),
                    _classification_loss, (_images((2, 8, 8, 1)), _labels(2))),
    'mobilenetv2_small': (lambda r: models.MobileNetV2(in_channels=1, width_mult=0.25,
                                                       stages=SMALL_MOBILENET_STAGES, rngs=r),
                          _classification_loss, (_images((2, 8, 8, 1)), _labels(2))),
    'transformer_lm': (lambda r: models.TransformerLM(VOCAB, d_model=32, num_heads=2, max_len=8,
                                                      rngs=r),
                       _lm_loss, (_tokens((2, 8)),)),
    'seq2seq': (lambda r: models.Seq2SeqTransformer(VOCAB, VOCAB, d_model=32, num_heads=2,
                                                    num_layers=1, max_len=8, rngs=r),
                _seq2seq_loss,
                (_tokens((2, 7)).at[0, 5:].set(0), _tokens((2, 6), seed=1).at[1, 4:].set(0))),
}


@pytest.mark.parametrize('name', [
    'lenet', 'resnet20', 'mobilenetv2_small', 'transformer_lm', 'seq2seq',
    pytest.param('mobilenetv2', marks=pytest.mark.slow),
])
def test_float_train_step_is_finite(name):
  make, loss_fn, batch = TRAIN_CASES[name]
  model = make(nnx.Rngs(0))
  assert np.isfinite(_sgd_step(model, loss_fn, batch))


def _check_quantized_train_step(model, loss_fn, batch, has_stem):
  model, report = qtrain.quantize_model(model, FIRST_LAST_FLOAT, rngs=nnx.Rngs(quant=1),
                                        return_report=True)
  # Attention-internal matmuls (op kind 'attention') stay float unless a rule names them.
  kept = {path for path, kind, _ in report.kept_float if kind != 'attention'}
  assert ({'stem', 'head'} if has_stem else {'head'}) <= kept
  assert kept <= {'stem', 'head'}, 'everything but stem/head matches the int8 rule'
  assert report.quantized and not report.unsupported
  assert np.isfinite(_sgd_step(model, loss_fn, batch))


# The quantized BN CNNs take 10-25 s to compile at full depth: the fast tier
# runs LeNet, a 3-block MobileNetV2 and the transformers, the slow tier adds
# full-depth ResNet-20 and MobileNetV2.
@pytest.mark.parametrize('name', [
    'lenet', 'mobilenetv2_small', 'transformer_lm', 'seq2seq',
    pytest.param('resnet20', marks=pytest.mark.slow),
    pytest.param('mobilenetv2', marks=pytest.mark.slow),
])
def test_quantized_train_step_is_finite(name):
  make, loss_fn, batch = TRAIN_CASES[name]
  _check_quantized_train_step(make(nnx.Rngs(0)), loss_fn, batch,
                              has_stem=name not in ('transformer_lm', 'seq2seq'))



# ---------------------------------------------------------------------------- BatchNorm modes


# Both use the same nnx.BatchNorm; the full ResNet-20 only adds compile time.
@pytest.mark.parametrize('make', [
    pytest.param(lambda r: models.ResNet20(in_channels=1, width=4, rngs=r),
                 marks=pytest.mark.slow, id='resnet20'),
    pytest.param(lambda r: models.MobileNetV2(in_channels=1, width_mult=0.25,
                                              stages=SMALL_MOBILENET_STAGES, rngs=r),
                 id='mobilenetv2_small'),
])
def test_batchnorm_updates_stats_only_in_train_mode(make):
  model = make(nnx.Rngs(0))
  x = _images((4, 8, 8, 1)) * 3.0 + 1.0
  stats0 = jax.tree.map(np.array, nnx.state(model, nnx.BatchStat))

  model.eval()
  y_eval = model(x)
  np.testing.assert_array_equal(model(x), y_eval)  # running averages: deterministic
  for a, b in zip(jax.tree.leaves(stats0), jax.tree.leaves(nnx.state(model, nnx.BatchStat))):
    np.testing.assert_array_equal(a, b)

  model.train()
  y_train = model(x)
  stats1 = nnx.state(model, nnx.BatchStat)
  changed = [not np.array_equal(a, b)
             for a, b in zip(jax.tree.leaves(stats0), jax.tree.leaves(stats1))]
  assert all(changed), 'every BatchNorm should update its running mean and variance'
  assert not np.allclose(y_train, y_eval)  # batch statistics, not the initial averages


# ---------------------------------------------------------------------------- masks


def test_lm_is_causal():
  model = models.TransformerLM(VOCAB, d_model=32, num_heads=2, max_len=10, rngs=nnx.Rngs(0))
  tokens = _tokens((2, 10))
  changed = tokens.at[:, 6].set((tokens[:, 6] % (VOCAB - 1)) + 1)  # a different non-pad id
  a, b = _forward(model, tokens), _forward(model, changed)
  np.testing.assert_allclose(a[:, :6], b[:, :6], rtol=1e-5, atol=1e-5)
  assert not np.allclose(a[:, 6:], b[:, 6:], atol=1e-3)


def test_seq2seq_ignores_padded_source_positions():
  model = models.Seq2SeqTransformer(VOCAB, VOCAB, d_model=16, num_heads=2, max_len=12,
                                    rngs=nnx.Rngs(0))
  src = _tokens((2, 5))
  tgt = _tokens((2, 4), seed=1)
  short = _forward(model, src, tgt)
  # The same sentences with trailing padding: padded keys are masked in the
  # encoder and in cross-attention, so the decoder sees the same memory.
  padded = _forward(model, jnp.pad(src, ((0, 0), (0, 7))), tgt)
  np.testing.assert_allclose(short, padded, rtol=1e-5, atol=1e-5)
  # A real token where the padding was does change the output.
  extended = _forward(model, jnp.concatenate([src, _tokens((2, 1), seed=2)], axis=1), tgt)
  assert not np.allclose(short, extended, atol=1e-3)


def test_seq2seq_decoder_is_causal():
  model = models.Seq2SeqTransformer(VOCAB, VOCAB, d_model=16, num_heads=2, num_layers=1,
                                    rngs=nnx.Rngs(0))
  src, tgt = _tokens((2, 5)), _tokens((2, 6), seed=1)
  a = _forward(model, src, tgt)
  b = _forward(model, src, tgt.at[:, 4].set((tgt[:, 4] % (VOCAB - 1)) + 1))
  np.testing.assert_allclose(a[:, :4], b[:, :4], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- vit, bert


@pytest.mark.parametrize('name, kwargs, expected', [
    ('vit', dict(image_size=28), 205_066),
    ('bert_tiny', dict(num_classes=10), 1_018_954),
])
def test_transformer_classifier_parameter_counts(name, kwargs, expected):
  model = nnx.eval_shape(lambda: models.create(name, rngs=nnx.Rngs(0), **kwargs))
  assert _num_params(model) == expected
  assert isinstance(model.head, nnx.Linear)
