"""Which noise protocol reproduces a paper's own baseline row?

The preliminary denoiser's PSNR, per image, under each way of making the noisy image
(data.NOISE_PROTOCOLS: float x + n, clipped to [0, 1], clipped and rounded to 8 bits),
beside the paper's value. One AWGN draw per image, seeded by (0, name), for all protocols.

python experiments/studies/noise_protocol.py   (CPU, ~2 min; writes experiments/results/noise_protocol.{md,json})
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from experiments.harness import catalogue, jobs, report
from idip_jax import config, outputs

F = flags.FLAGS
config.define_flags(F, config.ExperimentConfig)


def main(_):
  rows = catalogue.noise_protocol_jobs()
  if F.dry_run:
    return jobs.print_jobs(rows)
  out = F.out or "experiments/results/noise_protocol"
  cases = {(ds, sigma, den): rest for ds, sigma, den, *rest in catalogue.NOISE_PROTOCOL_CASES}
  doc_rows = []
  for job, per in jobs.xbar_psnrs(rows, F.data_dir, F.smoke):
    paper, source, paper_per = cases[(job.dataset, job.sigma, job.prelim)]
    doc_rows.append(
      {
        "set": job.dataset,
        "sigma": job.sigma,
        "denoiser": job.prelim,
        "protocol": dict(job.run)["noise"],
        "mean": float(np.mean(list(per.values()))),
        "per_image": per,
        "paper_mean": paper,
        "paper_per_image": paper_per,
        "paper_source": source,
      }
    )
    print(job.dataset, job.sigma, job.prelim, doc_rows[-1]["protocol"], f"{doc_rows[-1]['mean']:.3f} (paper {paper})")
  doc = dict(outputs.provenance(), rows=doc_rows)
  outputs.write_table(os.path.dirname(out) or ".", os.path.basename(out), doc, report.noise_protocol_markdown(doc))
  print("wrote", out + ".md")


if __name__ == "__main__":
  app.run(main)
