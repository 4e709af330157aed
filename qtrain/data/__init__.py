"""Offline datasets with seeded splits; nothing here touches the network.

| name            | loader               | x                         | y                  |
|-----------------|----------------------|---------------------------|--------------------|
| 'digits'        | `load_digits`        | float32 [N, 64] in [0, 1] | int32 [N], 10      |
| 'fashion_mnist' | `load_fashion_mnist` | float32 [N, 28, 28, 1]    | int32 [N], 10      |
| 'bible_en_es'   | `load_bible_pairs`   | English str [N]           | Spanish str [N]    |
| 'fortunes'      | `load_fortunes`      | str [N]                   | int32 [N], topics  |

Missing Debian data raises `DatasetNotFoundError` (a `FileNotFoundError`) naming
the package to install.
"""

from __future__ import annotations

from collections.abc import Callable

from qtrain.data.bible import load_bible_pairs, read_ztext, strip_osis
from qtrain.data.core import (Dataset, DatasetNotFoundError, batch_indices, batches,
                              split_indices)
from qtrain.data.fortunes import load_fortunes, parse_fortune_file
from qtrain.data.text import (BOS_ID, EOS_ID, PAD_ID, encode_pairs, encode_texts,
                              train_tokenizer)
from qtrain.data.vision import load_digits, load_fashion_mnist, read_idx

DATASETS: dict[str, Callable[..., Dataset]] = {
    'digits': load_digits,
    'fashion_mnist': load_fashion_mnist,
    'bible_en_es': load_bible_pairs,
    'fortunes': load_fortunes,
}


def load(name: str, **kwargs) -> Dataset:
  """Loads registered dataset `name`, passing `kwargs` to its loader.

  Raises:
    ValueError: unknown name; the message lists the valid ones.
  """
  try:
    loader = DATASETS[name]
  except KeyError:
    raise ValueError(f'unknown dataset {name!r}; valid: {", ".join(sorted(DATASETS))}') from None
  return loader(**kwargs)


__all__ = [
    'BOS_ID', 'DATASETS', 'Dataset', 'DatasetNotFoundError', 'EOS_ID', 'PAD_ID', 'batch_indices',
    'batches',
    'encode_pairs', 'encode_texts', 'load', 'load_bible_pairs', 'load_digits',
    'load_fashion_mnist', 'load_fortunes', 'parse_fortune_file', 'read_idx', 'read_ztext',
    'split_indices', 'strip_osis', 'train_tokenizer',
]
