"""The quick-start demo: a small Flax NNX MLP on scikit-learn's digits, float vs quantized.

Trains the same MLP (same init, same batches) with float32 GEMMs and with
every GEMM of the forward and backward pass quantized (INT8, and 4-bit:
INT4 SAWB forward with LUQ radix-2 log FP4 gradients), then prints the test
accuracy of each. Digits ships inside the scikit-learn wheel: nothing is
downloaded.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from qtrain import presets
from qtrain.config import DotConfig
from qtrain.nnx_hooks import QuantizedDotGeneral

__all__ = ['DemoResult', 'load_digits_split', 'make_train_step', 'run_demo', 'MLP']

CONFIGS = {'fp32': presets.fp32, 'int8': presets.int8, 'int4': presets.int4}


@dataclasses.dataclass(frozen=True)
class DemoResult:
  name: str
  test_accuracy: float
  final_loss: float
  seconds: float


def load_digits_split(seed: int, test_fraction: float = 0.2):
  """Digits (1,797 8×8 images, 10 classes) as float32 [N, 64] in [0, 1], split by `seed`."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  data = load_digits()
  x = (data.data / 16.0).astype(np.float32)
  y = data.target.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(x))
  n_test = int(len(x) * test_fraction)
  test, train = perm[:n_test], perm[n_test:]
  return (x[train], y[train]), (x[test], y[test])


class MLP(nnx.Module):
  """64 -> hidden -> hidden -> 10 ReLU MLP; `config` quantizes every Linear's GEMMs."""

  def __init__(self, hidden: int, config: DotConfig | None, *, rngs: nnx.Rngs):
    self.layers = nnx.List([nnx.Linear(64, hidden, rngs=rngs), nnx.Linear(hidden, hidden, rngs=rngs),
                            nnx.Linear(hidden, 10, rngs=rngs)])
    if config is not None:
      for layer in self.layers:
        layer.dot_general = nnx.data(QuantizedDotGeneral(config, rngs=rngs))

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = jax.nn.relu(layer(x))
    return self.layers[-1](x)


def make_train_step():
  """A fresh `nnx.jit` step (model, optimizer, x, y) -> mean cross-entropy loss.

  x: float32 [batch, features]; y: int32 [batch] class labels.
  """

  @nnx.jit
  def train_step(model, optimizer, x, y):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  return train_step


def _train_one(name: str, config, data, *, steps: int, batch_size: int, lr: float, seed: int,
               hidden: int, progress: bool) -> DemoResult:
  (xtr, ytr), (xte, yte) = data
  model = MLP(hidden, config, rngs=nnx.Rngs(params=seed, quant=seed + 1))
  optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)

  train_step = make_train_step()

  @nnx.jit
  def accuracy(model, x, y):
    return jnp.mean(jnp.argmax(model(x), -1) == y)

  rng = np.random.default_rng(seed)  # same batches for every config
  start, loss = time.perf_counter(), float('nan')
  for step in tqdm(range(steps), desc=f'{name:>5}', disable=not progress, leave=False):
    idx = rng.integers(0, len(xtr), batch_size)
    loss = train_step(model, optimizer, xtr[idx], ytr[idx])
    if step % 50 == 0 and not np.isfinite(float(loss)):
      raise FloatingPointError(f'{name}: non-finite loss {float(loss)} at step {step}.')
  acc = float(accuracy(model, xte, yte))
  return DemoResult(name, acc, float(loss), time.perf_counter() - start)


def run_demo(*, steps: int = 400, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
             hidden: int = 128, configs=('fp32', 'int8', 'int4'),
             progress: bool = True) -> list[DemoResult]:
  """Trains the MLP once per config and returns the results (same seed, same batches)."""
  unknown = [c for c in configs if c not in CONFIGS]
  if unknown:
    raise ValueError(f'configs {unknown} are unknown; allowed: {sorted(CONFIGS)}.')
  data = load_digits_split(seed)
  return [_train_one(name, CONFIGS[name](), data, steps=steps, batch_size=batch_size, lr=lr,
                     seed=seed, hidden=hidden, progress=progress) for name in configs]


def format_results(results: list[DemoResult]) -> str:
  base = next((r.test_accuracy for r in results if r.name == 'fp32'), None)
  lines = [f"{'config':<8}{'test acc':>10}{'Δ vs fp32':>11}{'final loss':>12}{'time s':>8}"]
  for r in results:
    delta = '' if base is None else f'{100 * (r.test_accuracy - base):+.2f} pp'
    lines.append(f'{r.name:<8}{100 * r.test_accuracy:>9.2f}%{delta:>11}'
                 f'{r.final_loss:>12.4f}{r.seconds:>8.1f}')
  return '\n'.join(lines)
