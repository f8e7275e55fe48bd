"""Is x_bar linear over a SURE twin's step?

The finite-difference divergence of FFDNet, b . (x_bar(y + eps b) - x_bar(y)) / eps per value, at steps eps of
1/100, 1/10 and 1/2 of sigma: equal where x_bar is linear over the step; --stop=sure's twins step by
--sure_eps = 0.5 sigma.

  python experiments/studies/xbar_linearity.py
  (holdout9, gray, sigma 25, 64 px crops and full size; ~1 min on 2 CPU cores;
  writes experiments/results/sure/xbar_linearity.{json,md})
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from absl import app, flags

from idip_jax import config, data, outputs, prelim, sure

F = flags.FLAGS
flags.DEFINE_string("xl_set", "holdout9", "image set under $IDIP_SHARED/data")
flags.DEFINE_float("xl_sigma", 25.0, "noise level (0-255)")
flags.DEFINE_list("xl_fractions", ["0.01", "0.1", "0.5"], "finite-difference steps as fractions of sigma")
flags.DEFINE_list("xl_crops", ["64", "0"], "center crops (0: full size)")
flags.DEFINE_string("xl_out", "", "results path without extension (default experiments/results/sure/xbar_linearity)")


def main(argv):
  spec = prelim.XbarSpec(config.PrelimConfig("ffdnet"), F.xl_sigma)
  rows = []
  for crop in map(int, F.xl_crops):
    images = data.load_images(os.path.join(data.shared_dir(), "data", F.xl_set), F.xl_sigma, channels=1, crop=crop)
    fy = prelim.make(spec, images)
    bs = [sure.probes_for(im.name, im.noisy_HxWxC.shape, 1)[0] for im in images]
    for frac in map(float, F.xl_fractions):
      eps = frac * F.xl_sigma / 255.0
      moved = [dataclasses.replace(im, noisy_HxWxC=im.noisy_HxWxC + eps * b) for im, b in zip(images, bs)]
      fb = prelim.make(spec, moved)
      per = {im.name: float(np.sum(b * (f2 - f1))) / eps / b.size for im, b, f1, f2 in zip(images, bs, fy, fb)}
      rows.append({"crop": crop, "fraction": frac, "div_per_value": per, "mean": float(np.mean(list(per.values())))})
  doc = dict(
    outputs.provenance(), command=" ".join(["python", "experiments/studies/xbar_linearity.py"] + argv[1:]), rows=rows
  )
  doc |= {"set": F.xl_set, "sigma": F.xl_sigma}
  out = F.xl_out or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "sure", "xbar_linearity"
  )
  outputs.write_table(os.path.dirname(out), os.path.basename(out), doc, markdown(doc))
  print(markdown(doc))


def markdown(doc: dict) -> str:
  lines = [
    f"# Is FFDNet linear over a SURE twin's step? {doc['set']}, sigma {doc['sigma']:g}",
    "",
    f"`{doc['command']}`; {doc['device']}, commit {doc['commit']}, {doc['date']}. Finite-difference divergence of",
    "FFDNet per value, b . (x_bar(y + eps b) - x_bar(y)) / eps / N, mean over the images (one probe b each).",
    "",
    "| crop | eps / sigma | divergence / N |",
    "|---|---|---|",
  ]
  lines += [f"| {r['crop'] or 'full'} | {r['fraction']:g} | {r['mean']:.3f} |" for r in doc["rows"]]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  app.run(main)
