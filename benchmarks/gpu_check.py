"""One-command GPU check of qtrain's Pallas kernels: correctness, then timings (< 5 min on an H100).

    python benchmarks/gpu_check.py --out gpu_check.json      # on an H100/H200
    python benchmarks/gpu_check.py --dry-run --out /tmp/x.json   # CPU: interpret mode, tiny shapes

| section      | what                                                                        |
|--------------|-----------------------------------------------------------------------------|
| checks       | every kernel vs its XLA reference on fresh random inputs, several shapes    |
| gemm timings | int8 / FP8 kernels vs XLA bf16 dot and XLA's own int8 / FP8 dot: 1024^3,     |
|              | 4096^3, 8192^3 and the MLP GEMMs of a d=4096 transformer (8192 tokens)       |
| quantizers   | `gpu_checks()` / `gpu_timings()` of pallas_kernels.{quantize,                |
|              | stochastic_quantize, hadamard_quantize} when those modules exist            |
| mlp block    | forward+backward of gelu(x W1) W2 at d=4096 (8192 tokens): bf16 XLA vs       |
|              | qtrain.dot_general int8 with implementation='pallas' and 'xla'              |

Timings are medians of many calls after warm-up, with `block_until_ready`.
The table printed last holds the headline ratios against the targets
(INT8 and FP8-carried 4-bit GEMM >= 1.7x bf16 XLA at 8192^3); the JSON file
holds every row. In a dry run the kernels run in Mosaic GPU interpret mode on
the CPU at tiny shapes: the numbers mean nothing, the run proves the script.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import platform
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from pallas_kernels import _common  # noqa: E402  pylint: disable=g-import-not-at-top
from pallas_kernels import fp8_matmul  # noqa: E402  pylint: disable=g-import-not-at-top
from pallas_kernels import int8_matmul  # noqa: E402  pylint: disable=g-import-not-at-top

__all__ = ['run', 'main', 'TARGETS', 'QUANTIZE_MODULES']

TARGETS = {'int8_matmul': 1.7, 'fp8_matmul': 1.7}  # x bf16 XLA dot throughput at 8192^3
QUANTIZE_MODULES = ('quantize', 'stochastic_quantize', 'hadamard_quantize')


def _call_hook(fn, dry_run: bool):
  """Calls a module's gpu_checks/gpu_timings; None if it cannot do a dry run."""
  params = inspect.signature(fn).parameters
  if 'dry_run' in params:
    return fn(dry_run=dry_run)
  if dry_run:
    return None  # full-size only: not on CPU
  return fn()


def _quantizer_rows(hook: str, dry_run: bool, notes: list) -> list[dict]:
  rows = []
  for name in QUANTIZE_MODULES:
    try:
      mod = importlib.import_module(f'pallas_kernels.{name}')
    except ImportError as e:
      notes.append(f'pallas_kernels.{name}: not present ({e}); skipped')
      continue
    if not hasattr(mod, hook):
      notes.append(f'pallas_kernels.{name}: no {hook}(); skipped')
      continue
    try:
      got = _call_hook(getattr(mod, hook), dry_run)
    except Exception as e:  # pylint: disable=broad-except  # report and go on
      rows.append(dict(kernel=name, hook=hook, ok=False, error=f'{type(e).__name__}: {e}'[:500]))
      continue
    if got is None:
      notes.append(f'pallas_kernels.{name}.{hook}() takes no dry_run: skipped in a dry run')
      continue
    rows.extend(dict(row, kernel=row.get('kernel', name)) for row in got)
  return rows


def _mlp_rows(dry_run: bool) -> list[dict]:
  """Forward+backward of gelu(x W1) W2: bf16 XLA vs qtrain int8 (Pallas and XLA GEMMs)."""
  from qtrain import dot as qdot  # pylint: disable=g-import-not-at-top
  from qtrain import presets  # pylint: disable=g-import-not-at-top
  tokens, d = (128, 256) if dry_run else (8192, 4096)
  kx, k1, k2, kq = jax.random.split(jax.random.key(7), 4)
  x = jax.random.normal(kx, (tokens, d), jnp.bfloat16)
  w1 = (jax.random.normal(k1, (d, 4 * d), jnp.float32) / d ** 0.5).astype(jnp.bfloat16)
  w2 = (jax.random.normal(k2, (4 * d, d), jnp.float32) / (4 * d) ** 0.5).astype(jnp.bfloat16)
  cfg = presets.int8()
  dims = (((1,), (0,)), ((), ()))

  def bf16_loss(x, w1, w2):
    h = jax.nn.gelu(jnp.dot(x, w1, preferred_element_type=jnp.bfloat16))
    y = jnp.dot(h, w2, preferred_element_type=jnp.bfloat16)
    return jnp.mean(jnp.square(y.astype(jnp.float32)))

  def q_loss(impl, x, w1, w2):
    k_a, k_b = jax.random.split(kq)
    h = qdot.dot_general(x, w1, dims, config=cfg, key=k_a, implementation=impl,
                         preferred_element_type=jnp.bfloat16)
    h = jax.nn.gelu(h)
    y = qdot.dot_general(h, w2, dims, config=cfg, key=k_b, implementation=impl,
                         preferred_element_type=jnp.bfloat16)
    return jnp.mean(jnp.square(y.astype(jnp.float32)))

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))
  iters, warmup = (1, 0) if dry_run else (20, 3)
  rows = []
  bf16 = grad(bf16_loss)
  ref = bf16(x, w1, w2)  # also the warm-up
  t_bf16 = _common.time_ms(bf16, x, w1, w2, iters=iters, warmup=warmup)
  impls = ('interpret', 'xla') if dry_run else ('pallas', 'xla')
  results = {}
  for impl in impls:
    f = grad(lambda x, w1, w2, impl=impl: q_loss(impl, x, w1, w2))
    t0 = time.perf_counter()
    results[impl] = jax.block_until_ready(f(x, w1, w2))  # compile + run: the warm-up
    if dry_run:  # interpret mode is slow; one call proves the path (time includes compile)
      t = (time.perf_counter() - t0) * 1e3
    else:
      t = _common.time_ms(f, x, w1, w2, iters=iters, warmup=warmup)
    rows.append(dict(kernel='mlp_block', implementation=f'int8 {impl}', tokens=tokens, d=d,
                     ms=t, bf16_ms=t_bf16, speedup_vs_bf16=t_bf16 / t))
  # The Pallas and XLA int8 paths compute the same GEMMs exactly: compare them.
  (la, ga), (lb, gb) = results[impls[0]], results['xla']
  same = bool(jnp.array_equal(la, lb)) and all(bool(jnp.array_equal(p, q)) for p, q in zip(ga, gb))
  rel = float(jnp.abs(la - ref[0]) / jnp.maximum(jnp.abs(ref[0]), 1e-30))
  rows.append(dict(kernel='mlp_block', check=f'int8 {impls[0]} == int8 xla (loss, 3 grads)',
                   ok=same, loss_rel_err_vs_bf16=rel))
  return rows


def run(dry_run: bool = False, timings: bool = True) -> dict:
  """All sections; returns {'env', 'checks', 'timings', 'notes', 'summary'}."""
  t0 = time.time()
  notes: list[str] = []
  dev = jax.devices()[0]
  env = dict(jax=jax.__version__, python=platform.python_version(), backend=jax.default_backend(),
             device=dev.device_kind, device_count=jax.device_count(),
             hopper=_common.is_hopper(), dry_run=dry_run)
  if not dry_run and not _common.is_hopper():
    notes.append('no Hopper GPU: kernels run in interpret mode (numbers meaningless); '
                 'use --dry-run on CPU')
  checks = []
  for mod in (int8_matmul, fp8_matmul):
    try:
      checks.extend(mod.gpu_checks(dry_run))
    except Exception as e:  # pylint: disable=broad-except
      checks.append(dict(kernel=mod.__name__, ok=False, error=traceback.format_exc()[-800:]))
      print(f'{mod.__name__}.gpu_checks failed: {e}', file=sys.stderr)
  checks.extend(_quantizer_rows('gpu_checks', dry_run, notes))
  rows = []
  if timings:
    for mod in (int8_matmul, fp8_matmul):
      try:
        rows.extend(mod.gpu_timings(dry_run))
      except Exception as e:  # pylint: disable=broad-except
        rows.append(dict(kernel=mod.__name__, error=traceback.format_exc()[-800:]))
        print(f'{mod.__name__}.gpu_timings failed: {e}', file=sys.stderr)
    rows.extend(_quantizer_rows('gpu_timings', dry_run, notes))
    try:
      mlp = _mlp_rows(dry_run)
      rows.extend(r for r in mlp if 'check' not in r)
      checks.extend(r for r in mlp if 'check' in r)
    except Exception as e:  # pylint: disable=broad-except
      rows.append(dict(kernel='mlp_block', error=traceback.format_exc()[-800:]))
      print(f'mlp block failed: {e}', file=sys.stderr)
  summary = _summary(checks, rows, dry_run)
  summary['seconds'] = round(time.time() - t0, 1)
  return dict(env=env, checks=checks, timings=rows, notes=notes, summary=summary)


def _summary(checks, rows, dry_run) -> dict:
  failed = [c for c in checks if not c.get('ok', False)]
  targets = {}
  problem = 'cube-256' if dry_run else 'cube-8192'
  for name, target in TARGETS.items():
    hit = [r for r in rows if r.get('kernel') == name and r.get('problem') == problem
           and 'speedup_vs_bf16' in r]
    if hit:
      ratio = hit[0]['speedup_vs_bf16']
      targets[name] = dict(problem=problem, speedup_vs_bf16=ratio, target=target,
                           met=bool(ratio >= target))
  return dict(checks=len(checks), checks_failed=len(failed), targets=targets)


def _table(result: dict) -> str:
  lines = [f"{'kernel':<14} {'problem':<10} {'ms':>9} {'TFLOP/s':>8} {'bf16 ms':>9} "
           f"{'lowbit ms':>9} {'x bf16':>7} {'x lowbit':>8}"]
  for r in result['timings']:
    if 'kernel_ms' in r:
      lines.append(f"{r['kernel']:<14} {r['problem']:<10} {r['kernel_ms']:>9.3f} "
                   f"{r['kernel_tflops']:>8.1f} {r['xla_bf16_ms']:>9.3f} "
                   f"{r['xla_lowbit_ms']:>9.3f} "
                   f"{r['speedup_vs_bf16']:>7.2f} {r['speedup_vs_xla_lowbit']:>8.2f}")
    elif r.get('kernel') == 'mlp_block' and 'ms' in r:
      lines.append(f"{'mlp_block':<14} {r['implementation']:<10} {r['ms']:>9.3f} {'':>8} "
                   f"{r['bf16_ms']:>9.3f} {'':>9} {r['speedup_vs_bf16']:>7.2f}")
    elif 'error' in r:
      lines.append(f"{r.get('kernel', '?'):<14} ERROR {r['error'].splitlines()[-1][:80]}")
  s = result['summary']
  lines.append(f"checks: {s['checks'] - s['checks_failed']}/{s['checks']} ok")
  for name, t in s['targets'].items():
    lines.append(f"target {name} @ {t['problem']}: {t['speedup_vs_bf16']:.2f}x bf16 "
                 f"(target >= {t['target']}x): {'MET' if t['met'] else 'NOT MET'}")
  for n in result['notes']:
    lines.append(f'note: {n}')
  lines.append(f"({s['seconds']} s; dry_run={result['env']['dry_run']})")
  return '\n'.join(lines)


def main(argv=None) -> int:
  """CLI entry point; returns 0 if every check passed."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', required=True, help='JSON file for every number')
  parser.add_argument('--dry-run', action='store_true',
                      help='CPU: interpret mode at tiny shapes (proves the script runs)')
  parser.add_argument('--no-timings', action='store_true', help='correctness checks only')
  args = parser.parse_args(argv)
  result = run(dry_run=args.dry_run, timings=not args.no_timings)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=1, default=str)
  print(_table(result))
  return 0 if result['summary']['checks_failed'] == 0 else 1


if __name__ == '__main__':
  sys.exit(main())
