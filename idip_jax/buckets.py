"""A test set's same-shape buckets, the runs still to fit in each and the runs per call, and the
Batch of one call (padded images; with --stop=sure each run's twins beside it)."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from idip_jax import batch_choice, batching, data, fit, sure_fit
from idip_jax.config import RunConfig
from idip_jax.data import Image
from idip_jax.train import Batch, run_keys


def plan(cfg: RunConfig, images: list[Image], done: set[str]) -> list[dict]:
  """Same-shape buckets of the images (padded to a multiple of 2^scales), each with its runs
  (image index, seed) still to fit and its runs per call."""
  plan = []
  for (ph, pw, c), idx in data.bucket_keys(images, cfg.net.scales).items():
    runs = [(i, k) for i in idx for k in range(cfg.fit.seeds) if images[i].name not in done]
    has_gt = images[idx[0]].clean_HxWxC is not None
    bucket = {"shape": [ph, pw, c], "images": len(idx), "runs": runs}
    if cfg.fit.batch_strategy == "auto":  # a bucket with no runs left (--resume) times nothing: one candidate
      choice = batch_choice.choose(
        cfg.net, cfg.fit, (ph, pw, c), max(len(runs), 1), cfg.batch_size, has_gt, cfg.batch_cache
      )
      bucket.update({k: choice[k] for k in ("batch_size", "batch_strategy", "batch_conv")}, batch_choice=choice)
    else:
      per_call = cfg.batch_size or (
        batching.auto_batch_size(cfg.net, cfg.fit, ph, pw, len(runs), with_gt=has_gt) if runs else 1
      )
      bucket.update(batch_size=per_call, batch_strategy=cfg.fit.batch_strategy, batch_conv=cfg.net.batch_conv)
    if cfg.fit.stop == "sure" and not cfg.batch_size:  # each run comes with its twins: 2 or 3 rows per run
      bucket["batch_size"] = max(1, bucket["batch_size"] // sure_fit.rows_per_run(cfg.fit))
    plan.append(bucket)
  return plan


def configs(cfg: RunConfig, bucket: dict) -> tuple:
  """The net and fit configs a bucket's calls run with: its batch strategy and lowering."""
  return (
    dataclasses.replace(cfg.net, batch_conv=bucket["batch_conv"]),
    dataclasses.replace(cfg.fit, batch_strategy=bucket["batch_strategy"]),
  )


def call_batch(
  cfg: RunConfig, images: list[Image], prelims: list, part: list[tuple[int, int]], shape: list[int], twins=None
) -> tuple[Batch, list]:
  """The batch of a call's runs; with twins (--stop=sure: sure_twins.inputs' twins of each image and their
  x_bar) each run's row is followed by its twins' rows: same seed, y + eps b_k (and y - eps b_k)."""
  if twins is not None:
    group = 1 + len(twins)
    rows = [(i, k, g) for i, k in part for g in range(group)]
    ims = [images[i] if g == 0 else twins[g - 1][0][i] for i, _, g in rows]
    pres = [prelims[i] if g == 0 else twins[g - 1][1][i] for i, _, g in rows]
    batch, keys = call_batch(cfg, ims, pres, [(r, k) for r, (_, k, _) in enumerate(rows)], shape)
    ph, pw, _ = shape
    probe = [
      data.pad_reflect(b, ph, pw)
      for i, _ in part
      for b in sure_fit.row_probes(images[i].name, images[i].noisy_HxWxC.shape, cfg.fit)
    ]
    s = np.full((len(rows),), cfg.sigma / 255.0, np.float32)
    eps = np.full_like(s, cfg.fit.sure_eps * cfg.sigma / 255.0)
    return batch.replace(
      probe=jnp.asarray(np.stack(probe) * batch.mask), sure_eps=jnp.asarray(eps), sure_sigma=jnp.asarray(s)
    ), keys
  ph, pw, _ = shape
  pad = lambda x: data.pad_reflect(x, ph, pw)
  keys = [run_keys(cfg.fit.seed, k) for _, k in part]
  has_gt = images[part[0][0]].clean_HxWxC is not None
  extent = np.stack([data.mask_for(*images[i].noisy_HxWxC.shape[:2], ph, pw) for i, _ in part])
  # y and the loss's mask per task (tasks.py): the noisy image; the masked image and its
  # observed pixels; the low-resolution image, all of it (SR images are never padded).
  y, loss_mask = np.stack([pad(images[i].noisy_HxWxC) for i, _ in part]), None
  if cfg.fit.task == "inpaint":
    loss_mask = extent * np.stack([pad(images[i].observed_HxWx1) for i, _ in part])
  if cfg.fit.task == "sr":
    y = np.stack([images[i].lr_HxWxC for i, _ in part])
    loss_mask = np.ones((*y.shape[:3], 1), np.float32)
  batch = fit.make_batch(
    cfg.net,
    cfg.fit,
    keys,
    y,
    prelim_NxHxWxC=np.stack([pad(prelims[i]) for i, _ in part]) if prelims[part[0][0]] is not None else None,
    clean_NxHxWxC=np.stack([pad(images[i].clean_HxWxC) for i, _ in part]) if has_gt else None,
    mask_NxHxWx1=extent,
    loss_mask_NxHxWx1=loss_mask,
  )
  return batch, keys
