"""The runner's side of --stop=sure (sure_fit.py is the fit's): each image's twins y + eps b_k with their
x_bar, and the x_bar candidates that NAME_sure.png blends with the fit. It makes x_bar (prelim), so the
fit engine, which only receives the twins as data, never imports the x_bar producers."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
from absl import logging

from idip_jax import config, prelim, sure
from idip_jax.data import Image
from idip_jax.sure_fit import twin


def twin_xbar_slopes(spec: prelim.XbarSpec, images: list[Image], prelims: list, k: int = 0) -> list[np.ndarray]:
  """x_bar's derivative along each image's probe b_k, (x_bar(y + delta b) - x_bar(y)) / delta at delta = sigma / 100:
  a twin's x_bar is x_bar + eps * slope, x_bar's linear response. x_bar(y + eps b) itself at the twin's step
  (--sure_eps=0.5, half of sigma) is far from linear: FFDNet's divergence measured 0.205 N there against 0.123 N
  at sigma / 100 and 0.125 N at sigma / 10 (holdout9, 64 px, sigma 25: experiments/results/sure/xbar_linearity.md),
  which made IDIP's SURE 3 dB pessimistic."""
  delta = sure.eps_for(spec.sigma / 255.0)
  nudged = prelim.run(spec, [dataclasses.replace(im, noisy_HxWxC=twin(im, delta, k).noisy_HxWxC) for im in images])[0]
  return [(np.asarray(n, np.float32) - p) / delta for n, p in zip(nudged, prelims)]


def inputs(cfg, images: list[Image], prelims: list) -> tuple[list, list[dict]]:
  """--stop=sure: each image's twins (y + eps b_k; central: and y - eps b_k), in row order, with their x_bar,
  and the x_bar candidates that NAME_sure.png blends with the fit (per image: names, outputs, divergences
  from the probe b_0)."""
  t = time.perf_counter()
  eps = cfg.fit.sure_eps * cfg.sigma / 255.0
  twins, spec = [], prelim.spec_of(cfg)
  k_twins, m = cfg.fit.sure_twins, config.METHODS[cfg.method]
  # A fit that reads x_bar (IDIP's input or loss) needs its twins' x_bar; DIP beside a --prelim carries the
  # run's own, unread, so no x_bar call is spent on it.
  follows = prelims[0] is not None and (m.prelim_input or m.prelim_loss)
  slopes = [twin_xbar_slopes(spec, images, prelims, k) for k in range(k_twins)] if follows else None
  for sign in (1.0, -1.0)[: 1 if cfg.fit.sure_diff == "forward" else 2]:
    for k in range(k_twins):
      twin_images = [twin(im, sign * eps, k) for im in images]
      xbars = list(prelims) if slopes is None else [p + sign * eps * d for p, d in zip(prelims, slopes[k])]
      twins.append((twin_images, xbars))
  names, outs, divs = prelim.candidate_outputs(spec, images)
  candidates = [
    {"names": names, "outputs": [outs[c][i] for c in names], "divs": [divs[c][i] for c in names]}
    for i in range(len(images))
  ]
  logging.info(
    "--stop=sure: twins and x_bar candidates (%s) of %d images in %.1fs",
    ",".join(names),
    len(images),
    time.perf_counter() - t,
  )
  return twins, candidates
