"""Test environment: 8 fake CPU devices for sharding tests, strict numerics flags.

XLA_FLAGS must be set before jax is imported anywhere, hence at the top here.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

# Silent rank broadcasting hides scale-shape bugs in a quantization library.
jax.config.update('jax_numpy_rank_promotion', 'raise')
