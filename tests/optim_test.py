"""Tests for qtrain.optim: the optimizer-side quantization transforms (optax protocol)."""

from __future__ import annotations

import math

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import qtrain
from qtrain import formats as fmts
from qtrain import optim
from qtrain import scaling
from qtrain.config import TensorConfig

# Statistical bounds are this many standard deviations wide (normal tail < 6e-7 per element).
_K_SIGMA = 5.0
# Jitted: one compile per case instead of one per primitive. The transforms jit their
# own tree work, so eager `tx.update` calls share compiled code across tests.
_fake_quant = jax.jit(qtrain.fake_quant, static_argnames=('config', 'ste'))
_INT8_SR = TensorConfig(format=fmts.INT8, rounding='stochastic')
# WAGEUBN-like grids with room for the test values: 13-bit momentum with 8
# fraction bits (|a| < 16), 24-bit weights with 20 fraction bits (|w| < 8).
_MOMENTUM_GRID = fmts.fixed_point(13, 8)
_WEIGHT_GRID = fmts.fixed_point(24, 20)


def _normal(seed: int, shape, dtype=jnp.float32, scale: float = 1.0) -> jax.Array:
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), dtype)


def _tree(seed: int = 0, scale: float = 1.0) -> dict:
  """A params/gradient pytree with float leaves of several ranks and an int leaf."""
  return {
      'dense': {'kernel': _normal(seed, (8, 4), scale=scale)},
      'scalar': _normal(seed + 2, (), scale=scale),
      'count': jnp.asarray(seed + 3, jnp.int32),
  }


def _step_key(seed: int, splits_before: int = 0) -> jax.Array:
  """The documented key of an update: split the state key, use the second half."""
  key = jax.random.key(seed)
  for _ in range(splits_before):
    key = jax.random.split(key)[0]
  return jax.random.split(key)[1]


def _on_fixed_grid(x, fmt: fmts.FixedPointFormat) -> bool:
  codes = np.asarray(x, np.float64) * 2.0 ** fmt.fractional_bits
  return bool(np.all(codes == np.round(codes)) and np.all(np.abs(codes) <= fmt.qmax))


_FLOAT_MASK = {'dense': {'kernel': True}, 'scalar': True, 'count': False}

_TRANSFORMS = {
    'quantize_updates': (lambda: optim.quantize_updates(_INT8_SR, seed=1),
                         optim.QuantizeUpdatesState, ('key',)),
    'stochastic_round_params': (lambda: optim.stochastic_round_params(_WEIGHT_GRID, seed=2),
                                optim.StochasticRoundParamsState, ('key',)),
    # optax.trace itself turns integer leaves into float ones: mask them out, as a user would.
    'quantize_state': (lambda: optim.quantize_state(
        optax.masked(optax.trace(decay=0.25), _FLOAT_MASK), _MOMENTUM_GRID),
                       optim.QuantizeStateState, ('inner_state', 'key')),
    'scale_by_quantization_error': (lambda: optim.scale_by_quantization_error(_INT8_SR),
                                    optim.ScaleByQuantizationErrorState,
                                    ('key', 'last_scale')),
}


class ProtocolTest(parameterized.TestCase):
  """The optax invariants, for every transform."""

  @parameterized.named_parameters(*[(name, name) for name in _TRANSFORMS])
  def test_jit_init_update_state_and_int_leaves(self, name):
    make, state_type, fields = _TRANSFORMS[name]
    tx = make()
    params, grads = _tree(0), _tree(10, scale=0.1)
    state = jax.jit(tx.init)(params)
    assert type(state) is state_type and state._fields == fields
    assert jax.dtypes.issubdtype(state.key.dtype, jax.dtypes.prng_key)
    updates, new_state = jax.jit(tx.update)(grads, state, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(updates, grads)
    chex.assert_tree_all_finite(updates)
    chex.assert_trees_all_equal_structs(new_state, state)
    assert int(updates['count']) == int(grads['count'])  # integer leaves pass through
    assert not jnp.array_equal(jax.random.key_data(new_state.key),
                               jax.random.key_data(state.key))

  @parameterized.named_parameters(*[(name, name) for name in _TRANSFORMS])
  def test_chain_after_sgd_in_a_scan(self, name):
    # lax.scan also checks that the state keeps its structure and dtypes.
    tx = optax.chain(optax.sgd(0.1), _TRANSFORMS[name][0]())
    params = _tree(0)
    grads = jax.tree.map(lambda g: g * 0 if g.dtype == jnp.int32 else g, _tree(20))

    @jax.jit
    def run(params):
      def step(carry, _):
        params, state = carry
        updates, state = tx.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None
      return jax.lax.scan(step, (params, tx.init(params)), None, length=3)[0]

    new_params, _ = run(params)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_params, params)
    chex.assert_tree_all_finite(new_params)
    assert int(new_params['count']) == int(params['count'])
    moved = new_params['dense']['kernel'] - params['dense']['kernel']
    assert float(jnp.max(jnp.abs(moved))) > 0

  @parameterized.named_parameters(*[(name, name) for name in _TRANSFORMS])
  def test_bad_config_and_seed_types(self, name):
    factory = getattr(optim, name)
    args = (optax.identity(),) if name == 'quantize_state' else ()
    with pytest.raises(TypeError, match='config'):
      factory(*args, 'int8')
    with pytest.raises(TypeError, match='config'):
      factory(*args, qtrain.presets.int8())  # a DotConfig is not a tensor config
    with pytest.raises(TypeError, match='seed'):
      factory(*args, fmts.INT8, seed=1.5)
    with pytest.raises(ValueError, match='Lsq'):
      factory(*args, TensorConfig(format=fmts.INT8, calibration=scaling.Lsq()))

  def test_complex_leaves_are_refused(self):
    tx = optim.quantize_updates(fmts.INT8)
    with pytest.raises(TypeError, match='complex'):
      tx.update(jnp.ones(3, jnp.complex64), tx.init(None))


class QuantizeUpdatesTest(parameterized.TestCase):

  def test_equals_fake_quant_with_the_documented_keys(self):
    tx = optim.quantize_updates(_INT8_SR, seed=3)
    grads = _tree(1)
    state = tx.init(grads)
    for step in range(2):
      updates, state = tx.update(grads, state)
      step_key = _step_key(3, splits_before=step)
      leaves = jax.tree.leaves(grads)
      for i, (got, g) in enumerate(zip(jax.tree.leaves(updates), leaves)):
        if g.dtype == jnp.int32:
          continue
        want = _fake_quant(g, _INT8_SR, key=jax.random.fold_in(step_key, i))
        chex.assert_trees_all_equal(got, want)

  def test_output_is_on_the_int8_grid(self):
    g = _normal(4, (64, 16))
    tx = optim.quantize_updates(_INT8_SR)
    u, _ = tx.update(g, tx.init(g))
    # Absmax SR keeps the largest element at code ±127, so the scale is recoverable.
    scale = float(jnp.max(jnp.abs(u))) / 127
    codes = np.asarray(u, np.float64) / scale
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    assert np.max(np.abs(np.round(codes))) == 127
    # Stochastic rounding only ever picks one of the two neighbours.
    assert np.all(np.abs(codes - np.asarray(g, np.float64) / scale) < 1 + 1e-4)

  def test_noise_is_independent_across_leaves_and_steps(self):
    g = _normal(5, (256,))
    tx = optim.quantize_updates(_INT8_SR)
    state = tx.init((g, g))
    (a, b), state = tx.update((g, g), state)
    (c, _), _ = tx.update((g, g), state)
    assert not jnp.array_equal(a, b) and not jnp.array_equal(a, c)

  def test_bare_format_rounds_to_nearest_and_keeps_dtype(self):
    g = _normal(6, (32,), jnp.bfloat16)
    tx = optim.quantize_updates(fmts.INT4)
    u, _ = tx.update(g, tx.init(g))
    chex.assert_type(u, jnp.bfloat16)
    chex.assert_trees_all_equal(u, _fake_quant(g, fmts.INT4))


class StochasticRoundParamsTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('on_grid_params', True),
      ('float_params_first_step', False),
  )
  def test_params_plus_updates_on_the_fixed_point_grid(self, start_on_grid):
    fmt = _WEIGHT_GRID
    params = _normal(7, (16, 8))
    if start_on_grid:
      params = _fake_quant(params, fmt)
    grads = _normal(8, (16, 8), scale=1e-3)
    tx = optax.chain(optax.sgd(0.1), optim.stochastic_round_params(fmt, seed=4))
    sr = TensorConfig(format=fmt, rounding='stochastic')
    state = tx.init(params)
    for step in range(3):
      updates, state = tx.update(grads, state, params)
      key = jax.random.fold_in(_step_key(4, splits_before=step), 0)
      target = _fake_quant(params + grads * -0.1, sr, key=key)  # optax.sgd's update
      params = optax.apply_updates(params, updates)
      assert _on_fixed_grid(params, fmt), step
      chex.assert_trees_all_equal(params, target)

  def test_unbiased_over_many_seeds(self):
    # Each element rounds to one of two grid neighbours a step apart, so its
    # mean over n draws has standard deviation <= step / (2·sqrt(n)).
    fmt = fmts.fixed_point(16, 12)
    step, n = fmt.step, 4096
    params = _fake_quant(_normal(9, (64,)), fmt)
    updates = _normal(10, (64,), scale=3 * step)
    tx = optim.stochastic_round_params(fmt)
    states = optim.StochasticRoundParamsState(key=jax.random.split(jax.random.key(0), n))
    new = jax.jit(jax.vmap(lambda s: optax.apply_updates(params, tx.update(
        updates, s, params)[0])))(states)
    assert _on_fixed_grid(new, fmt)
    exact = np.asarray(params + updates, np.float64)  # the float32 sum the transform rounds
    err = np.abs(np.asarray(new, np.float64).mean(axis=0) - exact)
    bound = _K_SIGMA * step / (2 * math.sqrt(n))
    assert np.all(err <= bound), (err.max() / bound)
    # Not a trivially deterministic rounding: both neighbours occur.
    assert np.all(np.ptp(np.asarray(new), axis=0) == step)

  def test_missing_params_raises(self):
    tx = optim.stochastic_round_params(_WEIGHT_GRID)
    g = jnp.ones(3)
    with pytest.raises(ValueError, match='params'):
      tx.update(g, tx.init(g))
    with pytest.raises(ValueError, match='params'):
      optax.chain(optax.sgd(0.1), tx).update(g, optax.chain(optax.sgd(0.1), tx).init(g))

  def test_no_params_message_is_optax_s(self):
    from optax._src import base  # pylint: disable=g-import-not-at-top
    assert optim.NO_PARAMS_MSG == base.NO_PARAMS_MSG

  def test_dtype_that_cannot_hold_the_grid_raises(self):
    p = jnp.zeros(4, jnp.bfloat16)
    tx = optim.stochastic_round_params(_WEIGHT_GRID)
    with pytest.raises(ValueError, match='bfloat16 cannot hold the fixed24.20 grid'):
      tx.update(jnp.ones(4, jnp.bfloat16), tx.init(p), p)
    p16 = jnp.zeros(4, jnp.float16)
    with pytest.raises(ValueError, match='float16 cannot hold'):  # step 2^-26 < subnormals
      optim.stochastic_round_params(fmts.fixed_point(8, 26)).update(p16, tx.init(p16), p16)
    # An 8-bit grid fits bfloat16's 8 significant bits.
    tx8 = optim.stochastic_round_params(fmts.fixed_point(8, 4))
    u, _ = tx8.update(jnp.full(4, 0.01, jnp.bfloat16), tx8.init(p), p)
    chex.assert_type(u, jnp.bfloat16)
    assert _on_fixed_grid(optax.apply_updates(p, u).astype(jnp.float32), fmts.fixed_point(8, 4))

  def test_nearest_config_is_deterministic_rounding(self):
    fmt = fmts.fixed_point(16, 12)
    params = _fake_quant(_normal(11, (32,)), fmt)
    updates = _normal(12, (32,), scale=fmt.step)
    tx = optim.stochastic_round_params(TensorConfig(format=fmt))
    u, _ = tx.update(updates, tx.init(params), params)
    chex.assert_trees_all_equal(optax.apply_updates(params, u),
                                _fake_quant(params + updates, fmt))

  def test_samples_rejected(self):
    with pytest.raises(ValueError, match='samples'):
      optim.stochastic_round_params(TensorConfig(format=fmts.INT8, rounding='stochastic',
                                                 samples=2))

  def test_linear_regression_converges_where_rounding_to_nearest_stalls(self):
    # 100 SGD steps on a 16-bit grid (step 2^-12): late updates are far below a
    # step, so rounding to nearest freezes the weights while SR keeps moving
    # them in expectation.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 4)), jnp.float32)
    w_true = jnp.array([0.5, -1.25, 2.0, 0.75], jnp.float32)
    y = x @ w_true
    fmt = fmts.fixed_point(16, 12)

    def loss(w):
      return jnp.mean((x @ w - y) ** 2)

    def train(rounding):
      tx = optax.chain(optax.sgd(0.05), optim.stochastic_round_params(
          TensorConfig(format=fmt, rounding=rounding)))

      def step(carry, _):
        w, state = carry
        updates, state = tx.update(jax.grad(loss)(w), state, w)
        return (optax.apply_updates(w, updates), state), None
      w0 = jnp.zeros(4)
      return jax.jit(lambda w: jax.lax.scan(step, (w, tx.init(w)), None, length=100))(w0)[0][0]

    w_sr, w_rtn = train('stochastic'), train('nearest')
    assert _on_fixed_grid(w_sr, fmt) and _on_fixed_grid(w_rtn, fmt)
    err_sr = float(jnp.max(jnp.abs(w_sr - w_true)))
    err_rtn = float(jnp.max(jnp.abs(w_rtn - w_true)))
    assert err_sr <= 2 * fmt.step and float(loss(w_sr)) < 1e-6, (err_sr, float(loss(w_sr)))
    assert err_sr < err_rtn


class QuantizeStateTest(parameterized.TestCase):

  def test_momentum_is_requantized_and_updates_use_the_float_accumulator(self):
    # WAGEUBN's order: a <- m·a + G; the update uses a; then a <- Q(a, 13).
    fmt = _MOMENTUM_GRID
    tx = optim.quantize_state(optax.trace(decay=0.25), fmt)
    params = _normal(13, (8, 4))
    state = tx.init(params)
    stored = jnp.zeros_like(params)
    for step in range(3):
      g = _normal(20 + step, (8, 4))
      updates, state = tx.update(g, state, params)
      float_trace = 0.25 * stored + g
      chex.assert_trees_all_close(updates, float_trace, rtol=0, atol=0)
      stored = state.inner_state.trace
      assert _on_fixed_grid(stored, fmt)
      chex.assert_trees_all_equal(stored, _fake_quant(float_trace, fmt))

  def test_counts_and_keys_untouched(self):
    tx = optim.quantize_state(optax.scale_by_adam(), fmts.INT8)
    params = _tree(0)['dense']
    state = tx.init(params)
    for _ in range(4):
      _, state = tx.update(_tree(30)['dense'], state, params)
    adam = state.inner_state
    chex.assert_type(adam.count, jnp.int32)
    assert int(adam.count) == 4
    kernel_mu = np.asarray(adam.mu['kernel'], np.float64)
    scale = np.max(np.abs(kernel_mu)) / 127
    np.testing.assert_allclose(kernel_mu / scale, np.round(kernel_mu / scale), atol=1e-4)
    # A typed PRNG key and a count inside the inner state pass through.
    noisy = optim.quantize_state(optax.add_noise(0.01, 0.55, key=0), fmts.INT8)
    s0 = noisy.init(jnp.zeros(3))
    _, s1 = noisy.update(jnp.ones(3), s0)
    ref = optax.add_noise(0.01, 0.55, key=0)
    _, r1 = ref.update(jnp.ones(3), ref.init(jnp.zeros(3)))
    assert int(s1.inner_state.count) == int(r1.count) == 1
    chex.assert_trees_all_equal(jax.random.key_data(s1.inner_state.rng_key),
                                jax.random.key_data(r1.rng_key))

  def test_initial_state_is_quantized(self):
    def init(params):
      return {'m': jnp.full_like(params, 0.3)}

    inner = optax.GradientTransformation(init, lambda u, s, p=None: (u, s))
    state = optim.quantize_state(inner, _MOMENTUM_GRID).init(jnp.zeros(3))
    # 0.3 · 2^8 = 76.8 rounds to 77.
    chex.assert_trees_all_equal(state.inner_state['m'], jnp.full(3, 77 / 256))

  def test_extra_args_are_forwarded_and_chain_works(self):
    def update(updates, state, params=None, *, value):
      del params
      return jax.tree.map(lambda u: u * value, updates), state

    inner = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
    tx = optax.chain(optax.sgd(1.0), optim.quantize_state(inner, fmts.INT8))
    assert isinstance(tx, optax.GradientTransformationExtraArgs)
    p = jnp.zeros(2)
    u, _ = tx.update(jnp.ones(2), tx.init(p), p, value=3.0)
    chex.assert_trees_all_equal(u, jnp.full(2, -3.0))

  def test_validation(self):
    with pytest.raises(TypeError, match='inner'):
      optim.quantize_state(optax.sgd, fmts.INT8)
    with pytest.raises(ValueError, match='samples'):
      optim.quantize_state(optax.identity(), TensorConfig(
          format=fmts.INT8, rounding='stochastic', samples=4))


def _phi_reference(u, q, alpha, beta) -> float:
  """φ in float64 numpy, straight from the definition."""
  u, q = np.asarray(u, np.float64).ravel(), np.asarray(q, np.float64).ravel()
  d = 1.0 - u @ q / (np.linalg.norm(u) * np.linalg.norm(q))
  return max(math.exp(-alpha * d), beta)


class ScaleByQuantizationErrorTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('int4_rtn_gentle', fmts.INT4, 5.0, 0.2),
      ('int8_sr_ui8_defaults', _INT8_SR, 20.0, 0.1),
  )
  def test_scale_matches_an_independent_computation(self, config, alpha, beta):
    tx = optim.scale_by_quantization_error(config, alpha=alpha, beta=beta, seed=5)
    grads = _tree(40)
    scaled, state = tx.update(grads, tx.init(grads))
    step_key = _step_key(5)
    cfg = config if isinstance(config, TensorConfig) else TensorConfig(format=config)
    for i, (path, g) in enumerate(jax.tree_util.tree_leaves_with_path(grads)):
      phi = float(jax.tree.leaves(state.last_scale)[i])
      got = jax.tree.leaves(scaled)[i]
      if g.dtype == jnp.int32:
        assert phi == 1.0 and int(got) == int(g)
        continue
      key = jax.random.fold_in(step_key, i) if cfg.stochastic else None
      q = _fake_quant(g, cfg, key=key)
      want = _phi_reference(g, q, alpha, beta)
      assert beta <= phi <= 1.0
      np.testing.assert_allclose(phi, want, rtol=2e-6, err_msg=str(path))
      chex.assert_trees_all_equal(got, g * jnp.float32(phi))

  @parameterized.named_parameters(
      ('fixed_point', fmts.fixed_point(8), jnp.arange(-20, 20, dtype=jnp.float32) / 128),
      ('int8_absmax', fmts.INT8, jnp.arange(-127, 128, 7, dtype=jnp.float32) / 128),
      ('int8_sr', _INT8_SR, jnp.array([-127.0, 3.0, 64.0, 0.0]) / 64),
      ('zeros', fmts.INT4, jnp.zeros(5)),
      ('empty', fmts.INT4, jnp.zeros((0, 3))),
  )
  def test_scale_is_exactly_one_on_the_grid(self, config, g):
    tx = optim.scale_by_quantization_error(config)
    scaled, state = tx.update(g, tx.init(g))
    assert float(state.last_scale) == 1.0
    chex.assert_trees_all_equal(scaled, g)

  def test_large_deviation_is_floored_at_beta(self):
    # One outlier and many small values: INT2 rounds the small ones to zero.
    g = jnp.concatenate([jnp.array([100.0]), jnp.ones(10_000)])
    tx = optim.scale_by_quantization_error(fmts.INT2, beta=0.1)
    scaled, state = tx.update(g, tx.init(g))
    assert float(state.last_scale) == pytest.approx(0.1, rel=1e-6)
    # Everything underflows to zero (fixed grid): no direction left, d = 1.
    tiny = jnp.full(8, 1e-4)
    tx = optim.scale_by_quantization_error(fmts.fixed_point(8), beta=0.25)
    _, state = tx.update(tiny, tx.init(tiny))
    assert float(state.last_scale) == 0.25

  def test_tiny_and_huge_gradients_do_not_underflow_or_overflow(self):
    g = _normal(41, (128,))
    tx = optim.scale_by_quantization_error(fmts.INT4)
    _, ref = tx.update(g, tx.init(g))
    for factor in (1e-30, 1e30):
      _, state = tx.update(g * factor, tx.init(g))
      np.testing.assert_allclose(state.last_scale, ref.last_scale, rtol=1e-4)

  def test_non_finite_propagates_and_dtype_is_kept(self):
    tx = optim.scale_by_quantization_error(fmts.INT8)
    g = jnp.array([1.0, jnp.nan, 0.5], jnp.bfloat16)
    scaled, state = tx.update(g, tx.init(g))
    chex.assert_type(scaled, jnp.bfloat16)
    assert np.isnan(float(state.last_scale)) and np.all(np.isnan(np.asarray(scaled, np.float32)))

  def test_same_scale_before_and_after_sgd_for_scaled_formats(self):
    g = _normal(42, (16, 8))
    before = optax.chain(optim.scale_by_quantization_error(fmts.INT4), optax.sgd(0.1))
    after = optax.chain(optax.sgd(0.1), optim.scale_by_quantization_error(fmts.INT4))
    u_before, s_before = before.update(g, before.init(g), g)
    u_after, s_after = after.update(g, after.init(g), g)
    chex.assert_trees_all_close(s_before[0].last_scale, s_after[1].last_scale, rtol=1e-3)
    chex.assert_trees_all_close(u_before, u_after, rtol=1e-3)

  def test_alpha_zero_or_beta_one_turn_it_off(self):
    g = _normal(43, (64,))
    for kwargs in (dict(alpha=0.0), dict(beta=1.0)):
      tx = optim.scale_by_quantization_error(fmts.INT2, **kwargs)
      scaled, _ = tx.update(g, tx.init(g))
      chex.assert_trees_all_equal(scaled, g)

  @parameterized.named_parameters(
      ('alpha_negative', dict(alpha=-1.0), ValueError, 'alpha'),
      ('alpha_inf', dict(alpha=math.inf), ValueError, 'alpha'),
      ('alpha_nan', dict(alpha=math.nan), ValueError, 'alpha'),
      ('alpha_str', dict(alpha='20'), TypeError, 'alpha'),
      ('beta_above_one', dict(beta=1.5), ValueError, 'beta'),
      ('beta_negative', dict(beta=-0.1), ValueError, 'beta'),
      ('beta_bool', dict(beta=True), TypeError, 'beta'),
  )
  def test_validation(self, kwargs, error, match):
    with pytest.raises(error, match=match):
      optim.scale_by_quantization_error(fmts.INT8, **kwargs)
