import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DATA, WEIGHTS, need_path, smooth_image, write_png
from test_cli import run_cli

from idip_jax import config, data, denoisers, prelim
from idip_jax.noise_level import estimate_sigma

PUBLISHED = {"ffdnet": {15: 32.75, 25: 30.43, 50: 27.32}, "dncnn": {15: 32.86, 25: 30.44, 50: 27.18}}


def test_pixel_shuffle_inverts_unshuffle_and_orders_like_matlab():
  x = jax.random.uniform(jax.random.key(0), (2, 8, 6, 3))
  sub = denoisers.pixel_unshuffle(x)
  assert sub.shape == (2, 4, 3, 12)
  np.testing.assert_array_equal(np.asarray(denoisers.pixel_shuffle(sub)), np.asarray(x))
  # channel 4*c + 2*dx + dy holds pixel (2i + dy, 2j + dx) of colour c
  np.testing.assert_array_equal(np.asarray(sub[0, 1, 2, 4 * 2 + 2 * 1 + 0]), np.asarray(x[0, 2, 5, 2]))


def test_ffdnet_scalar_sigma_equals_constant_map():
  model = denoisers.FFDNet((16, 16, 4), noise_channels=1)
  x = jax.random.uniform(jax.random.key(1), (2, 8, 8, 1))
  params = model.init(jax.random.key(2), x, jnp.array([25.0, 25.0]))
  a = model.apply(params, x, jnp.array([25.0, 50.0]))
  m = jnp.concatenate([jnp.full((1, 8, 8, 1), 25.0), jnp.full((1, 8, 8, 1), 50.0)])
  np.testing.assert_allclose(np.asarray(model.apply(params, x, m)), np.asarray(a), atol=1e-6)
  assert a.shape == x.shape


@pytest.mark.parametrize("batch_norm", [False, True])
def test_dncnn_is_residual(batch_norm):
  """One DnCNN for the official weights (BatchNorm folded: every conv has a bias) and for training
  (denoiser_train: BatchNorm after the middle convs, which then have no bias)."""
  model = denoisers.DnCNN((8, 8, 8, 1), batch_norm=batch_norm)
  x = jax.random.uniform(jax.random.key(1), (1, 8, 8, 1))
  variables = model.init(jax.random.key(2), x)
  params = variables["params"]
  norms = ["BatchNorm_0", "BatchNorm_1"] if batch_norm else []
  assert sorted(params) == norms + ["Conv_0", "Conv_1", "Conv_2", "Conv_3"]
  assert ("bias" in params["Conv_1"]) != batch_norm and "bias" in params["Conv_0"] and "bias" in params["Conv_3"]
  zero = {**variables, "params": jax.tree_util.tree_map(jnp.zeros_like, params)}
  np.testing.assert_array_equal(np.asarray(model.apply(zero, x)), np.asarray(x))


@pytest.mark.parametrize("name,sigma", [(n, s) for n in ("ffdnet", "dncnn") for s in (15, 25, 50)])
def test_published_set12_psnr(name, sigma):
  """Set12, AWGN on [0, 1] images (seeded per image name), PSNR on clipped output: within
  0.10 dB of the papers' means at sigma 15/25/50 (one case each, so the suite's workers share them)."""
  need_path(os.path.join(DATA, "Set12"))
  need_path(WEIGHTS)
  ref = PUBLISHED[name][sigma]
  images = data.load_images(os.path.join(DATA, "Set12"), sigma, noise_seed=0)
  out = prelim.make(prelim.XbarSpec(config.PrelimConfig(name), sigma), images)
  psnr = np.mean([-10 * np.log10(np.mean((np.clip(o, 0, 1) - im.clean_HxWxC) ** 2)) for o, im in zip(out, images)])
  assert abs(psnr - ref) < 0.10, (name, sigma, psnr, ref)


def test_noise_level_estimator_on_set12():
  """Chen et al. 2015 on Set12: mean absolute error (0-255 scale) measured 1.97 / 0.95 /
  0.57 / 0.62 at sigma 5 / 15 / 25 / 50 (it over-estimates on texture at low sigma)."""
  need_path(os.path.join(DATA, "Set12"))
  bound = {5: 2.5, 15: 1.2, 25: 0.8, 50: 0.9}
  for sigma, tol in bound.items():
    images = data.load_images(os.path.join(DATA, "Set12"), sigma, noise_seed=0)
    err = np.mean([abs(estimate_sigma(im.noisy_HxWxC) - sigma) for im in images])
    assert err < tol, (sigma, err)
  # and it picks the DnCNN model trained nearest to the estimate
  assert os.path.basename(denoisers.dncnn_path("", 23.0)) == "dncnn_sigma25.mat"
  assert os.path.basename(denoisers.dncnn_path("", 48.0)) == "dncnn_sigma50.mat"
  assert os.path.basename(denoisers.dncnn_path("", 30.0)) == "dncnn_gray_blind.mat"


def test_bad_weight_files_one_line(tmp_path, capsys):
  need_path(WEIGHTS)
  img = write_png(str(tmp_path / "a.png"), smooth_image(64, 64))
  text = tmp_path / "text.mat"
  text.write_text("not a weight file")
  trunc = tmp_path / "trunc.mat"
  trunc.write_bytes(open(os.path.join(WEIGHTS, "ffdnet", "FFDNet_gray.mat"), "rb").read()[:5000])
  cases = {
    "missing": (["--weights=" + str(tmp_path / "none.mat")], "not found"),
    "missing dir": (["--weights_dir=" + str(tmp_path / "nowhere")], "not found"),
    "text": (["--weights=" + str(text)], "not a MATLAB v7.3"),
    "truncated": (["--weights=" + str(trunc)], "truncated"),
    "dncnn as ffdnet": (["--weights=" + os.path.join(WEIGHTS, "dncnn", "dncnn_sigma25.mat")], "DNCNN file"),
  }
  for what, (extra, needle) in cases.items():
    wd = tmp_path / ("wd" + what.replace(" ", "_"))
    code, err = run_cli(
      ["--input=" + img, "--sigma=25", "--prelim=ffdnet", "--method=idip", "--workdir=" + str(wd)] + extra, capsys
    )
    lines = err.strip().splitlines()
    assert code != 0 and len(lines) == 1 and needle in lines[0], (what, err)
    assert not wd.exists()
  code, err = run_cli(
    [
      "--input=" + img,
      "--sigma=25",
      "--prelim=dncnn",
      "--workdir=" + str(tmp_path / "x"),
      "--weights=" + os.path.join(WEIGHTS, "ffdnet", "FFDNet_gray.mat"),
    ],
    capsys,
  )
  assert code != 0 and "FFDNET file" in err


def test_idip_with_ffdnet_flagfile_end_to_end(tmp_path, capsys):
  """experiments/idip_ffdnet.flags on a 64x64 crop of one classic10 image, a few steps."""
  need_path(WEIGHTS)
  house = need_path(os.path.join(DATA, "classic10", "house.png"))
  from conftest import ROOT

  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    code, err = run_cli(
      [
        "--flagfile=experiments/idip_ffdnet.flags",
        "--input=" + house,
        "--crop=64",
        "--steps=20",
        "--chunk=10",
        "--workdir=" + str(tmp_path / "w"),
      ],
      capsys,
    )
  finally:
    os.chdir(cwd)
  assert code == 0, err
  import json

  r = json.loads((tmp_path / "w" / "results.json").read_text())
  assert r["prelim"] == "ffdnet"
  im = r["images"][0]
  assert im["psnr_prelim"] > im["psnr_noisy"] + 5 and im["psnr_final"] > im["psnr_noisy"] + 3
