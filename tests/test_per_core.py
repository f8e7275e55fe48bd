"""--cpu_processes: one single-threaded process per core (per_core.py): when the default chooses it, and that a job
run so gives the same results as one process."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_ARGS, smooth_image, write_png

from idip_jax import cli, config, per_core


def test_plan_takes_one_process_per_core_only_where_it_ends_sooner():
  g64 = per_core.gain(64)
  assert g64 == pytest.approx(1.42) and per_core.gain(128) == pytest.approx(1.19) and per_core.gain(4096) == 1.19
  assert per_core.gain(64) > per_core.gain(90) > per_core.gain(128)
  long = [100.0] * 4  # 4 images of 100 s each one run per call
  n, why, est = per_core.plan(2, long, [64] * 4)
  assert n == 2 and why.startswith("one single-threaded process per core (2)")
  assert est["per_core_s"] == pytest.approx(per_core.START_S + 2 * 100 * 2 / g64, abs=0.1)
  assert est["one_process_s"] == pytest.approx(400 / per_core.IN_PROCESS_GAIN, abs=0.1)
  # A short job: the start of the processes does not repay.
  n, why, _ = per_core.plan(2, [5.0] * 4, [64] * 4)
  assert n == 1 and "does not repay" in why
  # Three equal images on two cores: one process fits two of them on one thread, slower than three on both.
  assert per_core.plan(2, [100.0] * 3, [64] * 3)[0] == 1
  assert per_core.plan(1, long, [64] * 4)[:2] == (1, "one process: one core to fit")
  assert per_core.plan(8, [1000.0], [64])[:2] == (1, "one process: one image to fit")
  assert per_core.plan(8, long, [64] * 4)[0] == 4  # at most one process per image


def _job(tmp_path, n_images: int, side: int, steps: int, **run) -> config.JobConfig:
  for s in range(n_images):
    write_png(str(tmp_path / f"im{s}.png"), smooth_image(side, side, 1, seed=s))
  cfg = config.RunConfig(input=str(tmp_path), method="dip", sigma=25.0, workdir=str(tmp_path / "w"), **run)
  return config.JobConfig(methods=("dip",), run=dataclasses.replace(cfg, fit=config.FitConfig(steps=steps)))


def test_the_default_chooses_processes_from_the_inputs_and_the_stored_rate(tmp_path, monkeypatch):
  monkeypatch.setattr(per_core, "cores", lambda: [0, 1])
  job = _job(tmp_path, 4, 64, 3000)  # the official net: ~190 s per image one run per call at the stored rate
  cfgs = [job.run]
  n, why, est = cli.processes_for(job, cfgs)
  assert n == 2 and est["per_core_s"] < est["one_process_s"], why
  short = dataclasses.replace(job.run, fit=config.FitConfig(steps=20))
  n, why, _ = cli.processes_for(job, [short])
  assert n == 1 and "does not repay" in why
  fixed = dataclasses.replace(job.run, batch_size=4)
  assert cli.processes_for(dataclasses.replace(job, run=fixed), [fixed])[:2] == (
    1,
    "one process: a fixed --batch_strategy or --batch_size",
  )
  assert (
    cli.processes_for(job, [job.run, dataclasses.replace(job.run, method="idip")])[1] == "one process: several methods"
  )
  assert cli.processes_for(dataclasses.replace(job, cpu_processes=1), cfgs)[1] == "one process: --cpu_processes=1"
  monkeypatch.setattr(per_core, "cores", lambda: [0])
  assert cli.processes_for(job, cfgs)[1] == "one process: one core"
  # Asked for: as many as asked, at most one per image.
  assert cli.processes_for(dataclasses.replace(job, cpu_processes=8), cfgs)[0] == 4


def test_a_job_on_two_single_threaded_processes_equals_one_process(tmp_path):
  """Through run.py: the parent starts two processes (--distributed on a local port); process 0 merges their
  results, which equal one process's; config.json says why, and each process fitted one run per call."""
  d = tmp_path / "in"
  d.mkdir()
  for s in range(3):
    write_png(str(d / f"im{s}.png"), smooth_image(32, 32, 1, seed=s))
  base = [sys.executable, "run.py", f"--input={d}", "--sigma=25", "--method=dip", "--steps=4", "--save_images=false"]
  base += TINY_ARGS + ["--chunk=2", "--batch_strategy=auto", "--batch_cache=none"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")

  def run_py(*args: str) -> subprocess.CompletedProcess:
    p = subprocess.run(base + list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p

  runs = {}
  for n in (2, 1):
    p = run_py(f"--workdir={tmp_path / str(n)}", f"--cpu_processes={n}")
    runs[n] = (p.stdout + p.stderr, json.load(open(tmp_path / str(n) / "results.json")))
  err, dist = runs[2]
  assert "starting 2 processes, one per core: --cpu_processes=2" in err
  assert "process 0/2: 2 of 3 images" in err and "process 1/2: 1 of 3 images" in err
  assert err.count("MEAN") == 1 and err.count("outputs in") == 1  # the merged table, once
  assert dist["processes"] == 2 and [r["name"] for r in dist["images"]] == ["im0", "im1", "im2"]
  for a, b in zip(dist["images"], runs[1][1]["images"]):  # one thread sums in another order than two: 0.004 dB
    assert abs(a["psnr_final"] - b["psnr_final"]) < 1e-2, (a["name"], a["psnr_final"], b["psnr_final"])
  stored = json.load(open(tmp_path / "2" / "config.json"))
  assert stored["layout"] == {"processes": 2, "why": "--cpu_processes=2"}
  assert stored["batch_size"] == 1 and stored["fit"]["batch_strategy"] == "vmap"
  one = json.load(open(tmp_path / "1" / "config.json"))
  assert one["layout"]["processes"] == 1 and one["layout"]["why"] == "one process: --cpu_processes=1"
  assert (dist["expected_images"], dist["finished_images"], dist["complete"]) == (3, 3, True)
  # --resume in one process finds every image finished, whichever process fitted it (it reads every process's
  # results file). The other direction reads one results.json, as any resume does.
  p = run_py(f"--workdir={tmp_path / '2'}", "--cpu_processes=1", "--resume")
  assert "3 of 3 images finished" in p.stderr and "steps/s" not in p.stderr, p.stderr[-3000:]
  again = json.load(open(tmp_path / "2" / "results.json"))
  assert [r["psnr_final"] for r in again["images"]] == [r["psnr_final"] for r in runs[2][1]["images"]]
