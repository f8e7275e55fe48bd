"""The measurement protocol: what the history, the records and the tables report."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import NET, ROOT, TINY_ARGS, import_experiment, parsed_flags, smooth_image, write_png
from test_cli import run_cli
from test_fit import CFG, make_batch, states_and_step

from idip_jax import config, data, fit, metrics, outputs, results, resume, runner, stored, train


@pytest.fixture(scope="module")
def two():
  return make_batch([smooth_image(32, 32, 1, seed=s) for s in range(2)])


def test_history_is_of_the_clean_input_output_every_k_steps(two):
  batch, keys = two
  cfg = dataclasses.replace(CFG, steps=12, chunk=5, eval_every=4)  # eval at 4, 8, 12 across chunks
  res = fit.fit(NET, cfg, batch, keys)
  evaluated = ~np.isnan(res.history["psnr"][:, 0])
  assert list(np.flatnonzero(evaluated) + 1) == [4, 8, 12]
  for k in ("ssim", "psnr_ema", "ssim_ema"):
    np.testing.assert_array_equal(~np.isnan(res.history[k][:, 0]), evaluated)
  # The last row is the reported image: the output on the unperturbed input after all steps.
  for i in range(2):
    final = float(metrics.psnr(jnp.asarray(res.final_NxHxWxC[i]), batch.clean[i]))
    ema = float(metrics.psnr(jnp.asarray(res.ema_NxHxWxC[i]), batch.clean[i]))
    assert abs(res.history["psnr"][-1, i] - final) < 1e-4, (res.history["psnr"][-1, i], final)
    assert abs(res.history["psnr_ema"][-1, i] - ema) < 1e-4
  # The training pass's output (perturbed input, every step) is another image: it differs.
  assert not np.isnan(res.history["psnr_perturbed"]).any()
  assert abs(res.history["psnr_perturbed"][-1, 0] - res.history["psnr"][-1, 0]) > 1e-3


def test_scan_and_host_loops_evaluate_the_same_steps(two):
  batch, keys = two
  cfg = dataclasses.replace(CFG, steps=6, chunk=3, eval_every=2)
  host = fit.fit(NET, dataclasses.replace(cfg, loop="host"), batch, keys)
  scan = fit.fit(NET, dataclasses.replace(cfg, loop="scan"), batch, keys)
  for k in ("psnr", "ssim_ema", "loss"):
    np.testing.assert_allclose(scan.history[k], host.history[k], rtol=1e-4, atol=1e-4)
  assert np.isnan(scan.history["psnr"][0]).all() and not np.isnan(scan.history["psnr"][1]).any()


def test_batch_strategies_equal_single_fits(two):
  """vmap with each per-run convolution lowering (convs.per_run_conv), map (lax.map) and unroll (a
  Python loop in the step) give the same losses as one run per call (2e-6: rounding)."""
  batch, keys = two
  cfg = dataclasses.replace(CFG, steps=4, chunk=4)
  single = [
    fit.fit(NET, cfg, jax.tree_util.tree_map(lambda a, i=i: a[i : i + 1], batch), keys[i : i + 1]) for i in range(2)
  ]
  single_loss = np.concatenate([r.history["loss"] for r in single], axis=1)
  single_final = np.concatenate([r.final_NxHxWxC for r in single])
  # hybrid_side=8 on 32 px: the 16 px and 8 px levels' convolutions take im2col, the others the loop.
  ways = [("vmap", lw) for lw in ("loop", "im2col", "hybrid", "grouped")] + [("map", "loop"), ("unroll", "loop")]
  for strategy, lowering in ways:
    net = dataclasses.replace(NET, batch_conv=lowering, hybrid_side=8)
    res = fit.fit(net, dataclasses.replace(cfg, batch_strategy=strategy), batch, keys)
    np.testing.assert_allclose(res.history["loss"], single_loss, atol=2e-6, err_msg=f"{strategy} {lowering}")
    np.testing.assert_allclose(res.final_NxHxWxC, single_final, atol=1e-3, err_msg=f"{strategy} {lowering}")
  assert np.abs(single_final[0] - single_final[1]).max() > 1e-2  # two different runs


def test_xbar_perturbation_is_its_own_setting():
  x = jnp.full((8, 8, 1), 0.5)
  key, step = jax.random.key(0), jnp.array(3)
  net_in = lambda cfg: np.asarray(train.perturbed_input(cfg, x, step, key))
  z = dataclasses.replace(CFG, reg_noise_std=0.1, xbar_noise_std=0.0)
  # The input is z: only reg_noise_std matters.
  assert abs(np.std(net_in(z) - 0.5) - 0.1) < 0.03
  np.testing.assert_array_equal(net_in(z), net_in(dataclasses.replace(z, xbar_noise_std=0.3)))
  # The input is x_bar: only xbar_noise_std matters.
  xb = dataclasses.replace(z, input_is_prelim=True)
  np.testing.assert_array_equal(net_in(xb), np.asarray(x))
  assert abs(np.std(net_in(dataclasses.replace(xb, xbar_noise_std=0.2)) - 0.5) - 0.2) < 0.06
  # The runner sets input_is_prelim from the method (IDIP change 2).
  base = runner.RunConfig(input="x", workdir="w", prelim=config.PrelimConfig("bm3d"))
  assert runner.resolve(dataclasses.replace(base, method="idip2"), 1).fit.input_is_prelim
  assert not runner.resolve(dataclasses.replace(base, method="idip1"), 1).fit.input_is_prelim
  assert not runner.resolve(dataclasses.replace(base, method="dip"), 1).fit.input_is_prelim


def test_default_steps_per_method():
  base = runner.RunConfig(input="x", workdir="w", fit=config.FitConfig(steps=0))
  for method, steps in config.DEFAULT_STEPS.items():
    assert runner.resolve(dataclasses.replace(base, method=method), 1).fit.steps == steps
  assert runner.resolve(dataclasses.replace(base, fit=config.FitConfig(steps=7)), 1).fit.steps == 7


def _wreck(states, run):
  """Blow up one run's parameters, as a diverging Adam step would."""
  wreck = lambda p: p.at[run].add(20.0 * jax.random.normal(jax.random.key(9), p.shape[1:]))
  return states.replace(params=jax.tree_util.tree_map(wreck, states.params))


def test_official_dip_backtracking_rule(two):
  batch, keys = two
  cfg = dataclasses.replace(CFG, backtrack="dip")
  states, noise, step = states_and_step(cfg, keys)
  for _ in range(5):
    states, _ = step(states, batch, noise)
  assert list(np.asarray(states.dip_i)) == [5, 5]
  bad = _wreck(states, 1)
  nxt, m = step(bad, batch, noise)
  assert list(np.asarray(m["backtracked"])) == [False, True]
  leaves = jax.tree_util.tree_leaves
  # DIP restores the weights, then still applies Adam's step (with the diverged pass's
  # gradients): the result is near, but not at, the snapshot; Adam's state moved on.
  diffs = [float(jnp.abs(a[1] - g[1]).max()) for a, g in zip(leaves(nxt.params), leaves(states.good_params))]
  assert 0 < max(diffs) < 0.1, max(diffs)
  assert any(
    not np.array_equal(np.asarray(a[1]), np.asarray(b[1]))
    for a, b in zip(leaves(nxt.opt_state), leaves(states.opt_state))
  )
  # Its EMA keeps the bad output; its counter i does not advance on a fallback.
  assert not np.array_equal(np.asarray(nxt.ema[1]), np.asarray(states.ema[1]))
  assert list(np.asarray(nxt.dip_i)) == [6, 5]
  # The check is skipped when i % 100 == 0.
  _, m100 = step(bad.replace(dip_i=jnp.array([100, 100], jnp.int32)), batch, noise)
  assert not np.asarray(m100["backtracked"]).any()
  # The safe rule on the same state restores weights and Adam state and keeps the EMA.
  safe = dataclasses.replace(cfg, backtrack="safe")
  snxt, sm = states_and_step(safe, keys)[2](bad, batch, noise)
  assert list(np.asarray(sm["backtracked"])) == [False, True]
  for a, g in zip(leaves(snxt.params), leaves(states.good_params)):
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(g[1]))
  np.testing.assert_array_equal(np.asarray(snxt.ema[1]), np.asarray(states.ema[1]))


def test_noise_protocols_share_one_draw():
  x = smooth_image(24, 24, 1, seed=3)
  f, c, u = (data.add_awgn(x, 80, 0, "a", p) for p in data.NOISE_PROTOCOLS)
  assert f.min() < 0 and f.max() > 1  # sigma 80 leaves [0, 1]
  np.testing.assert_array_equal(c, np.clip(f, 0, 1))
  assert 0 <= c.min() and c.max() <= 1
  np.testing.assert_allclose(u * 255, np.round(c * 255), atol=1e-4)
  assert np.abs(u - c).max() <= 0.5 / 255 + 1e-6
  with pytest.raises(data.InputError):
    data.add_awgn(x, 25, 0, "a", "gaussian")


@pytest.mark.parametrize("noise", ["float", "clip"])
def test_psnr_noisy_is_of_the_image_as_fitted(tmp_path, capsys, noise):
  write_png(str(tmp_path / "a.png"), smooth_image(32, 32, 1, seed=5))
  wd = tmp_path / "out"
  code, err = run_cli(
    [
      f"--input={tmp_path / 'a.png'}",
      "--sigma=80",
      f"--noise={noise}",
      "--method=dip",
      "--steps=2",
      "--workdir=" + str(wd),
    ]
    + TINY_ARGS,
    capsys,
  )
  assert code == 0, err
  rec = json.loads((wd / "results.json").read_text())["images"][0]
  im = data.load_images(str(tmp_path / "a.png"), 80, noise=noise)[0]
  mse = np.mean((im.noisy_HxWxC.astype(np.float64) - im.clean_HxWxC) ** 2)
  assert abs(rec["psnr_noisy"] + 10 * np.log10(mse)) < 1e-3, (rec["psnr_noisy"], -10 * np.log10(mse))
  clipped = float(metrics.psnr(jnp.asarray(im.noisy_HxWxC), jnp.asarray(im.clean_HxWxC)))
  assert (abs(rec["psnr_noisy"] - clipped) > 0.1) == (noise == "float")


def test_method_list_needs_distinct_methods(tmp_path, capsys):
  # (Several methods on the same noise and x_bar: tests/test_demo.py runs dip,idip end to end.)
  write_png(str(tmp_path / "a.png"), smooth_image(32, 32, 1, seed=6))
  code, err = run_cli(
    [f"--input={tmp_path / 'a.png'}", "--sigma=25", "--method=dip,dip", "--workdir=" + str(tmp_path / "o2")]
    + TINY_ARGS,
    capsys,
  )
  assert code == 2 and "distinct" in err and not (tmp_path / "o2").exists()


def test_code_hash_changes_with_the_source(tmp_path):
  pkg = tmp_path / "idip_jax"
  pkg.mkdir()
  src = os.path.join(ROOT, "idip_jax", "outputs.py")
  (pkg / "outputs.py").write_text(open(src).read())
  (pkg / "data.py").write_text("class InputError(ValueError): pass\nclass OutputError(RuntimeError): pass\n")
  env = dict(os.environ, PYTHONPATH=str(tmp_path))
  get = lambda: subprocess.run(
    [sys.executable, "-c", "from idip_jax import outputs; print(outputs.code_hash())"],
    env=env,
    capture_output=True,
    text=True,
    cwd=str(tmp_path),
  ).stdout.strip()
  h1 = get()
  (pkg / "data.py").write_text("class InputError(ValueError): pass\nclass OutputError(RuntimeError): pass\n# changed\n")
  h2 = get()
  assert len(h1) == 12 and h1 != h2


def test_finished_jobs_are_keyed_by_code(tmp_path, capsys):
  tables = import_experiment("tables")
  with parsed_flags(["tables.py", "--max_images=1"]) as fv:
    jobs = tables.make_runner({"dip": 3})
    cfg = jobs.config(tables.Job("classic10", 30, "dip"), str(tmp_path / "job"))
    os.makedirs(os.path.join(cfg.workdir, "history"))
    outputs.write_json(os.path.join(cfg.workdir, "config.json"), dataclasses.asdict(runner.resolve(cfg, 1)))
    results.write_history(
      os.path.join(cfg.workdir, "history", "a.csv"),
      {"loss": np.ones(3), "psnr": np.array([np.nan, 20.0, 21.0]), "backtracked": np.zeros(3)},
    )
    rec = {"name": "a", "psnr_final": 21.0, "psnr_ema": 20.0, "seconds": 1.0, "steps": 3}
    res = {"images": [rec], "mean": {}, "steps": 3, "commit": "abc", "code_hash": outputs.code_hash()}
    outputs.write_json(os.path.join(cfg.workdir, "results.json"), res)
    assert jobs.finished(cfg) is not None  # same config, same code: reused
    assert jobs.finished(dataclasses.replace(cfg, sigma=25)) is None  # another job
    res["code_hash"] = "0" * 12
    outputs.write_json(os.path.join(cfg.workdir, "results.json"), res)
    assert jobs.finished(cfg) is None  # other code: rerun
    assert "made by other code (abc)" in capsys.readouterr().out
    fv.allow_other_code = True
    got = tables.make_runner().finished(cfg)
    assert got is not None and np.isnan(got["histories"]["a"]["psnr"][0]) and got["histories"]["a"]["psnr"][2] == 21
    assert "--allow_other_code" in capsys.readouterr().out


def test_tables_reuse_jobs_stored_by_older_code(tmp_path):
  """A config.json written by older code (old names, unresolved net, loop "auto") still
  matches the same job, so stored GPU runs rebuild their tables."""
  tables = import_experiment("tables")
  with parsed_flags(["tables.py", "--noise=clip"]):
    cfg = tables.make_runner().config(tables.Job("classic10", 30, "idip", "ffdnet"), str(tmp_path / "job"))
  old = json.loads(json.dumps(dataclasses.asdict(runner.resolve(cfg, 1))))
  old["channels"] = old.pop("image_channels")
  old["net"].update(channels=old["net"].pop("width"), in_channels=32, out_channels=3, complex_connection=False)
  old["fit"]["loop"] = "auto"
  old["prelim"].update(sigma=30, crop=0, batch_size=0)
  del old["net"]["conv"]
  want = resume.job_settings(runner.resolve(cfg, 1))
  assert stored.settings_difference(want, old, lenient=True) is None
  old["fit"]["steps"] = 999
  assert stored.settings_difference(want, old, lenient=True) == "fit.steps (stored 999, now 1500)"


@pytest.mark.parametrize("change", ["sigma", "crop", "noise", "x_bar", "code"])
def test_one_same_settings_rule_refuses_another_job(tmp_path, change):
  """One rule (stored.settings_difference) says whether a stored run has the same settings,
  for --resume (every setting) and for reusing a finished job (experiments/tables.py and faithfulness.py
  through resume.finished_job): another sigma, crop, noise protocol or x_bar source is refused by both;
  other code by the job reuse (unless --allow_other_code)."""
  tables = import_experiment("tables")
  with parsed_flags(["tables.py", "--noise=clip"]):
    cfg = tables.make_runner({"idip": 3}).config(tables.Job("classic10", 30, "idip", "ffdnet"), str(tmp_path / "job"))
  os.makedirs(cfg.workdir)
  outputs.write_json(os.path.join(cfg.workdir, "config.json"), dataclasses.asdict(runner.resolve(cfg, 1)))
  res = {"images": [], "mean": {}, "steps": 3, "commit": "abc", "code_hash": outputs.code_hash()}
  outputs.write_json(os.path.join(cfg.workdir, "results.json"), res)
  assert resume.finished_job(runner.resolve(cfg, 1))[0] is not None  # the same job: reused
  changed = {
    "sigma": dataclasses.replace(cfg, sigma=25.0),
    "crop": dataclasses.replace(cfg, crop=32),
    "noise": dataclasses.replace(cfg, noise="uint8"),
    "x_bar": dataclasses.replace(cfg, prelim=dataclasses.replace(cfg.prelim, name="bm3d")),
    "code": cfg,
  }[change]
  if change == "code":
    outputs.write_json(os.path.join(cfg.workdir, "results.json"), dict(res, code_hash="0" * 12))
    assert resume.finished_job(runner.resolve(cfg, 1))[1].endswith("was made by other code (abc)")
    assert resume.finished_job(runner.resolve(cfg, 1), allow_other_code=True)[0] is not None
    return
  name = {"x_bar": "prelim.name"}.get(change, change)
  res_or_none, why = resume.finished_job(runner.resolve(changed, 1))
  assert res_or_none is None and f"is another job: {name} (stored " in why
  with pytest.raises(data.InputError, match=f"settings differ from the stored run in .*: {name} \\(stored "):
    resume.check_output_folder(dataclasses.replace(changed, resume=True), runner.resolve(changed, 1), [])


def test_tables_read_a_shorter_step_count_from_the_history():
  tables = import_experiment("tables")
  nan = np.nan
  h = lambda p, e: {
    "psnr": np.array(p),
    "psnr_ema": np.array(e),
    "ssim": np.array(p) / 100,
    "ssim_ema": np.array(e) / 100,
  }
  res = {
    "steps": 4,
    "images": [{"name": "a", "psnr_final": 9.0}, {"name": "b", "psnr_final": 9.0}],
    "histories": {"a": h([nan, 20, nan, 22], [nan, 18, nan, 21]), "b": h([nan, 24, nan, 23], [nan, 20, nan, 22])},
  }
  two = tables.at_step(res, 2)
  assert two["steps"] == 2 and two["run_steps"] == 4
  assert [r["psnr_final"] for r in two["images"]] == [20, 24] and two["mean"]["psnr_final"] == 22
  assert two["mean"]["psnr_ema"] == 19
  with pytest.raises(ValueError):
    tables.at_step(res, 3)  # step 3 was not evaluated
  peak = tables.mean_curve_peak(res, 4)
  assert peak["curve_peak"] == {"step": 4, "psnr": 22.5} and peak["curve_peak_ema"]["step"] == 4
  assert tables.mean_curve_peak(res, 2)["curve_peak"] == {"step": 2, "psnr": 22.0}


def test_precision_modes_reach_the_convolutions():
  x = jnp.ones((1, 32, 32, NET.in_channels))
  hlo = {}
  for name in train.PRECISIONS:
    model = train.make_model(NET, dataclasses.replace(CFG, precision=name))
    params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    hlo[name] = jax.jit(model.apply).lower({"params": params}, x).as_text()
  convs = {k: [ln for ln in t.splitlines() if "convolution" in ln] for k, t in hlo.items()}
  assert convs["fp32"] and all("HIGHEST" in ln for ln in convs["fp32"])
  assert not any("HIGHEST" in ln for ln in convs["tf32"])  # (jax.image.resize's own dots are HIGHEST)
  assert all("bf16" in ln for ln in convs["bf16"]) and not any("bf16" in ln for ln in convs["tf32"])
