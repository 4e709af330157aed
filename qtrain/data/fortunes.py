"""Text classification on Debian's `fortunes`: fortune text -> topic (file name)."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence

import numpy as np

from qtrain.data.core import (Dataset, DatasetNotFoundError, candidate_dirs, split_indices,
                              str_array)

__all__ = ['CLASSIFICATION_TOPICS', 'FORTUNES_DIR', 'load_fortunes', 'parse_fortune_file']

FORTUNES_DIR = '/usr/share/games/fortunes'
# The topic-classification subset (task `fortunes_topics`): every Debian topic
# file with at least 600 entries whose subject is distinct, so the label is
# learnable from the text and each class keeps >= ~120 test texts. Grab-bag
# files of that size (cookie, people, men-women, miscellaneous, fortunes,
# platitudes, zippy) are left out: their texts could sit in any topic.
CLASSIFICATION_TOPICS = ('computers', 'definitions', 'politics', 'science', 'songs-poems',
                         'work')
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
                  test_fraction: float = 0.2, min_per_topic: int = 50,
                  topics: Sequence[str] | None = None) -> Dataset:
  """Fortunes labelled by topic, split by `seed`.

  Args:
    data_dir: directory of topic files (or its 'fortunes' subdirectory); Debian's
      /usr/share/games/fortunes is tried after it.
    seed: split seed.
    test_fraction: share of entries in the test part.
    min_per_topic: topics with fewer entries are dropped (a handful of examples
      cannot be learned, and may miss the test part entirely).
    topics: keep only these topic files (e.g. `CLASSIFICATION_TOPICS`); None = all.

  Returns:
    Dataset with x object array [N] of str, y int32 [N] indexing class_names (the
    kept topics, sorted).

  Raises:
    DatasetNotFoundError: no topic files; the message names the Debian package.
    ValueError: a requested topic is missing or has fewer than min_per_topic entries.
  """
  available = _read_topics(_fortunes_dir(data_dir))
  if isinstance(topics, str):
    raise TypeError(f'topics={topics!r} must be a sequence of topic names, not one string.')
  if topics is not None:
    wanted = set(topics)
    found = {t: len(e) for t, e in available if t in wanted}
    bad = sorted(t for t in wanted if found.get(t, 0) < min_per_topic)
    if bad:
      raise ValueError(f'topics {bad} are missing or have fewer than min_per_topic='
                       f'{min_per_topic} entries; available: '
                       f'{", ".join(t for t, e in available if len(e) >= min_per_topic)}.')
    available = tuple((t, e) for t, e in available if t in wanted)
  topics = [(t, e) for t, e in available if len(e) >= min_per_topic]
  if not topics:
    raise ValueError(f'no topic has at least min_per_topic={min_per_topic} entries')
  texts = str_array([e for _, entries in topics for e in entries])
  labels = np.concatenate([np.full(len(e), i, np.int32) for i, (_, e) in enumerate(topics)])
  train, test = split_indices(len(texts), seed=seed, test_fraction=test_fraction)
  return Dataset('fortunes', texts[train], labels[train], texts[test], labels[test],
                 tuple(t for t, _ in topics))
