"""SURE along a DIP/IDIP fit (--stop=sure): the fit is a function of y, so its MC-SURE needs
the divergence of the whole fit with respect to y. Each run gets a twin fitted to y + eps b (same
seed, so the same init, code z and per-step noise; for IDIP the x_bar of y + eps b too); at every
eval step div ~ b . (f_twin - f) / eps. With --sure_twins=K each twin k has its own probe b_k and div is
the mean over the K twins. A batch holds each run's rows side by side: G j (the run), G j + 1 .. G j + K
(its twins, y + eps b_k), and with --sure_diff=central G j + K + 1 .. G j + 2K (y - eps b_k),
G = rows_per_run.

--stop=sure keeps, per run, the output and the EMA at the eval step of lowest SURE (each its
own), as ES-WMV keeps its step's; the twin's rows are dropped from every record.
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np

from idip_jax import sure
from idip_jax.data import Image

TWIN_SUFFIX = "~sure"  # the twin image's name (it never reaches a file or a record)
# History columns: SURE's PSNR estimate of the output and of the EMA per eval step (no ground truth).
HISTORY_KEYS = ("sure_psnr", "sure_psnr_ema")
# What eval_step adds per run for SURE: b . f and |y - f|^2 over the image's extent, of f = the
# output and f = the EMA.
DOT_KEYS = ("sure_dot", "sure_res", "sure_dot_ema", "sure_res_ema")


@flax.struct.dataclass
class SureState:
  """Per run: the lowest SURE so far and the step, image and divergence it was reached with, for
  the output and for the EMA."""

  best: jax.Array
  best_step: jax.Array
  best_div: jax.Array
  out: jax.Array  # HxWxC
  best_ema: jax.Array
  best_ema_step: jax.Array
  best_ema_div: jax.Array
  ema: jax.Array  # HxWxC


def init_state(out_shape: tuple[int, ...]) -> SureState:
  inf, zero = jnp.array(jnp.inf, jnp.float32), jnp.zeros((), jnp.int32)
  img = jnp.zeros(out_shape, jnp.float32)
  fzero = jnp.zeros((), jnp.float32)
  return SureState(inf, zero, fzero, img, inf, zero, fzero, img)


def probe_for(name: str, shape: tuple[int, ...], k: int = 0) -> np.ndarray:
  """The image's k-th probe b_k: prelim.candidate_outputs' probes (seeded by the name), so the fit's
  divergence and the x_bar candidates' come from the same b_0."""
  return sure.probes_for(name, shape, k + 1)[k]


def rows_per_run(cfg) -> int:
  """Rows of a batch per run (FitConfig): the run and its K twins (y + eps b_k; central: and y - eps b_k)."""
  if cfg.stop != "sure":
    return 1
  return 1 + cfg.sure_twins * (1 if cfg.sure_diff == "forward" else 2)


def row_probes(name: str, shape: tuple[int, ...], cfg) -> list[np.ndarray]:
  """The probes of a run's rows_per_run(cfg) rows (FitConfig), drawn once: the run's own is the sum of its
  twins' b_k, so that its one dot product b . f serves every twin (track); then each twin's b_k (central: the
  y - eps b_k twins again)."""
  b = sure.probes_for(name, shape, cfg.sure_twins)
  return [np.sum(b, axis=0)] + [b[(g - 1) % cfg.sure_twins] for g in range(1, rows_per_run(cfg))]


def twin(im: Image, eps: float, k: int = 0) -> Image:
  """The image fitted by a run's twin k: y + eps b_k (eps < 0: the central difference's other)."""
  b = probe_for(im.name, im.noisy_HxWxC.shape, k)
  suffix = TWIN_SUFFIX + ("-" if eps < 0 else "") + (str(k) if k else "")
  return dataclasses.replace(im, name=im.name + suffix, noisy_HxWxC=im.noisy_HxWxC + eps * b)


def eval_dots(out: jax.Array, ema: jax.Array, noisy: jax.Array, probe: jax.Array, mask: jax.Array) -> dict:
  """One run's DOT_KEYS (probe is zero outside the image's extent)."""
  res = lambda f: jnp.sum(mask * jnp.square(noisy - f))
  return {
    "sure_dot": jnp.sum(probe * out),
    "sure_res": res(out),
    "sure_dot_ema": jnp.sum(probe * ema),
    "sure_res_ema": res(ema),
  }


def track(state: SureState, ev: dict, ema: jax.Array, batch, done: jax.Array, cfg) -> tuple[SureState, dict]:
  """After `done` steps, over a batch of groups of rows_per_run(cfg) rows: SURE of each run's output
  (ev["out"]) and EMA from the eval's DOT_KEYS, and the lowest-SURE images kept. Twins get their run's
  values."""
  group, k = rows_per_run(cfg), cfg.sure_twins
  n_vals = (jnp.sum(batch.mask, axis=(1, 2, 3)) * batch.noisy.shape[-1])[::group]
  s2, eps = jnp.square(batch.sure_sigma)[::group], batch.sure_eps[::group]

  def estimate(dot, res):
    d = dot.reshape(-1, group)
    # forward: mean over k of b_k . (f(y + eps b_k) - f(y)) / eps (the run's row dots f(y) with the sum of
    # the b_k); central: of b_k . (f(y + eps b_k) - f(y - eps b_k)) / (2 eps)
    plus = d[:, 1 : 1 + k].sum(axis=1)
    if cfg.sure_diff == "forward":
      div = (plus - d[:, 0]) / (k * eps)
    else:
      div = (plus - d[:, 1 + k :].sum(axis=1)) / (2.0 * k * eps)
    mse = res[::group] / n_vals - s2 + 2.0 * s2 * div / n_vals
    return jnp.repeat(mse, group), jnp.repeat(div, group)

  mse, div = estimate(ev["sure_dot"], ev["sure_res"])
  mse_ema, div_ema = estimate(ev["sure_dot_ema"], ev["sure_res_ema"])
  better, better_ema = mse < state.best, mse_ema < state.best_ema
  img = lambda c, a, b: jnp.where(c[:, None, None, None], a, b)
  state = SureState(
    best=jnp.where(better, mse, state.best),
    best_step=jnp.where(better, done, state.best_step),
    best_div=jnp.where(better, div, state.best_div),
    out=img(better, ev["out"], state.out),
    best_ema=jnp.where(better_ema, mse_ema, state.best_ema),
    best_ema_step=jnp.where(better_ema, done, state.best_ema_step),
    best_ema_div=jnp.where(better_ema, div_ema, state.best_ema_div),
    ema=img(better_ema, ema, state.ema),
  )
  psnr = lambda m: -10.0 * jnp.log10(jnp.maximum(m, 1e-12))
  return state, {"sure_psnr": psnr(mse), "sure_psnr_ema": psnr(mse_ema)}
