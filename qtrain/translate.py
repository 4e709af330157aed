"""Greedy decoding and corpus BLEU for the `bible_en_es` translation task.

The task's training metric is teacher-forced next-token accuracy; BLEU
(Papineni et al. 2002) scores what the model actually generates. Here:

| function         | does                                                                   |
|------------------|------------------------------------------------------------------------|
| `greedy_decode`  | argmax decoding of a `Seq2SeqTransformer`, BOS-started, stops at EOS   |
| `detokenize`     | generated ids -> strings (cut at EOS, special tokens dropped)          |
| `corpus_bleu`    | sacreBLEU's corpus BLEU (13a tokenization, default smoothing)          |
| `bleu`           | decodes (part of) the test split and scores it against the raw verses  |
| `compare_bleu`   | trains fp32 and quantized recipes on the same data, BLEU for each      |

`python -m qtrain.translate --recipes fp32,int4 --epochs 2 --limit 4096`
prints the BLEU table (the results command; `qtrain compare` itself is left
unchanged and reports token accuracy).

References are the raw Spanish verses (sacreBLEU's convention: detokenized
hypotheses against untouched references), so verses longer than the
task's `max_len` tokens cost the model through the brevity penalty, as they
would any system limited to that length.

Decoding reruns the decoder on a fixed [B, max_len] buffer each step (one
compilation; the model has no KV cache). The causal and padding masks make
position t depend only on tokens ≤ t; under per-tensor dynamic activation
scales the not-yet-decoded (padding) positions do take part in the scale,
exactly as padding does in teacher-forced evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qtrain.data.text import BOS_ID, EOS_ID, PAD_ID

__all__ = ['greedy_decode', 'detokenize', 'corpus_bleu', 'bleu', 'BleuResult', 'compare_bleu',
           'BleuRow', 'format_bleu_table', 'main']


@nnx.jit
def _encode(model, src):
  return model.encode(src)


@nnx.jit
def _next_tokens(model, memory, src, tgt, t):
  logits = model.decode(memory, src, tgt)  # [B, T, V]
  step = jax.lax.dynamic_index_in_dim(logits, t, axis=1, keepdims=False)
  return jnp.argmax(step, axis=-1).astype(jnp.int32)


def greedy_decode(model, src: np.ndarray | jax.Array, *, max_new_tokens: int | None = None,
                  bos_id: int = BOS_ID, eos_id: int = EOS_ID) -> np.ndarray:
  """Argmax decoding of a `qtrain.models.Seq2SeqTransformer`.

  Starts every target with `bos_id` and appends the most likely next token
  until each row has produced `eos_id` or `max_new_tokens` tokens; stops
  early once every row is done.

  Args:
    model: a `Seq2SeqTransformer` (or any module with its `encode(src)` and
      `decode(memory, src, tgt)` and a `tgt_embed.max_len`), in eval mode.
    src: int32 [B, S] source ids, PAD_ID-padded.
    max_new_tokens: most tokens generated per row (EOS included); None =
      the model's target length minus one (for the BOS).
    bos_id: start token.
    eos_id: end token; nothing but PAD_ID follows it.

  Returns:
    int32 [B, max_new_tokens] generated ids (no BOS), PAD_ID after each
    row's EOS (and in rows' unused tail after an early stop).

  Raises:
    ValueError: src is not a 2-D integer array, or max_new_tokens is < 1 or
      does not fit the model's target length.
  """
  src = np.asarray(src)
  if src.ndim != 2 or not np.issubdtype(src.dtype, np.integer):
    raise ValueError(f'src must be an int [B, S] array, got {src.dtype} {src.shape}.')
  limit = model.tgt_embed.max_len - 1
  if max_new_tokens is None:
    max_new_tokens = limit
  if (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or
      not 1 <= max_new_tokens <= limit):
    raise ValueError(f'max_new_tokens={max_new_tokens!r} must be an int in [1, {limit}] '
                     "(the model's target length minus the BOS).")
  batch = src.shape[0]
  src_dev = jnp.asarray(src, jnp.int32)
  memory = _encode(model, src_dev)
  tgt = np.full((batch, max_new_tokens + 1), PAD_ID, np.int32)
  tgt[:, 0] = bos_id
  done = np.zeros(batch, bool)
  for t in range(max_new_tokens):
    nxt = np.asarray(_next_tokens(model, memory, src_dev, jnp.asarray(tgt), jnp.int32(t)))
    tgt[:, t + 1] = np.where(done, PAD_ID, nxt)
    done |= nxt == eos_id
    if done.all():
      break
  return tgt[:, 1:]


def detokenize(tokenizer, ids: np.ndarray, *, eos_id: int = EOS_ID) -> list[str]:
  """Strings of generated (or reference) id rows.

  Args:
    tokenizer: the task's `tokenizers.Tokenizer` (`TaskData.tokenizer`).
    ids: int [N, T]; each row is cut at its first `eos_id`; BOS/PAD and
      other special tokens are dropped.
    eos_id: end token.

  Returns:
    N strings.
  """
  ids = np.asarray(ids)
  if ids.ndim != 2:
    raise ValueError(f'ids must be [N, T], got shape {ids.shape}.')
  rows = []
  for row in ids.tolist():
    if eos_id in row:
      row = row[:row.index(eos_id)]
    rows.append(row)
  return [text.strip() for text in tokenizer.decode_batch(rows, skip_special_tokens=True)]


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
  """sacreBLEU corpus BLEU (0-100) of hypotheses against one reference each.

  Args:
    hypotheses: N detokenized system outputs.
    references: N reference strings.

  Returns:
    BLEU in [0, 100] (13a tokenization, exponential brevity penalty, no
    smoothing beyond sacreBLEU's default 'exp').

  Raises:
    ValueError: the lists differ in length or are empty.
  """
  import sacrebleu  # pylint: disable=import-outside-toplevel
  if len(hypotheses) != len(references) or not hypotheses:
    raise ValueError(f'need as many hypotheses as references (> 0), got {len(hypotheses)} and '
                     f'{len(references)}.')
  return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


class BleuResult(NamedTuple):
  """BLEU of one model on (part of) the test split."""
  score: float
  hypotheses: tuple[str, ...]
  references: tuple[str, ...]
  sources: tuple[str, ...]


def bleu(model, task_data, *, limit: int | None = None, batch_size: int = 64,
         max_new_tokens: int | None = None) -> BleuResult:
  """Greedy-decodes the first `limit` test sources and scores them with corpus BLEU.

  Args:
    model: a trained `Seq2SeqTransformer` for `task_data` (put in eval mode here).
    task_data: `tasks.get('bible_en_es').load(...)` (needs `tokenizer` and `test_text`).
    limit: score only the first `limit` test pairs; None = all.
    batch_size: sentences decoded at once (the last batch is padded to it,
      so one compilation serves all).
    max_new_tokens: see `greedy_decode`.

  Returns:
    BleuResult (score in [0, 100]).

  Raises:
    ValueError: task_data has no tokenizer/test_text, or bad limit/batch_size.
  """
  if task_data.tokenizer is None or task_data.test_text is None or len(task_data.test_text) < 2:
    raise ValueError('task_data has no tokenizer and test (source, reference) strings; load '
                     "it with tasks.get('bible_en_es').load(...).")
  for name, value in (('batch_size', batch_size), ('limit', limit)):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
      raise ValueError(f'{name}={value!r} must be an int >= 1.')
  src = np.asarray(task_data.test[0])
  n = len(src) if limit is None else min(limit, len(src))
  model.eval()
  outputs = []
  for start in range(0, n, batch_size):
    chunk = src[start:min(start + batch_size, n)]
    padded = np.concatenate([chunk, np.full((batch_size - len(chunk), src.shape[1]), PAD_ID,
                                            src.dtype)]) if len(chunk) < batch_size else chunk
    outputs.append(greedy_decode(model, padded, max_new_tokens=max_new_tokens)[:len(chunk)])
  hyps = detokenize(task_data.tokenizer, np.concatenate(outputs))
  refs = [str(r) for r in task_data.test_text[1][:n]]
  sources = tuple(str(s) for s in task_data.test_text[0][:n])
  return BleuResult(corpus_bleu(hyps, refs), tuple(hyps), tuple(refs), sources)


# ---------------------------------------------------------------------------- results command


@dataclasses.dataclass(frozen=True)
class BleuRow:
  """One trained run: its recipe, seed, token accuracy, BLEU and times (s)."""
  recipe: str
  seed: int
  token_accuracy: float
  bleu: float
  train_seconds: float
  decode_seconds: float


def compare_bleu(*, recipes: Sequence[str] = ('fp32', 'int4'), epochs: int = 2,
                 seeds: Sequence[int] = (0,), batch_size: int = 64, lr: float | None = None,
                 limit: int | None = None, width: int | None = None, bleu_limit: int = 256,
                 data_dir: str | None = None, progress: bool = True) -> list[BleuRow]:
  """Trains each recipe on `bible_en_es` (same data, seeds, budget) and reports BLEU.

  Args:
    recipes: registered recipe names, e.g. ('fp32', 'int4_transformer').
    epochs: epochs per run.
    seeds: one run per recipe per seed.
    batch_size: examples per step.
    lr: learning rate (None = each recipe's default, as in `qtrain train`).
    limit: training pairs (None = all 29.5k).
    width: d_model = 32·width (None = 128).
    bleu_limit: test pairs decoded per run.
    data_dir: extra directory for the SWORD modules.
    progress: progress bars and one line per run.

  Returns:
    One BleuRow per (seed, recipe).
  """
  from qtrain import tasks  # pylint: disable=import-outside-toplevel
  from qtrain.train import TrainConfig, train  # pylint: disable=import-outside-toplevel
  configs = {(r, s): TrainConfig(task='bible_en_es', recipe=r, epochs=epochs,
                                 batch_size=batch_size, lr=lr, seed=s, width=width, limit=limit,
                                 data_dir=data_dir)
             for s in seeds for r in recipes}  # validates names before any work
  rows = []
  for seed in seeds:
    data = tasks.get('bible_en_es').load(data_dir=data_dir, seed=seed, limit=limit)
    for recipe in recipes:
      result = train(configs[recipe, seed], task_data=data, progress=progress,
                     save_checkpoints=False)
      start = time.perf_counter()
      scored = bleu(result.model, data, limit=bleu_limit)
      rows.append(BleuRow(recipe, seed, result.test_metric, scored.score, result.seconds,
                          time.perf_counter() - start))
      if progress:
        print(f'  {recipe:<20} seed {seed}: token accuracy {100 * result.test_metric:.2f}%, '
              f'BLEU {scored.score:.2f} ({rows[-1].train_seconds:.0f} s + '
              f'{rows[-1].decode_seconds:.0f} s decoding)', flush=True)
  return rows


def format_bleu_table(rows: Sequence[BleuRow], baseline: str = 'fp32') -> str:
  """Markdown table: per recipe, mean token accuracy, mean BLEU and ΔBLEU vs `baseline`."""
  by_recipe: dict[str, list[BleuRow]] = {}
  for r in rows:
    by_recipe.setdefault(r.recipe, []).append(r)
  base = by_recipe.get(baseline)
  lines = ['| recipe | seeds | test token accuracy (%) | BLEU | ΔBLEU vs fp32 | time (s) |',
           '|---|---|---|---|---|---|']
  for name, rs in by_recipe.items():
    score = float(np.mean([r.bleu for r in rs]))
    delta = f'{score - float(np.mean([r.bleu for r in base])):+.2f}' if base else '—'
    lines.append(f'| {name} | {len(rs)} | {100 * np.mean([r.token_accuracy for r in rs]):.2f} | '
                 f'{score:.2f} | {delta} | '
                 f'{sum(r.train_seconds + r.decode_seconds for r in rs):.0f} |')
  return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
  """`python -m qtrain.translate`: train recipes on bible_en_es and print the BLEU table."""
  p = argparse.ArgumentParser(prog='python -m qtrain.translate', description=(
      'Train recipes on bible_en_es (En->Es) and report greedy-decoding BLEU on the test '
      'split next to fp32.'))
  p.add_argument('--recipes', default='fp32,int4', help='comma list (fp32,int4)')
  p.add_argument('--epochs', type=int, default=2)
  p.add_argument('--seeds', default='0', help='comma list of seeds (0)')
  p.add_argument('--batch-size', type=int, default=64)
  p.add_argument('--lr', type=float, default=None)
  p.add_argument('--limit', type=int, default=None, help='training pairs (all)')
  p.add_argument('--width', type=int, default=None, help='d_model = 32·width (128)')
  p.add_argument('--bleu-limit', type=int, default=256, help='test pairs decoded (256)')
  p.add_argument('--data-dir', default=None)
  p.add_argument('--no-progress', action='store_true')
  args = p.parse_args(argv)
  try:
    rows = compare_bleu(recipes=[r.strip() for r in args.recipes.split(',') if r.strip()],
                        epochs=args.epochs, seeds=[int(s) for s in args.seeds.split(',')],
                        batch_size=args.batch_size, lr=args.lr, limit=args.limit,
                        width=args.width, bleu_limit=args.bleu_limit, data_dir=args.data_dir,
                        progress=not args.no_progress)
  except (ValueError, FileNotFoundError) as e:
    print(f'qtrain.translate: error: {e}', file=sys.stderr)
    return 2
  print(format_bleu_table(rows))
  return 0


if __name__ == '__main__':
  sys.exit(main())
