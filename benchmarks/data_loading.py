"""Does input ever starve the train step? Host time per batch vs step time, per task.

For each task at its default model (and the training loop's default batch
size), measures in one run:

* host: what `qtrain.train` does on the host for every batch — draw the
  seeded batch indices, gather every array of the batch, and hand it to the
  device (`tasks.device_batch`, `block_until_ready`);
* step: one jit-compiled train step of the same batch (fp32 and int8 recipes),
  compilation excluded, `block_until_ready`.

Prints host/step: far below 1 means the loop is compute-bound (the input
pipeline is synchronous; a ratio near 1 would call for prefetching).
Medians of `--repeats` rounds of `--batches` batches.

    .venv/bin/python benchmarks/data_loading.py [--tasks digits,fashion_mnist,...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import optax
from flax import nnx

import qtrain
from qtrain import data as qdata
from qtrain import recipes, tasks
from qtrain.train import make_train_step


def _host_seconds(task_data, batch_size: int, n: int) -> float:
  start = time.perf_counter()
  taken = 0
  for epoch in range(10**6):
    for idx in qdata.batch_indices(task_data.num_train, batch_size, seed=0, epoch=epoch):
      parts = tasks.device_batch(tuple(p[idx] for p in task_data.train))
      jax.block_until_ready(parts)
      taken += 1
      if taken == n:
        return (time.perf_counter() - start) / n
  raise AssertionError('unreachable')


def _step_seconds(task, task_data, recipe_name: str, batch_size: int, n: int,
                  repeats: int) -> float:
  model = task.create_model(task.default_model, task_data, rngs=nnx.Rngs(0))
  recipe = recipes.get(recipe_name)
  qtrain.quantize_model(model, recipe.rules, rngs=nnx.Rngs(quant=1))
  opt = nnx.Optimizer(model, recipe.wrap_optimizer(optax.adam(1e-3)), wrt=nnx.Param)
  step = make_train_step(task.loss)
  batch = tasks.device_batch(tuple(p[:batch_size] for p in task_data.train))
  jax.block_until_ready(step(model, opt, batch))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(n):
      out = step(model, opt, batch)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / n)
  return statistics.median(times)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tasks', default=','.join(tasks.names()))
  parser.add_argument('--batch-size', type=int, default=64)
  parser.add_argument('--batches', type=int, default=20)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  print(f'jax {jax.__version__}, {jax.default_backend()} ({jax.devices()[0].device_kind}), '
        f'batch {args.batch_size}')
  print(f'{"task/model":<28}{"host ms/batch":>14}{"fp32 step ms":>14}{"int8 step ms":>14}'
        f'{"host/step (fp32)":>18}')
  for name in args.tasks.split(','):
    task = tasks.get(name)
    try:
      task_data = task.load()
    except qdata.DatasetNotFoundError as e:
      print(f'{name:<28}skipped: {e}')
      continue
    host = statistics.median(_host_seconds(task_data, args.batch_size, args.batches)
                             for _ in range(args.repeats))
    fp32 = _step_seconds(task, task_data, 'fp32', args.batch_size, args.batches, args.repeats)
    int8 = _step_seconds(task, task_data, 'int8', args.batch_size, args.batches, args.repeats)
    label = f'{name}/{task.default_model}'
    print(f'{label:<28}{1e3 * host:>14.3f}{1e3 * fp32:>14.2f}{1e3 * int8:>14.2f}'
          f'{host / fp32:>18.4f}', flush=True)


if __name__ == '__main__':
  main()
