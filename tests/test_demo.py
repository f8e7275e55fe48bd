import json
import os

import pytest
from conftest import ROOT
from test_cli import run_cli


def test_demo_flags_end_to_end(tmp_path, capsys):
  """experiments/demo.flags at a reduced step count: DIP and IDIP on the same noise; IDIP is far
  ahead of DIP at the same step count (the demo's point) and of the noisy input."""
  pytest.importorskip("bm3d")
  pytest.importorskip("skimage")
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    code, err = run_cli(
      [
        "--flagfile=experiments/demo.flags",
        "--steps=20",
        "--chunk=10",
        "--crop=64",
        "--workdir=" + str(tmp_path / "demo"),
      ],
    )
  finally:
    os.chdir(cwd)
  out, err = capsys.readouterr()
  assert code == 0, err
  # The demo ends with one line saying where its images and curves are.
  last = out.strip().splitlines()[-1]
  assert last.startswith(f"outputs in {tmp_path / 'demo'}/: images in {{dip,idip}}/images/"), last
  assert "psnr_curve.png" in last and (tmp_path / "demo" / "idip" / "psnr_curve.png").is_file(), last
  dip, r = (json.loads((tmp_path / "demo" / m / "results.json").read_text())["images"][0] for m in ("dip", "idip"))
  assert r["name"] == "camera" and r["psnr_prelim"] > r["psnr_noisy"] + 5
  assert r["psnr_final"] > r["psnr_noisy"] + 3, r
  assert dip["psnr_noisy"] == r["psnr_noisy"] and r["psnr_final"] > dip["psnr_final"] + 1, (
    dip,
    r,
  )  # IDIP starts at x_bar
  summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
  assert summary["idip"]["steps"] == summary["dip"]["steps"] == 20
  assert summary["idip"]["psnr_final"] == r["psnr_final"]
  assert dip["psnr_prelim"] is None  # DIP does not use x_bar
  # config.json: the settings as run, not as defaulted (every "auto" resolved)
  ran = {m: json.loads((tmp_path / "demo" / m / "config.json").read_text()) for m in ("dip", "idip")}
  assert ran["idip"]["net"]["in_channels"] == 1 and ran["idip"]["net"]["out_channels"] == 1  # x_bar in, gray out
  assert ran["idip"]["net"]["complex_connection"] and not ran["dip"]["net"]["complex_connection"]
  assert ran["dip"]["net"]["in_channels"] == 32 and ran["dip"]["fit"]["prelim_weight"] == 0.0
  for c in ran.values():
    assert (c["fit"]["loop"], c["net"]["conv"], c["fit"]["precision"]) == ("host", "cpu", "tf32")
    ((bucket, choice),) = [(dict(b, batch_choice=None), b["batch_choice"]) for b in c["buckets"]]
    assert bucket == {
      "shape": [64, 64, 1],
      "images": 1,
      "runs": 1,
      "batch_size": 1,
      "batch_choice": None,
      "batch_strategy": "vmap",
      "batch_conv": "loop",
    }
    assert choice["label"] == "one run per call" and choice["timings"] == {}  # one run: nothing to time
