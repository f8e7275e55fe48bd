"""Deep Random Projector (Li et al., CVPR 2023) as settings of the one engine: --train picks what a fit trains
(DRP: the input's offset through its own BatchNorm, and the BatchNorms; the convolutions stay as initialised),
--data_loss=rmse and --tv_weight its loss, --input_dist=normal its seed."""

import dataclasses
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import NET, smooth_image
from test_fit import make_batch, states_and_step, take

from idip_jax import config, fit, metrics, train
from idip_jax.data import InputError

# DRP's net is the skip net at one scale (their denoising script: num_scales=1); the suite's tiny width.
DRP_NET = dataclasses.replace(NET, scales=1, complex_connection=False)
DRP = fit.for_backend(
  DRP_NET,
  config.FitConfig(
    steps=6,
    chunk=3,
    lr=0.1,
    train=("seed", "norms"),
    data_loss="rmse",
    tv_weight=0.45,
    input_dist="normal",
    reg_noise_std=0.0,
    prelim_weight=0.0,
  ),
  "cpu",
)[1]


def flat(params) -> dict:
  return {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}


@pytest.fixture(scope="module")
def two():
  return make_batch([smooth_image(32, 32, 1, seed=s) for s in range(2)], DRP_NET, DRP)


def test_drp_trains_the_seed_and_norms_and_leaves_every_weight_bit_identical(two):
  batch, keys = two
  states, noise, step = states_and_step(DRP, keys, net_cfg=DRP_NET)
  before = flat(jax.device_get(states.params))
  assert {k.split("/")[0] for k in before} == {"net", "seed", "seed_norm"}
  assert before["seed"].shape == (2, 32, 32, DRP_NET.in_channels) and not before["seed"].any()
  for _ in range(3):
    states, m = step(states, batch, noise)
  after = flat(jax.device_get(states.params))
  weights = [k for k in before if train.param_group(tuple(jax.tree_util.DictKey(p) for p in k.split("/"))) == "weights"]
  norms = [k for k in before if k.startswith("net/") and k not in weights]
  assert weights and norms and any(k.endswith("kernel") for k in weights)
  for k in weights:  # frozen: not one bit moved
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)
  for k in norms + ["seed", "seed_norm/scale", "seed_norm/bias"]:  # trained: every one moved
    assert np.abs(after[k] - before[k]).max() > 0, k
  assert np.isfinite(np.asarray(m["loss"])).all()


def test_drp_loss_is_root_mse_plus_tv_of_the_output(two):
  """One step's loss: sqrt(MSE(out, y)) + w TV(out), out the net's output on BatchNorm(z + offset)."""
  batch, keys = two
  model = train.make_model(DRP_NET, DRP)
  states, noise, step = states_and_step(DRP, keys, net_cfg=DRP_NET)
  params = jax.tree_util.tree_map(lambda a: a[0], states.params)
  b = take(batch, 0)
  out = train.apply_net(model, DRP, params, b.net_input[0])
  want = jnp.sqrt(metrics.masked_mse(out, b.noisy[0], b.mask[0])) + 0.45 * metrics.masked_tv(out, b.mask[0])
  _, m = step(states, batch, noise)
  assert float(m["loss"][0]) == pytest.approx(float(want), rel=1e-5)
  # TV of a constant image is 0; of a unit step across the middle, one jump per row over the pixels.
  flat_img, mask = jnp.full((8, 8, 1), 0.3), jnp.ones((8, 8, 1))
  assert float(metrics.masked_tv(flat_img, mask)) == 0.0
  edge = flat_img.at[:, 4:].set(1.3)
  assert float(metrics.masked_tv(edge, mask)) == pytest.approx(8 / 64)


def test_a_deterministic_step_that_diverged_retries_at_half_the_step(two):
  """Without input noise (DRP) a backtracked step would retry the same update from the same state and backtrack
  every other step from then on; it retries at half the step (the run's lr_scale); the other run keeps its full step.
  A step with a perturbed input retries on a new draw at the full step (the official notebook's rule)."""
  assert train.retry_scale(DRP) == 0.5 and train.retry_scale(config.FitConfig()) == 1.0
  batch, keys = two
  s0, noise, step = states_and_step(DRP, keys, net_cfg=DRP_NET)
  s1, _ = step(s0, batch, noise)
  # Run 0's next step is judged a divergence (its last good PSNR(out, y) set out of reach).
  s2, m = step(s1.replace(good_psnr_y=s1.good_psnr_y.at[0].set(1e3)), batch, noise)
  assert list(np.asarray(m["backtracked"])) == [True, False]
  assert list(np.asarray(s2.lr_scale)) == [0.5, 1.0]
  # The retry: the same gradient and Adam moments (restored), half the update.
  s3, m = step(s2.replace(good_psnr_y=s2.good_psnr_y.at[0].set(-jnp.inf)), batch, noise)
  assert not np.asarray(m["backtracked"]).any()
  p0, p1, p3 = (flat(jax.device_get(s.params)) for s in (s0, s1, s3))
  for k in ("seed", "seed_norm/scale", "net/ImageNorm_0/scale"):
    full = p1[k][0] - p0[k][0]
    assert np.abs(full).max() > 1e-3, k
    np.testing.assert_allclose(p3[k][0] - p0[k][0], 0.5 * full, atol=1e-6, err_msg=k)


@pytest.mark.fusion_emitters
def test_batched_drp_equals_single_drp_fits(two):
  batch, keys = two
  batched = fit.fit(DRP_NET, DRP, batch, keys)
  for i in range(2):
    single = fit.fit(DRP_NET, DRP, take(batch, i), keys[i : i + 1])
    np.testing.assert_allclose(batched.history["loss"][:, i], single.history["loss"][:, 0], atol=2e-6)
    np.testing.assert_allclose(batched.final_NxHxWxC[i], single.final_NxHxWxC[0], atol=1e-4)
  assert batched.history["psnr"][-1].min() > 15  # it fits


def test_frozen_weights_with_x_bar_as_input_train_only_the_norms():
  """DRP's frozen weights on IDIP (x_bar as the input, --train=norms): the state has no seed, the convolutions
  and the complex connection's FC stay as initialised."""
  cfg = dataclasses.replace(DRP, train=("norms",), input_is_prelim=True, data_loss="mse", tv_weight=0.0)
  net = dataclasses.replace(NET, in_channels=1)  # x_bar's channels
  batch, keys = make_batch([smooth_image(32, 32, 1, seed=5)], net, cfg)
  states, noise, step = states_and_step(cfg, keys, net_cfg=net)
  before = flat(jax.device_get(states.params))
  assert not any(k.startswith("seed") for k in before)
  states, _ = step(states, batch, noise)
  after = flat(jax.device_get(states.params))
  moved = {k for k in before if np.abs(after[k] - before[k]).max() > 0}
  assert moved and all("ImageNorm" in k for k in moved) and any("Dense" in k for k in before)


def test_time_to_psnr_reads_seconds_to_dips_best_from_the_histories():
  """experiments/speed/time_to_psnr.py's summary on made-up histories: DIP peaks at 32 dB at step 100
  (0.5 s/step: 50 s), DRP passes 32 dB at step 40 (0.1 s/step: 4 s): 12.5x; PSNR at 30 s per method."""
  from absl import flags
  from conftest import import_experiment

  ttp = import_experiment("time_to_psnr")
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["time_to_psnr.py"])
  steps = [20, 40, 60, 80, 100, 120]
  fits = {
    "DIP": {"a": {"steps": steps, "psnr": [25, 28, 30, 31, 32, 31.5], "seconds_per_step": 0.5, "compile_seconds": 9}},
    "DRP": {"a": {"steps": steps, "psnr": [30, 32.5, 33, 33, 33, 33], "seconds_per_step": 0.1, "compile_seconds": 2}},
  }
  fits["DRP"]["a"]["psnr_ema"] = [20, 30, 33.5, 33.2, 33.1, 33.0]
  dip, drp = ttp.summarize(fits, 30.0)
  assert ttp.job_name() == "holdout9_s25_64" and dip["task"] == "denoise"
  flags.FLAGS(["time_to_psnr.py", "--ttp_task=inpaint", "--ttp_set=heide11"])
  assert ttp.job_name() == "heide11_inpaint_64" and ttp.what({"task": "sr", "sigma": 25}) == "x4 super-resolution"
  flags.FLAGS.unparse_flags()
  assert dip["seconds_to_dip_best"] == 50.0 and dip["speedup_vs_dip"] == 1.0 and dip["psnr_at_30s"] == 30
  assert drp["seconds_to_dip_best"] == pytest.approx(4.0) and drp["steps_to_dip_best"] == 40
  assert drp["speedup_vs_dip"] == pytest.approx(12.5) and drp["psnr_at_30s"] == 33
  assert drp["best_psnr_ema"] == 33.5 and drp["final_psnr_ema"] == 33.0 and drp["final_psnr"] == 33
  assert dip["best_psnr_ema"] is None and dip["final_psnr"] == 31.5  # no EMA curve: none reported
  assert "| 33.00 / 33.00 | 33.50 |" in ttp.markdown(
    dict(
      command="c", device="d", commit="x", date="t", set="s", sigma=25, size=64, budget=30.0, steps={}, summary=[drp]
    )
  )
  # A fit reused from a finished job of an earlier commit is named in the markdown with its own commit and date.
  ran = {"DIP": {"commit": "0ld0000aaaa", "date": "2026-01-01"}, "DRP": {"commit": "new1111bbbb", "date": "2026-02-02"}}
  said = ttp.reused({"commit": "new1111bbbb", "fits_ran_at": ran})
  assert "DIP at 0ld0000 (2026-01-01)" in said and "DRP" not in said and ttp.reused({"commit": "x"}) == ""


def test_time_to_psnr_reuses_a_finished_fit_only_of_the_same_job_and_inputs(tmp_path):
  """A finished fit in the method's folder is read, not refitted, while its settings and every input image are
  the same; a changed image (same name, other pixels) or another step count is fitted again."""
  from conftest import import_experiment, write_png

  from idip_jax import runner

  ttp = import_experiment("time_to_psnr")
  (tmp_path / "in").mkdir()
  write_png(str(tmp_path / "in" / "a.png"), smooth_image(16, 16, 1, seed=1))
  net = dataclasses.replace(NET, in_channels=4, complex_connection=False)
  fit_cfg = dataclasses.replace(config.FitConfig(), steps=2, chunk=2, eval_every=1)
  cfg = config.RunConfig(
    input=str(tmp_path / "in"),
    workdir=str(tmp_path / "w"),
    method="dip",
    sigma=25.0,
    image_channels=1,
    net=net,
    fit=fit_cfg,
  )
  assert ttp.reusable(cfg, runner.load_inputs(cfg)) is None  # nothing fitted yet
  runner.run(cfg)
  assert ttp.reusable(cfg, runner.load_inputs(cfg))["images"][0]["name"] == "a"
  assert (
    ttp.reusable(dataclasses.replace(cfg, fit=dataclasses.replace(fit_cfg, steps=3)), runner.load_inputs(cfg)) is None
  )
  write_png(str(tmp_path / "in" / "a.png"), smooth_image(16, 16, 1, seed=2))
  assert ttp.reusable(cfg, runner.load_inputs(cfg)) is None
  # --ttp_reuse_only: a fit that would have to run is an error, not a fit.
  from absl import flags

  flags.FLAGS.unparse_flags()
  flags.FLAGS(["time_to_psnr.py", "--ttp_reuse_only", f"--ttp_workdir={tmp_path}/w2", "--ttp_crop=16"])
  try:
    with pytest.raises(InputError, match="--ttp_reuse_only: .* holds no finished fit of DRP"):
      ttp.fit_method("DRP", 2, str(tmp_path / "in"))  # one scale: a 16 px image is enough
  finally:
    flags.FLAGS.unparse_flags()
  assert not os.path.exists(tmp_path / "w2")


def test_time_to_psnr_picks_images_by_name_and_refuses_one_not_in_the_set(tmp_path, monkeypatch, capsys):
  from absl import flags
  from conftest import import_experiment, write_png

  ttp = import_experiment("time_to_psnr")
  (tmp_path / "data" / "holdout9").mkdir(parents=True)
  for name in ("a", "b", "c"):
    write_png(str(tmp_path / "data" / "holdout9" / f"{name}.png"), smooth_image(16, 16, 1, seed=1))
  monkeypatch.setenv("IDIP_SHARED", str(tmp_path))
  folder = str(tmp_path / "data" / "holdout9")
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["time_to_psnr.py", "--ttp_images=c,a", "--ttp_crop=256"])
  assert [os.path.basename(p) for p in ttp.selected_inputs(folder)] == ["c.png", "a.png"]
  assert ttp.job_name() == "holdout9_s25_256_c_a"
  flags.FLAGS.unparse_flags()
  flags.FLAGS(["time_to_psnr.py", "--ttp_max_images=2"])
  assert [os.path.basename(p) for p in ttp.selected_inputs(folder)] == ["a.png", "b.png"]
  flags.FLAGS.unparse_flags()
  before = sorted(os.listdir(tmp_path))
  code = ttp.entry(["time_to_psnr.py", "--ttp_images=nope", f"--ttp_workdir={tmp_path}/w", f"--ttp_out={tmp_path}/o"])
  flags.FLAGS.unparse_flags()
  err = capsys.readouterr().err
  assert code == 2 and "--ttp_images: nope is not an image of" in err and sorted(os.listdir(tmp_path)) == before
