"""The DIP "skip" hourglass (Ulyanov et al. 2018) and IDIP's complex connection.

Layout mirrors `models/skip.py` of the official DIP code, with its denoising
defaults (`get_net(..., 'skip', pad='reflection', skip_n33d=128, skip_n33u=128,
skip_n11=4, num_scales=5, upsample_mode='bilinear')`). Tensors are NHWC.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from idip_jax import convs
from idip_jax.config import NetConfig

# config.ACTIVATIONS -> function.
ACTIVATIONS: Mapping[str, Callable[[jax.Array], jax.Array]] = types.MappingProxyType(
  {
    "leaky_relu": lambda x: nn.leaky_relu(x, negative_slope=0.2),
    "relu": nn.relu,
    "elu": nn.elu,
  }
)


class ImageNorm(nn.Module):
  """BatchNorm in training mode, as DIP always runs it.

  DIP never switches the net to eval mode, so every forward pass normalises with
  the statistics of the current batch, which is the single image being fitted.
  Under `vmap` over images each image therefore sees only its own statistics,
  and no running averages are needed.
  """

  eps: float = 1e-5

  @nn.compact
  def __call__(self, x_NxHxWxC: jax.Array) -> jax.Array:
    c = x_NxHxWxC.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    x = x_NxHxWxC.astype(jnp.float32)
    mean = x.mean(axis=(0, 1, 2))
    var = jnp.square(x - mean).mean(axis=(0, 1, 2))
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * scale + bias).astype(x_NxHxWxC.dtype)


def torch_conv_init(fan_in: int):
  """PyTorch's default Conv2d/Linear init (kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in))).

  DIP's behaviour (how fast it fits, hence where to stop) depends on the init
  scale, so we match the reference implementation rather than Flax's default.
  """
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Conv(nn.Module):
  features: int
  kernel: int
  stride: int = 1
  pad: str = "reflection"
  dtype: jnp.dtype | None = None
  precision: jax.lax.Precision | None = None  # None: JAX's default (TF32 on Hopper for f32)
  conv: str = "lax"  # NetConfig.conv: the dense path of one run (convs.CONV_PATHS)
  batch_conv: str = "grouped"  # NetConfig.batch_conv: how vmap over runs lowers it (convs.per_run_conv)
  hybrid_side: int = 32  # NetConfig.hybrid_side

  @nn.compact
  def __call__(self, x_NxHxWxC: jax.Array) -> jax.Array:
    fan_in = x_NxHxWxC.shape[-1] * self.kernel * self.kernel
    p = (self.kernel - 1) // 2
    if p and self.pad == "reflection":
      x_NxHxWxC = jnp.pad(x_NxHxWxC, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
      padding = "VALID"
    else:
      padding = [(p, p), (p, p)]
    return nn.Conv(
      self.features,
      (self.kernel, self.kernel),
      strides=self.stride,
      padding=padding,
      dtype=self.dtype,
      precision=self.precision,
      kernel_init=torch_conv_init(fan_in),
      bias_init=torch_conv_init(fan_in),
      conv_general_dilated=convs.conv_general_dilated_for(self.conv, self.batch_conv, self.hybrid_side),
    )(x_NxHxWxC)


def upsample2x(x_NxHxWxC: jax.Array, mode: str) -> jax.Array:
  n, h, w, c = x_NxHxWxC.shape
  if mode == "nearest":
    return jnp.repeat(jnp.repeat(x_NxHxWxC, 2, axis=1), 2, axis=2)
  # Half-pixel centres: the same as torch's Upsample(mode='bilinear', align_corners=False).
  return jax.image.resize(x_NxHxWxC, (n, 2 * h, 2 * w, c), method="bilinear")


class SkipUNet(nn.Module):
  cfg: NetConfig
  dtype: jnp.dtype | None = None  # compute dtype; parameters stay float32
  precision: jax.lax.Precision | None = None  # of the convolutions (train.PRECISIONS)
  remat: bool = False  # rematerialise each conv block in the backward pass (large images)

  def conv(self, features: int, kernel: int, stride: int) -> Conv:
    c = self.cfg
    return Conv(features, kernel, stride, c.pad, self.dtype, self.precision, c.conv, c.batch_conv, c.hybrid_side)

  def block(self, x, features, kernel, stride=1):
    def conv_norm_act(mdl, x):
      x = mdl.conv(features, kernel, stride)(x)
      return ACTIVATIONS[mdl.cfg.act](ImageNorm()(x))

    if self.remat:
      # Keeps only the block's input for the backward pass; the padded copy, conv output
      # and BN intermediates are recomputed. Same parameter names (lifted on the method).
      return nn.checkpoint(conv_norm_act)(self, x)
    return conv_norm_act(self, x)

  def complex_connection(self, x_NxHxWxC, skip_NxHxWxS):
    # IDIP change (1). The FC reads the channel-wise average of the same encoder
    # features that the 1x1 skip conv reads (the level's input x), so the skip can
    # carry global context of that scale, which a 4-channel 1x1 conv cannot. Its
    # output is broadcast back to HxW, concatenated with the skip features and
    # mixed by a 1x1 conv (+BN+act) back to the skip width, so the decoder is
    # unchanged. Cost per level: d_in*F + F (FC) + (S+F)*S + S (conv) + 2S (BN).
    # With d_in = 128 at four levels (32 = z's depth at the first), the FC
    # dominates and F = 96 gives +54.7k parameters = +2.47% of the official
    # 2.218M-parameter net, the paper's "about 2.4%" (F = d_in = 128 would be +3.1%).
    n, h, w, _ = skip_NxHxWxS.shape
    pooled_NxC = x_NxHxWxC.astype(jnp.float32).mean(axis=(1, 2))
    fc_NxF = nn.Dense(
      self.cfg.cc_features,
      kernel_init=torch_conv_init(pooled_NxC.shape[-1]),
      bias_init=torch_conv_init(pooled_NxC.shape[-1]),
    )(pooled_NxC)
    fc_NxHxWxF = jnp.broadcast_to(fc_NxF[:, None, None, :], (n, h, w, fc_NxF.shape[-1]))
    cat = jnp.concatenate([skip_NxHxWxS, fc_NxHxWxF.astype(skip_NxHxWxS.dtype)], axis=-1)
    return self.block(cat, self.cfg.skip_channels, 1)

  def level(self, x, i):
    cfg = self.cfg
    parts = []
    if cfg.skip_channels:
      skip = self.block(x, cfg.skip_channels, 1)
      if cfg.complex_connection:
        skip = self.complex_connection(x, skip)
      parts.append(skip)
    deeper = self.block(x, cfg.width, 3, stride=2)
    deeper = self.block(deeper, cfg.width, 3)
    if i < cfg.scales - 1:
      deeper = self.level(deeper, i + 1)
    parts.append(upsample2x(deeper, cfg.upsample))
    x = ImageNorm()(jnp.concatenate(parts, axis=-1))
    x = self.block(x, cfg.width, 3)
    return self.block(x, cfg.width, 1)

  @nn.compact
  def __call__(self, x_NxHxWxC: jax.Array) -> jax.Array:
    x = self.level(x_NxHxWxC.astype(self.dtype or x_NxHxWxC.dtype), 0)
    x = self.conv(self.cfg.out_channels, 1, 1)(x)
    x = x.astype(jnp.float32)
    return nn.sigmoid(x) if self.cfg.sigmoid else x


def min_side(cfg: NetConfig) -> int:
  """Smallest padded side: the deepest map must be >= 2 px for its 3x3 reflection pad."""
  return 2 ** (cfg.scales + 1)


def count_params(params) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def init_params(cfg: NetConfig, key: jax.Array, height: int, width: int):
  x = jnp.zeros((1, height, width, cfg.in_channels), jnp.float32)
  return SkipUNet(cfg).init(key, x)["params"]
