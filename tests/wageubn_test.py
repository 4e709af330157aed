"""WAGEUBN: quantizers against plain-numpy transcriptions, wiring, optimizer, training."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import model_testlib
import recipe_training_testlib
import qtrain
from qtrain import prng
from qtrain import wageubn as wq
from qtrain.recipes import registry
from qtrain.recipes.papers.wageubn import (ErrorQuantizedConv, ErrorQuantizedDot, param_labels,
                                    prepare_model, wageubn, wageubn_sgd)

# ----------------------------------------------------------------- numpy oracles
# Transcriptions of papers-1-4.md §3a (the official Quantize.py), in float64.


def np_q(x, k):
  return np.round(np.asarray(x, np.float64) * 2.0 ** (k - 1)) / 2.0 ** (k - 1)


def np_shift(x):
  return 2.0 ** np.round(np.log2(np.asarray(x, np.float64)))


def np_e1(e, k):
  r = np_shift(np.max(np.abs(e)))
  return r * np.clip(np_q(e / r, k), -1, 1)


def np_e2(e, k):
  s = np_shift(np.max(np.abs(e))) / 2.0 ** (k - 1)
  u = e / s
  sign, a = np.sign(u), np.abs(u)
  small = sign * np.clip(np_q(np.where(a < 1, a, 0), k), -1, 1)
  large = sign * np.clip(np.round(np.where(a >= 1, a, 0)), -2 ** (k - 1) + 1, 2 ** (k - 1) - 1)
  return s * (small + large)


def np_grad(g, u, k, scale):
  v = scale * g / np_shift(np.max(np.abs(g)))
  n = np.sign(v) * (np.floor(np.abs(v)) + (np.abs(v) - np.floor(np.abs(v)) > u))
  return np.clip(n, -scale + 1, scale - 1) / (128 * 2.0 ** (k - 1))


def sample(seed, n=4096, spread=6):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal(n) * 10.0 ** rng.uniform(-spread, 0, n)).astype(np.float32)


# ----------------------------------------------------------------- quantizers


def test_shift_matches_log2_rounding():
  x = np.abs(sample(0, spread=30)) + np.float32(1e-30)
  np.testing.assert_array_equal(np.asarray(wq.shift(jnp.asarray(x))), np_shift(x))
  out = np.asarray(wq.shift(jnp.array([0.0, np.nan, np.inf])))
  assert out[0] == 1.0 and np.isnan(out[1:]).all()


@pytest.mark.parametrize('bits', [4, 8, 16, 24])
def test_direct_weight_lr_bit_exact(bits):
  x = sample(1, spread=3) * 3
  np.testing.assert_array_equal(np.asarray(wq.wageubn_direct(jnp.asarray(x), bits=bits)),
                                np_q(x, bits))
  lim = 1 - 2.0 ** (1 - bits)
  np.testing.assert_array_equal(np.asarray(wq.wageubn_weight(jnp.asarray(x), bits=bits)),
                                np.clip(np_q(x, bits), -lim, lim))
  # Activations are unclipped (pitfall 2): 3.0 stays 3.0.
  assert float(wq.wageubn_activation(jnp.float32(3.0))) == 3.0


def test_lr_quantization():
  assert float(wq.wageubn_lr(jnp.float32(0.05))) == 26 / 512
  assert float(wq.wageubn_lr(jnp.float32(2.0))) == 1 - 2 ** -9


@pytest.mark.parametrize('bits', [4, 8])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_errors_bit_exact(bits, seed):
  e = sample(seed) * 10.0 ** (seed - 1)
  np.testing.assert_array_equal(np.asarray(wq.wageubn_error(jnp.asarray(e), bits=bits)),
                                np_e2(e.astype(np.float64), bits))
  np.testing.assert_array_equal(
      np.asarray(wq.wageubn_error(jnp.asarray(e), bits=bits, flag=False)),
      np_e1(e.astype(np.float64), bits))


def test_e2_keeps_small_errors_e1_saturates():
  e = np.array([1.0, 0.3, 0.01, -0.002], np.float32)
  e2 = np.asarray(wq.wageubn_error(jnp.asarray(e)))
  assert np.all(e2[2:] != 0)  # the flag's fine grid keeps errors below one step (pitfall 4)
  # Sh(0.7) = 0.5: E1 clamps the max to R = 0.5 (up to ~30% saturation, pitfall 3).
  e1 = np.asarray(wq.wageubn_error(jnp.array([0.7, 0.1]), flag=False))
  assert e1[0] == 0.5


def test_error_policies():
  for flag in (True, False):
    assert np.all(np.asarray(wq.wageubn_error(jnp.zeros(5), flag=flag)) == 0)
    assert np.isnan(np.asarray(wq.wageubn_error(jnp.array([1.0, np.nan]), flag=flag))).all()
    assert np.isnan(np.asarray(wq.wageubn_error(jnp.array([1.0, np.inf]), flag=flag))).all()
  key = jax.random.key(0)
  assert np.all(np.asarray(wq.wageubn_grad(jnp.zeros(3), key)) == 0)
  assert np.isnan(np.asarray(wq.wageubn_grad(jnp.array([1.0, np.nan]), key))).all()
  x = jnp.array([0.3, -2.0])
  chex.assert_trees_all_equal(jax.grad(lambda x: jnp.sum(wq.wageubn_weight(x) * x))(x),
                              wq.wageubn_weight(x) + x)  # identity STE


def test_bad_arguments():
  x = jnp.ones(3)
  with pytest.raises(ValueError, match='bits'):
    wq.wageubn_direct(x, bits=1)
  with pytest.raises(TypeError, match='bits'):
    wq.wageubn_weight(x, bits=8.0)
  with pytest.raises(ValueError, match='key'):
    wq.wageubn_grad(x)
  with pytest.raises(ValueError, match='scale'):
    wq.wageubn_grad(x, jax.random.key(0), scale=1)
  with pytest.raises(TypeError, match='flag'):
    wq.wageubn_error(x, flag=1)
  with pytest.raises(TypeError, match='floating'):
    wq.wageubn_error(jnp.ones(3, jnp.int32))


@pytest.mark.parametrize('scale', [128, 8])
def test_grad_bit_exact_with_its_noise(scale):
  g = sample(3) * 1e-3
  key = jax.random.key(7)
  u = np.asarray(prng.uniform(key, g.shape), np.float64)
  np.testing.assert_array_equal(np.asarray(wq.wageubn_grad(jnp.asarray(g), key, scale=scale)),
                                np_grad(g.astype(np.float64), u, 8, scale))


def test_grad_unbiased_and_on_neighbours():
  g = jnp.asarray(sample(4, n=256))
  n_samples = 4000
  keys = jax.random.split(jax.random.key(1), n_samples)
  n = jax.jit(jax.vmap(lambda k: wq.wageubn_grad(g, k) * 16384))(keys)
  target = np.clip(128 * np.asarray(g, np.float64) / np_shift(np.max(np.abs(g))), -127, 127)
  n = np.asarray(n, np.float64)
  assert np.all((n == np.floor(target)) | (n == np.ceil(target)))  # support: grid neighbours
  # Each draw has variance <= 1/4: 6 sigma of the mean, union bound over 256 elements.
  assert np.max(np.abs(n.mean(0) - target)) < 6 * 0.5 / np.sqrt(n_samples)


def test_error_identity_quantizes_cotangent_only():
  x = jnp.asarray(sample(5, n=64))
  ct = jnp.asarray(sample(6, n=64))
  y, vjp = jax.vjp(lambda x: wq.error_identity(x, flag=False), x)
  chex.assert_trees_all_equal(y, x)
  chex.assert_trees_all_equal(vjp(ct)[0], wq.wageubn_error(ct, flag=False))


# ----------------------------------------------------------------- recipe and wiring


def test_registered():
  info = registry.info('wageubn')
  assert info.factory is wageubn and info.build().name == 'wageubn'
  r = wageubn()
  assert r.rules[0].config is None and r.rules[0].module_path == 'stem|head'
  fwd = r.rules[1].config.fwd
  assert (fwd.lhs.format.fractional_bits, fwd.rhs.format.name) == (7, 'fixed8.7')
  with pytest.raises(ValueError, match='weight_decay'):
    wageubn(weight_decay=-1.0)
  with pytest.raises(ValueError, match='learning_rate'):
    r.optimizer(1e-4)


class _One(nnx.Module):
  def __init__(self, layer):
    self.layer = layer

  def __call__(self, x):
    return self.layer(x)


def _manual_grads(x, w, ct, fwd):
  """E1(dX), dW of fwd(A_q, W_q) with the E2-quantized output error (papers §3b)."""
  a_q, w_q = wq.wageubn_direct(x), wq.wageubn_weight(w)
  _, vjp = jax.vjp(fwd, a_q, w_q)
  dx, dw = vjp(wq.wageubn_error(ct))
  return wq.wageubn_error(dx, flag=False), dw


@pytest.mark.parametrize('kind', ['linear', 'conv'])
def test_layer_backward_is_e1_e2(kind):
  rng = np.random.default_rng(0)
  if kind == 'linear':
    layer = nnx.Linear(16, 8, use_bias=False, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((4, 16)), jnp.float32)
    fwd = lambda a, w: a @ w
  else:
    layer = nnx.Conv(3, 4, (3, 3), padding='SAME', use_bias=False, rngs=nnx.Rngs(0))
    x = jnp.asarray(rng.standard_normal((2, 5, 5, 3)), jnp.float32)
    fwd = lambda a, w: jax.lax.conv_general_dilated(a, w, (1, 1), 'SAME',
                                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  model = prepare_model(qtrain.quantize_model(_One(layer), wageubn()))
  hook = model.layer.dot_general if kind == 'linear' else model.layer.conv_general_dilated
  assert isinstance(hook, ErrorQuantizedDot if kind == 'linear' else ErrorQuantizedConv)
  w = layer.kernel[...]
  ct = jnp.asarray(rng.standard_normal(fwd(x, w).shape) * 1e-3, jnp.float32)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def apply(x, w):
    p = jax.tree.map(lambda _: w, params)  # the only param is the kernel
    return nnx.merge(graphdef, p, rest)(x)

  y, vjp = jax.vjp(apply, x, w)
  chex.assert_trees_all_close(y, fwd(wq.wageubn_direct(x), wq.wageubn_weight(w)), rtol=1e-6)
  dx, dw = vjp(ct)
  dx_ref, dw_ref = _manual_grads(x, w, ct, fwd)
  chex.assert_trees_all_close(dw, dw_ref, rtol=1e-5, atol=1e-9)
  # dX is E1-quantized: equal up to a float rounding that moves a value across a grid tie.
  assert np.mean(np.asarray(dx) == np.asarray(dx_ref)) > 0.99


def test_lenet_gemms_and_float_layers():
  model = qtrain.models.LeNet(batch_norm=True, rngs=nnx.Rngs(0))
  prepare_model(qtrain.quantize_model(model, wageubn()))
  x = jnp.ones((2, 8, 8, 1))
  loss = lambda m: jnp.sum(m(x))
  graphdef, state = nnx.split(model)
  found = model_testlib.gemms(jax.make_jaxpr(
      lambda state: nnx.grad(loss)(nnx.merge(graphdef, state)))(state))
  for layer in ('conv2', 'fc1'):
    assert {'fwd', 'dlhs', 'drhs'} <= {g.gemm for g in found if g.in_layer(layer)}, layer
  # fc1 (a dot): fixed-point A (int16 carrier) x W, int16 E2 codes in the backward.
  assert all(set(g.dtypes) == {'int16'} for g in found if g.in_layer('fc1'))
  model_testlib.assert_float_layer(found, (5, 5, 1, 6))  # stem
  model_testlib.assert_float_layer(found, (120, 10))  # head


def test_param_labels():
  model = qtrain.models.LeNet(batch_norm=True, rngs=nnx.Rngs(0))
  labels = nnx.to_flat_state(param_labels(nnx.state(model, nnx.Param)))
  by_path = {'/'.join(map(str, p)): v.get_value() if isinstance(v, nnx.Variable) else v
             for p, v in labels}
  assert by_path['stem/kernel'] == by_path['head/kernel'] == by_path['head/bias'] == 'float'
  assert by_path['stem_bn/scale'] == by_path['conv2_bn/bias'] == 'bn'
  assert by_path['conv2/kernel'] == by_path['fc1/bias'] == 'quant'
  # Lists (ResNet stages) and Linen variable dicts.
  tree = {'params': {'stages': [{'bn1': {'scale': 1.0, 'bias': 0.0}, 'conv1': {'kernel': 1.0}}],
                     'head': {'kernel': 1.0}}}
  assert param_labels(tree) == {'params': {'stages': [{'bn1': {'scale': 'bn', 'bias': 'bn'},
                                                       'conv1': {'kernel': 'quant'}}],
                                           'head': {'kernel': 'float'}}}


def test_optimizer_groups_and_grids():
  params = {'stem': {'kernel': jnp.full((2, 2), 0.5)}, 'conv': {'kernel': jnp.full((2, 2), 0.5)},
            'bn': {'scale': jnp.full((2,), 1.5), 'bias': jnp.zeros(2)},
            'head': {'kernel': jnp.full((2, 2), 0.5)}}
  grads = jax.tree.map(lambda p: jnp.linspace(-0.3, 0.2, p.size).reshape(p.shape), params)
  r = wageubn()
  lr = 0.1
  tx = r.wrap_optimizer(r.optimizer(lr))
  state = tx.init(params)
  update = jax.jit(tx.update)
  new = params
  for _ in range(3):
    updates, state = update(grads, state, new)
    new = optax.apply_updates(new, updates)
  lr_q = float(wq.wageubn_lr(jnp.float32(lr)))
  # Float group: plain SGD momentum 0.25 on the quantized LR, weight decay in the gradient.
  ref = params['head']['kernel']
  sgd, s = optax.sgd(lr_q, momentum=0.25), None
  s = sgd.init(ref)
  for _ in range(3):
    u, s = sgd.update(grads['head']['kernel'] + 1e-4 * ref, s)
    ref = ref + u
  chex.assert_trees_all_close(new['head']['kernel'], ref, rtol=1e-6)
  # Quantized groups: weights on the 2^-23 grid (BN γ = 1.5 > 1 unclipped), momentum on 2^-12.
  for leaf in (new['conv']['kernel'], new['bn']['scale'], new['bn']['bias']):
    np.testing.assert_array_equal(leaf * 2 ** 23, jnp.round(leaf * 2 ** 23))
  assert float(new['bn']['scale'][0]) > 1.0
  momenta = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
  # G drops the magnitude: a conv step is lr_q·|a| with |a| <= 127/16384/(1-0.25).
  step = np.abs(np.asarray(new['conv']['kernel'] - params['conv']['kernel']))
  assert 0 < step.max() <= 3 * lr_q * 127 / 16384 / 0.75 + 2 ** -23
  assert momenta


def test_sgd_schedule_and_validation():
  tx = wageubn_sgd(optax.constant_schedule(0.05))
  p = {'conv': {'kernel': jnp.ones(2)}}
  u, _ = tx.update({'conv': {'kernel': jnp.ones(2)}}, tx.init(p), p)
  np.testing.assert_allclose(u['conv']['kernel'], -26 / 512)
  with pytest.raises(ValueError, match='momentum_bits'):
    wageubn_sgd(0.1, momentum_bits=30)


@functools.lru_cache(maxsize=None)
def _training_pair():
  lr = 0.1
  r = wageubn()
  # The recipe's prepare_model (BN swap, E1/E2) runs inside train_digits_cnn.
  quantized = recipe_training_testlib.train_digits_cnn(r, optimizer=r.optimizer(lr))
  lr_q = float(wq.wageubn_lr(jnp.float32(lr)))
  reference = recipe_training_testlib.train_digits_cnn(qtrain.recipes.fp32(),
                                                       optimizer=optax.sgd(lr_q, momentum=0.25))
  return quantized, reference


def test_training_close_to_fp32():
  # Same seed, same paper optimizer (SGD momentum 0.25, lr 0.1 -> 51/512):
  # measured 95.0% vs 98.3% on this CPU; margin 5 points.
  quantized, reference = _training_pair()
  assert np.all(np.isfinite(quantized.losses))
  assert quantized.accuracy >= reference.accuracy - 0.05, (quantized.accuracy,
                                                           reference.accuracy)
  assert recipe_training_testlib.max_relative_grad_difference(quantized, reference) > 0.05
