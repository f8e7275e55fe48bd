"""Do the JAX FFDNet/DnCNN with the official weights match their published mean PSNRs?

python experiments/studies/prelim_psnr.py   # ~2 min on a 2-core CPU; writes experiments/results/prelim_psnr.{md,json}
Protocol: AWGN on [0, 1] images, seeded by (noise_seed=0, image name); PSNR on the clipped output.
"""

import os

import numpy as np
from absl import app, flags

from experiments.harness import catalogue, jobs, report
from idip_jax import config, outputs

F = flags.FLAGS
config.define_flags(F, config.ExperimentConfig)


def main(_):
  rows = catalogue.prelim_psnr_jobs()
  if F.dry_run:
    return jobs.print_jobs(rows)
  out = F.out or "experiments/results/prelim_psnr"
  published = {(ds, den, sigma): ref for ds, _, den, sigma, ref in catalogue.PRELIM_PSNR_RUNS}
  doc_rows = []
  for job, per in jobs.xbar_psnrs(rows, F.data_dir, F.smoke):
    ref = published[(job.dataset, job.prelim, job.sigma)]
    mean = float(np.mean(list(per.values())))
    doc_rows.append(
      {
        "set": job.dataset,
        "method": job.prelim,
        "sigma": job.sigma,
        "mean_psnr": mean,
        "published": ref,
        "per_image": per,
      }
    )
    print(f"{job.dataset:10s} {job.prelim:7s} sigma={job.sigma:2d}  {mean:.2f}  (published {ref})", flush=True)
  doc = dict(outputs.provenance(), rows=doc_rows)
  outputs.write_table(os.path.dirname(out) or ".", os.path.basename(out), doc, report.prelim_psnr_markdown(doc))


if __name__ == "__main__":
  app.run(main)
