"""Offline subword tokenizers (Hugging Face `tokenizers`) and padded int32 encodings."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

PAD, BOS, EOS = '<pad>', '<s>', '</s>'
# Fixed ids: padding is 0 so masks are `ids != 0` and zero-filled buffers are padding.
SPECIAL_TOKENS = (PAD, BOS, EOS)
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def train_tokenizer(texts: Iterable[str], vocab_size: int = 8000, *, min_frequency: int = 2):
  """Trains a byte-level BPE tokenizer on `texts`, offline.

  Byte-level: every string round-trips exactly through encode/decode (accents,
  '¡', ASCII art), with no unknown token. Training is deterministic for the same
  texts in the same order.

  Args:
    texts: training corpus; a list, or any iterable (consumed once).
    vocab_size: target vocabulary size including the 256 bytes and SPECIAL_TOKENS.
    min_frequency: merges must occur at least this often.

  Returns:
    A `tokenizers.Tokenizer` with PAD_ID, BOS_ID, EOS_ID at ids 0, 1, 2.
  """
  # Imported here so `import qtrain.data` stays light for the image datasets.
  # pylint: disable-next=import-outside-toplevel
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  if [tok.token_to_id(t) for t in SPECIAL_TOKENS] != [PAD_ID, BOS_ID, EOS_ID]:
    raise AssertionError('special token ids moved; padding would collide with text')
  return tok


def encode_texts(tokenizer, texts: Sequence[str], max_len: int, *, add_bos: bool = False,
                 add_eos: bool = False) -> np.ndarray:
  """Encodes texts to one padded, truncated id matrix.

  Args:
    tokenizer: from `train_tokenizer` (PAD_ID 0, BOS_ID 1, EOS_ID 2).
    texts: N strings.
    max_len: output length; longer encodings are truncated (EOS kept last).
    add_bos: prepend BOS_ID (decoder inputs / targets).
    add_eos: append EOS_ID.

  Returns:
    int32 [N, max_len], PAD_ID after each text's tokens.
  """
  out = np.full((len(texts), max_len), PAD_ID, np.int32)
  for row, enc in zip(out, tokenizer.encode_batch(list(texts))):
    ids = ([BOS_ID] if add_bos else []) + enc.ids
    # Truncate before appending EOS so a cut sentence still ends in EOS.
    ids = ids[:max_len - 1] + [EOS_ID] if add_eos else ids[:max_len]
    row[:len(ids)] = ids
  return out


def encode_pairs(tokenizer, sources: Sequence[str], targets: Sequence[str], *,
                 max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Encodes translation pairs for an encoder-decoder.

  Args:
    tokenizer: shared source/target tokenizer from `train_tokenizer`.
    sources: N source sentences.
    targets: N target sentences.
    max_len: length of both outputs.

  Returns:
    (src int32 [N, max_len] ending in EOS, tgt int32 [N, max_len] as BOS ... EOS),
    PAD_ID-padded. Teacher forcing uses tgt[:, :-1] as input and tgt[:, 1:] as labels.
  """
  if len(sources) != len(targets):
    raise ValueError(f'{len(sources)} sources but {len(targets)} targets')
  return (encode_texts(tokenizer, sources, max_len, add_eos=True),
          encode_texts(tokenizer, targets, max_len, add_bos=True, add_eos=True))
