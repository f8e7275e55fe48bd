import json
import os

import pytest

from conftest import ROOT
from test_cli import run_cli


def test_demo_flags_end_to_end(tmp_path, capsys):
  """experiments/demo.flags at a reduced step count: IDIP beats the noisy input."""
  pytest.importorskip("bm3d")
  pytest.importorskip("skimage")
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    code, err = run_cli(["--flagfile=experiments/demo.flags", "--steps=60", "--chunk=30",
                         "--crop=64", "--workdir=" + str(tmp_path / "demo")], capsys)
  finally:
    os.chdir(cwd)
  assert code == 0, err
  r = json.loads((tmp_path / "demo" / "results.json").read_text())["images"][0]
  assert r["name"] == "camera" and r["psnr_prelim"] > r["psnr_noisy"] + 5
  assert r["psnr_final"] > r["psnr_noisy"] + 3, r
