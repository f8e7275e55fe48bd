"""run.py end to end: flagfiles, outputs, mixed sizes, seeds, and bad input."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, TINY_ARGS, parsed_flags, smooth_image, write_png

import run as run_py


def run_cli(args, capsys=None):
  """Calls run.main in-process (no interpreter start-up); returns (code, stderr)."""
  from absl import flags

  flags.FLAGS.unparse_flags()
  code = run_py.main(["run.py"] + args)
  err = capsys.readouterr().err if capsys else ""
  return code, err


@pytest.fixture()
def two_sizes(tmp_path):
  d = tmp_path / "in"
  d.mkdir()
  write_png(str(d / "wide.png"), smooth_image(40, 56, 1, seed=1))
  write_png(str(d / "square.png"), smooth_image(64, 64, 1, seed=2))
  return d


def test_mixed_sizes_keep_original_extent(two_sizes, tmp_path, capsys):
  wd = tmp_path / "out"
  code, err = run_cli(
    ["--input=" + str(two_sizes), "--sigma=25", "--method=dip", "--steps=10", "--workdir=" + str(wd)] + TINY_ARGS,
    capsys,
  )
  assert code == 0, err
  import imageio.v3 as iio

  assert iio.imread(wd / "images" / "wide_final.png").shape == (40, 56)
  assert iio.imread(wd / "images" / "square_ema.png").shape == (64, 64)
  res = json.loads((wd / "results.json").read_text())
  for key in ("device", "commit", "wall_seconds", "mean"):
    assert key in res
  names = sorted(r["name"] for r in res["images"])
  assert names == ["square", "wide"]
  for r in res["images"]:
    for key in (
      "psnr_noisy",
      "psnr_final",
      "psnr_ema",
      "ssim_final",
      "oracle_best_psnr",
      "oracle_best_step",
      "steps",
      "seconds",
    ):
      assert r[key] is not None, key
    assert r["steps"] == 10 and 1 <= r["oracle_best_step"] <= 10
  hist = (wd / "history" / "wide.csv").read_text().splitlines()
  assert hist[0].startswith("step,loss,psnr_y,psnr,psnr_ema,ssim")
  assert len(hist) == 11
  assert "--steps=10" in (wd / "flags.txt").read_text()
  # An existing workdir is refused, not overwritten.
  before = (wd / "results.json").read_text()
  code, err = run_cli(
    ["--input=" + str(two_sizes), "--sigma=25", "--steps=10", "--method=dip", "--workdir=" + str(wd)] + TINY_ARGS,
    capsys,
  )
  assert code != 0 and "--overwrite" in err
  assert (wd / "results.json").read_text() == before


def test_seeds_and_real_noisy_input(tmp_path, capsys):
  write_png(str(tmp_path / "a.png"), smooth_image(32, 32, 3, seed=4))
  wd = tmp_path / "out"
  code, err = run_cli(
    [
      "--input=" + str(tmp_path / "a.png"),
      "--sigma=30",
      "--method=dip",
      "--steps=10",
      "--seeds=2",
      "--workdir=" + str(wd),
    ]
    + TINY_ARGS,
    capsys,
  )
  assert code == 0, err
  r = json.loads((wd / "results.json").read_text())["images"][0]
  assert len(r["runs"]) == 2 and r["runs"][0]["psnr_final"] != r["runs"][1]["psnr_final"]
  assert r["psnr_avg_final"] is not None and r["channels"] == 3
  # No --sigma: the input is taken as already noisy and no PSNR is claimed.
  wd2 = tmp_path / "out2"
  code, err = run_cli(
    ["--input=" + str(tmp_path / "a.png"), "--method=dip", "--steps=5", "--workdir=" + str(wd2)] + TINY_ARGS, capsys
  )
  assert code == 0, err
  r = json.loads((wd2 / "results.json").read_text())["images"][0]
  assert r["psnr_noisy"] is None and "psnr_final" not in r


def _bad_inputs(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir(parents=True)
  text = tmp_path / "text.png"
  text.write_text("not an image")
  good = write_png(str(tmp_path / "good.png"), smooth_image(64, 64))
  trunc = tmp_path / "trunc.png"
  trunc.write_bytes(open(good, "rb").read()[:200])
  small = write_png(str(tmp_path / "small.png"), smooth_image(12, 12))
  zero = tmp_path / "zero.png"
  zero.write_bytes(b"")
  notes = tmp_path / "notes"
  notes.mkdir()
  (notes / "readme.txt").write_text("not an image")
  import imageio.v3 as iio

  rgba = np.full((40, 40, 4), 200, np.uint8)
  rgba[..., 3] = 100  # half transparent
  iio.imwrite(tmp_path / "alpha.png", rgba)
  twins = tmp_path / "twins"
  twins.mkdir()
  write_png(str(twins / "a.png"), smooth_image(40, 40))
  iio.imwrite(twins / "a.bmp", np.full((40, 40), 100, np.uint8))
  iio.imwrite(tmp_path / "float.tif", np.full((40, 40), 0.5, np.float32))
  return {
    "missing": (["--input=" + str(tmp_path / "nope.png")], "not found"),
    "empty folder": (["--input=" + str(empty)], "no images"),
    "text as png": (["--input=" + str(text)], "cannot read"),
    "truncated png": (["--input=" + str(trunc)], "cannot read"),
    "too small": (["--input=" + small, "--scales=5"], "too small"),
    "negative sigma": (["--input=" + good, "--sigma=-5"], "sigma"),
    "unknown method": (["--input=" + good, "--method=foo"], "method"),
    "unknown prelim": (["--input=" + good, "--prelim=foo"], "prelim"),
    "idip without prelim": (["--input=" + good, "--method=idip"], "prelim"),
    "prelim file missing dir": (["--input=" + good, "--prelim=file"], "prelim_dir"),
    "infinite sigma": (["--input=" + good, "--sigma=inf"], "finite"),
    "nan lr": (["--input=" + good, "--lr=nan"], "finite"),
    "infinite input noise": (["--input=" + good, "--reg_noise_std=inf"], "finite"),
    "unknown noise protocol": (["--input=" + good, "--sigma=25", "--noise=poisson"], "noise"),
    "unknown backtrack rule": (["--input=" + good, "--backtrack=never"], "backtrack"),
    "unknown strategy": (["--input=" + good, "--batch_strategy=pmap"], "strategy"),
    "unknown precision": (["--input=" + good, "--precision=fp8"], "precision"),
    "zero eval_every": (["--input=" + good, "--eval_every=0"], "eval_every"),
    "crop larger than the image": (["--input=" + good, "--crop=100"], "larger"),
    "glob matching no image": (["--input=" + str(notes / "*")], "no images"),
    "zero-byte png": (["--input=" + str(zero)], "empty"),
    "workdir under a file": (["--input=" + good, "--workdir=" + good + "/out"], "is a file"),
    "workdir is a file": (["--input=" + good, "--workdir=" + good], "not a folder"),
    "transparent alpha": (["--input=" + str(tmp_path / "alpha.png")], "transparent"),
    "two inputs with one name": (["--input=" + str(twins)], "named"),
    "float tiff": (["--input=" + str(tmp_path / "float.tif")], "pixel type"),
  }


def test_bad_input_one_line_nonzero_nothing_written(tmp_path, capsys):
  assert len(_bad_inputs(tmp_path / "count")) >= 25
  for what, (args, needle) in _bad_inputs(tmp_path).items():
    wd = tmp_path / ("wd_" + what.replace(" ", "_"))
    code, err = run_cli(["--method=dip", "--steps=2", "--workdir=" + str(wd)] + args, capsys)
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert code != 0, what
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (what, err)
    assert not wd.exists(), what


def test_unknown_flag_value_subprocess(tmp_path):
  """The real entry point: a bad flag exits non-zero with one line on stderr."""
  p = subprocess.run(
    [sys.executable, "run.py", "--input=x.png", "--steps=abc"], cwd=ROOT, capture_output=True, text=True, timeout=120
  )
  assert p.returncode != 0
  assert len(p.stderr.strip().splitlines()) == 1 and "steps" in p.stderr


def test_every_flagfile_parses():
  import dataclasses

  from idip_jax import checks, config, data, runner

  files = sorted(glob.glob(os.path.join(ROOT, "experiments", "*.flags")))
  files += sorted(glob.glob(os.path.join(ROOT, "experiments", "tasks", "*.flags")))  # run.py's, per task
  files += sorted(glob.glob(os.path.join(ROOT, "experiments", "studies", "sure", "*.flags")))  # SURE along fits
  assert len(files) >= 6
  for f in files:
    with parsed_flags(["run.py", "--flagfile=" + f]) as fv:
      job = config.from_flags(fv, config.JobConfig)
    if not os.path.basename(f).startswith("base"):  # base*.flags are include-only
      checks.unused_flags(job)  # no flag that another makes meaningless
      for method in job.methods:  # and turn into valid configs
        try:
          runner.validate(dataclasses.replace(job.run, method=method, workdir="runs/x"))
        except data.InputError as e:  # a file of ../shared (a mask folder) where the shared data is absent
          if os.path.isdir(data.shared_dir()) or "../shared" not in str(e):
            raise
    assert open(f).readline().startswith("#"), f


def test_compile_cache_flag_sets_jax_cache_folder(tmp_path, capsys):
  """--compile_cache names JAX's persistent compilation cache (set before any compute, even when the
  input is then refused); 'none' leaves it as it was."""
  import jax

  before = jax.config.jax_compilation_cache_dir
  try:
    code, _ = run_cli([f"--input={tmp_path / 'missing.png'}", f"--compile_cache={tmp_path / 'cc'}"], capsys)
    assert code == 2 and jax.config.jax_compilation_cache_dir == str(tmp_path / "cc")
    jax.config.update("jax_compilation_cache_dir", before)
    code, _ = run_cli([f"--input={tmp_path / 'missing.png'}", "--compile_cache=none"], capsys)
    assert code == 2 and jax.config.jax_compilation_cache_dir == before
  finally:
    jax.config.update("jax_compilation_cache_dir", before)
