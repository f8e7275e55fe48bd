"""experiments/tables.py: every table flagfile parses; smoke scale writes well-formed tables."""

import glob
import json
import os
import subprocess
import sys
from dataclasses import fields

import numpy as np
import pytest
from conftest import DATA, ROOT, TINY_ARGS, WEIGHTS, import_experiment, need_path, parsed_flags

from idip_jax import config, data, metrics, prelim, results

SCRIPT = os.path.join(ROOT, "experiments", "tables.py")


def test_table_flagfiles_parse(capsys):
  tables = import_experiment("tables")
  files = sorted(glob.glob(os.path.join(ROOT, "experiments", "tables", "*.flags")))
  assert len(files) >= 7
  for f in files:
    assert open(f).readline().startswith("#"), f
    if os.path.basename(f) == "base.flags":
      continue
    with parsed_flags(["tables.py", "--flagfile=" + f, "--dry_run"]):
      tables.main([])
    out = capsys.readouterr().out
    assert "Job(" not in out and out.strip(), f


def test_every_table_of_the_catalogue_lists_its_jobs():
  """The catalogue (catalogue.TABLES, TABLES_PER_SET) gives each table its rows without fitting: distinct
  labels, methods and x_bar sources the runner knows, K runs per image where asked, and an unknown table refused."""
  catalogue, jobs = import_experiment("catalogue"), import_experiment("jobs")
  names = list(catalogue.TABLES) + ["T4_Set12", "SR4_Set5", "IDIPplus_holdout9", "IDIPplus_Set12"]
  assert set(catalogue.TABLES) | {"T4_classic10", "T4_Set12", "SR4_Set5", "SR4_Set14"} <= set(catalogue.ALL_TABLES)
  for name in names:
    rows = catalogue.table_jobs(name, ensemble_runs=3)
    labels = [label for label, _ in rows]
    assert rows and len(set(labels)) == len(labels), name
    for label, job in rows:
      assert job.method in (*config.METHODS, "prelim") and job.prelim in config.PRELIMS, (name, label)
      assert job.report in jobs.REPORT or job.report.startswith("blend:"), (name, label)
  plus = dict(catalogue.table_jobs("IDIPplus_Set12", ensemble_runs=3))
  assert plus["IDIP-x3@25"].seeds == 3 and plus["IDIP-x3@25"].report == "ensemble_last"
  assert "IDIP-w2@25" not in plus and "IDIP-w2@25" in dict(catalogue.table_jobs("IDIPplus_holdout9"))  # knobs: holdout9
  with pytest.raises(ValueError, match="unknown table T5"):
    catalogue.table_jobs("T5")


def test_every_study_of_the_catalogue_lists_its_jobs(tmp_path):
  """The studies are configurations too (catalogue.STUDIES): each lists jobs the one runner knows, each job
  with its own folder (noise protocol and overrides in the name); the knob table reads the IDIPplus table's jobs."""
  catalogue, jobs = import_experiment("catalogue"), import_experiment("jobs")
  for name, (command, rows) in catalogue.STUDIES.items():
    listed = rows()
    assert listed and all(os.path.isfile(os.path.join(ROOT, w.split("=")[-1])) for w in command.split()), command
    dirs = {jobs.job_dir(job, str(tmp_path), "clip") for _, job in listed}
    assert len(dirs) == len(listed), name  # distinct jobs, distinct folders
    for label, job in listed:
      assert job.method in (*config.METHODS, "prelim") and job.prelim in config.PRELIMS, (name, label)
      for over, cls in ((job.run, config.RunConfig), (job.fit, config.FitConfig), (job.net, config.NetConfig)):
        assert set(dict(over)) <= {f.name for f in fields(cls)} - {"net", "fit", "prelim"}, (name, label)
  faith = dict(catalogue.faithfulness_jobs())
  assert jobs.image_specs(faith["idip"]) == list(catalogue.FAITHFULNESS_IMAGES)
  assert faith["uint8"].run == (("noise", "uint8"),) and "_s30_uint8_idip_ffdnet_" in jobs.job_dir(
    faith["uint8"], "", "clip"
  )
  plus = dict(catalogue.table_jobs("IDIPplus_holdout9", 2))
  watched, knobs = catalogue.knob_jobs("holdout9", 2)[25]
  assert watched == plus["IDIP-auto@25"] and knobs == {"w2": plus["IDIP-w2@25"]}
  protocols = [dict(j.run)["noise"] for _, j in catalogue.noise_protocol_jobs()]
  assert protocols == list(data.NOISE_PROTOCOLS) * len(catalogue.NOISE_PROTOCOL_CASES)


def test_smoke_tables_are_well_formed(tmp_path):
  for d in ("classic10", "Set12", "cbm3d9", "Set14"):
    need_path(os.path.join(DATA, d))
  need_path(WEIGHTS)
  pytest.importorskip("bm3d")
  out = tmp_path / "results"
  # In this process through the entry point (tables.entry: its flags, one error line), so that the tiny net's
  # programs compiled by the other table tests are reused.
  tables, cwd = import_experiment("tables"), os.getcwd()
  from absl import flags

  flags.FLAGS.unparse_flags()
  os.chdir(ROOT)  # the flagfiles include each other by repository-relative paths
  try:
    code = tables.entry(
      [
        "tables.py",
        "--flagfile=experiments/tables/smoke.flags",
        # Every table but IDIPplus_<set> (test_idipplus_table_rows_share_one_watched_job runs one at smoke scale:
        # 3 sets x 3 sigmas of K-run jobs would add ~40 s to the suite), and one set of each per-set table (T4,
        # SR4): the other set's jobs are the same but for the images.
        "--tables=T1,T2,T3,T4_Set12,T6,DIPcolor,HOLDOUT,inpaint_heide11,SR4_Set5",
        "--results_dir=" + str(out),
        "--workdir=" + str(tmp_path / "work"),
      ]
    )
  finally:
    os.chdir(cwd)
    flags.FLAGS.unparse_flags()
  assert code == 0
  for table in ("T1", "T2", "T3", "T4_Set12", "T6", "DIPcolor", "HOLDOUT"):
    t = json.loads((out / f"{table}.json").read_text())
    for key in ("table", "device", "commit", "date", "sigma", "methods", "paper"):
      assert key in t, (table, key)
    assert t["table"] == table and t["smoke"] is True
    for name, m in t["methods"].items():
      assert isinstance(m["steps"], int) and len(m["per_image"]) == 3, (table, name)
      assert abs(m["mean_psnr"] - sum(m["per_image"].values()) / 3) < 1e-6
      assert all(5 < v < 60 for v in m["per_image"].values()), (table, name, m["per_image"])
    md = (out / f"{table}.md").read_text()
    assert "mean ± std" in md and "oracle" in md
    assert (out / f"{table}_curves.png").stat().st_size > 1000
  t2 = json.loads((out / "T2.json").read_text())
  assert set(t2["methods"]) == {"DIP", "FFDNet", "IDIP-2", "IDIP"} and t2["paper"]["IDIP"] == 30.35
  assert t2["methods"]["FFDNet"]["steps"] == 0  # a preliminary denoiser row: no fit
  t4 = json.loads((out / "T4_Set12.json").read_text())
  assert {"IDIP@15", "IDIP@25", "IDIP@50", "BM3D@25"} <= set(t4["methods"]) and t4["sigma"] == [15, 25, 50]
  fs = json.loads((out / "T6.json").read_text())["fit_speed"]
  assert fs["images"] == 3 and set(next(iter(fs["per_image"].values()))) >= {"dip_steps", "idip_steps"}
  color = json.loads((out / "DIPcolor.json").read_text())["methods"]["DIP"]
  assert "mean_psnr_avg_runs_ema" in color
  # The tasks (inpainting, super-resolution): the paper's per-image Table 1 beside ours; SR's bicubic row is
  # its input's PSNR.
  inp = json.loads((out / "inpaint_heide11.json").read_text())
  assert inp["paper_per_image"]["barbara"] == 32.22 and set(inp["methods"]) == {"DIP"}
  t = json.loads((out / "SR4_Set5.json").read_text())
  assert set(t["methods"]) == {"bicubic", "DIP"} and t["methods"]["bicubic"]["report"] == "input"
  assert t["methods"]["bicubic"]["mean_psnr"] > 20  # a real bicubic upsampling of a 4x smaller image
  assert not (out / "T4_classic10.json").exists() and not (out / "SR4_Set14.json").exists()  # only those asked


def test_fit_speed_counts_first_step_reaching_dips_best():
  tables = import_experiment("tables")
  res = lambda hists, sec: {
    "images": [{"name": n, "seconds": sec, "steps": 10} for n in hists],
    "histories": {n: {"psnr": np.array(h, float)} for n, h in hists.items()},
  }
  dip = res({"a": [20, 22, 24, 25, 23, 22, 21, 20, 20, 20], "b": [20, 21, 26, 25, 25, 25, 25, 25, 25, 25]}, 2.0)
  idip = res({"a": [24, 25.5, 26, 26, 26, 26, 26, 26, 26, 26], "b": [20, 21, 22, 23, 24, 25, 25, 25, 25, 25]}, 3.0)
  fs = tables.fit_speed(dip, idip)
  assert fs["per_image"]["a"]["dip_best_psnr"] == 25 and fs["per_image"]["a"]["dip_steps"] == 4, fs
  assert fs["per_image"]["a"]["idip_steps"] == 2 and fs["per_image"]["b"]["idip_steps"] is None, fs
  assert fs["reached"] == 1 and abs(fs["mean_step_reduction_pct"] - 50.0) < 1e-9, fs
  assert abs(fs["mean_seconds_reduction_pct"] - 25.0) < 1e-9, fs  # 2 x 0.3 s vs 4 x 0.2 s


def test_faithfulness_study_plumbing(tmp_path, capsys):
  """experiments/studies/faithfulness.py on one tiny crop: each variant's record and the markdown."""
  need_path(os.path.join(DATA, "classic10"))
  need_path(WEIGHTS)
  study = import_experiment("faithfulness")
  out = tmp_path / "study"
  args = [
    "faithfulness.py",
    "--flagfile=experiments/studies/faithfulness/study.flags",
    *TINY_ARGS,
    "--crop=32",
    "--steps=4",
    "--chunk=2",
    "--eval_every=2",
    "--images=classic10/cameraman",
    "--variants=idip,w0.5,dip",
    "--batch_size=1",
    f"--workdir={tmp_path / 'runs'}",
    f"--out={out}",
  ]
  with parsed_flags(args):
    study.main([])
  res = json.loads((tmp_path / "study.json").read_text())
  assert list(res["variants"]) == ["idip", "w0.5", "dip"] and res["variants"]["w0.5"]["changes"] == {
    "prelim_weight": 0.5
  }
  cam = res["variants"]["idip"]["images"]["cameraman"]
  assert cam["curve_steps"] == [2, 4] and cam["peak"] == max(cam["curve"]) and 10 < cam["xbar"] < 60
  # the same x_bar for every variant of one noise protocol
  assert res["variants"]["dip"]["images"]["cameraman"]["xbar"] == cam["xbar"]
  assert "mean - x_bar: final / EMA / peak" in (tmp_path / "study.md").read_text()
  # The variants are jobs of the one runner (jobs.Runner): a finished one of the same job is read back, not refitted.
  folders = {p.name.split("_")[3]: p for p in (tmp_path / "runs").iterdir()}
  assert set(folders) == {"idip", "dip"} and len(list((tmp_path / "runs").iterdir())) == 3
  with parsed_flags(args[:-1] + ["--variants=idip", f"--out={tmp_path / 'again'}"]):
    study.main([])
  again = json.loads((tmp_path / "again.json").read_text())["variants"]["idip"]["images"]["cameraman"]
  assert again["peak"] == cam["peak"] and again["curve"] == cam["curve"]
  assert "reusing finished job" in capsys.readouterr().out
  # ... but only the same job (resume.finished_job): with another noise seed (same folder) the stored fit is not read
  # back, and --reuse_finished's resume of the folder is refused by --resume's rule.
  with parsed_flags(args[:-1] + ["--variants=dip", "--reuse_finished", "--noise_seed=1", f"--out={tmp_path / 'no'}"]):
    with pytest.raises(data.InputError, match="settings differ from the stored run .*: noise_seed"):
      study.main([])
  assert "is another job: noise_seed" in capsys.readouterr().out and not (tmp_path / "no.json").exists()
  # An unfinished variant (no results yet) continues in its folder with --reuse_finished: the same deterministic fit.
  os.remove(folders["dip"] / "results.json")
  with parsed_flags(args[:-1] + ["--variants=dip", "--reuse_finished", f"--out={tmp_path / 'resumed'}"]):
    study.main([])
  resumed = json.loads((tmp_path / "resumed.json").read_text())["variants"]["dip"]["images"]["cameraman"]
  assert "resuming" in capsys.readouterr().out
  assert resumed["final"] == res["variants"]["dip"]["images"]["cameraman"]["final"]


def test_faithfulness_flagfiles():
  """full.flags is study.flags at full size, one image per fit."""
  import_experiment("faithfulness")  # defines its flags
  with parsed_flags(["faithfulness.py", "--flagfile=experiments/studies/faithfulness/study.flags"]) as fv:
    study = {k: fv[k].value for k in ("crop", "steps", "batch_size", "sigma", "prelim", "noise", "eval_every")}
  with parsed_flags(["faithfulness.py", "--flagfile=experiments/studies/faithfulness/full.flags"]) as fv:
    full = {k: fv[k].value for k in study}
    assert fv.batch_strategy == "vmap" and fv.variants == fv["variants"].default
  assert study["crop"] == 96 and study["steps"] == 600 and study["batch_size"] == 3
  assert full == {**study, "crop": 0, "steps": 1000, "batch_size": 1}
  for f in ("study", "full"):
    assert (
      open(os.path.join(ROOT, "experiments", "studies", "faithfulness", f + ".flags")).readline().startswith("# IDIP")
    )


def fake_study(variants: dict, **kw) -> dict:
  """A study file as experiments/studies/faithfulness.py writes it: variant -> image -> (peak, x_bar)."""
  row = lambda peak, xbar: {
    "xbar": xbar,
    "peak": peak,
    "peak_step": 50,
    "final": peak - 0.1,
    "ema": peak - 0.2,
    "curve_steps": [50, 100],
    "curve": [peak, peak - 0.1],
  }
  study = {"sigma": 30.0, "crop": 0, "prelim": "ffdnet", "steps": 100, **kw, "command": "x", "variants": {}}
  for name, images in variants.items():
    method = "dip" if name == "dip" else "idip"
    v = {"method": method, "changes": {}, "steps": 100, "fit_commit": "c_" + name, "fit_device": "cpu"}
    study["variants"][name] = {**v, "images": {img: row(*pv) for img, pv in images.items()}}
  return study


def test_faithfulness_merge_per_image_studies(tmp_path, capsys):
  """--merge_studies: one table from one-process-per-image study files; refuses clashes and its own input."""
  study = import_experiment("faithfulness")
  files = {
    "old": fake_study({"idip": {"cam": (28.6, 28.7), "face": (28.9, 28.7)}}),
    "cam": fake_study({"w0.5": {"cam": (28.5, 28.7)}, "dip": {"cam": (27.0, 28.7)}}),
    "face": fake_study({"w0.5": {"face": (29.4, 28.6)}}),
  }
  for k, v in files.items():
    (tmp_path / f"{k}.json").write_text(json.dumps(v))
  paths = ",".join(str(tmp_path / f"{k}.json") for k in files)
  with parsed_flags(["faithfulness.py", f"--merge_studies={paths}", f"--out={tmp_path / 'full'}"]):
    study.main([])
  m = json.loads((tmp_path / "full.json").read_text())
  assert list(m["variants"]) == ["idip", "w0.5", "dip"] and m["sigma"] == 30.0 and m["steps"] == 100
  assert list(m["variants"]["w0.5"]["images"]) == ["cam", "face"]  # the same image order in every row
  assert m["variants"]["w0.5"]["images"]["face"]["peak"] == 29.4
  assert m["variants"]["dip"]["images"]["cam"]["fit_commit"] == "c_dip"  # each row keeps the commit that fitted it
  md = (tmp_path / "full.md").read_text()
  assert (
    "| w0.5 | - | 100 | 28.50 (50) / 28.40 / 28.30 / 28.70 | 29.40 (50) / 29.30 / 29.20 / 28.60 "
    "| +0.20 / +0.10 / +0.30 |" in md
  )
  assert "| dip | - | 100 | 27.00 (50) / 26.90 / 26.80 / 28.70 | - | -1.80 / -1.90 / -1.70 (1 of 2 images) |" in md
  assert (tmp_path / "full_curves.png").stat().st_size > 0
  # Clashes: a (variant, image) in two files, other settings; and --out that is one of the inputs.
  clash = [("old.json", "dup.json", "variant idip, image cam is in two files"), ("old.json", "s25.json", "sigma")]
  (tmp_path / "dup.json").write_text(json.dumps(fake_study({"idip": {"cam": (1.0, 2.0)}})))
  (tmp_path / "s25.json").write_text(json.dumps(fake_study({"dip": {"x": (1.0, 2.0)}}, sigma=25.0)))
  clash.append(("old.json", "full.json", "would overwrite"))
  for a, b, msg in clash:
    args = [
      "faithfulness.py",
      f"--merge_studies={tmp_path / a},{tmp_path / b}",
      f"--out={tmp_path / 'full'}",
      "--overwrite",
    ]
    with parsed_flags(args), pytest.raises(SystemExit) as e:
      study.main([])
    assert msg in str(e.value) and str(e.value).startswith("error: "), e.value
  with (
    parsed_flags(["faithfulness.py", f"--merge_studies={paths}", f"--out={tmp_path / 'full'}"]),
    pytest.raises(SystemExit) as e,
  ):
    study.main([])  # an existing table is replaced only with --overwrite
  assert "add --overwrite" in str(e.value)
  assert json.loads((tmp_path / "full.json").read_text()) == m  # untouched by the refused merges
  with parsed_flags(["faithfulness.py", f"--merge_studies={paths}", f"--out={tmp_path / 'new' / 'full'}"]):
    study.main([])  # a new output folder is made
  assert json.loads((tmp_path / "new" / "full.json").read_text())["variants"] == m["variants"]


def test_idipplus_table_rows_share_one_watched_job(tmp_path):
  """The IDIPplus table (can IDIP beat its x_bar?): per sigma, x_bar, IDIP (fixed steps), IDIP-auto (ES-WMV),
  IDIP-xK (ensemble) and the
  oracle, the last four read from one job of K watched runs per image."""
  need_path(os.path.join(DATA, "holdout9"))
  need_path(WEIGHTS)
  tables, jobs, catalogue = import_experiment("tables"), import_experiment("jobs"), import_experiment("catalogue")
  out = tmp_path / "results"
  args = ["tables.py", "--flagfile=experiments/tables/smoke.flags", "--tables=IDIPplus_holdout9"]
  args += ["--ensemble_runs=2", f"--results_dir={out}", f"--workdir={tmp_path / 'work'}", "--save_float"]
  with parsed_flags(args):
    tables.main([])
  t = json.loads((out / "IDIPplus_holdout9.json").read_text())
  rows = ("x_bar", "IDIP", "IDIP-auto", "IDIP-x2", "IDIP-oracle", "IDIP-best")
  rows += tuple(f"IDIP-{k}" for k, _ in catalogue.KNOBS)
  want = {f"{m}@{s}" for s in (15, 25, 50) for m in rows}
  assert t["table"] == "IDIPplus_holdout9" and set(t["methods"]) == want and t["sigma"] == [15, 25, 50]
  res = json.loads(
    (tmp_path / "work" / "holdout9_s25_clip_idip_ffdnet_x2_stopwmv_stop_patience100000" / "results.json").read_text()
  )
  m = t["methods"]
  watched = tmp_path / "work" / "holdout9_s25_clip_idip_ffdnet_x2_stopwmv_stop_patience100000"
  assert catalogue.IDIP_BEST[0] == catalogue.WATCHED  # IDIP-best is read from the watched job
  _, a, base = catalogue.IDIP_BEST[1].split(":")
  for r in res["images"]:
    n = r["name"]
    # IDIP-best: a fixed mix of the chosen output and x_bar, scored against the clean crop.
    img, xbar = (np.load(watched / "images" / f"{n}_{tag}.npy") for tag in (jobs.BLEND_IMAGES[base], "prelim"))
    clean = data.center_crop(data.read_image(data.find_image(os.path.join(DATA, "holdout9"), n), 1), 32)
    want_best = results.psnr(float(a) * img + (1 - float(a)) * xbar, clean)
    assert m["IDIP-best@25"]["per_image"][n] == pytest.approx(want_best, abs=1e-6)
    assert m["IDIP@25"]["per_image"][n] == r["psnr_last"] and m["IDIP-x2@25"]["per_image"][n] == r["psnr_avg_last"]
    assert m["IDIP-auto@25"]["per_image"][n] == r["psnr_final"] and len(r["runs"]) == 2
    # The oracle row: each run's best evaluated step, averaged over the K runs.
    assert m["IDIP-oracle@25"]["per_image"][n] == pytest.approx(np.mean([x["oracle_best_psnr"] for x in r["runs"]]))
    assert r["psnr_avg_last"] != r["psnr_last"]  # the ensemble is its own image
  # A knob row is its own single-run job with one fit setting changed.
  knob = tmp_path / "work" / "holdout9_s25_clip_idip_ffdnet_x1_prelim_weight2"
  assert json.loads((knob / "config.json").read_text())["fit"]["prelim_weight"] == 2.0
  for r in json.loads((knob / "results.json").read_text())["images"]:
    assert m["IDIP-w2@25"]["per_image"][r["name"]] == r["psnr_final"]
  assert m["IDIP-auto@25"]["per_image_stop_step"] and "ES-WMV step" in (out / "IDIPplus_holdout9.md").read_text()


def test_blend_rows_without_float_images_are_refused_before_compute(tmp_path):
  args = [sys.executable, SCRIPT, "--flagfile=experiments/tables/smoke.flags", "--tables=IDIPplus_Set12"]
  args += ["--nosave_float", f"--results_dir={tmp_path / 'out'}", f"--workdir={tmp_path / 'work'}"]
  p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert p.returncode != 0 and "add --save_float" in p.stderr.strip().splitlines()[-1]
  assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


# Every committed table whose writer has not changed since it was made: (script, its markdown writer, result stems).
# Not here: faithfulness/{study,full_cam,full_face,full_idip_15c7955} (columns added to the writer later) and
# cpu_crop64*/ (JSON from before each row recorded its device); tables.py's own rows rebuild from their jobs.
REBUILT = [
  ("report", "noise_protocol_markdown", ["noise_protocol"]),
  ("report", "prelim_psnr_markdown", ["prelim_psnr"]),
  ("report", "knobs_markdown", ["idipplus_crop96/knobs_holdout9"]),
  ("compile_time", "write_markdown", ["compile_time"]),
  ("train_budget", "write_markdown", ["training"]),
  ("report", "faithfulness_markdown", ["faithfulness/full"]),
  ("sure_blend", "markdown", [f"sure/{s}" for s in ("holdout9", "classic10", "Set12")]),
  (
    "sure_local",
    "markdown",
    ["sure/local_holdout9"] + [f"sure/local_{s}_probes4" for s in ("holdout9", "Set12", "classic10")],
  ),
  ("xbar_linearity", "markdown", ["sure/xbar_linearity"]),
  (
    "sure_fits",
    "markdown",
    [f"sure/fits_{s}_dip" for s in ("holdout9", "classic10", "Set12")] + ["sure/fits_holdout9_dip_k3"],
  ),
  ("sure_fits", "markdown", [f"sure/fits_{s}_idip" for s in ("holdout9", "classic10", "Set12")]),
  ("report", "write_markdown", ["gpu_h100/HOLDOUT", "gpu_h100/T2"]),
  ("report", "bench_markdown", ["bench_cpu"]),  # bench_gpu.md predates the lowering and ratio columns
  ("report", "batch_equality_markdown", ["batch_equality"]),
  ("report", "write_markdown", ["tasks_crop64/SR4_Set5", "tasks_crop64/SR4_Set14", "tasks_crop64/inpaint_heide11"]),
  (
    "report",
    "write_markdown",
    [f"cpu_crop64/{t}" for t in ("T1", "T2", "T3", "T4_classic10", "T4_Set12", "T6", "DIPcolor")],
  ),
  ("report", "write_markdown", [f"idipplus_crop96/IDIPplus_{s}" for s in ("holdout9", "classic10", "Set12")]),
]


@pytest.mark.parametrize("script,writer,stems", REBUILT)
def test_stored_results_rebuild_from_their_json(script, writer, stems, tmp_path):
  """A study's or table's markdown is a pure function of its stored JSON (written together), so the
  committed files rebuild byte for byte without refitting."""
  write = getattr(import_experiment(script), writer)
  for stem in stems:
    base = os.path.join(ROOT, "experiments", "results", stem)
    doc = json.loads(open(base + ".json").read())
    if writer == "knobs_markdown":
      got = write(doc["sigmas"], doc)
    elif writer.endswith("markdown") and writer != "write_markdown":
      got = write(doc)
    else:
      write(doc, str(tmp_path / "out.md"))
      got = (tmp_path / "out.md").read_text()
    assert got == open(base + ".md").read(), stem


@pytest.mark.parametrize("study", ["noise_protocol", "prelim_psnr"])
def test_x_bar_studies_run_at_smoke_scale_through_the_one_runner(tmp_path, study):
  """noise_protocol.py and prelim_psnr.py are lists of x_bar-only jobs (catalogue.STUDIES) run by
  jobs.Runner: at smoke scale (32 px crops of 3 images) each row's PSNRs are those of the denoiser called directly."""
  for d in ("classic10", "Set12", "cbm3d9"):
    need_path(os.path.join(DATA, d))
  need_path(WEIGHTS)
  catalogue, script, report = import_experiment("catalogue"), import_experiment(study), import_experiment("report")
  with parsed_flags([f"{study}.py", "--smoke", f"--out={tmp_path / study}"]):
    script.main([])
  doc = json.loads((tmp_path / f"{study}.json").read_text())
  rows = catalogue.STUDIES[study][1]()
  assert len(doc["rows"]) == len(rows)
  assert (tmp_path / f"{study}.md").read_text() == getattr(report, f"{study}_markdown")(doc)
  for row, (_, job) in zip(doc["rows"], rows):
    noise = dict(job.run)["noise"]
    images = data.load_images(os.path.join(DATA, job.dataset), job.sigma, 0, job.channels, crop=32, noise=noise)[:3]
    xbar = prelim.make(prelim.XbarSpec(config.PrelimConfig(job.prelim), job.sigma), images)  # called directly
    want = {im.name: float(metrics.psnr(x, im.clean_HxWxC)) for im, x in zip(images, xbar)}
    assert row["per_image"] == want, (row, job)


def test_batch_equality_table_from_its_json():
  """experiments/studies/batch_equality.py writes its table through report.py from the JSON it stores: per image each
  lowering's PSNR and difference to one run per call, then each lowering's summary and lax.map's exact check."""
  report = import_experiment("report")
  doc = {"device": "cpu", "commit": "abc", "date": "d", "crop": 64, "steps": 300, "lowerings": ["loop", "grouped"]}
  doc["rows"] = [{"name": "a", "single": 28.0, "loop": 28.01, "grouped": 27.9}]
  doc["summary"] = {
    "map_steps": 20,
    "map_loss_max_abs_diff": 0.0,
    "loop": {"max_abs": 0.01, "mean": 0.01, "loss_max_abs_diff": 1e-6},
    "grouped": {"max_abs": 0.1, "mean": -0.1, "loss_max_abs_diff": 2e-3},
  }
  md = report.batch_equality_markdown(doc)
  assert "| a | 28.000 | 28.010 (+0.010) | 27.900 (-0.100) |" in md
  assert "| vmap grouped | 0.100 | -0.100 | 0.002 |" in md and "| lax.map | - | - | 0 |" in md
  assert "64 px crops" in md and "losses over 20 steps" in md


def test_batch_equality_runs_its_jobs_through_the_one_runner(tmp_path, capsys):
  """batch_equality.py is a list of jobs (catalogue.batch_equality_jobs) run by jobs.Runner; the way each
  runs (one per call, a vmap lowering, lax.map) is in its overrides and folder, and a stored job that ran another
  way is not reused, although the same-settings rule ignores how a job runs."""
  need_path(os.path.join(DATA, "holdout9"))
  script, jobs, report = import_experiment("batch_equality"), import_experiment("jobs"), import_experiment("report")
  argv = ["batch_equality.py", "--flagfile=experiments/studies/batch_equality.flags", "--smoke", "--lowerings=loop"]
  argv += ["--max_images=2", "--map_steps=3"]
  with parsed_flags(argv + [f"--workdir={tmp_path}/jobs", f"--out={tmp_path}/be"]):
    script.main([])
    base = config.from_flags(script.F, config.RunConfig)
    runner_ = jobs.Runner(jobs.Settings(base, f"{tmp_path}/jobs", smoke=True, max_images=2))
  doc = json.loads((tmp_path / "be.json").read_text())
  assert (tmp_path / "be.md").read_text() == report.batch_equality_markdown(doc)
  assert [r["name"] for r in doc["rows"]] == ["baboon", "bridge"] and doc["summary"]["map_steps"] == 3
  rows = dict(script.catalogue.batch_equality_jobs(("loop",), 2, 3))
  for label, how in (("single", (1, "vmap")), ("loop", (2, "vmap")), ("map", (2, "map"))):
    stored = json.loads(open(jobs.job_dir(rows[label], f"{tmp_path}/jobs", "clip") + "/config.json").read())
    assert (stored["batch_size"], stored["fit"]["batch_strategy"]) == how, label
    res = json.loads(open(jobs.job_dir(rows[label], f"{tmp_path}/jobs", "clip") + "/results.json").read())
    if label != "map":
      assert [r[label] for r in doc["rows"]] == [r["psnr_final"] for r in res["images"]]
  # The vmapped call and the one-per-call fits agree to rounding at 4 steps of a tiny net.
  assert doc["summary"]["loop"]["max_abs"] < 0.05 and doc["summary"]["loop"]["loss_max_abs_diff"] < 1e-3
  loop = rows["loop"]
  cfg = runner_.config(loop, jobs.job_dir(loop, f"{tmp_path}/jobs", "clip"))
  assert runner_.finished(cfg, None, jobs.ran_as(loop)) is not None
  other = dict(jobs.ran_as(loop), **{"net.batch_conv": "im2col"})
  capsys.readouterr()
  assert runner_.finished(cfg, None, other) is None
  assert "ran another way: net.batch_conv (stored 'loop', now 'im2col')" in capsys.readouterr().out


STORED_JOBS = [
  # (flags, stored job folders, the tables they hold): the commands of the README's "Rebuilding the stored results"
  (["--flagfile=experiments/tables/holdout.flags", "--crop=256"], "gpu_h100", ["HOLDOUT"]),
  (
    [
      "--flagfile=experiments/tables/t2.flags",
      "--method_steps=dip=1500,idip=1200",
      "--report_steps=dip=1190,idip=1200",
      "--rows=DIP,FFDNet,IDIP",
    ],
    "gpu_h100",
    ["T2"],
  ),
  (["--flagfile=experiments/tables/tasks_cpu.flags"], "tasks_crop64", ["inpaint_heide11", "SR4_Set5", "SR4_Set14"]),
  (["--flagfile=experiments/tables/cpu_crop64.flags"], "cpu_crop64", ["T1", "T2", "T3", "T6", "DIPcolor"]),
  (["--flagfile=experiments/tables/cpu_crop64.flags", "--max_images=3"], "cpu_crop64", ["T4_classic10", "T4_Set12"]),
  (
    ["--flagfile=experiments/tables/idipplus.flags"],
    "idipplus_crop96",
    [f"IDIPplus_{s}" for s in ("holdout9", "classic10", "Set12")],
  ),
]
STORED_SETS = {
  "HOLDOUT": "holdout9",
  "inpaint_heide11": "heide11",
  "SR4_Set5": "Set5",
  "SR4_Set14": "Set14",
  "DIPcolor": "cbm3d9",
  "T4_Set12": "Set12",
  "IDIPplus_holdout9": "holdout9",
  "IDIPplus_Set12": "Set12",
}


@pytest.mark.parametrize("flags,folder,names", STORED_JOBS)
def test_stored_jobs_rebuild_their_tables(tmp_path, monkeypatch, flags, folder, names):
  """Committed job folders (histories, results.json, config.json) rebuild their tables through the one
  job runner, with every field of the committed tables (only the table's own commit and date differ); a job
  that is not reused would fit, which fails here."""
  for name in names:
    need_path(os.path.join(DATA, STORED_SETS.get(name, "classic10")))
  need_path(WEIGHTS)  # T2's FFDNet row is its x_bar alone, computed again
  tables, jobs = import_experiment("tables"), import_experiment("jobs")
  monkeypatch.setattr(jobs.runner, "run", lambda *a, **k: pytest.fail("a stored job was not reused"))
  stored = os.path.join(ROOT, "experiments", "results", folder)
  argv = ["tables.py", *flags, f"--workdir={stored}/jobs", f"--results_dir={tmp_path}", "--allow_other_code"]
  with parsed_flags(argv + [f"--tables={','.join(names)}"]):
    tables.main([])
  catalogue = import_experiment("catalogue")
  for name in names:
    got, want = (json.loads(open(os.path.join(d, name + ".json")).read()) for d in (tmp_path, stored))
    for label, job in catalogue.table_jobs(name):
      if job.method == "prelim":  # an x_bar alone is computed again: its row records the code that did, and
        # the bm3d library's PSNRs move run to run (up to 1.2e-4 dB seen; FFDNet's and DnCNN's are bit-reproducible)
        rows = [{k: v for k, v in t["methods"][label].items() if k not in ("commit", "code_hash")} for t in (got, want)]
        for k in ("mean_psnr", "per_image"):
          assert rows[0].pop(k) == pytest.approx(rows[1].pop(k), abs=1e-3), (name, label, k)
        got["methods"][label], want["methods"][label] = rows
    same = [k for k in want if k not in ("commit", "date")]  # newer code may add fields (paper_per_image)
    assert {k: got.get(k) for k in same} == {k: want[k] for k in same}, name
