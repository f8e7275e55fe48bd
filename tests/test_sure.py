"""MC-SURE (Ramani et al. 2008): the divergence of linear maps is their trace, SURE tracks the true MSE of real
denoisers, the blend weights are the closed form, x8 of an equivariant map is that map."""

import os

import numpy as np
import pytest
from conftest import smooth_image
from scipy import ndimage

from idip_jax import denoisers as denoisers_mod
from idip_jax import sure


def noisy(sigma255: float, seed: int = 0, size: int = 48):
  clean = smooth_image(size, size, 1, seed=seed)
  rng = np.random.default_rng(seed + 100)
  return clean, (clean + sigma255 / 255.0 * rng.standard_normal(clean.shape)).astype(np.float32)


def test_divergence_of_linear_maps_is_their_trace():
  _, y = noisy(25)
  n = y.size
  blur = lambda x: ndimage.uniform_filter(x, size=(3, 3, 1), mode="wrap")  # 3x3 mean: trace N/9
  # (map, trace, squared Frobenius norm): one probe's b.Ab has std sqrt(2 |A|_F^2) for symmetric A.
  for f, trace, frob2 in ((lambda x: x, n, n), (lambda x: 0.3 * x, 0.3 * n, 0.09 * n), (blur, n / 9, n / 9)):
    div = sure.divergence(f, y, 25 / 255, seed=1, n_probes=8)
    tol = 4 * np.sqrt(2 * frob2 / 8) + 1e-3 * n  # 4 standard errors of 8 probes, and float32 rounding
    assert abs(div - trace) < tol, (div, trace, tol)


def test_blend_weights_are_the_closed_form():
  rng = np.random.default_rng(0)
  y = rng.random((16, 16, 1)).astype(np.float32)
  outs = [rng.random((16, 16, 1)).astype(np.float32) for _ in range(3)]
  divs, sigma = [10.0, 50.0, 120.0], 0.1
  w = sure.blend_weights(y, outs, divs, sigma)
  f = np.stack([o.ravel() for o in outs], 1).astype(np.float64)
  expect = np.linalg.solve(f.T @ f, f.T @ y.ravel() - sigma**2 * np.array(divs))
  np.testing.assert_allclose(w, expect, rtol=1e-6)
  # SURE of the blend (its divergence is w . div) is the lowest of any weights nearby.
  sure_of = lambda v: sure.sure(y, sure.blend(outs, v), sigma, float(np.dot(v, divs)))
  for d in np.eye(3) * 0.05:
    assert sure_of(w) <= min(sure_of(w + d), sure_of(w - d))


def test_self_ensemble_of_an_equivariant_map_is_the_map():
  x = smooth_image(24, 32, 1, seed=3)
  f = lambda a: ndimage.gaussian_filter(a, sigma=(1.0, 1.0, 0), mode="reflect")  # symmetric kernel
  np.testing.assert_allclose(sure.self_ensemble(f)(x), f(x), atol=1e-6)
  for k in range(8):  # the transforms are undone exactly
    np.testing.assert_array_equal(sure.undo_dihedral(sure.dihedral(x, k), k), x)
  g = lambda a: np.roll(a, 1, axis=1)  # not equivariant: x8 differs
  assert np.abs(sure.self_ensemble(g)(x) - g(x)).max() > 1e-3


def test_sure_tracks_the_true_mse_of_ffdnet_bm3d_and_a_blur():
  """On a 128 px crop of scikit-image's camera, mean over 3 noise draws: SURE minus the true MSE
  within 4 standard errors of SURE's own noise term (|n|^2/N - sigma^2: std sigma^2 sqrt(2/N) per
  draw), which no denoiser removes; the divergence from 2 probes, eps = sigma/100."""
  skdata = pytest.importorskip("skimage.data")
  bm3d = pytest.importorskip("bm3d")
  clean = (skdata.camera()[192:320, 192:320, None] / 255.0).astype(np.float32)
  denoisers = {
    "bm3d": lambda a, s: bm3d.bm3d(a[..., 0].astype(np.float64), s)[..., None].astype(np.float32),
    "blur": lambda a, s: ndimage.gaussian_filter(a, sigma=(1.0, 1.0, 0), mode="reflect"),
  }
  if os.path.isfile(denoisers_mod.ffdnet_path("", 1)):
    net = denoisers_mod.load_ffdnet(denoisers_mod.ffdnet_path("", 1), 1)
    denoisers["ffdnet"] = lambda a, s: denoisers_mod.ffdnet_denoise(net, a[None], np.array([s * 255]))[0]
  draws = 3
  for sigma255 in (15, 50):
    s = sigma255 / 255
    for name, f in denoisers.items():
      est, true = [], []
      for k in range(draws):
        y = (clean + s * np.random.default_rng([k, sigma255]).standard_normal(clean.shape)).astype(np.float32)
        fy = f(y, s)
        est.append(sure.sure(y, fy, s, sure.divergence(lambda a, s=s, f=f: f(a, s), y, s, seed=k, n_probes=2, fy=fy)))
        true.append(float(np.mean((fy - clean) ** 2)))
      tol = 4 * s**2 * np.sqrt(2 / (clean.size * draws))
      assert abs(np.mean(est) - np.mean(true)) < tol, (name, sigma255, np.mean(est), np.mean(true), tol)


def test_sure_blend_prelim_weighs_candidates_per_image(tmp_path, capsys):
  """--prelim=sure_blend: per image, the blend's SURE is no worse than any candidate's (each is a
  blend with one weight 1), the weights do not depend on the other images of the call (probes are
  seeded by the name), and results.json records them."""
  pytest.importorskip("bm3d")
  import json

  from conftest import TINY_ARGS, write_png
  from test_cli import run_cli

  from idip_jax import config, data, prelim

  d = tmp_path / "in"
  d.mkdir()
  for i, name in enumerate("ab"):
    write_png(str(d / f"{name}.png"), smooth_image(32, 32, 1, seed=10 + i))
  pc = config.PrelimConfig(name="sure_blend", sure_candidates=("bm3d", "noisy"), sure_probes=2)
  cfg = prelim.XbarSpec(pc, 25)
  images = data.load_images(str(d), 25)
  xbars, infos = prelim.run(cfg, images)
  for x, info, im in zip(xbars, infos, images):
    est = info["sure_psnr"]
    assert est["blend"] >= max(est["bm3d"], est["noisy"]) - 1e-6, info
    assert set(info["sure_weights"]) == {"bm3d", "noisy"} and x.shape == im.noisy_HxWxC.shape
    assert 0.0 <= x.min() and x.max() <= 1.0
  alone = prelim.run(cfg, images[1:])[1][0]
  for c, w in alone["sure_weights"].items():  # float rounding apart (BM3D's threads: 2e-6 measured)
    assert abs(w - infos[1]["sure_weights"][c]) < 1e-4
  # End to end: the weights per image in results.json.
  wd = tmp_path / "out"
  args = [f"--input={d}", "--sigma=25", "--method=idip", "--prelim=sure_blend", "--sure_candidates=bm3d,noisy"]
  code, err = run_cli(args + ["--steps=2", f"--workdir={wd}"] + TINY_ARGS, capsys)
  assert code == 0, err
  recs = json.loads((wd / "results.json").read_text())["images"]
  for r, info in zip(recs, infos):
    assert r["sure_weights"].keys() == info["sure_weights"].keys()
    assert all(abs(r["sure_weights"][c] - w) < 1e-4 for c, w in info["sure_weights"].items())
  assert all(r["psnr_prelim"] > r["psnr_noisy"] for r in recs)


def test_x8_prelim_is_the_mean_over_the_eight_transforms():
  from conftest import WEIGHTS, need_path

  from idip_jax import config, data, prelim

  need_path(WEIGHTS)
  x = smooth_image(32, 40, 1, seed=4)
  im = data.Image("a", (x + 0.1 * np.random.default_rng(0).standard_normal(x.shape)).astype(np.float32), x)
  cfg = prelim.XbarSpec(config.PrelimConfig(name="ffdnet", x8=True), 25)
  (got,), _ = prelim.run(cfg, [im])
  plain = prelim.XbarSpec(config.PrelimConfig(name="ffdnet"), 25)
  turned = [
    sure.undo_dihedral(
      prelim.run(plain, [data.Image("a", np.ascontiguousarray(sure.dihedral(im.noisy_HxWxC, k)), None)])[0][0], k
    )
    for k in range(8)
  ]
  np.testing.assert_allclose(got, np.mean(turned, axis=0), atol=1e-6)
  assert np.abs(got - prelim.run(plain, [im])[0][0]).max() > 1e-4  # the ensemble is not the single pass


def test_sure_blend_experiment_writes_its_table(tmp_path):
  """experiments/studies/sure_blend.py at toy scale: per sigma, each candidate, the oracle and SURE blends;
  the oracle blend (least squares with the clean image) is at least as good as every candidate."""
  pytest.importorskip("bm3d")
  import json

  from conftest import import_experiment, parsed_flags, write_png

  (tmp_path / "toy").mkdir()
  for i in range(2):
    write_png(str(tmp_path / "toy" / f"im{i}.png"), smooth_image(48, 48, 1, seed=20 + i))
  exp = import_experiment("sure_blend")
  args = ["sure_blend.py", "--sets=toy", f"--sure_data={tmp_path}", "--sigmas=25", f"--sure_results={tmp_path / 'out'}"]
  with parsed_flags(args + ["--sure_blend_candidates=bm3d,noisy"]):
    exp.main(args)
  doc = json.loads((tmp_path / "out" / "toy.json").read_text())
  assert doc["candidates"] == ["bm3d", "noisy"] and len(doc["rows"]) == 2 and doc["commit"]
  # the command reproduces this file (absl consumed the flags; the set and the non-default candidates are in it)
  want = "python experiments/studies/sure_blend.py --sets=toy --sigmas=25 --sure_blend_probes=1"
  assert doc["command"] == want + " --sure_blend_candidates=bm3d,noisy"
  for r in doc["rows"]:
    assert r["psnr_oracle_blend"] >= max(r["psnr"].values()) - 0.01, r
  assert "| 25 |" in (tmp_path / "out" / "toy.md").read_text()


def test_local_sure_blend_follows_where_each_candidate_is_better():
  """experiments/studies/sure_local.py: weights on a grid of nodes (bilinear between them) chosen by SURE, no
  clean image. Left half flat, right half fine texture: a blur wins on the left, y itself on the right; the local
  SURE blend finds that (close to its oracle) and beats one weight per candidate, which must compromise."""
  from conftest import import_experiment

  local = import_experiment("sure_local")
  rng = np.random.default_rng(0)
  x = np.full((96, 96, 1), 0.5)
  x[:, 48:] += 0.3 * rng.standard_normal((96, 48, 1))
  s = 0.1
  y = x + s * rng.standard_normal(x.shape)
  blur = lambda a: ndimage.uniform_filter(a, size=(7, 7, 1), mode="reflect")
  cands = [y, blur(y)]
  b = sure.probes_for("toy", y.shape, 1)[0].astype(np.float64)
  eps = sure.eps_for(s)
  d = [b * b, b * (blur(y + eps * b) - blur(y)) / eps]  # per-pixel divergence terms, one probe
  basis = local.tent_basis(96, 96, 16)
  assert np.allclose(np.asarray(basis.sum(axis=1)).ravel(), 1.0)  # a partition of unity
  f_nk, d_nk = np.stack([c.ravel() for c in cands], 1), np.stack([v.ravel() for v in d], 1)
  got = local.psnr(local.local_blend(f_nk, d_nk, y.ravel(), s, basis), x.ravel())
  oracle = local.psnr(local.local_blend(f_nk, d_nk, y.ravel(), s, basis, x.ravel()), x.ravel())
  w = sure.blend_weights(y, cands, [float(v.sum()) for v in d], s)
  global_ = local.psnr(sure.blend(cands, w), x)
  assert got > global_ + 1.0 and got > oracle - 0.3, (got, oracle, global_)
