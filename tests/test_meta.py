"""Stored initialisations (--init, inits.py) and their meta-learning (meta_train.py: Reptile whose inner loop is the
engine's batched fit): loading, bit-equal starts, bit-identical resume after a kill, and a lower loss than a
random init at a fixed step count."""

import dataclasses
import os

import jax
import numpy as np
import pytest
from conftest import TINY_ARGS, WEIGHTS, import_experiment, interrupt_at_step, need_path, smooth_image, write_png
from test_cli import run_cli

from idip_jax import config, config_train, data, fit, inits, meta_train, models
from idip_jax.train import run_keys

NET = dataclasses.replace(config.TINY_NET, out_channels=1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """Synthetic gray training images (48 px) and validation images (32 px)."""
  d = tmp_path_factory.mktemp("meta")
  for sub, n, side in (("train", 8, 48), ("val", 2, 32)):
    (d / sub).mkdir()
    for s in range(n):
      write_png(str(d / sub / f"{sub}{s}.png"), smooth_image(side, side, 1, seed=s + (100 if sub == "val" else 0)))
  return d


def tiny(folders, workdir, **kw) -> config_train.MetaConfig:
  net = dataclasses.replace(
    config_train.MetaConfig().net, **{k: getattr(NET, k) for k in ("in_channels", "scales", "width")}
  )
  net = dataclasses.replace(net, skip_channels=NET.skip_channels, cc_features=NET.cc_features)
  return config_train.MetaConfig(
    **{
      **dict(train_dir=str(folders / "train"), val_dir=str(folders / "val"), workdir=str(workdir), net=net),
      **dict(crop=16, tasks=2, inner_steps=3, meta_steps=4, log_every=1, val_every=2, checkpoint_every=2),
      **dict(val_images=2, val_steps=3, fit=dataclasses.replace(config.FitConfig(), chunk=3)),
      **kw,
    }
  )


def leaves_equal(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_a_stored_init_loads_and_every_run_starts_from_its_parameters(tmp_path):
  params = models.init_skip_unet(models.SkipUNet(NET), jax.random.key(7))
  path = str(tmp_path / "init.npz")
  inits.save(path, params, NET, {"method": "dip"})
  loaded = inits.load(path, dataclasses.replace(NET, conv="lax", batch_conv="im2col"))  # lowerings: any
  assert leaves_equal(loaded, params)
  cfg = dataclasses.replace(config.FitConfig(), steps=1)
  net, cfg = fit.for_backend(NET, cfg, "cpu")
  keys = [run_keys(0, r) for r in range(3)]
  states, _ = fit.init_runs(net, cfg, keys, 16, 16, loaded)
  for r in range(3):
    assert leaves_equal(jax.tree.map(lambda a, r=r: a[r], states.params), params)
  random, _ = fit.init_runs(net, cfg, keys, 16, 16)  # without --init: each run's own draw
  assert not leaves_equal(jax.tree.map(lambda a: a[0], random.params), params)
  # DRP (--train=seed,norms): the stored parameters are the net's, the trained seed starts at 0.
  drp = dataclasses.replace(cfg, train=("seed", "norms"))
  states, _ = fit.init_runs(net, drp, keys[:1], 16, 16, loaded)
  assert leaves_equal(jax.tree.map(lambda a: a[0], states.params["net"]), params)
  assert not np.any(np.asarray(states.params["seed"]))


def test_run_py_with_init_fits_from_it(tmp_path, capsys):
  """run.py --init: the stored parameters give the fit's step-0 output (a 1-step fit differs from a random init's),
  and --resume refuses a run whose init file changed since."""
  write_png(str(tmp_path / "a.png"), smooth_image(32, 32, 1, seed=1))
  params = models.init_skip_unet(models.SkipUNet(NET), jax.random.key(7))
  inits.save(str(tmp_path / "init.npz"), params, NET, {"method": "dip"})
  args = ["--sigma=25", "--method=dip", "--steps=1", "--save_float", f"--input={tmp_path / 'a.png'}"] + TINY_ARGS
  assert run_cli(args + [f"--workdir={tmp_path / 'w0'}"])[0] == 0
  assert run_cli(args + [f"--workdir={tmp_path / 'w1'}", f"--init={tmp_path / 'init.npz'}"])[0] == 0
  a, b = (np.load(tmp_path / w / "images" / "a_final.npy") for w in ("w0", "w1"))
  assert not np.array_equal(a, b)
  inits.save(str(tmp_path / "init.npz"), jax.tree.map(lambda p: p * 0.5, params), NET, {"method": "dip"})
  code, err = run_cli(args + [f"--workdir={tmp_path / 'w1'}", f"--init={tmp_path / 'init.npz'}", "--resume"], capsys)
  assert code == 2 and "has changed" in err, err[-2000:]


def test_meta_training_resumes_bit_identically_after_a_kill(folders, tmp_path, monkeypatch):
  full = meta_train.train(tiny(folders, tmp_path / "full"))
  assert full["steps"] == 4 and full["steps_this_call"] == 4
  want = inits.read(meta_train.init_path(str(tmp_path / "full")))[0]
  # Ctrl-C (loop.INTERRUPTED, as the scripts' watcher sets it) after meta step 3: the loop checkpoints there and
  # stops; --resume redoes nothing before it and ends with the same init, bit for bit.
  cut = tiny(folders, tmp_path / "cut", checkpoint_every=4)
  interrupt_at_step(monkeypatch, meta_train, 3, meta_train.train, cut)
  assert inits.read(meta_train.init_path(cut.workdir))[1]["meta_steps"] == 3
  resumed = meta_train.train(dataclasses.replace(cut, resume=True))
  assert resumed["resumed_from"] == 3 and resumed["steps_this_call"] == 1
  got = inits.read(meta_train.init_path(cut.workdir))[0]
  assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
  assert resumed["val_psnr"] == full["val_psnr"]
  rows = open(os.path.join(cut.workdir, "progress.csv")).read().splitlines()
  assert [r.split(",")[0] for r in rows[1:]] == ["0", "1", "2", "3", "4"]
  # A finished run: its summary, nothing rewritten; changed settings refused as run.py refuses them.
  again = meta_train.train(dataclasses.replace(cut, resume=True))
  assert again["steps_this_call"] == 1
  with pytest.raises(data.InputError, match=r"settings differ .* tasks \(stored 2, now 3\)"):
    meta_train.train(dataclasses.replace(cut, resume=True, tasks=3))
  # The stored init serves run.py's net (resolved as run.py resolves --method=dip on gray images).
  net = config.apply_method("dip", cut.net, cut.fit, 1)[0]
  assert not leaves_equal(inits.load(meta_train.init_path(cut.workdir), net), meta_train.first_init(cut).params)


def test_meta_training_lowers_the_loss_at_a_fixed_step_count(folders, tmp_path):
  """A few Reptile steps on 16 px crops: the validation fit from the learned init ends (after val_steps) with a
  lower loss than the same fit from the random init it started at."""
  cfg = tiny(folders, tmp_path / "m", meta_steps=12, tasks=4, inner_steps=5, val_steps=5, val_every=12)
  cfg = dataclasses.replace(cfg, log_every=12, checkpoint_every=12)
  summary = meta_train.train(cfg)
  assert summary["val_loss"] < 0.9 * summary["val_loss_random_init"], summary
  assert summary["val_psnr"] > summary["val_psnr_random_init"] + 0.3, summary


def test_an_idip_init_meta_trains_on_ffdnet_x_bar_and_serves_idip_fits(folders, tmp_path):
  """--method=idip: each crop's x_bar from the official FFDNet at its own noise level is the fit's input and target;
  the init has IDIP's net (the complex connection, the image's channels as input) and run.py's idip loads it."""
  need_path(WEIGHTS)
  meta_init = import_experiment("meta_init")
  cfg = tiny(folders, tmp_path / "idip", method="idip", meta_steps=1, val_every=1, checkpoint_every=1, val_steps=1)
  summary = meta_train.train(cfg, meta_init.ffdnet_xbar(cfg))
  assert summary["method"] == "idip" and np.isfinite(summary["val_psnr"])
  net = config.apply_method("idip", cfg.net, cfg.fit, 1)[0]
  assert net.complex_connection and net.in_channels == 1
  inits.load(meta_train.init_path(cfg.workdir), net)  # IDIP's net: loads
  with pytest.raises(data.InputError, match="was made for another net"):
    inits.load(meta_train.init_path(cfg.workdir), config.apply_method("dip", cfg.net, cfg.fit, 1)[0])


def test_the_meta_flagfiles_parse_and_pass_the_settings_checks():
  """experiments/train/meta_{dip,idip}.flags: a header, then settings that meta_train.check accepts."""
  from absl import flags
  from conftest import ROOT

  for method in ("dip", "idip"):
    path = os.path.join(ROOT, "experiments", "train", f"meta_{method}.flags")
    assert open(path).readline().startswith("#")
    fv = flags.FlagValues()
    config.define_flags(fv, config_train.MetaConfig)
    fv(["meta_init.py", f"--flagfile={path}"])
    cfg = config.from_flags(fv, config_train.MetaConfig)
    meta_train.check(cfg, make_xbar=lambda *_: None)
    assert cfg.method == method and cfg.meta_steps == 300 and cfg.workdir == f"runs/train/meta_{method}"
