"""Reading, checking, noising, padding and bucketing the images of a run."""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import zlib

import numpy as np

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# How the noisy image is made from the clean one in [0, 1]: "float" = x + n (FFDNet's and
# DnCNN's test code), "clip" = clipped to [0, 1] (DIP's get_noisy_image), "uint8" = clipped
# and rounded to 8 bits (a noisy image saved as PNG, as a MATLAB pipeline would).
NOISE_PROTOCOLS = ("float", "clip", "uint8")


class InputError(ValueError):
  """Bad user input: reported as one line, before any compute."""


class OutputError(RuntimeError):
  """A result that cannot be written (a full disk, a read-only folder): reported as one line."""


@dataclasses.dataclass
class Image:
  name: str
  noisy_HxWxC: np.ndarray  # float32 in [0, 1] (AWGN may leave it outside)
  clean_HxWxC: np.ndarray | None  # None for real noisy photos: no PSNR is claimed
  observed_HxWx1: np.ndarray | None = None  # --task=inpaint: 1 where the pixel is observed
  lr_HxWxC: np.ndarray | None = None  # --task=sr: the low-resolution y (noisy_HxWxC: its bicubic upsampling)
  source_hw: tuple[int, int] | None = None  # the file's size before --crop: x_bar files and masks must match it


def shared_dir() -> str:
  """../shared seen from the project root, or $IDIP_SHARED."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return os.environ.get("IDIP_SHARED", os.path.join(root, "..", "shared"))


def find_image(folder: str, name: str) -> str | None:
  """The image file named `name` (any of IMAGE_EXTS) in `folder`, or None."""
  for ext in IMAGE_EXTS:
    path = os.path.join(folder, name + ext)
    if os.path.isfile(path):
      return path
  # The extension in any case (A.PNG), as list_inputs accepts the inputs themselves.
  try:
    found = sorted(f for f in os.listdir(folder) if os.path.splitext(f)[0] == name and f.lower().endswith(IMAGE_EXTS))
  except OSError:
    return None
  return next((os.path.join(folder, f) for f in found if os.path.isfile(os.path.join(folder, f))), None)


def xbar_file(prelim_dir: str, name: str) -> str:
  """--prelim=file: the x_bar image of input `name` in --prelim_dir."""
  path = find_image(prelim_dir, name)
  if path is not None:
    return path
  raise InputError(f"--prelim=file: no image named '{name}' ({'/'.join(IMAGE_EXTS)}) in --prelim_dir={prelim_dir}")


def list_inputs(spec: str) -> list[str]:
  """A file, a folder (its images, sorted), a glob, or 'skimage:NAME'."""
  if spec.startswith("skimage:"):
    return [spec]
  if os.path.isdir(spec):
    paths = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.lower().endswith(IMAGE_EXTS))
    if not paths:
      raise InputError(f"no images ({', '.join(IMAGE_EXTS)}) in folder {spec}")
    return paths
  if os.path.isfile(spec):
    return [spec]
  if any(c in spec for c in "*?["):
    paths = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
    if not paths:
      raise InputError(f"no files match {spec}")
    paths = [p for p in paths if p.lower().endswith(IMAGE_EXTS)]  # a .txt beside the images
    if not paths:
      raise InputError(f"no images ({', '.join(IMAGE_EXTS)}) among the files matching {spec}")
    return paths
  if os.path.exists(spec):  # /dev/zero, a fifo, a socket
    raise InputError(f"--input={spec} is neither a regular file nor a folder")
  raise InputError(f"input not found: {spec}")


def _from_skimage(name: str) -> np.ndarray:
  try:
    import skimage.data
  except ImportError:
    raise InputError("--input=skimage:NAME needs scikit-image: pip install '.[demo]'") from None
  if not hasattr(skimage.data, name):
    raise InputError(f"scikit-image has no sample image '{name}'")
  return np.asarray(getattr(skimage.data, name)())


def to_float(img: np.ndarray, where: str, channels: int = 0) -> np.ndarray:
  """uint8/uint16 HxW[xC] -> float32 HxWxC in [0, 1]; alpha dropped if opaque."""
  if img.dtype == np.uint8:
    x = img.astype(np.float32) / 255.0
  elif img.dtype == np.uint16:
    x = img.astype(np.float32) / 65535.0
  else:
    raise InputError(f"{where}: unsupported pixel type {img.dtype} (use 8- or 16-bit images)")
  if x.ndim == 2:
    x = x[..., None]
  if x.ndim != 3 or x.shape[-1] not in (1, 2, 3, 4):
    raise InputError(f"{where}: unsupported image shape {img.shape}")
  if x.shape[-1] in (2, 4):  # gray+alpha or RGBA
    if x[..., -1].min() < 1.0:
      raise InputError(f"{where}: has a transparent alpha channel; flatten it first")
    x = x[..., :-1]
  return to_float_channels(x, channels)


def to_float_channels(x_HxWxC: np.ndarray, channels: int) -> np.ndarray:
  """A float image converted to `channels` (0: as it is): RGB -> gray by ITU-R 601, as MATLAB's
  rgb2gray; gray -> RGB by copying."""
  if channels == 1 and x_HxWxC.shape[-1] == 3:
    x_HxWxC = (x_HxWxC @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
  elif channels == 3 and x_HxWxC.shape[-1] == 1:
    x_HxWxC = np.repeat(x_HxWxC, 3, axis=-1)
  return np.ascontiguousarray(x_HxWxC)


def read_image(path: str, channels: int = 0) -> np.ndarray:
  if path.startswith("skimage:"):
    return to_float(_from_skimage(path.split(":", 1)[1]), path, channels)
  import imageio.v3 as iio

  if os.path.isfile(path) and os.path.getsize(path) == 0:
    raise InputError(f"cannot read image {path}: the file is empty (0 bytes)")
  try:
    mode = iio.immeta(path).get("mode", "")
    # CMYK JPEGs and palette images are converted by Pillow (a palette image of gray colours
    # is gray, not RGB); everything else is read as stored.
    img = iio.imread(path, **({"mode": "RGB"} if mode in ("CMYK", "P", "PA") else {}))
  except Exception as e:  # imageio raises many types for unreadable files
    msg = str(e).splitlines()[0] if str(e) else ""
    if "backend" in msg:  # imageio's message for bytes no plugin can decode
      msg = "not a PNG/JPEG/BMP/TIFF image (or a corrupt one)"
    raise InputError(f"cannot read image {path}: {msg or type(e).__name__}") from None
  img = np.asarray(img)
  if img.ndim == 4 or (img.ndim == 3 and img.shape[-1] not in (1, 2, 3, 4) and path.lower().endswith(".gif")):
    if img.shape[0] != 1:  # an animation (GIF, multi-page TIFF): which frame is meant is the user's choice
      raise InputError(f"{path} holds {img.shape[0]} frames (an animation or a stack): save the one frame to use")
    img = img[0]
  if mode in ("P", "PA") and img.ndim == 3 and np.ptp(img[..., :3].astype(np.int32), axis=-1).max() == 0:
    img = img[..., 0]
  return to_float(img, path, channels)


def check_size(path: str, what: str, x_HxWxC: np.ndarray, im: Image) -> None:
  """A file that goes with an input (x_bar, mask) has the input file's size, compared before --crop."""
  hw = tuple(x_HxWxC.shape[:2])
  want = tuple(im.source_hw or im.noisy_HxWxC.shape[:2])
  if hw != want:
    raise InputError(f"{what} {path} is {hw[0]}x{hw[1]}, its input {im.name} {want[0]}x{want[1]}")


def center_crop(x_HxWxC: np.ndarray, size: int) -> np.ndarray:
  h, w, _ = x_HxWxC.shape
  ch, cw = min(size, h), min(size, w)
  top, left = (h - ch) // 2, (w - cw) // 2
  return x_HxWxC[top : top + ch, left : left + cw]


def add_awgn(clean_HxWxC: np.ndarray, sigma: float, seed: int, name: str, protocol: str = "float") -> np.ndarray:
  """AWGN of std sigma/255 on the [0, 1] image, then NOISE_PROTOCOLS. The generator is
  seeded by (seed, image name) only, so every method and protocol sees the same draw."""
  if protocol not in NOISE_PROTOCOLS:
    raise InputError(f"unknown noise protocol {protocol!r}; choose one of {', '.join(NOISE_PROTOCOLS)}")
  rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
  noisy = clean_HxWxC + (sigma / 255.0) * rng.standard_normal(clean_HxWxC.shape)
  if protocol != "float":
    noisy = np.clip(noisy, 0.0, 1.0)
  if protocol == "uint8":
    noisy = np.round(noisy * 255.0) / 255.0
  return noisy.astype(np.float32)


def load_square_set(folder: str, channels: int, side_at_least: int, flag: str, what: str) -> np.ndarray:
  """Every image of a training folder as one NxSxSxC float32 array, center-cropped to the smallest side S
  (Train400 is 400 images of 180x180); one InputError line if there are none or S < side_at_least."""
  paths = list_inputs(folder) if os.path.isdir(folder) else []
  if not paths:
    raise InputError(f"--{flag}={folder}: no {what} images there")
  imgs = [read_image(p, channels) for p in paths]
  side = min(min(im.shape[:2]) for im in imgs)
  if side < side_at_least:
    raise InputError(f"{what}: the smallest image in {folder} is {side} px, smaller than {side_at_least}")
  return np.stack([center_crop(im, side) for im in imgs]).astype(np.float32)


def load_validation_crops(
  folder: str, n: int, channels: int, crop: int, sigma: float, protocol: str, crop_flag: str
) -> tuple[np.ndarray, np.ndarray]:
  """(clean, noisy) NxSxSxC of a trainer's validation: center crops of the first n images of `folder`, AWGN
  seeded per image name (add_awgn); one InputError line if there are none or one is smaller than the crop."""
  paths = list_inputs(folder)[:n] if os.path.isdir(folder) else []
  if not paths:
    raise InputError(f"--val_dir={folder}: no validation images there")
  clean = []
  for p in paths:
    im = read_image(p, channels)
    if min(im.shape[:2]) < crop:  # every validation crop has one size (they are stacked)
      raise InputError(f"validation image {p} is {im.shape[0]}x{im.shape[1]}, smaller than --{crop_flag}={crop}")
    clean.append(center_crop(im, crop))
  noisy = [add_awgn(x, sigma, 0, image_name(p), protocol) for x, p in zip(clean, paths)]
  return np.stack(clean).astype(np.float32), np.stack(noisy)


def image_name(path: str) -> str:
  if path.startswith("skimage:"):
    return path.split(":", 1)[1]
  return os.path.splitext(os.path.basename(path))[0]


def load_images(
  spec: str,
  sigma: float,
  noise_seed: int = 0,
  channels: int = 0,
  crop: int = 0,
  noise: str = "float",
  min_size: int = 1,
  skip=None,
) -> list[Image]:
  """Reads every input and checks it, so that bad input fails before any compute; skip(path):
  files of the input folder that are not inputs (inpainting masks)."""
  if sigma < 0:
    raise InputError(f"--sigma must be >= 0 (got {sigma})")
  paths = [p for p in list_inputs(spec) if skip is None or not skip(p)]
  images, seen = [], set()
  for path in paths:
    name = image_name(path)
    if name in seen:
      raise InputError(f"two inputs are named '{name}' (names must be unique): {path}")
    seen.add(name)
    x = read_image(path, channels)
    source_hw = x.shape[:2]
    if crop:
      if crop > min(x.shape[:2]):
        raise InputError(f"--crop={crop} is larger than {path} ({x.shape[0]}x{x.shape[1]})")
      x = center_crop(x, crop)
    h, w, _ = x.shape
    if min(h, w) < min_size:
      raise InputError(
        f"{path}: {h}x{w} is too small; this net needs at least {min_size} px "
        f"per side (lower --scales or use a larger image)"
      )
    if sigma > 0:
      images.append(Image(name, add_awgn(x, sigma, noise_seed, name, noise), x, source_hw=source_hw))
    else:
      images.append(Image(name, x, None, source_hw=source_hw))
  return images


def padded_size(n: int, scales: int) -> int:
  """A side padded to a multiple of 2^scales, and to at least 2^(scales+1) so the
  deepest feature map is >= 2 px (reflection padding of a 1-px map is undefined)."""
  m = 2**scales
  return max(int(math.ceil(n / m) * m), 2 * m)


def pad_reflect(x_HxWxC: np.ndarray, height: int, width: int) -> np.ndarray:
  h, w, _ = x_HxWxC.shape
  return np.pad(x_HxWxC, ((0, height - h), (0, width - w), (0, 0)), mode="reflect")


def mask_for(h: int, w: int, height: int, width: int) -> np.ndarray:
  m = np.zeros((height, width, 1), np.float32)
  m[:h, :w] = 1.0
  return m


def bucket_keys(images: list[Image], scales: int) -> dict[tuple[int, int, int], list[int]]:
  """Indices of images grouped by padded (H, W, C): one compiled program each."""
  buckets: dict[tuple[int, int, int], list[int]] = {}
  for i, im in enumerate(images):
    h, w, c = im.noisy_HxWxC.shape
    buckets.setdefault((padded_size(h, scales), padded_size(w, scales), c), []).append(i)
  return buckets
