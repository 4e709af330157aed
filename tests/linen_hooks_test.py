"""quantize_model on Flax Linen models, and agreement with the NNX wiring."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import model_testlib as lib
from qtrain import linen_hooks, presets
from qtrain.model import quantize_model
from qtrain.rules import QuantRule

PRESETS = {'int8': presets.int8, 'int4': presets.int4}
KEEP_ENDS_FLOAT = QuantRule(module_path='conv0|head', config=None)


class CNN(nn.Module):
  """conv0 -> conv1 (stride 2) -> head on 8x8 digits."""
  width: int = 8

  def setup(self):
    self.conv0 = nn.Conv(self.width, (3, 3))
    self.conv1 = nn.Conv(16, (3, 3), strides=2)
    self.head = nn.Dense(10)

  def __call__(self, x):
    x = self.features(x)
    return self.head(x.reshape(x.shape[0], -1))

  def features(self, x):
    x = nn.relu(self.conv0(x[..., None]))
    return nn.relu(self.conv1(x))


class NnxCNN(nnx.Module):
  """The same network in NNX."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv0 = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.conv1 = nnx.Conv(8, 16, (3, 3), strides=2, rngs=rngs)
    self.head = nnx.Linear(256, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv0(x[..., None]))
    x = nnx.relu(self.conv1(x))
    return self.head(x.reshape(x.shape[0], -1))


def _loss(params, model, x, y, key=None):
  logits = model.apply({'params': params}, x, rngs=None if key is None else {'quant': key})
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _batch():
  return next(lib.batches(1, batch_size=8))


def _init(model, x):
  return model.init({'params': jax.random.key(0)}, x)['params']


def _rules(preset: str):
  return [KEEP_ENDS_FLOAT, QuantRule(config=PRESETS[preset]())]


# ---------------------------------------------------------------------------
# parameter tree, jaxpr dtypes, training
# ---------------------------------------------------------------------------
def test_same_variables_as_the_unquantized_model():
  x, _ = _batch()
  q = quantize_model(CNN(width=8), _rules('int8'))
  assert type(q).__name__ == 'CNN' and q.width == 8 and isinstance(q, CNN)
  jax.tree.map(np.testing.assert_array_equal, _init(q, x), _init(CNN(), x))


@pytest.mark.parametrize('preset', ['int8', 'int4'])
def test_matched_layers_low_bit_excluded_layers_float(preset):
  q = quantize_model(CNN(), _rules(preset))
  x, y = _batch()
  params = _init(q, x)
  loss = lambda p: _loss(p, q, x, y, jax.random.key(1))
  found = lib.gemms(jax.make_jaxpr(jax.grad(loss))(params))
  lib.assert_layer_gemms(found, 'conv1', preset)
  lib.assert_float_layer(found, (3, 3, 1, 8))  # conv0
  lib.assert_float_layer(found, (256, 10))  # head


@pytest.mark.parametrize('preset', ['int4', pytest.param('int8', marks=pytest.mark.slow)])
def test_linen_cnn_trains(preset):
  q = quantize_model(CNN(), presets.int8() if preset == 'int8' else [QuantRule(
      config=presets.int4())])
  x, _ = _batch()
  params = _init(q, x)
  tx = optax.adam(1e-2)
  opt_state = tx.init(params)
  traces = []

  @jax.jit
  def step(params, opt_state, x, y, key):
    traces.append(1)
    loss, grads = jax.value_and_grad(_loss)(params, q, x, y, key)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss, grads

  losses = []
  for i, (x, y) in enumerate(lib.batches(50)):
    params, opt_state, loss, grads = step(params, opt_state, x, y,
                                          jax.random.fold_in(jax.random.key(7), i))
    losses.append(float(loss))
  assert len(traces) == 1
  lib.assert_learns(losses)
  lib.assert_finite_tree(grads)


def test_nnx_and_linen_wiring_agree():
  """Same weights, same rules: identical outputs, identical deterministic gradients."""
  cfg = presets.int8(gradient_rounding='nearest')  # no noise anywhere: exact comparison
  rules = [KEEP_ENDS_FLOAT, QuantRule(config=cfg)]
  x, y = _batch()
  linen = quantize_model(CNN(), rules)
  params = _init(linen, x)
  model = NnxCNN(rngs=nnx.Rngs(0))
  for name in ('conv0', 'conv1', 'head'):
    getattr(model, name).kernel[...] = params[name]['kernel']
    getattr(model, name).bias[...] = params[name]['bias']
  model = quantize_model(model, rules)

  def nnx_loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  nnx_out, nnx_grads = nnx.jit(lambda m: (m(x), nnx.grad(nnx_loss)(m, x, y)))(model)
  linen_out, linen_grads = jax.jit(
      lambda p: (linen.apply({'params': p}, x), jax.grad(_loss)(p, linen, x, y)))(params)
  np.testing.assert_array_equal(nnx_out, linen_out)
  for name in ('conv0', 'conv1', 'head'):
    for leaf in ('kernel', 'bias'):
      np.testing.assert_array_equal(nnx_grads[name][leaf][...], linen_grads[name][leaf])


# ---------------------------------------------------------------------------
# report, keys, errors
# ---------------------------------------------------------------------------
def test_quantization_report():
  rules = _rules('int8') + [QuantRule(module_path='conv2', config=presets.int4())]
  report = linen_hooks.quantization_report(quantize_model(CNN(), rules), _batch()[0])
  assert report.quantized == [('conv1', 'conv', 1)]
  assert sorted(p for p, _, _ in report.kept_float) == ['conv0', 'head']
  assert report.unused_rules == [2]


def test_stochastic_layers_need_a_quant_key_init_does_not():
  q = quantize_model(CNN(), presets.int8())
  x, _ = _batch()
  params = _init(q, x)  # init runs the float ops: no key needed
  with pytest.raises(ValueError, match=r"'conv0'.*rngs=\{'quant': key\}"):
    q.apply({'params': params}, x)
  deterministic = quantize_model(CNN(), presets.int8(gradient_rounding='nearest'))
  out = jax.eval_shape(lambda: deterministic.apply({'params': params}, x))  # traced: no key
  assert out.shape == (8, 10)


class Upsample(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(4, name='down')(x)
    return nn.ConvTranspose(2, (3,), name='up')(x)


def test_unsupported_layers():
  x = jnp.ones((2, 5, 3))
  report = linen_hooks.quantization_report(quantize_model(Upsample(), presets.int8()), x)
  assert report.quantized == [('down', 'linear', 0)]
  assert [(p, t) for p, t, _ in report.unsupported] == [('up', 'ConvTranspose')]
  named = quantize_model(Upsample(), [QuantRule(module_path='up', config=presets.int8())])
  with pytest.raises(ValueError, match=r"'up' \(ConvTranspose, conv\).*lax.conv_transpose"):
    named.init({'params': jax.random.key(0)}, x)


def test_custom_op_is_left_alone():

  class Custom(nn.Module):

    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, dot_general=jax.lax.dot_general, name='dense')(x)

  report = linen_hooks.quantization_report(quantize_model(Custom(), presets.int8()),
                                           jnp.ones((2, 4)))
  assert report.quantized == [] and 'already set' in report.unsupported[0][2]


def test_public_methods_are_intercepted_and_requantizing_replaces_rules():
  x, y = _batch()
  q = quantize_model(CNN(), presets.int8())
  params = _init(q, x)
  feats = jax.make_jaxpr(lambda p: q.apply({'params': p}, x, method='features',
                                           rngs={'quant': jax.random.key(0)}))(params)
  assert {g.dtypes for g in lib.gemms(feats)} == {
      tuple(lib.low_bit_dtypes('int8', 'fwd', 'conv_general_dilated')) * 2}
  assert all(g.quantized for g in lib.gemms(feats))
  again = quantize_model(q, [QuantRule(config=None)])
  assert type(again).__mro__[1] is CNN  # a fresh subclass of the original, not nested
  found = lib.gemms(jax.make_jaxpr(jax.grad(lambda p: _loss(p, again, x, y)))(params))
  assert found and not any(g.quantized for g in found)


def test_nested_quantized_model_keeps_its_own_rules():

  class Outer(nn.Module):
    inner: nn.Module

    @nn.compact
    def __call__(self, x):
      return nn.Dense(2, name='head')(self.inner(x))

  def quantized_gemms(inner_rules, outer_rules):
    inner = quantize_model(nn.Dense(4), inner_rules)  # quantized on its own
    outer = quantize_model(Outer(inner=inner), outer_rules)
    x = jnp.ones((3, 5))
    params = outer.init({'params': jax.random.key(0)}, x)
    apply = lambda p: outer.apply(p, x, rngs={'quant': jax.random.key(1)})
    return [g.quantized for g in lib.gemms(jax.make_jaxpr(apply)(params))]

  float_rule = [QuantRule(config=None)]
  assert quantized_gemms(presets.int8(), float_rule) == [True, False]  # inner, head
  assert quantized_gemms(float_rule, presets.int8()) == [False, True]


def test_quantize_model_arguments_for_linen():
  with pytest.raises(ValueError, match='rngs is for NNX'):
    quantize_model(CNN(), presets.int8(), rngs=nnx.Rngs(quant=0))
  with pytest.raises(ValueError, match='quantization_report'):
    quantize_model(CNN(), presets.int8(), return_report=True)
  bound = CNN().bind(CNN().init({'params': jax.random.key(0)}, _batch()[0]))
  with pytest.raises(ValueError, match='unbound'):
    quantize_model(bound, presets.int8())
  with pytest.raises(TypeError, match='not returned by qtrain.quantize_model'):
    linen_hooks.quantization_report(CNN(), _batch()[0])


# ---------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------
class Attention(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.MultiHeadDotProductAttention(num_heads=2, name='attn')(x)


@pytest.mark.parametrize('with_rule', [True, False])
def test_linen_attention_matmuls_quantized_only_with_an_attention_rule(with_rule):
  cfg = presets.int8()
  rules = [QuantRule(module_path='attn', op_kinds=('attention',), config=cfg)] * with_rule + [
      QuantRule(config=cfg)]
  q = quantize_model(Attention(), rules)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 5, 8)), jnp.float32)
  params = q.init({'params': jax.random.key(0)}, x)['params']

  def loss(p):
    return q.apply({'params': p}, x, rngs={'quant': jax.random.key(1)}).sum()

  found = lib.gemms(jax.make_jaxpr(jax.grad(loss))(params))
  for path in ('attn/query', 'attn/key', 'attn/value', 'attn/out'):
    lib.assert_layer_gemms(found, path, 'int8')
  attention = [g for g in found if not any(g.in_layer(f'attn/{n}') for n in
                                           ('query', 'key', 'value', 'out'))]
  assert attention
  if with_rule:
    assert all(g.in_layer('attn') and set(g.dtypes) == {'int8'} for g in attention)
  else:
    assert all(not g.quantized and set(g.dtypes) == {'float32'} for g in attention)
