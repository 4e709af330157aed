"""Tests of the INT4 Transformers recipe and its NNX forward hook (`qtrain.lsq_linear`).

Oracles written here in plain numpy: the layer's forward s_X·s_W·int(XĤ)·int(ĤᵀW)
with LSQ's initial steps 2·mean|v|/√7 + 1e-10; its backward (bit-split dY times
the forward's INT4 operands, LSQ clip masks in the Hadamard domain, Ĥ back,
the step gradients of LSQ with 1/√(numel·Q_P)); the block search against
`search_block_size` (itself tested against numpy in hadamard_test); and a short
training run of a tiny transformer LM against float32 on the same seed.
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qtrain
from qtrain import bit_split as bs
from qtrain import hadamard as hq
from qtrain import checkpoint, lsq_linear, models
from qtrain.recipes import registry
from qtrain.recipes.papers.int4_transformer import int4_transformer, int4_transformer_config

DN = (((1,), (0,)), ((), ()))


def np_block_diag(dim, block):
  h = np.ones((1, 1))
  for _ in range(int(math.log2(block))):
    h = np.block([[h, h], [h, -h]]) / math.sqrt(2)
  return np.kron(np.eye(dim // block), h)


def np_init(v, qmax=7):
  return 2 * np.mean(np.abs(v)) / math.sqrt(qmax) + 1e-10


def make_hook(seed=0, **kw):
  cfg = int4_transformer_config(lss=kw.pop('lss', False))
  return lsq_linear.HadamardLsqDotGeneral(cfg, rngs=nnx.Rngs(quant=seed), **kw)


def outlier_batch(key, shape, column=3, scale=30.0):
  x = np.array(jax.random.normal(key, shape), np.float32)
  x[..., column] *= scale
  return jnp.asarray(x)


# ---------------------------------------------------------------------------
# registry and options
# ---------------------------------------------------------------------------
def test_recipe_is_registered_with_the_papers_deltas():
  entry = registry.info('int4_transformer')
  assert entry.families == ('transformer',)
  deltas = {(d.model, d.dataset, d.metric): d.delta_pp for d in entry.reported}
  assert deltas[('BERT-base', 'GLUE-dev', 'GLUE avg')] == -1.86
  assert deltas[('BERT-base', 'SQuAD v1', 'F1')] == -0.72
  assert deltas[('ViT-B/32', 'CIFAR-10', 'top-1')] == -0.41
  assert deltas[('ViT-B/32', 'ImageNet-1k', 'top-1')] == -2.70
  assert deltas[('Transformer-base', 'WMT14 En-De', 'SacreBLEU')] == -0.93
  r = entry.build()
  assert r.name == 'int4_transformer' and r.rules[0].module_path == 'head'
  assert r.rules[0].config is None
  est = r.rules[1].config.dlhs.lhs
  assert est == bs.BitSplitLss(clamp=7, lss=True, keep_nonzero=False)
  assert r.rules[1].config.share_gradient_sample


def test_bad_options_raise_clear_errors():
  with pytest.raises(ValueError, match='bits=9'):
    int4_transformer(bits=9)
  with pytest.raises(ValueError, match='power of two'):
    int4_transformer(block=12)
  with pytest.raises(ValueError, match='clamp=5'):
    int4_transformer(bs_clamp=5)
  with pytest.raises(ValueError, match='lsq_range'):
    int4_transformer(lsq_range=(-6, 7))
  with pytest.raises(ValueError, match='cold_start_steps'):
    int4_transformer(cold_start_steps=-1)
  with pytest.raises(TypeError, match='float_layers'):
    int4_transformer(float_layers=3)
  with pytest.raises(TypeError, match='lss must be a bool'):
    int4_transformer(lss='yes')
  with pytest.raises(ValueError, match='config.fwd must be float'):
    lsq_linear.HadamardLsqDotGeneral(qtrain.presets.int8(), rngs=nnx.Rngs(quant=0))
  hook = make_hook(block=8)
  with pytest.raises(ValueError, match='does not divide'):
    hook(jnp.ones((2, 12)), jnp.ones((12, 3)), DN)
  with pytest.raises(NotImplementedError, match='batch axes'):
    hook(jnp.ones((2, 3, 8)), jnp.ones((2, 8, 4)), (((2,), (1,)), ((0,), (0,))))


def test_quantize_model_installs_the_hooks_on_all_but_the_head():
  model = models.TransformerLM(16, d_model=16, num_heads=2, num_layers=1, max_len=8,
                               rngs=nnx.Rngs(0))
  recipe = int4_transformer(lsq_range=(-8, 7), block=4)
  qtrain.quantize_model(model, recipe)
  hooks = dict(lsq_linear.hadamard_lsq_hooks(model))
  assert sorted(hooks) == sorted(f'blocks/0/{p}/dot_general' for p in (
      'attn/query', 'attn/key', 'attn/value', 'attn/out', 'mlp/fc1', 'mlp/fc2'))
  assert all(h.fmt.qmin == -8 and h.block == 4 for h in hooks.values())
  assert model.head.dot_general is jax.lax.dot_general
  # Idempotent: preparing again keeps the hooks (and their learned steps).
  for i, (_, h) in enumerate(hooks.items()):
    h.step_x.set_value(jnp.float32(0.1 * (i + 1)))
  before = {p: (h, float(h.step_x.get_value())) for p, h in hooks.items()}
  recipe.prepare_model(model)
  for p, h in lsq_linear.hadamard_lsq_hooks(model):
    assert h is before[p][0] and float(h.step_x.get_value()) == before[p][1]


# ---------------------------------------------------------------------------
# the hook against numpy
# ---------------------------------------------------------------------------
def test_forward_is_the_hq_int4_product_with_lsq_init_steps():
  x = outlier_batch(jax.random.key(0), (6, 16))
  w = jax.random.normal(jax.random.key(1), (16, 5))
  hook = make_hook(block=4)
  y = hook(x, w, DN)
  hm = np_block_diag(16, 4)
  xh, wh = np.asarray(x, np.float64) @ hm, hm.T @ np.asarray(w, np.float64)
  sx, sw = np_init(xh), np_init(wh)
  kx, kw = np.clip(np.round(xh / sx), -7, 7), np.clip(np.round(wh / sw), -7, 7)
  np.testing.assert_allclose(y, sx * sw * (kx @ kw), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(hook.step_x.get_value(), sx, rtol=1e-5)
  np.testing.assert_allclose(hook.step_w.get_value(), sw, rtol=1e-5)
  assert int(hook.initialized.get_value()) == 1


def test_backward_is_bit_split_times_int4_operands_through_masks_and_hadamard():
  x = outlier_batch(jax.random.key(2), (8, 16))
  w = jax.random.normal(jax.random.key(3), (16, 6))
  dy = jax.random.normal(jax.random.key(4), (8, 6))
  hook = make_hook(seed=5, block=8)
  hook(x, w, DN)  # first call: steps initialized
  hook.step_x.set_value(hook.step_x.get_value() * 0.6)  # make some values clip
  sx, sw = float(hook.step_x.get_value()), float(hook.step_w.get_value())

  def f(h, a, b):
    return jnp.sum(h(a, b, DN) * dy)

  grads = nnx.grad(f, argnums=(0, 1, 2))(hook, x, w)
  g_hook, dx, dw = grads
  # The hook's key for its second call: the quant stream's second draw.
  stream = nnx.Rngs(quant=5)
  stream.quant()
  key = jax.random.fold_in(stream.quant(), 2)  # the dX slot, shared by both GEMMs
  est = np.asarray(bs.bit_split(dy, jax.random.fold_in(key, 0)), np.float64)
  hm = np_block_diag(16, 8)
  xh, wh = np.asarray(x, np.float64) @ hm, hm.T @ np.asarray(w, np.float64)
  vx, vw = xh / sx, wh / sw
  xq, wq = np.clip(np.round(vx), -7, 7) * sx, np.clip(np.round(vw), -7, 7) * sw
  dxh, dwh = est @ wq.T, xq.T @ est
  inside = lambda v: (v >= -7) & (v <= 7)
  np.testing.assert_allclose(dx, (dxh * inside(vx)) @ hm.T, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dw, hm @ (dwh * inside(vw)), rtol=1e-4, atol=1e-4)
  lsq = lambda v: np.where(v < -7, -7, np.where(v > 7, 7, np.round(v) - v))
  np.testing.assert_allclose(g_hook['step_x'].get_value(),
                             np.sum(lsq(vx) * dxh) / math.sqrt(vx.size * 7), rtol=1e-3)
  np.testing.assert_allclose(g_hook['step_w'].get_value(),
                             np.sum(lsq(vw) * dwh) / math.sqrt(vw.size * 7), rtol=1e-3)
  assert (~inside(vx)).any()  # the clip mask was exercised


def test_searched_block_is_the_papers_argmin_and_stays_fixed():
  x = outlier_batch(jax.random.key(6), (32, 16), scale=50.0)
  w = jax.random.normal(jax.random.key(7), (16, 8))
  hook = make_hook()
  call = nnx.jit(lambda h, a, b: h(a, b, DN))
  call(hook, x, w)
  want = hq.search_block_size(x, w)
  assert want > 1 and int(hook.block_size.get_value()) == want
  call(hook, jax.random.normal(jax.random.key(8), (32, 16)), w)
  assert int(hook.block_size.get_value()) == want
  assert lsq_linear.freeze_block_sizes(hook) == {'': want} and hook.block == want


def test_steps_stay_positive_as_in_the_code():
  x = jax.random.normal(jax.random.key(9), (4, 8))
  w = jax.random.normal(jax.random.key(10), (8, 3))
  hook = make_hook(block=2)
  y0 = hook(x, w, DN)
  hook.step_x.set_value(-hook.step_x.get_value())
  chex.assert_trees_all_close(hook(x, w, DN), y0, rtol=1e-6)
  assert float(hook.step_x.get_value()) > 0


def test_cold_start_resets_the_steps_in_training_calls_only():
  w = jax.random.normal(jax.random.key(11), (8, 3))
  xs = [jax.random.normal(jax.random.key(12 + i), (4, 8)) * (i + 1) for i in range(4)]
  hook = make_hook(block=2, cold_start_steps=2)
  f = lambda h, a: jnp.sum(h(a, w, DN))
  for i in range(2):
    g = nnx.grad(f)(hook, xs[i])
    want = np_init(np.asarray(xs[i], np.float64) @ np_block_diag(8, 2))
    np.testing.assert_allclose(hook.step_x.get_value(), want, rtol=1e-5)
    assert float(g['step_x'].get_value()) == 0.0  # not learned during the cold start
  hook.deterministic = True  # model.eval(): does not count
  hook(xs[2], w, DN)
  assert int(hook.calls.get_value()) == 2
  hook.deterministic = False
  before = float(hook.step_x.get_value())
  g = nnx.grad(f)(hook, xs[3])
  assert float(hook.step_x.get_value()) == before and float(g['step_x'].get_value()) != 0


# ---------------------------------------------------------------------------
# model-level: init, freeze, optimizer, training
# ---------------------------------------------------------------------------
def _lm(seed=0):
  return models.TransformerLM(12, d_model=16, num_heads=2, num_layers=1, max_len=12,
                              rngs=nnx.Rngs(seed))


def _batches(steps, batch=16, length=12, vocab=12, seed=0):
  """Counting sequences t, t+1, ... (mod vocab) from random starts: learnable in a few steps."""
  rng = np.random.default_rng(seed)
  starts = rng.integers(0, vocab, (steps, batch, 1))
  return (starts + np.arange(length)) % vocab


def _loss(model, tokens):
  logits = model(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def _train(recipe, steps=60, lr=1e-2):
  model = _lm()
  if recipe is not None:
    qtrain.quantize_model(model, recipe, rngs=nnx.Rngs(quant=1))
  opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, tokens):
    loss, grads = nnx.value_and_grad(_loss)(model, tokens)
    opt.update(model, grads)
    return loss, grads

  losses, init_grads = [], None
  for tokens in jnp.asarray(_batches(steps)):
    loss, grads = step(model, opt, tokens)
    init_grads = grads if init_grads is None else init_grads
    losses.append(float(loss))
  return model, np.array(losses), init_grads, grads


def test_init_and_freeze_keep_the_forward_bit_identical():
  model = nnx.Sequential(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), nnx.gelu,
                         nnx.Linear(32, 8, rngs=nnx.Rngs(1)))
  qtrain.quantize_model(model, int4_transformer())
  x = outlier_batch(jax.random.key(20), (6, 16))
  blocks = lsq_linear.init_int4_transformer(lambda m, a: m(a), model, x, freeze=False)
  assert set(blocks) == {'layers/0/dot_general', 'layers/2/dot_general'}
  assert blocks['layers/0/dot_general'] == hq.search_block_size(x, model.layers[0].kernel[...])
  searched = nnx.jit(lambda m, a: m(a))(model, x)
  assert lsq_linear.freeze_block_sizes(model) == blocks
  frozen = nnx.jit(lambda m, a: m(a))(model, x)
  chex.assert_trees_all_equal(frozen, searched)
  lsq_linear.reset_int4_transformer(model)
  assert all(h.block is None and int(h.initialized.get_value()) == 0
             for _, h in lsq_linear.hadamard_lsq_hooks(model))


def test_checkpoint_round_trip_restores_steps_and_blocks(tmp_path):
  def build():
    model = nnx.Sequential(nnx.Linear(16, 32, rngs=nnx.Rngs(0)), nnx.gelu,
                           nnx.Linear(32, 8, rngs=nnx.Rngs(1)))
    qtrain.quantize_model(model, int4_transformer(), rngs=nnx.Rngs(quant=1))
    return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  model, opt = build()
  x = outlier_batch(jax.random.key(21), (6, 16))
  y = nnx.jit(lambda m, a: m(a))(model, x)
  checkpoint.save_checkpoint(tmp_path, 1, model, opt)
  fresh, fresh_opt = build()
  checkpoint.restore_checkpoint(tmp_path, fresh, fresh_opt, step=1)
  for (_, a), (_, b) in zip(lsq_linear.hadamard_lsq_hooks(model),
                            lsq_linear.hadamard_lsq_hooks(fresh)):
    for name in ('step_x', 'step_w', 'initialized', 'block_size', 'calls'):
      chex.assert_trees_all_equal(getattr(a, name).get_value(), getattr(b, name).get_value())
  chex.assert_trees_all_equal(nnx.jit(lambda m, a: m(a))(fresh, x), y)


def test_training_ends_close_to_fp32_and_trains_the_steps():
  _, fp_losses, fp_grads, _ = _train(None, steps=30)
  # A fixed block keeps the compile short; the search is tested on its own above.
  model, q_losses, q_grads, last = _train(int4_transformer(block=4), steps=30)
  # Same init, data and optimizer: both learn the counting task (loss ~2.8 at the start);
  # after 30 steps float32 is at ~0.08 and the 4-bit run lags by ~0.05 nats (measured):
  # allow 0.15.
  assert fp_losses[-5:].mean() < 0.1 * fp_losses[0] and q_losses[-5:].mean() < 0.1 * q_losses[0]
  assert abs(q_losses[-5:].mean() - fp_losses[-5:].mean()) < 0.15, (q_losses[-5:],
                                                                    fp_losses[-5:])
  # The quantizers ran: the first gradients differ from float32 but point the same way.
  g_fp = np.asarray(fp_grads['blocks'][0]['mlp']['fc1']['kernel'].get_value()).ravel()
  g_q = np.asarray(q_grads['blocks'][0]['mlp']['fc1']['kernel'].get_value()).ravel()
  cos = g_fp @ g_q / np.linalg.norm(g_fp) / np.linalg.norm(g_q)
  assert not np.allclose(g_fp, g_q, rtol=1e-2) and cos > 0.5, cos
  # LSQ steps are Params: trained by the optimizer and part of the checkpointed state.
  hooks = lsq_linear.hadamard_lsq_hooks(model)
  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  names = {'/'.join(map(str, p)) for p, _ in params}
  assert all(f'{p}/step_x' in names and f'{p}/step_w' in names for p, _ in hooks)
  state = nnx.to_flat_state(nnx.state(model, lsq_linear.Int4State))
  assert len(list(state)) == 3 * len(hooks)
  grads = last['blocks'][0]['mlp']['fc2']['dot_general']
  assert float(q_grads['blocks'][0]['mlp']['fc2']['dot_general']['step_x'].get_value()) == 0
  assert float(grads['step_x'].get_value()) != 0 and float(grads['step_w'].get_value()) != 0
  for _, h in hooks:
    assert int(h.initialized.get_value()) == 1 and float(h.step_w.get_value()) > 0


@pytest.mark.slow
def test_qtrain_train_runs_the_recipe_end_to_end(tmp_path):
  from qtrain.train import TrainConfig, train  # pylint: disable=import-outside-toplevel
  result = train(TrainConfig(task='fortunes', recipe='int4_transformer', epochs=1, limit=128,
                             batch_size=32, log_every=2), out_dir=str(tmp_path),
                 progress=False)
  assert np.isfinite(result.final_loss) and 0 <= result.test_metric <= 1
  hooks = lsq_linear.hadamard_lsq_hooks(result.model)
  assert hooks and all(int(h.initialized.get_value()) == 1 for _, h in hooks)
  assert all(int(h.block_size.get_value()) >= 1 for _, h in hooks)
