"""WAGEUBN's quantized BatchNorm for Flax NNX and Linen, and an in-place swap for NNX models.

Forward (papers-1-4.md §3a, official `BatchNorm.py`), with Q(x, k) =
round(x·2^(k-1))/2^(k-1) unclipped (`qtrain.wageubn.wageubn_direct`):

    μ_q = Q(μ, 16);  σ_q = Q(sqrt(σ²), 16) + ε  (ε = 2^-15, added to the *std*)
    x̂ = Q((x - μ_q) / σ_q, 8);  y = x̂ · Q(γ, 8) + Q(β, 8)

μ, σ² are the batch moments in training and the running averages in
evaluation; the running averages are updated with the float batch moments,
as the official code does. Every Q has an identity gradient, so the backward
pass is float autodiff through the quantized values (the paper's BN backward
runs in float on quantized values); WAGEUBN's 15-bit quantization of the γ/β
*gradients* belongs to the optimizer (`qtrain.recipes.papers.wageubn`).

| name                      | what                                                             |
|---------------------------|------------------------------------------------------------------|
| `quantized_batch_norm`    | the pure function (given μ, σ², γ, β)                            |
| `QuantizedBatchNorm`      | NNX module, a subclass of `nnx.BatchNorm` (same state layout)    |
| `LinenQuantizedBatchNorm` | Linen module, a subclass of `nn.BatchNorm` (same variables)      |
| `swap_batch_norm`         | replaces every `nnx.BatchNorm` of an NNX model in place          |

A zero-variance channel (a dead channel in a batch) gives σ_q = ε and a zero
(not NaN) gradient through sqrt at σ² = 0.

References:
  Yang et al., WAGEUBN, Neural Networks 125, 2020, arXiv:1909.02384 (quantized BN).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from qtrain.wageubn import wageubn_direct

__all__ = ['quantized_batch_norm', 'QuantizedBatchNorm', 'LinenQuantizedBatchNorm',
           'swap_batch_norm', 'EPSILON']

EPSILON = 2.0 ** -15  # the official BatchNorm's epsilon, added to the std

_BITS = ('mean_bits', 'std_bits', 'x_bits', 'scale_bits', 'bias_bits')


def _check_options(epsilon, bits: dict[str, int]) -> None:
  if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0:
    raise ValueError(f'epsilon={epsilon!r} must be a positive number.')
  for name, b in bits.items():
    if isinstance(b, bool) or not isinstance(b, int):
      raise TypeError(f'{name} must be an int, got {b!r}.')
    if not 2 <= b <= 32:
      raise ValueError(f'{name}={b} is out of range; allowed: 2..32.')


def _safe_sqrt(v: jax.Array) -> jax.Array:
  # sqrt'(0) = inf would turn a zero-variance channel's gradient into NaN.
  pos = v > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, v, 1.0)), 0.0)


def quantized_batch_norm(x: jax.Array, mean: jax.Array, var: jax.Array,
                         scale: jax.Array | None = None, bias: jax.Array | None = None, *,
                         axis: int = -1, epsilon: float = EPSILON, mean_bits: int = 16,
                         std_bits: int = 16, x_bits: int = 8, scale_bits: int = 8,
                         bias_bits: int = 8) -> jax.Array:
  """WAGEUBN's quantized normalisation of `x` with given statistics and affine params.

  Args:
    x: float array, features along `axis`.
    mean, var: per-feature mean and variance, shape [features].
    scale, bias: per-feature γ and β, shape [features], or None (1 and 0).
    axis: the feature axis of x.
    epsilon: added to the quantized std (paper: 2^-15).
    mean_bits, std_bits, x_bits, scale_bits, bias_bits: the Q widths (16, 16,
      8, 8, 8 in the paper).

  Returns:
    float32 (or x's wider dtype) array of x's shape.

  Raises:
    TypeError / ValueError: bad bits or epsilon.

  Examples:
    >>> import jax.numpy as jnp
    >>> from qtrain import batchnorm
    >>> x = jnp.array([[0.0], [1.0], [3.0]])
    >>> batchnorm.quantized_batch_norm(x, jnp.array([1.0]), jnp.array([1.0]))[:, 0].tolist()
    [-1.0, 0.0, 2.0]
  """
  _check_options(epsilon, dict(zip(_BITS, (mean_bits, std_bits, x_bits, scale_bits, bias_bits))))
  x = jnp.asarray(x)
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  axis = axis % x.ndim
  shape = [1] * x.ndim
  shape[axis] = x.shape[axis]

  def per_feature(v):
    return jnp.asarray(v, dtype).reshape(shape)

  mu = wageubn_direct(per_feature(mean), bits=mean_bits)
  sd = wageubn_direct(_safe_sqrt(per_feature(var)), bits=std_bits) + epsilon
  y = wageubn_direct((x.astype(dtype) - mu) / sd, bits=x_bits)
  if scale is not None:
    y = y * wageubn_direct(per_feature(scale), bits=scale_bits)
  if bias is not None:
    y = y + wageubn_direct(per_feature(bias), bits=bias_bits)
  return y


def _moments(x: jax.Array, reduction_axes: tuple[int, ...], axis_name, axis_index_groups):
  """Batch mean and (biased) variance, optionally averaged across devices."""
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  mean = jnp.mean(x32, axis=reduction_axes)
  mean_sq = jnp.mean(jnp.square(x32), axis=reduction_axes)
  if axis_name is not None:
    mean, mean_sq = jax.lax.pmean((mean, mean_sq), axis_name,
                                  axis_index_groups=axis_index_groups)
  # E[x²] - E[x]² can go slightly negative in float: clamp.
  return mean, jnp.maximum(mean_sq - jnp.square(mean), 0.0)


class QuantizedBatchNorm(nnx.BatchNorm):
  """`nnx.BatchNorm` with WAGEUBN's quantized forward (drop-in, same state layout).

  Params `scale`, `bias` and batch stats `mean`, `var` have the names,
  shapes and roles of `nnx.BatchNorm`'s, so a checkpoint or an optimizer
  state made for one fits the other. `epsilon` is added to the quantized
  standard deviation (paper: 2^-15), not to the variance as in
  `nnx.BatchNorm`. Only a single feature axis is supported; `mask` is not.

  Args:
    num_features, use_running_average, axis, momentum, dtype, param_dtype,
      use_bias, use_scale, axis_name, axis_index_groups, rngs, ...: as
      `nnx.BatchNorm`.
    epsilon: added to the quantized std; default 2^-15.
    mean_bits, std_bits, x_bits, scale_bits, bias_bits: Q widths (16, 16, 8, 8, 8).

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qtrain.batchnorm import QuantizedBatchNorm
    >>> bn = QuantizedBatchNorm(3, rngs=nnx.Rngs(0))
    >>> y = bn(jnp.arange(12.0).reshape(4, 3))
    >>> bool(jnp.all(y * 128 == jnp.round(y * 128)))  # on the 8-bit grid (γ=1, β=0)
    True
  """

  def __init__(self, num_features: int, *, epsilon: float = EPSILON, mean_bits: int = 16,
               std_bits: int = 16, x_bits: int = 8, scale_bits: int = 8, bias_bits: int = 8,
               **kwargs):
    _check_options(epsilon, dict(zip(_BITS, (mean_bits, std_bits, x_bits, scale_bits,
                                             bias_bits))))
    super().__init__(num_features, epsilon=epsilon, **kwargs)
    if not isinstance(self.axis, int):
      raise ValueError(f'QuantizedBatchNorm supports one feature axis, got axis={self.axis!r}.')
    self.mean_bits, self.std_bits, self.x_bits = mean_bits, std_bits, x_bits
    self.scale_bits, self.bias_bits = scale_bits, bias_bits

  @classmethod
  def from_batch_norm(cls, bn: nnx.BatchNorm, *, epsilon: float = EPSILON,
                      **bits) -> QuantizedBatchNorm:
    """A QuantizedBatchNorm sharing `bn`'s Variables (params and stats keep their values).

    Args:
      bn: an `nnx.BatchNorm` (its momentum, axis, dtypes, mode are kept).
      epsilon: the paper's ε on the std (bn.epsilon is on the variance and is
        not reused).
      **bits: mean_bits, std_bits, x_bits, scale_bits, bias_bits.

    Returns:
      The new module; `bn`'s `scale`, `bias`, `mean`, `var` Variables are the
      same objects in it.
    """
    if not isinstance(bn, nnx.BatchNorm):
      raise TypeError(f'bn must be an nnx.BatchNorm, got {type(bn).__name__}.')
    unknown = set(bits) - set(_BITS)
    if unknown:
      raise TypeError(f'unknown options {sorted(unknown)}; allowed: {_BITS}.')
    new = cls(bn.num_features, epsilon=epsilon, use_running_average=bn.use_running_average,
              axis=bn.axis, momentum=bn.momentum, dtype=bn.dtype, param_dtype=bn.param_dtype,
              use_bias=bn.use_bias, use_scale=bn.use_scale, axis_name=bn.axis_name,
              axis_index_groups=bn.axis_index_groups, rngs=nnx.Rngs(0), **bits)
    new.scale, new.bias, new.mean, new.var = bn.scale, bn.bias, bn.mean, bn.var
    return new

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    """Normalises x with WAGEUBN's quantized BN (see the module doc).

    Args:
      x: float array, features along `self.axis`.
      use_running_average: overrides the module's flag when not None.
      mask: not supported (must be None).

    Returns:
      The normalised array, x's shape.
    """
    if mask is not None:
      raise NotImplementedError('QuantizedBatchNorm does not support mask.')
    use_ra = self.use_running_average if use_running_average is None else use_running_average
    if use_ra is None:
      raise ValueError('use_running_average is None: pass it to the constructor or the call '
                       '(or use model.train()/model.eval()).')
    axis = self.axis % x.ndim
    if use_ra:
      mean, var = self.mean[...], self.var[...]
    else:
      reduction = tuple(i for i in range(x.ndim) if i != axis)
      mean, var = _moments(x, reduction, self.axis_name, self.axis_index_groups)
      m = self.momentum
      self.mean[...] = jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * mean)
      self.var[...] = jax.lax.stop_gradient(m * self.var[...] + (1 - m) * var)
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    y = quantized_batch_norm(x, mean, var, scale, bias, axis=axis, epsilon=self.epsilon,
                             mean_bits=self.mean_bits, std_bits=self.std_bits,
                             x_bits=self.x_bits, scale_bits=self.scale_bits,
                             bias_bits=self.bias_bits)
    return y.astype(self.dtype or jnp.result_type(x, y))


class LinenQuantizedBatchNorm(nn.BatchNorm):
  """`flax.linen.BatchNorm` with WAGEUBN's quantized forward (same variable tree).

  Use it in place of `nn.BatchNorm` in a Linen model: params 'scale', 'bias'
  and batch_stats 'mean', 'var' are named and shaped as `nn.BatchNorm`'s.
  `epsilon` (default 2^-15) is added to the quantized std. One feature axis;
  `mask` is not supported.

  Attributes:
    mean_bits, std_bits, x_bits, scale_bits, bias_bits: Q widths (16, 16, 8, 8, 8).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from qtrain.batchnorm import LinenQuantizedBatchNorm
    >>> bn = LinenQuantizedBatchNorm(use_running_average=False)
    >>> x = jnp.arange(12.0).reshape(4, 3)
    >>> variables = bn.init(jax.random.key(0), x)
    >>> y, updates = bn.apply(variables, x, mutable=['batch_stats'])
    >>> sorted(variables['params']), sorted(updates['batch_stats'])
    (['bias', 'scale'], ['mean', 'var'])
  """
  epsilon: float = EPSILON
  mean_bits: int = 16
  std_bits: int = 16
  x_bits: int = 8
  scale_bits: int = 8
  bias_bits: int = 8

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    """Normalises x (see `QuantizedBatchNorm.__call__`)."""
    if mask is not None:
      raise NotImplementedError('LinenQuantizedBatchNorm does not support mask.')
    if not isinstance(self.axis, int):
      raise ValueError(f'LinenQuantizedBatchNorm supports one feature axis, got {self.axis!r}.')
    use_ra = nn.merge_param('use_running_average', self.use_running_average,
                            use_running_average)
    axis = self.axis % x.ndim
    features = (x.shape[axis],)
    ra_mean = self.variable('batch_stats', 'mean', lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable('batch_stats', 'var', lambda s: jnp.ones(s, jnp.float32), features)
    if use_ra:
      mean, var = ra_mean.value, ra_var.value
    else:
      reduction = tuple(i for i in range(x.ndim) if i != axis)
      mean, var = _moments(x, reduction, self.axis_name, self.axis_index_groups)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
        ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(var)
    scale = (self.param('scale', self.scale_init, features, self.param_dtype)
             if self.use_scale else None)
    bias = self.param('bias', self.bias_init, features, self.param_dtype) if self.use_bias else None
    y = quantized_batch_norm(x, mean, var, scale, bias, axis=axis, epsilon=self.epsilon,
                             mean_bits=self.mean_bits, std_bits=self.std_bits,
                             x_bits=self.x_bits, scale_bits=self.scale_bits,
                             bias_bits=self.bias_bits)
    return y.astype(self.dtype or jnp.result_type(x, y))


def swap_batch_norm(model: nnx.Module, *, epsilon: float = EPSILON,
                    **bits: Any) -> list[str]:
  """Replaces every `nnx.BatchNorm` of `model` by a `QuantizedBatchNorm`, in place.

  The new layers share the old ones' Variables, so parameters and running
  statistics keep their values and the state tree keeps its layout. Layers
  that are already `QuantizedBatchNorm` are left alone (the call is
  idempotent). Swap *before* building an `nnx.Optimizer` over the model.

  Args:
    model: an NNX model (e.g. `qtrain.models.LeNet(batch_norm=True)`, `ResNet20`).
    epsilon: ε added to the quantized std (paper: 2^-15).
    **bits: mean_bits, std_bits, x_bits, scale_bits, bias_bits.

  Returns:
    The '/'-joined paths of the swapped layers.

  Raises:
    TypeError: `model` is not an nnx.Module, or an unknown option.

  Examples:
    >>> from flax import nnx
    >>> from qtrain import batchnorm, models
    >>> model = models.LeNet(batch_norm=True, rngs=nnx.Rngs(0))
    >>> batchnorm.swap_batch_norm(model)
    ['conv2_bn', 'stem_bn']
    >>> type(model.stem_bn).__name__
    'QuantizedBatchNorm'
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f'model must be an nnx.Module, got {type(model).__name__}.')
  found = [(path, m) for path, m in nnx.iter_modules(model)
           if isinstance(m, nnx.BatchNorm) and not isinstance(m, QuantizedBatchNorm)]
  if any(not path for path, _ in found):
    raise TypeError('model is itself an nnx.BatchNorm; use QuantizedBatchNorm.from_batch_norm.')
  swapped = []
  for path, bn in found:
    parent = model
    for p in path[:-1]:
      parent = parent[p] if isinstance(p, int) else getattr(parent, p)
    new = QuantizedBatchNorm.from_batch_norm(bn, epsilon=epsilon, **bits)
    if isinstance(path[-1], int):
      parent[path[-1]] = new
    else:
      setattr(parent, path[-1], new)
    swapped.append('/'.join(map(str, path)))
  return swapped
