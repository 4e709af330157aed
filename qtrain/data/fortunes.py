"""Text classification on Debian's `fortunes`: fortune text -> topic (file name)."""

from __future__ import annotations

import functools
import os
import re

import numpy as np

from qtrain.data.core import (Dataset, DatasetNotFoundError, candidate_dirs, split_indices,
                              str_array)

FORTUNES_DIR = '/usr/share/games/fortunes'
_SEPARATOR = re.compile(r'^%\s*$', re.MULTILINE)
# Some entries use terminal overstrike to underline: "_\bx" per character, or a run
# of underscores then backspace(s) ("___\bBODY"). Keep the printed text only.
_OVERSTRIKE = re.compile(r'_+\x08+|.?\x08')


def parse_fortune_file(text: str) -> list[str]:
  """Entries of one strfile source: blocks separated by lines holding only '%'.

  Args:
    text: the whole file.

  Returns:
    Non-empty entries, stripped of surrounding whitespace and overstrike sequences.
  """
  entries = (_OVERSTRIKE.sub('', e).strip() for e in _SEPARATOR.split(text))
  return [e for e in entries if e]


def _is_topic_file(path: str) -> bool:
  """Topic sources only: not the strfile indexes (.dat), the .u8 links, or 'off/'."""
  return os.path.isfile(path) and '.' not in os.path.basename(path)


def _fortunes_dir(data_dir: str | os.PathLike[str] | None) -> str:
  """First candidate directory with at least one topic file."""
  candidates = candidate_dirs(data_dir, ['fortunes'], FORTUNES_DIR)
  for cand in candidates:
    if os.path.isdir(cand) and any(_is_topic_file(os.path.join(cand, f))
                                   for f in os.listdir(cand)):
      return cand
  raise DatasetNotFoundError(
      f'no fortune files (looked in: {", ".join(candidates)}). Install the Debian package: '
      '`apt-get install fortunes`, or put topic files (entries separated by "%" lines) '
      'in --data-dir/fortunes/.')


@functools.lru_cache(maxsize=2)
def _read_topics(directory: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """(topic, entries) for every topic file, sorted by topic name for stable indices."""
  out = []
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if _is_topic_file(path):
      with open(path, encoding='utf-8', errors='replace') as f:
        out.append((name, tuple(parse_fortune_file(f.read()))))
  return tuple(out)


def load_fortunes(*, data_dir: str | os.PathLike[str] | None = None, seed: int = 0,
                  test_fraction: float = 0.2, min_per_topic: int = 50) -> Dataset:
  """Fortunes labelled by topic, split by `seed`.

  Args:
    data_dir: directory of topic files (or its 'fortunes' subdirectory); Debian's
      /usr/share/games/fortunes is tried after it.
    seed: split seed.
    test_fraction: share of entries in the test part.
    min_per_topic: topics with fewer entries are dropped (a handful of examples
      cannot be learned, and may miss the test part entirely).

  Returns:
    Dataset with x object array [N] of str, y int32 [N] indexing class_names (the
    kept topics, sorted).

  Raises:
    DatasetNotFoundError: no topic files; the message names the Debian package.
  """
  topics = [(t, e) for t, e in _read_topics(_fortunes_dir(data_dir)) if len(e) >= min_per_topic]
  if not topics:
    raise ValueError(f'no topic has at least min_per_topic={min_per_topic} entries')
  texts = str_array([e for _, entries in topics for e in entries])
  labels = np.concatenate([np.full(len(e), i, np.int32) for i, (_, e) in enumerate(topics)])
  train, test = split_indices(len(texts), seed=seed, test_fraction=test_fraction)
  return Dataset('fortunes', texts[train], labels[train], texts[test], labels[test],
                 tuple(t for t, _ in topics))
