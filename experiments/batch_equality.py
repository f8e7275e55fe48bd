"""How far are batched fits from single-image fits (issue 13, item 4)?

The same runs (image, seed) fitted one per call and all in one vmapped call with each --batch_conv
lowering (convs.per_run_conv; grouped = plain vmap): PSNR of each image's output after --steps, and
the differences. And lax.map over
the runs in one call against one per call, compared exactly over --map_steps steps (on XLA:CPU a
lax.map body runs inside a while loop, ~15x slower, so a full-length map run is left to GPUs;
bitwise-equal losses at every step mean equal fits at any length).

python experiments/batch_equality.py   (2-core CPU: ~25 min; writes experiments/results/batch_equality.{md,json})
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import report  # noqa: E402
from idip_jax import config, data, fit, metrics, outputs, runner  # noqa: E402
from idip_jax.train import Batch, run_keys  # noqa: E402

F = flags.FLAGS
config.define_flags(F, config.RunConfig)  # --input (default holdout9), --crop, --steps, ...
config.define_flags(F, config.ExperimentConfig)
flags.DEFINE_integer("map_steps", 20, "steps of the exact lax.map vs one-per-call comparison")
F.set_default("crop", 64)
F.set_default("steps", 300)
F.set_default("chunk", 50)
F.set_default("max_images", 3)
F.set_default("noise", "clip")
F.set_default("sigma", 25.0)


def main(_):
  run = config.from_flags(F, config.RunConfig)
  run = dataclasses.replace(
    run,
    method="dip",
    image_channels=1,
    workdir="-",
    input=run.input or os.path.join(data.shared_dir(), "data", "holdout9"),
  )
  images = data.load_images(run.input, run.sigma, run.noise_seed, 1, crop=run.crop, noise=run.noise)[: F.max_images]
  run = runner.resolve(run, 1)
  net, cfg = fit.for_backend(run.net, dataclasses.replace(run.fit, batch_strategy="vmap"), jax.default_backend())
  out = F.out or "experiments/results/batch_equality"
  keys = [run_keys(cfg.seed, 0) for _ in images]
  batch = fit.make_batch(
    net,
    cfg,
    keys,
    np.stack([im.noisy_HxWxC for im in images]),
    clean_NxHxWxC=np.stack([im.clean_HxWxC for im in images]),
  )
  take = lambda i: Batch(*(None if a is None else a[i : i + 1] for a in dataclasses.astuple(batch)))
  psnr = lambda outs: [float(metrics.psnr(jnp.asarray(o), im.clean_HxWxC)) for o, im in zip(outs, images)]
  singles = lambda c: [fit.fit(net, c, take(i), keys[i : i + 1]) for i in range(len(images))]
  single = psnr(np.concatenate([r.final_NxHxWxC for r in singles(cfg)]))
  rows = [{"name": im.name, "single": s} for im, s in zip(images, single)]
  short = dataclasses.replace(cfg, steps=F.map_steps, chunk=F.map_steps)
  one = np.concatenate([r.history["loss"] for r in singles(short)], axis=1)
  mapped = fit.fit(net, dataclasses.replace(short, batch_strategy="map"), batch, keys).history["loss"]
  summary = {"map_steps": F.map_steps, "map_loss_max_abs_diff": float(np.abs(mapped - one).max())}
  for lw in F.lowerings:
    net_lw = dataclasses.replace(net, batch_conv=lw)
    for r, v in zip(rows, psnr(fit.fit(net_lw, cfg, batch, keys).final_NxHxWxC)):
      r[lw] = v
    d = [r[lw] - r["single"] for r in rows]
    vm = fit.fit(net_lw, short, batch, keys).history["loss"]
    summary[lw] = {"max_abs": float(np.max(np.abs(d))), "mean": float(np.mean(d))}
    summary[lw]["loss_max_abs_diff"] = float(np.abs(vm - one).max())
  meta = {**outputs.provenance(), "steps": cfg.steps, "crop": run.crop, "images": len(images)}
  doc = dict(meta, lowerings=list(F.lowerings), rows=rows, summary=summary)
  outputs.write_table(os.path.dirname(out) or ".", os.path.basename(out), doc, report.batch_equality_markdown(doc))
  print(report.batch_equality_markdown(doc))


if __name__ == "__main__":
  app.run(main)
