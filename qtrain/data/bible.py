"""English–Spanish Bible verse pairs from Debian's SWORD zText modules (KJV, RV1909)."""

from __future__ import annotations

import functools
import html
import os
import re
import zlib

import numpy as np

from qtrain.data.core import Dataset, candidate_dirs, find_dir, split_indices, str_array

SWORD_ROOT = '/usr/share/sword'
ENGLISH_MODULE = 'engKJV2006eb'  # Debian sword-text-kjv
SPANISH_MODULE = 'spaRV1909eb'  # Debian sword-text-sparv
_PACKAGES = {ENGLISH_MODULE: 'sword-text-kjv', SPANISH_MODULE: 'sword-text-sparv'}
_TESTAMENTS = ('ot', 'nt')
# .bzs: per block (offset, compressed size, uncompressed size); .bzv: per verse slot
# (block, offset in the uncompressed block, size). Both little-endian.
_BLOCK_DTYPE = np.dtype([('offset', '<u4'), ('size', '<u4'), ('raw_size', '<u4')])
_VERSE_DTYPE = np.dtype([('block', '<u4'), ('offset', '<u4'), ('size', '<u2')])
# Elements whose *content* is not verse text: footnotes and editorial headings.
# Without dropping headings, book-intro slots would pair "The First Book of Moses,
# called Genesis" with "Génesis". Canonical titles (psalm superscriptions) stay:
# KJV tags them, RV1909 has them as plain text in verse 1, so both sides keep them.
_DROP_ELEMENTS = re.compile(
    r'<note\b[^>]*?(?:/>|>.*?</note\s*>)'
    r'|<title\b(?![^>]*canonical="true")[^>]*?(?:/>|>.*?</title\s*>)', re.DOTALL)
_TAG = re.compile(r'<[^>]*>')
# KJV's paragraph marks; typography, not words, and RV1909 has none.
_PILCROW = '\N{PILCROW SIGN}'
_SPACE = re.compile(r'\s+')


def strip_osis(markup: str) -> str:
  """Plain verse text from OSIS markup: notes and titles removed, other tags unwrapped.

  Args:
    markup: one verse slot's OSIS, e.g. 'In the <w lemma="strong:H7225">beginning</w>'.

  Returns:
    The text with single spaces and no '¶', e.g. 'In the beginning'; '' for
    markup-only slots.
  """
  # The substring checks skip regex passes that most verses do not need (2x faster).
  text = _DROP_ELEMENTS.sub(' ', markup) if ('<note' in markup or '<title' in markup) else markup
  text = _TAG.sub('', text) if '<' in text else text
  text = html.unescape(text).replace(_PILCROW, ' ')
  return _SPACE.sub(' ', text).strip()


def read_ztext(directory: str, testament: str) -> list[str]:
  """Raw markup of every verse slot of one testament of a SWORD zText module.

  Args:
    directory: module directory holding '<testament>.bz{s,v,z}'.
    testament: 'ot' or 'nt'.

  Returns:
    One str per verse slot in versification order (module, testament, book and
    chapter intro slots included); '' for empty slots.
  """
  path = os.path.join(directory, testament)
  blocks = np.fromfile(path + '.bzs', dtype=_BLOCK_DTYPE)
  verses = np.fromfile(path + '.bzv', dtype=_VERSE_DTYPE)
  with open(path + '.bzz', 'rb') as f:
    compressed = f.read()
  # Decompress each block once; blocks hold a whole book (BlockType=BOOK).
  raw = [zlib.decompress(compressed[b['offset']:b['offset'] + b['size']]) for b in blocks]
  # tolist(): indexing numpy records one at a time is ~10x slower than tuples.
  return [raw[b][o:o + n].decode('utf-8', 'replace') if n else ''
          for b, o, n in verses.tolist()]


def _module_dir(module: str, data_dir: str | os.PathLike[str] | None) -> str:
  """Directory of `module`: under data_dir (bare, or as a SWORD root), then Debian's."""
  rel = os.path.join('modules', 'texts', 'ztext', module)
  extra = [module, rel]
  hint = (f'Install the Debian package: `apt-get install {_PACKAGES[module]}`, or put the '
          f'module directory (ot.bzs, ot.bzv, ot.bzz, nt.*) at --data-dir/{module}/.')
  return find_dir(candidate_dirs(data_dir, extra, os.path.join(SWORD_ROOT, rel)),
                  [t + ext for t in _TESTAMENTS for ext in ('.bzs', '.bzv', '.bzz')], hint)


@functools.lru_cache(maxsize=2)
def _read_pairs(english_dir: str, spanish_dir: str) -> tuple[tuple[str, str], ...]:
  """Every verse slot where both modules have text after markup stripping."""
  pairs = []
  for testament in _TESTAMENTS:
    en, es = read_ztext(english_dir, testament), read_ztext(spanish_dir, testament)
    # Same versification (KJV) in both modules, so slot i is the same verse.
    if len(en) != len(es):
      raise ValueError(f'{testament}: verse slot counts differ ({len(en)} vs {len(es)}); '
                       'the modules do not share a versification')
    for a, b in zip(map(strip_osis, en), map(strip_osis, es)):
      if a and b:
        pairs.append((a, b))
  return tuple(pairs)


def load_bible_pairs(*, data_dir: str | os.PathLike[str] | None = None, seed: int = 0,
                     test_fraction: float = 0.05) -> Dataset:
  """Aligned (English KJV, Spanish RV1909) verse pairs, split by `seed`.

  Args:
    data_dir: directory holding the module directories (or a SWORD root with
      modules/texts/ztext/...); Debian's /usr/share/sword is tried after it.
    seed: split seed.
    test_fraction: share of pairs in the test part.

  Returns:
    Dataset with x (English) and y (Spanish) object arrays [N] of str, in canonical
    order within each part's indices as drawn; class_names is empty.

  Raises:
    DatasetNotFoundError: a module is missing; the message names its Debian package.
  """
  pairs = _read_pairs(_module_dir(ENGLISH_MODULE, data_dir),
                      _module_dir(SPANISH_MODULE, data_dir))
  en = str_array([p[0] for p in pairs])
  es = str_array([p[1] for p in pairs])
  train, test = split_indices(len(pairs), seed=seed, test_fraction=test_fraction)
  return Dataset('bible_en_es', en[train], es[train], en[test], es[test])
