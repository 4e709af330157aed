"""Pallas GPU kernels for qtrain's low-bit GEMMs and fused quantizers (Mosaic GPU, Hopper).

One module per kernel, each with a tuning dataclass, `can_use()`, the kernel,
its wrapper, an XLA `reference()` and a benchmark `main()`
(`python -m pallas_kernels.<name>`); all run in Mosaic GPU interpret mode on
CPU (shared/DESIGN.md §3). Importing this package never fails on a machine
without a GPU.

| module        | kernel                                                             |
|---------------|--------------------------------------------------------------------|
| `int8_matmul` | s8 x s8 -> s32 wgmma GEMM, per-tensor/row/column scales in epilogue |
| `fp8_matmul`  | 4-bit codes carried as e4m3/e5m2, FP8 wgmma -> f32, scales         |
| `dispatch`    | Pallas on Hopper, XLA elsewhere; `implementation=` override; shard_map |
"""

import importlib

import jax

# Loaded on first use (PEP 562), so `import pallas_kernels` stays light and
# `python -m pallas_kernels.<kernel>` does not find its module pre-imported.
# int8_matmul / fp8_matmul are the kernel *modules* (their functions have the same names).
_LAZY = {'int8_matmul': ('pallas_kernels.int8_matmul', None),
         'fp8_matmul': ('pallas_kernels.fp8_matmul', None),
         'dispatch': ('pallas_kernels.dispatch', None),
         'matmul': ('pallas_kernels.dispatch', 'matmul'),
         'dot_general': ('pallas_kernels.dispatch', 'dot_general'),
         'sharded_matmul': ('pallas_kernels.dispatch', 'sharded_matmul'),
         'sharded_int8_matmul': ('pallas_kernels.dispatch', 'sharded_int8_matmul'),
         'resolve_implementation': ('pallas_kernels.dispatch', 'resolve_implementation')}

__all__ = ['has_gpu'] + list(_LAZY)


def __getattr__(name: str):
  if name not in _LAZY:
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
  module, attr = _LAZY[name]
  mod = importlib.import_module(module)
  return mod if attr is None else getattr(mod, attr)


def has_gpu() -> bool:
  """True if JAX's default backend is a GPU."""
  return jax.default_backend() == 'gpu'
