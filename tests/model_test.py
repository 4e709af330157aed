"""quantize_model on Flax NNX models: training, jaxpr dtypes per layer, rules, report, errors."""

import functools
import logging
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

import model_testlib as lib
from qtrain import nnx_hooks, presets
from qtrain.model import quantize_model
from qtrain.rules import QuantRule

PRESETS = {'int8': presets.int8, 'int4': presets.int4}


class MLP(nnx.Module):
  """64 -> 32 -> 24 -> 10 on flattened 8x8 digits."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.dense0 = nnx.Linear(64, 32, rngs=rngs)
    self.dense1 = nnx.Linear(32, 24, rngs=rngs)
    self.head = nnx.Linear(24, 10, rngs=rngs)

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    x = nnx.relu(self.dense0(x))
    x = nnx.relu(self.dense1(x))
    return self.head(x)


class CNN(nnx.Module):
  """conv0 -> BN -> conv1 (stride 2) -> BN -> head on 8x8x1 digits."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv0 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.bn0 = nnx.BatchNorm(8, rngs=rngs)
    self.conv1 = nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs)
    self.bn1 = nnx.BatchNorm(16, rngs=rngs)
    self.head = nnx.Linear(4 * 4 * 16, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn0(self.conv0(x[..., None])))
    x = nnx.relu(self.bn1(self.conv1(x)))
    return self.head(x.reshape(x.shape[0], -1))


class Block(nnx.Module):
  """A pre-LN transformer block on the 8 rows of a digit as 8 tokens of 8 features."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(8, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(2, 8, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(8, rngs=rngs)
    self.ffn = nnx.Linear(8, 8, rngs=rngs)
    self.head = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, x):
    h = x + self.attn(self.ln1(x))
    h = h + nnx.relu(self.ffn(self.ln2(h)))
    return self.head(h.mean(axis=1))


def _loss(model, x, y):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _train(model, steps: int = 50, lr: float = 1e-2):
  """Trains with Adam under nnx.jit; returns the losses and the last gradients."""
  optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)
  traces = []

  @nnx.jit
  def step(model, optimizer, x, y):
    traces.append(1)
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss, grads

  losses, grads = [], None
  for x, y in lib.batches(steps):
    loss, grads = step(model, optimizer, x, y)
    losses.append(float(loss))
  assert len(traces) == 1  # the shared quant stream advances without retracing
  return losses, grads


def _grad_gemms(model, x, y) -> list[lib.Gemm]:
  """The GEMMs of the jaxpr of the parameter gradient (the train step's matmuls)."""
  return _jaxpr_gemms(lambda m: nnx.grad(_loss)(m, x, y), model)


def _jaxpr_gemms(fn, model) -> list[lib.Gemm]:
  """GEMMs of jax.make_jaxpr(fn)(model); the model is split so its state can be traced."""
  graphdef, state = nnx.split(model)
  return lib.gemms(jax.make_jaxpr(lambda state: fn(nnx.merge(graphdef, state)))(state))


def _batch():
  return next(lib.batches(1, batch_size=8))


# ---------------------------------------------------------------------------
# jaxpr dtypes per layer, then training
# ---------------------------------------------------------------------------
# Compiling a quantized train step costs ~1-2 s of XLA:CPU time per layer, so
# each model trains with one preset in the default run and with the other in
# the slow run; the jaxpr checks (tracing only) cover both presets by default.
def _trained_in_default(default: str):
  return [p if p == default else pytest.param(p, marks=pytest.mark.slow)
          for p in ('int8', 'int4')]


def _quantized_mlp(preset):
  return quantize_model(MLP(rngs=nnx.Rngs(0)), PRESETS[preset]())


def _quantized_cnn(preset):
  rules = [QuantRule(module_path='conv0|head', config=None), QuantRule(config=PRESETS[preset]())]
  return quantize_model(CNN(rngs=nnx.Rngs(0)), rules, return_report=True)


def _quantized_block(preset):
  cfg = PRESETS[preset]()
  rules = [QuantRule(module_path='attn', op_kinds=('attention',), config=cfg),
           QuantRule(config=cfg)]
  return quantize_model(Block(rngs=nnx.Rngs(0)), rules, return_report=True)


def _assert_trains(model, lr: float = 1e-2):
  losses, grads = _train(model, lr=lr)
  lib.assert_learns(losses)
  lib.assert_finite_tree(grads)


@pytest.mark.parametrize('preset', ['int8', 'int4'])
def test_mlp_every_gemm_low_bit(preset):
  found = _grad_gemms(_quantized_mlp(preset), *_batch())
  for path in ('dense0', 'dense1', 'head'):
    lib.assert_layer_gemms(found, path, preset)
  assert all(g.quantized for g in found)  # no float GEMM left anywhere


@pytest.mark.parametrize('preset', ['int8', 'int4'])
def test_mlp_trains(preset):
  _assert_trains(_quantized_mlp(preset))


@pytest.mark.parametrize('preset', ['int8', 'int4'])
def test_cnn_keeps_first_conv_and_head_float(preset):
  model, report = _quantized_cnn(preset)
  assert [p for p, _, _ in report.quantized] == ['conv1']
  assert sorted(p for p, _, _ in report.kept_float) == ['conv0', 'head']
  found = _grad_gemms(model, *_batch())
  lib.assert_layer_gemms(found, 'conv1', preset)
  lib.assert_float_layer(found, (3, 3, 1, 8))  # conv0
  lib.assert_float_layer(found, (256, 10))  # head


@pytest.mark.parametrize('preset', _trained_in_default('int8'))
def test_cnn_with_batchnorm_trains(preset):
  _assert_trains(_quantized_cnn(preset)[0])


@pytest.mark.parametrize('preset', ['int8', 'int4'])
def test_transformer_block_every_gemm_low_bit_with_attention_rule(preset):
  model, report = _quantized_block(preset)
  assert ('attn', 'attention', 0) in report.quantized
  found = _grad_gemms(model, *_batch())
  for path in ('attn/query', 'attn/key', 'attn/value', 'attn/out', 'attn', 'ffn', 'head'):
    lib.assert_layer_gemms(found, path, preset)
  assert all(g.quantized for g in found)


@pytest.mark.parametrize('preset', _trained_in_default('int4'))
def test_transformer_block_trains(preset):
  _assert_trains(_quantized_block(preset)[0])


def test_attention_matmuls_stay_float_without_an_attention_rule():
  model, report = quantize_model(Block(rngs=nnx.Rngs(0)), presets.int8(), return_report=True)
  assert any(p == 'attn' and k == 'attention' and 'op_kinds' in why
             for p, k, why in report.kept_float)
  found = _grad_gemms(model, *_batch())
  lib.assert_layer_gemms(found, 'attn/query', 'int8')
  assert not any(g.in_layer('attn') for g in found)
  # flax's own attention: QKᵀ and probs·V, forward and backward, all float32.
  floats = [g for g in found if not g.quantized]
  assert len(floats) >= 2 and all(set(g.dtypes) == {'float32'} for g in floats)


def test_quantized_attention_matches_flax_in_float_and_keeps_masks():
  """config=None attention == flax's; masks, causal, GQA and dropout keep their meaning."""
  from qtrain import attention  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.standard_normal((2, 5, 4, 8)), jnp.float32)
  kv = jnp.asarray(rng.standard_normal((2, 6, 2, 8)), jnp.float32)  # 2 kv heads: GQA
  mask = jnp.asarray(rng.random((2, 1, 5, 6)) < 0.7)
  drop = dict(dropout_rng=jax.random.key(3), dropout_rate=0.5, deterministic=False)

  @jax.jit
  def both(q, kv, mask):
    cases = (dict(is_causal=True), dict(mask=mask, **drop))
    return [(attention.dot_product_attention(q, kv, kv, **c),
             nnx.dot_product_attention(q, kv, kv, **c)) for c in cases]

  for got, want in both(q, kv, mask):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_einsum_layer_is_quantized():
  model = nnx.Sequential(nnx.Einsum('btd,dhf->bthf', (8, 2, 4), (2, 4), rngs=nnx.Rngs(0)))
  model, report = quantize_model(model, presets.int8(), return_report=True)
  assert report.quantized == [('layers/0', 'einsum', 0)]
  x = jnp.ones((3, 5, 8))
  found = _jaxpr_gemms(lambda m: nnx.grad(lambda m: m(x).sum())(m), model)
  assert found and all(set(g.dtypes) == {'int8'} for g in found)


# ---------------------------------------------------------------------------
# keys: one shared stream, fresh noise per step, no retrace
# ---------------------------------------------------------------------------
def test_jit_step_draws_fresh_noise_without_retracing():
  rngs = nnx.Rngs(quant=3)
  model = nnx.Sequential(nnx.Linear(8, 6, rngs=nnx.Rngs(0)), nnx.Linear(6, 10, rngs=nnx.Rngs(1)))
  model = quantize_model(model, presets.int8(), rngs=rngs)
  hooks = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx_hooks.HOOK_TYPES)]
  assert len(hooks) == 2 and all(h.rngs is rngs for h in hooks)
  x, y = _batch()
  x = x[:, 0]  # [B, 8]
  traces = []

  @nnx.jit
  def grad_step(model, x, y):
    traces.append(1)
    return nnx.grad(_loss)(model, x, y)

  g1 = grad_step(model, x, y)
  g2 = grad_step(model, x, y)
  assert len(traces) == 1
  assert int(rngs.quant.count[...]) == 4  # one key per stochastic layer per step
  # Same data and weights: only the backward SR noise differs.
  k1, k2 = (g['layers'][0]['kernel'][...] for g in (g1, g2))
  assert not np.array_equal(k1, k2)


def test_deterministic_config_draws_no_keys():
  rngs = nnx.Rngs(quant=0)
  model = quantize_model(nnx.Linear(4, 2, rngs=nnx.Rngs(0)),
                         presets.int8(gradient_rounding='nearest'), rngs=rngs)
  nnx.jit(lambda m, x: m(x))(model, jnp.ones((3, 4)))
  assert int(rngs.quant.count[...]) == 0


@pytest.mark.parametrize('rngs, error, match', [
    (nnx.Rngs(params=0), ValueError, "'quant' stream"),
    (jax.random.key(0), TypeError, 'nnx.Rngs'),
])
def test_bad_rngs(rngs, error, match):
  with pytest.raises(error, match=match):
    quantize_model(MLP(rngs=nnx.Rngs(0)), presets.int8(), rngs=rngs)


# ---------------------------------------------------------------------------
# rules and report
# ---------------------------------------------------------------------------
def test_first_match_wins_and_report():
  int8, int4 = presets.int8(), presets.int4()
  rules = [QuantRule(module_path='dense.*', config=int4), QuantRule(module_path='dense0',
                                                                     config=int8),
           QuantRule(module_path='head', config=None), QuantRule(config=int8)]
  model, report = quantize_model(MLP(rngs=nnx.Rngs(0)), rules, return_report=True)
  assert model.dense0.dot_general.config == int4  # rule 0, not the later 'dense0'
  assert sorted(report.quantized) == [('dense0', 'linear', 0), ('dense1', 'linear', 0)]
  assert report.kept_float == [('head', 'linear', 'rule 2 has config=None')]
  assert report.unused_rules == [1, 3]  # shadowed and catch-all that never fired
  assert report.unsupported == []


def test_regex_typo_is_reported_and_logged(caplog):
  rules = [QuantRule(module_path='dens0', config=presets.int8())]  # typo of 'dense0'
  with caplog.at_level(logging.WARNING, logger='qtrain'):
    model, report = quantize_model(MLP(rngs=nnx.Rngs(0)), rules, return_report=True)
  assert report.unused_rules == [0] and report.quantized == []
  assert sorted(p for p, _, _ in report.kept_float) == ['dense0', 'dense1', 'head']
  assert 'dens0' in caplog.text
  assert model.dense0.dot_general is lax.dot_general


def test_rules_from_dot_config_rule_or_recipe():
  cfg = presets.int8()
  recipe = types.SimpleNamespace(rules=(QuantRule(module_path='head', config=None),
                                        QuantRule(config=cfg)))
  for rules, n in ((cfg, 3), (QuantRule(module_path='head', config=cfg), 1), (recipe, 2)):
    _, report = quantize_model(MLP(rngs=nnx.Rngs(0)), rules, return_report=True)
    assert len(report.quantized) == n, rules


@pytest.mark.parametrize('rules, match', [
    ('.*', 'sequence of qtrain.QuantRule'),
    ([QuantRule(), 'head'], r'rules\[1\]'),
    (None, 'rules_or_recipe'),
])
def test_bad_rules(rules, match):
  with pytest.raises(TypeError, match=match):
    quantize_model(MLP(rngs=nnx.Rngs(0)), rules)


def test_not_a_flax_model():
  with pytest.raises(TypeError, match='nnx.Module'):
    quantize_model(lambda x: x, presets.int8())


# ---------------------------------------------------------------------------
# unsupported layers
# ---------------------------------------------------------------------------
class WithUpsampling(nnx.Module):

  def __init__(self, *, rngs: nnx.Rngs):
    self.down = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.up = nnx.ConvTranspose(4, 1, (3, 3), rngs=rngs)

  def __call__(self, x):
    return self.up(self.down(x))


def test_unsupported_layer_named_by_a_rule_raises_and_changes_nothing():
  model = WithUpsampling(rngs=nnx.Rngs(0))
  rules = [QuantRule(module_path='up|down', config=presets.int8())]
  with pytest.raises(ValueError, match=r"'up' \(ConvTranspose, conv\).*lax.conv_transpose"):
    quantize_model(model, rules)
  assert model.down.conv_general_dilated is lax.conv_general_dilated  # nothing installed


def test_unsupported_layer_swept_by_catch_all_is_reported():
  model, report = quantize_model(WithUpsampling(rngs=nnx.Rngs(0)), presets.int8(),
                                 return_report=True)
  assert report.quantized == [('down', 'conv', 0)]
  assert [(p, t) for p, t, _ in report.unsupported] == [('up', 'ConvTranspose')]
  assert 'no conv_general_dilated hook' in report.unsupported[0][2]
  # A config=None rule may name it: it stays float anyway.
  quantize_model(model, [QuantRule(module_path='up', config=None), QuantRule(config=None)])


def test_custom_hooks_are_not_overwritten():
  custom = functools.partial(lax.dot_general, precision=lax.Precision.HIGHEST)
  model = nnx.Sequential(nnx.Linear(4, 4, dot_general=custom, rngs=nnx.Rngs(0)),
                         nnx.LinearGeneral(4, 4, dot_general_cls=lambda: lax.dot_general,
                                           rngs=nnx.Rngs(1)))
  model, report = quantize_model(model, presets.int8(), return_report=True)
  why = dict((p, w) for p, _, w in report.unsupported)
  assert 'already replaced' in why['layers/0'] and 'dot_general_cls' in why['layers/1']
  assert model.layers[0].dot_general is custom
  with pytest.raises(ValueError, match="'layers/0' \\(Linear"):
    quantize_model(model, [QuantRule(module_path='layers/0', config=presets.int8())])


def test_linen_module_inside_bridge_is_unsupported():
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  model = nnx.bridge.ToNNX(nn.Dense(3), rngs=nnx.Rngs(0))
  _, report = quantize_model(model, presets.int8(), return_report=True)
  assert report.unsupported and 'ToNNX' in report.unsupported[0][2]


# ---------------------------------------------------------------------------
# quantizing twice
# ---------------------------------------------------------------------------
def test_quantizing_again_replaces_hooks_and_float_restores_the_model():
  model = MLP(rngs=nnx.Rngs(0))
  forward = nnx.jit(lambda m, x: m(x))
  x, _ = _batch()
  y_float = forward(model, x)
  rngs = nnx.Rngs(quant=1)
  quantize_model(model, presets.int8(), rngs=rngs)
  quantize_model(model, presets.int4())  # re-applied: same stream, new config
  hooks = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx_hooks.HOOK_TYPES)]
  assert len(hooks) == 3 and all(h.config == presets.int4() and h.rngs is rngs for h in hooks)
  assert not np.array_equal(forward(model, x), y_float)
  _, report = quantize_model(model, [QuantRule(config=None)], return_report=True)
  assert model.dense0.dot_general is lax.dot_general
  assert len(report.kept_float) == 3
  np.testing.assert_array_equal(forward(model, x), y_float)  # static again: jit works


def test_float_rule_restores_attention_and_projection_ops():
  block = quantize_model(Block(rngs=nnx.Rngs(0)), [
      QuantRule(module_path='attn', op_kinds=('attention',), config=presets.int4()),
      QuantRule(config=presets.int4())])
  assert isinstance(block.attn.attention_fn, nnx_hooks.QuantizedAttention)
  quantize_model(block, [QuantRule(op_kinds=('attention', 'linear'), config=None)])
  assert block.attn.attention_fn is nnx.dot_product_attention
  assert block.attn.query.dot_general is None  # what MultiHeadAttention builds it with
