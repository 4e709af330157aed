"""`compare`: train several recipes on the same data, seeds and budget; report the table.

The measured version of the papers' comparison table: every recipe trains
the same model from the same initialisation on the same batches (per seed),
and the report puts each one's test metric (mean ± std over seeds) next to
float32's, with the degradation each paper reports for its own setting.

Output directory:

* `report.md`: the comparison table (task, model, recipe, forward and
  backward formats, test metric mean ± std, Δ vs float32, the paper's
  reported Δ, wall time) and the run settings;
* `results.json`: every run's numbers (losses, evaluations, times) and the
  summary rows;
* `loss.png`: training-loss curves of all recipes (mean over seeds);
* `delta.png`: Δ vs float32 per recipe (mean ± std over seeds), the papers'
  reported Δ beside it;
* `runs/<recipe>/seed<k>/`: each run's `config.json` and `metrics.jsonl`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import time

import jax
import numpy as np

from qtrain import recipes as recipe_registry
from qtrain import tasks as task_registry
from qtrain.recipe import Recipe
from qtrain.train import TrainConfig, TrainResult, _prepare_out_dir, resolve_lr, train

__all__ = ['Row', 'Comparison', 'compare', 'model_family', 'format_table']

BASELINE = 'fp32'


def model_family(model: str) -> str:
  """The `qtrain.recipes.FAMILIES` entry of a zoo model."""
  if model == 'mobilenetv2':
    return 'mobilenet'
  if model in ('transformer_lm', 'seq2seq', 'vit', 'minilm', 'bert_tiny'):
    return 'transformer'
  return 'cnn'


@dataclasses.dataclass(frozen=True)
class Row:
  """One recipe's line of the table; metrics in [0, 1], deltas in percentage points."""
  recipe: str
  paper: str
  forward: str
  backward: str
  metrics: tuple[float, ...]
  delta_pp: float | None
  delta_std_pp: float | None
  paper_delta: str
  seconds: float
  baseline: str = ''

  @property
  def mean(self) -> float:
    return float(np.mean(self.metrics))

  @property
  def std(self) -> float | None:
    return float(np.std(self.metrics, ddof=1)) if len(self.metrics) > 1 else None


@dataclasses.dataclass(frozen=True)
class Comparison:
  """All runs and the summary rows of one `compare` call."""
  task: str
  model: str
  metric: str
  seeds: tuple[int, ...]
  epochs: int
  rows: tuple[Row, ...]
  runs: tuple[TrainResult, ...]
  out_dir: str | None
  seconds: float


def _pp(x: float) -> str:
  return f'{x:+.2f}'


def _clip(text: str, width: int) -> str:
  return text if len(text) <= width else text[:width - 1] + '…'


def format_table(comparison: Comparison, *, markdown: bool = True) -> str:
  """The comparison table as Markdown, or as aligned plain text for a terminal.

  The plain-text form shortens the format descriptions to fit a terminal
  (`qtrain recipes` and report.md have them in full).
  """
  head = ['recipe', 'forward', 'backward', f'test {comparison.metric} (%)', 'Δ vs float (pp)',
          "paper's Δ (pp, their setting)", 'time (s)']
  lines = []
  for r in comparison.rows:
    metric = f'{100 * r.mean:.2f}' + (f' ± {100 * r.std:.2f}' if r.std is not None else '')
    if r.delta_pp is None:
      delta = '—'
    else:
      delta = _pp(r.delta_pp) + (f' ± {r.delta_std_pp:.2f}' if r.delta_std_pp is not None else '')
    fwd, bwd, paper = r.forward, r.backward, r.paper_delta or '—'
    if not markdown:
      fwd, bwd, paper = _clip(fwd, 24), _clip(bwd, 28), _clip(paper, 34)
    lines.append([r.recipe, fwd, bwd, metric, delta, paper, f'{r.seconds:.0f}'])
  if markdown:
    out = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
    out += ['| ' + ' | '.join(line) + ' |' for line in lines]
    return '\n'.join(out)
  widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
  fmt = lambda cells: '  '.join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
  return '\n'.join([fmt(head), fmt(['-' * w for w in widths])] + [fmt(line) for line in lines])


def _paper_delta(entry: recipe_registry.RecipeInfo) -> str:
  return '; '.join(str(d) for d in entry.reported[:2])


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One line of the comparison: a label, the recipe to train, its baseline label."""
  label: str
  recipe: Recipe
  registered: str
  baseline: str | None


def _entries(names: list[str]) -> list[_Entry]:
  """fp32 first; a recipe bringing its own optimizer gets an fp32 run with that optimizer.

  Δ must isolate quantization: WAGEUBN's SGD with momentum 0.25 on a 10-bit
  LR against Adam fp32 would mix the optimizer into the degradation.
  """
  out = [_Entry(BASELINE, recipe_registry.get(BASELINE), BASELINE, None)]
  for name in names:
    if name == BASELINE:
      continue
    recipe = recipe_registry.get(name)
    baseline = BASELINE
    if recipe.optimizer is not None:
      baseline = f'{BASELINE}-{name}-opt'
      float_twin = recipe_registry.get(BASELINE).replace(
          name=baseline, optimizer=recipe.optimizer, default_lr=recipe.default_lr,
          description=f"float32 with {name}'s own optimizer (its Δ baseline)")
      out.append(_Entry(baseline, float_twin, BASELINE, None))
    out.append(_Entry(name, recipe, name, baseline))
  return out


def _rows(entries: list[_Entry], runs: dict[str, list[TrainResult]]) -> tuple[Row, ...]:
  rows = []
  for e in entries:
    info = recipe_registry.info(e.registered)
    metrics = tuple(r.test_metric for r in runs[e.label])
    delta = delta_std = None
    if e.baseline is not None:
      diffs = 100 * (np.asarray(metrics) - np.asarray([r.test_metric for r in runs[e.baseline]]))
      delta = float(diffs.mean())
      delta_std = float(diffs.std(ddof=1)) if len(diffs) > 1 else None
    elif e.label == BASELINE:
      delta = 0.0
    forward, backward = info.forward, info.backward
    if e.label != e.registered:  # a float twin
      forward = backward = f'float32 ({e.label.removeprefix(BASELINE + "-")})'
    rows.append(Row(recipe=e.label, paper=info.paper if e.label == e.registered else '',
                    forward=forward, backward=backward, metrics=metrics, delta_pp=delta,
                    delta_std_pp=delta_std,
                    paper_delta=_paper_delta(info) if e.label == e.registered else '',
                    seconds=float(sum(r.seconds for r in runs[e.label])),
                    baseline=e.baseline or ''))
  return tuple(rows)


def _environment() -> dict:
  dev = jax.devices()[0]
  return {'jax': jax.__version__, 'backend': jax.default_backend(),
          'device': getattr(dev, 'device_kind', str(dev)), 'devices': jax.device_count(),
          'python': platform.python_version(), 'machine': platform.machine(),
          'cpus': os.cpu_count(),
          'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}


def _write_report(c: Comparison, settings: dict, env: dict) -> None:
  papers = [(r.recipe, r.paper) for r in c.rows if r.recipe == BASELINE or r.paper]
  lines = [
      f'# qtrain compare: {c.task} / {c.model}', '',
      f'Test {c.metric} after {c.epochs} epochs, mean ± sample std over seeds '
      f'{", ".join(map(str, c.seeds))}; Δ = recipe − its float baseline on the same seed '
      '(paired), in percentage points. The baseline is fp32 with Adam, or, for a recipe '
      'that brings its own optimizer, fp32 with that optimizer and LR (the `fp32-<name>-opt` '
      'rows). The papers\' Δ are for their own (much larger) models and datasets, shown for '
      'orientation only.', '',
      format_table(c), '',
      '![training loss](loss.png)', '', '![delta vs float32](delta.png)', '',
      '## Settings', '',
      *[f'- {k}: {v}' for k, v in settings.items()], '',
      '## Machine', '', *[f'- {k}: {v}' for k, v in env.items()], '',
      '## Papers', '', *[f'- {name}: {paper or "baseline"}' for name, paper in papers], '',
      f'Total wall time {c.seconds:.0f} s.', '']
  with open(os.path.join(c.out_dir, 'report.md'), 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines))


def _plot(c: Comparison, runs_by_recipe: dict[str, list[TrainResult]]) -> None:
  # Figure objects, not pyplot: no global backend switch (a notebook's inline
  # plots keep working) and nothing left open.
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel

  fig = Figure(figsize=(7, 4.5))
  ax = fig.subplots()
  for name, runs in runs_by_recipe.items():
    steps = [s for s, _ in runs[0].losses]
    curves = np.asarray([[l for _, l in r.losses] for r in runs])
    ax.plot(steps, curves.mean(0), label=name, lw=1.5 if name == BASELINE else 1.0,
            color='black' if name == BASELINE else None)
  ax.set(xlabel='step', ylabel='training loss (mean over seeds)', yscale='log',
         title=f'{c.task} / {c.model}: training loss')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(c.out_dir, 'loss.png'), dpi=120)

  rows = [r for r in c.rows if r.baseline]
  fig = Figure(figsize=(7, 4.5))
  ax = fig.subplots()
  xs = np.arange(len(rows))
  ax.bar(xs, [r.delta_pp for r in rows], yerr=[r.delta_std_pp or 0 for r in rows],
         capsize=3, color='tab:blue', label='measured (mean ± std over seeds)')
  label = "paper's reported Δ (its own setting)"
  for x, r in zip(xs, rows):
    reported = recipe_registry.info(r.recipe).reported
    if reported:
      ax.plot([x + 0.3], [reported[0].delta_pp], 'D', color='tab:red', label=label)
      label = None  # one legend entry
  ax.axhline(0, color='black', lw=0.8)
  ax.set_xticks(xs, [r.recipe for r in rows], rotation=30, ha='right')
  ax.set(ylabel=f'Δ test {c.metric} vs fp32 (pp)', title=f'{c.task} / {c.model}: Δ vs float32')
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, axis='y')
  fig.tight_layout()
  fig.savefig(os.path.join(c.out_dir, 'delta.png'), dpi=120)


def _result_record(r: TrainResult) -> dict:
  return {'recipe': r.config.recipe, 'seed': r.config.seed, 'test_metric': r.test_metric,
          'test_loss': r.test_loss, 'final_loss': r.final_loss, 'steps': r.steps,
          'seconds': r.seconds, 'losses': [list(x) for x in r.losses], 'evals': list(r.evals)}


def _default_recipes(model: str) -> list[str]:
  family = model_family(model)
  return [e.name for e in recipe_registry.registered()
          if family in e.families and e.kind == 'train' and not e.variant]


def compare(*, task: str = 'digits', model: str | None = None,
            recipes: tuple[str, ...] | list[str] | None = None, epochs: int = 10,
            seeds: tuple[int, ...] | list[int] = (0,), batch_size: int = 64,
            lr: float | None = None,
            limit: int | None = None, devices: int = 1, data_dir: str | None = None,
            out_dir: str | None = None, overwrite: bool = False,
            progress: bool = True) -> Comparison:
  """Trains every recipe on every seed and writes the report.

  Args:
    task: a `qtrain.tasks` name.
    model: a zoo model fitting the task; None = the task's default.
    recipes: registered recipe names; 'fp32' is always trained first (the
      baseline of every Δ), and a recipe with its own optimizer also gets an
      fp32 run with that optimizer ('fp32-<name>-opt'), its Δ baseline.
      None = every registered training recipe whose paper covers the model's
      family, variants (e.g. 'statquant-bhq4') only when named.
    epochs: epochs per run (same budget for all).
    seeds: one run per recipe per seed.
    batch_size: examples per step.
    lr: learning rate of every base optimizer; None = Adam at 3e-3 and each
      recipe's own optimizer at its `default_lr`.
    limit: use only the first `limit` training examples.
    devices: data-parallel devices per run.
    data_dir: extra directory for dataset files.
    out_dir: where the report goes; None = nothing written.
    overwrite: replace a non-empty `out_dir` (otherwise FileExistsError).
    progress: show progress bars.

  Returns:
    Comparison.

  Raises:
    ValueError: unknown task, model or recipe names (listing the valid ones),
      bad budgets, an empty or repeated seed list.
    FileExistsError: `out_dir` exists, is not empty, and overwrite is False.
  """
  start = time.perf_counter()
  task_obj = task_registry.get(task)
  model = model or task_obj.default_model
  task_obj.check_model(model)
  names = list(recipes) if recipes is not None else _default_recipes(model)
  for name in names:
    recipe_registry.info(name).check_trainable()
  if len(set(names)) != len(names):
    raise ValueError(f'recipes {names} name a recipe twice.')
  seeds = tuple(seeds)
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f'seeds {seeds} must be a non-empty list of distinct ints.')
  entries = _entries(names)
  configs = {(e.label, seed): TrainConfig(task=task, model=model, recipe=e.registered,
                                          epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                                          limit=limit, devices=devices, data_dir=data_dir)
             for seed in seeds for e in entries}  # validates everything before any work
  _prepare_out_dir(out_dir, overwrite, resume=False)

  runs_by_recipe: dict[str, list[TrainResult]] = {e.label: [] for e in entries}
  all_runs = []
  for seed in seeds:
    data = task_obj.load(data_dir=data_dir, seed=seed, limit=limit)
    for e in entries:
      run_dir = os.path.join(out_dir, 'runs', e.label, f'seed{seed}') if out_dir else None
      result = train(configs[e.label, seed], out_dir=run_dir, task_data=data, recipe=e.recipe,
                     progress=progress, save_checkpoints=False)
      runs_by_recipe[e.label].append(result)
      all_runs.append(result)
      if progress:
        print(f'  {e.label:<20} seed {seed}: test {task_obj.metric} '
              f'{100 * result.test_metric:.2f}%  ({result.seconds:.0f} s)', flush=True)

  comparison = Comparison(task=task, model=model, metric=task_obj.metric, seeds=seeds,
                          epochs=epochs, rows=_rows(entries, runs_by_recipe), runs=tuple(all_runs),
                          out_dir=out_dir, seconds=time.perf_counter() - start)
  if out_dir:
    rates = {e.label: resolve_lr(e.recipe, lr, model) for e in entries}
    settings = {'task': task, 'model': model, 'epochs': epochs, 'seeds': list(seeds),
                'batch size': batch_size,
                'learning rate': ', '.join(f'{k} {v:g}' for k, v in rates.items()),
                'base optimizer': 'Adam, except recipes bringing their own optimizer (then '
                                  'their Δ is against fp32 with that optimizer and LR, the '
                                  '<name>-opt rows)',
                'training examples': limit or 'all', 'devices': devices}
    env = _environment()
    _write_report(comparison, settings, env)
    _plot(comparison, runs_by_recipe)
    summary = [{**dataclasses.asdict(r), 'mean': r.mean, 'std': r.std} for r in comparison.rows]
    with open(os.path.join(out_dir, 'results.json'), 'w', encoding='utf-8') as f:
      json.dump({'settings': settings, 'environment': env, 'rows': summary,
                 'runs': [_result_record(r) for r in all_runs],
                 'seconds': comparison.seconds}, f, indent=1, allow_nan=True)
  return comparison


def parse_seeds(text: str) -> tuple[int, ...]:
  """'3' -> (0, 1, 2); '0,5,7' -> (0, 5, 7)."""
  try:
    if ',' in text:
      seeds = tuple(int(s) for s in text.split(',') if s.strip())
    else:
      seeds = tuple(range(int(text)))
  except ValueError:
    raise ValueError(f'--seeds {text!r} must be a count (3) or a comma list (0,1,2).') from None
  if not seeds or any(s < 0 for s in seeds):
    raise ValueError(f'--seeds {text!r} must give at least one seed >= 0.')
  return seeds
