"""Mean PSNR of the JAX FFDNet/DnCNN with the official weights (issue 3's check).

python experiments/prelim_psnr.py   # ~2 min on a 2-core CPU; writes experiments/results/prelim_psnr.{md,json}
Protocol: AWGN on [0, 1] images, seeded by (noise_seed=0, image name); PSNR on the clipped output.
"""

import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from idip_jax import config, data, outputs, prelim  # noqa: E402

F = flags.FLAGS
config.define_flags(F, config.ExperimentConfig)

RUNS = [  # (set, channels, denoiser, sigma, published mean)
  ("Set12", 1, "ffdnet", 15, 32.75),
  ("Set12", 1, "ffdnet", 25, 30.43),
  ("Set12", 1, "ffdnet", 50, 27.32),
  ("Set12", 1, "dncnn", 15, 32.86),
  ("Set12", 1, "dncnn", 25, 30.44),
  ("Set12", 1, "dncnn", 50, 27.18),
  ("classic10", 1, "ffdnet", 30, 29.72),
  ("classic10", 1, "dncnn", 30, None),
  ("cbm3d9", 3, "ffdnet", 25, None),
]


def main(_):
  out = F.out or "experiments/results/prelim_psnr"
  rows = []
  for name, channels, method, sigma, ref in RUNS:
    images = data.load_images(
      os.path.join(F.data_dir or os.path.join(data.shared_dir(), "data"), name), sigma, 0, channels
    )
    per = prelim.psnr_per_image(images, sigma, method)
    rows.append(
      {
        "set": name,
        "method": method,
        "sigma": sigma,
        "mean_psnr": float(np.mean(list(per.values()))),
        "published": ref,
        "per_image": per,
      }
    )
    print(f"{name:10s} {method:7s} sigma={sigma:2d}  {rows[-1]['mean_psnr']:.2f}  (published {ref})", flush=True)
  doc = dict(outputs.provenance(), rows=rows)
  outputs.write_table(os.path.dirname(out) or ".", os.path.basename(out), doc, markdown(doc))


def markdown(doc: dict) -> str:
  """The .md of a stored .json (tests: the committed table rebuilds from its JSON byte for byte)."""
  lines = [
    f"# Preliminary denoisers: mean PSNR (dB)\n\nDevice {doc['device']}, commit {doc['commit']}, "
    f"{doc['date']}. Command: `python experiments/prelim_psnr.py`. AWGN on [0,1] images seeded by "
    "(0, image name); PSNR of the clipped output. Published: FFDNet/DnCNN papers (Set12) and the "
    "IDIP paper's FFDNet row (classic10, sigma 30).\n\n",
    "| set | denoiser | sigma | ours | published | diff |\n|---|---|---|---|---|---|\n",
  ]
  for r in doc["rows"]:
    ref = r["published"]
    lines.append(
      f"| {r['set']} | {r['method']} | {r['sigma']} | {r['mean_psnr']:.2f} | "
      f"{ref if ref is not None else '-'} | "
      f"{'%+.2f' % (r['mean_psnr'] - ref) if ref is not None else '-'} |\n"
    )
  return "".join(lines)


if __name__ == "__main__":
  app.run(main)
