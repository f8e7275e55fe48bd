"""The catalogue: every table and study of experiments/ as configuration, no flags read. A table or study is
a list of (row label, jobs.Job); jobs.Runner fits or reuses each job (one rule for "same settings"), and
report.py writes what the entry point (tables.py, faithfulness.py, noise_protocol.py, prelim_psnr.py,
idipplus_knobs.py) computes from the jobs' results. `python -m experiments.harness.catalogue` lists every job.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable

from experiments.harness.jobs import Job
from idip_jax.data import NOISE_PROTOCOLS

PAPER = {  # means reported by the papers (dB); per-image values are not reproduced here
  "T1": {"DIP": 27.73, "IDIP-1": 27.79},
  "T2": {"DIP": 27.73, "FFDNet": 29.72, "IDIP-2": 29.80, "IDIP": 30.35},
  "T3": {"IDIP+DnCNN": 30.34, "IDIP+BM3D": 30.17, "IDIP+FFDNet": 30.35, "IDIP+NCSR": 30.18, "IDIP+WNNM": 30.33},
  "T6": {"mean step reduction %": 80.0},
  "DIPcolor": {"DIP@1800": 29.22, "DIP EMA": 30.43, "DIP avg 2 runs": 31.00, "CBM3D": 31.42},
  "inpaint_heide11": {"DIP": 33.48},  # the mean of Table 1's eleven values
  "SR4_Set5": {"bicubic": 28.43, "DIP": 29.90},
  "SR4_Set14": {"bicubic": 26.05, "DIP": 27.00},
}
# DIP paper, Table 1 (50% of the pixels missing, heide11), per image.
PAPER_PER_IMAGE = {
  "inpaint_heide11": {
    "barbara": 32.22,
    "boat": 33.06,
    "house": 39.16,
    "lena": 36.16,
    "peppers": 33.05,
    "cameraman": 29.8,
    "couple": 32.52,
    "fingerprint": 32.84,
    "hill": 32.77,
    "man": 32.20,
    "montage": 34.54,
  }
}
# The official notebooks' settings per task. inpainting.ipynb's kate/peppers branch ("same params and
# net as in super-resolution and denoising", but 128-channel skips and nearest upsampling), used for
# Table 1's Bernoulli masks too (the notebook has no cell for them); super-resolution.ipynb at x4.
INPAINT_NET = (("skip_channels", 128), ("upsample", "nearest"))
INPAINT_FIT = (("task", "inpaint"), ("reg_noise_std", 0.03))
SR_FIT = (("task", "sr"), ("sr_factor", 4), ("reg_noise_std", 0.03))


# The IDIPplus jobs (can IDIP beat its x_bar?): K runs per image with ES-WMV (Wang et al.) watching them; patience as
# long as the run, so no run freezes early and one job gives the fixed-step result (its last state), the criterion's
# choice, their K-run ensembles and the oracle.
WATCHED = (("stop", "wmv"), ("stop_patience", 100000))
# The IDIPplus fit knobs, tried on holdout9 against the watched job's single runs. The 96 px sigma-30
# faithfulness study (experiments/results/faithfulness/study.md) found x_bar weights 0.25 and 0.5 and an
# unperturbed x_bar worse than 1 and 1/30 on the holdout images; weight 2 follows that trend (a
# stronger perturbation, 1/15, was left out for CPU time: ~20 min of this study).
KNOBS = (("w2", (("prelim_weight", 2.0),)),)
# "IDIP-best": the combination of settings and report chosen on holdout9 (IDIPplus_holdout9) and
# used unchanged on the other sets (None: the rows are left out). Chosen as the highest mean over sigma
# 15/25/50 of PSNR - x_bar's in experiments/results/idipplus_crop96/knobs_holdout9.md (96 px, 300 steps,
# K=2): 0.25 x the 2-run ensemble's last state + 0.75 x_bar, +0.01 dB (-0.02/+0.01/+0.05); the best
# IDIP output alone, the ensemble's last state, is -0.19 (-0.45/-0.14/+0.02), its EMA -0.92 (it lags at
# 300 steps), ES-WMV's step -0.38, x_bar weight 2 as weight 1.
IDIP_BEST: tuple[tuple[tuple[str, float | str], ...], str] | None = (WATCHED, "blend:0.25:ensemble_last")


C10 = "classic10"


def _t4(ds: str, k: int) -> list[tuple[str, Job]]:
  rows = []
  for s in (15, 25, 50):
    rows += [
      (f"BM3D@{s}", Job(ds, s, "prelim", "bm3d")),
      (f"DnCNN@{s}", Job(ds, s, "prelim", "dncnn")),
      (f"FFDNet@{s}", Job(ds, s, "prelim", "ffdnet")),
      # The official notebook: "reg_noise_std = 1./30. # set to 1./20. for sigma=50".
      (f"DIP@{s}", Job(ds, s, "dip", fit=(("reg_noise_std", 1 / 20),) if s == 50 else ())),
      (f"IDIP@{s}", Job(ds, s, "idip", "ffdnet")),
    ]
  return rows


def _sr4(ds: str, k: int) -> list[tuple[str, Job]]:
  dip = Job(ds, 0, "dip", channels=3, fit=SR_FIT)
  return [("bicubic", dataclasses.replace(dip, report="input")), ("DIP", dip)]


def knob_job(ds: str, sigma: float, fit: tuple) -> Job:
  return Job(ds, sigma, "idip", "ffdnet", fit=fit)  # a single run, one fit setting changed


def _idipplus(ds: str, k: int) -> list[tuple[str, Job]]:
  rows = []
  for s in (15, 25, 50):
    watched = Job(ds, s, "idip", "ffdnet", seeds=k, fit=WATCHED)
    rows += [
      (f"x_bar@{s}", Job(ds, s, "prelim", "ffdnet")),
      (f"IDIP@{s}", dataclasses.replace(watched, report="last")),  # paper settings: the mean single run
      (f"IDIP-auto@{s}", watched),  # at the step ES-WMV chose, per run
      (f"IDIP-x{k}@{s}", dataclasses.replace(watched, report="ensemble_last")),
      (f"IDIP-oracle@{s}", dataclasses.replace(watched, report="oracle")),
    ]
    if ds == "holdout9":  # the fit knobs, one change each, a single run (tuning only: not on the other sets)
      rows += [(f"IDIP-{name}@{s}", knob_job(ds, s, fit)) for name, fit in KNOBS]
    if IDIP_BEST is not None:
      rows.append((f"IDIP-best@{s}", Job(ds, s, "idip", "ffdnet", seeds=k, fit=IDIP_BEST[0], report=IDIP_BEST[1])))
  return rows


# The catalogue: table name -> its (row label, job) pairs. A prelim-only row is the job's x_bar PSNR.
TABLES: dict[str, Callable[[int], list[tuple[str, Job]]]] = {
  "T1": lambda k: [("DIP", Job(C10, 30, "dip")), ("IDIP-1", Job(C10, 30, "idip1"))],
  "T2": lambda k: [
    ("DIP", Job(C10, 30, "dip")),
    ("FFDNet", Job(C10, 30, "prelim", "ffdnet")),
    ("IDIP-2", Job(C10, 30, "idip2", "ffdnet")),
    ("IDIP", Job(C10, 30, "idip", "ffdnet")),
  ],
  "T3": lambda k: [(f"IDIP+{p}", Job(C10, 30, "idip", p.lower())) for p in ("DnCNN", "BM3D", "FFDNet")],
  "T6": lambda k: [("DIP", Job(C10, 40, "dip")), ("IDIP", Job(C10, 40, "idip", "ffdnet"))],
  # Step counts and settings are chosen here, on images no table reports.
  "HOLDOUT": lambda k: [
    ("DIP", Job("holdout9", 25, "dip")),
    ("IDIP", Job("holdout9", 25, "idip", "ffdnet")),
    ("IDIP x_bar unperturbed", Job("holdout9", 25, "idip", "ffdnet", fit=(("xbar_noise_std", 0.0),))),
  ],
  "inpaint_heide11": lambda k: [("DIP", Job("heide11", 0, "dip", fit=INPAINT_FIT, net=INPAINT_NET))],
  "DIPcolor": lambda k: [("DIP", Job("cbm3d9", 25, "dip", seeds=2, channels=3))],
}
# Tables named <prefix><set>: prefix -> the rows of that set.
TABLES_PER_SET: dict[str, Callable[[str, int], list[tuple[str, Job]]]] = {
  "T4_": _t4,
  "SR4_": _sr4,
  "IDIPplus_": _idipplus,
}


def table_jobs(table: str, ensemble_runs: int = 4) -> list[tuple[str, Job]]:
  """(row label, job) pairs of a table; ensemble_runs: K, the runs per image of the IDIPplus jobs."""
  if table in TABLES:
    return TABLES[table](ensemble_runs)
  for prefix, rows in TABLES_PER_SET.items():
    if table.startswith(prefix):
      return rows(table[len(prefix) :], ensemble_runs)
  raise ValueError(f"unknown table {table}")


ALL_TABLES = (
  ["T1", "T2", "T3", "T4_classic10", "T4_Set12", "T6", "DIPcolor", "HOLDOUT", "inpaint_heide11", "SR4_Set5"]
  + ["SR4_Set14"]
  + [f"IDIPplus_{s}" for s in ("holdout9", "classic10", "Set12")]
)


# The faithfulness study (why does IDIP not beat its x_bar?): one change at a time from the default IDIP (name ->
# method, FitConfig overrides, RunConfig overrides), on the same noisy images and x_bar; sigma, crop and steps from the
# flagfile.
FAITHFULNESS_VARIANTS = {
  "idip": ("idip", (), ()),
  "w0.5": ("idip", (("prelim_weight", 0.5),), ()),
  "w0.25": ("idip", (("prelim_weight", 0.25),), ()),
  "lr0.001": ("idip", (("lr", 0.001),), ()),
  "xbar_noise0": ("idip", (("xbar_noise_std", 0.0),), ()),
  "uint8": ("idip", (), (("noise", "uint8"),)),  # the noisy image rounded to 8 bits (x_bar made from it)
  "dip": ("dip", (), ()),  # DIP on the same noise
}
FAITHFULNESS_IMAGES = ("classic10/cameraman", "holdout9/baboon", "holdout9/foreman")


def faithfulness_jobs(
  images=FAITHFULNESS_IMAGES, sigma: float = 30.0, xbar: str = "ffdnet", variants=None
) -> list[tuple[str, Job]]:
  """The study's variants as jobs on one list of set/name images."""
  rows = []
  for name in variants or FAITHFULNESS_VARIANTS:
    method, fit, run = FAITHFULNESS_VARIANTS[name]
    rows.append((name, Job(",".join(images), sigma, method, xbar, fit=fit, run=run)))
  return rows


# The noise protocols (which one reproduces a paper's baseline row?): x_bar's PSNR under each way of making the noisy
# image, beside the paper's baseline row (set, sigma, denoiser, paper's mean, source, paper's per-image values where it
# lists them).
NOISE_PROTOCOL_CASES = (
  (
    "classic10",
    30,
    "ffdnet",
    29.72,
    "IDIP paper, Table 2, FFDNet row",
    {"cameraman": 28.73, "peppers": 29.63, "lena": 30.68},
  ),
  ("Set12", 25, "ffdnet", 30.43, "FFDNet paper, Set12 mean", {}),
)


def noise_protocol_jobs() -> list[tuple[str, Job]]:
  return [
    (f"{ds}@{sigma} {den} {p}", Job(ds, sigma, "prelim", den, run=(("noise", p),)))
    for ds, sigma, den, *_ in NOISE_PROTOCOL_CASES
    for p in NOISE_PROTOCOLS
  ]


# The check of the JAX FFDNet/DnCNN with the official weights: (set, channels, denoiser, sigma,
# published mean); AWGN without clipping (the denoisers' papers).
PRELIM_PSNR_RUNS = (
  ("Set12", 1, "ffdnet", 15, 32.75),
  ("Set12", 1, "ffdnet", 25, 30.43),
  ("Set12", 1, "ffdnet", 50, 27.32),
  ("Set12", 1, "dncnn", 15, 32.86),
  ("Set12", 1, "dncnn", 25, 30.44),
  ("Set12", 1, "dncnn", 50, 27.18),
  ("classic10", 1, "ffdnet", 30, 29.72),
  ("classic10", 1, "dncnn", 30, None),
  ("cbm3d9", 3, "ffdnet", 25, None),
)


def prelim_psnr_jobs() -> list[tuple[str, Job]]:
  return [
    (f"{ds} {den}@{sigma}", Job(ds, sigma, "prelim", den, channels=c, run=(("noise", "float"),)))
    for ds, c, den, sigma, _ in PRELIM_PSNR_RUNS
  ]


KNOB_SIGMAS = (15, 25, 50)


def knob_jobs(dataset: str, k: int) -> dict[int, tuple[Job, dict[str, Job]]]:
  """The IDIPplus knob table reads the IDIPplus table's jobs: per sigma, the watched job (K runs) and each knob's
  (the table runs them on holdout9 only)."""
  rows = dict(table_jobs(f"IDIPplus_{dataset}", k))
  return {s: (rows[f"IDIP-auto@{s}"], {name: knob_job(dataset, s, fit) for name, fit in KNOBS}) for s in KNOB_SIGMAS}


BATCH_EQUALITY_LOWERINGS = ("loop", "im2col", "hybrid", "grouped")


def batch_equality_jobs(
  lowerings=BATCH_EQUALITY_LOWERINGS, runs: int = 3, map_steps: int = 20
) -> list[tuple[str, Job]]:
  """How far are batched fits from single-image fits? One DIP job (holdout9, sigma 25) run one image per call, in one
  vmapped call of `runs` images with each --batch_conv lowering, and for `map_steps` steps under lax.map (on XLA:CPU
  its loop body runs ~15x slower: the losses of a short run compare exactly). The way of running is in each job's
  overrides (and folder name): the same-settings rule ignores it (resume.HOW)."""
  dip = functools.partial(Job, "holdout9", 25.0, "dip")
  rows = [("single", dip(fit=(("batch_strategy", "vmap"),), run=(("batch_size", 1),)))]
  for lw in lowerings:
    rows.append((lw, dip(fit=(("batch_strategy", "vmap"),), net=(("batch_conv", lw),), run=(("batch_size", runs),))))
  rows.append(("map", dip(fit=(("batch_strategy", "map"), ("steps", map_steps)), run=(("batch_size", runs),))))
  return rows


# Study -> its jobs (default settings) and the command that runs it: `python -m experiments.harness.catalogue`.
STUDIES: dict[str, tuple[str, Callable[[], list[tuple[str, Job]]]]] = {
  "faithfulness": (
    "experiments/studies/faithfulness.py --flagfile=experiments/studies/faithfulness/study.flags",
    faithfulness_jobs,
  ),
  "noise_protocol": ("experiments/studies/noise_protocol.py", noise_protocol_jobs),
  "prelim_psnr": ("experiments/studies/prelim_psnr.py", prelim_psnr_jobs),
  "batch_equality": (
    "experiments/studies/batch_equality.py --flagfile=experiments/studies/batch_equality.flags",
    batch_equality_jobs,
  ),
  "knobs_holdout9": (
    "experiments/studies/idipplus_knobs.py --flagfile=experiments/tables/idipplus.flags",
    lambda: [
      (f"{label}@{s}", job)
      for s, (watched, knobs) in knob_jobs("holdout9", 2).items()
      for label, job in [("watched", watched), *knobs.items()]
    ],
  ),
}


def main() -> None:
  for name in ALL_TABLES:
    print(f"table {name} (experiments/tables.py --tables={name}):")
    for label, job in table_jobs(name):
      print(f"  {label}: {job}")
  for name, (command, rows) in STUDIES.items():
    print(f"study {name} ({command}):")
    for label, job in rows():
      print(f"  {label}: {job}")


def entry(argv: list[str] | None = None) -> int:
  """No flags: a stray argument or flag is refused in one line."""
  from absl import flags

  from idip_jax import cli

  return cli.run_script(lambda _: main(), __doc__, flags.FlagValues(), argv)


if __name__ == "__main__":
  sys.exit(entry())
