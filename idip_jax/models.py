"""The DIP "skip" hourglass (Ulyanov et al. 2018) and IDIP's complex connection.

Layout mirrors `models/skip.py` of the official DIP code, with its denoising
defaults (`get_net(..., 'skip', pad='reflection', skip_n33d=128, skip_n33u=128,
skip_n11=4, num_scales=5, upsample_mode='bilinear')`). Tensors are NHWC.
"""

from __future__ import annotations

import functools
import hashlib
import types
from collections.abc import Callable, Mapping

import flax
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


def _flax_fold_data(suffix: tuple[str | int, ...]) -> int:
  # What Flax folds into the init key for a variable (flax.core.scope._fold_in_static): the
  # first 4 bytes of the SHA-1 of its module path and its scope's rng counter.
  h = hashlib.sha1()
  for part in suffix:
    if flax.config.flax_fix_rng_separator:
      h.update(b"\0")
    h.update(part.encode() if isinstance(part, str) else part.to_bytes((part.bit_length() + 7) // 8, "big"))
  return int.from_bytes(h.digest()[:4], "big")


@functools.lru_cache(maxsize=32)
def _init_plan(cfg: NetConfig) -> tuple[tuple[tuple[str, ...], tuple[int, ...], int, float], ...]:
  """(path, shape, fold data, bound) of every parameter, in Flax's creation order; bound 0
  marks ImageNorm's scale (ones) and bias (zeros), else U(+-bound) (torch_conv_init)."""
  order = []

  def shapes(key):  # without remat, whose lifted checkpoint would fold other keys in
    params = init_params(cfg, key, min_side(cfg), min_side(cfg))
    order.extend(flax.traverse_util.flatten_dict(params))  # a dict in creation order
    return params

  flat = flax.traverse_util.flatten_dict(jax.eval_shape(shapes, jax.random.key(0)))
  plan, counters = [], {}
  for path in order:
    module = path[:-1]
    counters[module] = counters.get(module, 0) + 1  # the scope's make_rng counter
    kernel = flat.get((*module, "kernel"))
    bound = 0.0 if kernel is None else float(1.0 / np.sqrt(np.prod(kernel.shape[:-1])))  # fan_in
    plan.append((path, flat[path].shape, _flax_fold_data((*module, counters[module])), bound))
  return tuple(plan)


def init_skip_unet(model: SkipUNet, key: jax.Array) -> dict:
  """model.init(key, x)["params"] bit for bit (tested), with the draws batched: one fold_in for
  all ~70 keys and one uniform per distinct shape. Flax draws each parameter on its own, and XLA:CPU
  compiles each draw's Threefry loop as its own kernels: the init program of a 64 px fit compiled in
  1.65 s (DIP) and 2.43 s (IDIP), batched in 0.72 and 0.97 s (docs/performance.md). Under remat the
  parameters are those without it (Flax's lifted checkpoint would fold other keys in, so --remat, a
  way to run, changed the init)."""
  plan = _init_plan(model.cfg)
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.asarray([d for _, _, d, _ in plan], jnp.uint32))
  by_shape: dict[tuple[int, ...], list[int]] = {}
  for i, (_, shape, _, bound) in enumerate(plan):
    if bound:
      by_shape.setdefault(shape, []).append(i)
  params = {}
  for shape, members in by_shape.items():
    bounds = np.array([plan[i][3] for i in members], np.float32)
    draw = lambda k, lo, hi, shape=shape: jax.random.uniform(k, shape, jnp.float32, lo, hi)
    values = jax.vmap(draw)(keys[np.array(members)], -bounds, bounds)
    params.update({plan[i][0]: values[j] for j, i in enumerate(members)})
  for path, shape, _, bound in plan:
    if not bound:
      params[path] = (jnp.ones if path[-1] == "scale" else jnp.zeros)(shape, jnp.float32)
  return flax.traverse_util.unflatten_dict(params)
