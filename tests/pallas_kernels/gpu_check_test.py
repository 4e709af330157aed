"""The GPU check script's dry run (interpret mode, tiny shapes) runs end to end on CPU."""

from __future__ import annotations

import importlib.util
import json
import os

_SCRIPT = os.path.join(os.path.dirname(__file__), '..', '..', 'benchmarks', 'gpu_check.py')


def _load():
  spec = importlib.util.spec_from_file_location('gpu_check', _SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_dry_run_writes_json_and_every_check_passes(tmp_path, capsys):
  out = tmp_path / 'gpu_check.json'
  assert _load().main(['--dry-run', '--out', str(out)]) == 0
  result = json.loads(out.read_text())
  assert result['env']['dry_run'] is True
  kernels = {c['kernel'] for c in result['checks']}
  assert {'int8_matmul', 'fp8_matmul', 'mlp_block'} <= kernels
  assert all(c['ok'] for c in result['checks'])
  timed = {(r['kernel'], r.get('problem')) for r in result['timings'] if 'kernel_ms' in r}
  assert {('int8_matmul', 'cube-256'), ('fp8_matmul', 'cube-256')} <= timed
  assert any(r.get('kernel') == 'mlp_block' and 'ms' in r for r in result['timings'])
  assert set(result['summary']['targets']) == {'int8_matmul', 'fp8_matmul'}
  assert 'checks:' in capsys.readouterr().out  # the table is printed last
