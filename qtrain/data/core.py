"""Shared pieces of the offline datasets: the `Dataset` record, file lookup, splits, batches."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence

import numpy as np


class DatasetNotFoundError(FileNotFoundError):
  """A dataset's files are not on this machine; the message says how to get them."""


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: `==` on arrays is ambiguous
class Dataset:
  """A train/test split of one dataset, held host-side in numpy.

  Attributes:
    name: registry name, e.g. 'fashion_mnist'.
    x_train: inputs [N_train, ...]; float32 images, or object arrays of `str` for text.
    y_train: targets [N_train, ...]; int32 class indices, or object arrays of `str`
      (target sentences) for translation pairs.
    x_test: inputs [N_test, ...], same dtype and trailing shape as `x_train`.
    y_test: targets [N_test, ...], same dtype and trailing shape as `y_train`.
    class_names: one name per class index; empty for sequence-to-sequence data.
  """

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  class_names: tuple[str, ...] = ()

  @property
  def num_classes(self) -> int:
    """Number of classes; 0 for sequence-to-sequence data."""
    return len(self.class_names)


def find_dir(candidates: Sequence[str | os.PathLike[str]], required: Sequence[str],
             hint: str) -> str:
  """The first candidate directory that holds every file in `required`.

  Args:
    candidates: directories to try in order (user's data_dir forms first, Debian's last).
    required: file names relative to the directory.
    hint: how to install the data, appended to the error message.

  Returns:
    The matching directory path.

  Raises:
    DatasetNotFoundError: no candidate holds all the files.
  """
  for cand in candidates:
    if all(os.path.isfile(os.path.join(cand, f)) for f in required):
      return os.fspath(cand)
  tried = ', '.join(os.fspath(c) for c in candidates)
  raise DatasetNotFoundError(
      f'missing {", ".join(required)} (looked in: {tried}). {hint}')


def candidate_dirs(data_dir: str | os.PathLike[str] | None, subdirs: Sequence[str],
                   default: str) -> list[str]:
  """data_dir itself, then data_dir/<each subdir>, then the Debian `default`.

  A user's --data-dir usually holds several datasets side by side, so both the
  directory and its named subdirectories are accepted.
  """
  out = []
  if data_dir is not None:
    out.append(os.fspath(data_dir))
    out.extend(os.path.join(data_dir, s) for s in subdirs)
  out.append(default)
  return out


def split_indices(n: int, *, seed: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
  """A seeded random train/test split of range(n).

  Args:
    n: number of examples.
    seed: the split depends only on (n, seed, test_fraction).
    test_fraction: share of examples in the test part, in [0, 1).

  Returns:
    (train, test): disjoint int64 index arrays whose union is range(n);
    len(test) == int(n * test_fraction).
  """
  if not 0.0 <= test_fraction < 1.0:
    raise ValueError(f'test_fraction must be in [0, 1), got {test_fraction}')
  # Same recipe as qtrain.demo.load_digits_split, so digits splits match the demo's.
  perm = np.random.default_rng(seed).permutation(n)
  n_test = int(n * test_fraction)
  return perm[n_test:], perm[:n_test]


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int, epoch: int,
            drop_remainder: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Shuffled minibatches, the same for the same (seed, epoch).

  Args:
    x: inputs [N, ...], any dtype (object arrays of strings too).
    y: targets [N, ...].
    batch_size: examples per batch.
    seed: run seed.
    epoch: epoch number; each epoch gets its own order, and resuming at an epoch
      reproduces it without replaying the earlier ones.
    drop_remainder: drop the last short batch, so every batch has one static shape
      (one jit compilation).

  Yields:
    (x_batch [B, ...], y_batch [B, ...]) with B == batch_size, except possibly the
    last batch when drop_remainder is False.
  """
  if len(x) != len(y):
    raise ValueError(f'x and y lengths differ: {len(x)} vs {len(y)}')
  for idx in batch_indices(len(x), batch_size, seed=seed, epoch=epoch,
                           drop_remainder=drop_remainder):
    yield x[idx], y[idx]


def batch_indices(n: int, batch_size: int, *, seed: int, epoch: int,
                  drop_remainder: bool = True) -> Iterator[np.ndarray]:
  """The example indices of `batches` (same order), for data held in several arrays.

  Args:
    n: number of examples.
    batch_size: examples per batch.
    seed: run seed.
    epoch: epoch number.
    drop_remainder: as in `batches`.

  Yields:
    int64 index arrays of length batch_size (the last may be shorter when
    drop_remainder is False).
  """
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, got {batch_size}')
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  stop = n - n % batch_size if drop_remainder else n
  for start in range(0, stop, batch_size):
    yield perm[start:start + batch_size]


def str_array(texts: Sequence[str]) -> np.ndarray:
  """Object array [N] of str; fixed-width '<U' would pad every text to the longest."""
  out = np.empty(len(texts), dtype=object)
  out[:] = list(texts)
  return out
