"""FFDNet (Zhang et al. 2018) and DnCNN (Zhang et al. 2017) in Flax, with the official weights.

Both run batched and jitted: one call per same-shape bucket of a test set.
"""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from idip_jax import matconvnet
from idip_jax.data import InputError, shared_dir

DNCNN_SIGMAS = (15, 25, 50)


class ConvStack(nn.Module):
  """conv (+ReLU) x (n-1), conv; 3x3, zero padding 1, as in the MatConvNet FFDNet."""

  features: tuple[int, ...]  # output channels of each conv

  @nn.compact
  def __call__(self, x_NxHxWxC):
    for i, f in enumerate(self.features):
      x_NxHxWxC = nn.Conv(f, (3, 3), padding=1, name=f"conv{i}")(x_NxHxWxC)
      if i < len(self.features) - 1:
        x_NxHxWxC = nn.relu(x_NxHxWxC)
    return x_NxHxWxC


def pixel_unshuffle(x_NxHxWxC: jax.Array) -> jax.Array:
  """2x2 blocks -> channels in MATLAB's column-major order: channel 4*c + 2*dx + dy
  for row offset dy and column offset dx (checked against the official weights:
  the gray net cannot tell c-major from offset-major, the color net can, by 12 dB)."""
  n, h, w, c = x_NxHxWxC.shape
  x = x_NxHxWxC.reshape(n, h // 2, 2, w // 2, 2, c)  # n, i, dy, j, dx, c
  return x.transpose(0, 1, 3, 5, 4, 2).reshape(n, h // 2, w // 2, 4 * c)


def pixel_shuffle(x_NxHxWx4C: jax.Array) -> jax.Array:
  n, h, w, c4 = x_NxHxWx4C.shape
  x = x_NxHxWx4C.reshape(n, h, w, c4 // 4, 2, 2)  # n, i, j, c, dx, dy
  return x.transpose(0, 1, 5, 2, 4, 3).reshape(n, 2 * h, 2 * w, c4 // 4)


class FFDNet(nn.Module):
  """Non-residual: unshuffle, concat the noise-level map, 15 convs, shuffle back."""

  features: tuple[int, ...]
  noise_channels: int  # 1 in both official releases (gray and color)

  @nn.compact
  def __call__(self, x_NxHxWxC, sigma_N):
    """x in [0, 1]; sigma_N on the 0-255 scale, a scalar per image or an NxHxWx1 map."""
    n, h, w, _ = x_NxHxWxC.shape
    sub = pixel_unshuffle(x_NxHxWxC)
    sig = jnp.asarray(sigma_N, jnp.float32) / 255.0  # FFDNet's map is sigma/255 for [0, 1] images
    if sig.ndim == 1:
      sig_map = jnp.broadcast_to(sig[:, None, None, None], (n, h // 2, w // 2, self.noise_channels))
    else:  # a per-pixel map at full resolution: average each 2x2 block
      sig_map = sig.reshape(n, h // 2, 2, w // 2, 2, -1).mean(axis=(2, 4))
      sig_map = jnp.broadcast_to(sig_map[..., :1], (n, h // 2, w // 2, self.noise_channels))
    y = ConvStack(self.features, name="body")(jnp.concatenate([sub, sig_map], axis=-1))
    return pixel_shuffle(y)


# The official training init (DnCNN_init_model_64_25_Res_Bnorm_Adam.m): every conv N(0, 2/(9*64)),
# biases 0; BatchNorm scales drawn the same way with magnitudes clipped up to 0.025 (its `clipping`),
# so the first residual is small and the untrained net returns about its input.
HE_STD = (2.0 / (9 * 64)) ** 0.5


def bn_scale_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  g = HE_STD * jax.random.normal(key, shape, dtype)
  return jnp.where(g >= 0, jnp.maximum(g, 0.025), jnp.minimum(g, -0.025))


class DnCNN(nn.Module):
  """Residual learning (the paper's Sec. III): the net predicts the noise, the output is x - net(x).
  conv+ReLU, (n-2) x (conv [+BN] + ReLU), conv; 3x3, zero padding 1. The official MatConvNet
  weights have BatchNorm folded into the convs (batch_norm=False); denoiser_train trains it with
  BatchNorm (batch_norm=True: the middle convs without bias, as KAIR's and the official code)."""

  features: tuple[int, ...]  # output channels of each conv
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x_NxHxWxC: jax.Array, train: bool = False) -> jax.Array:
    h, last = x_NxHxWxC, len(self.features) - 1
    for i, f in enumerate(self.features):
      norm = self.batch_norm and 0 < i < last
      h = nn.Conv(f, (3, 3), padding=1, use_bias=not norm, kernel_init=nn.initializers.normal(HE_STD))(h)
      if norm:
        # PyTorch's momentum 0.1 (KAIR's DnCNN) is Flax's 0.9.
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, scale_init=bn_scale_init)(h)
      if i < last:
        h = nn.relu(h)
    return x_NxHxWxC - h


def _params(convs, name: str) -> dict:
  """MatConvNet convs as Flax params: FFDNet's ConvStack names them conv{i}, DnCNN's loop Conv_{i}."""
  return {f"{name}{i}": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)} for i, (w, b) in enumerate(convs)}


def default_weights_dir() -> str:
  return os.path.join(shared_dir(), "weights")


def ffdnet_path(weights_dir: str, channels: int) -> str:
  name = "FFDNet_gray.mat" if channels == 1 else "FFDNet_color.mat"
  return os.path.join(weights_dir or default_weights_dir(), "ffdnet", name)


def dncnn_path(weights_dir: str, sigma: float) -> str:
  """DnCNN-S of the nearest trained level when sigma is within 2.5 of it, else the blind
  DnCNN-B (trained on sigma 0..55): at sigma=30 on classic10 DnCNN-S(25) gives 27.30 dB."""
  s = min(DNCNN_SIGMAS, key=lambda t: abs(t - sigma))
  name = f"dncnn_sigma{s}.mat" if abs(s - sigma) <= 2.5 else "dncnn_gray_blind.mat"
  return os.path.join(weights_dir or default_weights_dir(), "dncnn", name)


@functools.lru_cache(maxsize=8)
def load_ffdnet(path: str, channels: int):
  _, convs = matconvnet.load(path, "ffdnet")
  in_ch = convs[0][0].shape[2]
  if convs[-1][0].shape[3] != 4 * channels or in_ch <= 4 * channels:
    raise InputError(f"{path} is an FFDNet for {convs[-1][0].shape[3] // 4}-channel images, the input has {channels}")
  model = FFDNet(tuple(w.shape[3] for w, _ in convs), noise_channels=in_ch - 4 * channels)
  return jax.jit(lambda x, s: model.apply({"params": {"body": _params(convs, "conv")}}, x, s))


@functools.lru_cache(maxsize=8)
def load_dncnn(path: str, channels: int):
  """The official weights (.mat); a DnCNN this project trained (a training folder) is loaded by
  denoiser_train.load_denoiser (prelim picks which)."""
  _, convs = matconvnet.load(path, "dncnn")
  if convs[0][0].shape[2] != channels:
    raise InputError(
      f"{path} is a DnCNN for {convs[0][0].shape[2]}-channel images, the input has "
      f"{channels} (the official DnCNN-S weights are gray; use ffdnet or bm3d)"
    )
  model = DnCNN(tuple(w.shape[3] for w, _ in convs))
  return jax.jit(lambda x: model.apply({"params": _params(convs, "Conv_")}, x))


def ffdnet_denoise(fn, noisy_NxHxWxC: np.ndarray, sigma_N: np.ndarray) -> np.ndarray:
  """Odd sides are padded by repeating the last row/column (as FFDNet's demo does)."""
  n, h, w, _ = noisy_NxHxWxC.shape
  x = np.pad(noisy_NxHxWxC, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
  return np.asarray(fn(jnp.asarray(x, jnp.float32), jnp.asarray(sigma_N, jnp.float32)))[:, :h, :w]
