"""Automatic stopping (ES-WMV / ES-EMV) per run inside a batch, and seed ensembles."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from conftest import NET, smooth_image, write_png
from test_fit import make_batch, states_and_step, take

from idip_jax import config, fit, results, runner, train

# lr 0.01 (DIP's) so that the variance of the training outputs rises again within a few dozen steps.
STOP = fit.for_backend(
  NET,
  config.FitConfig(steps=60, chunk=10, seed=3, lr=1e-2, prelim_weight=0.0, stop="wmv", stop_window=5, stop_patience=8),
  "cpu",
)[1]


def reference_stop(outs: np.ndarray, kind: str, window: int, patience: int, alpha: float = 0.1):
  """(best_epoch, the iteration whose check stopped it) as ES_WMV.ipynb / ES_EMV.ipynb compute them
  (sun-umn/Early_Stopping_for_DIP), written with numpy on a sequence of outputs."""
  best, best_epoch, wait, buf, ema, emv = np.inf, 0, 0, [], None, 0.0
  for it, img in enumerate(outs):
    if kind == "wmv":
      buf = (buf + [img.reshape(-1)])[-window:]
      if len(buf) < window:
        continue
      ave = np.mean(buf, axis=0)
      cur = np.mean([((ave - tmp) ** 2).sum() / tmp.size for tmp in buf])
    else:
      if it == 0:
        ema, emv = img, 0.0
      else:
        delta = img - ema
        ema = np.clip(ema + alpha * delta, 0, 1)
        emv = (1 - alpha) * (emv + alpha * np.linalg.norm(delta) ** 2)
      if it <= window:  # its `if iterator > 100`
        continue
      cur = emv
    if cur < best:
      best, best_epoch, wait = cur, it, 0
    else:
      wait += 1
      if wait >= patience:
        return best_epoch, it
  return best_epoch, None


@pytest.mark.parametrize("kind", ["wmv", "emv"])
def test_criterion_matches_the_reference_notebooks(kind):
  """The per-step update chooses the same step, and stops at the same step, as the official code."""
  cfg = dataclasses.replace(STOP, stop=kind, stop_window=6, stop_patience=7)
  rng = np.random.default_rng(0)
  # Outputs that settle and then wander again: the variance falls, then rises (DIP's overfitting).
  t = np.arange(60, dtype=np.float32)[:, None, None, None]
  scale = 0.2 * np.exp(-t / 8) + 0.002 * np.maximum(t - 25, 0)
  outs = np.clip(0.5 + scale * rng.standard_normal((60, 8, 8, 1)), 0, 1).astype(np.float32)
  model, tx = train.make_model(NET, cfg), train.make_optimizer(cfg)
  state = train.create_fit_state(model, tx, cfg, jax.random.key(0), 8, 8)
  update = jax.jit(lambda s, o: train.update_stop(cfg, s, o, s.ema))
  want_best, want_stop = reference_stop(outs, kind, cfg.stop_window, cfg.stop_patience)
  got_stop = None
  for it, o in enumerate(outs):
    stop, _ = update(state, o)
    state = state.replace(step=state.step + 1, stop=stop)
    if bool(stop.stopped):
      got_stop = it
      break
  assert want_stop is not None and 25 < want_best < want_stop  # the sequence exercises a real stop
  assert (int(state.stop.best_step), got_stop) == (want_best, want_stop)


def test_a_stopped_run_is_frozen_while_the_others_go_on():
  images = [smooth_image(32, 32, 1, seed=s) for s in range(2)]
  batch, keys = make_batch(images, cfg=STOP)
  states, noise, step = states_and_step(STOP, keys)
  for _ in range(3):
    states, _ = step(states, batch, noise)
  states = states.replace(stop=states.stop.replace(stopped=states.stop.stopped.at[0].set(True)))
  after, m = step(states, batch, noise)
  for a, b in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(states)):
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))  # run 0: every array as it was
  moved = [
    np.abs(np.asarray(a[1]) - np.asarray(b[1])).max()
    for a, b in zip(*map(jax.tree_util.tree_leaves, (after.params, states.params)))
  ]
  assert max(moved) > 1e-4 and int(after.step[1]) == 4  # run 1 trained on
  assert np.isnan(m["stop_score"][0]) and bool(m["stopped"][0])


def test_stopping_is_the_same_in_a_batch_and_alone():
  images = [smooth_image(32, 32, 1, seed=s) for s in range(3)]
  batch, keys = make_batch(images, cfg=STOP)
  together = fit.fit(NET, STOP, batch, keys)
  stopped_at = lambda r, i: int(np.argmax(r.history["stopped"][:, i])) + 1
  assert together.history["stopped"][-1].all()  # every run stopped, so the batch ended early
  assert len(together.history["loss"]) < STOP.steps
  for i in range(3):
    alone = fit.fit(NET, STOP, take(batch, i), keys[i : i + 1])
    assert int(alone.stop_step_N[0]) == int(together.stop_step_N[i])
    assert stopped_at(alone, 0) == stopped_at(together, i)
    # Values: the batched and single fits' rounding differs (test_fit.py); lr 0.01 grows it to ~5e-3.
    diff = np.abs(alone.final_NxHxWxC[0] - together.final_NxHxWxC[i])
    assert diff.max() < 2e-2 and diff.mean() < 1e-3
    # A frozen run's clean-input PSNR stays put after its stop.
    h = together.history["psnr"][stopped_at(together, i) :, i]
    h = h[~np.isnan(h)]
    assert h.size and np.ptp(h) == 0
  # The reported image is the output at the chosen step, not at the end: the PSNR history there.
  i = 0
  chosen = int(together.stop_step_N[i])
  assert 0 < chosen < stopped_at(together, i)


def test_ensemble_image_is_the_mean_of_the_runs(tmp_path):
  write_png(str(tmp_path / "a.png"), smooth_image(32, 32, 1, seed=1))
  work = tmp_path / "run"
  fit_cfg = config.FitConfig(
    steps=12, chunk=5, seeds=3, eval_every=2, stop="wmv", stop_window=4, stop_patience=3, batch_strategy="vmap"
  )
  cfg = config.RunConfig(
    input=str(tmp_path / "a.png"), workdir=str(work), method="dip", sigma=25, save_float=True, net=config.TINY_NET
  )
  res = runner.run(dataclasses.replace(cfg, fit=fit_cfg))
  load = lambda name: np.load(os.path.join(work, "images", name + ".npy"))
  # final/ema: at the criterion's step; last/last_ema: the last state (the fixed-step result).
  for kind in ("final", "ema", "last", "last_ema"):
    runs = [load(f"a_seed{k}_{kind}") for k in range(3)]
    np.testing.assert_allclose(load(f"a_{kind}"), np.mean(runs, axis=0), atol=1e-6)
    assert np.abs(runs[0] - runs[1]).max() > 1e-3  # three different runs
  rec = json.load(open(work / "results.json"))["images"][0]
  clean = smooth_image(32, 32, 1, seed=1)
  clean = np.round(clean * 255) / 255  # as stored in the PNG
  assert rec["psnr_avg_final"] == pytest.approx(results.psnr(load("a_final"), clean), abs=1e-4)
  assert rec["psnr_avg_ema"] == pytest.approx(results.psnr(load("a_ema"), clean), abs=1e-4)
  assert rec["psnr_avg_last_ema"] == pytest.approx(results.psnr(load("a_last_ema"), clean), abs=1e-4)
  assert rec["runs"][1]["psnr_last"] == pytest.approx(results.psnr(load("a_seed1_last"), clean), abs=1e-4)
  # Per run: the chosen step, where its patience ran out, and the PSNR gap to the oracle step.
  for r in rec["runs"]:
    assert 0 < r["stop_step"] <= 12 and r["stop_gap_db"] == pytest.approx(r["oracle_best_psnr"] - r["psnr_final"])
  assert res["stop"] == "wmv" and rec["stop_step"] == pytest.approx(np.mean([r["stop_step"] for r in rec["runs"]]))
