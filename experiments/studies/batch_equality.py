"""How far are batched fits from single-image fits?

The same runs (image, seed) fitted one per call and all in one vmapped call with each --batch_conv
lowering (convs.per_run_conv; grouped = plain vmap): PSNR of each image's output after --steps, and
the differences; and lax.map over the runs in one call against one per call, compared over
--map_steps steps (on XLA:CPU a lax.map body runs inside a while loop, ~15x slower, so a full-length
map run is left to GPUs). Each way of running is a job of experiments/harness/catalogue.py
(batch_equality_jobs), run or reused by the one job runner (jobs.Runner); losses are compared as the
job histories store them (6 significant digits).

python experiments/studies/batch_equality.py --flagfile=experiments/studies/batch_equality.flags
(2-core CPU: 9 min; writes experiments/results/batch_equality.{md,json})
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from experiments.harness import catalogue, jobs, report
from idip_jax import config, data, outputs

F = flags.FLAGS
config.define_flags(F, config.RunConfig)  # --crop, --steps, --noise, --workdir, ...
config.define_flags(F, config.ExperimentConfig)
flags.DEFINE_integer("map_steps", 20, "steps of the lax.map vs one-per-call comparison")


def equality_doc(res: dict[str, dict], lowerings: list[str], map_steps: int) -> dict:
  """The study's rows and summary from its jobs' results (label -> jobs.Runner.run's result)."""
  psnr = {label: {r["name"]: r["psnr_final"] for r in v["images"]} for label, v in res.items()}
  loss = lambda label, n: np.stack([h["loss"][:n] for h in res[label]["histories"].values()])
  n = min(map_steps, res["map"]["steps"])
  rows = [{"name": name, "single": s, **{lw: psnr[lw][name] for lw in lowerings}} for name, s in psnr["single"].items()]
  summary = {"map_steps": n, "map_loss_max_abs_diff": float(np.abs(loss("map", n) - loss("single", n)).max())}
  for lw in lowerings:
    d = [r[lw] - r["single"] for r in rows]
    summary[lw] = {
      "max_abs": float(np.max(np.abs(d))),
      "mean": float(np.mean(d)),
      "loss_max_abs_diff": float(np.abs(loss(lw, n) - loss("single", n)).max()),
    }
  return {
    "steps": res["single"]["steps"],
    "images": len(rows),
    "lowerings": list(lowerings),
    "rows": rows,
    "summary": summary,
  }


def main(_):
  base = config.from_flags(F, config.RunConfig)
  lowerings = [lw for lw in F.lowerings if lw not in ("map", "unroll")]
  ddir = F.data_dir or os.path.join(data.shared_dir(), "data")
  runs = F.max_images or (3 if F.smoke else len(data.list_inputs(os.path.join(ddir, "holdout9"))))
  rows = catalogue.batch_equality_jobs(tuple(lowerings), runs, F.map_steps)
  if F.dry_run:
    return jobs.print_jobs(rows)
  settings = jobs.Settings(
    base,
    base.workdir or "runs/batch_equality",
    data_dir=F.data_dir,
    smoke=F.smoke,
    max_images=F.max_images,
    allow_other_code=F.allow_other_code,
  )
  runner_ = jobs.Runner(settings)
  res = {label: runner_.run(job) for label, job in rows}
  doc = {**outputs.provenance(), "crop": res["single"]["cfg"].crop, **equality_doc(res, lowerings, F.map_steps)}
  out = F.out or "experiments/results/batch_equality"
  outputs.write_table(os.path.dirname(out) or ".", os.path.basename(out), doc, report.batch_equality_markdown(doc))
  print(report.batch_equality_markdown(doc))


if __name__ == "__main__":
  app.run(main)
