"""Reproduce the IDIP and DIP papers' tables: every method of a table fitted batched, shared noise.

python experiments/tables.py --flagfile=experiments/tables/t2.flags
Writes <results_dir>/<table>.md, <table>.json and <table>_curves.png (PSNR vs step).
Identical jobs (dataset, sigma, method, x_bar source, steps, seeds) run once per process. The tables'
rows are in experiments/harness/catalogue.py; this entry point reads the flags and makes each table's
numbers (make_table); experiments/harness/jobs.py runs the jobs (the one job runner) and
experiments/harness/report.py writes the markdown and curves.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
from absl import flags

from experiments.harness.catalogue import ALL_TABLES, PAPER, PAPER_PER_IMAGE, table_jobs
from experiments.harness.jobs import (
  EMA_OF,
  REPORT,
  Job,
  Runner,
  Settings,
  at_step,
  blend_psnrs,
  mean_curve_peak,
)
from experiments.harness.report import plot_curves, write_markdown
from idip_jax import cli, config, outputs, runner
from idip_jax.data import InputError

F = flags.FLAGS
config.define_flags(F, config.RunConfig)  # every run setting, as in run.py (--crop, --noise, --workdir...)
config.define_flags(F, config.ExperimentConfig)  # --data_dir, --max_images (--out is unused here)
flags.DEFINE_list(
  "tables",
  ["T2"],
  "T1, T2, T3, T4, T6, DIPcolor, HOLDOUT, IDIPplus_<set> (holdout9, classic10, Set12), inpaint_heide11, SR4_Set5, "
  "SR4_Set14, or all",
)
flags.DEFINE_string("results_dir", "experiments/results", "where the tables go")
flags.DEFINE_list(
  "method_steps",
  [],
  "method=N: steps of that method's jobs (default: --steps, whose 0 is each method's default, config.DEFAULT_STEPS)",
)
flags.DEFINE_list(
  "report_steps",
  [],
  "method=N: the step count whose PSNR a table reports, read from "
  "the run's per-step history of the clean-input output and EMA (default: the run's)",
)
flags.DEFINE_list("rows", [], "run only these row labels of each table (default: all)")
flags.DEFINE_integer("ensemble_runs", 4, "K: runs per image of the IDIPplus tables' jobs (IDIP-xK)", lower_bound=2)
DEFAULT_WORKDIR = "runs/tables"


def selected_rows(table: str) -> list[tuple[str, Job]]:
  return [(label, job) for label, job in table_jobs(table, F.ensemble_runs) if not F.rows or label in F.rows]


def make_runner(steps: dict[str, int] | None = None) -> Runner:
  """The job runner of these flags (read here once: jobs.Runner reads none)."""
  settings = Settings(
    base=config.from_flags(F, runner.RunConfig),
    workdir=F.workdir or DEFAULT_WORKDIR,
    data_dir=F.data_dir,
    smoke=F.smoke,
    max_images=F.max_images,
    allow_other_code=F.allow_other_code,
  )
  return Runner(settings, steps)


def make_table(table: str, jobs: Runner, commit: str) -> dict:
  rows = selected_rows(table)
  report = cli.parse_method_counts("report_steps", F.report_steps)
  out = {
    "table": table,
    "device": outputs.device_name(),
    "commit": commit,
    "date": outputs.now(),
    "sigma": sorted({j.sigma for _, j in rows}),
    "methods": {},
    "paper": PAPER.get(table, {}),
    "paper_per_image": PAPER_PER_IMAGE.get(table, {}),
    "crop": 32 if F.smoke else F.crop,
    "smoke": F.smoke,
  }
  for label, job in rows:
    res = jobs.run(job)
    if job.method in report:
      res = at_step(res, report[job.method])
    is_prelim_row = job.method == "prelim"
    if job.report.startswith("blend:"):
      per_image = blend_psnrs(res, job.report)
      mean = float(np.mean(list(per_image.values())))
    else:
      key = "psnr_prelim" if is_prelim_row else REPORT[job.report]
      per_image, mean = {r["name"]: r[key] for r in res["images"]}, res["mean"][key]
    entry = {
      "steps": 0 if is_prelim_row else res["steps"],
      "run_steps": 0 if is_prelim_row else res.get("run_steps", res["steps"]),
      "prelim": job.prelim,
      "dataset": job.dataset,
      "sigma": job.sigma,
      "mean_psnr": mean,
      "per_image": per_image,
      "seconds": 0.0 if is_prelim_row else res["wall_seconds"],
      "commit": res.get("commit", commit),
      "code_hash": res.get("code_hash"),
      "device": res.get("device", outputs.device_name()),
      "noise": F.noise,
    }
    if not is_prelim_row:
      if job.report in EMA_OF:  # the EMA of the same output(s)
        ema_key = REPORT[EMA_OF[job.report]]
        entry["mean_psnr_ema"] = res["mean"][ema_key]
        entry["per_image_ema"] = {r["name"]: r[ema_key] for r in res["images"]}
      entry["oracle_mean_best_psnr"] = res["mean"]["oracle_best_psnr"]
      entry["oracle_mean_best_step"] = res["mean"]["oracle_best_step"]
      entry.update(mean_curve_peak(res, entry["steps"]))
      if res["mean"].get("psnr_prelim") is not None:
        entry["mean_psnr_prelim"] = res["mean"]["psnr_prelim"]  # its x_bar alone, same images
      if job.seeds > 1:
        entry["mean_psnr_avg_runs_ema"] = res["mean"]["psnr_avg_ema"]
        entry["mean_psnr_avg_runs_final"] = res["mean"]["psnr_avg_final"]
      if job.report != "final":
        entry["report"] = job.report
      if "stop_step" in res["mean"]:  # the criterion's step against the oracle's, per image
        entry["mean_stop_step"] = res["mean"]["stop_step"]
        entry["mean_stop_gap_db"] = res["mean"]["stop_gap_db"]
        entry["per_image_stop_step"] = {r["name"]: r["stop_step"] for r in res["images"]}
        entry["per_image_oracle_step"] = {r["name"]: r["oracle_best_step"] for r in res["images"]}
    out["methods"][label] = entry
  if table == "T6":
    out["fit_speed"] = fit_speed(jobs.run(rows[0][1]), jobs.run(rows[1][1]))
  return out


def fit_speed(dip: dict, idip: dict) -> dict:
  """Per image: DIP's best PSNR (oracle), and the first step at which DIP and IDIP reach it."""
  per, reductions = {}, []
  # Seconds per step of an image's own fit call (a batched call fits its images together);
  # the median over the job's calls leaves out the first call's compilation.
  sec_per_step = lambda res: float(np.median([r["seconds"] / r["steps"] for r in res["images"]]))
  sec_d, sec_i = sec_per_step(dip), sec_per_step(idip)
  for r in dip["images"]:
    name = r["name"]
    hd, hi = dip["histories"][name]["psnr"], idip["histories"][name]["psnr"]
    target = float(np.nanmax(hd))  # history rows are NaN between eval steps
    sd = int(np.argmax(hd >= target)) + 1
    si = int(np.argmax(hi >= target)) + 1 if (hi >= target).any() else None
    per[name] = {
      "dip_best_psnr": target,
      "dip_steps": sd,
      "idip_steps": si,
      "dip_seconds": sd * sec_d,
      "idip_seconds": None if si is None else si * sec_i,
    }
    if si is not None:
      reductions.append((100.0 * (1 - si / sd), 100.0 * (1 - si * sec_i / (sd * sec_d))))
  mean = lambda j: float(np.mean([r[j] for r in reductions])) if reductions else None
  return {
    "per_image": per,
    "reached": len(reductions),
    "images": len(per),
    "seconds_per_step": {"dip": sec_d, "idip": sec_i},
    "mean_step_reduction_pct": mean(0),
    "mean_seconds_reduction_pct": mean(1),
  }


def table_names(given: list[str]) -> list[str]:
  """--tables -> the tables to make (T4 is its two sets, all is every table); one line for a name that is none."""
  if not given:
    raise InputError(f"--tables is empty: name one or more of {', '.join(ALL_TABLES)}, T4 or all")
  if given == ["all"]:
    return list(ALL_TABLES)
  names = []
  for t in given:
    if t == "T4":
      names += ["T4_classic10", "T4_Set12"]
    elif t in ALL_TABLES:
      names.append(t)
    else:
      near = [a for a in [*ALL_TABLES, "T4"] if a.lower() == t.lower()]
      hint = f" (did you mean {near[0]}?)" if near else ""
      raise InputError(f"unknown table --tables={t}{hint}; choose from {', '.join(ALL_TABLES)}, T4 or all")
  return names


def main(argv):
  del argv
  commit = outputs.git_commit()  # the code that runs, even if HEAD moves meanwhile
  # Every flag is checked before anything is made (run.py's rule): names, counts, rows, the run settings.
  names = table_names(F.tables)
  steps = cli.parse_method_counts("method_steps", F.method_steps)
  cli.parse_method_counts("report_steps", F.report_steps)
  config.check(config.from_flags(F, runner.RunConfig))
  labels = {label for n in names for label, _ in table_jobs(n, F.ensemble_runs)}
  unknown = [r for r in F.rows if r not in labels]
  if unknown:
    raise InputError(f"--rows={unknown[0]} is no row of {', '.join(names)}; their rows: {', '.join(sorted(labels))}")
  if F.dry_run:
    for name in names:
      print(name, [(label, dataclasses.astuple(job)) for label, job in table_jobs(name, F.ensemble_runs)])
    return
  if not F.save_float and any(j.report.startswith("blend:") for n in names for _, j in selected_rows(n)):
    raise InputError("the IDIP-best rows (a blend report) read the jobs' float images: add --save_float")
  if os.path.exists(F.results_dir) and not os.path.isdir(F.results_dir):
    raise InputError(f"--results_dir={F.results_dir} exists and is not a folder")
  os.makedirs(F.results_dir, exist_ok=True)
  jobs = make_runner(steps)
  for name in names:
    t = make_table(name, jobs, commit)
    base = os.path.join(F.results_dir, name)
    outputs.write_json(base + ".json", t)
    write_markdown(t, base + ".md")
    plot_curves(name, selected_rows(name), jobs.run, base + "_curves.png")
    print(f"wrote {base}.md", flush=True)


def entry(argv: list[str] | None = None) -> int:
  return cli.run_script(main, __doc__, F, argv)


if __name__ == "__main__":
  sys.exit(entry())
