"""How far are batched fits from single-image fits (issue 13, item 4)?

The same runs (image, seed) fitted one per call, all in one vmapped call (grouped convolutions)
and all in one lax.map call; PSNR of each image's output after --steps, and the differences.

python experiments/batch_equality.py   (2-core CPU: ~10 min; writes experiments/results/batch_equality.{md,json})
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
flags.DEFINE_string("out", "experiments/results/batch_equality", "results path without extension")


def main(_):
  spec = F.input or os.path.join(data.shared_dir(), "data", "holdout9")
  images = data.load_images(spec, 25, 0, channels=1, crop=F.crop, noise="clip")[:F.max_images]
  net = NetConfig(out_channels=1)
  cfg = fit.FitConfig(steps=F.steps, chunk=50)
  keys = [fit.run_keys(cfg.seed, 0) for _ in images]
  h, w = F.crop, F.crop
  batch = fit.Batch(input_HxWxC=fit.make_inputs(net, cfg, keys, None, h, w, False),
                    y_HxWxC=jnp.asarray(np.stack([im.noisy_HxWxC for im in images])),
                    prelim_HxWxC=jnp.zeros((len(images), h, w, 1)), mask_HxWx1=jnp.ones((len(images), h, w, 1)),
                    gt_HxWxC=jnp.asarray(np.stack([im.clean_HxWxC for im in images])))
  take = lambda i: fit.Batch(*(None if a is None else a[i:i + 1] for a in dataclasses.astuple(batch)))
  psnr = lambda out: [float(metrics.psnr(jnp.asarray(o), im.clean_HxWxC)) for o, im in zip(out, images)]
  single = psnr(np.concatenate([fit.fit(net, cfg, take(i), keys[i:i + 1]).final_NxHxWxC for i in range(len(images))]))
  vmapped = psnr(fit.fit(net, cfg, batch, keys).final_NxHxWxC)
  mapped = psnr(fit.fit(net, dataclasses.replace(cfg, strategy="map"), batch, keys).final_NxHxWxC)
  rows = [{"name": im.name, "single": s, "vmap": v, "map": m} for im, s, v, m in zip(images, single, vmapped, mapped)]
  diff = lambda k: [r[k] - r["single"] for r in rows]
  summary = {k: {"max_abs": float(np.max(np.abs(diff(k)))), "mean": float(np.mean(diff(k))),
                 "mean_of_means": float(np.mean([r[k] for r in rows]) - np.mean(single))} for k in ("vmap", "map")}
  meta = {"device": outputs.device_name(), "commit": outputs.git_commit(), "date": outputs.now(),
          "steps": F.steps, "crop": F.crop, "images": len(images)}
  outputs.write_json(F.out + ".json", dict(meta, rows=rows, summary=summary))
  with open(F.out + ".md", "w") as f:
    f.write(f"# Batched vs single-image fits\n\n{meta['device']}, commit {meta['commit']}, {meta['date']}. "
            f"`python experiments/batch_equality.py`: DIP (official net, defaults), holdout9 gray, {F.crop} px "
            f"crops, sigma 25 clipped, {F.steps} steps; the same run keys in every column. PSNR (dB) of the "
            "output after the last step.\n\n| image | one per call | vmap (one call) | lax.map (one call) |\n"
            "|---|---|---|---|\n")
    for r in rows:
      f.write(f"| {r['name']} | {r['single']:.3f} | {r['vmap']:.3f} | {r['map']:.3f} |\n")
    for k, v in summary.items():
      f.write(f"\n{k} - single: per image max |diff| {v['max_abs']:.3f} dB, mean diff {v['mean']:+.3f} dB.")
    f.write("\n")
  print(open(F.out + ".md").read())


if __name__ == "__main__":
  app.run(main)
