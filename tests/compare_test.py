"""Tests of qtrain.compare and the `qtrain compare/train/recipes` commands."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qtrain import cli
from qtrain import compare as cmp

_PNG = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def report_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp('cmp') / 'out'
  code = cli.main(['compare', '--recipes', 'int8', '--epochs', '1', '--seeds', '2', '--limit',
                   '256', '--batch-size', '32', '--out', str(out), '--no-progress'])
  assert code == 0
  return out


def test_compare_writes_a_well_formed_report(report_dir, capsys):
  del capsys
  for name in ('report.md', 'results.json', 'loss.png', 'delta.png'):
    assert (report_dir / name).stat().st_size > 0, name
  for name in ('loss.png', 'delta.png'):
    assert (report_dir / name).read_bytes()[:8] == _PNG
  report = (report_dir / 'report.md').read_text()
  table = [line for line in report.splitlines() if line.startswith('| ')]
  assert table[0].startswith('| recipe | forward | backward | test accuracy (%)')
  assert [row.split(' | ')[0] for row in table[1:]] == ['| fp32', '| int8']
  assert all(row.count('|') == table[0].count('|') for row in table)
  results = json.loads((report_dir / 'results.json').read_text())
  runs = results['runs']
  assert sorted((r['recipe'], r['seed']) for r in runs) == [
      ('fp32', 0), ('fp32', 1), ('int8', 0), ('int8', 1)]
  rows = {r['recipe']: r for r in results['rows']}
  int8 = [r['test_metric'] for r in sorted(runs, key=lambda r: r['seed']) if r['recipe'] == 'int8']
  fp32 = [r['test_metric'] for r in sorted(runs, key=lambda r: r['seed']) if r['recipe'] == 'fp32']
  # The summary is computed from the runs: mean, sample std, paired delta.
  assert rows['int8']['mean'] == pytest.approx(np.mean(int8))
  assert rows['int8']['std'] == pytest.approx(np.std(int8, ddof=1))
  assert rows['int8']['delta_pp'] == pytest.approx(100 * (np.mean(int8) - np.mean(fp32)))
  assert rows['fp32']['delta_pp'] == 0.0
  for seed in (0, 1):
    assert (report_dir / 'runs' / 'int8' / f'seed{seed}' / 'metrics.jsonl').exists()


def test_compare_prints_the_table():
  comparison = cmp.Comparison(
      task='digits', model='lenet', metric='accuracy', seeds=(0,), epochs=1, runs=(),
      out_dir=None, seconds=1.0,
      rows=(cmp.Row(recipe='fp32', paper='', forward='float32', backward='float32',
                    metrics=(0.9,), delta_pp=0.0, delta_std_pp=None, paper_delta='', seconds=2),
            cmp.Row(recipe='x', paper='P', forward='INT8', backward='INT8', metrics=(0.8, 0.85),
                    delta_pp=-7.5, delta_std_pp=1.0, paper_delta='-0.50 pp (R, I)', seconds=3)))
  text = cmp.format_table(comparison, markdown=False)
  assert '82.50 ± 3.54' in text and '-7.50 ± 1.00' in text and '-0.50 pp (R, I)' in text
  assert cmp.format_table(comparison).count('\n') == 3


def test_existing_output_is_not_overwritten(report_dir, capsys):
  before = (report_dir / 'report.md').read_text()
  code = cli.main(['compare', '--recipes', 'int8', '--out', str(report_dir), '--no-progress'])
  assert code == 2
  assert 'exists and is not empty' in capsys.readouterr().err
  assert (report_dir / 'report.md').read_text() == before


@pytest.mark.parametrize('argv, message', [
    (['compare', '--task', 'cifar'], "unknown task 'cifar'; valid: digits, fashion_mnist"),
    (['compare', '--recipes', 'fp32,int3'], "unknown recipe 'int3'; registered: fp32, int8"),
    (['compare', '--model', 'vgg'], "unknown model 'vgg'; valid names: lenet, resnet20"),
    (['compare', '--seeds', 'two'], '--seeds'),
    (['compare', '--recipes', 'int8,int8'], 'name a recipe twice'),
    (['train', '--recipe', 'int3'], "unknown recipe 'int3'"),
    (['train', '--task', 'digits', '--model', 'seq2seq'], 'valid for this task: lenet'),
])
def test_bad_names_list_the_valid_ones(argv, message, capsys, tmp_path):
  assert cli.main(argv + ['--out', str(tmp_path / 'x'), '--no-progress']) == 2
  err = capsys.readouterr().err
  assert err.startswith('qtrain: error:') and message in err
  assert not (tmp_path / 'x').exists()  # nothing written before the arguments are checked


def test_every_command_has_help(capsys):
  for command in ('compare', 'train', 'recipes', 'demo'):
    with pytest.raises(SystemExit) as e:
      cli.main([command, '--help'])
    assert e.value.code == 0
    assert 'usage: qtrain ' + command in capsys.readouterr().out


def test_recipes_lists_the_registry(capsys):
  assert cli.main(['recipes']) == 0
  out = capsys.readouterr().out
  from qtrain import recipes  # pylint: disable=import-outside-toplevel
  heads = [line.split(':')[0] for line in out.splitlines() if not line.startswith(' ')]
  assert heads == list(recipes.names())
  assert out.count('  forward:  ') == out.count('  backward: ') == len(recipes.names())


def test_train_command_runs_and_resumes(tmp_path, capsys):
  out = tmp_path / 'run'
  argv = ['train', '--recipe', 'int8', '--epochs', '1', '--limit', '128', '--batch-size', '32',
          '--out', str(out), '--no-progress']
  assert cli.main(argv) == 0
  assert 'int8 on digits/lenet, seed 0: test accuracy' in capsys.readouterr().out
  assert cli.main(argv + ['--resume']) == 0  # finished run: nothing left to do
  assert '(resumed at step 4)' in capsys.readouterr().out


def test_parse_seeds():
  assert cmp.parse_seeds('3') == (0, 1, 2)
  assert cmp.parse_seeds('0,5') == (0, 5)
  for bad in ('0', '-1,2', 'x'):
    with pytest.raises(ValueError):
      cmp.parse_seeds(bad)
