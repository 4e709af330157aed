"""Pallas GPU kernels for qtrain's low-bit GEMMs and fused quantizers (Mosaic GPU, Hopper).

Each kernel will live in its own module with a `reference()` and run in
interpret mode on CPU (shared/DESIGN.md §3). Importing this package never
fails on a machine without a GPU.
"""

import jax

__all__ = ['has_gpu']


def has_gpu() -> bool:
  """True if JAX's default backend is a GPU."""
  return jax.default_backend() == 'gpu'
