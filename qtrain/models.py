"""A small Flax NNX model zoo for CPU-sized quantized-training experiments.

Every model is sized up by constructor arguments and names its layers so that
`qtrain.quantize_model` rules can single out the layers papers keep in high
precision:

* `stem`: the first convolution (CNNs only; the transformers start with an
  `nnx.Embed`, which has no matmul to quantize).
* `head`: the final classifier / vocabulary projection (every model).

So `QuantRule(module_path='stem|head', config=None)` followed by a catch-all
rule reproduces the usual "first and last layer float" setup.

| name             | parameters at defaults | input                                  |
|------------------|------------------------|----------------------------------------|
| `lenet`          | 34,622                 | float32 [B, H, W, C], any H, W >= 1    |
| `resnet20`       | 269,722                | float32 [B, H, W, C] (28/32 px typical)|
| `mobilenetv2`    | 67,402 (width ×0.35)   | float32 [B, H, W, C] (28/32 px typical)|
| `transformer_lm` | 478,976 (vocab 256)    | int32 tokens [B, L], L <= max_len      |
| `seq2seq`        | 1,057,536 (vocabs 256) | int32 src [B, S], tgt [B, T], pad id 0 |
| `vit`            | 205,066 (28 px, 7×7)   | float32 [B, S, S, C], S = image_size   |
| `minilm`         | 22,569,226 (pretrained)| int32 WordPiece ids [B, L], pad id 0   |
| `bert_tiny`      | 1,018,954 (random init)| int32 WordPiece ids [B, L], pad id 0   |

`vit` lives in `qtrain.vit`, `minilm` (all-MiniLM-L6-v2 + a classification
head) and `bert_tiny` in `qtrain.bert`; they are imported on first use so
that importing the zoo stays light.

(10 classes; 1 input channel for `lenet`, 3 for the other CNNs; the counts
are pinned in `tests/models_test.py`.)

BatchNorm models follow NNX's mode switch: `model.train()` normalises with
batch statistics and updates the running averages, `model.eval()` uses the
running averages and leaves them untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ['LeNet', 'ResNet20', 'MobileNetV2', 'TransformerLM', 'Seq2SeqTransformer',
           'MODELS', 'create', 'adaptive_avg_pool', 'PAD_ID']

# Token id treated as padding by `Seq2SeqTransformer`.
PAD_ID = 0


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
  """Averages `x` over an `output_size` grid of (possibly overlapping) bins.

  Same binning as PyTorch's `AdaptiveAvgPool2d`: output cell i along an axis
  of length n averages input rows [floor(i*n/o), ceil((i+1)*n/o)). When n < o,
  input rows are repeated, so the output shape is independent of the input
  size (what lets `LeNet` keep one classifier for 8, 28 and 32 px inputs).

  Args:
    x: [B, H, W, C] feature map, any float dtype.
    output_size: (OH, OW), the spatial size of the result.

  Returns:
    [B, OH, OW, C], same dtype as `x`.
  """
  _, h, w, _ = x.shape
  oh, ow = output_size
  if h % oh == 0 and w % ow == 0:
    # Exact tiling: one reshape-mean instead of OH*OW slices.
    b, _, _, c = x.shape
    return x.reshape(b, oh, h // oh, ow, w // ow, c).mean(axis=(2, 4))

  def bounds(i, n, o):
    return (i * n) // o, -((-(i + 1) * n) // o)  # floor, ceil

  rows = []
  for i in range(oh):
    r0, r1 = bounds(i, h, oh)
    cols = []
    for j in range(ow):
      c0, c1 = bounds(j, w, ow)
      cols.append(x[:, r0:r1, c0:c1, :].mean(axis=(1, 2)))
    rows.append(jnp.stack(cols, axis=1))
  return jnp.stack(rows, axis=1)


# ----------------------------------------------------------------------------
# LeNet
# ----------------------------------------------------------------------------


class LeNet(nnx.Module):
  """LeNet-5-style CNN: conv-pool-conv-pool-dense-dense.

  Convolutions use SAME padding and the pools pad odd sizes (7 -> 4), so the
  network runs on inputs as small as 1×1; before flattening, an adaptive
  average pool maps the feature map to the 4×4 grid classic LeNet-5 has at
  28×28, so one classifier serves 8×8 digits, 28×28 MNIST and 32×32 CIFAR.

  Layers: `stem` (5×5 conv, 6·width), `conv2` (5×5 conv, 16·width), `fc1`
  (dense, 120·width), `head` (dense, num_classes). With `batch_norm=True`
  each conv is followed by a BatchNorm (`stem_bn`, `conv2_bn`; the convs then
  have no bias), the small CNN-with-BatchNorm the paper recipes' tests use.

  Args:
    num_classes: output logits.
    in_channels: input channels (1 for MNIST/digits, 3 for CIFAR).
    width: channel/unit multiplier.
    batch_norm: add BatchNorm after each convolution.
    rngs: an `nnx.Rngs` with a 'params' (or 'default') stream.
  """

  def __init__(self, num_classes: int = 10, in_channels: int = 1, *, width: int = 1,
               batch_norm: bool = False, rngs: nnx.Rngs):
    c1, c2, hidden = 6 * width, 16 * width, 120 * width
    self.stem = nnx.Conv(in_channels, c1, (5, 5), padding='SAME', use_bias=not batch_norm,
                         rngs=rngs)
    self.conv2 = nnx.Conv(c1, c2, (5, 5), padding='SAME', use_bias=not batch_norm, rngs=rngs)
    self.stem_bn = _batch_norm(c1, rngs) if batch_norm else None
    self.conv2_bn = _batch_norm(c2, rngs) if batch_norm else None
    self.fc1 = nnx.Linear(4 * 4 * c2, hidden, rngs=rngs)
    self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits of a batch of images.

    Args:
      x: float32 [B, H, W, in_channels].

    Returns:
      float32 [B, num_classes].
    """
    for conv, bn in ((self.stem, self.stem_bn), (self.conv2, self.conv2_bn)):
      x = conv(x)
      if bn is not None:
        x = bn(x)
      x = nnx.max_pool(nnx.relu(x), (2, 2), strides=(2, 2), padding='SAME')
    x = adaptive_avg_pool(x, (4, 4))
    x = nnx.relu(self.fc1(x.reshape(x.shape[0], -1)))
    return self.head(x)


# ----------------------------------------------------------------------------
# ResNet-20
# ----------------------------------------------------------------------------


def _batch_norm(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
  # momentum 0.9 (PyTorch's 0.1): short CPU runs need the running stats to
  # catch up within a few hundred steps; flax's default 0.99 lags badly.
  return nnx.BatchNorm(features, momentum=0.9, rngs=rngs)


class BasicBlock(nnx.Module):
  """conv3×3-BN-ReLU-conv3×3-BN + option-A shortcut, then ReLU.

  Option A (He et al. 2016, CIFAR ResNets): when the block downsamples, the
  shortcut takes every other pixel and zero-pads the new channels, so it has
  no parameters (and no matmul for quantization to touch).
  """

  def __init__(self, in_ch: int, out_ch: int, stride: int, *, rngs: nnx.Rngs):
    self.stride = stride
    self.pad_ch = out_ch - in_ch
    self.conv1 = nnx.Conv(in_ch, out_ch, (3, 3), strides=stride, padding='SAME',
                          use_bias=False, rngs=rngs)
    self.bn1 = _batch_norm(out_ch, rngs)
    self.conv2 = nnx.Conv(out_ch, out_ch, (3, 3), padding='SAME', use_bias=False, rngs=rngs)
    self.bn2 = _batch_norm(out_ch, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, in_ch] -> [B, ceil(H/stride), ceil(W/stride), out_ch]."""
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    shortcut = x
    if self.stride != 1:
      # ::stride matches SAME-padded strided conv's ceil(H/stride) for odd H.
      shortcut = shortcut[:, ::self.stride, ::self.stride, :]
    if self.pad_ch:
      lo = self.pad_ch // 2
      shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (lo, self.pad_ch - lo)))
    return nnx.relu(y + shortcut)


class ResNet20(nnx.Module):
  """CIFAR-style ResNet-20: stem + 3 stages × 3 basic blocks + GAP + head.

  Stages have width, 2·width, 4·width channels; the first block of stages 2
  and 3 has stride 2. Shortcuts are option A (parameter-free, see
  `BasicBlock`). Global average pooling makes the head independent of the
  input size (28×28 -> 7×7, 32×32 -> 8×8 before pooling).

  Layers: `stem` (3×3 conv) + `stem_bn`, `stages/{s}/{b}/conv{1,2}` and
  `.../bn{1,2}`, `head` (dense). BatchNorm follows `model.train()` /
  `model.eval()`.

  Args:
    num_classes: output logits.
    in_channels: input channels.
    width: channels of the first stage (16 in the paper).
    rngs: an `nnx.Rngs` with a 'params' (or 'default') stream.
  """

  def __init__(self, num_classes: int = 10, in_channels: int = 3, *, width: int = 16,
               rngs: nnx.Rngs):
    self.stem = nnx.Conv(in_channels, width, (3, 3), padding='SAME', use_bias=False, rngs=rngs)
    self.stem_bn = _batch_norm(width, rngs)
    stages, ch = [], width
    for s in range(3):
      out = width * 2**s
      blocks = []
      for b in range(3):
        blocks.append(BasicBlock(ch, out, 2 if (s > 0 and b == 0) else 1, rngs=rngs))
        ch = out
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)
    self.head = nnx.Linear(ch, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits of a batch of images.

    Args:
      x: float32 [B, H, W, in_channels].

    Returns:
      float32 [B, num_classes].
    """
    x = nnx.relu(self.stem_bn(self.stem(x)))
    for stage in self.stages:
      for block in stage:
        x = block(x)
    return self.head(x.mean(axis=(1, 2)))


# ----------------------------------------------------------------------------
# MobileNetV2
# ----------------------------------------------------------------------------


def _make_divisible(v: float, divisor: int = 8) -> int:
  """MobileNet channel rounding: nearest multiple of `divisor`, never < 90% of v."""
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return new_v + divisor if new_v < 0.9 * v else new_v


class InvertedResidual(nnx.Module):
  """MobileNetV2 block: 1×1 expand-BN-ReLU6, 3×3 depthwise-BN-ReLU6, 1×1 project-BN.

  The projection is linear (no activation: the paper's "linear bottleneck");
  a residual is added when stride is 1 and channels match. With expand_ratio
  1 the expansion conv is omitted, as in the paper.
  """

  def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int, *,
               rngs: nnx.Rngs):
    hidden = in_ch * expand_ratio
    self.use_residual = stride == 1 and in_ch == out_ch
    if expand_ratio != 1:
      self.expand = nnx.Conv(in_ch, hidden, (1, 1), use_bias=False, rngs=rngs)
      self.expand_bn = _batch_norm(hidden, rngs)
    else:
      self.expand = self.expand_bn = None
    self.depthwise = nnx.Conv(hidden, hidden, (3, 3), strides=stride, padding='SAME',
                              feature_group_count=hidden, use_bias=False, rngs=rngs)
    self.depthwise_bn = _batch_norm(hidden, rngs)
    self.project = nnx.Conv(hidden, out_ch, (1, 1), use_bias=False, rngs=rngs)
    self.project_bn = _batch_norm(out_ch, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, in_ch] -> [B, ceil(H/stride), ceil(W/stride), out_ch]."""
    y = x
    if self.expand is not None:
      y = nnx.relu6(self.expand_bn(self.expand(y)))
    y = nnx.relu6(self.depthwise_bn(self.depthwise(y)))
    y = self.project_bn(self.project(y))
    return x + y if self.use_residual else y


# (expand_ratio t, channels c, repeats n, first stride s). The ImageNet list
# has 7 stages and total stride 32; for 28/32 px inputs the stem is stride 1
# and only two stages downsample (28 -> 14 -> 7, 32 -> 16 -> 8), and the
# 160/320-channel stages are dropped to keep a CPU step cheap.
MOBILENETV2_SMALL_STAGES: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 3, 2),
    (6, 96, 2, 1),
)


class MobileNetV2(nnx.Module):
  """Narrow MobileNetV2 for small images (reduced stage list, stride-1 stem).

  Layers: `stem` (3×3 conv, 32·width_mult channels) + `stem_bn`,
  `blocks/{i}` (`InvertedResidual`: `expand`, `depthwise`, `project` convs
  with their `*_bn`), `last_conv` (1×1) + `last_bn`, global average pooling,
  `head` (dense). Channel counts are rounded to multiples of 8.

  Args:
    num_classes: output logits.
    in_channels: input channels.
    width_mult: channel multiplier (1.0 is the paper's; 0.35 its narrowest).
    stages: (t, c, n, s) rows; default `MOBILENETV2_SMALL_STAGES`.
    rngs: an `nnx.Rngs` with a 'params' (or 'default') stream.
  """

  def __init__(self, num_classes: int = 10, in_channels: int = 3, *, width_mult: float = 0.35,
               stages: tuple[tuple[int, int, int, int], ...] = MOBILENETV2_SMALL_STAGES,
               rngs: nnx.Rngs):
    ch = _make_divisible(32 * width_mult)
    self.stem = nnx.Conv(in_channels, ch, (3, 3), padding='SAME', use_bias=False, rngs=rngs)
    self.stem_bn = _batch_norm(ch, rngs)
    blocks = []
    for t, c, n, s in stages:
      out = _make_divisible(c * width_mult)
      for i in range(n):
        blocks.append(InvertedResidual(ch, out, s if i == 0 else 1, t, rngs=rngs))
        ch = out
    self.blocks = nnx.List(blocks)
    # The paper keeps 1280 for width_mult < 1; 4× the last stage is plenty for
    # 10 classes and keeps this 1×1 conv from dominating the CPU cost.
    last = _make_divisible(4 * ch)
    self.last_conv = nnx.Conv(ch, last, (1, 1), use_bias=False, rngs=rngs)
    self.last_bn = _batch_norm(last, rngs)
    self.head = nnx.Linear(last, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits of a batch of images.

    Args:
      x: float32 [B, H, W, in_channels].

    Returns:
      float32 [B, num_classes].
    """
    x = nnx.relu6(self.stem_bn(self.stem(x)))
    for block in self.blocks:
      x = block(x)
    x = nnx.relu6(self.last_bn(self.last_conv(x)))
    return self.head(x.mean(axis=(1, 2)))


# ----------------------------------------------------------------------------
# Transformers
# ----------------------------------------------------------------------------


def _attention(d_model: int, num_heads: int, rngs: nnx.Rngs) -> nnx.MultiHeadAttention:
  # decode=False: no KV cache to initialise; keep_rngs=False: no dropout, so
  # no RNG state in the model (simpler checkpoints and train steps).
  return nnx.MultiHeadAttention(num_heads, d_model, dropout_rate=0.0, decode=False,
                                keep_rngs=False, rngs=rngs)


class MLP(nnx.Module):
  """Transformer feed-forward: `fc1` (d -> 4d), GELU, `fc2` (4d -> d)."""

  def __init__(self, d_model: int, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(d_model, 4 * d_model, rngs=rngs)
    self.fc2 = nnx.Linear(4 * d_model, d_model, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., d_model] -> [..., d_model]."""
    return self.fc2(nnx.gelu(self.fc1(x)))


class DecoderBlock(nnx.Module):
  """Pre-LN block: x + attn(LN(x)) [+ x + cross(LN(x), memory)] + x + MLP(LN(x)).

  With `cross=False` this is a decoder-only (GPT) block, and with a
  non-causal mask an encoder block.
  """

  def __init__(self, d_model: int, num_heads: int, *, cross: bool = False, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
    self.attn = _attention(d_model, num_heads, rngs)
    if cross:
      self.ln_cross = nnx.LayerNorm(d_model, rngs=rngs)
      self.cross_attn = _attention(d_model, num_heads, rngs)
    else:
      self.ln_cross = self.cross_attn = None
    self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
    self.mlp = MLP(d_model, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None, memory: jax.Array | None = None,
               cross_mask: jax.Array | None = None) -> jax.Array:
    """One block.

    Args:
      x: float32 [B, L, d_model].
      mask: bool [B, 1, L, L] self-attention mask (True = attend), or None.
      memory: float32 [B, S, d_model] encoder output (cross-attention blocks).
      cross_mask: bool [B, 1, L, S] cross-attention mask, or None.

    Returns:
      float32 [B, L, d_model].
    """
    h = self.ln1(x)
    x = x + self.attn(h, h, h, mask=mask)
    if self.cross_attn is not None:
      x = x + self.cross_attn(self.ln_cross(x), memory, memory, mask=cross_mask)
    return x + self.mlp(self.ln2(x))


class _Embedding(nnx.Module):
  """Token embedding + learned absolute position embedding."""

  def __init__(self, vocab_size: int, d_model: int, max_len: int, *, rngs: nnx.Rngs):
    self.max_len = max_len
    self.tokens = nnx.Embed(vocab_size, d_model, rngs=rngs)
    self.positions = nnx.Embed(max_len, d_model, rngs=rngs)

  def __call__(self, ids: jax.Array) -> jax.Array:
    """int [B, L] -> float32 [B, L, d_model]; raises if L > max_len."""
    length = ids.shape[1]
    if length > self.max_len:
      raise ValueError(f'sequence length {length} exceeds max_len={self.max_len}.')
    return self.tokens(ids) + self.positions(jnp.arange(length))[None]


class TransformerLM(nnx.Module):
  """Small pre-LN decoder-only language model (GPT-style).

  Layers: `embed` (token + learned position `nnx.Embed`), `blocks/{i}`
  (`ln1`, causal `attn` with `query/key/value/out` projections, `ln2`,
  `mlp/fc1`, `mlp/fc2`), `ln_f`, `head` (d_model -> vocab, untied so it can
  stay float while the blocks are quantized).

  Args:
    vocab_size: number of token ids.
    d_model: embedding width (divisible by num_heads).
    num_heads: attention heads.
    num_layers: decoder blocks.
    max_len: longest sequence (size of the position table).
    rngs: an `nnx.Rngs` with a 'params' (or 'default') stream.
  """

  def __init__(self, vocab_size: int, *, d_model: int = 128, num_heads: int = 4,
               num_layers: int = 2, max_len: int = 128, rngs: nnx.Rngs):
    self.embed = _Embedding(vocab_size, d_model, max_len, rngs=rngs)
    self.blocks = nnx.List([DecoderBlock(d_model, num_heads, rngs=rngs)
                            for _ in range(num_layers)])
    self.ln_f = nnx.LayerNorm(d_model, rngs=rngs)
    self.head = nnx.Linear(d_model, vocab_size, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Next-token logits; position t depends only on tokens[:, :t+1].

    Args:
      tokens: int32 [B, L], L <= max_len.

    Returns:
      float32 [B, L, vocab_size].
    """
    x = self.embed(tokens)
    mask = nnx.make_causal_mask(tokens)  # [B, 1, L, L]
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.ln_f(x))


class Seq2SeqTransformer(nnx.Module):
  """Pre-LN encoder-decoder transformer with padding masks (pad id `PAD_ID` = 0).

  Only key positions are masked: a padded source token is never attended to
  (encoder self-attention and decoder cross-attention), nor is a padded
  target token (decoder self-attention, on top of the causal mask). Outputs
  at padded positions are computed but meaningless: mask them in the loss.

  Layers: `src_embed`, `tgt_embed`, `encoder/{i}` (`attn`, `mlp`),
  `enc_ln`, `decoder/{i}` (`attn`, `cross_attn`, `mlp`), `dec_ln`, `head`
  (d_model -> tgt_vocab).

  Args:
    src_vocab: source token ids.
    tgt_vocab: target token ids.
    d_model: embedding width (divisible by num_heads).
    num_heads: attention heads.
    num_layers: encoder blocks and decoder blocks (each).
    max_len: longest source or target sequence.
    rngs: an `nnx.Rngs` with a 'params' (or 'default') stream.
  """

  def __init__(self, src_vocab: int, tgt_vocab: int, *, d_model: int = 128, num_heads: int = 4,
               num_layers: int = 2, max_len: int = 128, rngs: nnx.Rngs):
    self.src_embed = _Embedding(src_vocab, d_model, max_len, rngs=rngs)
    self.tgt_embed = _Embedding(tgt_vocab, d_model, max_len, rngs=rngs)
    self.encoder = nnx.List([DecoderBlock(d_model, num_heads, rngs=rngs)
                             for _ in range(num_layers)])
    self.enc_ln = nnx.LayerNorm(d_model, rngs=rngs)
    self.decoder = nnx.List([DecoderBlock(d_model, num_heads, cross=True, rngs=rngs)
                             for _ in range(num_layers)])
    self.dec_ln = nnx.LayerNorm(d_model, rngs=rngs)
    self.head = nnx.Linear(d_model, tgt_vocab, rngs=rngs)

  def encode(self, src: jax.Array) -> jax.Array:
    """Encoder states.

    Args:
      src: int32 [B, S], PAD_ID at padded positions.

    Returns:
      float32 [B, S, d_model].
    """
    x = self.src_embed(src)
    mask = _key_padding_mask(src, src)
    for block in self.encoder:
      x = block(x, mask)
    return self.enc_ln(x)

  def decode(self, memory: jax.Array, src: jax.Array, tgt: jax.Array) -> jax.Array:
    """Target logits given encoder states (teacher forcing).

    Args:
      memory: float32 [B, S, d_model] from `encode(src)`.
      src: int32 [B, S], the source (for its padding mask).
      tgt: int32 [B, T] decoder inputs (shifted right), PAD_ID at padding.

    Returns:
      float32 [B, T, tgt_vocab].
    """
    x = self.tgt_embed(tgt)
    self_mask = nnx.combine_masks(nnx.make_causal_mask(tgt), _key_padding_mask(tgt, tgt))
    cross_mask = _key_padding_mask(tgt, src)
    for block in self.decoder:
      x = block(x, self_mask, memory, cross_mask)
    return self.head(self.dec_ln(x))

  def __call__(self, src: jax.Array, tgt: jax.Array) -> jax.Array:
    """`decode(encode(src), src, tgt)`: int32 [B, S], [B, T] -> float32 [B, T, tgt_vocab]."""
    return self.decode(self.encode(src), src, tgt)


def _key_padding_mask(query_ids: jax.Array, key_ids: jax.Array) -> jax.Array:
  """bool [B, 1, Lq, Lk]: True where the key is not padding.

  Queries are not masked: a fully masked row would softmax over nothing
  (flax then spreads it uniformly over padding, harmless but confusing), and
  outputs at padded queries are dropped by the loss anyway.
  """
  return nnx.make_attention_mask(jnp.ones(query_ids.shape, bool), key_ids != PAD_ID)


# ----------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------

def _vit(**kwargs: Any) -> nnx.Module:
  from qtrain.vit import ViT  # pylint: disable=import-outside-toplevel
  return ViT(**kwargs)


def _minilm(**kwargs: Any) -> nnx.Module:
  from qtrain.bert import create_minilm_classifier  # pylint: disable=import-outside-toplevel
  return create_minilm_classifier(**kwargs)


def _bert_tiny(**kwargs: Any) -> nnx.Module:
  from qtrain.bert import create_tiny_classifier  # pylint: disable=import-outside-toplevel
  return create_tiny_classifier(**kwargs)


MODELS: dict[str, Callable[..., nnx.Module]] = {
    'lenet': LeNet,
    'resnet20': ResNet20,
    'mobilenetv2': MobileNetV2,
    'transformer_lm': TransformerLM,
    'seq2seq': Seq2SeqTransformer,
    'vit': _vit,
    'minilm': _minilm,
    'bert_tiny': _bert_tiny,
}


def create(name: str, **kwargs: Any) -> nnx.Module:
  """Builds a model of the zoo by registry name.

  Args:
    name: a key of `MODELS`.
    **kwargs: the constructor's arguments (including `rngs`).

  Returns:
    The new model.

  Raises:
    ValueError: `name` is not in `MODELS` (the message lists valid names).

  Examples:
    >>> from flax import nnx
    >>> from qtrain import models
    >>> model = models.create('lenet', num_classes=10, rngs=nnx.Rngs(0))
    >>> type(model).__name__
    'LeNet'
  """
  try:
    ctor = MODELS[name]
  except KeyError:
    raise ValueError(f'unknown model {name!r}; valid names: {sorted(MODELS)}.') from None
  return ctor(**kwargs)
