"""PSNR and SSIM on [0, 1] images (HxWxC), jit- and vmap-friendly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def masked_mse(a_HxWxC: jax.Array, b_HxWxC: jax.Array, mask_HxWx1: jax.Array) -> jax.Array:
  """Mean squared error over the pixels where mask = 1 (the unpadded extent)."""
  err = jnp.square(a_HxWxC - b_HxWxC) * mask_HxWx1
  return err.sum() / (mask_HxWx1.sum() * a_HxWxC.shape[-1])


def masked_tv(x_HxWxC: jax.Array, mask_HxWx1: jax.Array) -> jax.Array:
  """Anisotropic total variation per value over the unpadded extent: (sum |dy| + sum |dx|) / (pixels x channels),
  as DRP's tv1_loss (Li et al. 2023) on a whole image."""
  dy = jnp.abs(x_HxWxC[1:] - x_HxWxC[:-1]) * mask_HxWx1[1:] * mask_HxWx1[:-1]
  dx = jnp.abs(x_HxWxC[:, 1:] - x_HxWxC[:, :-1]) * mask_HxWx1[:, 1:] * mask_HxWx1[:, :-1]
  return (dy.sum() + dx.sum()) / (mask_HxWx1.sum() * x_HxWxC.shape[-1])


def psnr(a_HxWxC: jax.Array, b_HxWxC: jax.Array, mask_HxWx1: jax.Array | None = None, clip: bool = True) -> jax.Array:
  """PSNR in dB with peak 1, after clipping `a` to [0, 1] as a saved image would be
  (clip=False: `a` as it is, e.g. a noisy image whose AWGN was not clipped)."""
  a = jnp.clip(a_HxWxC, 0.0, 1.0) if clip else a_HxWxC
  if mask_HxWx1 is None:
    mask_HxWx1 = jnp.ones(a.shape[:2] + (1,), a.dtype)
  return -10.0 * jnp.log10(masked_mse(a, b_HxWxC, mask_HxWx1))


def _gaussian_window(sigma: float = 1.5, truncate: float = 3.5) -> np.ndarray:
  radius = int(truncate * sigma + 0.5)
  x = np.arange(-radius, radius + 1, dtype=np.float64)
  w = np.exp(-0.5 * (x / sigma) ** 2)
  return (w / w.sum()).astype(np.float32)


def _filter_valid(x_HxWxC: jax.Array, w: np.ndarray) -> jax.Array:
  """Separable 'valid' filtering: windows that touch the border are dropped,
  as scikit-image does by cropping (win_size - 1) // 2 pixels before averaging."""
  k = len(w)
  h, wd, c = x_HxWxC.shape
  x = x_HxWxC.transpose(2, 0, 1)[:, None]  # Cx1xHxW
  kern_v = jnp.asarray(w).reshape(1, 1, k, 1)
  kern_h = jnp.asarray(w).reshape(1, 1, 1, k)
  dn = ("NCHW", "OIHW", "NCHW")
  x = jax.lax.conv_general_dilated(x, kern_v, (1, 1), "VALID", dimension_numbers=dn)
  x = jax.lax.conv_general_dilated(x, kern_h, (1, 1), "VALID", dimension_numbers=dn)
  return x[:, 0].transpose(1, 2, 0)


def ssim(a_HxWxC: jax.Array, b_HxWxC: jax.Array, mask_HxWx1: jax.Array | None = None) -> jax.Array:
  """SSIM of Wang et al. (2004): Gaussian window sigma=1.5, K1=0.01, K2=0.03,
  data range 1, channels averaged; equals skimage.metrics.structural_similarity(
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1).
  With a mask (original extent at the top-left of a padded image), only windows
  lying wholly inside it count, so the value equals SSIM of the cropped image."""
  a = jnp.clip(a_HxWxC, 0.0, 1.0).astype(jnp.float32)
  b = b_HxWxC.astype(jnp.float32)
  w = _gaussian_window()
  c1, c2 = 0.01**2, 0.03**2
  mu_a, mu_b = _filter_valid(a, w), _filter_valid(b, w)
  var_a = _filter_valid(a * a, w) - mu_a * mu_a
  var_b = _filter_valid(b * b, w) - mu_b * mu_b
  cov = _filter_valid(a * b, w) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
  if mask_HxWx1 is None:
    return s.mean()
  inside = (_filter_valid(mask_HxWx1.astype(jnp.float32), w) > 1.0 - 1e-4).astype(jnp.float32)
  return (s * inside).sum() / (inside.sum() * s.shape[-1])
