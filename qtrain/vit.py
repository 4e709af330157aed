"""A small Vision Transformer (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words").

Sized for CPU runs on 8×8 digits and 28×28 Fashion-MNIST: the image is cut
into a grid of non-overlapping patches (4×4 by default), each patch is
flattened and projected by an `nnx.Linear` (the paper's Eq. 1 "E"; a Linear
rather than a strided Conv, so `qtrain.quantize_model` and post-training
quantizers treat it as the dense layer it is), a learned class token is
prepended and learned position embeddings added, then pre-LN blocks of
multi-head self-attention and a GELU MLP (Eqs. 2-3), a final LayerNorm and a
linear head on the class token (Eq. 4).

Module paths (for `QuantRule(module_path=...)`; `stem|head` keeps the first
and last layer float, as for the zoo's CNNs):

| path                                   | module                  | shape (defaults, 28 px)    |
|----------------------------------------|-------------------------|----------------------------|
| `stem`                                 | nnx.Linear              | 49 -> 64 (patch 7×7×1)     |
| `cls_token`, `pos_embed`               | nnx.Param               | [1, 1, 64], [1, 17, 64]    |
| `blocks/{i}/ln1`, `blocks/{i}/ln2`     | nnx.LayerNorm           | 64                         |
| `blocks/{i}/attn`                      | nnx.MultiHeadAttention  | 4 heads of 16              |
| `blocks/{i}/attn/{query,key,value}`    | nnx.LinearGeneral       | [64, 4, 16]                |
| `blocks/{i}/attn/out`                  | nnx.LinearGeneral       | [4, 16, 64]                |
| `blocks/{i}/mlp/fc1`, `.../mlp/fc2`    | nnx.Linear              | 64 -> 256 -> 64            |
| `ln_f`                                 | nnx.LayerNorm           | 64                         |
| `head`                                 | nnx.Linear              | 64 -> num_classes          |

The blocks are the zoo's `qtrain.models.DecoderBlock` without a mask (so
the same attention hooks apply); its MLP uses flax's default tanh-approximate
GELU where the paper's code uses the exact one, a difference training does
not notice. No dropout (CPU-sized runs, deterministic steps).

Examples:
  >>> from flax import nnx
  >>> from qtrain.vit import ViT
  >>> model = ViT(num_classes=10, in_channels=1, image_size=28, rngs=nnx.Rngs(0))
  >>> model.num_patches, model.patch_size
  (16, 7)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from qtrain.models import DecoderBlock

__all__ = ['ViT', 'patchify']


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """Cuts images into non-overlapping square patches, flattened row-major.

  Args:
    images: [B, H, W, C], H and W divisible by `patch_size`.
    patch_size: patch side P in pixels.

  Returns:
    [B, (H/P)·(W/P), P·P·C], patches in raster order, each flattened as
    (row, column, channel) — the layout a P×P conv kernel of stride P reads.

  Raises:
    ValueError: H or W not divisible by `patch_size`.
  """
  b, h, w, c = images.shape
  if h % patch_size or w % patch_size:
    raise ValueError(f'image size {h}x{w} is not divisible by patch_size={patch_size}.')
  gh, gw = h // patch_size, w // patch_size
  x = images.reshape(b, gh, patch_size, gw, patch_size, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, gh, gw, P, P, C]
  return x.reshape(b, gh * gw, patch_size * patch_size * c)


class ViT(nnx.Module):
  """Vision Transformer classifier: patch embedding, class token, pre-LN blocks, head.

  Args:
    num_classes: output logits.
    in_channels: image channels.
    image_size: side of the (square) input images in pixels.
    patch_size: patch side; None = image_size // 4 (a 4×4 grid, 16 patches:
      7 px on 28×28, 2 px on 8×8), which keeps a CPU step cheap.
    d_model: token width (divisible by num_heads).
    num_heads: attention heads.
    num_layers: transformer blocks.
    width: if given, d_model = 32·width (the `--width` convention of the
      zoo's transformers); overrides `d_model`.
    rngs: an `nnx.Rngs` with a 'params' (or 'default') stream.

  Raises:
    ValueError: image_size not divisible by patch_size, d_model not
      divisible by num_heads, or a non-positive size.
  """

  def __init__(self, num_classes: int = 10, in_channels: int = 1, *, image_size: int = 28,
               patch_size: int | None = None, d_model: int = 64, num_heads: int = 4,
               num_layers: int = 4, width: int | None = None, rngs: nnx.Rngs):
    if width is not None:
      d_model = 32 * width
    if patch_size is None:
      patch_size = max(1, image_size // 4)
    for name, value in (('num_classes', num_classes), ('in_channels', in_channels),
                        ('image_size', image_size), ('patch_size', patch_size),
                        ('d_model', d_model), ('num_heads', num_heads),
                        ('num_layers', num_layers)):
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'{name}={value!r} must be an int >= 1.')
    if image_size % patch_size:
      raise ValueError(f'image_size={image_size} is not divisible by patch_size={patch_size}.')
    if d_model % num_heads:
      raise ValueError(f'd_model={d_model} is not divisible by num_heads={num_heads}.')
    self.image_size, self.patch_size, self.in_channels = image_size, patch_size, in_channels
    self.num_patches = (image_size // patch_size)**2
    self.stem = nnx.Linear(patch_size * patch_size * in_channels, d_model, rngs=rngs)
    init = nnx.initializers.normal(0.02)
    self.cls_token = nnx.Param(init(rngs.params(), (1, 1, d_model)))
    self.pos_embed = nnx.Param(init(rngs.params(), (1, self.num_patches + 1, d_model)))
    self.blocks = nnx.List([DecoderBlock(d_model, num_heads, rngs=rngs)
                            for _ in range(num_layers)])
    self.ln_f = nnx.LayerNorm(d_model, rngs=rngs)
    self.head = nnx.Linear(d_model, num_classes, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    """Logits of a batch of images.

    Args:
      images: float32 [B, image_size, image_size, in_channels].

    Returns:
      float32 [B, num_classes].

    Raises:
      ValueError: images of another size or channel count.
    """
    expected = (self.image_size, self.image_size, self.in_channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(f'images must be [B, {", ".join(map(str, expected))}], got shape '
                       f'{tuple(images.shape)}.')
    x = self.stem(patchify(images, self.patch_size))  # [B, N, d]
    cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, x.shape[2]))
    x = jnp.concatenate([cls, x], axis=1)
    x = x + jnp.broadcast_to(self.pos_embed[...], x.shape)
    for block in self.blocks:
      x = block(x, None)
    return self.head(self.ln_f(x[:, 0]))
