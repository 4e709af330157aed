"""Image datasets: scikit-learn digits and Debian's Fashion-MNIST."""

from __future__ import annotations

import functools
import gzip
import os

import numpy as np

from qtrain.data.core import Dataset, candidate_dirs, find_dir

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal',
                         'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
_FASHION_FILES = ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz',
                  't10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz')
# IDX type codes (http://yann.lecun.com/exdb/mnist/); Fashion-MNIST only uses 0x08.
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4',
               0x0E: '>f8'}


def load_digits(*, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
  """scikit-learn's digits (1,797 8×8 images), split by `seed`.

  Returns:
    Dataset with x float32 [N, 64] in [0, 1] and y int32 [N] in [0, 10).
  """
  from qtrain.demo import load_digits_split  # pylint: disable=import-outside-toplevel
  (x_tr, y_tr), (x_te, y_te) = load_digits_split(seed, test_fraction)
  return Dataset('digits', x_tr, y_tr, x_te, y_te, tuple(str(i) for i in range(10)))


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
  """Reads an IDX file (optionally gzip-compressed) into an array of its stored dtype.

  Args:
    path: file path; '.gz' files are decompressed.

  Returns:
    Array with the file's dimensions, e.g. uint8 [60000, 28, 28] for MNIST images.
  """
  opener = gzip.open if os.fspath(path).endswith('.gz') else open
  with opener(path, 'rb') as f:
    raw = f.read()
  zero, type_code, ndim = raw[0] << 8 | raw[1], raw[2], raw[3]
  if zero != 0 or type_code not in _IDX_DTYPES:
    raise ValueError(f'{path}: not an IDX file (magic {raw[:4].hex()})')
  shape = tuple(np.frombuffer(raw, '>u4', count=ndim, offset=4).astype(int))
  data = np.frombuffer(raw, _IDX_DTYPES[type_code], offset=4 + 4 * ndim)
  return data.reshape(shape)


@functools.lru_cache(maxsize=4)
def _read_fashion_mnist(directory: str) -> tuple[np.ndarray, ...]:
  """(train images, train labels, test images, test labels) as stored (uint8)."""
  return tuple(read_idx(os.path.join(directory, f)) for f in _FASHION_FILES)


def load_fashion_mnist(*, data_dir: str | os.PathLike[str] | None = None) -> Dataset:
  """Fashion-MNIST with its official 60k/10k split.

  Args:
    data_dir: directory holding the four '*-ubyte.gz' files (or a 'fashion-mnist'
      subdirectory); Debian's /usr/share/datasets/fashion-mnist is tried after it.

  Returns:
    Dataset with x float32 [N, 28, 28, 1] in [0, 1] and y int32 [N] in [0, 10).

  Raises:
    DatasetNotFoundError: files missing; the message names the Debian package.
  """
  directory = find_dir(
      candidate_dirs(data_dir, ['fashion-mnist'], FASHION_MNIST_DIR), _FASHION_FILES,
      'Install the Debian package: `apt-get install dataset-fashion-mnist`, or put the '
      f'four files ({", ".join(_FASHION_FILES)}) in --data-dir.')
  x_tr, y_tr, x_te, y_te = _read_fashion_mnist(directory)
  return Dataset('fashion_mnist', _to_float_images(x_tr), y_tr.astype(np.int32),
                 _to_float_images(x_te), y_te.astype(np.int32), FASHION_MNIST_CLASSES)


def _to_float_images(x: np.ndarray) -> np.ndarray:
  """uint8 [N, H, W] -> float32 [N, H, W, 1] in [0, 1] (NHWC with one channel)."""
  return (x.astype(np.float32) / 255.0)[..., None]
