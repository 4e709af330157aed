"""The `qtrain` command: train, compare, recipes, demo.

    qtrain compare                 # digits, LeNet+BN, every registered recipe, 3 seeds
    qtrain compare --task fashion_mnist --recipes fp32,int8,luq --epochs 3 --seeds 2
    qtrain train --task digits --model lenet --recipe int8 --out runs/int8
    qtrain recipes                 # registered recipes, formats, papers

Errors in the arguments (unknown names, an existing output directory, bad
numbers) print one line `qtrain: error: ...` and exit with status 2; a
training run stopped by a non-finite loss exits with status 1.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

__all__ = ['main', 'build_parser']


def _default_out(kind: str, task: str, model: str | None) -> str:
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  parts = [kind, task] + ([model] if model else []) + [stamp]
  return os.path.join('qtrain-runs', '-'.join(parts))


def _demo(args) -> int:
  from qtrain import demo  # pylint: disable=import-outside-toplevel
  if args.steps < 1:
    raise ValueError('--steps must be >= 1')
  results = demo.run_demo(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          seed=args.seed, hidden=args.hidden, configs=tuple(args.configs),
                          progress=not args.no_progress)
  print('MLP on scikit-learn digits (1,797 8x8 images; 20% held out), every GEMM of the '
        'quantized runs in low bit (forward, dX and dW):')
  print(demo.format_results(results))
  return 0


def _recipes(args) -> int:
  del args
  from qtrain import recipes  # pylint: disable=import-outside-toplevel
  for e in recipes.registered():
    tags = [t for t, on in (('post-training', e.kind == 'ptq'), ('variant', e.variant)) if on]
    print(f'{e.name}: {e.paper or "baseline (no paper)"}'
          + (f' [{", ".join(tags)}]' if tags else ''))
    print(f'  forward:  {e.forward}')
    print(f'  backward: {e.backward}')
    reported = '; '.join(str(d) for d in e.reported)
    print(f'  families: {", ".join(e.families)}' + (f'; paper reports {reported}' if reported
                                                      else ''))
  return 0


def _train(args) -> int:
  from qtrain.train import TrainConfig, train  # pylint: disable=import-outside-toplevel
  config = TrainConfig(task=args.task, model=args.model, recipe=args.recipe, epochs=args.epochs,
                       batch_size=args.batch_size, lr=args.lr, seed=args.seed, width=args.width,
                       limit=args.limit, checkpoint_every=args.checkpoint_every,
                       devices=args.devices, data_dir=args.data_dir)
  out = args.out or _default_out('train', config.task, config.model)
  result = train(config, out_dir=out, overwrite=args.overwrite, resume=args.resume,
                 progress=not args.no_progress)
  from qtrain import tasks  # pylint: disable=import-outside-toplevel
  metric = tasks.get(config.task).metric
  resumed = f' (resumed at step {result.resumed_from})' if result.resumed_from is not None else ''
  print(f'{config.recipe} on {config.task}/{config.model}, seed {config.seed}: test {metric} '
        f'{100 * result.test_metric:.2f}%, final training loss {result.final_loss:.4f}, '
        f'{result.steps} steps, {result.seconds:.0f} s{resumed}.')
  print(f'wrote {out}/config.json, metrics.jsonl, checkpoints/')
  return 0


def _compare(args) -> int:
  from qtrain import compare as cmp  # pylint: disable=import-outside-toplevel
  recipes = [r.strip() for r in args.recipes.split(',') if r.strip()] if args.recipes else None
  out = args.out or _default_out('compare', args.task, args.model)
  result = cmp.compare(task=args.task, model=args.model, recipes=recipes, epochs=args.epochs,
                       seeds=cmp.parse_seeds(args.seeds), batch_size=args.batch_size,
                       lr=args.lr, limit=args.limit, devices=args.devices,
                       data_dir=args.data_dir, out_dir=out, overwrite=args.overwrite,
                       progress=not args.no_progress)
  print(f'\n{result.task} / {result.model}: test {result.metric} after {result.epochs} epochs, '
        f'seeds {", ".join(map(str, result.seeds))} (Δ in percentage points vs the float '
        'baseline on the same seeds)')
  print(cmp.format_table(result, markdown=False))
  print(f'\nwrote {out}/report.md, results.json, loss.png, delta.png '
        f'({result.seconds:.0f} s)')
  return 0


def _add_common(p: argparse.ArgumentParser, *, epochs: int) -> None:
  p.add_argument('--task', default='digits',
                 help='digits (default), fashion_mnist, fortunes or bible_en_es')
  p.add_argument('--model', default=None,
                 help="zoo model (lenet, resnet20, mobilenetv2, transformer_lm, seq2seq); "
                 "default: the task's (lenet for images)")
  p.add_argument('--epochs', type=int, default=epochs, help=f'epochs per run ({epochs})')
  p.add_argument('--batch-size', type=int, default=64, help='examples per step (64)')
  p.add_argument('--lr', type=float, default=None,
                 help="learning rate (default: 3e-3 for Adam; a recipe with its own "
                 "optimizer, e.g. wageubn, uses its paper's)")
  p.add_argument('--limit', type=int, default=None,
                 help='use only the first N training examples (quick runs)')
  p.add_argument('--devices', type=int, default=1,
                 help='split each batch over this many local devices (data parallel; 1)')
  p.add_argument('--data-dir', default=None, help='extra directory to look for dataset files')
  p.add_argument('--out', default=None,
                 help='output directory (default: qtrain-runs/<command>-<task>-<time>)')
  p.add_argument('--overwrite', action='store_true', help='replace a non-empty --out')
  p.add_argument('--no-progress', action='store_true', help='hide progress bars')


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='qtrain', description=(
      '4- and 8-bit fully quantized training for JAX/Flax: train a model with a paper\'s '
      'recipe, or compare recipes against float32 on real data.'))
  sub = parser.add_subparsers(dest='command', required=True)

  p = sub.add_parser('compare', help='train several recipes on the same data and seeds; '
                     'write the comparison table and plots',
                     description='Train every recipe (default: all registered for the model '
                     'family) on the same data, seeds and budget; print the table and write '
                     'report.md, results.json, loss.png and delta.png to --out.')
  _add_common(p, epochs=10)
  p.add_argument('--recipes', default=None,
                 help='comma list of recipe names (fp32 is always added); default: all '
                 'registered for the model family (see `qtrain recipes`)')
  p.add_argument('--seeds', default='3', help="number of seeds (3 = seeds 0,1,2, the "
                 "default) or a comma list such as 0,5")
  p.set_defaults(func=_compare)

  p = sub.add_parser('train', help='train one model with one recipe',
                     description='Train one zoo model on one task with one recipe: progress '
                     'bar, evaluation every epoch, checkpoints and exact resume, metrics as '
                     'JSON lines in --out.')
  _add_common(p, epochs=5)
  p.add_argument('--recipe', default='fp32', help='registered recipe name (fp32)')
  p.add_argument('--seed', type=int, default=0, help='init, data order and noise seed (0)')
  p.add_argument('--width', type=int, default=None, help='model size multiplier')
  p.add_argument('--checkpoint-every', type=int, default=0,
                 help='steps between checkpoints (0: end of every epoch)')
  p.add_argument('--resume', action='store_true',
                 help='continue the run in --out from its latest checkpoint')
  p.set_defaults(func=_train)

  p = sub.add_parser('recipes', help='list the registered recipes',
                     description='List the registered recipes with their forward and '
                     'backward formats, model families and papers.')
  p.set_defaults(func=_recipes)

  p = sub.add_parser('demo', help='train a small MLP on digits: float32 vs INT8 vs 4-bit',
                     description='Train a small Flax MLP on scikit-learn digits with float32, '
                     'INT8 and 4-bit (INT4 SAWB fwd, LUQ log-FP4 bwd) GEMMs and print '
                     'the test accuracy of each.')
  p.add_argument('--steps', type=int, default=400, help='training steps per config (400)')
  p.add_argument('--batch-size', type=int, default=64, help='batch size (64)')
  p.add_argument('--lr', type=float, default=3e-3, help='Adam learning rate (3e-3)')
  p.add_argument('--seed', type=int, default=0, help='seed of init, split and batches (0)')
  p.add_argument('--hidden', type=int, default=128, help='hidden width (128)')
  p.add_argument('--configs', nargs='+', default=['fp32', 'int8', 'int4'],
                 choices=['fp32', 'int8', 'int4'], help='which configs to train')
  p.add_argument('--no-progress', action='store_true', help='hide the progress bars')
  p.set_defaults(func=_demo)
  return parser


def main(argv: list[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    return args.func(args)
  except (ValueError, FileExistsError, FileNotFoundError) as e:
    # Bad names, budgets, existing output or missing data: one clear line.
    print(f'qtrain: error: {e}', file=sys.stderr)
    return 2
  except FloatingPointError as e:  # NonFiniteLossError
    print(f'qtrain: stopped: {e}', file=sys.stderr)
    return 1


if __name__ == '__main__':
  sys.exit(main())
