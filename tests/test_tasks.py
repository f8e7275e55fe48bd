"""Inpainting and super-resolution in the same engine (--task)."""

import dataclasses

import imageio.v3 as iio
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import NET, TINY_ARGS, smooth_image, write_png
from test_cli import run_cli
from test_fit import take

from idip_jax import config, fit, tasks, train

NET3 = dataclasses.replace(NET, complex_connection=False)


def test_downsampler_matches_a_reference_lanczos_resize():
  """DIP's Lanczos2 downsampler (phase 1/2, replicate padding) against PIL's Lanczos resize (the
  resize DIP uses to make the LR image; Lanczos3, so not the same filter): they agree to 0.02 at
  most and 0.003 on average on a smooth image with an edge. (Against the official PyTorch
  Downsampler the port agrees to 5e-7: measured with its code, not vendored here.)"""
  x = smooth_image(64, 48, 3, seed=4)
  ours = np.asarray(tasks.downsample(jnp.asarray(x), 4))
  ref = tasks.lanczos_resize(x, 16, 12)
  assert ours.shape == ref.shape == (16, 12, 3)
  err = np.abs(ours - ref)
  assert err.max() < 0.02 and err.mean() < 0.003, (err.max(), err.mean())
  k = tasks.lanczos_kernel(4)
  assert k.shape == (16, 16) and abs(k.sum() - 1) < 1e-6 and np.allclose(k, k.T) and np.allclose(k, k[::-1])
  # A constant image stays constant (the kernel sums to 1, the padding replicates the edge).
  np.testing.assert_allclose(np.asarray(tasks.downsample(jnp.full((32, 32, 1), 0.3), 4)), 0.3, atol=1e-6)


def inpaint_batch(images, keys, cfg):
  masks = np.stack([tasks.bernoulli_mask(32, 32, 0.5, 0, f"im{i}") for i in range(len(images))])
  ys = np.stack(images) * masks
  return fit.make_batch(
    NET3, cfg, keys, ys, clean_NxHxWxC=np.stack(images), mask_NxHxWx1=np.ones_like(masks), loss_mask_NxHxWx1=masks
  )


CFG = fit.for_backend(NET3, config.FitConfig(steps=6, chunk=3, seed=1, lr=3e-3, prelim_weight=0.0), "cpu")[1]


def test_inpainting_loss_ignores_the_missing_pixels():
  cfg = dataclasses.replace(CFG, task="inpaint")
  keys = [train.run_keys(0, 0)]
  clean = smooth_image(32, 32, 1, seed=2)
  batch = inpaint_batch([clean], keys, cfg)
  # Garbage where the mask is 0: the loss, its gradients and the next state do not change.
  other = batch.replace(noisy=jnp.where(batch.loss_mask > 0, batch.noisy, 7.0))
  model, tx = train.make_model(NET3, cfg), train.make_optimizer(cfg)
  states, noise = fit.init_runs(NET3, cfg, keys, 32, 32)
  step = jax.jit(jax.vmap(lambda s, b, k: train.train_step(model, tx, cfg, s, b, k)))
  (a, ma), (b, mb) = step(states, batch, noise), step(states, other, noise)
  assert float(ma["loss"][0]) == float(mb["loss"][0])
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # ...while a change on an observed pixel does change it.
  third = batch.replace(noisy=jnp.where(batch.loss_mask > 0, 1 - batch.noisy, batch.noisy))
  assert float(step(states, third, noise)[1]["loss"][0]) != float(ma["loss"][0])


def sr_batch(images, keys, cfg):
  lr = np.stack([np.asarray(tasks.downsample(jnp.asarray(x), 4)) for x in images])
  return fit.make_batch(
    NET3,
    cfg,
    keys,
    lr,
    clean_NxHxWxC=np.stack(images),
    mask_NxHxWx1=np.ones((len(images), 32, 32, 1), np.float32),
    loss_mask_NxHxWx1=np.ones((*lr.shape[:3], 1), np.float32),
  )


@pytest.mark.parametrize("task", ["inpaint", "sr"])
def test_batched_fits_equal_single_fits(task):
  # CI runs this session crashed (segfault) in XLA:CPU's compile of the single fit below after other tests
  # in the same worker; start from empty in-memory compile caches.
  jax.clear_caches()
  cfg = dataclasses.replace(CFG, task=task)
  images = [smooth_image(32, 32, 1, seed=s) for s in range(3)]
  keys = [train.run_keys(cfg.seed, k) for k in range(3)]
  batch = (inpaint_batch if task == "inpaint" else sr_batch)(images, keys, cfg)
  together = fit.fit(NET3, cfg, batch, keys)
  for i in range(3):
    alone = fit.fit(NET3, cfg, take(batch, i), keys[i : i + 1])
    np.testing.assert_allclose(together.history["loss"][:, i], alone.history["loss"][:, 0], atol=2e-6)
    assert np.abs(together.final_NxHxWxC[i] - alone.final_NxHxWxC[0]).max() < 2e-3
  loss = together.history["loss"]
  assert (loss[-1] < loss[0]).all()  # the fit of y through A does fit


def test_task_inputs_are_checked_before_any_compute(tmp_path, capsys):
  img = write_png(str(tmp_path / "a.png"), smooth_image(32, 32, 1, seed=1))
  small = np.zeros((16, 16), np.uint8)
  iio.imwrite(tmp_path / "small_mask.png", small + 255)
  grey = np.full((32, 32), 255, np.uint8)
  grey[0, 0] = 128
  iio.imwrite(tmp_path / "grey_mask.png", grey)
  iio.imwrite(tmp_path / "zero_mask.png", np.zeros((32, 32), np.uint8))
  write_png(str(tmp_path / "odd.png"), smooth_image(34, 34, 1, seed=1))
  cases = {
    "mask of the wrong size": (["--task=inpaint", f"--mask={tmp_path / 'small_mask.png'}"], "is 16x16"),
    "mask not binary": (["--task=inpaint", f"--mask={tmp_path / 'grey_mask.png'}"], "not binary"),
    "mask all zeros": (["--task=inpaint", f"--mask={tmp_path / 'zero_mask.png'}"], "all zeros"),
    "bad bernoulli": (["--task=inpaint", "--mask=bernoulli:0"], "kept fraction"),
    "missing mask": (["--task=inpaint", f"--mask={tmp_path / 'nope.png'}"], "no such file"),
    "sr not divisible": (["--task=sr", "--nosr_crop", f"--input={tmp_path / 'odd.png'}"], "not divisible by the SR"),
    "sr with noise": (["--task=sr", "--sigma=25"], "--sigma"),
    "sr with x_bar": (["--task=sr", "--method=idip", "--prelim=bm3d"], "--method=dip or idip1"),
    "unknown task": (["--task=deblur"], "task"),
    "bicubic x_bar without sr": (["--prelim=bicubic"], "set --task=sr"),
  }
  for what, (args, needle) in cases.items():
    wd = tmp_path / ("wd_" + what.replace(" ", "_"))
    argv = ["--method=dip", f"--input={img}", "--steps=2", f"--workdir={wd}"] + TINY_ARGS + args
    code, err = run_cli(argv, capsys)
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (what, err)
    assert not wd.exists(), what
