"""The `qtrain` command."""

from __future__ import annotations

import argparse
import sys

__all__ = ['main']


def _demo(args) -> int:
  from qtrain import demo  # pylint: disable=import-outside-toplevel
  results = demo.run_demo(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          seed=args.seed, hidden=args.hidden, configs=tuple(args.configs),
                          progress=not args.no_progress)
  print('MLP on scikit-learn digits (1,797 8x8 images; 20% held out), every GEMM of the '
        'quantized runs in low bit (forward, dX and dW):')
  print(demo.format_results(results))
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='qtrain', description=(
      '4- and 8-bit fully quantized training for JAX/Flax.'))
  sub = parser.add_subparsers(dest='command', required=True)
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
  args = build_parser().parse_args(argv)
  if getattr(args, 'steps', 1) < 1:
    print('qtrain: error: --steps must be >= 1', file=sys.stderr)
    return 2
  return args.func(args)


if __name__ == '__main__':
  sys.exit(main())
