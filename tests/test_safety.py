"""Nothing lost, nothing silent (issue 13): overwrite only what the tool made, NaN guards, help."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from idip_jax import outputs
from conftest import ROOT, smooth_image, write_png
from test_cli import TINY, run_cli
from test_fit import CFG, make_batch, states_and_step


def test_overwrite_replaces_only_folders_the_tool_made(tmp_path, capsys):
  write_png(str(tmp_path / "a.png"), smooth_image(32, 32, 1, seed=1))
  args = [f"--input={tmp_path / 'a.png'}", "--sigma=25", "--method=dip", "--steps=2"] + TINY
  thesis = tmp_path / "thesis"
  (thesis / "data").mkdir(parents=True)
  (thesis / "thesis.tex").write_text("years of work")
  code, err = run_cli(args + [f"--workdir={thesis}", "--overwrite"], capsys)
  assert code == 2 and len(err.strip().splitlines()) == 1 and "not made by idip-jax" in err, err
  assert (thesis / "thesis.tex").read_text() == "years of work" and (thesis / "data").is_dir()
  # A folder the tool made is replaced by --overwrite (and refused without it).
  wd = tmp_path / "run"
  assert run_cli(args + [f"--workdir={wd}"], capsys)[0] == 0
  assert (wd / outputs.MARKER).is_file()
  (wd / "old.txt").write_text("stale")
  assert run_cli(args + [f"--workdir={wd}"], capsys)[0] == 2
  assert run_cli(args + [f"--workdir={wd}", "--overwrite"], capsys)[0] == 0
  assert not (wd / "old.txt").exists() and (wd / "results.json").is_file()
  res = json.loads((wd / "results.json").read_text())
  assert res["complete"] is True and res["expected_images"] == res["finished_images"] == 1


def test_nan_run_is_backtracked_and_json_stays_strict(tmp_path):
  batch, keys = make_batch([smooth_image(32, 32, 1, seed=s) for s in range(2)])
  states, noise, step = states_and_step(CFG, keys)
  for _ in range(3):
    states, _ = step(states, batch, noise)
  poison = lambda p: p.at[1].set(jnp.nan)  # run 1's parameters turn NaN, as an overflow would
  bad = states.replace(params=jax.tree_util.tree_map(poison, states.params))
  nxt, m = step(bad, batch, noise)
  assert list(np.asarray(m["backtracked"])) == [False, True]
  for a, g in zip(jax.tree_util.tree_leaves(nxt.params), jax.tree_util.tree_leaves(states.good_params)):
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(g[1]))
  assert np.isfinite(np.asarray(nxt.ema_HxWxC)).all()
  # Results files are strict JSON: non-finite numbers become null.
  path = tmp_path / "r.json"
  outputs.write_json(str(path), {"a": float("nan"), "b": [1.0, float("inf")], "c": np.float32(2.5)})
  assert json.loads(path.read_text(), parse_constant=lambda c: 1 / 0) == {"a": None, "b": [1.0, None], "c": 2.5}


def test_help_lists_the_flags():
  for flag in ("--help", "-h", "--helpfull"):
    p = subprocess.run([sys.executable, "run.py", flag], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (flag, p.stderr[-1000:])
    for name in ("--flagfile", "--input", "--method", "--sigma", "--noise", "--steps", "--[no]overwrite"):
      assert name in p.stdout, (flag, name)


def test_palette_and_cmyk_images_are_read_as_they_look(tmp_path):
  from PIL import Image as PILImage
  from idip_jax import data
  rng = np.random.default_rng(0)
  gray = (rng.random((24, 24)) * 255).astype(np.uint8)
  rgb = (rng.random((24, 24, 3)) * 255).astype(np.uint8)
  PILImage.fromarray(gray).convert("P").save(tmp_path / "gray_palette.png")
  PILImage.fromarray(rgb).convert("P").save(tmp_path / "rgb_palette.png")
  PILImage.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
  g = data.read_image(str(tmp_path / "gray_palette.png"))
  assert g.shape == (24, 24, 1) and np.abs(g[..., 0] * 255 - gray).max() < 1  # gray, values kept
  assert data.read_image(str(tmp_path / "rgb_palette.png")).shape == (24, 24, 3)
  cmyk = data.read_image(str(tmp_path / "cmyk.jpg"))
  assert cmyk.shape == (24, 24, 3) and abs(cmyk.mean() * 255 - rgb.mean()) < 8  # converted, not refused


def test_noise_level_outside_training_is_warned_and_estimate_recorded(tmp_path, capsys):
  from conftest import WEIGHTS, need_path
  need_path(WEIGHTS)
  write_png(str(tmp_path / "a.png"), smooth_image(32, 32, 1, seed=2))
  wd = tmp_path / "out"
  code, _ = run_cli([f"--input={tmp_path / 'a.png'}", "--sigma=100", "--method=idip", "--prelim=ffdnet",
                     "--steps=2", f"--workdir={wd}"] + TINY)
  out = capsys.readouterr().out
  assert code == 0 and "above the 75 that ffdnet" in out, out[-2000:]
  noisy = wd / "images" / "a_noisy.png"  # as a real noisy photo: no --sigma, so it is estimated
  code, _ = run_cli([f"--input={noisy}", "--method=idip", "--prelim=ffdnet", "--steps=2",
                     f"--workdir={tmp_path / 'blind'}"] + TINY)
  out = capsys.readouterr().out
  assert code == 0 and "estimated noise levels" in out, out[-2000:]
  rec = json.loads((tmp_path / "blind" / "results.json").read_text())["images"][0]
  assert rec["psnr_noisy"] is None and 20 < rec["prelim_sigma"] < 100, rec
