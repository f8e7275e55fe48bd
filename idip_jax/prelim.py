"""Preliminary denoisers that make IDIP's x_bar (input and second target).

Each entry has `check` (runs before any compute; raises InputError) and `run`
(noisy images -> denoised images, in the same order); both read an XbarSpec, the few settings
of a run that x_bar depends on: the denoiser (spec.prelim), the known noise level (spec.sigma),
the crop, the batch size and the task (spec_of(cfg) takes them from a run's config).
"""

from __future__ import annotations

import dataclasses
import os
import time
import types
from collections.abc import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from absl import logging

from idip_jax import data, denoiser_train, denoisers, sure
from idip_jax.config import PrelimConfig, RunConfig
from idip_jax.data import Image, InputError
from idip_jax.noise_level import estimate_sigma


@dataclasses.dataclass(frozen=True)
class XbarSpec:
  """What x_bar depends on: the denoiser's settings and the run's sigma (0: estimated per image),
  crop (an x_bar file is cut as its input), batch size (of the denoiser's calls) and task."""

  prelim: PrelimConfig
  sigma: float
  crop: int = 0
  batch_size: int = 0
  task: str = "denoise"


def spec_of(cfg: RunConfig) -> XbarSpec:
  return XbarSpec(cfg.prelim, cfg.sigma, cfg.crop, cfg.batch_size, cfg.fit.task)


@dataclasses.dataclass(frozen=True)
class Prelim:
  check: Callable[[XbarSpec, list[Image]], None]
  run: Callable[[XbarSpec, list[Image]], list[np.ndarray]]


def sigmas_for(spec: XbarSpec, images: list[Image]) -> list[float]:
  """The given sigma, or Chen et al.'s estimate for each real noisy image."""
  if spec.sigma > 0:
    return [spec.sigma] * len(images)
  return [estimate_sigma(im.noisy_HxWxC) for im in images]


# Noise levels the official weights were trained on (FFDNet: [0, 75]; DnCNN-B: [0, 55]); BM3D
# has no such limit. Outside, x_bar is an extrapolation: the runner warns.
TRAINED_SIGMA_MAX = types.MappingProxyType({"ffdnet": 75.0, "dncnn": 55.0})


def _check_none(spec, images):
  pass


def _run_none(spec, images):
  raise InputError("this method needs a preliminary denoiser: set --prelim")


def _check_bicubic(spec, images):
  if spec.task != "sr":
    raise InputError("--prelim=bicubic is super-resolution's x_bar: set --task=sr")


def _run_bicubic(spec, images):
  return [im.noisy_HxWxC for im in images]  # tasks.sr_images: the bicubic upsampling of LR


def _check_bm3d(spec, images):
  try:
    import bm3d  # noqa: F401
  except ImportError:
    raise InputError("--prelim=bm3d needs the bm3d package: pip install '.[bm3d]'") from None


def _run_bm3d(spec, images):
  import bm3d

  out = []
  for im, sigma in zip(images, sigmas_for(spec, images)):
    y = im.noisy_HxWxC.astype(np.float64)
    if y.shape[-1] == 3:
      x = bm3d.bm3d_rgb(y, sigma / 255.0)
    else:
      x = bm3d.bm3d(y[..., 0], sigma / 255.0)[..., None]
    out.append(np.asarray(x, np.float32).reshape(y.shape))
  return out


def _read_prelim_file(spec: XbarSpec, im: Image) -> np.ndarray:
  path = data.xbar_file(spec.prelim.prelim_dir, im.name)
  want = im.noisy_HxWxC.shape[-1]
  x = data.read_image(path)
  if x.shape[-1] < want:  # a gray x_bar copied to three channels would be no colour denoiser's output
    raise InputError(f"x_bar {path} has {x.shape[-1]} channel, its input {im.name} {want}: give a colour x_bar")
  x = data.to_float_channels(x, want)
  data.check_size(path, "x_bar", x, im)  # before --crop, which would cut any larger image to fit
  if spec.crop:
    x = data.center_crop(x, spec.crop)
  if x.shape != im.noisy_HxWxC.shape:
    raise InputError(f"{path}: shape {x.shape} differs from its input's {im.noisy_HxWxC.shape}")
  return x


def _check_file(spec, images):
  if not spec.prelim.prelim_dir or not os.path.isdir(spec.prelim.prelim_dir):
    raise InputError(f"--prelim=file needs --prelim_dir, a folder (got '{spec.prelim.prelim_dir}')")
  for im in images:
    _read_prelim_file(spec, im)


def _run_file(spec, images):
  return [_read_prelim_file(spec, im) for im in images]


def _batches(spec: XbarSpec, images: list[Image], key) -> list[list[int]]:
  """Indices grouped by (shape, key(i)), cut to spec.batch_size: one jitted call each."""
  groups: dict = {}
  for i, im in enumerate(images):
    groups.setdefault((im.noisy_HxWxC.shape, key(i)), []).append(i)
  size = spec.batch_size or len(images)
  return [idx[k : k + size] for idx in groups.values() for k in range(0, len(idx), size)]


def _ffdnet_file(spec, channels):
  return spec.prelim.weights or denoisers.ffdnet_path(spec.prelim.weights_dir, channels)


def load_dncnn(path: str, channels: int):
  """A DnCNN as x -> x_bar: the official weights (.mat), or a DnCNN this project trained (its training folder)."""
  if os.path.isdir(path):
    return denoiser_train.load_denoiser(path, channels)
  return denoisers.load_dncnn(path, channels)


def _dncnn_file(spec, sigma):
  return spec.prelim.weights or denoisers.dncnn_path(spec.prelim.weights_dir, sigma)


def _check_ffdnet(spec, images):
  for c in sorted({im.noisy_HxWxC.shape[-1] for im in images}):
    denoisers.load_ffdnet(_ffdnet_file(spec, c), c)


def _run_batched(spec: XbarSpec, images: list[Image], key, denoise) -> list[np.ndarray]:
  """denoise(indices, noisy_NxHxWxC) per same-(shape, key) batch, scattered back in order."""
  out = [None] * len(images)
  for idx in _batches(spec, images, key):
    x = denoise(idx, np.stack([images[i].noisy_HxWxC for i in idx]))
    for j, i in enumerate(idx):
      out[i] = x[j]
  return out


def _run_ffdnet(spec, images):
  sigmas = np.array(sigmas_for(spec, images), np.float32)

  def denoise(idx, noisy):
    c = noisy.shape[-1]
    return denoisers.ffdnet_denoise(denoisers.load_ffdnet(_ffdnet_file(spec, c), c), noisy, sigmas[idx])

  return _run_batched(spec, images, lambda i: 0, denoise)


def _check_dncnn(spec, images):
  levels = [spec.sigma] if spec.sigma > 0 else list(denoisers.DNCNN_SIGMAS) + [35.0]
  for c in sorted({im.noisy_HxWxC.shape[-1] for im in images}):
    for s in levels:
      load_dncnn(_dncnn_file(spec, s), c)


def _run_dncnn(spec, images):
  sigmas = sigmas_for(spec, images)

  def denoise(idx, noisy):
    fn = load_dncnn(_dncnn_file(spec, sigmas[idx[0]]), noisy.shape[-1])
    return np.asarray(fn(jnp.asarray(noisy)))

  return _run_batched(spec, images, lambda i: _dncnn_file(spec, sigmas[i]), denoise)


def _x8(run):
  """run over the 8 flips and rotations of every image, each output mapped back, averaged (x8)."""

  def run_x8(spec, images):
    outs = []
    for k in range(8):
      turned = [
        dataclasses.replace(im, noisy_HxWxC=np.ascontiguousarray(sure.dihedral(im.noisy_HxWxC, k))) for im in images
      ]
      outs.append([sure.undo_dihedral(np.asarray(x), k) for x in run(spec, turned)])
    return [np.mean(per, axis=0).astype(np.float32) for per in zip(*outs)]

  return run_x8


def _run_noisy(spec, images):
  return [im.noisy_HxWxC for im in images]


def _dncnn_s_exists(spec) -> bool:
  return min(abs(s - spec.sigma) for s in denoisers.DNCNN_SIGMAS) <= 2.5


# config.SURE_CANDIDATES -> (check, run) of each x_bar candidate a SURE blend weighs.
CANDIDATES: Mapping[str, Prelim] = types.MappingProxyType(
  {
    "ffdnet": Prelim(_check_ffdnet, _run_ffdnet),
    "ffdnet_x8": Prelim(_check_ffdnet, _x8(_run_ffdnet)),
    "dncnn": Prelim(_check_dncnn, _run_dncnn),
    "dncnn_x8": Prelim(_check_dncnn, _x8(_run_dncnn)),
    "bm3d": Prelim(_check_bm3d, _run_bm3d),
    "noisy": Prelim(_check_none, _run_noisy),
  }
)


def sure_candidates(spec: XbarSpec) -> list[str]:
  """The candidates of --prelim=sure_blend at this sigma (DnCNN only where a DnCNN-S was trained)."""
  return [c for c in spec.prelim.sure_candidates if not c.startswith("dncnn") or _dncnn_s_exists(spec)]


def _check_sure_blend(spec, images):
  if spec.sigma <= 0:
    raise InputError("--prelim=sure_blend needs the noise level: set --sigma (SURE is unbiased only at a known sigma)")
  check_candidates(spec, images)


def check_candidates(spec: XbarSpec, images: list[Image]) -> None:
  """Each of --sure_candidates that applies at spec.sigma can run (weights present)."""
  names = sure_candidates(spec)
  if not names:
    raise InputError(f"--sure_candidates={','.join(spec.prelim.sure_candidates)}: none applies at sigma {spec.sigma:g}")
  for c in names:
    CANDIDATES[c].check(spec, images)


def candidate_outputs(spec: XbarSpec, images: list[Image]) -> tuple[list[str], dict, dict]:
  """(names, outputs, divergences) of the SURE blend's candidates, each a list over the images. The
  probes are seeded by the image's name, so nothing depends on the batch."""
  s, names = spec.sigma / 255.0, sure_candidates(spec)
  eps = sure.eps_for(s)
  probes = [sure.probes_for(im.name, im.noisy_HxWxC.shape, spec.prelim.sure_probes) for im in images]
  outs, divs = {}, {}
  for c in names:
    run = CANDIDATES[c].run
    outs[c] = [np.asarray(x, np.float32) for x in run(spec, images)]
    if c == "noisy":  # f(y) = y: its divergence is N exactly
      divs[c] = [float(im.noisy_HxWxC.size) for im in images]
      continue
    per = []
    for p in range(spec.prelim.sure_probes):
      moved = [dataclasses.replace(im, noisy_HxWxC=im.noisy_HxWxC + eps * b[p]) for im, b in zip(images, probes)]
      per.append([float(np.sum(b[p] * (fb - fy))) / eps for b, fb, fy in zip(probes, run(spec, moved), outs[c])])
    divs[c] = list(np.mean(per, axis=0))
  return names, outs, divs


def sure_blend(spec: XbarSpec, images: list[Image]) -> tuple[list[np.ndarray], list[dict]]:
  """Each image's SURE-optimal blend of the candidates (sure.blend_weights; clipped to [0, 1]) and,
  per image, the weights and SURE's PSNR estimate of every candidate and of the blend."""
  names, outs, divs = candidate_outputs(spec, images)
  xbars, infos = [], []
  for i, im in enumerate(images):
    blend, info = sure.blend_image(
      im.noisy_HxWxC, names, [outs[c][i] for c in names], [divs[c][i] for c in names], spec.sigma
    )
    xbars.append(np.clip(blend, 0.0, 1.0))
    infos.append(info)
  return xbars, infos


def _run_sure_blend(spec, images):
  return sure_blend(spec, images)[0]


# config.PRELIMS -> implementation.
REGISTRY: Mapping[str, Prelim] = types.MappingProxyType(
  {
    "none": Prelim(_check_none, _run_none),
    "ffdnet": Prelim(_check_ffdnet, _run_ffdnet),
    "dncnn": Prelim(_check_dncnn, _run_dncnn),
    "bm3d": Prelim(_check_bm3d, _run_bm3d),
    "file": Prelim(_check_file, _run_file),
    "bicubic": Prelim(_check_bicubic, _run_bicubic),
    "sure_blend": Prelim(_check_sure_blend, _run_sure_blend),
  }
)


def run(spec: XbarSpec, images: list[Image]) -> tuple[list[np.ndarray], list[dict]]:
  """x_bar of each image with spec.prelim's denoiser (its x8 self-ensemble with --x8), and what
  results.json records per image about it (the SURE blend's weights); checks done before."""
  name = spec.prelim.name
  if name == "sure_blend":
    return sure_blend(spec, images)
  fn = _x8(REGISTRY[name].run) if spec.prelim.x8 and name in ("ffdnet", "dncnn") else REGISTRY[name].run
  return fn(spec, images), [{} for _ in images]


def run_logged(spec: XbarSpec, images: list[Image]) -> tuple[list[np.ndarray], list[dict]]:
  """run, with its time in the log (the runner's x_bar of a job)."""
  t = time.perf_counter()
  out = run(spec, images)
  logging.info("preliminary denoiser %s: %d images in %.1fs", spec.prelim.name, len(images), time.perf_counter() - t)
  return out


def make(spec: XbarSpec, images: list[Image]) -> list[np.ndarray]:
  """x_bar of each image with spec.prelim's denoiser, after its checks."""
  REGISTRY[spec.prelim.name].check(spec, images)
  return run(spec, images)[0]
