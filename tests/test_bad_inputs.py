"""Bad and hostile input: each case gets one error line and a non-zero exit before any
compute, and every file that existed before is still there, byte for byte. docs/reliability.md is
the table of these cases; this battery keeps it true."""

import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, TINY_ARGS, import_experiment, smooth_image, write_png
from test_cli import run_cli

from idip_jax import outputs

LOG_LINE = re.compile(r"^[IWEF]\d{4} ")  # absl.logging's prefix
FIT = ["--sigma=25", "--method=dip", "--steps=2"] + TINY_ARGS


def snapshot(root) -> dict[str, str]:
  """Every file under root -> SHA-1 of its bytes (links: their target)."""
  out = {}
  for d, _, files in os.walk(root):
    for name in files:
      p = os.path.join(d, name)
      if os.path.islink(p):
        out[p] = "link:" + os.readlink(p)
      else:
        with open(p, "rb") as f:
          out[p] = hashlib.sha1(f.read()).hexdigest()
  return out


def error_lines(err: str) -> list[str]:
  return [ln for ln in err.strip().splitlines() if ln and not LOG_LINE.match(ln)]


def make_case_dir(t, finished_run: bool = True):
  """a.png 32x32, the input folder in/ holding it, a 64x64 image b.png, and (finished_run) a finished tiny run
  made by the tool from in/ into wd/. Resume compares absolute input paths: each case fits its own (2 steps;
  the programs are compiled once per module)."""
  write_png(str(t / "a.png"), smooth_image(32, 32, 1, seed=1))
  (t / "in").mkdir()
  shutil.copy(t / "a.png", t / "in" / "a.png")
  if finished_run:
    assert run_cli(FIT + [f"--input={t / 'in'}", f"--workdir={t / 'wd'}"])[0] == 0
  write_png(str(t / "b.png"), smooth_image(64, 64, 1, seed=2))
  return t


@pytest.fixture()
def case_dir(tmp_path):
  return make_case_dir(tmp_path)


def _truncate(path):
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])


def _xbar(t, side):
  (t / "xbar").mkdir()
  write_png(str(t / "xbar" / "b.png"), smooth_image(side, side, 1, seed=3))


def _animation(t):
  import imageio.v3 as iio

  frames = np.stack([np.full((32, 32, 3), v, np.uint8) for v in (0, 200)])  # two different frames
  iio.imwrite(t / "anim.gif", frames)


def _mask(t, side, name="m.png"):
  m = np.zeros((side, side, 1), np.float32)
  m[::2] = 1.0
  write_png(str(t / name), m)


def _init(t, **net):
  """A stored init (inits.save) of the tiny net of FIT, with `net` fields changed."""
  import jax

  from idip_jax import config, inits, models

  cfg = dataclasses.replace(config.TINY_NET, **{"out_channels": 1, **net})
  params = models.init_skip_unet(models.SkipUNet(cfg), jax.random.key(0))
  inits.save(str(t / "init.npz"), params, cfg, {"method": "dip"})


# (name, setup(t), arguments (with {t} for the case folder), exit code, a phrase of the one error line)
CASES = [
  # --init: a stored initialisation that cannot serve this run.
  ("init_missing", None, ["--input={t}/a.png", "--workdir={t}/new", "--init={t}/none.npz"], 2, "no such file"),
  (
    "init_damaged",
    lambda t: [_init(t), _truncate(t / "init.npz")],
    ["--input={t}/a.png", "--workdir={t}/new", "--init={t}/init.npz"],
    2,
    "is damaged or not an idip-jax init",
  ),
  (
    "init_not_an_init",
    lambda t: np.savez(t / "other.npz", x=np.zeros(3)),
    ["--input={t}/a.png", "--workdir={t}/new", "--init={t}/other.npz"],
    2,
    "is damaged or not an idip-jax init (KeyError)",
  ),
  (
    "init_other_net_shape",
    lambda t: _init(t, width=16),
    ["--input={t}/a.png", "--workdir={t}/new", "--init={t}/init.npz"],
    2,
    "was made for another net: width 16 (this run's: 8",
  ),
  (
    "init_other_channel_count",
    lambda t: _init(t, out_channels=3),
    ["--input={t}/a.png", "--workdir={t}/new", "--init={t}/init.npz"],
    2,
    "was made for 3-channel images, this run's have 1",
  ),
  (
    "init_other_method",
    lambda t: _init(t, complex_connection=True),
    ["--input={t}/a.png", "--workdir={t}/new", "--init={t}/init.npz"],
    2,
    "was made for another net: complex_connection True",
  ),
  # Data loss: --overwrite never deletes what the run reads, nor files the tool did not write.
  (
    "overwrite_input_inside_workdir",
    None,
    ["--input={t}/wd/images/a_final.png", "--workdir={t}/wd", "--overwrite"],
    2,
    "which this run reads",
  ),
  (
    "overwrite_prelim_dir_inside_workdir",
    lambda t: [(t / "wd" / "xbar").mkdir(), shutil.copy(t / "a.png", t / "wd" / "xbar" / "a.png")],
    [
      "--input={t}/a.png",
      "--workdir={t}/wd",
      "--overwrite",
      "--method=idip2",
      "--prelim=file",
      "--prelim_dir={t}/wd/xbar",
    ],
    2,
    "which this run reads",
  ),
  (
    "overwrite_mask_inside_workdir",
    lambda t: _mask(t, 32, "wd/mask.png"),
    ["--input={t}/a.png", "--workdir={t}/wd", "--overwrite", "--task=inpaint", "--sigma=0", "--mask={t}/wd/mask.png"],
    2,
    "which this run reads",
  ),
  (
    "overwrite_user_file_in_workdir",
    lambda t: (t / "wd" / "notes.txt").write_text("my notes"),
    ["--input={t}/a.png", "--workdir={t}/wd", "--overwrite"],
    2,
    "did not write (",
  ),
  (
    "overwrite_user_file_in_subfolder",
    lambda t: (t / "wd" / "images" / "plot.png").write_bytes((t / "a.png").read_bytes()),
    ["--input={t}/a.png", "--workdir={t}/wd", "--overwrite"],
    2,
    "wd/images/plot.png",
  ),
  (
    "overwrite_folder_not_made_by_tool",
    lambda t: [(t / "thesis").mkdir(), (t / "thesis" / "thesis.tex").write_text("years of work")],
    ["--input={t}/a.png", "--workdir={t}/thesis", "--overwrite"],
    2,
    "not made by idip-jax",
  ),
  ("workdir_not_empty", None, ["--input={t}/a.png", "--workdir={t}/wd"], 2, "pass --overwrite"),
  # Sizes are checked before --crop.
  (
    "xbar_other_size_under_crop",
    lambda t: _xbar(t, 32),
    ["--input={t}/b.png", "--workdir={t}/new", "--crop=32", "--method=idip", "--prelim=file", "--prelim_dir={t}/xbar"],
    2,
    "is 32x32, its input b 64x64",
  ),
  (
    "xbar_larger_under_crop",
    lambda t: _xbar(t, 96),
    ["--input={t}/b.png", "--workdir={t}/new", "--crop=32", "--method=idip", "--prelim=file", "--prelim_dir={t}/xbar"],
    2,
    "is 96x96, its input b 64x64",
  ),
  (
    "mask_other_size_under_crop",
    lambda t: _mask(t, 48),
    ["--input={t}/b.png", "--workdir={t}/new", "--crop=32", "--task=inpaint", "--sigma=0", "--mask={t}/m.png"],
    2,
    "mask",
  ),
  # Stale or damaged stored runs under --resume.
  (
    "resume_input_changed",
    lambda t: write_png(str(t / "in" / "a.png"), smooth_image(32, 32, 1, seed=9)),
    ["--input={t}/in", "--workdir={t}/wd", "--resume"],
    2,
    "input a has changed",
  ),
  (
    "resume_input_added",
    lambda t: shutil.copy(t / "a.png", t / "in" / "c.png"),
    ["--input={t}/in", "--workdir={t}/wd", "--resume"],
    2,
    "input c is new",
  ),
  (
    "resume_input_removed",
    lambda t: [shutil.move(t / "in" / "a.png", t / "a_moved.png"), shutil.copy(t / "a.png", t / "in" / "c.png")],
    ["--input={t}/in", "--workdir={t}/wd", "--resume"],
    2,
    "input a is gone",
  ),
  (
    "resume_results_json_truncated",
    lambda t: _truncate(t / "wd" / "results.json"),
    ["--input={t}/in", "--workdir={t}/wd", "--resume"],
    2,
    "results.json is damaged",
  ),
  (
    "resume_config_json_truncated",
    lambda t: _truncate(t / "wd" / "config.json"),
    ["--input={t}/in", "--workdir={t}/wd", "--resume"],
    2,
    "config.json is damaged",
  ),
  (
    "resume_config_json_binary",
    lambda t: (t / "wd" / "config.json").write_bytes(b"\xff\xfe\x00garbage"),
    ["--input={t}/in", "--workdir={t}/wd", "--resume"],
    2,
    "config.json is damaged",
  ),
  ("resume_nothing_there", None, ["--input={t}/a.png", "--workdir={t}/none", "--resume"], 2, "no run to continue"),
  ("resume_changed_steps", None, ["--input={t}/in", "--workdir={t}/wd", "--resume", "--steps=3"], 2, "fit.steps"),
  ("resume_and_overwrite", None, ["--input={t}/a.png", "--workdir={t}/wd", "--resume", "--overwrite"], 2, "exclude"),
  # Flag values.
  ("noise_seed_negative", None, ["--input={t}/a.png", "--workdir={t}/new", "--noise_seed=-1"], 2, "--noise_seed must"),
  ("seed_negative", None, ["--input={t}/a.png", "--workdir={t}/new", "--seed=-5"], 2, "--seed must be >= 0"),
  (
    "seed_beyond_64_bits",
    None,
    ["--input={t}/a.png", "--workdir={t}/new", f"--seed={2**70}"],
    2,
    "--seed must be >= 0 and <= 4294967295",
  ),
  ("unknown_method", None, ["--input={t}/a.png", "--workdir={t}/new", "--method=foo"], 2, "--method"),
  ("unknown_flag", None, ["--input={t}/a.png", "--workdir={t}/new", "--stepz=3"], 2, "stepz"),
  ("sigma_nan", None, ["--input={t}/a.png", "--workdir={t}/new", "--sigma=nan"], 2, "must be finite"),
  ("stray_argument", None, ["--input={t}/a.png", "--workdir={t}/new", "extra"], 2, "unexpected arguments"),
  # Paths.
  ("input_missing", None, ["--input={t}/nope.png", "--workdir={t}/new"], 2, "input not found"),
  ("input_dev_zero", None, ["--input=/dev/zero", "--workdir={t}/new"], 2, "neither a regular file nor a folder"),
  (
    "input_empty_file",
    lambda t: (t / "e.png").write_bytes(b""),
    ["--input={t}/e.png", "--workdir={t}/new"],
    2,
    "empty",
  ),
  (
    "input_not_an_image",
    lambda t: (t / "x.png").write_text("hello"),
    ["--input={t}/x.png", "--workdir={t}/new"],
    2,
    "cannot read image",
  ),
  (
    "input_truncated_png",
    lambda t: [shutil.copy(t / "b.png", t / "c.png"), _truncate(t / "c.png")],
    ["--input={t}/c.png", "--workdir={t}/new"],
    2,
    "cannot read image",
  ),
  (
    "input_too_small",
    lambda t: write_png(str(t / "s.png"), smooth_image(3, 3, 1)),
    ["--input={t}/s.png", "--workdir={t}/new"],
    2,
    "too small",
  ),
  (
    "inputs_with_mixed_channels",
    lambda t: [
      (t / "mixed").mkdir(),
      write_png(str(t / "mixed" / "g.png"), smooth_image(32, 32, 1)),
      write_png(str(t / "mixed" / "c.png"), smooth_image(32, 32, 3)),
    ],
    ["--input={t}/mixed", "--workdir={t}/new"],
    2,
    "channels",
  ),
  ("crop_larger_than_image", None, ["--input={t}/a.png", "--workdir={t}/new", "--crop=64"], 2, "larger than"),
  (
    "workdir_name_too_long",
    None,
    ["--input={t}/a.png", "--workdir={t}/" + "x" * 300],
    2,
    "longer than the file system allows",
  ),
  (
    "workdir_path_too_long",
    None,
    ["--input={t}/a.png", "--workdir={t}/" + "d/" * 2100],
    2,
    "longer than the file system allows",
  ),
  ("workdir_is_a_file", None, ["--input={t}/a.png", "--workdir={t}/a.png"], 2, "not a folder"),
  (
    "image_name_too_long",
    lambda t: shutil.copy(t / "a.png", t / ("n" * 240 + ".png")),
    ["--input={t}/" + "n" * 240 + ".png", "--workdir={t}/new"],
    2,
    "name is too long",
  ),
  (
    "sure_blend_without_sigma",
    None,
    ["--input={t}/a.png", "--workdir={t}/new", "--sigma=0", "--prelim=sure_blend"],
    2,
    "needs the noise level",
  ),
  (
    "stop_sure_without_sigma",
    None,
    ["--input={t}/a.png", "--workdir={t}/new", "--sigma=0", "--stop=sure"],
    2,
    "--stop=sure needs the noise level",
  ),
  (
    "stop_sure_inpainting",
    None,
    ["--input={t}/a.png", "--workdir={t}/new", "--sigma=25", "--stop=sure", "--task=inpaint", "--mask=bernoulli:0.5"],
    2,
    "--stop=sure estimates a denoiser's error",
  ),
  (
    "stop_sure_xbar_from_files",
    lambda t: _xbar(t, 32),
    [
      "--input={t}/a.png",
      "--workdir={t}/new",
      "--sigma=25",
      "--stop=sure",
      "--method=idip",
      "--prelim=file",
      "--prelim_dir={t}/xbar",
    ],
    2,
    "--prelim=file cannot",
  ),
  (
    "x8_of_bm3d",
    None,
    ["--input={t}/a.png", "--workdir={t}/new", "--prelim=bm3d", "--x8"],
    2,
    "--x8 is the self-ensemble",
  ),
  (
    "weights_missing",
    None,
    ["--input={t}/a.png", "--workdir={t}/new", "--method=idip", "--prelim=ffdnet", "--weights={t}/none.mat"],
    2,
    "none.mat",
  ),
  # Silent wrong results: every numeric flag has its range, every count a bound (a step count of 1e20 fitted
  # for ever), and a flag that another flag makes meaningless is refused, not ignored.
  ("ema_decay_above_one", None, ["--input={t}/a.png", "--workdir={t}/new", "--ema_decay=1.5"], 2, "< 1 (got 1.5)"),
  ("lr_negative", None, ["--input={t}/a.png", "--workdir={t}/new", "--lr=-0.1"], 2, "--lr must be >= 0"),
  ("steps_beyond_bound", None, ["--input={t}/a.png", "--workdir={t}/new", f"--steps={10**20}"], 2, "--steps must be"),
  ("sigma_above_255", None, ["--input={t}/a.png", "--workdir={t}/new", "--sigma=300"], 2, "--sigma must be"),
  (
    "mask_without_inpaint",
    lambda t: _mask(t, 32),
    ["--input={t}/a.png", "--workdir={t}/new", "--mask={t}/m.png"],
    2,
    "needs --task=inpaint",
  ),
  (
    "prelim_dir_with_bm3d",
    lambda t: _xbar(t, 32),
    ["--input={t}/a.png", "--workdir={t}/new", "--method=idip", "--prelim=bm3d", "--prelim_dir={t}/xbar"],
    2,
    "needs --prelim=file",
  ),
  ("sr_factor_without_sr", None, ["--input={t}/a.png", "--workdir={t}/new", "--sr_factor=8"], 2, "needs --task=sr"),
  (
    "weights_without_a_cnn_xbar",
    None,
    ["--input={t}/a.png", "--workdir={t}/new", "--weights={t}/w.mat"],
    2,
    "needs --prelim=ffdnet, dncnn or sure_blend",
  ),
  (
    "coordinator_without_distributed",
    None,
    ["--input={t}/a.png", "--workdir={t}/new", "--coordinator=h:1"],
    2,
    "--distributed",
  ),
  (
    "cpu_processes_with_distributed",
    None,
    ["--input={t}/a.png", "--workdir={t}/new", "--cpu_processes=2", "--distributed"],
    2,
    "--cpu_processes starts its own processes",
  ),
  ("cpu_processes_missing_input", None, ["--input={t}/nope.png", "--workdir={t}/new", "--cpu_processes=2"], 2, "nope"),
  (
    "distributed_without_coordinator",
    None,
    ["--input={t}/a.png", "--workdir={t}/new", "--distributed"],
    2,
    "jax.distributed.initialize failed",
  ),
  (
    "xbar_gray_for_rgb_input",
    lambda t: [
      write_png(str(t / "c.png"), smooth_image(32, 32, 3)),
      _xbar(t, 32),
      shutil.move(t / "xbar" / "b.png", t / "xbar" / "c.png"),
    ],
    ["--input={t}/c.png", "--workdir={t}/new", "--method=idip", "--prelim=file", "--prelim_dir={t}/xbar"],
    2,
    "give a colour x_bar",
  ),
  (
    "resume_config_json_not_an_object",
    lambda t: (t / "wd" / "config.json").write_text("[1, 2]"),
    ["--input={t}/in", "--workdir={t}/wd", "--resume"],
    2,
    "holds a JSON list, not an object",
  ),
  (
    "batch_cache_is_a_folder",
    None,
    ["--input={t}/a.png", "--workdir={t}/new", "--batch_strategy=auto", "--batch_cache={t}/in"],
    2,
    "is a folder",
  ),
  # Unclear or wrong refusals, now saying what is wrong.
  (
    "gif_animation",
    _animation,
    ["--input={t}/anim.gif", "--workdir={t}/new"],
    2,
    "holds 2 frames",
  ),
  (
    "sr_image_smaller_than_sr_crop",
    lambda t: write_png(str(t / "s20.png"), smooth_image(20, 20, 1)),
    ["--input={t}/s20.png", "--workdir={t}/new", "--task=sr", "--sigma=0"],
    2,
    "is smaller than 32 px",
  ),
  (
    "weights_damaged",
    lambda t: (t / "w.mat").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64),
    ["--input={t}/a.png", "--workdir={t}/new", "--method=idip", "--prelim=ffdnet", "--weights={t}/w.mat"],
    2,
    "w.mat",
  ),
]


@pytest.mark.parametrize("name,setup,args,code,phrase", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_line_nothing_touched(tmp_path, capsys, name, setup, args, code, phrase):
  t = make_case_dir(tmp_path, finished_run=any("{t}/wd" in a for a in args))  # only those cases read wd/
  if setup:
    setup(t)
  before = snapshot(t)
  capsys.readouterr()
  got, err = run_cli(FIT + [a.format(t=t) for a in args], capsys)
  lines = error_lines(err)
  assert got == code and len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], (got, err[-3000:])
  assert snapshot(t) == before  # nothing deleted, changed or made (no workdir, no marker)


def test_overwrite_replaces_a_workdir_holding_only_what_the_tool_wrote(case_dir, capsys):
  """Leftover temporary files of listed outputs (a kill mid-write) count as the tool's; the tool
  lists every file it writes in the marker, and --overwrite replaces the folder."""
  t = case_dir
  listed = (t / "wd" / outputs.MARKER).read_text()
  for rel in ("config.json", "results.json", "flags.txt", "history/a.csv", "images/a_final.png", "images/a_noisy.png"):
    assert f"wrote {rel}\n" in listed, listed
  (t / "wd" / "images" / ".a_final.png.abc123_x.tmp").write_bytes(b"partial")
  code, err = run_cli(FIT + [f"--input={t / 'a.png'}", f"--workdir={t / 'wd'}", "--overwrite"], capsys)
  assert code == 0, err
  assert not (t / "wd" / "images" / ".a_final.png.abc123_x.tmp").exists()
  assert json.loads((t / "wd" / "results.json").read_text())["complete"] is True
  assert not outputs.not_written_by_tool(str(t / "wd"))


def test_resume_of_a_finished_run_prints_its_results(case_dir, capsys):
  t = case_dir
  before = snapshot(t / "wd")
  stored = json.loads((t / "wd" / "results.json").read_text())["images"][0]
  capsys.readouterr()
  code = run_cli(FIT + [f"--input={t / 'in'}", f"--workdir={t / 'wd'}", "--resume"])[0]
  out = capsys.readouterr().out
  row = [ln for ln in out.splitlines() if ln.startswith("a ")]
  assert code == 0 and row and f"{stored['psnr_final']:7.2f}" in row[0], out
  mean = [ln for ln in out.splitlines() if ln.startswith("MEAN")]
  assert mean and f"{stored['psnr_final']:7.2f}" in mean[0], out
  after = snapshot(t / "wd")
  assert {k: v for k, v in after.items() if "psnr_curve" not in k} == {
    k: v for k, v in before.items() if "psnr_curve" not in k
  }  # results.json, images and histories untouched


def test_resume_checksums_cover_xbar_files_and_masks(tmp_path):
  from idip_jax import config, data, resume, tasks

  write_png(str(tmp_path / "a.png"), smooth_image(32, 32, 1, seed=1))
  (tmp_path / "xbar").mkdir()
  write_png(str(tmp_path / "xbar" / "a.png"), smooth_image(32, 32, 1, seed=2))
  xbar = config.PrelimConfig(name="file", prelim_dir=str(tmp_path / "xbar"))
  cfg = config.RunConfig(input=str(tmp_path / "a.png"), sigma=25, prelim=xbar)
  images = data.load_images(cfg.input, cfg.sigma)
  first = resume.input_digests(cfg, images)
  assert first == resume.input_digests(cfg, images)
  write_png(str(tmp_path / "xbar" / "a.png"), smooth_image(32, 32, 1, seed=3))
  assert resume.input_digests(cfg, images) != first  # the x_bar file changed
  clean = [dataclasses.replace(im, clean_HxWxC=im.noisy_HxWxC) for im in data.load_images(cfg.input, 0)]
  plain = dataclasses.replace(cfg, prelim=config.PrelimConfig())
  masked = [resume.input_digests(plain, tasks.inpaint_images(clean, f"bernoulli:{p}", 0, 0)) for p in (0.5, 0.6)]
  assert masked[0] != masked[1]  # the observed pixels are part of the checksum


def test_full_disk_leaves_no_partial_result(case_dir, capsys, monkeypatch):
  """ENOSPC while writing the first image: one line naming the file, exit 1, no file under a
  result's name and no temporary file left; what existed is untouched."""
  t = case_dir
  real_fdopen = os.fdopen

  class Full:
    def __init__(self, f):
      self.f = f

    def write(self, b):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, k):
      return getattr(self.f, k)

    def __enter__(self):
      return self

    def __exit__(self, *a):
      self.f.close()

  def fdopen(fd, *a, **kw):
    f = real_fdopen(fd, *a, **kw)
    return Full(f) if "/images/" in os.readlink(f"/proc/self/fd/{fd}") else f

  before = snapshot(t)
  monkeypatch.setattr(outputs.os, "fdopen", fdopen)
  code, err = run_cli(FIT + [f"--input={t / 'a.png'}", f"--workdir={t / 'full'}"], capsys)
  monkeypatch.undo()
  lines = error_lines(err)
  assert code == 1 and len(lines) == 1 and "No space left on device" in lines[0] and "/images/" in lines[0], err
  assert not list((t / "full" / "images").iterdir())  # no 0-byte PNG, no .tmp
  assert not (t / "full" / "results.json").exists()  # no result claimed for the image
  assert {k: v for k, v in snapshot(t).items() if k in before} == before


def test_resume_refusal_is_one_line_without_jax_backend_chatter(case_dir):
  """JAX logs "Unable to initialize backend 'tpu'" when JAX_PLATFORMS is unset; a refusal shows
  only its own line."""
  t = case_dir
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  p = subprocess.run(
    [sys.executable, "run.py"] + FIT + [f"--input={t / 'in'}", f"--workdir={t / 'wd'}", "--resume", "--steps=3"],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env=env,
  )
  lines = error_lines(p.stderr)  # absl's lines aside (TINY_ARGS' --cc_features warns for dip)
  assert p.returncode == 2 and len(lines) == 1 and "fit.steps" in lines[0], p.stderr
  assert "Unable to initialize backend" not in p.stderr, p.stderr


def test_reliability_table_lists_every_case():
  doc = open(os.path.join(ROOT, "docs", "reliability.md")).read()
  table = set(re.findall(r"^\| `([a-z0-9_]+)` \|", doc, re.M))
  ids = {c[0] for c in CASES + SCRIPT_CASES}
  assert table == ids, table ^ ids


def test_overwrite_through_a_symlinked_workdir_replaces_its_folder_and_keeps_the_link(case_dir, capsys):
  """--workdir a link to a tool-made folder (was a traceback: rmtree refuses links)."""
  t = case_dir
  os.symlink(t / "wd", t / "link")
  code, err = run_cli(FIT + [f"--input={t / 'a.png'}", f"--workdir={t / 'link'}", "--overwrite"], capsys)
  assert code == 0, err
  assert os.path.islink(t / "link") and json.loads((t / "wd" / "results.json").read_text())["complete"]


def test_single_frame_gif_and_an_upper_case_xbar_file_are_read(tmp_path, capsys):
  """A one-frame GIF is an image (was 'unsupported image shape (1, 32, 32, 3)'); x_bar/A.PNG is found for
  input A as A.PNG itself is (the lookup was case-sensitive in the extension)."""
  import imageio.v3 as iio

  rgb = (smooth_image(32, 32, 3) * 255).astype(np.uint8)
  iio.imwrite(tmp_path / "A.gif", rgb[None])
  (tmp_path / "xbar").mkdir()
  iio.imwrite(tmp_path / "xbar" / "A.PNG", rgb)
  args = ["--method=idip2", "--prelim=file", f"--prelim_dir={tmp_path / 'xbar'}", f"--workdir={tmp_path / 'wd'}"]
  code, err = run_cli(FIT + [f"--input={tmp_path / 'A.gif'}"] + args, capsys)
  assert code == 0, err
  res = json.loads((tmp_path / "wd" / "results.json").read_text())["images"][0]
  assert res["name"] == "A" and res["psnr_prelim"] > 30  # x_bar is the file's own (quantised) image


def test_resume_fits_again_an_image_whose_output_was_deleted(case_dir, capsys, caplog):
  """--resume of a finished run after the user deleted one of its images: that image is fitted again
  (with a warning naming the file), not reported complete with a file missing."""
  t = case_dir
  gone = t / "wd" / "images" / "a_final.png"
  before = gone.read_bytes()
  gone.unlink()
  code, err = run_cli(FIT + [f"--input={t / 'in'}", f"--workdir={t / 'wd'}", "--resume"], capsys)
  assert code == 0, err
  assert "a_final.png is gone since the stored run; fitting a again" in caplog.text
  assert gone.read_bytes() == before  # the same fit, made again
  assert json.loads((t / "wd" / "results.json").read_text())["complete"] is True


def _start_run(t, workdir, steps):
  return subprocess.Popen(
    [sys.executable, "run.py"] + FIT + [f"--input={t / 'a.png'}", f"--workdir={workdir}", f"--steps={steps}"],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def test_a_workdir_in_use_is_locked_and_a_killed_run_leaves_no_lock(case_dir):
  """Two real processes: run A fits into wd2; B's --overwrite of wd2 (it deleted A's live folder, both
  exiting 0) is refused in one line naming A's pid, and changes nothing; once A is killed (SIGKILL: no
  cleanup runs), the kernel has dropped A's lock and B's --overwrite goes through."""
  import time

  t = case_dir
  a = _start_run(t, t / "wd2", 100000)
  try:
    deadline = time.time() + 120
    while not (t / "wd2" / "config.json").exists():  # A has made and locked its folder, and is fitting
      assert a.poll() is None and time.time() < deadline, a.stdout.read() if a.poll() is not None else "timeout"
      time.sleep(0.2)
    before = {k: v for k, v in snapshot(t).items() if "/wd2/" not in k}
    argv = [sys.executable, "run.py"] + FIT + [f"--input={t / 'a.png'}", f"--workdir={t / 'wd2'}", "--overwrite"]
    b = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = error_lines(b.stderr)
    assert b.returncode == 2 and len(lines) == 1 and f"is in use by pid {a.pid} (" in lines[0], b.stderr
    assert "Traceback" not in b.stderr and a.poll() is None  # A goes on
    assert (t / "wd2" / "config.json").exists() and {k: v for k, v in snapshot(t).items() if "/wd2/" not in k} == before
  finally:
    a.kill()
    a.wait()
  b = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert b.returncode == 0, b.stderr[-2000:]
  assert json.loads((t / "wd2" / "results.json").read_text())["complete"] is True


# Every entry point the README names, each as careful as run.py: (case, script, setup(t), arguments, phrase).
# Each is called in-process through its own entry(argv); t holds a training set, a validation set and the
# folder a stored training run would be in.
def _training_sets(t):
  for d, sides in (("train", (48, 48)), ("val", (32, 64))):
    (t / d).mkdir()
    for i, side in enumerate(sides):
      write_png(str(t / d / f"{d}{i}.png"), smooth_image(side, side, 1, seed=i))


def _stored_training_run(t):
  from idip_jax import config_train

  (t / "tw").mkdir()
  (t / "tw" / outputs.MARKER).write_text("made by idip-jax\nwrote config.json\n")
  cfg = config_train.TrainConfig(workdir=str(t / "tw"), train_dir=str(t / "train"), val_dir=str(t / "val"), patch=16)
  (t / "tw" / "config.json").write_text(json.dumps(dataclasses.asdict(dataclasses.replace(cfg, val_crop=32))))


# Where the scripts would write: each case also checks that no results folder is made.
OUTPUT_FLAGS = {"tables": ["--results_dir={t}/res"], "bench": ["--out={t}/res/b"]}
TRAIN = ["--train_dir={t}/train", "--val_dir={t}/val", "--patch=16", "--workdir={t}/tw"]
META = ["--train_dir={t}/train", "--val_dir={t}/val", "--crop=32", "--scales=4", "--workdir={t}/mw", "--val_images=1"]
SCRIPT_CASES = [
  ("tables_empty", "tables", None, ["--tables="], "--tables is empty"),
  ("tables_lower_case_name", "tables", None, ["--tables=t2"], "did you mean T2?"),
  ("tables_unknown_name", "tables", None, ["--tables=T9"], "unknown table --tables=T9"),
  ("tables_method_steps_without_count", "tables", None, ["--method_steps=dip"], "give METHOD=N"),
  ("tables_report_steps_not_a_number", "tables", None, ["--report_steps=dip=abc"], "N must be a step count"),
  ("tables_unknown_row", "tables", None, ["--rows=Nope"], "--rows=Nope is no row of T2"),
  ("tables_run_flag_out_of_range", "tables", None, ["--ema_decay=1.5"], "--ema_decay must be"),
  ("bench_sizes_not_numbers", "bench", None, ["--sizes=abc"], "--sizes=abc: give integers"),
  ("bench_size_below_the_net", "bench", None, ["--sizes=16"], "at least 64"),
  ("bench_unknown_lowering", "bench", None, ["--lowerings=foo"], "unknown --lowerings=foo"),
  ("bench_zero_repeats", "bench", None, ["--repeats=0"], "--repeats=0"),
  ("bench_merge_missing_file", "bench", None, ["--merge={t}/none.json"], "no results file"),
  ("train_unknown_target", "train_denoiser", None, ["--target=both"] + TRAIN, "--target"),
  ("train_steps_beyond_bound", "train_denoiser", None, [f"--steps={10**20}"] + TRAIN, "--steps must be"),
  (
    "train_validation_smaller_than_crop",
    "train_denoiser",
    _training_sets,
    ["--val_crop=48"] + TRAIN,
    "val0.png is 32x32, smaller than --val_crop=48",
  ),
  (
    "train_resume_changed_settings",
    "train_denoiser",
    lambda t: [_training_sets(t), _stored_training_run(t)],
    ["--val_crop=32", "--resume", "--sigma=50"] + TRAIN,
    "sigma (stored 25.0, now 50.0)",
  ),
  (
    "train_resume_nothing_there",
    "train_denoiser",
    _training_sets,
    ["--val_crop=32", "--resume"] + TRAIN,
    "no training run",
  ),
  ("meta_unknown_method", "meta_init", None, META + ["--method=idip1"], "--method"),
  ("meta_crop_not_a_multiple", "meta_init", _training_sets, META + ["--crop=24"], "multiple of 2^scales = 16"),
  ("meta_val_every_off_the_log", "meta_init", _training_sets, META + ["--val_every=3"], "multiple of --log_every"),
  ("meta_sigma_range_reversed", "meta_init", _training_sets, META + ["--sigma_max=10"], "below --sigma=15"),
  ("meta_no_training_images", "meta_init", None, META, "no training images there"),
  ("meta_resume_nothing_there", "meta_init", _training_sets, META + ["--resume"], "no training run"),
  ("meta_idip_no_weights", "meta_init", _training_sets, META + ["--method=idip", "--weights_dir={t}/w"], "FFDNet_gray"),
  ("catalogue_stray_argument", "catalogue", None, ["extra"], "unexpected arguments: extra"),
  ("time_to_psnr_unknown_method", "time_to_psnr", None, ["--ttp_methods=DIP,FOO"], "--ttp_methods must name DIP"),
  ("time_to_psnr_steps_not_a_count", "time_to_psnr", None, ["--ttp_steps=DIP=abc"], "--ttp_steps=DIP=abc"),
  ("time_to_psnr_meta_without_init", "time_to_psnr", None, ["--ttp_methods=DIP,META"], "go together"),
  ("drp_shared_weights_bad_size", "drp_shared_weights", None, ["--dsw_sizes=64,x"], "--dsw_sizes must be"),
  ("time_to_psnr_meta_idip_without_init", "time_to_psnr", None, ["--ttp_methods=DIP,META_IDIP"], "--ttp_idip_init"),
  ("time_to_psnr_init_missing", "time_to_psnr", None, ["--ttp_methods=DIP,META", "--ttp_init={t}/no.npz"], "no such"),
  ("auto_first_run_unknown_job", "auto_first_run", None, ["--afr_jobs=nope"], "unknown --afr_jobs=nope"),
  ("demo_cold_unknown_flag", "demo_cold", None, ["--fast"], "Unknown command line flag 'fast'"),
]


@pytest.mark.parametrize("name,script,setup,args,phrase", SCRIPT_CASES, ids=[c[0] for c in SCRIPT_CASES])
def test_experiment_entry_points_one_line_nothing_touched(tmp_path, capsys, name, script, setup, args, phrase):
  from absl import flags

  t = tmp_path
  (t / "keep.txt").write_text("a file that was here")
  if setup:
    setup(t)
  before = snapshot(t)
  module = import_experiment(script)
  getattr(module, "FV", flags.FLAGS).unparse_flags()
  capsys.readouterr()
  code = module.entry([script + ".py"] + [a.format(t=t) for a in OUTPUT_FLAGS.get(script, []) + args])
  err = capsys.readouterr().err
  getattr(module, "FV", flags.FLAGS).unparse_flags()
  lines = error_lines(err)
  assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], (code, err[-3000:])
  assert "Traceback" not in err and snapshot(t) == before  # nothing made: no results folder, no workdir


def test_bench_dry_run_lists_its_groups_and_times_nothing(tmp_path, capsys):
  from absl import flags

  bench = import_experiment("bench")
  flags.FLAGS.unparse_flags()
  code = bench.entry(["bench.py", "--dry_run", "--sizes=64,128", "--batches=1,2", f"--out={tmp_path}/b"])
  flags.FLAGS.unparse_flags()
  out = capsys.readouterr().out
  assert code == 0 and "size 64: loop tf32 batch 1, loop tf32 batch 2, im2col tf32 batch 2" in out, out
  assert "size 128:" in out and not os.listdir(tmp_path)  # no results file: nothing was timed


def test_battery_covers_every_entry_point_the_readme_names():
  """Each `python X.py` / `python -m X` of the README has cases in a battery (run.py: CASES)."""
  readme = open(os.path.join(ROOT, "README.md")).read()
  named = set(re.findall(r"python (?:-m )?((?:experiments[./])?[\w/.]+?)(?:\.py)?[\s`]", readme))
  modules = {import_experiment(c[1]).__name__ for c in SCRIPT_CASES}  # e.g. experiments.harness.catalogue
  covered = {"run"} | modules | {m.replace(".", "/") for m in modules}
  assert named - {"pytest"} <= covered, named - covered  # pytest: the test command itself
