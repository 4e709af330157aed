"""Cost of one jit-compiled train step, quantized relative to float32, measured in one run.

Models: a small CNN (3 convs + linear head, 28×28×1 input, batch 64) and a
small pre-LN transformer block (d=128, 4 heads, MLP 4×, seq 64, batch 16).
Configs: float32, INT8 per tensor (presets.int8, stochastic rounding of dY),
the same with round-to-nearest dY (to show what the SR noise costs), INT8 with
per-channel weights, and 4-bit (presets.int4: INT4 SAWB forward, LUQ log-FP4
backward).
Every GEMM of the quantized runs — forward, dX and dW — is quantized; the
attention score/value matmuls stay float (as in most of the papers).

Timing: configs are interleaved round-robin, each measurement is the median of
`--repeats` rounds of `--steps` steps, so that load on this shared machine
hits every config alike; ratios, not absolute times, are the result.

    .venv/bin/python benchmarks/train_step_cost.py [--repeats 7 --steps 10]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import qtrain
from qtrain.demo import make_train_step

CONFIGS = {
    'fp32': lambda: None,
    'int8': qtrain.presets.int8,
    'int8-rtn-grad': lambda: qtrain.presets.int8(gradient_rounding='nearest'),
    'int8-perchannel-w': lambda: qtrain.presets.int8(per_channel_weights=True),
    'int4 (sawb/luq)': qtrain.presets.int4,
}


class CNN(nnx.Module):
  def __init__(self, *, rngs):
    self.convs = nnx.List([nnx.Conv(1, 32, (3, 3), rngs=rngs),
                           nnx.Conv(32, 64, (3, 3), strides=(2, 2), rngs=rngs),
                           nnx.Conv(64, 64, (3, 3), strides=(2, 2), rngs=rngs)])
    self.head = nnx.Linear(7 * 7 * 64, 10, rngs=rngs)

  def __call__(self, x):
    for conv in self.convs:
      x = jax.nn.relu(conv(x))
    return self.head(x.reshape(x.shape[0], -1))


class Block(nnx.Module):
  def __init__(self, d=128, heads=4, *, rngs):
    self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
    self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
    self.out = nnx.Linear(d, d, rngs=rngs)
    self.up, self.down = nnx.Linear(d, 4 * d, rngs=rngs), nnx.Linear(4 * d, d, rngs=rngs)
    self.head = nnx.Linear(d, 10, rngs=rngs)
    self.heads = heads

  def __call__(self, x):
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
    split = lambda a: a.reshape(b, t, self.heads, d // self.heads)
    attn = jax.nn.dot_product_attention(split(q), split(k), split(v), is_causal=True)
    x = x + self.out(attn.reshape(b, t, d))
    x = x + self.down(jax.nn.gelu(self.up(self.ln2(x))))
    return self.head(x.mean(axis=1))


def make_step(model_fn, config, x, y):
  """Builds model + SGD optimizer, compiles one step; returns run(n) -> seconds per step."""
  model = model_fn(rngs=nnx.Rngs(0))
  if config is not None:
    model = qtrain.quantize_model(model, config, rngs=nnx.Rngs(quant=1))
  optimizer = nnx.Optimizer(model, optax.sgd(1e-2), wrt=nnx.Param)
  step = make_train_step()
  step(model, optimizer, x, y).block_until_ready()  # compile
  def run(n):
    t = time.perf_counter()
    for _ in range(n):
      loss = step(model, optimizer, x, y)
    loss.block_until_ready()
    return (time.perf_counter() - t) / n
  return run


def bench(name, model_fn, x, y, repeats, steps):
  runners = {c: make_step(model_fn, f(), x, y) for c, f in CONFIGS.items()}
  times = {c: [] for c in runners}
  for _ in range(repeats):
    for c, run in runners.items():
      times[c].append(run(steps))
  base = statistics.median(times['fp32'])
  print(f'\n{name}')
  print(f"  {'config':<20}{'ms/step':>10}{'× fp32':>9}")
  for c, ts in times.items():
    med = statistics.median(ts)
    print(f'  {c:<20}{1e3 * med:>10.2f}{med / base:>9.2f}')


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--steps', type=int, default=10)
  args = parser.parse_args()
  print(f'jax {jax.__version__}, backend {jax.default_backend()}, {jax.devices()[0].device_kind}, '
        f'{platform.processor() or platform.machine()}')
  k1, k2 = jax.random.split(jax.random.key(0))
  bench('small CNN (3 conv + linear), 28x28x1, batch 64', CNN,
        jax.random.normal(k1, (64, 28, 28, 1)), jax.random.randint(k2, (64,), 0, 10),
        args.repeats, args.steps)
  bench('transformer block (d=128, 4 heads, MLP 4x), seq 64, batch 16', Block,
        jax.random.normal(k1, (16, 64, 128)), jax.random.randint(k2, (16,), 0, 10),
        args.repeats, args.steps)


if __name__ == '__main__':
  main()
