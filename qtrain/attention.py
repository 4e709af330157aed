"""Dot-product attention whose two matmuls (QKᵀ and probs·V) are quantized.

`dot_product_attention` is a drop-in for `flax.nnx.dot_product_attention`
(the `attention_fn` of `nnx.MultiHeadAttention`) with a `DotConfig` and a key:
the scores `Q·Kᵀ` and the output `probs·V` run through `qtrain.einsum`, so
their forward and both backward GEMMs are low-bit. Q (then probs) is the
dot's lhs and K (then V) its rhs: `config.fwd.lhs` quantizes Q and the
probabilities, `config.fwd.rhs` quantizes K and V.

Semantics follow flax's explicit (non-fused) path: scaling by 1/sqrt(depth),
additive `bias`, boolean `mask` and `is_causal` (masked logits set to the
dtype's most negative value), softmax in the computation dtype, dropout
(broadcast or not), grouped-query attention (fewer K/V heads than Q heads)
and sowing the weights into `module` for `sow_weights=True`. Flax's fused
`jax.nn.dot_product_attention` shortcut (taken when there is no dropout) is
never used, since it cannot run low-bit matmuls; outputs therefore match
flax's up to float rounding, not bit for bit. Not supported: extra
`attention_fn` keyword arguments such as `input_positions` (RoPE).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes

from qtrain import config as cfgs
from qtrain.einsum import einsum

__all__ = ['dot_product_attention', 'dot_product_attention_weights']


def _fold(key, i: int):
  return None if key is None else jax.random.fold_in(key, i)


def _check_shapes(query, key, value=None) -> None:
  arrays = (query, key) if value is None else (query, key, value)
  if len({a.ndim for a in arrays}) != 1 or query.ndim < 3:
    raise ValueError(f'query, key (and value) must have the same rank >= 3, got shapes '
                     f'{[a.shape for a in arrays]}.')
  if len({a.shape[:-3] for a in arrays}) != 1:
    raise ValueError(f'query, key (and value) batch dims must match, got shapes '
                     f'{[a.shape for a in arrays]}.')
  if query.shape[-1] != key.shape[-1]:
    raise ValueError(f'q, k depths must match, got {query.shape[-1]} and {key.shape[-1]}.')
  if query.shape[-2] % key.shape[-2]:
    raise ValueError(f'query heads ({query.shape[-2]}) must be a multiple of key heads '
                     f'({key.shape[-2]}).')


def _mask_logits(logits, mask, is_causal: bool, dtype):
  if mask is None and not is_causal:
    return logits
  masks = [] if mask is None else [mask]
  if is_causal:
    t, s = logits.shape[-2:]
    causal = jnp.tril(jnp.ones((t, s), dtype=dtype))
    masks.append(jnp.broadcast_to(causal, mask.shape if mask is not None else logits.shape))
  combined = nnx.combine_masks(*masks, dtype=dtype)
  return jnp.where(combined, logits, jnp.finfo(dtype).min)


def _dropout(weights, rng, rate: float, broadcast: bool, base_ndim: int, dtype):
  keep_prob = 1.0 - rate
  if broadcast:
    # One mask for every batch element and head, as in flax.
    shape = (1,) * (base_ndim - 2) + weights.shape[-2:]
  else:
    shape = weights.shape
  keep = jax.random.bernoulli(rng, keep_prob, shape)
  return weights * (keep.astype(dtype) / jnp.asarray(keep_prob, dtype=dtype))


def dot_product_attention_weights(query, key, bias=None, mask=None, broadcast_dropout=True,
                                  dropout_rng=None, dropout_rate=0.0, deterministic=False,
                                  dtype=None, precision=None, module=None,
                                  promote_dtype=dtypes.promote_dtype, is_causal=False, *,
                                  config: cfgs.DotConfig | None = None,
                                  quant_key: jax.Array | None = None):
  """Attention probabilities softmax(Q·Kᵀ/sqrt(d) + bias, masked), Q·Kᵀ quantized.

  Args:
    query: [batch..., q_length, num_heads, depth].
    key: [batch..., kv_length, num_kv_heads, depth]; num_heads must be a
      multiple of num_kv_heads (grouped-query attention).
    bias, mask, broadcast_dropout, dropout_rng, dropout_rate, deterministic,
      dtype, precision, module, promote_dtype, is_causal: as in
      `flax.nnx.dot_product_attention_weights`.
    config: DotConfig of the Q·Kᵀ matmul (lhs rule on Q, rhs rule on K); None
      keeps it float.
    quant_key: PRNG key, required if `config` is stochastic.

  Returns:
    Weights of shape [batch..., num_heads, q_length, kv_length], in the
    computation dtype.

  Raises:
    ValueError: bad shapes or dropout settings, or a missing key.
  """
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f'dropout_rate must be in [0, 1), got {dropout_rate!r}.')
  if not deterministic and dropout_rate > 0.0 and dropout_rng is None:
    raise ValueError('dropout_rng is required when dropout_rate > 0 and deterministic=False.')
  query, key = promote_dtype((query, key), dtype=dtype)
  dtype = query.dtype
  _check_shapes(query, key)
  q_heads, k_heads = query.shape[-2], key.shape[-2]
  # Grouped-query attention: split the query heads into (kv head, group).
  query = query.reshape(query.shape[:-2] + (k_heads, q_heads // k_heads, query.shape[-1]))
  query = query / jnp.sqrt(query.shape[-1]).astype(dtype)
  logits = einsum('...qhgd,...khd->...hgqk', query, key, precision=precision, config=config,
                  key=quant_key)
  logits = logits.reshape(logits.shape[:-4] + (q_heads,) + logits.shape[-2:])
  if bias is not None:
    logits = logits + bias
  logits = _mask_logits(logits, mask, is_causal, dtype)
  weights = jax.nn.softmax(logits).astype(dtype)
  if module:
    module.sow(nnx.Intermediate, 'attention_weights', weights)
  if not deterministic and dropout_rate > 0.0:
    weights = _dropout(weights, dropout_rng, dropout_rate, broadcast_dropout, key.ndim, dtype)
  return weights


def dot_product_attention(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                          dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                          precision=None, module=None, promote_dtype=dtypes.promote_dtype,
                          is_causal=False, *, config: cfgs.DotConfig | None = None,
                          quant_key: jax.Array | None = None):
  """`flax.nnx.dot_product_attention` with quantized Q·Kᵀ and probs·V matmuls.

  Args:
    query: [batch..., q_length, num_heads, depth].
    key: [batch..., kv_length, num_kv_heads, depth].
    value: [batch..., kv_length, num_kv_heads, v_depth].
    bias, mask, broadcast_dropout, dropout_rng, dropout_rate, deterministic,
      dtype, precision, module, promote_dtype, is_causal: as in
      `flax.nnx.dot_product_attention`.
    config: DotConfig of both matmuls (lhs rule on Q and on the
      probabilities, rhs rule on K and on V); None keeps them float.
    quant_key: PRNG key, required if `config` is stochastic; the two matmuls
      draw from `fold_in(quant_key, 0)` and `fold_in(quant_key, 1)`.

  Returns:
    [batch..., q_length, num_heads, v_depth] in the computation dtype.

  Raises:
    ValueError: bad shapes or dropout settings, or a missing key.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from qtrain import presets
    >>> from qtrain.attention import dot_product_attention
    >>> q = k = v = jnp.ones((2, 5, 4, 8))  # batch, length, heads, depth
    >>> dot_product_attention(q, k, v, config=presets.int8(), quant_key=jax.random.key(0)).shape
    (2, 5, 4, 8)
  """
  query, key, value = promote_dtype((query, key, value), dtype=dtype)
  dtype = query.dtype
  _check_shapes(query, key, value)
  if key.shape[-3] != value.shape[-3] or key.shape[-2] != value.shape[-2]:
    raise ValueError(f'key and value lengths and heads must match, got shapes {key.shape} '
                     f'and {value.shape}.')
  weights = dot_product_attention_weights(
      query, key, bias, mask, broadcast_dropout, dropout_rng, dropout_rate, deterministic,
      dtype, precision, module, promote_dtype, is_causal, config=config,
      quant_key=_fold(quant_key, 0))
  q_heads, v_heads = weights.shape[-3], value.shape[-2]
  weights = weights.reshape(weights.shape[:-3] + (v_heads, q_heads // v_heads) +
                            weights.shape[-2:])
  out = einsum('...hgqk,...khd->...qhgd', weights, value, precision=precision, config=config,
               key=_fold(quant_key, 1))
  return out.reshape(out.shape[:-3] + (q_heads, out.shape[-1]))
