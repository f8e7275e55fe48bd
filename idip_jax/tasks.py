"""Deep Image Prior beyond denoising (DIP paper Sec. 4: inpainting, super-resolution): the degradation
operator A of each task, applied
inside the pure loss ||A(net(z)) - y||^2, and the observations y made from ground-truth images.

denoise: A = identity, y = the noisy image. inpaint: A = identity on the observed pixels (the loss
mask), y = the image with the others zeroed (DIP's img_np * mask). sr: A = DIP's Lanczos2
downsampler (models/downsampler.py: phase 1/2, replicate padding, stride = factor), y = the
low-resolution image made from the HR one with PIL's Lanczos resize (DIP's sr_utils).
"""

from __future__ import annotations

import dataclasses
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from idip_jax.data import Image, InputError, center_crop, check_size, find_image, read_image


def lanczos_kernel(factor: int, support: int = 2, phase: float = 0.5) -> np.ndarray:
  """DIP's get_kernel(factor, 'lanczos', phase, kernel_width=2*support*factor+1): a separable
  Lanczos window sampled at 1/factor, (2*support*factor)^2 taps for phase 1/2, sum 1."""
  width = 2 * support * factor + 1
  n = width - 1 if phase == 0.5 else width
  center = (width + 1) / 2.0
  i = np.arange(1, n + 1, dtype=np.float64)
  d = np.abs(i + (0.5 if phase == 0.5 else 0.0) - center) / factor
  with np.errstate(divide="ignore", invalid="ignore"):
    w = np.where(d == 0, 1.0, support * np.sin(np.pi * d) * np.sin(np.pi * d / support) / (np.pi**2 * d * d))
  k = np.outer(w, w)
  return (k / k.sum()).astype(np.float32)


def downsample(x_HxWxC: jax.Array, factor: int) -> jax.Array:
  """DIP's Downsampler(kernel_type='lanczos2', phase=0.5, preserve_size=True): replicate padding
  of (K - factor) / 2, then each channel convolved with the kernel at stride `factor`."""
  k = jnp.asarray(lanczos_kernel(factor))
  ksize, c = k.shape[0], x_HxWxC.shape[-1]
  pad = (ksize - factor) // 2
  x = jnp.pad(x_HxWxC, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
  kernel = jnp.broadcast_to(k[:, :, None, None], (ksize, ksize, 1, c))
  y = jax.lax.conv_general_dilated(
    x[None],
    kernel,
    (factor, factor),
    "VALID",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=c,
    precision=jax.lax.Precision.HIGHEST,
  )
  return y[0]


def degrade(task: str, factor: int, out_HxWxC: jax.Array) -> jax.Array:
  """A(out): what the observation y of the task would be if `out` were the image."""
  return downsample(out_HxWxC, factor) if task == "sr" else out_HxWxC


def _pil_resize(x_HxWxC: np.ndarray, height: int, width: int, method: str) -> np.ndarray:
  """PIL's resize of each channel as a float image (mode 'F': no 8-bit rounding)."""
  from PIL import Image as PILImage

  resample = {"lanczos": PILImage.Resampling.LANCZOS, "bicubic": PILImage.Resampling.BICUBIC}[method]
  chans = [
    np.asarray(PILImage.fromarray(x_HxWxC[..., c].astype(np.float32), mode="F").resize((width, height), resample))
    for c in range(x_HxWxC.shape[-1])
  ]
  return np.stack(chans, axis=-1).astype(np.float32)


def lanczos_resize(x_HxWxC: np.ndarray, height: int, width: int) -> np.ndarray:
  return _pil_resize(x_HxWxC, height, width, "lanczos")


def bicubic_resize(x_HxWxC: np.ndarray, height: int, width: int) -> np.ndarray:
  return _pil_resize(x_HxWxC, height, width, "bicubic")


def bernoulli_mask(h: int, w: int, keep: float, seed: int, name: str) -> np.ndarray:
  """HxWx1: each pixel observed with probability `keep`, seeded by (seed, image name)."""
  rng = np.random.default_rng([seed, zlib.crc32(name.encode()), 1])  # stream 1: not the AWGN's
  return (rng.random((h, w, 1)) < keep).astype(np.float32)


def read_mask(path: str, im: Image, crop: int) -> np.ndarray:
  """A binary mask image (1/white = observed) of the image file's size (checked before --crop)."""
  m = read_image(path, 1)
  check_size(path, "mask", m, im)
  if crop:
    m = center_crop(m, crop)
  if not np.all((m == 0) | (m == 1)):
    raise InputError(f"mask {path} is not binary (values other than 0 and 255)")
  if not m.any():
    raise InputError(f"mask {path} is all zeros: no pixel is observed")
  return m.astype(np.float32)


def parse_keep(spec: str) -> float | None:
  """--mask=bernoulli:P -> P (the fraction of pixels kept); None for a mask file or folder."""
  if not spec.startswith("bernoulli:"):
    return None
  try:
    keep = float(spec.split(":", 1)[1])
  except ValueError:
    keep = -1.0
  if not 0 < keep <= 1:
    raise InputError(f"--mask={spec}: the kept fraction must be in (0, 1]")
  return keep


def is_mask_file(path: str) -> bool:
  """DIP's data/inpainting convention: NAME_mask.png beside NAME.png."""
  return os.path.splitext(os.path.basename(path))[0].endswith("_mask")


def inpaint_images(images: list[Image], spec: str, seed: int, crop: int) -> list[Image]:
  """Each image's observed pixels (a seeded Bernoulli mask, or NAME_mask.png in a folder or one
  mask file), and y = the image with the others zeroed."""
  keep, out = parse_keep(spec), []
  for im in images:
    h, w, _ = im.noisy_HxWxC.shape
    if keep is not None:
      m = bernoulli_mask(h, w, keep, seed, im.name)
      if not m.any():
        raise InputError(f"--mask={spec}: no pixel of {im.name} is observed")
    else:
      path = spec if os.path.isfile(spec) else find_image(spec, im.name + "_mask") if os.path.isdir(spec) else None
      if path is None:
        raise InputError(f"--mask={spec}: no mask for {im.name} (a file, a folder of NAME_mask.png, or bernoulli:P)")
      m = read_mask(path, im, crop)
    out.append(dataclasses.replace(im, noisy_HxWxC=im.noisy_HxWxC * m, observed_HxWx1=m))
  return out


def sr_images(images: list[Image], factor: int, crop_to: int) -> list[Image]:
  """HR ground truth (center-cropped to a multiple of crop_to, DIP's enforse_div32='CROP'; 0 = as
  is, then its sides must divide by the factor), LR by PIL's Lanczos, and the bicubic upsampling
  of LR as the input image seen at HR (its PSNR is the bicubic baseline)."""
  out = []
  for im in images:
    hr = im.clean_HxWxC
    h, w, _ = hr.shape
    if crop_to and min(h, w) < crop_to:
      raise InputError(
        f"{im.name}: {h}x{w} is smaller than {crop_to} px, the multiple --sr_crop crops the HR image to: "
        f"use an image of at least {crop_to} px per side"
      )
    if crop_to:
      nh, nw = h - h % crop_to, w - w % crop_to
      top, left = (h - nh) // 2, (w - nw) // 2
      hr = hr[top : top + nh, left : left + nw]
      h, w = nh, nw
    if h % factor or w % factor or not h or not w:
      hint = f" after --sr_crop's crop to a multiple of {crop_to}" if crop_to else " (or use --sr_crop)"
      raise InputError(f"{im.name}: {h}x{w} is not divisible by the SR factor {factor}{hint}")
    lr = lanczos_resize(hr, h // factor, w // factor)
    # Clipped as PIL's 8-bit bicubic image would be (the baseline DIP's notebook reports).
    out.append(Image(im.name, np.clip(bicubic_resize(lr, h, w), 0.0, 1.0), hr, lr_HxWxC=lr))
  return out
