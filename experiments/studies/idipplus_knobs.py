"""Which output of the IDIPplus jobs should a table report (chosen on holdout9 only)?

python experiments/studies/idipplus_knobs.py --flagfile=experiments/tables/idipplus.flags
(after tables.py, with the same flags)
Reads the finished jobs of `experiments/tables.py --tables=IDIPplus_<set>` (their float images, --save_float)
and writes <results_dir>/knobs_<set>.{json,md}: per sigma, each candidate output's mean PSNR minus x_bar's.
Candidates: a single run's last state and its EMA, the K-run ensembles of both, ES-WMV's step, the x_bar
weight-2 run, and blends a * out + (1 - a) * x_bar (no ground truth: `a` is a fixed number chosen here).
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags

from experiments import tables  # noqa: E402  (its flags: --crop, --noise, --workdir, ...)
from experiments.harness import catalogue, jobs, report
from idip_jax import data, outputs, results

F = flags.FLAGS
flags.DEFINE_string("set", "holdout9", "the IDIPplus table's data set")
flags.DEFINE_list("blend", ["0.25", "0.5", "0.75"], "weights a of a * out + (1 - a) * x_bar")
SIGMAS = catalogue.KNOB_SIGMAS


def job_dirs(workdir: str, dataset: str, sigma: int, noise: str, k: int) -> tuple[str, dict[str, str]]:
  """The folders of the IDIPplus table's watched job and of each knob's ({name: folder}) at this sigma."""
  watched, knobs = catalogue.knob_jobs(dataset, k)[sigma]
  return jobs.job_dir(watched, workdir, noise), {name: jobs.job_dir(j, workdir, noise) for name, j in knobs.items()}


def candidates(watched: str, knobs: dict[str, str], name: str, k: int, blends: list[float]) -> dict:
  """Each candidate's image, or a list of single runs' images (their PSNRs are averaged)."""
  load = lambda d, tag: np.load(os.path.join(d, "images", f"{name}_{tag}.npy"))
  seeds = lambda tag: [load(watched, f"seed{i}_{tag}") for i in range(k)]
  out = {
    "x_bar": load(watched, "prelim"),
    "single last": seeds("last"),
    "single last EMA": seeds("last_ema"),
    f"x{k} last": load(watched, "last"),
    f"x{k} last EMA": load(watched, "last_ema"),
    "single ES-WMV": seeds("final"),
    f"x{k} ES-WMV": load(watched, "final"),
  }
  for knob, d in knobs.items():  # single runs, fixed steps: their final state is the last
    out.update({f"{knob} last": load(d, "final"), f"{knob} last EMA": load(d, "ema")})
  for a in blends:
    for base in ("single last EMA", f"x{k} last", f"x{k} last EMA"):
      img, xbar = out[base], out["x_bar"]
      out[f"{a:g} {base} + {1 - a:g} x_bar"] = (
        [a * x + (1 - a) * xbar for x in img] if isinstance(img, list) else a * img + (1 - a) * xbar
      )
  return out


def knob_table(workdir: str, dataset: str, ddir: str, crop: int, k: int, noise: str, blends: list[float]) -> dict:
  """{sigma: {candidate: {mean, minus_x_bar, per_image}}} over the set's images."""
  clean = {
    data.image_name(p): data.center_crop(data.read_image(p, 1), crop)
    for p in data.list_inputs(os.path.join(ddir, dataset))
  }
  table = {}
  for s in SIGMAS:
    watched, knobs = job_dirs(workdir, dataset, s, noise, k)
    per = {}
    for name, gt in clean.items():
      for key, img in candidates(watched, knobs, name, k, blends).items():
        runs = img if isinstance(img, list) else [img]
        per.setdefault(key, {})[name] = float(np.mean([results.psnr(x, gt) for x in runs]))
    means = {key: float(np.mean(list(v.values()))) for key, v in per.items()}
    table[s] = {key: {"mean": m, "minus_x_bar": m - means["x_bar"], "per_image": per[key]} for key, m in means.items()}
  return table


def main(argv: list[str]) -> int:
  del argv
  k, ddir = F.ensemble_runs, F.data_dir or os.path.join(data.shared_dir(), "data")
  workdir = F.workdir or tables.DEFAULT_WORKDIR
  jobs = []
  for s in SIGMAS:
    watched, knobs = job_dirs(workdir, F.set, s, F.noise, k)
    jobs += [watched, *knobs.values()]
  missing = [j for j in jobs if not os.path.isfile(os.path.join(j, "results.json"))]
  if missing:
    print(f"error: unfinished IDIPplus job {missing[0]}: run experiments/tables.py first", file=sys.stderr)
    return 2
  table = knob_table(workdir, F.set, ddir, F.crop, k, F.noise, [float(a) for a in F.blend])
  meta = dict(outputs.provenance(), command="python " + " ".join(sys.argv), set=F.set, crop=F.crop, K=k)
  meta["fit_commits"] = sorted({outputs.read_json(os.path.join(j, "results.json"))["commit"] for j in jobs})
  base = os.path.join(F.results_dir, f"knobs_{F.set}")
  os.makedirs(F.results_dir, exist_ok=True)
  with open(base + ".md", "w") as f:
    f.write(report.knobs_markdown(table, meta))
  outputs.write_json(base + ".json", dict(meta, sigmas=table))
  print(report.knobs_markdown(table, meta))
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
