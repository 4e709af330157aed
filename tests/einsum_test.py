"""qtrain.einsum: jnp.einsum semantics, operand roles fixed, quantized contraction."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_testlib as lib
from qtrain import config as cfgs
from qtrain import formats, presets
from qtrain.dot import dot_general
from qtrain.einsum import einsum, parse

# (subscripts, lhs shape, rhs shape): matmuls, batch dims, broadcasting,
# implicit output, reductions and diagonals inside one operand.
CASES = [
    ('bd,df->bf', (2, 3), (3, 4)),
    ('ab,cb->ca', (2, 3), (4, 3)),  # jnp.einsum would swap the operands here
    ('...qhd,...khd->...hqk', (2, 5, 4, 8), (2, 6, 4, 8)),
    ('...hqk,...khd->...qhd', (2, 4, 5, 6), (2, 6, 4, 8)),
    ('btd,dhf->bthf', (2, 5, 8), (8, 2, 4)),
    ('ij,jk', (2, 3), (3, 4)),
    ('bij,bjk->bik', (1, 2, 3), (4, 3, 5)),  # size-1 batch broadcasts
    ('...ij,jk->...ik', (2, 3, 4, 5), (5, 6)),
    ('ijk,jl->il', (2, 3, 4), (3, 5)),  # k summed inside the first operand
    ('iij,jk->ik', (3, 3, 2), (2, 4)),  # diagonal of the first operand
    ('ij,j->i', (3, 4), (4,)),
    ('i,j->ij', (3,), (4,)),
]


def _operands(a_shape, b_shape):
  # NumPy, not jax.random: eager jax.random compiles once per shape.
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.standard_normal(a_shape), jnp.float32),
          jnp.asarray(rng.standard_normal(b_shape), jnp.float32))


def test_float_matches_jnp_einsum():
  operands = [_operands(a, b) for _, a, b in CASES]

  @jax.jit
  def both(operands):
    return [(einsum(s, a, b), jnp.einsum(s, a, b)) for (s, _, _), (a, b) in zip(CASES, operands)]

  for (s, _, _), (got, want) in zip(CASES, both(operands)):
    assert got.shape == want.shape, s
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=s)


def test_first_operand_is_always_the_dot_lhs():
  """An lhs-only rule quantizes the first operand whatever the subscripts' order."""
  lhs_only = cfgs.DotConfig(fwd=cfgs.MatmulConfig(lhs=cfgs.TensorConfig(format=formats.INT4)))
  x, w = _operands((2, 3), (4, 3))
  got = einsum('ab,cb->ca', x, w, config=lhs_only)
  want = dot_general(x, w, (((1,), (1,)), ((), ())), config=lhs_only).T
  chex.assert_trees_all_equal(got, want)
  # Quantizing w instead (what an (rhs, lhs) dot would do) gives other values.
  swapped = dot_general(w, x, (((1,), (1,)), ((), ())), config=lhs_only)
  assert not np.allclose(got, swapped)


@pytest.mark.parametrize('preset', ['int8', 'int4'])
def test_quantized_gemms_and_gradients(preset):
  cfg = {'int8': presets.int8, 'int4': presets.int4}[preset]()
  x, w = _operands((2, 5, 8), (8, 2, 4))

  def loss(x, w, key):
    return jnp.sum(einsum('btd,dhf->bthf', x, w, config=cfg, key=key) ** 2)

  key = jax.random.key(1)
  found = lib.gemms(jax.make_jaxpr(jax.grad(loss, (0, 1)))(x, w, key))
  assert {g.gemm for g in found} == {'fwd', 'dlhs', 'drhs'}
  for g in found:
    assert set(g.dtypes) <= lib.low_bit_dtypes(preset, g.gemm, g.primitive), g
  dx, dw = jax.jit(jax.grad(loss, (0, 1)))(x, w, key)
  lib.assert_finite_tree((dx, dw))
  # The quantized gradient points the way of the float one.
  fx, fw = jax.grad(lambda x, w: jnp.sum(jnp.einsum('btd,dhf->bthf', x, w) ** 2), (0, 1))(x, w)
  for q, f in ((dx, fx), (dw, fw)):
    assert float(jnp.vdot(q, f)) > 0.9 * float(jnp.linalg.norm(q) * jnp.linalg.norm(f))


def test_parse_resolves_ellipsis_and_implicit_output():
  assert parse('...ij,jk->...ik', 4, 2)[2][-2:] == 'ik'
  lhs, rhs, out = parse('...qhd,...khd', 4, 4)
  # One broadcast label first, then the labels seen once, alphabetically.
  assert len(lhs) == len(rhs) == 4 and lhs[0] == rhs[0] and out == lhs[0] + 'kq'


@pytest.mark.parametrize('subscripts, shapes, match', [
    ('ij,jk,kl->il', None, 'exactly two'),
    ('ij,jk->ix', ((2, 3), (3, 4)), 'in no operand'),
    ('ij,jk->ii', ((2, 3), (3, 4)), 'repeats'),
    ('i1,jk->ik', ((2, 3), (3, 4)), 'invalid labels'),
    ('ijk,jk->ik', ((2, 3), (3, 4)), 'rank 2'),
    ('ij,jk->ik', ((2, 3), (4, 5)), "label 'j'"),
])
def test_bad_subscripts(subscripts, shapes, match):
  with pytest.raises(ValueError, match=match):
    if shapes is None:
      parse(subscripts, 2, 2)
    else:
      einsum(subscripts, *_operands(*shapes))


def test_operand_count_and_missing_key():
  x, w = _operands((2, 3), (3, 4))
  with pytest.raises(ValueError, match='two operands'):
    einsum('ij->i', x)
  with pytest.raises(ValueError, match='key is required'):
    einsum('ij,jk->ik', x, w, config=presets.int8())


def test_out_sharding_follows_the_einsum_output_order():
  mesh = jax.make_mesh((2, 4), ('a', 'b'), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  x, w = _operands((8, 3), (4, 3))
  spec = jax.sharding.PartitionSpec('b', 'a')  # output 'ca': c over b, a over a
  with jax.set_mesh(mesh):
    x = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('a')))
    y = jax.jit(lambda x, w: einsum('ab,cb->ca', x, w, config=presets.int8(),
                                    key=jax.random.key(0), out_sharding=spec))(x, w)
  assert y.shape == (4, 8) and y.sharding.spec == spec
