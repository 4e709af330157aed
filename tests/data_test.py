"""Offline datasets: loaders on the real Debian data, splits, batches, tokenizer."""

import functools
import os

import numpy as np
import pytest

from qtrain import data
from qtrain.data import bible, fortunes, vision


def _require(path, package):
  """Skips the test, with the install command, when a Debian data package is absent."""
  if not os.path.exists(path):
    pytest.skip(f'{path} missing: apt-get install {package}')


@functools.lru_cache(maxsize=None)
def _fashion():
  _require(vision.FASHION_MNIST_DIR, 'dataset-fashion-mnist')
  return data.load_fashion_mnist()


@functools.lru_cache(maxsize=None)
def _bible(seed=0):
  _require(os.path.join(bible.SWORD_ROOT, 'modules/texts/ztext', bible.ENGLISH_MODULE),
           'sword-text-kjv')
  _require(os.path.join(bible.SWORD_ROOT, 'modules/texts/ztext', bible.SPANISH_MODULE),
           'sword-text-sparv')
  return data.load_bible_pairs(seed=seed)


@functools.lru_cache(maxsize=None)
def _fortunes(seed=0):
  _require(fortunes.FORTUNES_DIR, 'fortunes')
  return data.load_fortunes(seed=seed)


@functools.lru_cache(maxsize=None)
def _small_tokenizer():
  ds = _bible()
  # A small vocab on a slice keeps training well under a second.
  return data.train_tokenizer(list(ds.x_train[:1000]) + list(ds.y_train[:1000]), vocab_size=600)


def _check_classification(ds, n_classes):
  assert ds.num_classes == n_classes == len(ds.class_names)
  for y in (ds.y_train, ds.y_test):
    assert y.dtype == np.int32
    assert y.min() >= 0 and y.max() < n_classes
  assert len(ds.x_train) == len(ds.y_train) and len(ds.x_test) == len(ds.y_test)


def test_digits():
  ds = data.load_digits(seed=3)
  assert ds.x_train.shape == (1438, 64) and ds.x_test.shape == (359, 64)
  assert ds.x_train.dtype == np.float32 and 0 <= ds.x_train.min() and ds.x_train.max() <= 1
  _check_classification(ds, 10)
  np.testing.assert_array_equal(ds.x_test, data.load_digits(seed=3).x_test)
  assert not np.array_equal(ds.y_test, data.load_digits(seed=4).y_test)


def test_fashion_mnist():
  ds = _fashion()
  assert ds.x_train.shape == (60000, 28, 28, 1) and ds.x_test.shape == (10000, 28, 28, 1)
  assert ds.x_train.dtype == np.float32
  assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
  _check_classification(ds, 10)
  # The official split is balanced: 6,000 / 1,000 images per class.
  assert (np.bincount(ds.y_train) == 6000).all() and (np.bincount(ds.y_test) == 1000).all()


def test_read_idx_roundtrip(tmp_path):
  arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
  header = bytes([0, 0, 0x08, 3]) + np.array(arr.shape, '>u4').tobytes()
  (tmp_path / 'a-idx3-ubyte').write_bytes(header + arr.tobytes())
  np.testing.assert_array_equal(data.read_idx(tmp_path / 'a-idx3-ubyte'), arr)


def test_bible_pairs():
  ds = _bible()
  n = len(ds.x_train) + len(ds.x_test)
  assert 30_000 < n < 31_200  # 31,102 KJV verses; a few are empty in RV1909
  assert len(ds.x_test) == int(n * 0.05) and ds.num_classes == 0
  for texts in (ds.x_train, ds.y_train, ds.x_test, ds.y_test):
    assert texts.dtype == object and all(isinstance(t, str) and t for t in texts[:500])
    assert not any('<' in t or '\N{PILCROW SIGN}' in t for t in texts)


def test_bible_first_verse():
  english, spanish = _bible().x_train, _bible().y_train
  pairs = dict(zip(english, spanish))
  pairs.update(zip(_bible().x_test, _bible().y_test))
  gen11 = next(e for e in pairs if e.startswith('In the beginning God created'))
  assert 'In the beginning' in gen11 and 'principio' in pairs[gen11]


def test_strip_osis():
  markup = ('<title type="x-section">Head</title>In the <w lemma="strong:H7225">beginning'
            '</w>\N{PILCROW SIGN} &amp; <note placement="foot"><reference>1.1</reference> fn</note>'
            'end. <title canonical="true" type="psalm">A Psalm.</title>')
  assert data.strip_osis(markup) == 'In the beginning & end. A Psalm.'
  assert data.strip_osis('<chapter n="1" osisID="Gen.1" sID="Gen.1"/> ') == ''


def test_fortunes():
  ds = _fortunes()
  assert ds.num_classes > 10
  _check_classification(ds, ds.num_classes)
  assert list(ds.class_names) == sorted(ds.class_names)
  assert 'computers' in ds.class_names and 'off' not in ds.class_names
  assert not any(name.endswith(('.dat', '.u8')) for name in ds.class_names)
  assert 10_000 < len(ds.x_train) + len(ds.x_test) < 20_000
  assert all(isinstance(t, str) and t and '\b' not in t for t in ds.x_train)
  counts = np.bincount(np.concatenate([ds.y_train, ds.y_test]), minlength=ds.num_classes)
  assert counts.min() >= 50


def test_parse_fortune_file():
  assert data.parse_fortune_file('one\nline\n%\n\n%\n_\bb_\bo_\bl_\bd\n%\n*___\bBIG*') == [
      'one\nline', 'bold', '*BIG*']


@pytest.mark.parametrize('loader', [_bible, _fortunes])
def test_text_split_reproducible(loader):
  a, b, c = loader(0), loader.__wrapped__(0), loader(1)
  assert list(a.x_test) == list(b.x_test) and list(a.y_test) == list(b.y_test)
  assert list(a.x_test) != list(c.x_test)


def test_split_indices_disjoint_and_complete():
  train, test = data.split_indices(1000, seed=5, test_fraction=0.2)
  assert len(test) == 200 and not set(train) & set(test)
  np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(1000))
  np.testing.assert_array_equal(test, data.split_indices(1000, seed=5, test_fraction=0.2)[1])
  with pytest.raises(ValueError):
    data.split_indices(10, seed=0, test_fraction=1.0)


@pytest.mark.parametrize('loader, package', [
    (data.load_fashion_mnist, 'apt-get install dataset-fashion-mnist'),
    (data.load_bible_pairs, 'apt-get install sword-text-kjv'),
    (data.load_fortunes, 'apt-get install fortunes'),
])
def test_missing_data_names_package(loader, package, tmp_path, monkeypatch):
  # Hide the Debian locations too, so the test is the same with or without the packages.
  monkeypatch.setattr(vision, 'FASHION_MNIST_DIR', str(tmp_path / 'none'))
  monkeypatch.setattr(bible, 'SWORD_ROOT', str(tmp_path / 'none'))
  monkeypatch.setattr(fortunes, 'FORTUNES_DIR', str(tmp_path / 'none'))
  with pytest.raises(FileNotFoundError, match=package) as err:
    loader(data_dir=tmp_path)
  assert isinstance(err.value, data.DatasetNotFoundError) and str(tmp_path) in str(err.value)


def test_data_dir_is_searched(tmp_path):
  (tmp_path / 'fortunes').mkdir()
  (tmp_path / 'fortunes' / 'cats').write_text('meow\n%\npurr\n%\nhiss\n')
  (tmp_path / 'fortunes' / 'cats.dat').write_bytes(b'\0\1')
  ds = data.load_fortunes(data_dir=tmp_path, min_per_topic=1, test_fraction=0.0)
  assert ds.class_names == ('cats',) and sorted(ds.x_train) == ['hiss', 'meow', 'purr']


def test_registry():
  assert set(data.DATASETS) == {'digits', 'fashion_mnist', 'bible_en_es', 'fortunes'}
  assert data.load('digits', seed=0).x_train.shape == (1438, 64)
  with pytest.raises(ValueError, match='valid: bible_en_es, digits, fashion_mnist, fortunes'):
    data.load('imagenet')


def test_tokenizer_round_trip_and_determinism():
  ds = _bible()
  tok = _small_tokenizer()
  again = data.train_tokenizer(list(ds.x_train[:1000]) + list(ds.y_train[:1000]), vocab_size=600)
  assert tok.get_vocab() == again.get_vocab() and tok.get_vocab_size() == 600
  for text in [ds.x_test[0], ds.y_test[0], '¡OH Jehová! ¿Sacarás…', '  x\t\ny ']:
    assert tok.decode(tok.encode(text).ids) == text


def test_encode_pairs():
  ds, tok = _bible(), _small_tokenizer()
  src, tgt = data.encode_pairs(tok, ds.x_test[:64], ds.y_test[:64], max_len=32)
  assert src.shape == tgt.shape == (64, 32) and src.dtype == tgt.dtype == np.int32
  assert (tgt[:, 0] == data.BOS_ID).all()
  # Every row ends its tokens with EOS, truncated or not, and then only padding.
  for row in np.concatenate([src, tgt]):
    n = int((row != data.PAD_ID).sum())
    assert row[n - 1] == data.EOS_ID and (row[n:] == data.PAD_ID).all()
  short = data.encode_texts(tok, ['In the beginning'], 64)[0]
  assert tok.decode(short[short != data.PAD_ID].tolist()) == 'In the beginning'


@pytest.mark.parametrize('drop_remainder', [True, False])
def test_batches_deterministic_and_cover(drop_remainder):
  x, y = np.arange(103) * 10, np.arange(103)
  run = lambda seed, epoch: list(data.batches(x, y, 16, seed=seed, epoch=epoch,
                                              drop_remainder=drop_remainder))
  first = run(0, 0)
  assert all(np.array_equal(a[1], b[1]) for a, b in zip(first, run(0, 0)))
  assert not np.array_equal(first[0][1], run(0, 1)[0][1])
  assert not np.array_equal(first[0][1], run(1, 0)[0][1])
  for bx, by in first:
    np.testing.assert_array_equal(bx, by * 10)  # x and y stay paired
  seen = np.concatenate([by for _, by in first])
  assert len(seen) == len(set(seen)) == (96 if drop_remainder else 103)
  assert [len(by) for _, by in first][-1] == (16 if drop_remainder else 7)


def test_batches_strings_and_mismatch():
  x = np.array(['a', 'b', 'c'], dtype=object)
  (bx, by), = data.batches(x, np.arange(3), 3, seed=0, epoch=0)
  assert sorted(bx) == ['a', 'b', 'c']
  with pytest.raises(ValueError):
    next(data.batches(x, np.arange(2), 1, seed=0, epoch=0))
