"""FQ-ViT post-training quantization: float vs 8/8/8 vs 8/8/4 (and the paper's baselines).

Two models, each evaluated on held-out data:

* `vit`: `qtrain.vit.ViT` trained in float on Fashion-MNIST (or `--task
  digits`), then calibrated on 10 batches of 100 training images (the
  paper's 1000) and evaluated on the test set: top-1 accuracy and top-1
  agreement with the float model.
* `minilm`: the pretrained all-MiniLM-L6-v2 encoder (`qtrain.bert`), frozen;
  a logistic-regression probe is fitted on its float sentence embeddings
  (mean pooling) of Debian `fortunes` topics, then the encoder is
  calibrated on 10 batches of training texts and the same probe is applied
  to the quantized embeddings: probe accuracy, agreement, and the cosine
  similarity of quantized to float embeddings.

Rows: float32; FQ-ViT 8/8/8 and 8/8/4 (MinMax + PTF + LIS); with `--baselines`
the paper's baseline rows (8/8/8, no PTF, no LIS) for MinMax, EMA,
Percentile and OMSE. The paper's ImageNet deltas are printed next to ours.

    .venv/bin/python benchmarks/fq_vit_ptq.py --model vit [--task fashion_mnist --epochs 2]
    .venv/bin/python benchmarks/fq_vit_ptq.py --model minilm [--max-len 64 --train 2000]
"""

from __future__ import annotations

import argparse
import importlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qtrain import data as qdata
from qtrain import ptq
from qtrain.recipes.papers.fq_vit import REPORTED, fq_vit


def _import(name: str):
  """qtrain.vit / qtrain.bert, imported lazily, with a clear message when missing."""
  try:
    return importlib.import_module(name)
  except ModuleNotFoundError as e:
    if e.name != name:
      raise
    raise SystemExit(f'{name} is not available in this checkout; the {name.split(".")[-1]} '
                     'model of this benchmark needs it.') from None


def _recipes(baselines: bool):
  rows = [('FQ-ViT 8/8/8', fq_vit(8)), ('FQ-ViT 8/8/4', fq_vit(4))]
  if baselines:
    rows += [(f'{obs} 8/8/8 (no PTF/LIS)', fq_vit(8, observer=obs, ptf=False, lis=False))
             for obs in ('minmax', 'ema', 'percentile', 'omse')]
  return rows


@nnx.jit
def _apply(model, *args):
  return model(*args)


def _predict(model, x, batch: int = 500) -> np.ndarray:
  return np.concatenate([np.asarray(_apply(model, jnp.asarray(x[i:i + batch])))
                         for i in range(0, len(x), batch)])


def _paper(bits: str) -> str:
  deltas = [d.delta_pp for d in REPORTED if d.source.endswith(bits)]
  return f'{min(deltas):+.2f}..{max(deltas):+.2f}'


def _table(rows, metric: str) -> str:
  head = f'| setting | {metric} (%) | Δ vs float (pp) | agreement (%) | extra | paper Δ ImageNet |'
  out = [head, '|---|---|---|---|---|---|']
  for name, value, delta, agree, extra in rows:
    paper = _paper('8/8/4') if '8/8/4' in name else (_paper('8/8/8') if 'FQ-ViT' in name else '')
    out.append(f'| {name} | {100 * value:.2f} | {delta} | {agree} | {extra} | {paper} |')
  return '\n'.join(out)


def run_vit(args) -> str:
  vit = _import('qtrain.vit')
  ds = qdata.load(args.task)
  images = lambda x: x.reshape(len(x), 8, 8, 1) if x.ndim == 2 else x  # digits are flat
  x_train, y_train = images(ds.x_train), ds.y_train
  x_test, y_test = images(ds.x_test)[:args.test], ds.y_test[:args.test]
  size = x_train.shape[1]
  model = vit.ViT(num_classes=ds.num_classes, in_channels=x_train.shape[-1], image_size=size,
                  rngs=nnx.Rngs(args.seed))
  opt = nnx.Optimizer(model, optax.adam(args.lr), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, x, y):
    loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
    opt.update(model, nnx.grad(loss)(model))

  rng = np.random.default_rng(args.seed)
  steps = args.steps or args.epochs * (len(x_train) // args.batch)
  t0 = time.time()
  for _ in range(steps):
    idx = rng.choice(len(x_train), args.batch, replace=False)
    step(model, opt, x_train[idx], y_train[idx])
  train_s = time.time() - t0
  calib_idx = rng.permutation(len(x_train))[:10 * 100]  # the paper: 10 × 100, shuffled, seed 0
  calib = [x_train[calib_idx[i * 100:(i + 1) * 100]] for i in range(10)]
  float_pred = _predict(model, x_test).argmax(-1)
  float_acc = float(np.mean(float_pred == y_test))
  rows = [('float32', float_acc, '—', '100.00', f'trained {steps} steps in {train_s:.0f} s')]
  for name, recipe in _recipes(args.baselines):
    t0 = time.time()
    qmodel, _ = ptq.calibrate(model, calib, recipe)
    pred = _predict(qmodel, x_test).argmax(-1)
    acc = float(np.mean(pred == y_test))
    seconds = time.time() - t0
    rows.append((name, acc, f'{100 * (acc - float_acc):+.2f}',
                 f'{100 * np.mean(pred == float_pred):.2f}', f'calibration {seconds:.0f} s'))
  return (f'ViT on {args.task} ({len(x_test)} test images), top-1\n\n'
          + _table(rows, 'test accuracy'))


def _embed(bert, encoder, ids, batch: int = 64) -> np.ndarray:
  out = []
  for i in range(0, len(ids), batch):
    chunk = jnp.asarray(ids[i:i + batch])
    mask = chunk != bert.PAD_ID
    out.append(np.asarray(bert.mean_pool(_apply(encoder, chunk, mask), mask)))
  return np.concatenate(out)


def _fit_probe(features, labels, classes: int, steps: int = 300) -> tuple[np.ndarray, np.ndarray]:
  """Multinomial logistic regression on standardised features (full-batch Adam)."""
  x, y = jnp.asarray(features), jnp.asarray(labels)
  params = (jnp.zeros((x.shape[1], classes)), jnp.zeros(classes))
  opt = optax.adam(0.05)
  state = opt.init(params)

  @jax.jit
  def update(params, state):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(x @ p[0] + p[1], y).mean()
    grads = jax.grad(loss)(params)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = update(params, state)
  return np.asarray(params[0]), np.asarray(params[1])


def run_minilm(args) -> str:
  bert = _import('qtrain.bert')
  from qtrain.data import fortunes  # pylint: disable=import-outside-toplevel
  ds = fortunes.load_fortunes(topics=fortunes.CLASSIFICATION_TOPICS, seed=args.seed)
  tokenizer = bert.load_tokenizer(max_len=args.max_len)
  ids_train = bert.encode_texts(tokenizer, list(ds.x_train[:args.train]), args.max_len)
  ids_test = bert.encode_texts(tokenizer, list(ds.x_test[:args.test]), args.max_len)
  y_train, y_test = ds.y_train[:args.train], ds.y_test[:args.test]
  encoder = bert.load_minilm()
  f_train = _embed(bert, encoder, ids_train)
  mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
  w, b = _fit_probe((f_train - mu) / sd, y_train, ds.num_classes)
  f_test = _embed(bert, encoder, ids_test)
  float_pred = (((f_test - mu) / sd) @ w + b).argmax(-1)
  float_acc = float(np.mean(float_pred == y_test))
  rows = [('float32', float_acc, '—', '100.00', 'cosine 1.0000')]
  calib = [(jnp.asarray(ids_train[i * 32:(i + 1) * 32]),
            jnp.asarray(ids_train[i * 32:(i + 1) * 32] != bert.PAD_ID)) for i in range(10)]
  for name, recipe in _recipes(args.baselines):
    qenc, _ = ptq.calibrate(encoder, calib, recipe)
    q_test = _embed(bert, qenc, ids_test)
    pred = (((q_test - mu) / sd) @ w + b).argmax(-1)
    acc = float(np.mean(pred == y_test))
    cos = np.mean(np.sum(q_test * f_test, -1) / (np.linalg.norm(q_test, axis=-1)
                                                 * np.linalg.norm(f_test, axis=-1)))
    rows.append((name, acc, f'{100 * (acc - float_acc):+.2f}',
                 f'{100 * np.mean(pred == float_pred):.2f}', f'cosine {cos:.4f}'))
  return (f'all-MiniLM-L6-v2 (frozen) + float-fitted linear probe, fortunes topics '
          f'({len(ids_test)} test texts, max_len {args.max_len}), calibration 10 × 32 texts\n\n'
          + _table(rows, 'probe accuracy'))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  p.add_argument('--model', choices=('vit', 'minilm'), required=True)
  p.add_argument('--task', default='fashion_mnist', choices=('fashion_mnist', 'digits'))
  p.add_argument('--epochs', type=int, default=2)
  p.add_argument('--steps', type=int, default=0, help='train steps (overrides --epochs)')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--lr', type=float, default=1e-3)
  p.add_argument('--train', type=int, default=2000, help='minilm: probe training texts')
  p.add_argument('--test', type=int, default=10000, help='held-out examples (at most)')
  p.add_argument('--max-len', type=int, default=64)
  p.add_argument('--baselines', action='store_true', help="also the paper's baseline rows")
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args()
  print(f'# FQ-ViT PTQ benchmark — jax {jax.__version__}, {jax.devices()[0].platform}, '
        f'{platform.processor() or platform.machine()}\n')
  print(run_vit(args) if args.model == 'vit' else run_minilm(args))


if __name__ == '__main__':
  main()
