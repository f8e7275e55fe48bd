"""Nothing lost, nothing silent: overwrite only what the tool made, NaN guards, help."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, TINY_ARGS, parsed_flags, smooth_image, write_png
from test_cli import run_cli

from idip_jax import outputs

LOG_LINE = re.compile(r"^[IWEF]\d{4} ")  # absl.logging's prefix
from test_fit import CFG, make_batch, states_and_step


def test_overwrite_replaces_only_folders_the_tool_made(tmp_path, capsys):
  write_png(str(tmp_path / "a.png"), smooth_image(32, 32, 1, seed=1))
  args = [f"--input={tmp_path / 'a.png'}", "--sigma=25", "--method=dip", "--steps=2"] + TINY_ARGS
  thesis = tmp_path / "thesis"
  (thesis / "data").mkdir(parents=True)
  (thesis / "thesis.tex").write_text("years of work")
  code, err = run_cli(args + [f"--workdir={thesis}", "--overwrite"], capsys)
  assert code == 2 and len(err.strip().splitlines()) == 1 and "not made by idip-jax" in err, err
  assert (thesis / "thesis.tex").read_text() == "years of work" and (thesis / "data").is_dir()
  # A folder the tool made is replaced by --overwrite (and refused without it), unless it holds a
  # file the tool did not write (it would be lost).
  wd = tmp_path / "run"
  assert run_cli(args + [f"--workdir={wd}"], capsys)[0] == 0
  assert (wd / outputs.MARKER).is_file()
  (wd / "old.txt").write_text("my notes")
  assert run_cli(args + [f"--workdir={wd}"], capsys)[0] == 2
  code, err = run_cli(args + [f"--workdir={wd}", "--overwrite"], capsys)
  assert code == 2 and "did not write" in err and (wd / "old.txt").read_text() == "my notes", err
  (wd / "old.txt").unlink()
  stale = (wd / "results.json").stat().st_mtime_ns
  assert run_cli(args + [f"--workdir={wd}", "--overwrite"], capsys)[0] == 0
  assert (wd / "results.json").is_file() and (wd / "results.json").stat().st_mtime_ns != stale
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
  assert np.isfinite(np.asarray(nxt.ema)).all()
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


def test_noise_level_outside_training_is_warned_and_estimate_recorded(tmp_path, caplog):
  from conftest import WEIGHTS, need_path

  need_path(WEIGHTS)
  write_png(str(tmp_path / "a.png"), smooth_image(32, 32, 1, seed=2))
  wd = tmp_path / "out"
  code, _ = run_cli(
    [f"--input={tmp_path / 'a.png'}", "--sigma=100", "--method=idip", "--prelim=ffdnet", "--steps=2", f"--workdir={wd}"]
    + TINY_ARGS
  )
  warned = [r for r in caplog.records if "above the 75 that ffdnet" in r.getMessage()]
  assert code == 0 and warned and warned[0].levelname == "WARNING", caplog.text[-2000:]
  noisy = wd / "images" / "a_noisy.png"  # as a real noisy photo: no --sigma, so it is estimated
  code, _ = run_cli(
    [f"--input={noisy}", "--method=idip", "--prelim=ffdnet", "--steps=2", f"--workdir={tmp_path / 'blind'}"] + TINY_ARGS
  )
  assert code == 0 and "estimated noise levels" in caplog.text, caplog.text[-2000:]
  rec = json.loads((tmp_path / "blind" / "results.json").read_text())["images"][0]
  assert rec["psnr_noisy"] is None and 20 < rec["prelim_sigma"] < 100, rec


def test_float_outputs_plot_and_compile_time(tmp_path, capsys):
  import jax.numpy as jnp

  from idip_jax import data, metrics

  write_png(str(tmp_path / "a.png"), smooth_image(32, 32, 1, seed=3))
  wd = tmp_path / "out"
  code, err = run_cli(
    [f"--input={tmp_path / 'a.png'}", "--sigma=25", "--method=dip", "--steps=10", "--save_float", f"--workdir={wd}"]
    + TINY_ARGS,
    capsys,
  )  # TINY_ARGS: 5-step chunks
  assert code == 0, err
  im = data.load_images(str(tmp_path / "a.png"), 25)[0]
  np.testing.assert_array_equal(np.load(wd / "images" / "a_noisy.npy"), im.noisy_HxWxC)  # exactly as fitted
  rec = json.loads((wd / "results.json").read_text())["images"][0]
  final = np.load(wd / "images" / "a_final.npy")
  assert (
    final.dtype == np.float32
    and abs(float(metrics.psnr(jnp.asarray(final), im.clean_HxWxC)) - rec["psnr_final"]) < 1e-4
  )
  assert (wd / "psnr_curve.png").stat().st_size > 1000
  assert 0 <= rec["compile_seconds"] < rec["seconds"], rec  # compile estimated apart from the fit


def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
  """SIGKILL after the first image, and after a mid-fit checkpoint: --resume ends where an
  uninterrupted run ends (same PSNRs and histories), and refuses changed settings."""
  d = tmp_path / "in"
  d.mkdir()
  for i, name in enumerate("ab"):
    write_png(str(d / f"{name}.png"), smooth_image(32, 32, 1, seed=i))
  base = [
    sys.executable,
    "run.py",
    f"--input={d}",
    "--sigma=25",
    "--method=dip",
    "--steps=20",
    "--chunk=5",
    "--checkpoint_every=5",
    "--batch_size=1",
  ] + TINY_ARGS
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  # A fault: tests/fault_run.py kills run.py right after the event (no hook in the package).
  go = lambda wd, *extra, fault=None: subprocess.run(
    (base if fault is None else [sys.executable, "tests/fault_run.py", fault] + base[2:]) + [f"--workdir={wd}", *extra],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
  )
  assert go(tmp_path / "full").returncode == 0
  full = json.loads((tmp_path / "full" / "results.json").read_text())
  for fault in ("image", "checkpoint"):
    wd = tmp_path / fault
    assert go(wd, fault=fault).returncode == -9  # killed
    if fault == "image":
      partial = json.loads((wd / "results.json").read_text())
      assert partial["complete"] is False and partial["finished_images"] == 1 and partial["expected_images"] == 2
    else:
      assert list((wd / "checkpoints").glob("call-*.npz")) and not (wd / "results.json").exists()
    if fault == "checkpoint":  # changed settings are refused (the check does not depend on where it stopped)
      p = go(wd, "--steps=30", "--resume")
      refusal = [ln for ln in p.stderr.strip().splitlines() if not re.match(r"[IWEF]\d{4} ", ln)]  # absl's aside
      assert p.returncode == 2 and "steps" in p.stderr and len(refusal) == 1, p.stderr
    p = go(wd, "--resume")
    assert p.returncode == 0, p.stderr[-2000:]
    assert ("resumed at step" in p.stderr) == (fault == "checkpoint")  # absl.logging: stderr
    progress = [ln for ln in p.stderr.splitlines() if LOG_LINE.match(ln) and "steps/s" in ln]
    assert progress and all("ETA" in ln and "image-steps/s" in ln for ln in progress), p.stderr[-2000:]
    got = json.loads((wd / "results.json").read_text())
    assert got["complete"] is True
    for a, b in zip(full["images"], got["images"]):
      assert a["name"] == b["name"] and a["psnr_final"] == b["psnr_final"] and a["psnr_ema"] == b["psnr_ema"]
    for name in "ab":
      assert (wd / "history" / f"{name}.csv").read_text() == (tmp_path / "full" / "history" / f"{name}.csv").read_text()
    assert not list((wd / "checkpoints").glob("*.npz"))  # spent checkpoints are removed


def test_ctrl_c_during_compilation_is_answered_at_once(tmp_path):
  """Ctrl-C while XLA compiles the first chunk (no Python handler runs there): a line at once saying
  the run stops after compiling; then a checkpoint, exit 130 and one line saying how to resume."""
  import signal
  import threading
  import time

  write_png(str(tmp_path / "a.png"), smooth_image(32, 32, 1, seed=4))
  wd = tmp_path / "out"
  # A child inherits an ignored SIGINT (xdist workers, or a shell's background jobs, ignore it),
  # and Python then installs no KeyboardInterrupt handler: give it the default, as a terminal does.
  p = subprocess.Popen(
    [
      sys.executable,
      "run.py",
      f"--input={tmp_path / 'a.png'}",
      "--sigma=25",
      "--method=dip",
      "--steps=100000",
      f"--workdir={wd}",
    ]
    + TINY_ARGS,
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
  )
  lines, seen = [], {}

  def read():
    for ln in p.stderr:
      lines.append(ln.rstrip("\n"))
      seen.setdefault("bucket" if " bucket 1/1 " in ln else "ack" if ln.startswith("Ctrl-C:") else "", time.time())

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  try:
    deadline = time.time() + 240
    while "bucket" not in seen and time.time() < deadline and p.poll() is None:
      time.sleep(0.05)
    # The bucket's line comes just before its first chunk compiles (2-10 s for this net here).
    p.send_signal(signal.SIGINT)
    pressed = time.time()
    p.wait(timeout=180)
  finally:
    p.kill()
  reader.join(timeout=10)
  err = "\n".join(lines)
  assert "ack" in seen and seen["ack"] - pressed < 1.5, err[-2000:]  # at once, not after compiling
  said = [ln for ln in lines if ln and not LOG_LINE.match(ln)]  # progress: absl.logging
  assert p.returncode == 130 and len(said) == 2 and "after compiling" in said[0], err[-2000:]
  assert "--resume" in said[1] and str(wd) in said[1] and "no image had finished" in said[1], err[-2000:]
  assert "checkpointed" in said[1] and list((wd / "checkpoints").glob("call-*.npz")), err[-2000:]


def test_checkpoints_every_n_steps_on_ctrl_c_and_past_damage(tmp_path, monkeypatch):
  """--checkpoint_every counts steps (at the first chunk end past each multiple); Ctrl-C writes one
  before stopping; a damaged checkpoint is ignored with a warning and the call starts over."""
  from test_fit import CFG, NET, make_batch

  from idip_jax import checkpoint, fit, loop

  batch, keys = make_batch([smooth_image(32, 32, 1, seed=5)])
  cfg = dataclasses.replace(CFG, steps=20, chunk=3)
  saved = []
  real_save = checkpoint.save
  monkeypatch.setattr(checkpoint, "save", lambda path, done, *a: saved.append(done) or real_save(path, done, *a))
  ckpt = str(tmp_path / "c.npz")
  full = fit.fit(NET, cfg, batch, keys, ckpt_path=ckpt, ckpt_every=7)
  assert saved == [9, 15]  # past 7 and past 14; none at the end (the results are written then)
  # Damaged: truncated, or bytes of another file; the fit starts over and equals one without checkpoint.
  for damage in (lambda b: b[: len(b) // 2], lambda b: b"PK\x03\x04" + b"\x00" * 100):
    with open(ckpt, "rb") as f:
      good = f.read()
    with open(ckpt, "wb") as f:
      f.write(damage(good))
    again = fit.fit(NET, cfg, batch, keys, ckpt_path=ckpt, ckpt_every=0)
    np.testing.assert_array_equal(again.history["loss"], full.history["loss"])
    with open(ckpt, "wb") as f:
      f.write(good)
  # Ctrl-C (run.py's handler sets loop.INTERRUPTED): a checkpoint at the chunk end, then it stops.
  saved.clear()
  loop.INTERRUPTED.set()
  try:
    with pytest.raises(KeyboardInterrupt):
      fit.fit(NET, cfg, batch, keys, ckpt_path=str(tmp_path / "i.npz"), ckpt_every=0)
  finally:
    loop.INTERRUPTED.clear()
  assert saved == [3]
  resumed = fit.fit(NET, cfg, batch, keys, ckpt_path=str(tmp_path / "i.npz"), ckpt_every=0)
  np.testing.assert_array_equal(resumed.history["loss"], full.history["loss"])


def test_home_in_path_flags_is_expanded():
  import run as _  # noqa: F401  (defines the flags)
  from idip_jax import config

  with parsed_flags(["run.py", "--input=~/in.png", "--prelim_dir=~/xbar", "--workdir=~/runs/x"]) as fv:
    cfg = config.from_flags(fv, config.JobConfig).run
  home = os.path.expanduser("~")
  assert cfg.input == os.path.join(home, "in.png") and cfg.workdir == os.path.join(home, "runs", "x")
  assert cfg.prelim.prelim_dir == os.path.join(home, "xbar")
