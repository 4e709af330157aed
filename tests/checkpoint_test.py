"""Checkpoints: bit-identical resume, atomic writes, bad input, packed kernel export."""

import dataclasses
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import qtrain
from qtrain import checkpoint as ckpt
from qtrain import formats as fmts
from qtrain import scaling
from qtrain.nnx_hooks import QuantizedDotGeneral


class Net(nnx.Module):
  """Every kind of state a resume must carry.

  Param (float master weights and a learned output scale), BatchStat
  (BatchNorm running statistics), a dropout RNG stream, and one 'quant' RNG
  stream per quantized layer (INT8 and 4-bit, both with stochastic gradients).
  """

  def __init__(self, hidden: int = 32, *, seed: int = 0):
    rngs = nnx.Rngs(params=seed, dropout=seed + 1)
    self.fc1 = nnx.Linear(16, hidden, rngs=rngs)
    self.bn = nnx.BatchNorm(hidden, rngs=rngs)
    self.drop = nnx.Dropout(0.25, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, 5, rngs=rngs)
    self.log_temperature = nnx.Param(jnp.zeros(()))
    self.fc1.dot_general = nnx.data(QuantizedDotGeneral(qtrain.presets.int8(),
                                                        rngs=nnx.Rngs(quant=seed + 2)))
    self.fc2.dot_general = nnx.data(QuantizedDotGeneral(qtrain.presets.int4(),
                                                        rngs=nnx.Rngs(quant=seed + 3)))

  def __call__(self, x):
    x = self.drop(jax.nn.relu(self.bn(self.fc1(x))))
    return self.fc2(x) * jnp.exp(self.log_temperature[...])


# clip_by_global_norm has an empty optax state: exercises empty subtrees. One
# instance for every optimizer: `tx` is static in the jitted step, so fresh
# optimizers with an equal `tx` reuse the compiled step.
_TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=1e-3))


def _build(hidden: int = 32):
  model = Net(hidden)
  optimizer = nnx.Optimizer(model, _TX, wrt=nnx.Param)
  # Commit the state to device 0, as restored arrays are: jit keys its cache
  # on committed shardings, so the resumed run reuses the compiled step.
  for obj in (model, optimizer):
    nnx.update(obj, jax.device_put(nnx.state(obj), jax.devices()[0]))
  return model, optimizer


def _batch(step: int):
  # The batch is a function of the step, so a resumed run sees the same data.
  kx, ky = jax.random.split(jax.random.fold_in(jax.random.key(1234), step))
  return jax.random.normal(kx, (32, 16)), jax.random.randint(ky, (32,), 0, 5)


@nnx.jit
def _train_step(model, optimizer, x, y):
  def loss_fn(model):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def _train(model, optimizer, start: int, stop: int) -> list[float]:
  return [float(_train_step(model, optimizer, *_batch(s))) for s in range(start, stop)]


def _quant_counts(model):
  return [int(model.fc1.dot_general.rngs.quant.count[...]),
          int(model.fc2.dot_general.rngs.quant.count[...])]


def _avals(obj):
  return jax.tree.map(lambda a: (a.shape, a.dtype, jax.typeof(a).weak_type), nnx.state(obj))


# ---------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------
def test_resume_is_bit_identical(tmp_path):
  n, m = 3, 4
  model, opt = _build()
  _train(model, opt, 0, n)
  saved_counts = _quant_counts(model)
  ckpt.save_checkpoint(tmp_path, n, model, opt, extra={'data_position': n})
  losses = _train(model, opt, n, n + m)

  fresh, fresh_opt = _build()
  assert _quant_counts(fresh) == [0, 0]
  assert ckpt.restore_checkpoint(tmp_path, fresh, fresh_opt) == n
  # The RNG counters (which decide the next SR noise) and the optimizer step came back.
  assert _quant_counts(fresh) == saved_counts and min(saved_counts) > 0
  assert int(fresh_opt.step[...]) == n
  resumed = _train(fresh, fresh_opt, n, n + m)

  assert resumed == losses
  chex.assert_trees_all_equal(nnx.state(fresh), nnx.state(model))
  chex.assert_trees_all_equal(nnx.state(fresh_opt), nnx.state(opt))
  assert _avals(fresh) == _avals(model) and _avals(fresh_opt) == _avals(opt)
  assert ckpt.read_extra(tmp_path) == {'data_position': n}

  # Sensitivity of the check: restoring everything but the RNG streams
  # (quantization noise, dropout) changes the continuation.
  again, again_opt = _build()
  ckpt.restore_checkpoint(tmp_path, again, again_opt)
  nnx.update(again, nnx.state(_build()[0], nnx.RngState))
  assert _train(again, again_opt, n, n + m) != losses


def test_model_only_latest_step_keep_and_overwrite(tmp_path):
  model, _ = _build()
  for step in (1, 2, 5):
    ckpt.save_checkpoint(tmp_path, step, model, keep=2, extra={'step': step})
  assert ckpt.all_steps(tmp_path) == [2, 5] and ckpt.latest_step(tmp_path) == 5
  assert ckpt.read_extra(tmp_path, step=2) == {'step': 2}
  with pytest.raises(ValueError, match='exists'):
    ckpt.save_checkpoint(tmp_path, 5, model)
  ckpt.save_checkpoint(tmp_path, 5, model, overwrite=True, extra={'again': True})
  assert ckpt.read_extra(tmp_path) == {'again': True}
  fresh, fresh_opt = _build()
  assert ckpt.restore_checkpoint(tmp_path, fresh, step=2) == 2
  chex.assert_trees_all_equal(nnx.state(fresh), nnx.state(model))
  with pytest.raises(ValueError, match='no optimizer state'):
    ckpt.restore_checkpoint(tmp_path, fresh, fresh_opt)
  assert ckpt.latest_step(tmp_path / 'missing') is None and ckpt.all_steps(tmp_path / 'x') == []


# ---------------------------------------------------------------------------
# atomicity
# ---------------------------------------------------------------------------
class _PowerCut(Exception):
  pass


def test_interrupted_save_is_never_restored(tmp_path, monkeypatch):
  model, opt = _build()
  ckpt.save_checkpoint(tmp_path, 1, model, opt)

  async def power_cut(self, *args, **kwargs):
    raise _PowerCut('the machine died before the rename')
  # Every item is written into <step>.orbax-checkpoint-tmp; the write dies
  # where orbax would rename it into place.
  monkeypatch.setattr(ocp.path.atomicity.AtomicRenameTemporaryPath, 'finalize', power_cut)
  with pytest.raises(_PowerCut):
    ckpt.save_checkpoint(tmp_path, 2, model, opt)
  monkeypatch.undo()

  leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith('2')]
  assert leftovers and all('tmp' in name for name in leftovers), leftovers
  assert ckpt.latest_step(tmp_path) == 1 and ckpt.all_steps(tmp_path) == [1]
  fresh, fresh_opt = _build()
  with pytest.raises(FileNotFoundError, match='step 2'):
    ckpt.restore_checkpoint(tmp_path, fresh, fresh_opt, step=2)
  assert ckpt.restore_checkpoint(tmp_path, fresh, fresh_opt) == 1
  # The next save of that step replaces the leftover and is complete.
  ckpt.save_checkpoint(tmp_path, 2, model, opt)
  assert ckpt.latest_step(tmp_path) == 2


def test_unfinalized_and_foreign_directories_are_ignored(tmp_path):
  model, opt = _build()
  ckpt.save_checkpoint(tmp_path, 3, model, opt)
  # A fully written step that was never renamed (the crash came just before
  # the rename), and a step-named directory that qtrain did not write.
  shutil.copytree(tmp_path / '3', tmp_path / '9.orbax-checkpoint-tmp-1700000000')
  (tmp_path / '11').mkdir()
  (tmp_path / '11' / 'model').mkdir()
  assert ckpt.all_steps(tmp_path) == [3] and ckpt.latest_step(tmp_path) == 3
  fresh, fresh_opt = _build()
  for step in (9, 11):
    with pytest.raises(FileNotFoundError):
      ckpt.restore_checkpoint(tmp_path, fresh, fresh_opt, step=step)
  assert ckpt.restore_checkpoint(tmp_path, fresh, fresh_opt) == 3


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------
def test_bad_input(tmp_path):
  model, opt = _build()
  with pytest.raises(ValueError, match='step'):
    ckpt.save_checkpoint(tmp_path, -1, model)
  with pytest.raises(ValueError, match='keep'):
    ckpt.save_checkpoint(tmp_path, 0, model, keep=0)
  with pytest.raises(TypeError, match='model'):
    ckpt.save_checkpoint(tmp_path, 0, {'w': jnp.ones(3)})
  with pytest.raises(TypeError, match='optimizer'):
    ckpt.save_checkpoint(tmp_path, 0, model, optax.adam(1e-3))
  with pytest.raises(TypeError, match='JSON'):
    ckpt.save_checkpoint(tmp_path, 0, model, extra={'f': object()})
  assert ckpt.all_steps(tmp_path) == []  # nothing was written
  with pytest.raises(FileNotFoundError, match='no complete checkpoint'):
    ckpt.restore_checkpoint(tmp_path, model, opt)
  ckpt.save_checkpoint(tmp_path, 0, model, opt)
  wider, wider_opt = _build(hidden=48)
  with pytest.raises(ValueError, match=r'fc1/kernel.*\[16, 32\]'):
    ckpt.restore_checkpoint(tmp_path, wider, wider_opt)
  with pytest.raises(TypeError, match='configs'):
    ckpt.export_packed(model, configs='int8')
  with pytest.raises(ValueError, match='unknown module paths'):
    ckpt.export_packed(model, configs={'fc3': qtrain.presets.int8()})


# ---------------------------------------------------------------------------
# packed export
# ---------------------------------------------------------------------------
_fake_quant = jax.jit(qtrain.fake_quant, static_argnums=1)


@nnx.jit(static_argnums=2)
def _references(model, xs, rules):
  """Per layer: codes and fake-quant of the kernel, fake-quant x, and the layer's output.

  Jitted, as the layers' forward runs in training (and eager dispatch of every
  small op would dominate the test's time).
  """
  out = {}
  for (path, rule), x in zip(rules, xs):
    layer = getattr(model, path)
    kernel = layer.kernel[...]
    out[path] = (qtrain.quantize(kernel, rule).codes, qtrain.fake_quant(kernel, rule),
                 qtrain.fake_quant(x, layer.dot_general.config.fwd.lhs), layer(x))
  return out


def _resolved_weight_rule(config, kernel_ndim):
  rule = config.fwd.rhs
  if isinstance(rule.granularity, scaling.PerChannel):  # output channels of [in, out]
    rule = dataclasses.replace(rule, granularity=scaling.PerChannel(axes=(kernel_ndim - 1,)))
  return rule


class Mixed(nnx.Module):
  def __init__(self):
    rngs = nnx.Rngs(0)
    # 7 outputs: an odd last axis, padded by one code before packing.
    self.a = nnx.Linear(12, 7, rngs=rngs)
    self.b = nnx.Linear(7, 10, rngs=rngs)
    self.c = nnx.Linear(10, 4, rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs)  # stays float
    for layer, config in ((self.a, qtrain.presets.int4()),
                          (self.b, qtrain.presets.int8(per_channel_weights=True)),
                          (self.c, qtrain.presets.int8())):
      layer.dot_general = nnx.data(QuantizedDotGeneral(config, rngs=nnx.Rngs(quant=1)))

  def __call__(self, x):
    return self.head(self.c(self.b(self.a(x))))


def test_export_packed_round_trip():
  model = Mixed()
  exported = ckpt.export_packed(model)
  assert sorted(exported) == ['a', 'b', 'c']
  a, b = exported['a'], exported['b']
  assert a['format'] == 'int4' and a['packed'] and a['codes'].dtype == np.uint8
  assert a['codes'].shape == (12, 4) and a['shape'] == (12, 7)
  assert b['format'] == 'int8' and not b['packed'] and b['codes'].dtype == np.int8
  assert b['scale'].shape == (1, 10) and b['channel_axes'] == (1,)
  assert exported['c']['scale'].shape == (1, 1) and exported['c']['channel_axes'] is None
  assert ckpt.packed_nbytes({'a': a}) == 12 * 4 + 4
  rules, xs = [], []
  for i, path in enumerate(exported):
    layer = getattr(model, path)
    rules.append((path, _resolved_weight_rule(layer.dot_general.config, layer.kernel.ndim)))
    xs.append(jax.random.normal(jax.random.key(i), (5, layer.kernel.shape[0])))
  references = _references(model, xs, tuple(rules))
  for path, entry in exported.items():
    codes, fake_quant_kernel, xq, y = references[path]
    q = ckpt.load_packed(entry)
    chex.assert_trees_all_equal(q.codes, codes)
    chex.assert_trees_all_equal(q.dequantize(), fake_quant_kernel)
    # The layer's forward multiplies exactly these weights: the quantized
    # layer equals fake-quantized activations times the exported weights up
    # to float32 rounding of the reference's float GEMM (K <= 12 terms).
    bias = np.asarray(getattr(model, path).bias[...])[None]
    ref = np.asarray(xq) @ np.asarray(q.dequantize()) + bias
    chex.assert_trees_all_close(y, ref, rtol=1e-5, atol=1e-6)


def test_export_with_explicit_configs_unsigned_and_float_formats():
  model = Mixed()
  uint4 = qtrain.DotConfig(fwd=qtrain.MatmulConfig(rhs=qtrain.TensorConfig(
      format=fmts.UINT4, calibration=scaling.MinMax())))
  log4 = qtrain.DotConfig(fwd=qtrain.MatmulConfig(rhs=qtrain.TensorConfig(format=fmts.LOG4_FP4)))
  exported = ckpt.export_packed(model, {'a': uint4, 'head': log4, 'b': None})
  assert sorted(exported) == ['a', 'head']
  a, head = exported['a'], exported['head']
  assert a['packed'] and a['zero_point'] is not None and a['format'] == 'uint4'
  assert not head['packed'] and head['codes'].dtype == jnp.float8_e4m3fn
  for path, entry, config in (('a', a, uint4), ('head', head, log4)):
    kernel = getattr(model, path).kernel[...]
    chex.assert_trees_all_equal(ckpt.load_packed(entry).dequantize(),
                                _fake_quant(kernel, config.fwd.rhs))
  # One config for every hookable layer, including the float head.
  assert sorted(ckpt.export_packed(model, qtrain.presets.int8())) == ['a', 'b', 'c', 'head']
  # A conv's per-channel weight scale is per output feature (O of HWIO).
  conv = nnx.Conv(3, 6, (3, 3), rngs=nnx.Rngs(0))
  conv.conv_general_dilated = nnx.data(qtrain.nnx_hooks.QuantizedConvGeneralDilated(
      qtrain.presets.int8(per_channel_weights=True), rngs=nnx.Rngs(quant=1)))
  entry = ckpt.export_packed(conv)['']
  assert entry['scale'].shape == (1, 1, 1, 6) and entry['channel_axes'] == (3,)
  rule = _resolved_weight_rule(conv.conv_general_dilated.config, 4)
  chex.assert_trees_all_equal(ckpt.load_packed(entry).dequantize(),
                              _fake_quant(conv.kernel[...], rule))
  # LinearGeneral [in, heads, head_dim]: one scale per (head, head_dim).
  general = nnx.LinearGeneral(8, (2, 3), rngs=nnx.Rngs(0))
  entry = ckpt.export_packed(general, qtrain.presets.int8(per_channel_weights=True))['']
  assert entry['scale'].shape == (1, 2, 3) and entry['channel_axes'] == (1, 2)
  rule = dataclasses.replace(qtrain.presets.int8(per_channel_weights=True).fwd.rhs,
                             granularity=scaling.PerChannel(axes=(1, 2)))
  chex.assert_trees_all_equal(ckpt.load_packed(entry).dequantize(),
                              _fake_quant(general.kernel[...], rule))
  unpacked = ckpt.export_packed(model, pack=False)['a']
  assert unpacked['codes'].dtype == np.int8 and unpacked['codes'].shape == (12, 7)
  chex.assert_trees_all_equal(ckpt.load_packed(unpacked).codes,
                              ckpt.load_packed(ckpt.export_packed(model)['a']).codes)
