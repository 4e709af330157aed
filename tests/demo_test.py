"""The quick-start demo and the `qtrain` command."""

import numpy as np
import pytest

from qtrain import cli, demo


def test_digits_split_is_seeded_and_disjoint():
  (xa, ya), (xt, yt) = demo.load_digits_split(0)
  (xb, _), _ = demo.load_digits_split(0)
  (xc, _), _ = demo.load_digits_split(1)
  assert xa.shape[1] == 64 and len(xa) + len(xt) == 1797
  np.testing.assert_array_equal(xa, xb)
  assert not np.array_equal(xa, xc)
  assert xa.dtype == np.float32 and 0.0 <= xa.min() and xa.max() <= 1.0
  assert set(np.unique(ya)) == set(range(10)) and set(np.unique(yt)) == set(range(10))


def test_demo_quantized_runs_learn():
  # 150 steps: well above chance (10%) for every config; float and INT8 close.
  results = demo.run_demo(steps=150, progress=False, configs=('fp32', 'int8', 'int4'))
  by_name = {r.name: r for r in results}
  for r in results:
    assert np.isfinite(r.final_loss)
    assert r.test_accuracy > 0.8, r
  assert abs(by_name['int8'].test_accuracy - by_name['fp32'].test_accuracy) < 0.05
  table = demo.format_results(results)
  assert 'int4' in table and 'Δ vs fp32' in table


def test_demo_rejects_unknown_config():
  with pytest.raises(ValueError, match='configs'):
    demo.run_demo(steps=1, configs=('fp64',), progress=False)


def test_cli_demo_prints_table(capsys):
  assert cli.main(['demo', '--steps', '5', '--configs', 'fp32', 'int8', '--no-progress']) == 0
  out = capsys.readouterr().out
  assert 'fp32' in out and 'int8' in out and 'test acc' in out


def test_cli_help_and_errors(capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(['demo', '--help'])
  assert e.value.code == 0
  assert '--steps' in capsys.readouterr().out
  assert cli.main(['demo', '--steps', '0']) == 2
  with pytest.raises(SystemExit):
    cli.main(['demo', '--configs', 'fp64'])
