"""Which noise protocol reproduces a paper's own baseline row (issue 11, item 5)?

The preliminary denoiser's PSNR, per image, under each way of making the noisy image
(data.NOISE_PROTOCOLS: float x + n, clipped to [0, 1], clipped and rounded to 8 bits),
beside the paper's value. One AWGN draw per image, seeded by (0, name), for all protocols.

python experiments/noise_protocol.py   (CPU, ~2 min; writes experiments/results/noise_protocol.{md,json})
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from idip_jax import config, data, outputs, prelim  # noqa: E402

F = flags.FLAGS
config.define_flags(F, config.ExperimentConfig)

# (set, sigma, denoiser, paper's mean, paper's per-image values where the paper lists them)
CASES = [
  (
    "classic10",
    30,
    "ffdnet",
    29.72,
    "IDIP paper, Table 2, FFDNet row",
    {"cameraman": 28.73, "peppers": 29.63, "lena": 30.68},
  ),
  ("Set12", 25, "ffdnet", 30.43, "FFDNet paper, Set12 mean", {}),
]


def main(_):
  out = F.out or "experiments/results/noise_protocol"
  ddir = F.data_dir or os.path.join(data.shared_dir(), "data")
  rows = []
  for ds, sigma, den, paper, source, paper_per in CASES:
    for protocol in data.NOISE_PROTOCOLS:
      images = data.load_images(os.path.join(ddir, ds), sigma, 0, channels=1, noise=protocol)
      per = prelim.psnr_per_image(images, sigma, den)
      rows.append(
        {
          "set": ds,
          "sigma": sigma,
          "denoiser": den,
          "protocol": protocol,
          "mean": float(np.mean(list(per.values()))),
          "per_image": per,
          "paper_mean": paper,
          "paper_per_image": paper_per,
          "paper_source": source,
        }
      )
      print(ds, sigma, den, protocol, f"{rows[-1]['mean']:.3f} (paper {paper})", flush=True)
  doc = dict(outputs.provenance(), rows=rows)
  outputs.write_table(os.path.dirname(out) or ".", os.path.basename(out), doc, markdown(doc))
  print("wrote", out + ".md")


def markdown(doc: dict) -> str:
  """The .md of a stored .json (tests: the committed table rebuilds from its JSON byte for byte)."""
  lines = [
    f"# Noise protocol vs the papers' baseline rows\n\n{doc['device']}, commit {doc['commit']}, "
    f"{doc['date']}. `python experiments/noise_protocol.py`. PSNR (dB) of the preliminary "
    "denoiser's clipped output; noisy image: float = x + n, clip = clipped to [0, 1], "
    "uint8 = clipped and rounded to 8 bits; same AWGN draw for all three.\n\n"
    "| set | sigma | denoiser | protocol | mean | paper | per image (paper) |\n|---|---|---|---|---|---|---|\n"
  ]
  for r in doc["rows"]:
    per = ", ".join(
      f"{n} {v:.2f}" + (f" ({r['paper_per_image'][n]})" if n in r["paper_per_image"] else "")
      for n, v in r["per_image"].items()
    )
    lines.append(
      f"| {r['set']} | {r['sigma']} | {r['denoiser']} | {r['protocol']} | {r['mean']:.2f} | "
      f"{r['paper_mean']} | {per} |\n"
    )
  return "".join(lines)


if __name__ == "__main__":
  app.run(main)
