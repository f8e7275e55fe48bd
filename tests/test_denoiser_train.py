"""Training DnCNN (supervised) and Noise2Noise in JAX, checkpoints, use as x_bar; on the
fits' loop (loop.run) and checkpoints (checkpoint.py), with denoisers.DnCNN."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, interrupt_at_step, smooth_image, write_png

from idip_jax import config_train, data, denoiser_train


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """Six small synthetic gray training images (and validation images: the same folder)."""
  d = tmp_path_factory.mktemp("train")
  for s in range(6):
    write_png(str(d / f"im{s}.png"), smooth_image(48, 48, 1, seed=s))
  return str(d)


def tiny(folder, workdir, **kw):
  return config_train.TrainConfig(
    **{
      **dict(train_dir=folder, val_dir=folder, workdir=str(workdir), depth=3, width=8, patch=16, batch=4, steps=6),
      **dict(log_every=2, eval_every=2, checkpoint_every=2, val_images=2, val_crop=32, lr=1e-2),
      **kw,
    }
  )


def test_one_step_lowers_the_loss_on_its_batch(folder, tmp_path):
  cfg = tiny(folder, tmp_path / "w", batch=8)
  images = jnp.asarray(denoiser_train.load_training_images(cfg))
  model, tx = denoiser_train.make_dncnn(cfg), denoiser_train.make_dncnn_optimizer(cfg)
  key = jax.random.key(0)
  state0 = denoiser_train.create_train_state(cfg, key)
  batch = denoiser_train.sample_batch(cfg, images, jax.random.fold_in(key, 0))  # the batch of step 0

  def loss(state):
    out, _ = model.apply(
      {"params": state.params, "batch_stats": state.batch_stats}, batch["input"], train=True, mutable=["batch_stats"]
    )
    return float(jnp.mean(jnp.square(out - batch["target"])))

  state1, m = denoiser_train.dncnn_step(model, tx, cfg, state0, images, key)
  assert float(m["loss"]) == pytest.approx(loss(state0), rel=1e-5)  # the step trained on that batch
  assert loss(state1) < 0.97 * loss(state0)  # 8% lower measured (lr 1e-2, batch 8)
  assert int(state1.step) == 1


@pytest.mark.parametrize("target", ["clean", "noisy"])
def test_targets_clean_or_an_independent_noisy_draw(folder, tmp_path, target):
  cfg = tiny(folder, tmp_path / "w", batch=256, target=target, sigma=25.0)
  images = jnp.asarray(denoiser_train.load_training_images(cfg))
  b = denoiser_train.sample_batch(cfg, images, jax.random.key(3))
  n_in = np.asarray(b["input"] - b["clean"]).ravel()
  assert np.std(n_in) == pytest.approx(25 / 255, rel=0.03)
  if target == "clean":
    np.testing.assert_array_equal(np.asarray(b["target"]), np.asarray(b["clean"]))
  else:
    n_tgt = np.asarray(b["target"] - b["clean"]).ravel()
    assert np.std(n_tgt) == pytest.approx(25 / 255, rel=0.03)
    assert abs(np.corrcoef(n_in, n_tgt)[0, 1]) < 0.02  # independent draws (65k samples: |r| ~ 0.004)
  # patches differ (random places and augmentations), and are patches of the training images
  assert np.asarray(b["clean"]).std(axis=0).mean() > 0.01 and b["clean"].shape == (256, 16, 16, 1)


def test_blind_training_draws_a_level_per_patch(folder, tmp_path):
  cfg = tiny(folder, tmp_path / "w", batch=64, sigma=0.0, sigma_max=55.0)
  images = jnp.asarray(denoiser_train.load_training_images(cfg))
  b = denoiser_train.sample_batch(cfg, images, jax.random.key(4))
  per_patch = np.asarray(b["input"] - b["clean"]).reshape(64, -1).std(axis=1) * 255
  assert per_patch.min() < 15 and per_patch.max() > 40 and per_patch.max() < 60


def test_checkpoint_resumes_bit_identically_and_loads_as_x_bar(folder, tmp_path, monkeypatch):
  cfg = tiny(folder, tmp_path / "run")
  summary = denoiser_train.train(cfg)
  assert summary["steps"] == 6 and np.isfinite(summary["val_psnr"])
  like = denoiser_train.create_train_state(cfg, jax.random.key(0))
  full = denoiser_train.restore(cfg.workdir, like)
  assert int(full.step) == 6
  rows = open(os.path.join(cfg.workdir, "progress.csv")).read().splitlines()
  assert rows[0].split(",")[:3] == ["step", "loss", "train_psnr"] and len(rows) == 4
  # Ctrl-C (loop.INTERRUPTED, as run.py's watcher sets it) during steps 3-4: the loop checkpoints at step 4
  # (checkpoint_every is 2, so step 4 is also due) and stops; --resume redoes nothing before it.
  cut = dataclasses.replace(cfg, workdir=str(tmp_path / "cut"), checkpoint_every=6)
  interrupt_at_step(monkeypatch, denoiser_train, 4, denoiser_train.train, cut)
  assert int(denoiser_train.restore(cut.workdir, like).step) == 4  # saved on Ctrl-C (no multiple of 6 yet)
  resumed = denoiser_train.train(dataclasses.replace(cut, resume=True))
  assert resumed["resumed_from"] == 4 and resumed["steps_this_call"] == 2
  # --resume of the finished run: its stored summary, nothing trained and no file rewritten (it rewrote
  # summary.json with a null validation PSNR); changed settings are refused as run.py refuses them.
  stored = {n: open(os.path.join(cut.workdir, n), "rb").read() for n in ("summary.json", "progress.csv")}
  again = denoiser_train.train(dataclasses.replace(cut, resume=True))
  assert again["val_psnr"] == pytest.approx(resumed["val_psnr"]) and again["steps_this_call"] == 2
  assert stored == {n: open(os.path.join(cut.workdir, n), "rb").read() for n in stored}
  with pytest.raises(data.InputError, match=r"settings differ .* sigma \(stored 25.0, now 50.0\)"):
    denoiser_train.train(dataclasses.replace(cut, resume=True, sigma=50.0))
  again = denoiser_train.restore(cut.workdir, like)
  for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert len(open(os.path.join(cut.workdir, "progress.csv")).read().splitlines()) == 4  # rows 5-6 once
  assert os.path.getsize(os.path.join(cfg.workdir, "progress.png")) > 1000
  # The trained net as x_bar: BatchNorm on its running statistics.
  fn = denoiser_train.load_denoiser(cfg.workdir, 1)
  noisy = data.add_awgn(smooth_image(32, 32, 1, seed=9), 25, 0, "x")[None]
  want = denoiser_train.make_denoise(denoiser_train.make_dncnn(cfg))(full.params, full.batch_stats, jnp.asarray(noisy))
  np.testing.assert_allclose(np.asarray(fn(jnp.asarray(noisy))), np.asarray(want), atol=1e-6)
  with pytest.raises(data.InputError, match="for 1-channel images, the input has 3"):
    denoiser_train.load_denoiser(cfg.workdir, 3)


def test_train_flagfiles_parse_and_bad_settings_are_one_line():
  import subprocess
  import sys

  script = os.path.join(ROOT, "experiments", "train_denoiser.py")
  for f in ("dncnn_s25", "n2n_s25"):
    path = os.path.join(ROOT, "experiments", "train", f + ".flags")
    assert open(path).readline().startswith("#")
  p = subprocess.run(
    [sys.executable, script, "--flagfile=experiments/train/n2n_s25.flags", "--target=both"],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith("error:"), p.stderr[-500:]
  p = subprocess.run(
    [sys.executable, script, "--train_dir=/nonexistent", "--workdir=/tmp/x_never_made"],
    cwd=ROOT,
    capture_output=True,
    text=True,
  )
  assert p.returncode == 2 and "--train_dir=/nonexistent" in p.stderr and not os.path.exists("/tmp/x_never_made")
