"""Why does IDIP not beat its own x_bar?

One change at a time from the default IDIP, on the same noisy images and x_bar, with the clean-input PSNR
curve of each run beside x_bar's PSNR. The variants are jobs of experiments/harness/catalogue.py, fitted (or
read back) by jobs.Runner as every table's.

python experiments/studies/faithfulness.py --flagfile=experiments/studies/faithfulness/study.flags
Writes <out>.json (per variant and image: x_bar PSNR, peak clean-input PSNR and its step, final
and EMA PSNR at the last step; the commit and command) after every variant, and <out>.md.

Full size on a 2-core CPU: one process per image, each pinned to a core with Eigen's threads off
(1.28x one process's image rate, README "On CPU"), then one table from their files:
python experiments/studies/faithfulness.py --merge_studies=a.json,b.json --out=experiments/results/faithfulness/full
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
from absl import app, flags

from experiments.harness import catalogue, jobs, report
from idip_jax import config, outputs

F = flags.FLAGS
config.define_flags(F, config.RunConfig)  # the default IDIP run: --sigma, --noise, --crop, --steps, ...
config.define_flags(F, config.ExperimentConfig)
flags.DEFINE_list("images", list(catalogue.FAITHFULNESS_IMAGES), "set/name of each image")
flags.DEFINE_bool(
  "reuse_finished",
  False,
  "a variant whose job folder holds no results yet continues from its last checkpoint (--resume's rule); a finished "
  "one of the same job (resume.finished_job: same settings and code) is always read, not refitted",
)
flags.DEFINE_list(
  "merge_studies",
  [],
  "study JSON files (same sigma, crop, x_bar) to combine into --out per variant and image; fits nothing",
)
flags.DEFINE_list("variants", list(catalogue.FAITHFULNESS_VARIANTS), "see catalogue.FAITHFULNESS_VARIANTS")


def main(argv):
  del argv
  if F.merge_studies:
    return write_merged(F.merge_studies, F.out, F.overwrite)
  base = dataclasses.replace(config.from_flags(F, config.RunConfig), image_channels=1, save_images=False)
  rows = catalogue.faithfulness_jobs(tuple(F.images), base.sigma, base.prelim.name, F.variants)
  if F.dry_run:
    return jobs.print_jobs(rows)
  settings = jobs.Settings(
    base=base,
    workdir=base.workdir or "runs/faithfulness",
    data_dir=F.data_dir,
    allow_other_code=F.allow_other_code,
    resume_unfinished=F.reuse_finished,
  )
  runner_ = jobs.Runner(settings)
  out = F.out or "experiments/results/faithfulness/study"
  meta = {
    **outputs.provenance(),
    "command": "python experiments/studies/faithfulness.py " + " ".join(sys.argv[1:]),
    "sigma": base.sigma,
    "crop": base.crop,
    "steps": base.fit.steps,
    "prelim": base.prelim.name,
    "variants": {},
  }
  for name, job in rows:
    res = runner_.run(job)
    recs = {}
    for r in res["images"]:
      h = res["histories"][r["name"]]
      best = int(np.nanargmax(h["psnr"]))
      recs[r["name"]] = {
        "xbar": r["psnr_prelim"],
        "peak": float(h["psnr"][best]),
        "peak_step": best + 1,
        "final": r["psnr_final"],
        "ema": r["psnr_ema"],
        "curve_steps": (np.flatnonzero(~np.isnan(h["psnr"])) + 1).tolist(),
        "curve": h["psnr"][~np.isnan(h["psnr"])].tolist(),
        "fit_commit": res["commit"],  # the code that fitted it (a finished job is read back)
        "fit_device": res["device"],
      }
    changes = dict(job.run) | dict(job.fit)
    meta["variants"][name] = {"method": job.method, "changes": changes, "steps": res["steps"], "images": recs}
    write_study(meta, out)  # incremental
    print(
      f"{name}: "
      + ", ".join(f"{n} peak {v['peak']:.2f}@{v['peak_step']} x_bar {v['xbar']:.2f}" for n, v in recs.items()),
      flush=True,
    )


def write_study(meta: dict, out: str) -> None:
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  outputs.write_json(out + ".json", meta)
  with open(out + ".md", "w") as f:
    f.write(report.faithfulness_markdown(meta))
  report.faithfulness_curves(meta, out + "_curves.png")


def merge(studies: list[dict]) -> dict:
  """One study from several (e.g. one process per image): variants in first-seen order, each (variant, image) once."""
  keys = ("sigma", "crop", "prelim")
  for s in studies[1:]:
    if any(s[k] != studies[0][k] for k in keys):
      raise ValueError(f"--merge_studies: the files differ in {', '.join(k for k in keys if s[k] != studies[0][k])}")
  variants = {}
  for s in studies:
    for name, v in s["variants"].items():
      m = variants.setdefault(name, {**v, "images": {}})
      if (m["method"], m["changes"], m["steps"]) != (v["method"], v["changes"], v["steps"]):
        raise ValueError(f"--merge_studies: variant {name} has other settings or steps in another file")
      for img, r in v["images"].items():
        if img in m["images"]:
          raise ValueError(f"--merge_studies: variant {name}, image {img} is in two files")
        # Older files kept the fit's commit per variant.
        m["images"][img] = {"fit_commit": v.get("fit_commit"), "fit_device": v.get("fit_device"), **r}
  images = report.image_names(variants)
  for v in variants.values():  # the same image order in every row
    v["images"] = {img: v["images"][img] for img in images if img in v["images"]}
  steps = max(v["steps"] for v in variants.values())
  return {**{k: studies[0][k] for k in keys}, "steps": steps, "variants": variants}


def write_merged(paths: list[str], out: str | None, overwrite: bool) -> None:
  if not out:
    sys.exit("error: --merge_studies needs --out")
  if os.path.exists(out + ".json") and not overwrite:
    sys.exit(f"error: {out}.json exists: add --overwrite to replace it")
  if any(os.path.abspath(out + ".json") == os.path.abspath(p) for p in paths):
    sys.exit(f"error: --out {out} would overwrite one of the --merge_studies files")
  studies = []
  for p in paths:
    try:
      with open(p) as f:
        studies.append(json.load(f))
    except (OSError, ValueError) as e:
      sys.exit(f"error: --merge_studies: cannot read {p}: {e}")
  try:
    merged = merge(studies)
  except ValueError as e:
    sys.exit(f"error: {e}")
  meta = {**outputs.provenance(), "command": "python experiments/studies/faithfulness.py " + " ".join(sys.argv[1:])}
  write_study({**meta, "merged_from": paths, **merged}, out)


if __name__ == "__main__":
  app.run(main)
