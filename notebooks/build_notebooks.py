"""Generates the teaching notebooks (`notebooks/*.ipynb`) from the cells written below.

The notebooks are committed without outputs; this script is their source of
truth, so a review reads Python strings instead of JSON, and
`tests/notebooks_test.py` checks that the committed files equal what it
generates (rerun it after any edit: `python notebooks/build_notebooks.py`).

| notebook                      | cells defined in   |
|-------------------------------|--------------------|
| `01_quickstart.ipynb`         | `quickstart`       |
| `02_formats_and_rounding.ipynb` | `formats_and_rounding` |
| `03_train_and_compare.ipynb`  | `train_and_compare` |
| `04_transformers_int4.ipynb`  | `transformers_int4` |
| `05_fq_vit_ptq.ipynb`         | `fq_vit_ptq`       |
| `06_gpu_kernels.ipynb`        | `gpu_kernels`      |

Every notebook starts with an introduction, an install cell (runs only where
`qtrain` is not importable, e.g. on Colab) and a setup cell that seeds every
generator and reads the `QTRAIN_NOTEBOOK_SMALL=1` switch (CI: smaller sizes,
same code path).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

import nbformat

__all__ = ['NOTEBOOKS', 'build', 'render', 'main']

HERE = os.path.dirname(os.path.abspath(__file__))

INSTALL = '''\
# Installs qtrain where it is not importable (a fresh Colab runtime); does nothing otherwise.
# The URL is a placeholder until qtrain is published: from a local checkout run
# `pip install -e .` (or `pip install -e '.[dev]'`) in the repository root instead.
try:
  import qtrain
except ImportError:
  !pip install -q git+https://github.com/qtrain/qtrain
  import qtrain'''

SETUP = '''\
%matplotlib inline
import os
import random

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import qtrain

# QTRAIN_NOTEBOOK_SMALL=1 (set by CI) shrinks steps and sizes; the code path is the same.
SMALL = os.environ.get('QTRAIN_NOTEBOOK_SMALL', '0') == '1'
SEED = 0
random.seed(SEED)
np.random.seed(SEED)
key = jax.random.key(SEED)
print(f'qtrain {qtrain.__version__}, jax {jax.__version__}, backend {jax.default_backend()}, '
      f'SMALL={SMALL}')'''


def _md(text: str) -> nbformat.NotebookNode:
  return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip('\n'))


def _code(text: str) -> nbformat.NotebookNode:
  return nbformat.v4.new_code_cell(textwrap.dedent(text).strip('\n'))


def _header(title_md: str, extra_setup: str = '') -> list:
  setup = SETUP + ('\n' + textwrap.dedent(extra_setup).strip('\n') if extra_setup else '')
  return [_md(title_md), _code(INSTALL), _code(setup)]


# ---------------------------------------------------------------------------
# 01 quick start
# ---------------------------------------------------------------------------
def quickstart() -> list:
  return _header('''
  # qtrain quick start: quantized tensors, a quantized `dot_general`, a quantized Flax model

  **Fully quantized training (FQT)** runs every GEMM of a network on low-bit operands: the
  forward GEMM `Y = X·W` *and* the two backward GEMMs `dX = dY·Wᵀ` and `dW = Xᵀ·dY`. qtrain
  implements the numerics of eight FQT papers as small parts that compose:

  1. `qtrain.quantize` / `dequantize` / `fake_quant`: a float tensor to integer or
     minifloat *codes* times a *scale*, and back;
  2. `qtrain.dot_general`: `jax.lax.dot_general` plus a `DotConfig` that says how each of the
     six operands of the three GEMMs is quantized (one `jax.custom_vjp`);
  3. `qtrain.quantize_model`: puts that `dot_general` into the layers of an unmodified Flax
     model (NNX or Linen), selected by rules on module paths.

  The formats in this notebook come from the papers: INT8/INT4 (all forward passes), the
  radix-2 logarithmic FP4 of LUQ (Chmiel et al., *Accurate Neural Training with 4-bit Matrix
  Multiplications at Standard Formats*, ICLR 2023, arXiv:2112.10769) and the radix-4 FP4 of
  Sun et al. (*Ultra-Low Precision 4-bit Training of Deep Neural Networks*, NeurIPS 2020),
  next to the OCP FP8/FP4 minifloats.
  ''') + [
      _md('''
      ## 1. Quantize and dequantize a tensor in each format

      A format lists the values a code can take (`fmt.values()`, in *code units*). `quantize`
      picks a scale (absmax by default: `max|x|` maps to the largest code), rounds `x / scale`
      onto the grid (round-to-nearest-even by default) and returns a `QArray`: the codes in the
      smallest dtype that holds them exactly, the scale, and the format.
      '''),
      _code('''
      F = qtrain.formats
      FORMATS = [F.INT8, F.INT4, F.FP8_E4M3, F.FP8_E5M2, F.FP4_E2M1, F.LOG2_FP4, F.LOG4_FP4]

      x = jax.random.normal(jax.random.fold_in(key, 1), (4096,))
      print(f"{'format':<10}{'codes':>6}{'storage':>15}{'scale':>11}{'rel. RMS error':>16}")
      for fmt in FORMATS:
        q = qtrain.quantize(x, fmt)
        err = jnp.sqrt(jnp.mean((qtrain.dequantize(q) - x) ** 2) / jnp.mean(x ** 2))
        print(f'{fmt.name:<10}{len(fmt.values()):>6}{str(q.codes.dtype):>15}'
              f'{float(q.scale[0]):>11.4g}{float(err):>16.4f}')

      q = qtrain.quantize(x[:6], F.INT4)
      print('\\nx         ', np.round(np.asarray(x[:6]), 3))
      print('INT4 codes', np.asarray(q.codes), ' scale', float(q.scale[0]))
      print('dequantized', np.round(np.asarray(qtrain.dequantize(q)), 3))
      '''),
      _md('''
      LUQ's radix-2 log grid has 8 magnitudes `α·2^0 … α·2^7` and zero, so its `bits` reads 5
      (the official code also spends an extra code on zero). The grids, with each format's
      absmax target scaled to 1: integers are evenly spaced (good for weights and activations);
      log and minifloat grids are dense near zero and cover many octaves (good for neural
      gradients, whose magnitudes are spread over orders of magnitude).
      '''),
      _code('''
      fig, (ax_lin, ax_log) = plt.subplots(1, 2, figsize=(12, 3.8))
      for i, fmt in enumerate(FORMATS):
        v = fmt.values() / fmt.absmax_target
        ax_lin.plot(v, np.full_like(v, i), '|', ms=12)
        pos = v[v > 0]
        ax_log.plot(pos, np.full_like(pos, i), '|', ms=12)
      for ax in (ax_lin, ax_log):
        ax.set_yticks(range(len(FORMATS)), [f.name for f in FORMATS])
        ax.grid(alpha=0.3)
      ax_lin.set(title='representable values / absmax target (linear)', xlim=(-1.05, 1.05))
      ax_log.set(title='positive values (log scale)', xscale='log')
      fig.tight_layout()
      plt.show()
      '''),
      _md('''
      ## 2. The quantized `dot_general`: forward and backward rules

      A `DotConfig` holds three `MatmulConfig`s, one per GEMM, each with an `lhs` and an `rhs`
      rule. Below is LUQ's numerics: INT4 with the SAWB clip (Choi et al., 2018) for `X` and
      `W` in the forward GEMM; in both backward GEMMs the output gradient `dY` is quantized to
      the radix-2 log FP4 grid with *stochastic* rounding, and the other operand `REUSE`s the
      forward codes (no re-quantization). `share_gradient_sample=True` feeds the same
      quantized `dY` to both GEMMs, as LUQ does. Stochastic rules need a `key`.
      '''),
      _code('''
      fwd = qtrain.TensorConfig(format=F.INT4, calibration=qtrain.Sawb())
      grad = qtrain.TensorConfig(format=F.LOG2_FP4, rounding='stochastic')
      config = qtrain.DotConfig(fwd=qtrain.MatmulConfig(lhs=fwd, rhs=fwd),
                                dlhs=qtrain.MatmulConfig(lhs=grad, rhs=qtrain.REUSE),
                                drhs=qtrain.MatmulConfig(lhs=qtrain.REUSE, rhs=grad),
                                share_gradient_sample=True)
      DN = (((1,), (0,)), ((), ()))  # contract x's axis 1 with w's axis 0: x @ w

      kx, kw, kt = jax.random.split(jax.random.fold_in(key, 2), 3)
      X = jax.random.normal(kx, (64, 128))
      W = jax.random.normal(kw, (128, 32)) / np.sqrt(128)
      T = jax.random.normal(kt, (64, 32))  # a fixed "upstream gradient": loss = sum(T * Y)

      y_q = qtrain.dot_general(X, W, DN, config=config, key=jax.random.key(1))
      y_f = jax.lax.dot_general(X, W, DN)
      rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
      print(f'forward: relative error of the INT4 GEMM vs float32: {rel(y_q, y_f):.3f}')
      '''),
      _md('''
      The backward rules only act under differentiation. `jax.make_jaxpr` shows the three GEMMs
      and the dtypes of their operands: the forward and backward GEMMs run on low-bit codes
      (carried in int8 or float8 storage), and only the scales are float32.
      '''),
      _code('''
      def loss_q(x, w, k):
        return jnp.sum(T * qtrain.dot_general(x, w, DN, config=config, key=k))

      def loss_f(x, w):
        return jnp.sum(T * jax.lax.dot_general(x, w, DN))

      import jax.extend

      def gemms(jaxpr):
        """(operand dtypes, output dtype) of every dot_general in a jaxpr, sub-jaxprs included."""
        found = []
        for eqn in jaxpr.eqns:
          if eqn.primitive.name == 'dot_general':
            found.append(([str(v.aval.dtype) for v in eqn.invars], str(eqn.outvars[0].aval.dtype)))
          for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += gemms(sub)
        return found

      jaxpr = jax.make_jaxpr(jax.grad(loss_q, argnums=(0, 1)))(X, W, jax.random.key(1)).jaxpr
      for operands, out in gemms(jaxpr):
        print(f'dot_general {operands[0]:>14} x {operands[1]:<14} -> {out}')
      '''),
      _md('''
      Stochastic rounding makes the quantized gradient an *unbiased* estimate: averaged over
      keys, it converges to the gradient of the same forward pass with an exact backward. To
      see it, keep the forward GEMM float (`fwd=MatmulConfig()`) and average `dW` over more
      and more keys: the error of the mean falls like `1/√n`.
      '''),
      _code('''
      grad_only = qtrain.DotConfig(dlhs=qtrain.MatmulConfig(lhs=grad, rhs=qtrain.REUSE),
                                   drhs=qtrain.MatmulConfig(lhs=qtrain.REUSE, rhs=grad),
                                   share_gradient_sample=True)
      dw_exact = jax.grad(loss_f, argnums=1)(X, W)

      @jax.jit
      def dw_samples(keys):
        f = lambda k: jax.grad(lambda w: jnp.sum(
            T * qtrain.dot_general(X, w, DN, config=grad_only, key=k)))(W)
        return jax.vmap(f)(keys)

      n_max = 64 if SMALL else 512
      samples = dw_samples(jax.random.split(jax.random.fold_in(key, 3), n_max))
      ns = [n for n in (1, 4, 16, 64, 256, 512) if n <= n_max]
      errs = [rel(samples[:n].mean(0), dw_exact) for n in ns]
      for n, e in zip(ns, errs):
        print(f'mean of {n:>3} LUQ gradients: relative error {e:.4f}')
      plt.figure(figsize=(5, 3.5))
      plt.loglog(ns, errs, 'o-', label='measured')
      plt.loglog(ns, errs[0] / np.sqrt(ns), 'k--', label='1/√n')
      plt.xlabel('keys averaged'); plt.ylabel('relative error of mean dW'); plt.legend()
      plt.grid(alpha=0.3); plt.show()
      '''),
      _md('''
      ## 3. `quantize_model` on a Flax NNX model, with a jit-compiled train step

      `quantize_model(model, rules)` walks an NNX model and replaces the matmul hook of every
      matched layer (`Linear.dot_general`, `Conv.conv_general_dilated`, ...) in place. Rules
      match module paths with `re.fullmatch`; the first match wins and `config=None` keeps a
      layer float (most papers keep the first and last layers in high precision). Keys for
      stochastic rounding come from the model's own `'quant'` RNG stream, so the train step is
      an ordinary `nnx.jit` function. Data: scikit-learn's 8×8 digits (ships with the wheel).
      '''),
      _code('''
      import optax
      from flax import nnx
      from sklearn.datasets import load_digits

      digits = load_digits()
      xs = (digits.data / 16.0).astype(np.float32)
      ys = digits.target.astype(np.int32)
      perm = np.random.default_rng(SEED).permutation(len(xs))
      test, train = perm[:360], perm[360:]
      (x_train, y_train), (x_test, y_test) = (xs[train], ys[train]), (xs[test], ys[test])
      STEPS = 60 if SMALL else 400

      class MLP(nnx.Module):
        def __init__(self, *, rngs: nnx.Rngs):
          self.hidden1 = nnx.Linear(64, 128, rngs=rngs)
          self.hidden2 = nnx.Linear(128, 128, rngs=rngs)
          self.head = nnx.Linear(128, 10, rngs=rngs)

        def __call__(self, x):
          x = nnx.relu(self.hidden1(x))
          x = nnx.relu(self.hidden2(x))
          return self.head(x)

      def loss_fn(model, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

      @nnx.jit
      def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

      @nnx.jit
      def accuracy(model, x, y):
        return jnp.mean(jnp.argmax(model(x), -1) == y)

      def fit(model, steps=STEPS, seed=SEED):
        optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
        rng = np.random.default_rng(seed)  # the same batches for every model
        losses = []
        for _ in range(steps):
          idx = rng.integers(0, len(x_train), 64)
          losses.append(float(train_step(model, optimizer, x_train[idx], y_train[idx])))
        return losses, float(accuracy(model, x_test, y_test))
      '''),
      _code('''
      rules = [qtrain.QuantRule(module_path='head', config=None),      # keep the classifier float
               qtrain.QuantRule(config=qtrain.presets.int4())]         # INT4 SAWB fwd, LUQ bwd
      model, report = qtrain.quantize_model(MLP(rngs=nnx.Rngs(SEED)), rules,
                                            rngs=nnx.Rngs(quant=SEED + 1), return_report=True)
      print(report)

      results = {}
      for name, m in [('float32', MLP(rngs=nnx.Rngs(SEED))), ('int4 (LUQ numerics)', model)]:
        results[name] = fit(m)  # same init (seed), same batches
        print(f'{name:<20} test accuracy {100 * results[name][1]:.2f}%')

      plt.figure(figsize=(6, 3.5))
      for name, (losses, _) in results.items():
        plt.plot(np.convolve(losses, np.ones(10) / 10, mode='valid'), label=name)
      plt.xlabel('step'); plt.ylabel('training loss (10-step mean)'); plt.yscale('log')
      plt.legend(); plt.grid(alpha=0.3); plt.show()
      '''),
      _md('''
      ## 4. The same with Linen

      For a Linen module `quantize_model` returns a *copy* whose methods run under
      `nn.intercept_methods`; the parameter tree is unchanged, and the stochastic-rounding key
      comes from `apply(..., rngs={'quant': key})`: a fresh key per step.
      '''),
      _code('''
      import flax.linen as nn

      class LinenMLP(nn.Module):
        @nn.compact
        def __call__(self, x):
          x = nn.relu(nn.Dense(128, name='hidden1')(x))
          x = nn.relu(nn.Dense(128, name='hidden2')(x))
          return nn.Dense(10, name='head')(x)

      linen_model = qtrain.quantize_model(LinenMLP(), rules)
      params = linen_model.init(jax.random.key(SEED), x_train[:1])['params']
      tx = optax.adam(3e-3)
      opt_state = tx.init(params)

      @jax.jit
      def linen_step(params, opt_state, x, y, step_key):
        def loss(p):
          logits = linen_model.apply({'params': p}, x, rngs={'quant': step_key})
          return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, value

      rng = np.random.default_rng(SEED)
      for step in range(STEPS):
        idx = rng.integers(0, len(x_train), 64)
        params, opt_state, value = linen_step(params, opt_state, x_train[idx], y_train[idx],
                                              jax.random.fold_in(key, step))
      logits = linen_model.apply({'params': params}, x_test, rngs={'quant': key})
      print(f'Linen int4 MLP: final loss {float(value):.3f}, '
            f'test accuracy {100 * float(jnp.mean(jnp.argmax(logits, -1) == y_test)):.2f}%')
      print(qtrain.linen_hooks.quantization_report(linen_model, x_train[:1]))
      '''),
      _md('''
      **Next:** `02_formats_and_rounding` (why gradients need log grids and stochastic rounding),
      `03_train_and_compare` (every paper's recipe against float32 on the same data and seeds).
      A *recipe* (`qtrain.recipes.get('luq')`) bundles the rules with the paper's optimizer-side
      transforms; `qtrain.quantize_model(model, recipe)` accepts it in place of the rules.
      '''),
  ]


# ---------------------------------------------------------------------------
# 03 train and compare
# ---------------------------------------------------------------------------
def train_and_compare() -> list:
  return _header('''
  # Train and compare: every recipe against float32 on the same data, seeds and budget

  `qtrain.compare` is the `qtrain compare` command as a Python function: it trains float32
  and each recipe from the **same initialisation on the same batches** (per seed), evaluates
  them on the test split and reports **Δ vs float32**, paired by seed, next to the
  degradation each paper reports *for its own setting* (ImageNet-scale models: for
  orientation, not as a target). The recipes (`qtrain.recipes`):

  | recipe | paper |
  |---|---|
  | `int8`, `int4` | baselines: INT8 absmax + SR gradients; INT4 SAWB + LUQ gradients |
  | `luq` | Chmiel et al., *Accurate Neural Training with 4-bit Matrix Multiplications at Standard Formats*, ICLR 2023 |
  | `ultra_low` | Sun et al., *Ultra-Low Precision 4-bit Training of Deep Neural Networks*, NeurIPS 2020 |
  | `unified_int8` | Zhu et al., *Towards Unified INT8 Training for Convolutional Neural Network*, CVPR 2020 |
  | `da_int8` | Zhao et al., *Distribution Adaptive INT8 Quantization for Training CNNs*, AAAI 2021 |
  | `wageubn` | Yang et al., *Training High-Performance and Large-Scale Deep Neural Networks with Full 8-bit Integers*, Neural Networks 2020 |
  ''', extra_setup='''
  import tempfile
  from IPython.display import Image, Markdown, display
  ''') + [
      _code('''
      for entry in qtrain.recipes.registered():
        print(f'{entry.name:<13} forward: {entry.forward}')
        print(f'{"":<13} backward: {entry.backward}')
      '''),
      _md('''
      ## Run the comparison on digits

      LeNet with BatchNorm on scikit-learn's 8×8 digits (nothing to download). With
      `SMALL` (CI) the budget is tiny, so the numbers only show that everything runs; the full
      setting (3 seeds, 10 epochs, as `make compare`) takes a few minutes on a CPU.
      '''),
      _code('''
      RECIPES = ['luq'] if SMALL else [
          'int8', 'int4', 'luq', 'ultra_low', 'unified_int8', 'da_int8', 'wageubn']
      settings = dict(task='digits', recipes=RECIPES,
                      epochs=1 if SMALL else 10, seeds=(0,) if SMALL else (0, 1, 2),
                      limit=256 if SMALL else None)
      out_dir = tempfile.mkdtemp(prefix='qtrain-compare-')
      comparison = qtrain.compare.compare(**settings, out_dir=out_dir, overwrite=True,
                                          progress=False)
      print(f'{comparison.task} / {comparison.model}: {comparison.seconds:.0f} s')
      display(Markdown(qtrain.compare.format_table(comparison)))
      '''),
      _md('''
      `compare` also writes `report.md`, `results.json` and two plots to `out_dir`. The loss
      curves (mean over seeds) and Δ vs float32 with the paper's reported Δ (red diamonds):
      '''),
      _code('''
      display(Image(os.path.join(out_dir, 'loss.png')), Image(os.path.join(out_dir, 'delta.png')))
      '''),
      _md('''
      The `Comparison` object carries every run (`comparison.runs`: losses, evaluations,
      timings), so you can plot anything else. Here each recipe's Δ per seed, to see how much of
      a difference is seed noise:
      '''),
      _code('''
      %matplotlib inline
      rows = [r for r in comparison.rows if r.baseline]
      by_label = {r.recipe: r for r in comparison.rows}
      fig, ax = plt.subplots(figsize=(7, 3.5))
      for i, r in enumerate(rows):
        base = np.asarray(by_label[r.baseline].metrics)
        deltas = 100 * (np.asarray(r.metrics) - base)
        ax.plot(np.full_like(deltas, i), deltas, 'o', alpha=0.7)
        reported = qtrain.recipes.info(r.recipe).reported
        print(f'{r.recipe:<13} Δ = {r.delta_pp:+.2f} pp'
              + (f' ± {r.delta_std_pp:.2f}' if r.delta_std_pp is not None else '')
              + (f';  paper: {reported[0].delta_pp:+.2f} pp ({reported[0].model}, '
                 f'{reported[0].dataset})' if reported else ''))
      ax.axhline(0, color='k', lw=0.8)
      ax.set_xticks(range(len(rows)), [r.recipe for r in rows], rotation=30, ha='right')
      ax.set(ylabel='Δ test accuracy vs fp32 (pp), per seed')
      ax.grid(alpha=0.3, axis='y'); fig.tight_layout(); plt.show()
      '''),
      _md('''
      ## Fashion-MNIST, when it is installed

      Fashion-MNIST is read from local files (Debian's `dataset-fashion-mnist`, or
      `data_dir=`); it is not downloaded. The cell skips itself when the files are missing
      (as on Colab unless you copy them).
      '''),
      _code('''
      try:
        qtrain.tasks.get('fashion_mnist').load(limit=1)
        have_fashion = True
      except (FileNotFoundError, OSError, ValueError) as e:
        have_fashion = False
        print('Fashion-MNIST not found, skipping:', str(e).splitlines()[0])
      if have_fashion:
        fashion = qtrain.compare.compare(
            task='fashion_mnist', recipes=['int8'] if SMALL else RECIPES,
            epochs=1 if SMALL else 3, seeds=(0,), limit=128 if SMALL else None, progress=False)
        display(Markdown(qtrain.compare.format_table(fashion)))
      '''),
      _md('''
      **Reading the table.** Δ is paired: recipe minus float32 *on the same seed*, then mean ±
      sample standard deviation over seeds. Recipes that bring their own optimizer (WAGEUBN's
      SGD with a quantized learning rate) are compared with float32 *on that optimizer* (the
      `fp32-<name>-opt` row), so Δ isolates quantization. The papers' Δ come from ImageNet or
      CIFAR-scale models; small CNNs on 8×8 digits are more forgiving, and differences within
      the ± are seed noise.
      '''),
  ]


# ---------------------------------------------------------------------------
# 02 formats and rounding
# ---------------------------------------------------------------------------
def formats_and_rounding() -> list:
  return _header('''
  # Formats and rounding for neural gradients

  Weights and activations are well served by INT8/INT4 grids with round-to-nearest. The
  *output gradients* `dY` of the backward pass are different: their magnitudes span many
  octaves and a few rows (samples) dominate. This notebook shows, on real gradients of a
  small MLP trained on digits, the choices the papers made:

  * **grids** — INT4 vs the radix-2 log FP4 of LUQ (Chmiel et al., ICLR 2023,
    arXiv:2112.10769, §4) vs the radix-4 FP4 of Ultra-low (Sun et al., NeurIPS 2020, §3);
  * **rounding** — round-to-nearest (RTN) is biased, stochastic rounding (SR) is unbiased
    (LUQ §4; Zhu et al., *Unified INT8*, CVPR 2020; Chen et al., *StatQuant*, NeurIPS 2020);
  * **LUQ's stochastic underflow** below the smallest level α, and **SMP** (averaging
    several samples, LUQ §5.1);
  * **StatQuant's framework** (Chen et al., *A Statistical Framework for Low-bitwidth
    Training of Deep Neural Networks*, NeurIPS 2020, arXiv:2010.14298): an unbiased
    quantized gradient is harmless when its *quantization variance* is small against the
    minibatch *sampling variance*; per-sample (PSQ) and block-Householder (BHQ) quantizers
    cut that variance when the rows of `dY` are skewed.
  ''', extra_setup='''
  import optax
  from flax import nnx
  from sklearn.datasets import load_digits

  F = qtrain.formats
  ''') + [
      _md('''
      ## Real neural gradients

      A 64-128-128-10 MLP in plain JAX, trained briefly in float32. Zero "probes" added to
      each pre-activation make `jax.grad` return the neural gradients `dY` of both hidden
      layers (one row per sample), exactly the tensors a quantized backward GEMM sees.
      '''),
      _code('''
      digits = load_digits()
      xs = (digits.data / 16.0).astype(np.float32)
      ys = digits.target.astype(np.int32)

      def init(k):
        k1, k2, k3 = jax.random.split(k, 3)
        he = lambda k, m, n: jax.random.normal(k, (m, n)) * np.sqrt(2 / m)
        return {'w1': he(k1, 64, 128), 'b1': jnp.zeros(128), 'w2': he(k2, 128, 128),
                'b2': jnp.zeros(128), 'w3': he(k3, 128, 10), 'b3': jnp.zeros(10)}

      def forward(p, x, probes):
        h1 = jax.nn.relu(x @ p['w1'] + p['b1'] + probes[0])
        h2 = jax.nn.relu(h1 @ p['w2'] + p['b2'] + probes[1])
        return h2 @ p['w3'] + p['b3'], (x, h1)

      def loss(p, x, y, probes):
        logits, inputs = forward(p, x, probes)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), inputs

      params = init(key)
      tx = optax.adam(3e-3)
      opt_state = tx.init(params)
      zeros = lambda n: (jnp.zeros((n, 128)), jnp.zeros((n, 128)))

      @jax.jit
      def step(params, opt_state, x, y):
        (value, _), g = jax.value_and_grad(loss, has_aux=True)(params, x, y, zeros(len(x)))
        updates, opt_state = tx.update(g, opt_state)
        return optax.apply_updates(params, updates), opt_state, value

      rng = np.random.default_rng(SEED)
      for i in range(100 if SMALL else 300):
        idx = rng.integers(0, len(xs), 64)
        params, opt_state, value = step(params, opt_state, xs[idx], ys[idx])

      idx = rng.integers(0, len(xs), 128)
      (_, (x_in, h1)), (dy1, dy2) = jax.value_and_grad(loss, argnums=3, has_aux=True)(
          params, xs[idx], ys[idx], zeros(128))
      G, H = dy2, h1  # layer 2: dW2 = H^T G, the GEMM whose dY we quantize below
      print(f'training loss {float(value):.3f}; dY of layer 2: shape {G.shape}, '
            f'max|dY| {float(jnp.abs(G).max()):.2e}, median|dY| {float(jnp.median(jnp.abs(G))):.2e}')
      '''),
      _md('''
      ## 1. Three 4-bit grids on a gradient histogram

      Histogram of `log2(|dY| / max|dY|)` with each format's nonzero levels (absmax scaling:
      the largest level sits at `max|dY|`). INT4's 7 magnitudes cover under 3 octaves, so most
      gradient entries fall below its smallest level; the log grids reach 7 (radix 2) and 12
      (radix 4) octaves down.
      '''),
      _code('''
      g = np.asarray(jnp.abs(G)).ravel()
      g = g[g > 0] / g.max()
      grids = {'INT4': F.INT4, 'radix-2 log FP4 (LUQ)': F.LOG2_FP4,
               'radix-4 FP4 (Ultra-low)': F.LOG4_FP4}
      fig, axes = plt.subplots(3, 1, figsize=(9, 6.5), sharex=True)
      for ax, (name, fmt) in zip(axes, grids.items()):
        levels = fmt.values()[fmt.values() > 0] / fmt.absmax_target
        ax.hist(np.log2(g), bins=80, color='0.7')
        for v in np.log2(levels):
          ax.axvline(v, color='tab:red', lw=1)
        below = np.mean(g < levels.min())
        ax.set_title(f'{name}: {len(levels)} magnitudes; {100 * below:.1f}% of |dY| below the '
                     'smallest', fontsize=10)
      axes[-1].set_xlabel('log2(|dY| / max|dY|)')
      fig.tight_layout(); plt.show()
      '''),
      _md('''
      ## 2. Round-to-nearest is biased, stochastic rounding is not

      Quantize `dY` and form the weight gradient `dW = Hᵀ·Q(dY)`. With RTN every key gives the
      same answer, so its error never averages out (a **bias**). With SR each key gives a
      different, unbiased answer: the error of the mean over `n` keys falls like `1/√n`.
      '''),
      _code('''
      dw_exact = H.T @ G
      rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
      n_keys = 32 if SMALL else 256
      keys = jax.random.split(jax.random.fold_in(key, 1), n_keys)
      ns = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if n <= n_keys]

      fig, ax = plt.subplots(figsize=(6.5, 4))
      print(f"{'grid':<26}{'RTN error':>10}{'SR error (1 key)':>18}{f'SR mean of {n_keys}':>16}")
      for (name, fmt), color in zip(grids.items(), ('tab:blue', 'tab:orange', 'tab:green')):
        rtn = qtrain.fake_quant(G, qtrain.TensorConfig(format=fmt))
        sr_cfg = qtrain.TensorConfig(format=fmt, rounding='stochastic')
        sr = jax.vmap(lambda k: H.T @ qtrain.fake_quant(G, sr_cfg, key=k))(keys)
        means = np.cumsum(np.asarray(sr), axis=0) / np.arange(1, n_keys + 1)[:, None, None]
        errs = [rel(means[n - 1], dw_exact) for n in ns]
        ax.loglog(ns, errs, 'o-', color=color, label=f'{name}, SR')
        ax.axhline(rel(H.T @ rtn, dw_exact), color=color, ls='--', label=f'{name}, RTN')
        print(f'{name:<26}{rel(H.T @ rtn, dw_exact):>10.3f}{errs[0]:>18.3f}{errs[-1]:>16.3f}')
      ax.set(xlabel='keys averaged', ylabel='relative error of dW'); ax.grid(alpha=0.3)
      ax.legend(fontsize=7); plt.show()
      '''),
      _md('''
      ## 3. LUQ's stochastic underflow

      LUQ sets its smallest level to `α = max|x| / 2^7` and quantizes anything below it to 0
      or `±α` with probabilities that keep the expectation (`qtrain.numerics.luq`). RTN on the
      same grid maps `|x| < α/2` to zero (gradient lost) and `[α/2, α)` up to α. The mean of
      many samples as a function of `x` shows it: LUQ's is the identity, RTN's a staircase.
      '''),
      _code('''
      from qtrain import numerics

      top = 128.0  # one element fixes max|x| = 128, so alpha = 128 / 2^7 = 1
      xs_small = jnp.linspace(0.0, 4.0, 161)
      x = jnp.concatenate([jnp.array([top]), xs_small])
      n_mc = 200 if SMALL else 2000
      luq_mean = jax.vmap(lambda k: numerics.luq(x, k))(
          jax.random.split(jax.random.fold_in(key, 2), n_mc)).mean(0)[1:]
      rtn = qtrain.fake_quant(x, F.LOG2_FP4)[1:]
      plt.figure(figsize=(6, 4))
      plt.plot(xs_small, xs_small, 'k:', label='x')
      plt.plot(xs_small, rtn, label='round-to-nearest on the log grid')
      plt.plot(xs_small, luq_mean, label=f'LUQ, mean of {n_mc} samples')
      plt.xlabel('x (units of α)'); plt.ylabel('E[Q(x)]'); plt.legend(); plt.grid(alpha=0.3)
      plt.show()
      alpha = float(jnp.abs(G).max()) / 2 ** 7
      print(f'real dY: {100 * float(jnp.mean(jnp.abs(G) < alpha)):.1f}% of the entries lie below α '
            f'(max bias of the LUQ mean here: {float(jnp.abs(luq_mean - xs_small).max()):.3f}α, '
            f'Monte Carlo noise; RTN: {float(jnp.abs(rtn - xs_small).max()):.3f}α)')
      '''),
      _md('''
      ## 4. SMP: averaging samples divides the variance

      LUQ's SMP (`samples=s`) averages `s` independent quantizations of the same tensor;
      the variance of an average of independent unbiased samples is the single-sample variance
      over `s`. In a GEMM each sample costs one low-bit GEMM.
      '''),
      _code('''
      def quant_variance(fn, n=16 if SMALL else 64):
        keys = jax.random.split(jax.random.fold_in(key, 3), n)
        q = jax.vmap(fn)(keys)
        return float(jnp.mean(jnp.sum((q - G) ** 2, axis=(1, 2))))

      sizes = [1, 2, 4, 8]
      var = [quant_variance(lambda k, s=s: numerics.luq(G, k, samples=s)) for s in sizes]
      for s, v in zip(sizes, var):
        print(f'samples={s}: E||Q(dY) - dY||² = {v:.3e}  (ratio to samples=1: {v / var[0]:.3f}, '
              f'theory {1 / s:.3f})')
      plt.figure(figsize=(5, 3.5))
      plt.loglog(sizes, var, 'o-', label='measured'); plt.loglog(sizes, var[0] / np.array(sizes),
                                                                 'k--', label='var / s')
      plt.xlabel('samples s'); plt.ylabel('quantization variance'); plt.legend()
      plt.grid(alpha=0.3); plt.show()
      '''),
      _md('''
      ## 5. PTQ, PSQ and BHQ on a skewed gradient (StatQuant)

      StatQuant's quantizers all use SR on a min/max grid of `2^b − 1` bins; they differ in
      *which* elements share a range. **PTQ**: one range per tensor. **PSQ**: one per row
      (sample), so a row with tiny gradients gets a fine grid. **BHQ**: a block Householder
      transform first spreads each large row over a group of small ones, then PSQ. Their
      variance is what matters (all three are unbiased). The rows of a real `dY` are skewed:
      well-classified samples have tiny gradients.
      '''),
      _code('''
      from qtrain import statquant

      row_norm = np.asarray(jnp.linalg.norm(G, axis=1))
      print(f'row norms of dY: max/median = {row_norm.max() / np.median(row_norm):.0f}')
      bits = 4
      quantizers = {'PTQ': statquant.ptq, 'PSQ': statquant.psq, 'BHQ': statquant.bhq}
      variances = {name: quant_variance(lambda k, f=f: f(G, k, bits=bits))
                   for name, f in quantizers.items()}
      for name, v in variances.items():
        print(f'{name}: E||Q(dY) - dY||² = {v:.3e}   ({variances["PTQ"] / v:.1f}x below PTQ)')
      fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.5))
      ax1.semilogy(np.sort(row_norm)[::-1], '.')
      ax1.set(title='row norms of dY (sorted)', xlabel='row', ylabel='‖dY_i‖')
      ax2.bar(list(variances), list(variances.values()), color=['0.6', 'tab:blue', 'tab:green'])
      ax2.set(title=f'{bits}-bit quantization variance', yscale='log')
      fig.tight_layout(); plt.show()
      '''),
      _md('''
      ### The framework's point: quantization variance vs sampling variance

      `qtrain.variance.measure_variance` splits the gradient variance of a whole model, per
      parameter, into the minibatch **sampling** variance of the QAT gradient (same forward,
      exact backward) and the **quantization** variance that the quantized backward adds. An
      FQT recipe trains like QAT while the second is small against the first. Here the
      StatQuant recipes with 4-bit gradients on an NNX version of the MLP:
      '''),
      _code('''
      from qtrain import variance
      from qtrain.recipes.papers import statquant as statquant_recipes

      class MLP(nnx.Module):
        def __init__(self, *, rngs):
          self.hidden1 = nnx.Linear(64, 128, rngs=rngs)
          self.hidden2 = nnx.Linear(128, 128, rngs=rngs)
          self.head = nnx.Linear(128, 10, rngs=rngs)

        def __call__(self, x):
          return self.head(nnx.relu(self.hidden2(nnx.relu(self.hidden1(x)))))

      mlp = MLP(rngs=nnx.Rngs(SEED))
      for name, p in (('hidden1', 'w1'), ('hidden2', 'w2'), ('head', 'w3')):  # the trained weights
        getattr(mlp, name).kernel[...] = params[p]
        getattr(mlp, name).bias[...] = params['b' + p[1]]
      mlp_loss = lambda m, x, y: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
      batches = [(xs[i:i + 64], ys[i:i + 64]) for i in range(0, (4 if SMALL else 16) * 64, 64)]
      print(f"{'recipe':<16}{'sample var':>12}{'quant var':>12}{'quant/sample':>14}")
      for kind in ('ptq', 'psq', 'bhq'):
        report = variance.measure_variance(mlp, mlp_loss, batches,
                                           statquant_recipes.statquant(kind, 4),
                                           repeats=2 if SMALL else 8)
        print(f'{report.recipe:<16}{report.sample_var:>12.3e}{report.quant_var:>12.3e}'
              f'{report.quant_var / report.sample_var:>14.3f}')
      print()
      print(report.format_table())
      '''),
  ]


# ---------------------------------------------------------------------------
# 04 INT4 transformers
# ---------------------------------------------------------------------------
def transformers_int4() -> list:
  return _header('''
  # Training transformers with 4-bit integers: Hadamard quantization, bit splitting, LSS

  Xi, Li, Chen, Zhu, *Training Transformers with 4-bit Integers*, NeurIPS 2023
  (arXiv:2306.11987) run every linear layer of a transformer on INT4:

  * **forward — Hadamard quantization (HQ, §3.3):** transformer activations have a few
    *outlier feature columns*; a per-tensor INT4 grid sized for them rounds everything else
    to zero. A block-diagonal Hadamard transform `Ĥ` along the contraction axis spreads each
    outlier over a block, and since `Ĥ` is orthogonal, `X·W = (X·Ĥ)(Ĥᵀ·W)`: both operands
    are quantized in the transformed domain (learned LSQ steps), the GEMM is unchanged;
  * **backward — bit splitting (BS, §4.1):** the output gradient `∇Y` gets an ~INT8 code
    split into two INT4 nibbles `14·hi + lo` (two INT4 GEMMs), the low one stochastically
    rounded, so the estimate is unbiased;
  * **backward — leverage-score sampling (LSS, §4.2):** gradients of transformers are
    *row-sparse* (a few tokens carry most of the gradient), so of the `2N` nibble rows only
    `N` are kept on average, with probability `∝ ‖row‖` (times `‖X̂_i‖` for `dW`) and
    reweighted by `1/p`: unbiased, at half the GEMM rows.

  In qtrain: `qtrain.hadamard` (HQ), `qtrain.bit_split` (`bit_split`, `lss`, the `BitSplitLss`
  dY rule), `qtrain.lsq_linear` (the NNX forward hook) and the `int4_transformer` recipe.
  ''', extra_setup='''
  import optax
  from flax import nnx

  from qtrain import bit_split, hadamard

  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  ''') + [
      _md('''
      ## 1. Hadamard quantization on outlier-heavy activations

      Activations `X` (tokens × features) with 4 outlier columns 40× larger than the rest, as
      measured in the LayerNorm outputs of trained transformers (Xi et al. §3.2; Dettmers et
      al., LLM.int8(), 2022), and a weight `W`. `hadamard.hadamard(x, bits=4, block=g)` is HQ
      fake quantization at LSQ's initial step; `block=1` is plain INT4 with the same grid.
      '''),
      _code('''
      N, D, C = (128, 256, 64) if SMALL else (512, 1024, 256)
      kx, kw, ko = jax.random.split(jax.random.fold_in(key, 1), 3)
      outliers = jax.random.choice(ko, D, (4,), replace=False)
      X = jax.random.normal(kx, (N, D)).at[:, outliers].multiply(40.0)
      W = jax.random.normal(kw, (D, C)) / np.sqrt(D)

      blocks = hadamard.block_candidates(D, max_block=256)
      x_err, gemm_err = [], []
      for g in blocks:
        xq = hadamard.hadamard(X, bits=4, block=g)
        wq = hadamard.hadamard(W, bits=4, block=g, axis=0)
        x_err.append(rel(xq, X))
        gemm_err.append(rel(xq @ wq, X @ W))
      best = hadamard.search_block_size(X, W, bits=4, max_block=256)
      for g, e1, e2 in zip(blocks, x_err, gemm_err):
        print(f'block {g:>4}: relative error of X {e1:.3f}, of X·W {e2:.3f}'
              + ('   <- the paper\\'s search picks this block' if g == best else ''))
      '''),
      _code('''
      fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
      xh = hadamard.block_hadamard(X, best)
      ax1.plot(np.abs(np.asarray(X)).max(0), lw=0.8, label='X')
      ax1.plot(np.abs(np.asarray(xh)).max(0), lw=0.8, label=f'X·Ĥ (block {best})')
      ax1.set(title='max |value| per feature column', xlabel='feature', yscale='log')
      ax1.legend()
      ax2.semilogx(blocks, gemm_err, 'o-', base=2)
      ax2.set(title='INT4 GEMM error vs Hadamard block', xlabel='block size g',
              ylabel='relative error of X·W')
      ax2.grid(alpha=0.3); fig.tight_layout(); plt.show()
      '''),
      _md('''
      ## 2. Bit splitting and leverage-score sampling of a row-sparse gradient

      A gradient `∇Y` whose rows (tokens) have heavy-tailed norms: most rows are tiny. BS
      quantizes it on the grid `max|∇Y|/98` with stochastic rounding, written as two INT4
      nibbles; compare with plain per-tensor INT4 SR.
      '''),
      _code('''
      kg, kr = jax.random.split(jax.random.fold_in(key, 2))
      row_scale = jnp.exp(2.0 * jax.random.normal(kr, (N, 1)))  # log-normal row norms
      G = jax.random.normal(kg, (N, C)) * row_scale
      norms = np.sort(np.asarray(jnp.linalg.norm(G, axis=1)))[::-1]
      print(f'rows holding 90% of ||∇Y||²: {np.searchsorted(np.cumsum(norms**2) / np.sum(norms**2), 0.9) + 1} of {N}')

      hi, lo, scale = bit_split.split_codes(G, jax.random.key(3))
      m = bit_split.split_multiplier(4)
      print(f'nibbles: hi in [{int(hi.min())}, {int(hi.max())}], lo in [{int(lo.min())}, '
            f'{int(lo.max())}], ∇Y ≈ ({m}·hi + lo)·{float(scale):.3g}')
      int4_sr = qtrain.TensorConfig(format=qtrain.formats.INT4, rounding='stochastic')
      print(f'one sample, relative error: INT4 SR {rel(qtrain.fake_quant(G, int4_sr, key=jax.random.key(3)), G):.3f}, '
            f'bit split {rel(bit_split.bit_split(G, jax.random.key(3)), G):.3f}')
      '''),
      _md('''
      The backward GEMMs with each rule, inside `qtrain.dot_general` (forward float here, to
      isolate the backward): the `BitSplitLss` estimator sits in both dY slots and both GEMMs
      share its codes. Over many keys the mean of `dW` converges to the exact `Xᵀ·∇Y` for every
      unbiased rule; the per-key error shows each rule's variance. LSS keeps about half of the
      `2N` nibble rows, yet on a row-sparse gradient its error grows only a little over BS alone.
      '''),
      _code('''
      DN = (((1,), (0,)), ((), ()))

      def backward_config(rule):
        return qtrain.DotConfig(dlhs=qtrain.MatmulConfig(lhs=rule, rhs=qtrain.REUSE),
                                drhs=qtrain.MatmulConfig(lhs=qtrain.REUSE, rhs=rule),
                                share_gradient_sample=True)

      rules = {'INT4 SR (per tensor)': int4_sr,
               'BS (2×INT4)': bit_split.BitSplitLss(lss=False),
               'BS + LSS': bit_split.BitSplitLss(lss=True)}
      dw_exact = X.T @ G
      n_keys = 16 if SMALL else 128
      keys = jax.random.split(jax.random.fold_in(key, 4), n_keys)
      print(f"{'rule':<22}{'1 key':>8}{f'mean of {n_keys}':>12}")
      for name, rule in rules.items():
        cfg = backward_config(rule)
        dws = jax.vmap(lambda k: jax.grad(lambda w: jnp.sum(
            G * qtrain.dot_general(X, w, DN, config=cfg, key=k)))(W))(keys)
        print(f'{name:<22}{rel(dws[0], dw_exact):>8.3f}{rel(dws.mean(0), dw_exact):>12.3f}')
      '''),
      _md('''
      `lss` alone shows the sampling: the probabilities are capped at 1 (App. A.2), so the
      largest rows are always kept and only the small ones are dropped at random.
      '''),
      _code('''
      c = jnp.linalg.norm(G, axis=1)
      p = bit_split.capped_probabilities(c, N / 4)
      kept = jax.vmap(lambda k: jnp.any(bit_split.lss(G, k, budget=N / 4) != 0, axis=1))(keys)
      order = np.argsort(-np.asarray(c))
      plt.figure(figsize=(6, 3.5))
      plt.semilogx(np.asarray(c)[order], np.asarray(p)[order], '.', label='p_i (budget N/4)')
      plt.semilogx(np.asarray(c)[order], np.asarray(kept.mean(0))[order], 'x', ms=4,
                   label=f'kept fraction over {n_keys} keys')
      plt.xlabel('‖∇Y_i‖'); plt.ylabel('keep probability'); plt.legend(); plt.grid(alpha=0.3)
      plt.show()
      '''),
      _md('''
      ## 3. A short INT4 fine-tune of a small transformer

      A small Vision Transformer (`qtrain.vit.ViT`, patches of 2×2 pixels on 8×8 digits) is
      first trained in float32; then `quantize_model(model, recipe)` applies the
      `int4_transformer` recipe: its rules put BS + LSS in the backward of every linear layer
      but the classifier, and its `prepare_model` installs the HQ + LSQ forward hooks (block
      size searched and LSQ steps initialised inside the first jitted step). We fine-tune both
      the float model and its INT4 copy for the same steps on the same batches.
      '''),
      _code('''
      from qtrain.recipes.papers import int4_transformer as int4_recipes
      from qtrain.vit import ViT

      task = qtrain.tasks.get('digits')
      data = task.load(seed=SEED)
      (x_tr, y_tr), (x_te, y_te) = data.train, data.test

      @nnx.jit
      def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: task.loss(m, (x, y))[0])(model)
        optimizer.update(model, grads)
        return loss

      @nnx.jit
      def correct(model, x, y):
        return jnp.sum(jnp.argmax(model(x), -1) == y)

      def fit(model, steps, lr, seed):
        model.train()
        optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)
        rng = np.random.default_rng(seed)  # the same batches for every model
        for _ in range(steps):
          idx = rng.integers(0, len(x_tr), 64)
          train_step(model, optimizer, x_tr[idx], y_tr[idx])
        model.eval()
        return float(correct(model, x_te, y_te)) / len(y_te)

      vit = ViT(num_classes=10, in_channels=1, image_size=8, d_model=32 if SMALL else 64,
                num_layers=1 if SMALL else 4, rngs=nnx.Rngs(SEED))
      acc = fit(vit, steps=60 if SMALL else 1500, lr=3e-3, seed=SEED)
      print(f'float32 ViT after pre-training: test accuracy {100 * acc:.2f}%')
      FT_STEPS = 15 if SMALL else 300

      recipe = int4_recipes.int4_transformer()
      int4_model, report = qtrain.quantize_model(nnx.clone(vit), recipe,
                                                 rngs=nnx.Rngs(quant=SEED), return_report=True)
      print(report)
      results = {'float32': fit(nnx.clone(vit), FT_STEPS, 1e-3, SEED + 1),
                 'INT4 (HQ + LSQ, BS + LSS)': fit(int4_model, FT_STEPS, 1e-3, SEED + 1)}
      for name, acc in results.items():
        print(f'{name:<28} test accuracy after fine-tuning {100 * acc:.2f}%')
      '''),
      _md('''
      The hooks kept their searched block sizes and learned LSQ steps as model state:
      '''),
      _code('''
      from qtrain import lsq_linear

      for path, hook in lsq_linear.hadamard_lsq_hooks(int4_model)[:6]:
        print(f'{path:<28} block {int(hook.block_size[...]):>3}  '
              f'step_x {float(hook.step_x[...]):.4f}  step_w {float(hook.step_w[...]):.4f}')
      '''),
  ]


# ---------------------------------------------------------------------------
# 05 FQ-ViT post-training quantization
# ---------------------------------------------------------------------------
def fq_vit_ptq() -> list:
  return _header('''
  # FQ-ViT: post-training quantization of a Vision Transformer

  Lin, Zhang, Sun, Chu, Gao, Zhou, *FQ-ViT: Post-Training Quantization for Fully Quantized
  Vision Transformer*, IJCAI 2022 (arXiv:2111.13824) quantize *every* op of a trained ViT
  (weights int8 per channel, activations uint8 per tensor) after training, from a few
  calibration batches. Two parts of a transformer resist plain per-tensor quantization:

  * **LayerNorm inputs** vary by orders of magnitude between channels. **Power-of-Two Factor
    (PTF)** keeps one layer-wise scale and zero point but gives channel `c` the step
    `s·2^α_c`, `α_c ∈ {0..K}`: wide channels get coarse steps, narrow ones fine steps, and
    the integer LayerNorm only needs a bit shift per channel;
  * **attention probabilities** are concentrated near 0 with a few large values. A log2
    quantizer `p̂ = 2^-q` (4 bits) keeps the small ones, and **Log-Int-Softmax (LIS)**
    computes it straight from integer logits (I-BERT's integer exp), so `p·V` becomes
    shifts.

  In qtrain: `qtrain.fq_vit` (the quantizers, observers, integer LayerNorm), `qtrain.ptq.calibrate`
  (installs them in an NNX model) and `qtrain.recipes.papers.fq_vit.fq_vit()` (the paper's settings).
  ''', extra_setup='''
  import optax
  from flax import nnx

  from qtrain import fq_vit, ptq

  rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
  ''') + [
      _md('''
      ## 1. PTF on LayerNorm inputs with inter-channel variation

      Channel ranges spread over 2^0…2^6, as FQ-ViT measures in the LayerNorm inputs of
      trained ViTs (their Fig. 2). Per-tensor uint8 MinMax gives the narrow channels a step
      larger than their whole range; PTF (K = 3) cuts their error while keeping one scale.
      '''),
      _code('''
      T, C = (256, 64) if SMALL else (1024, 192)
      kx, kr = jax.random.split(jax.random.fold_in(key, 1))
      channel_range = 2.0 ** jax.random.uniform(kr, (C,), minval=0.0, maxval=6.0)
      X = jax.random.normal(kx, (T, C)) * channel_range + 0.5 * channel_range

      x_minmax = fq_vit.minmax_quant(X, bits=8)
      x_ptf = fq_vit.ptf(X, bits=8, k=3)
      alpha = fq_vit.ptf_params(X, bits=8, k=3).alpha
      per_channel_err = lambda q: np.asarray(jnp.linalg.norm(q - X, axis=0) / jnp.linalg.norm(X, axis=0))
      print(f'relative error: per-tensor MinMax {rel(x_minmax, X):.4f}, PTF {rel(x_ptf, X):.4f}')
      print(f'median per-channel relative error: MinMax {np.median(per_channel_err(x_minmax)):.4f}, '
            f'PTF {np.median(per_channel_err(x_ptf)):.4f}')

      order = np.argsort(np.asarray(channel_range))
      fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
      ax1.semilogy(per_channel_err(x_minmax)[order], '.', label='per-tensor MinMax')
      ax1.semilogy(per_channel_err(x_ptf)[order], '.', label='PTF (K=3)')
      ax1.set(title='relative error per channel', xlabel='channel (sorted by range)'); ax1.legend()
      ax2.plot(np.asarray(channel_range)[order], np.asarray(alpha)[order], 'o')
      ax2.set(xscale='log', title='PTF factor α per channel', xlabel='channel range', ylabel='α')
      fig.tight_layout(); plt.show()
      '''),
      _md('''
      ## 2. Log-Int-Softmax on attention

      Attention logits of 4 heads over `L` tokens, quantized to uint8 (the input LIS sees).
      Four ways to get 4-bit probabilities: a uniform uint4 grid on `p`, the float log2
      quantizer, and LIS (integer softmax straight to log2 codes). Read both columns: a uniform
      grid spends its 15 levels on the few large probabilities that dominate `P·V` and zeros
      nearly all the others; the log2 grid keeps most small probabilities (coarser near 1), and
      makes `P·V` a sum of shifts. FQ-ViT chose log2 by accuracy (its ablation, Table 4), and LIS
      stays within one code of the float log2 quantizer.
      '''),
      _code('''
      L = 64 if SMALL else 197
      kl, kv = jax.random.split(jax.random.fold_in(key, 2))
      logits = 3.0 * jax.random.normal(kl, (4, L, L))
      V = jax.random.normal(kv, (4, L, 32))
      s = float(logits.max() - logits.min()) / 255  # uint8 logits: x = s · integer
      logits_q = jnp.round(logits / s) * s
      P = jax.nn.softmax(logits_q, axis=-1)
      candidates = {
          'uniform uint4': fq_vit.minmax_quant(P, bits=4),
          'log2 4-bit (float)': fq_vit.log2_quant(P, bits=4),
          'LIS 4-bit (integer)': fq_vit.log_int_softmax(logits_q, s, bits=4),
      }
      out = P @ V
      for name, p_hat in candidates.items():
        zero = float(jnp.mean((p_hat == 0) & (P > 0)))
        print(f'{name:<22} error of P·V {rel(p_hat @ V, out):.3f};  '
              f'{100 * zero:.1f}% of nonzero probabilities became 0')

      plt.figure(figsize=(7, 3.5))
      p = np.asarray(P).ravel()
      plt.hist(np.log2(p[p > 0]), bins=100, color='0.7', label='probabilities')
      for q in range(16):
        plt.axvline(-q, color='tab:red', lw=0.8, label='log2 4-bit levels' if q == 0 else None)
      plt.axvline(np.log2(1 / 15), color='tab:blue', lw=1.5, label='smallest uniform uint4 level')
      plt.xlabel('log2 p'); plt.legend(fontsize=8); plt.show()
      '''),
      _md('''
      ## 3. Post-training quantization of a small ViT

      Train a float ViT on digits, then `ptq.calibrate(model, batches, recipe)`: a float copy
      runs the calibration batches with observers at every site (Linear inputs, Q/K/V, logits,
      LayerNorm inputs), and a second copy gets the quantized layers with the calibrated,
      fixed scales. Compare the paper's 8/8/4 setting (PTF + LIS) with plain MinMax
      quantization (no PTF, float softmax then a uniform 4-bit grid) and 8/8/8.
      '''),
      _code('''
      from qtrain.recipes.papers import fq_vit as fq_vit_recipes
      from qtrain.vit import ViT

      task = qtrain.tasks.get('digits')
      data = task.load(seed=SEED)
      (x_tr, y_tr), (x_te, y_te) = data.train, data.test

      @nnx.jit
      def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: task.loss(m, (x, y))[0])(model)
        optimizer.update(model, grads)
        return loss

      def accuracy(model):
        logits = nnx.jit(lambda m, x: m(x))(model, x_te)
        return float(jnp.mean(jnp.argmax(logits, -1) == y_te))

      vit = ViT(num_classes=10, in_channels=1, image_size=8, d_model=32 if SMALL else 64,
                num_layers=1 if SMALL else 4, rngs=nnx.Rngs(SEED))
      optimizer = nnx.Optimizer(vit, optax.adam(3e-3), wrt=nnx.Param)
      rng = np.random.default_rng(SEED)
      for _ in range(100 if SMALL else 1500):
        idx = rng.integers(0, len(x_tr), 64)
        train_step(vit, optimizer, x_tr[idx], y_tr[idx])
      vit.eval()
      float_acc = accuracy(vit)
      print(f'float32 ViT: test accuracy {100 * float_acc:.2f}%')
      '''),
      _code('''
      # The paper calibrates on 10 batches of 100 training images (here fewer for SMALL).
      calib = [x_tr[i:i + 100] for i in range(0, (2 if SMALL else 10) * 100, 100)]
      recipes = [fq_vit_recipes.fq_vit(), fq_vit_recipes.fq_vit(ptf=False, lis=False)]
      if not SMALL:
        recipes += [fq_vit_recipes.fq_vit(8), fq_vit_recipes.fq_vit(8, ptf=False, lis=False)]
      print(f"{'recipe':<24}{'test acc (%)':>13}{'Δ vs float (pp)':>17}")
      print(f"{'float32':<24}{100 * float_acc:>13.2f}{'':>17}")
      reports = {}
      for recipe in recipes:
        result = ptq.calibrate(vit, calib, recipe)
        reports[recipe.name] = result.report
        acc = accuracy(result.model)
        print(f'{recipe.name:<24}{100 * acc:>13.2f}{100 * (acc - float_acc):>+17.2f}')
      print()
      print(recipes[0])
      print(reports[recipes[0].name])
      '''),
      _md('''
      Each calibrated model is an ordinary NNX module (its scales are `ptq.PtqParam` variables,
      invisible to an optimizer), so it runs under `nnx.jit` like the float one. The paper's
      numbers (its Table 2) are for ImageNet DeiT, ViT and Swin models; this tiny model on 8×8
      digits only shows the mechanics. Nothing is trained here, so `qtrain compare` does not
      apply.
      '''),
  ]


# ---------------------------------------------------------------------------
# 06 GPU kernels
# ---------------------------------------------------------------------------
def gpu_kernels() -> list:
  return _header('''
  # GPU kernels: low-bit GEMMs and fused quantizers in Pallas (Mosaic GPU, Hopper)

  `pallas_kernels` holds the GPU side of qtrain, written in Pallas for Mosaic GPU (NVIDIA
  Hopper, sm_90: H100/H200):

  | module | kernel |
  |---|---|
  | `int8_matmul` | int8 × int8 → int32 wgmma GEMM, per-tensor/row/column scales applied in the epilogue |
  | `fp8_matmul` | 4-bit codes carried exactly as e4m3/e5m2, FP8 wgmma → float32 (Hopper has no FP4 tensor-core type) |
  | `quantize` | fused absmax/SAWB scale + round-to-nearest quantization |
  | `stochastic_quantize` | stochastic rounding / LUQ with in-kernel Threefry: the *same bits* as the XLA path for the same key |
  | `hadamard_quantize` | block Hadamard transform + INT4 LSQ quantization (Xi et al. 2023, HQ) in one pass |
  | `dispatch` | the Pallas kernel on Hopper, XLA elsewhere (`implementation=` or `$QTRAIN_IMPL` overrides) |

  Every kernel has an XLA `reference()`, a `can_use()` check and an **interpret mode** that
  runs the kernel program on the CPU. **Runtime:** on Colab pick *Runtime → Change runtime
  type → GPU*; the Pallas kernels need a Hopper GPU, on other GPUs `dispatch` runs the XLA
  paths. On a CPU this notebook says so, runs the interpret-mode kernels at small sizes
  and checks them against the references, and skips the timings.
  ''', extra_setup='''
  import time

  import pallas_kernels
  from pallas_kernels import dispatch, fp8_matmul, hadamard_quantize, int8_matmul
  from pallas_kernels import quantize as fused_quantize
  from pallas_kernels import stochastic_quantize

  F = qtrain.formats
  ON_GPU = pallas_kernels.has_gpu()
  if not ON_GPU:
    IMPL = 'interpret'
    print('No GPU: the Pallas kernels run in Mosaic GPU interpret mode at small sizes '
          '(correct results, meaningless speed); the timing section is skipped.')
  else:
    IMPL = dispatch.resolve_implementation(None)  # 'pallas' on Hopper, else 'xla'
    print(f'GPU: {jax.devices()[0].device_kind}; implementation {IMPL!r}'
          + ('' if IMPL == 'pallas' else ' (the Pallas kernels need Hopper, sm_90)'))
  # GEMM sizes: kernel tiles are 128 x 256; interpret mode is slow, so CPU runs stay tiny.
  M, K, N = (128, 128, 256) if not ON_GPU else (1024, 1024, 1024) if SMALL else (8192, 8192, 8192)
  ''') + [
      _md('''
      ## 1. The INT8 GEMM

      Quantize a float `X` (per-row scales) and `W` (per-column scales) with `qtrain.quantize`,
      then multiply the int8 codes: the kernel accumulates in int32 and applies both scales in
      its epilogue. It must equal the XLA reference **bit for bit**.
      '''),
      _code('''
      kx, kw = jax.random.split(jax.random.fold_in(key, 1))
      X = jax.random.normal(kx, (M, K))
      W = jax.random.normal(kw, (K, N)) / np.sqrt(K)
      qx = qtrain.quantize(X, qtrain.TensorConfig(format=F.INT8, granularity=qtrain.PerChannel(axes=(0,))))
      qw = qtrain.quantize(W, qtrain.TensorConfig(format=F.INT8, granularity=qtrain.PerChannel(axes=(1,))))
      x_scale, w_scale = qx.scale.reshape(M), qw.scale.reshape(N)

      y_kernel = dispatch.matmul(qx.codes, qw.codes, a_scale=x_scale, b_scale=w_scale,
                                 implementation=IMPL)
      y_ref = int8_matmul.reference(qx.codes, qw.codes, a_scale=x_scale, b_scale=w_scale)
      rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
      print(f'kernel == XLA reference bit for bit: {bool(jnp.all(y_kernel == y_ref))}')
      print(f'INT8 GEMM vs float32 X·W: relative error {rel(y_kernel, X @ W):.4f}')
      '''),
      _md('''
      ## 2. The FP8 GEMM carrying 4-bit codes

      LUQ's backward GEMM `dX = dY·Wᵀ` multiplies radix-2 log FP4 gradient codes with INT4
      weight codes. Both are exact in `float8_e4m3fn`, so the FP8 tensor cores compute the
      4-bit product exactly (float32 accumulation).
      '''),
      _code('''
      kg = jax.random.fold_in(key, 2)
      G = jax.random.normal(kg, (M, K)) * jnp.exp(2 * jax.random.normal(jax.random.fold_in(kg, 1), (M, 1)))
      qg = qtrain.quantize(G, qtrain.numerics.luq_config(4), key=jax.random.key(7))  # fp8 codes
      qw4 = qtrain.quantize(W, qtrain.TensorConfig(format=F.INT4, calibration=qtrain.Sawb()))
      w_fp8 = qw4.codes.astype(jnp.float8_e4m3fn)  # int4 codes are exact in e4m3
      print('operand dtypes:', qg.codes.dtype, w_fp8.dtype)
      y_kernel = dispatch.matmul(qg.codes, w_fp8, a_scale=qg.scale, b_scale=qw4.scale,
                                 implementation=IMPL)
      y_ref = fp8_matmul.reference(qg.codes, w_fp8, a_scale=qg.scale, b_scale=qw4.scale)
      print(f'max |kernel - reference| / max |reference|: '
            f'{float(jnp.abs(y_kernel - y_ref).max() / jnp.abs(y_ref).max()):.2e}')
      '''),
      _md('''
      ## 3. Fused quantizers

      Each quantizer kernel reads the tensor once for its scale and once to write codes. The
      stochastic one draws its noise with the counter-based Threefry of `qtrain.prng` *inside*
      the kernel, so for the same key it produces exactly the codes of `qtrain.quantize`: a run
      can switch between GPU and CPU without changing a single rounding decision.
      '''),
      _code('''
      x = jax.random.normal(jax.random.fold_in(key, 3), (M, N))
      checks = {
          'INT8 absmax, RTN': (fused_quantize.quantize, qtrain.TensorConfig(format=F.INT8), {}),
          'INT4 SAWB, RTN': (fused_quantize.quantize,
                             qtrain.TensorConfig(format=F.INT4, calibration=qtrain.Sawb()), {}),
          'LUQ log FP4, SR': (stochastic_quantize.quantize, qtrain.numerics.luq_config(4),
                              {'key': jax.random.key(11)}),
          'INT8, SR': (stochastic_quantize.quantize,
                       qtrain.TensorConfig(format=F.INT8, rounding='stochastic'),
                       {'key': jax.random.key(12)}),
      }
      for name, (fn, cfg, kw) in checks.items():
        q_kernel = fn(x, cfg, implementation=IMPL, **kw)
        q_xla = qtrain.quantize(x, cfg, **kw)
        same = bool(jnp.all(q_kernel.codes == q_xla.codes) and jnp.all(q_kernel.scale == q_xla.scale))
        print(f'{name:<18} codes and scale equal to qtrain.quantize: {same}')

      step = 0.25
      q_h = hadamard_quantize.hadamard_quantize(x, step, block_size=32, interpret=not ON_GPU)
      q_ref = hadamard_quantize.reference(x, step, block_size=32)
      print(f'Hadamard + INT4: {int(jnp.sum(q_h.codes != q_ref.codes))} codes differ from the '
            f'reference (only exact rounding ties may: float sums in another order)')
      '''),
      _md('''
      ## 4. Timings (GPU only)

      Median wall time of jit-compiled calls (`block_until_ready`) against XLA's bf16 GEMM on
      the same shape, and the fused quantizers against the XLA quantizer. On Hopper the INT8
      and FP8 tensor cores have twice the bf16 peak; the quantizers are memory-bound, so their
      floor is one read of `x` and one write of the codes.
      '''),
      _code('''
      def median_ms(fn, *args, iters=20):
        fn = jax.jit(fn)
        jax.block_until_ready(fn(*args))  # compile and warm up
        times = []
        for _ in range(iters):
          t = time.perf_counter()
          jax.block_until_ready(fn(*args))
          times.append(time.perf_counter() - t)
        return 1e3 * float(np.median(times))

      if not ON_GPU:
        print('No GPU: timings skipped (interpret mode measures the Python interpreter, not a kernel).')
      else:
        flops = 2 * M * N * K
        xb, wb = X.astype(jnp.bfloat16), W.astype(jnp.bfloat16)
        rows = {
            'XLA bf16 GEMM': median_ms(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32), xb, wb),
            'XLA int8 GEMM (reference)': median_ms(
                lambda a, b: int8_matmul.reference(a, b, a_scale=x_scale, b_scale=w_scale), qx.codes, qw.codes),
            f'int8 GEMM ({IMPL})': median_ms(lambda a, b: dispatch.matmul(
                a, b, a_scale=x_scale, b_scale=w_scale, implementation=IMPL), qx.codes, qw.codes),
            f'fp8 GEMM, 4-bit codes ({IMPL})': median_ms(lambda a, b: dispatch.matmul(
                a, b, a_scale=qg.scale, b_scale=qw4.scale, implementation=IMPL), qg.codes, w_fp8),
        }
        base = rows['XLA bf16 GEMM']
        print(f'GEMM {M}x{K} @ {K}x{N} on {jax.devices()[0].device_kind}')
        for name, ms in rows.items():
          print(f'  {name:<32}{ms:>8.3f} ms {flops / ms / 1e9:>8.0f} TFLOP/s  {base / ms:>5.2f}x bf16')

        cfg_sr = qtrain.numerics.luq_config(4)
        q_rows = {
            'XLA INT8 quantize': median_ms(lambda v: qtrain.quantize(v, F.INT8).codes, x),
            f'fused INT8 quantize ({IMPL})': median_ms(
                lambda v: fused_quantize.quantize(v, F.INT8, implementation=IMPL).codes, x),
            'XLA LUQ quantize (SR)': median_ms(
                lambda v: qtrain.quantize(v, cfg_sr, key=jax.random.key(1)).codes, x),
            f'fused LUQ quantize ({IMPL})': median_ms(lambda v: stochastic_quantize.quantize(
                v, cfg_sr, key=jax.random.key(1), implementation=IMPL).codes, x),
        }
        moved = x.size * (4 + 1)  # read float32, write one byte per code
        print(f'quantize {M}x{N} float32')
        for name, ms in q_rows.items():
          print(f'  {name:<32}{ms:>8.3f} ms {moved / ms / 1e6:>8.0f} GB/s')
      '''),
      _md('''
      `python -m pallas_kernels.<module>` runs each kernel's own checks and benchmark
      (`main()`), with its tuning candidates.
      '''),
  ]


NOTEBOOKS = {
    '01_quickstart.ipynb': quickstart,
    '02_formats_and_rounding.ipynb': formats_and_rounding,
    '03_train_and_compare.ipynb': train_and_compare,
    '04_transformers_int4.ipynb': transformers_int4,
    '05_fq_vit_ptq.ipynb': fq_vit_ptq,
    '06_gpu_kernels.ipynb': gpu_kernels,
}


def build(name: str) -> nbformat.NotebookNode:
  """The notebook `name` (a key of NOTEBOOKS), without outputs, with stable cell ids."""
  cells = NOTEBOOKS[name]()
  for i, cell in enumerate(cells):
    cell['id'] = f'cell-{i:02d}'
  nb = nbformat.v4.new_notebook(cells=cells)
  nb.metadata = {
      'kernelspec': {'display_name': 'Python 3', 'language': 'python', 'name': 'python3'},
      'language_info': {'name': 'python'},
      'colab': {'provenance': []},
      'accelerator': 'GPU' if name.startswith('06_') else 'None',
  }
  nbformat.validate(nb)
  return nb


def render(name: str) -> str:
  """The JSON text of notebook `name` exactly as it is written to disk."""
  return nbformat.writes(build(name)) + '\n'


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--check', action='store_true',
                      help='only compare with the files on disk; exit 1 if any differs')
  args = parser.parse_args(argv)
  stale = []
  for name in NOTEBOOKS:
    path = os.path.join(HERE, name)
    text = render(name)
    old = open(path, encoding='utf-8').read() if os.path.exists(path) else None
    if old != text:
      stale.append(name)
      if not args.check:
        with open(path, 'w', encoding='utf-8') as f:
          f.write(text)
  verb = 'differ from the generator' if args.check else 'written'
  print(f'{len(stale)} notebook(s) {verb}: {", ".join(stale) or "none"}')
  return 1 if args.check and stale else 0


if __name__ == '__main__':
  sys.exit(main())
