"""SURE along a fit from a twin run fitted to y + eps b (--stop=sure), and
NAME_sure.png, the SURE blend of the fit with the x_bar candidates."""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import NET, TINY_ARGS, import_experiment, smooth_image, write_png
from test_cli import run_cli

from idip_jax import config, data, fit, results, sure, sure_fit, sure_twins, train

SIGMA = 25 / 255
# lr 3e-3: batched and single fits agree to ~1e-6 over 10 steps (test_fit.py), so a pair's SURE can
# be compared with the same SURE computed from two separate fits.
CFG = fit.for_backend(
  NET,
  config.FitConfig(steps=10, chunk=5, seed=3, lr=3e-3, prelim_weight=0.0, eval_every=2, stop="sure"),
  "cpu",
)[1]


def pair_batch(cfg, clean, ys, probe, eps):
  """One run's rows: y and its twins (y + eps b, and for --sure_diff=central y - eps b); probe: every row's, or a
  list of the rows' probes."""
  n = len(ys)
  keys = [train.run_keys(cfg.seed, 0)] * n
  batch = fit.make_batch(NET, cfg, keys, np.stack(ys), clean_NxHxWxC=np.stack([clean] * n))
  probes = np.stack(probe if isinstance(probe, list) else [probe] * n)
  extra = dict(probe=jnp.asarray(probes), sure_eps=jnp.full((n,), eps), sure_sigma=jnp.full((n,), SIGMA))
  return batch.replace(**extra), keys


@pytest.fixture(scope="module")
def image():
  clean = smooth_image(32, 32, 1, seed=4)
  y = data.add_awgn(clean, 25.0, 0, "im")
  return clean, y, sure_fit.probe_for("im", y.shape)


@pytest.mark.fusion_emitters
def test_twin_without_perturbation_fits_the_same_run(image):
  """A twin fitted to y itself repeats its run bit for bit, so the divergence is 0 and SURE is
  |y - f|^2 / N - sigma^2 (a pair whose rows drift apart would show a nonzero divergence)."""
  clean, y, b = image
  batch, keys = pair_batch(CFG, clean, [y, y], b, 0.1)
  res = fit.fit(NET, CFG, batch, keys)
  np.testing.assert_array_equal(res.history["loss"][:, 0], res.history["loss"][:, 1])
  np.testing.assert_array_equal(res.last_NxHxWxC[0], res.last_NxHxWxC[1])
  assert res.sure_N["div"][0] == 0.0
  mse = float(np.mean((y - res.last_NxHxWxC[0]) ** 2)) - SIGMA**2
  assert res.history["sure_psnr"][-1, 0] == pytest.approx(sure.psnr_of_mse(mse), abs=1e-3)


@pytest.mark.parametrize(
  "loop,diff,k", [("host", "forward", 1), ("scan", "forward", 1), ("host", "central", 1), ("host", "forward", 2)]
)
def test_group_sure_equals_sure_from_separate_fits(image, loop, diff, k):
  """The in-device arithmetic (sure_fit.track) against sure.sure on the outputs of y, y + eps b_k
  (and y - eps b_k) fitted alone, the divergence the mean over the K twins (--sure_twins); --stop=sure
  reports the output at the eval step of highest SURE PSNR."""
  clean, y, _ = image
  cfg = dataclasses.replace(CFG, loop=loop, sure_diff=diff, sure_twins=k)
  eps = SIGMA  # --sure_eps=1: the twins are far apart, the divergence large next to rounding
  b = [sure_fit.probe_for("im", y.shape, j) for j in range(k)]
  signs = (1, -1) if diff == "central" else (1,)
  ys = [y] + [y + s * eps * bj for s in signs for bj in b]
  probes = sure_fit.row_probes("im", y.shape, cfg)
  assert probes[0] == pytest.approx(sum(b)) and len(ys) == sure_fit.rows_per_run(cfg)
  batch, keys = pair_batch(cfg, clean, ys, probes, eps)
  res = fit.fit(NET, cfg, batch, keys)
  alone = dataclasses.replace(cfg, stop="fixed", sure_diff="forward", sure_twins=1)  # one program per loop
  f, *twins = (
    fit.fit(NET, alone, fit.make_batch(NET, alone, keys[:1], x[None]), keys[:1]).final_NxHxWxC[0] for x in ys
  )
  if diff == "forward":
    div = np.mean([float(np.sum(bj * (t - f))) / eps for bj, t in zip(b, twins)])
  else:
    div = float(np.sum(b[0] * (twins[0] - twins[1]))) / (2 * eps)
  expect = sure.sure(y, f, SIGMA, div)
  got = res.history["sure_psnr"][-1]
  assert np.all(got == got[0])  # the twins' rows carry their run's value
  assert got[0] == pytest.approx(sure.psnr_of_mse(expect), abs=2e-3)
  evals = np.flatnonzero(~np.isnan(res.history["sure_psnr"][:, 0]))
  assert list(evals + 1) == list(range(2, 11, 2))
  best = evals[np.argmax(res.history["sure_psnr"][evals, 0])]
  assert res.stop_step_N[0] == best + 1
  # The reported image is the output at that step: its PSNR is the history's there.
  assert results.psnr(res.final_NxHxWxC[0], clean) == pytest.approx(res.history["psnr"][best, 0], abs=1e-4)
  assert res.sure_N["mse"][0] == pytest.approx(10 ** (-res.history["sure_psnr"][best, 0] / 10), rel=1e-4)


def test_stop_sure_end_to_end(tmp_path, capsys):
  """--stop=sure through the CLI for DIP and IDIP: records for the images only (twins never reach a
  file), SURE's step and images per run, and NAME_sure.png, the SURE blend of the output and the
  EMA with the candidates, whose SURE is no worse than any of them (each is a blend)."""
  pytest.importorskip("bm3d")
  d = tmp_path / "in"
  d.mkdir()
  for i, name in enumerate("ab"):
    write_png(str(d / f"{name}.png"), smooth_image(32, 32, 1, seed=20 + i))
  wd = tmp_path / "out"
  args = [f"--input={d}", "--sigma=25", "--method=dip,idip", "--prelim=bm3d", "--stop=sure"]
  args += ["--sure_candidates=bm3d,noisy", "--steps=12", "--eval_every=3", f"--workdir={wd}"]
  code, err = run_cli(args + TINY_ARGS, capsys)
  assert code == 0, err
  assert not [f for _, _, fs in os.walk(wd) for f in fs if sure_fit.TWIN_SUFFIX in f]
  for method in ("dip", "idip"):
    res = json.loads((wd / method / "results.json").read_text())
    assert [r["name"] for r in res["images"]] == ["a", "b"]
    for r in res["images"]:
      hist = results.read_history(str(wd / method / "history" / f"{r['name']}.csv"))
      evals = np.flatnonzero(~np.isnan(hist["sure_psnr"]))
      best = evals[np.argmax(hist["sure_psnr"][evals])]
      assert r["stop_step"] == best + 1 and r["psnr_final"] == pytest.approx(hist["psnr"][best], abs=1e-3)
      assert r["sure_psnr_final"] == pytest.approx(hist["sure_psnr"][best], abs=1e-3)
      est = r["fit_sure_psnr"]
      assert set(r["fit_sure_weights"]) == {"fit", "fit_ema", "bm3d", "noisy"}
      assert est["blend"] >= max(v for k, v in est.items() if k != "blend") - 1e-6, est
      assert r["psnr_sure_blend"] > r["psnr_noisy"] and r["psnr_sure_xbar"] > r["psnr_noisy"]
      assert os.path.isfile(wd / method / "images" / f"{r['name']}_sure.png")
    assert {"psnr_sure_blend", "psnr_sure_xbar", "stop_step_ema"} <= set(res["mean"])


def test_sure_follows_the_true_psnr_along_a_fit(tmp_path, capsys):
  """At the default --sure_eps (0.5 sigma) SURE's PSNR estimate follows the true PSNR of the output
  along a 64 px fit (mean |error| 0.40 dB measured, EMA 0.22; 0.73 at eps = sigma; at sigma/100, the
  classic choice for a fixed denoiser, 20 dB: the fit's chaos, not its divergence)."""
  d = tmp_path / "in"
  d.mkdir()
  write_png(str(d / "a.png"), smooth_image(64, 64, 1, seed=5))
  args = [f"--input={d}", "--sigma=25", "--method=dip", "--stop=sure", "--sure_candidates=noisy", "--steps=200"]
  args += ["--eval_every=10", f"--workdir={tmp_path / 'out'}", *TINY_ARGS, "--chunk=50"]
  code, err = run_cli(args, capsys)
  assert code == 0, err
  h = results.read_history(str(tmp_path / "out" / "history" / "a.csv"))
  keep = ~np.isnan(h["sure_psnr"]) & (h["step"] > 30)
  assert np.mean(np.abs(h["sure_psnr"][keep] - h["psnr"][keep])) < 1.5
  assert np.mean(np.abs(h["sure_psnr_ema"][keep] - h["psnr_ema"][keep])) < 1.0  # 0.22 measured


def test_sure_fits_experiment_writes_its_table(tmp_path, capsys):
  """experiments/studies/sure_fits.py on a toy --stop=sure run and its --stop=wmv twin: the table's steps and
  PSNRs are the records', the gaps their means, the oracle columns no worse than the chosen ones."""
  from conftest import import_experiment, parsed_flags

  d = tmp_path / "in"
  d.mkdir()
  for i, name in enumerate("ab"):
    write_png(str(d / f"{name}.png"), smooth_image(32, 32, 1, seed=30 + i))
  base = [f"--input={d}", "--sigma=25", "--method=dip", "--sure_candidates=noisy", "--steps=20", "--eval_every=5"]
  for stop in ("sure", "wmv"):
    extra = ["--stop_window=4"] if stop == "wmv" else []
    code, err = run_cli(base + [f"--stop={stop}", f"--workdir={tmp_path / stop}", *extra, *TINY_ARGS], capsys)
    assert code == 0, err
  exp = import_experiment("sure_fits")
  args = ["sure_fits.py", "--sf_name=toy", f"--sf_sure={tmp_path / 'sure'}", f"--sf_wmv={tmp_path / 'wmv'}"]
  with parsed_flags(args + [f"--sf_results={tmp_path / 'out'}", "--sf_burn_in=0"]):
    exp.main(args)
  doc = json.loads((tmp_path / "out" / "fits_toy.json").read_text())
  recs = {r["name"]: r for r in json.loads((tmp_path / "sure" / "results.json").read_text())["images"]}
  assert [r["image"] for r in doc["rows"]] == ["a", "b"] and doc["commit"] and doc["sure_eps"] == 0.5
  for r in doc["rows"]:
    assert r["sure_step"] == recs[r["image"]]["stop_step"] and r["psnr_sure_step"] == recs[r["image"]]["psnr_final"]
    # (the history's CSV keeps 6 significant digits: equal values may differ by rounding)
    assert r["psnr_oracle_step"] >= r["psnr_sure_step"] - 1e-3
    assert r["psnr_ema_oracle_step"] >= r["psnr_ema_sure_step"] - 1e-3
  gap = np.mean([r["psnr_sure_step"] - r["psnr_oracle_step"] for r in doc["rows"]])
  assert doc["mean"]["gap_sure"] == pytest.approx(gap) and "gap_wmv" in doc["mean"]
  assert "| **mean** |" in (tmp_path / "out" / "fits_toy.md").read_text()


@pytest.mark.parametrize("diff", ["forward", "central"])
def test_twin_xbar_is_xbars_linear_response(monkeypatch, image, diff):
  """IDIP's twin fits y + eps b with x_bar + eps * J b (J: x_bar's Jacobian, from a step of sigma/100), not
  x_bar(y + eps b): at eps = sigma/2 FFDNet's response is far from linear, which biased IDIP's SURE by 3 dB.
  Made-up x_bar maker y -> y^2: the twin's x_bar is y^2 + eps 2 y b, not (y + eps b)^2."""
  from idip_jax import prelim

  clean, y, b = image
  calls = []

  def square(spec, ims):
    calls.append([im.name for im in ims])
    return [np.square(im.noisy_HxWxC) for im in ims], [{} for _ in ims]

  monkeypatch.setattr(prelim, "run", square)
  monkeypatch.setattr(prelim, "candidate_outputs", lambda spec, ims: ([], {}, {}))
  cfg = config.RunConfig(
    sigma=25.0, method="idip", fit=config.FitConfig(stop="sure", sure_diff=diff, input_is_prelim=True)
  )
  im = data.Image("im", y, clean)
  twins, _ = sure_twins.inputs(cfg, [im], [np.square(y)])
  assert calls == [["im"]]  # one call of the x_bar maker, at y + delta b, under the image's own name
  eps = cfg.fit.sure_eps * SIGMA
  for (twin_images, (xbar,)), sign in zip(twins, (1, -1)):
    np.testing.assert_allclose(twin_images[0].noisy_HxWxC, y + sign * eps * b, atol=1e-6)
    linear = np.square(y) + sign * eps * 2 * y * b
    delta = sure.eps_for(SIGMA)  # the slope's step: it adds delta * b^2 to the slope
    np.testing.assert_allclose(xbar, linear, atol=eps * delta * (np.square(b).max() + 0.1))
    assert np.abs(xbar - np.square(y + sign * eps * b)).max() > 10 * np.abs(xbar - linear).max()
  assert len(twins) == (1 if diff == "forward" else 2)


def test_twins_carry_x_bar_only_where_the_fit_reads_it(image, monkeypatch):
  """--stop=sure with --sure_twins=K: IDIP's twins get x_bar's linear response along their own probe b_k (one
  slope per twin); DIP beside a --prelim reads no x_bar, so its twins carry the run's own and no x_bar call is
  spent on them."""
  clean, y, _ = image
  im, xbar = data.Image("im", y, clean), np.full_like(y, 0.5)
  slope = lambda spec, images, prelims, k: [np.full_like(y, k + 1.0)]
  monkeypatch.setattr(sure_twins, "twin_xbar_slopes", slope)
  monkeypatch.setattr(sure_twins.prelim, "candidate_outputs", lambda spec, images: ([], {}, {}))
  for method in ("dip", "idip"):
    cfg = config.RunConfig(
      method=method,
      sigma=25.0,
      prelim=config.PrelimConfig(name="ffdnet"),
      fit=config.FitConfig(stop="sure", sure_twins=2),
    )
    twins, _ = sure_twins.inputs(cfg, [im], [xbar])
    assert [t[0][0].name for t in twins] == ["im~sure", "im~sure1"]
    eps = 0.5 * 25 / 255
    for k, (ims, xbars) in enumerate(twins):
      np.testing.assert_allclose(ims[0].noisy_HxWxC, y + eps * sure_fit.probe_for("im", y.shape, k), atol=1e-6)
      want = xbar + eps * (k + 1.0) if method == "idip" else xbar
      np.testing.assert_allclose(xbars[0], want, atol=1e-6)


def test_noise_shortfall_is_what_white_noise_costs_the_best_step():
  """experiments/studies/sure_fits.py's estimate-noise analysis: no noise picks the best step; noise far smaller
  than the curve's peak costs nothing; noise far larger picks steps at random (mean shortfall: peak minus the mean)."""
  sf = import_experiment("sure_fits")
  curve = np.zeros(20)
  curve[7] = 1.0
  assert sf.noise_shortfall(curve, 0.0) == 0.0 and sf.noise_shortfall(curve, 0.05) == 0.0
  assert sf.noise_shortfall(curve, 100.0) == pytest.approx(1.0 - 1.0 / 20, abs=0.05)
  h = {"step": np.arange(1, 21), "psnr": curve, "sure_psnr": curve + 0.1, "psnr_ema": curve, "sure_psnr_ema": curve}
  noise = sf.estimate_noise(h, burn_in=0)
  assert noise["psnr"]["std"] == pytest.approx(0.0, abs=1e-9) and noise["psnr"]["shortfall"] == 0.0
