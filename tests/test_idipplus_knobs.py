"""The IDIPplus knob table (experiments/studies/idipplus_knobs.py) on a made-up set of finished IDIPplus jobs."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import import_experiment, parsed_flags, smooth_image, write_png

from idip_jax import results


def fake_jobs(root, names, k=2):
  """Finished watched (K runs) and weight-2 jobs per sigma: clean images, and outputs = clean + noise."""
  knobs = import_experiment("idipplus_knobs")
  rng = np.random.default_rng(0)
  os.makedirs(root / "data" / "toy")
  clean = {}
  for i, n in enumerate(names):
    write_png(str(root / "data" / "toy" / f"{n}.png"), smooth_image(40, 40, 1, seed=i))
    clean[n] = np.round(knobs.data.center_crop(smooth_image(40, 40, 1, seed=i), 32) * 255) / 255
  for s in knobs.SIGMAS:
    watched, knob_dirs = knobs.job_dirs(str(root / "work"), "toy", s, "clip", k)
    for d in map(Path, [watched, *knob_dirs.values()]):
      os.makedirs(d / "images")
      (d / "results.json").write_text(json.dumps({"commit": "abc1234"}))
      for n, gt in clean.items():
        tags = ["prelim", "last", "last_ema", "final", "ema"] + [
          f"seed{j}_{t}" for j in range(k) for t in ("last", "last_ema", "final")
        ]
        for t in tags:
          noise = (s / 255 / (2 if t == "prelim" else 3)) * rng.standard_normal(gt.shape)
          np.save(d / "images" / f"{n}_{t}.npy", (gt + noise).astype(np.float32))
  return knobs, clean


def test_knob_table_values(tmp_path):
  knobs, clean = fake_jobs(tmp_path, ["a", "b"])
  table = knobs.knob_table(str(tmp_path / "work"), "toy", str(tmp_path / "data"), 32, 2, "clip", [0.5])
  dirs = lambda s: knobs.job_dirs(str(tmp_path / "work"), "toy", s, "clip", 2)
  img = lambda s, n, t, job=None: np.load(Path(job or dirs(s)[0]) / "images" / f"{n}_{t}.npy")
  for s in (15, 50):
    t = table[s]
    for n, gt in clean.items():
      assert t["x_bar"]["per_image"][n] == pytest.approx(results.psnr(img(s, n, "prelim"), gt), abs=1e-5)
      assert t["x2 last"]["per_image"][n] == pytest.approx(results.psnr(img(s, n, "last"), gt), abs=1e-5)
      single = np.mean([results.psnr(img(s, n, f"seed{j}_last"), gt) for j in range(2)])
      assert t["single last"]["per_image"][n] == pytest.approx(single, abs=1e-5)
      blend = 0.5 * img(s, n, "last_ema") + 0.5 * img(s, n, "prelim")
      assert t["0.5 x2 last EMA + 0.5 x_bar"]["per_image"][n] == pytest.approx(results.psnr(blend, gt), abs=1e-5)
      w2 = img(s, n, "ema", dirs(s)[1]["w2"])
      assert t["w2 last EMA"]["per_image"][n] == pytest.approx(results.psnr(w2, gt), abs=1e-5)
    # The made-up outputs are less noisy than the made-up x_bar: every candidate gains over it.
    assert t["x2 last"]["minus_x_bar"] > 1 and t["x_bar"]["minus_x_bar"] == 0
    assert t["x2 last"]["minus_x_bar"] == pytest.approx(t["x2 last"]["mean"] - t["x_bar"]["mean"])


def test_knob_script_writes_files_and_refuses_unfinished_jobs(tmp_path, capsys):
  knobs, _ = fake_jobs(tmp_path, ["a"])
  args = ["idipplus_knobs.py", "--set=toy", "--crop=32", "--noise=clip", "--ensemble_runs=2"]
  args += [f"--workdir={tmp_path / 'work'}", f"--data_dir={tmp_path / 'data'}", f"--results_dir={tmp_path / 'out'}"]
  with parsed_flags(args):
    assert knobs.main([]) == 0
    md = (tmp_path / "out" / "knobs_toy.md").read_text()
    assert "abc1234" in md and "| 0.5 x2 last EMA + 0.5 x_bar |" in md
    sig25 = json.loads((tmp_path / "out" / "knobs_toy.json").read_text())["sigmas"]["25"]
    assert sig25["x_bar"]["minus_x_bar"] == 0
    os.remove(tmp_path / "work" / "toy_s50_clip_idip_ffdnet_x1_prelim_weight2" / "results.json")
    assert knobs.main([]) == 2
  assert "unfinished IDIPplus job" in capsys.readouterr().err
