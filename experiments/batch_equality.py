"""How far are batched fits from single-image fits (issue 13, item 4)?

The same runs (image, seed) fitted one per call and all in one vmapped call (grouped
convolutions): PSNR of each image's output after --steps, and the differences. And lax.map over
the runs in one call against one per call, compared exactly over --map_steps steps (on XLA:CPU a
lax.map body runs inside a while loop, ~15x slower, so a full-length map run is left to GPUs;
bitwise-equal losses at every step mean equal fits at any length).

python experiments/batch_equality.py   (2-core CPU: ~8 min; writes experiments/results/batch_equality.{md,json})
"""
from __future__ import annotations

import dataclasses
import os
import sys

import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from idip_jax import data, fit, metrics, outputs  # noqa: E402
from idip_jax.models import NetConfig  # noqa: E402

F = flags.FLAGS
flags.DEFINE_string("input", "", "images (default: holdout9 from ../shared/data)")
flags.DEFINE_integer("crop", 64, "center crop")
flags.DEFINE_integer("max_images", 3, "first N images")
flags.DEFINE_integer("steps", 300, "Adam steps (DIP's defaults otherwise)")
flags.DEFINE_integer("map_steps", 20, "steps of the exact lax.map vs one-per-call comparison")
flags.DEFINE_string("out", "experiments/results/batch_equality", "results path without extension")


def main(_):
  spec = F.input or os.path.join(data.shared_dir(), "data", "holdout9")
  images = data.load_images(spec, 25, 0, channels=1, crop=F.crop, noise="clip")[:F.max_images]
  net = NetConfig(out_channels=1)
  cfg = fit.FitConfig(steps=F.steps, chunk=50, prelim_weight=0.0)  # DIP: no x_bar term
  keys = [fit.run_keys(cfg.seed, 0) for _ in images]
  h, w = F.crop, F.crop
  batch = fit.Batch(input_HxWxC=fit.make_inputs(net, cfg, keys, None, h, w, False),
                    y_HxWxC=jnp.asarray(np.stack([im.noisy_HxWxC for im in images])),
                    prelim_HxWxC=jnp.zeros((len(images), h, w, 1)), mask_HxWx1=jnp.ones((len(images), h, w, 1)),
                    gt_HxWxC=jnp.asarray(np.stack([im.clean_HxWxC for im in images])))
  take = lambda i: fit.Batch(*(None if a is None else a[i:i + 1] for a in dataclasses.astuple(batch)))
  psnr = lambda out: [float(metrics.psnr(jnp.asarray(o), im.clean_HxWxC)) for o, im in zip(out, images)]
  singles = lambda c: [fit.fit(net, c, take(i), keys[i:i + 1]) for i in range(len(images))]
  single = psnr(np.concatenate([r.final_NxHxWxC for r in singles(cfg)]))
  vmapped = psnr(fit.fit(net, cfg, batch, keys).final_NxHxWxC)
  rows = [{"name": im.name, "single": s, "vmap": v} for im, s, v in zip(images, single, vmapped)]
  d = [r["vmap"] - r["single"] for r in rows]
  short = dataclasses.replace(cfg, steps=F.map_steps, chunk=F.map_steps)
  one = np.concatenate([r.history["loss"] for r in singles(short)], axis=1)
  mapped = fit.fit(net, dataclasses.replace(short, strategy="map"), batch, keys).history["loss"]
  vm = fit.fit(net, short, batch, keys).history["loss"]
  summary = {"vmap": {"max_abs": float(np.max(np.abs(d))), "mean": float(np.mean(d))},
             "map_steps": F.map_steps, "map_loss_max_abs_diff": float(np.abs(mapped - one).max()),
             "vmap_loss_max_abs_diff": float(np.abs(vm - one).max())}
  meta = {"device": outputs.device_name(), "commit": outputs.git_commit(), "date": outputs.now(),
          "steps": F.steps, "crop": F.crop, "images": len(images)}
  outputs.write_json(F.out + ".json", dict(meta, rows=rows, summary=summary))
  with open(F.out + ".md", "w") as f:
    f.write(f"# Batched vs single-image fits\n\n{meta['device']}, commit {meta['commit']}, {meta['date']}. "
            f"`python experiments/batch_equality.py`: DIP (official net, defaults), holdout9 gray, {F.crop} px "
            f"crops, sigma 25 clipped, {F.steps} steps; the same run keys in every column. PSNR (dB) of the "
            "output after the last step.\n\n| image | one per call | vmap (one call) | difference |\n"
            "|---|---|---|---|\n")
    for r in rows:
      f.write(f"| {r['name']} | {r['single']:.3f} | {r['vmap']:.3f} | {r['vmap'] - r['single']:+.3f} |\n")
    v = summary["vmap"]
    f.write(f"\nvmap - one per call: per image max |diff| {v['max_abs']:.3f} dB, mean {v['mean']:+.3f} dB.\n\n"
            f"Losses over {F.map_steps} steps, max |diff| against one run per call: lax.map "
            f"{summary['map_loss_max_abs_diff']:.3g}, vmap {summary['vmap_loss_max_abs_diff']:.3g}.\n")
  print(open(F.out + ".md").read())


if __name__ == "__main__":
  app.run(main)
