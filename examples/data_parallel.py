"""Data-parallel training of a quantized Flax NNX MLP on every local device.

The usual JAX recipe, unchanged by quantization: a 1-D mesh over the axis
'data', each batch sharded `P('data')` (every device gets batch/n rows), the
parameters, the optimizer state and the hooks' RNG state replicated `P()`, and
one `nnx.jit` train step. GSPMD partitions the step and inserts the
collectives; qtrain adds nothing of its own.

What per-tensor scale means under sharding: a per-tensor scale is a property
of the *global* (logical) array, not of a shard. Under `jit` (GSPMD, Auto or
Explicit mesh axes), qtrain's absmax of a batch-sharded activation or
gradient is a max over every shard: XLA inserts a cross-device all-reduce
with `max`, so all devices quantize with the same scale and the result is the
one a single device would compute on the whole batch. Stochastic rounding
draws counter-based noise indexed by the element's global position, so it is
the same on 1 or n devices too, and the int32 partial products of dW = Xᵀ·dY
are summed across devices before the scale is applied, which is exact. Inside
`shard_map`, by contrast, the code sees only its shard: the scale is per shard
(a different, generally finer, quantization) unless you add an explicit
`jax.lax.pmax(absmax, 'data')`. Float reductions across the batch are global
too but are summed in a different order on n devices, so they may differ from
one device's in the last bits: the mean loss, bias gradients, and scales
built on means (SAWB's E|x| and E[x²], used by `presets.int4()`), whereas a
max (absmax, INT8) is exact in any order.

Run it (digits ships inside scikit-learn; nothing is downloaded):

  python examples/data_parallel.py --steps 200
  # 8 simulated devices on a CPU-only machine:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/data_parallel.py

`tests/sharding_test.py` runs `train` on 8 simulated CPU devices and on one
device and checks that the runs agree.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from qtrain import presets
from qtrain.demo import load_digits_split, make_train_step
from qtrain.nnx_hooks import QuantizedDotGeneral

__all__ = ['CONFIGS', 'MLP', 'make_mesh', 'replicate', 'make_train_step', 'train', 'main']

CONFIGS = {'fp32': presets.fp32, 'int8': presets.int8, 'int4': presets.int4}


class MLP(nnx.Module):
  """64 -> hidden -> hidden -> 10 ReLU MLP with every Linear quantized by `config`.

  Each layer's hook gets its own `nnx.Rngs` 'quant' stream (seeded from
  `rngs`), so the stochastic-rounding noise is independent across layers and
  its counter is part of the replicated model state.

  Args:
    hidden: width of the two hidden layers.
    config: the DotConfig of every layer; None trains in float32.
    use_bias: whether the Linear layers have a bias.
    rngs: needs a 'params' stream, and a 'quant' stream if `config` is stochastic.
  """

  def __init__(self, hidden: int, config, *, use_bias: bool = True, rngs: nnx.Rngs):
    sizes = [(64, hidden), (hidden, hidden), (hidden, 10)]
    self.layers = nnx.List([nnx.Linear(i, o, use_bias=use_bias, rngs=rngs) for i, o in sizes])
    if config is not None:
      for layer in self.layers:
        layer.dot_general = nnx.data(QuantizedDotGeneral(
            config, rngs=nnx.Rngs(quant=rngs.quant())))

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = jax.nn.relu(layer(x))
    return self.layers[-1](x)


def make_mesh(devices=None, axis_type=jax.sharding.AxisType.Explicit) -> jax.sharding.Mesh:
  """A 1-D mesh named 'data' over `devices` (default: every local device)."""
  devices = jax.local_devices() if devices is None else list(devices)
  return jax.sharding.Mesh(np.asarray(devices), ('data',), axis_types=(axis_type,))


def replicate(mesh: jax.sharding.Mesh, *objects) -> None:
  """Places the whole NNX state of each object (params, RNG state, opt state) as `P()`."""
  replicated = NamedSharding(mesh, P())
  for obj in objects:
    nnx.update(obj, jax.device_put(nnx.state(obj), replicated))


def train(mesh: jax.sharding.Mesh, *, steps: int = 200, batch_size: int = 64,
          config: str = 'int8', lr: float = 3e-3, hidden: int = 64, seed: int = 0,
          use_bias: bool = True):
  """Trains the MLP data-parallel over `mesh` and returns (losses, model).

  The batches depend only on `seed` (not on the mesh), so runs on different
  meshes see the same data in the same order.

  Args:
    mesh: a mesh with one axis 'data'; `batch_size` must be divisible by its size.
    steps: training steps.
    batch_size: global batch size (split across the devices).
    config: a key of CONFIGS ('fp32', 'int8', 'int4').
    lr: Adam learning rate.
    hidden: hidden width.
    seed: seeds the initialization, the quantization noise and the batches.
    use_bias: whether the Linear layers have biases.

  Returns:
    (list of per-step float losses, the trained model).
  """
  if config not in CONFIGS:
    raise ValueError(f'config={config!r} is unknown; allowed: {sorted(CONFIGS)}.')
  n = mesh.shape['data']
  if batch_size % n:
    raise ValueError(f'batch_size={batch_size} must be divisible by the {n} devices of the mesh.')
  (xtr, ytr), _ = load_digits_split(seed)
  data_sharding = NamedSharding(mesh, P('data'))
  with jax.set_mesh(mesh):
    model = MLP(hidden, CONFIGS[config](), use_bias=use_bias,
                rngs=nnx.Rngs(params=seed, quant=seed + 1))
    optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)
    replicate(mesh, model, optimizer)
    train_step = make_train_step()
    rng = np.random.default_rng(seed)
    losses = []
    for step in range(steps):
      idx = rng.integers(0, len(xtr), batch_size)
      x = jax.device_put(xtr[idx], data_sharding)
      y = jax.device_put(ytr[idx], data_sharding)
      loss = float(train_step(model, optimizer, x, y))
      if not np.isfinite(loss):
        raise FloatingPointError(f'non-finite loss {loss} at step {step}.')
      losses.append(loss)
  return losses, model


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--config', choices=sorted(CONFIGS), default='int8')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  mesh = make_mesh()
  print(f'{mesh.shape["data"]} device(s): {jax.local_devices()}')
  losses, model = train(mesh, steps=args.steps, batch_size=args.batch_size,
                        config=args.config, seed=args.seed)
  for step in range(0, len(losses), max(1, len(losses) // 10)):
    print(f'step {step:5d}  loss {losses[step]:.4f}')
  _, (xte, yte) = load_digits_split(args.seed)
  with jax.set_mesh(mesh):
    # The held-out set (359 rows) is not divisible by every device count: replicate it.
    logits = nnx.jit(lambda m, x: m(x))(model, jax.device_put(xte, NamedSharding(mesh, P())))
  accuracy = float(jnp.mean(jnp.argmax(logits, -1) == yte))
  print(f'final loss {losses[-1]:.4f}  test accuracy {100 * accuracy:.2f}%')
  return 0


if __name__ == '__main__':
  sys.exit(main())
