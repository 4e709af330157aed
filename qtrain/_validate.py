"""Argument checks shared by the numerics modules (one wording for one mistake)."""

from __future__ import annotations

import numpy as np


def check_int(name: str, value, lo: int, hi: int) -> int:
  """`value` as an int if it is an integer in [lo, hi]; else TypeError/ValueError naming `name`."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f'{name} must be an int, got {value!r}.')
  if not lo <= value <= hi:
    raise ValueError(f'{name}={value} is out of range; allowed: {lo}..{hi}.')
  return int(value)
