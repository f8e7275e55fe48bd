"""Per-run and per-image records, their means, the per-step history files, and the
printed summary of a job."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from idip_jax import metrics, outputs, sure
from idip_jax.config import RunConfig
from idip_jax.data import Image
from idip_jax.fit import FitResult

# loss and psnr_y (output vs the noisy target y) are of the training pass, whose input is
# perturbed; psnr_perturbed is that output against the ground truth. psnr, ssim (output on
# the unperturbed input, the reported image) and the EMA's are filled every eval_every steps.
# sure_psnr and sure_psnr_ema (--stop=sure) are SURE's PSNR estimates of the output and the EMA on
# eval steps (no ground truth). stop_score (--stop=wmv|emv) is the criterion's variance after each
# step (empty before its window fills and once the run stopped); stopped is 1 from the step its
# patience ran out.
HISTORY_COLUMNS = (
  "loss",
  "psnr_y",
  "psnr",
  "psnr_ema",
  "ssim",
  "ssim_ema",
  "psnr_perturbed",
  "backtracked",
  "stop_score",
  "stopped",
  "sure_psnr",
  "sure_psnr_ema",
)
INT_COLUMNS = ("backtracked", "stopped")


def write_history(path: str, history: dict[str, np.ndarray]) -> None:
  """history: name -> per-step values of one run."""
  cols = [c for c in HISTORY_COLUMNS if c in history]
  n = len(history[cols[0]])

  def cell(c, v):
    if c in INT_COLUMNS:
      return int(v)
    return "" if np.isnan(v) else f"{v:.6g}"  # eval columns are empty between eval steps

  with outputs.atomic_open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["step"] + cols)
    for t in range(n):
      w.writerow([t + 1] + [cell(c, history[c][t]) for c in cols])


def read_history(path: str) -> dict[str, np.ndarray]:
  """history.csv -> name -> per-step values; empty cells (steps not evaluated) are NaN."""
  with open(path) as f:
    rows = list(csv.DictReader(f))
  return {k: np.array([float(r[k]) if r[k] != "" else np.nan for r in rows]) for k in rows[0]}


def psnr(a, b, clip: bool = True) -> float:
  return float(metrics.psnr(jnp.asarray(a), jnp.asarray(b), clip=clip))


def ssim(a, b) -> float:
  return float(metrics.ssim(jnp.asarray(a), jnp.asarray(b)))


MEAN_KEYS = (
  "psnr_noisy",
  "psnr_prelim",
  "psnr_final",
  "psnr_ema",
  "ssim_final",
  "ssim_ema",
  "psnr_avg_final",
  "psnr_avg_ema",
  "psnr_last",
  "psnr_last_ema",
  "psnr_avg_last",
  "psnr_avg_last_ema",
  "oracle_best_psnr",
  "oracle_best_step",
  "stop_step",
  "stop_gap_db",
  "stop_step_ema",
  "sure_psnr_final",
  "sure_psnr_ema",
  "psnr_sure_blend",
  "psnr_sure_xbar",
  "oracle_psnr_sure_blend",
  "seconds",
)


def summarize(records: list[dict]) -> dict:
  """Means over the images whose fit did not fail; "failed" counts the others."""
  ok = [r for r in records if not r.get("failed")]
  mean = {"failed": len(records) - len(ok)}
  for k in MEAN_KEYS:
    vals = [r[k] for r in ok if r.get(k) is not None]
    if vals and len(vals) == len(ok):
      mean[k] = float(np.mean(vals))
  return mean


def barrier(name: str, n_proc: int) -> None:
  if n_proc > 1:
    multihost_utils.sync_global_devices(name)


def merge_processes(results: dict, images: list[Image], results_path: str, t_start: float) -> dict:
  """Every process's image records, gathered over the network (no shared disk needed);
  process 0 writes them, in input order, to results_path (the job's results.json)."""
  blob = np.frombuffer(json.dumps(results["images"], default=float).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([blob.size]))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[: blob.size] = blob
  blobs = multihost_utils.process_allgather(padded)
  records = {}
  for n, row in zip(np.ravel(sizes), blobs):
    records.update({r["name"]: r for r in json.loads(bytes(row[:n]).decode())})
  merged = dict(
    results,
    images=[records[im.name] for im in images if im.name in records],
    processes=jax.process_count(),
    wall_seconds=time.perf_counter() - t_start,
  )
  # The job's counts, not process 0's share of them.
  merged.update(expected_images=len(images), finished_images=len(merged["images"]))
  merged["complete"] = merged["finished_images"] == len(images)
  merged["mean"] = summarize(merged["images"])
  if jax.process_index() == 0:
    outputs.write_json(results_path, merged)
  barrier("results", jax.process_count())
  return merged


@dataclasses.dataclass(frozen=True)
class Recording:
  """What a run's records depend on besides its results: the step count and runs per image, the known
  sigma (SURE blends) and which images are written."""

  steps: int
  seeds: int = 1
  sigma: float = 0.0
  save_images: bool = True
  save_float: bool = False


def recording_of(cfg: RunConfig) -> Recording:
  return Recording(cfg.fit.steps, cfg.fit.seeds, cfg.sigma, cfg.save_images, cfg.save_float)


def run_record(
  rc: Recording,
  im: Image,
  k: int,
  res: FitResult,
  j: int,
  img_dir: str,
  hist_dir: str,
  batch_runs: int,
  candidates: dict | None = None,
) -> dict:
  """Run j of a fit (its row in res); candidates (--stop=sure): the image's x_bar candidates
  (sure_twins.inputs) that NAME_sure.png blends with the run's output and EMA."""
  h, w, _ = im.noisy_HxWxC.shape
  final, ema = res.final_NxHxWxC[j, :h, :w], res.ema_NxHxWxC[j, :h, :w]
  tag = im.name if rc.seeds == 1 else f"{im.name}_seed{k}"
  hist = {name: v[:, j] for name, v in res.history.items()}
  write_history(os.path.join(hist_dir, tag + ".csv"), hist)
  rec = {
    "seed": k,
    "final": final,
    "ema": ema,
    "seconds": res.seconds,
    "compile_seconds": res.compile_seconds,
    "batch_runs": batch_runs,
    "backtracks": int(hist["backtracked"].sum()),
    # Backtracking keeps a run finite unless it was never finite; then it is reported as failed.
    "failed": not (np.isfinite(final).all() and np.isfinite(ema).all()),
  }
  if res.stop_step_N is not None:
    stopped = np.flatnonzero(hist.get("stopped", []))
    # The step the criterion chose (its images are the reported ones) and the step its patience
    # ran out (None: it never did, and the run went on to --steps).
    rec.update(stop_step=int(res.stop_step_N[j]), stopped_at=int(stopped[0]) + 1 if stopped.size else None)
    # The last state: the fixed-step result of a watched run.
    rec.update(last=res.last_NxHxWxC[j, :h, :w], last_ema=res.last_ema_NxHxWxC[j, :h, :w])
  if res.sure_N is not None:
    rec.update(sure_record(rc, im, res.sure_N, j, final, ema, candidates))
  if rc.save_images:
    save_outputs(rc, img_dir, tag, {k: rec[k] for k in OUTPUT_KINDS if k in rec})
  if im.clean_HxWxC is not None and not rec["failed"]:
    best = int(np.nanargmax(hist["psnr"]))  # clean-input output, on evaluated steps
    rec.update(
      psnr_final=psnr(final, im.clean_HxWxC),
      psnr_ema=psnr(ema, im.clean_HxWxC),
      ssim_final=ssim(final, im.clean_HxWxC),
      ssim_ema=ssim(ema, im.clean_HxWxC),
      oracle_best_psnr=float(hist["psnr"][best]),
      oracle_best_step=best + 1,
    )
    if "sure" in rec:  # the SURE blends: with the fit, and of the x_bar candidates alone
      rec.update(
        psnr_sure_blend=psnr(rec["sure"], im.clean_HxWxC), psnr_sure_xbar=psnr(rec["xbar_blend"], im.clean_HxWxC)
      )
    if "stop_step" in rec:  # what stopping without ground truth cost against the oracle step
      rec["stop_gap_db"] = rec["oracle_best_psnr"] - rec["psnr_final"]
      # The last state's images: the fixed-step result when the run went on to --steps.
      rec.update(psnr_last=psnr(rec["last"], im.clean_HxWxC), psnr_last_ema=psnr(rec["last_ema"], im.clean_HxWxC))
  return rec


def sure_record(rc: Recording, im: Image, sure_n: dict, j: int, final, ema, candidates: dict | None) -> dict:
  """--stop=sure: SURE's step for the EMA, SURE's PSNR estimates of the reported output and EMA,
  and (with candidates) the SURE blend of both with the x_bar candidates (NAME_sure.png; each
  divergence from the same probe b), beside the candidates' own SURE blend."""
  rec = {
    "stop_step_ema": int(sure_n["step_ema"][j]),
    "sure_psnr_final": sure.psnr_of_mse(float(sure_n["mse"][j])),
    "sure_psnr_ema": sure.psnr_of_mse(float(sure_n["mse_ema"][j])),
  }
  if not candidates:
    return rec
  y, names, outs, divs = im.noisy_HxWxC, candidates["names"], candidates["outputs"], candidates["divs"]
  fit_div = [float(sure_n["div"][j]), float(sure_n["div_ema"][j])]
  blend, info = sure.blend_image(y, ["fit", "fit_ema", *names], [final, ema, *outs], fit_div + divs, rc.sigma)
  xbar_blend, xinfo = sure.blend_image(y, names, outs, divs, rc.sigma)
  rec |= {
    "sure": np.clip(blend, 0.0, 1.0),
    "xbar_blend": np.clip(xbar_blend, 0.0, 1.0),
    "fit_sure_weights": info["sure_weights"],
    "fit_sure_psnr": info["sure_psnr"] | {"xbar_blend": xinfo["sure_psnr"]["blend"]},
  }
  gt = im.clean_HxWxC
  if gt is not None:  # each candidate's own PSNR, and the least-squares blend using gt (oracle)
    oracle = sure.blend([final, ema, *outs], sure.oracle_weights(gt, [final, ema, *outs]))
    rec["psnr_candidates"] = {c: psnr(o, gt) for c, o in zip(names, outs)}
    rec["oracle_psnr_sure_blend"] = psnr(np.clip(oracle, 0.0, 1.0), gt)
  return rec


def image_record(rc: Recording, im: Image, xbar, runs: list[dict], img_dir: str) -> dict:
  h, w, c = im.noisy_HxWxC.shape
  gt = im.clean_HxWxC
  rec = {
    "name": im.name,
    "height": h,
    "width": w,
    "channels": c,
    "steps": rc.steps,
    "seconds": float(np.mean([r["seconds"] for r in runs])),
    "compile_seconds": runs[0]["compile_seconds"],
    "batch_runs": runs[0]["batch_runs"],
    "backtracks": sum(r["backtracks"] for r in runs),
    "failed": any(r["failed"] for r in runs),
    "psnr_noisy": None,
    "psnr_prelim": None,
  }
  # With K > 1 runs the image a user gets is their ensemble, the mean image of the K runs' outputs
  # (each of OUTPUT_KINDS; DIP's "average of two runs" gained +0.57 dB over its EMA): <name>_final.png.
  kinds = [k for k in OUTPUT_KINDS if k in runs[0]]
  ens = dict(zip(kinds, ensemble(runs, *kinds))) if len(runs) > 1 else {}
  if rc.save_images:
    save_outputs(rc, img_dir, im.name, {"noisy": im.noisy_HxWxC, "prelim": xbar} | ens)
  if "stop_step" in runs[0]:
    rec["stop_step"] = float(np.mean([r["stop_step"] for r in runs]))
    rec["stopped_at"] = [r["stopped_at"] for r in runs]
  for key in ("stop_step_ema", "sure_psnr_final", "sure_psnr_ema"):  # --stop=sure: no ground truth needed
    if key in runs[0]:
      rec[key] = float(np.mean([r[key] for r in runs]))
  if "fit_sure_weights" in runs[0] and len(runs) == 1:
    rec.update({k: runs[0][k] for k in ("fit_sure_weights", "fit_sure_psnr", "psnr_candidates") if k in runs[0]})
  if gt is None or rec["failed"]:
    return rec
  rec["psnr_noisy"] = psnr(im.noisy_HxWxC, gt, clip=False)  # the noisy image as fitted
  if xbar is not None:
    rec["psnr_prelim"] = psnr(xbar, gt)
  keys = ["psnr_final", "psnr_ema", "ssim_final", "ssim_ema", "oracle_best_psnr", "oracle_best_step"]
  keys += ["stop_gap_db", "psnr_last", "psnr_last_ema"] if "stop_gap_db" in runs[0] else []
  keys += ["psnr_sure_blend", "psnr_sure_xbar", "oracle_psnr_sure_blend"] if "psnr_sure_blend" in runs[0] else []
  for key in keys:
    rec[key] = float(np.mean([r[key] for r in runs]))  # the mean of single runs
  if len(runs) > 1:
    rec.update({f"psnr_avg_{kind}": psnr(img, gt) for kind, img in ens.items()})
    rec["runs"] = [{k: r[k] for k in RUN_KEYS if k in r} for r in runs]
  return rec


RUN_KEYS = (
  "seed",
  "psnr_final",
  "psnr_ema",
  "ssim_final",
  "oracle_best_psnr",
  "oracle_best_step",
  "stop_step",
  "stopped_at",
  "stop_gap_db",
  "psnr_last",
  "psnr_last_ema",
  "stop_step_ema",
  "psnr_sure_blend",
  "fit_sure_weights",
)


# The images a run writes (NAME[_seedK]_KIND.png): the output and EMA (at the criterion's step under
# --stop) and, for watched runs, the last state's; with K > 1 runs NAME_KIND.png is their mean image.
# --stop=sure adds NAME_sure.png, the SURE blend of the output and EMA with the x_bar candidates.
OUTPUT_KINDS = ("final", "ema", "last", "last_ema", "sure")


def save_outputs(rc: Recording, img_dir: str, tag: str, images: dict[str, np.ndarray | None]) -> None:
  for kind, img in images.items():
    if img is not None:
      outputs.save_image(os.path.join(img_dir, f"{tag}_{kind}.png"), img, rc.save_float)


def ensemble(runs: list[dict], *keys: str) -> tuple[np.ndarray, ...]:
  """The mean image over the runs of each key's image."""
  return tuple(np.mean([r[k] for r in runs], axis=0) for k in keys)


def print_summary(results: dict) -> None:
  cols = ["psnr_noisy", "psnr_prelim", "psnr_final", "psnr_ema", "oracle_best_psnr"]
  head = "name            noisy  prelim   final     ema  oracle_best"
  if results.get("seeds", 1) > 1:  # the ensemble is what a user gets
    cols, head = cols + ["psnr_avg_final", "psnr_avg_ema"], head + " ens_fin ens_ema"
  if any("stop_step" in r for r in results["images"]):
    cols, head = cols + ["stop_step"], head + "    stop"
  print(head)
  fmt = lambda v: f"{v:7.2f}" if isinstance(v, float) else "      -"
  for r in results["images"] + [dict(results["mean"], name="MEAN")]:
    print(f"{r['name'][:14]:14s} " + " ".join(fmt(r.get(c)) for c in cols))
