"""How close does SURE along a fit (--stop=sure) stop to the oracle step?

A table from runs made with --stop=sure (experiments/studies/sure/*.flags) and, for the comparison, the same
fits with --stop=wmv (ES-WMV).

Per image: the oracle step's PSNR (best eval step, uses the ground truth), SURE's step's, ES-WMV's,
the fixed-step result; how far SURE's PSNR estimate is from the truth along the history; and the
SURE blends (x_bar candidates alone, and with the fit's output and EMA: NAME_sure.png) beside
FFDNet and the oracle blend.

  python experiments/studies/sure_fits.py --sf_name=holdout9_dip --sf_sure=RUN_DIR [--sf_wmv=RUN_DIR]
  (writes experiments/results/sure/fits_<name>.{json,md}; reads only results.json and history/)
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from idip_jax import outputs, results

F = flags.FLAGS
flags.DEFINE_string("sf_name", "", "table name: fits_<name>.{json,md}")
flags.DEFINE_string("sf_sure", "", "--workdir of the --stop=sure run")
flags.DEFINE_string("sf_wmv", "", "--workdir of the same fits with --stop=wmv (optional)")
flags.DEFINE_string("sf_command", "", "the commands that made the runs (recorded in the table)")
flags.DEFINE_string("sf_results", "", "output folder (default experiments/results/sure)")
flags.DEFINE_integer("sf_burn_in", 50, "SURE's estimate error is averaged over eval steps after this one")


def estimate_error(h: dict, burn_in: int) -> dict:
  """SURE's PSNR estimate minus the true PSNR over the eval steps after burn_in: mean and mean |.|."""
  out = {}
  for est, true in (("sure_psnr", "psnr"), ("sure_psnr_ema", "psnr_ema")):
    keep = ~np.isnan(h[est]) & (h["step"] > burn_in)
    d = h[est][keep] - h[true][keep]
    out[true] = {"mean": float(np.mean(d)), "mean_abs": float(np.mean(np.abs(d)))}
  return out


NOISE_STDS = (0.05, 0.1, 0.2, 0.4)  # dB: white-noise estimate errors tried on each true curve


def noise_shortfall(curve: np.ndarray, std: float, draws: int = 200) -> float:
  """How far below the curve's best eval step the best step of curve + white noise of this std lands, on
  average (seeded): what an estimate of the PSNR with that much independent error per eval step loses."""
  noisy = curve[None] + np.random.default_rng(0).normal(0.0, std, (draws, len(curve)))
  return float(curve.max() - curve[np.argmax(noisy, axis=1)].mean())


def estimate_noise(h: dict, burn_in: int) -> dict:
  """Per curve (output, EMA): the std of SURE's error after burn_in, the shortfall white noise of that std
  would cause, and the shortfall at each of NOISE_STDS."""
  out = {}
  for est, true in (("sure_psnr", "psnr"), ("sure_psnr_ema", "psnr_ema")):
    ev = ~np.isnan(h[est])
    std = float(np.std((h[est] - h[true])[ev & (h["step"] > burn_in)]))
    curve = h[true][ev]
    out[true] = {"std": std, "shortfall": noise_shortfall(curve, std)}
    out[true] |= {f"shortfall_{s:g}": noise_shortfall(curve, s) for s in NOISE_STDS}
  return out


def table(sure_run: dict, wmv_run: dict | None, workdir: str, burn_in: int) -> list[dict]:
  wmv = {r["name"]: r for r in (wmv_run or {}).get("images", [])}
  rows = []
  for r in sure_run["images"]:
    h = results.read_history(os.path.join(workdir, "history", r["name"] + ".csv"))
    row = {
      "image": r["name"],
      "oracle_step": r["oracle_best_step"],
      "psnr_oracle_step": r["oracle_best_psnr"],
      "sure_step": r["stop_step"],
      "psnr_sure_step": r["psnr_final"],
      "psnr_fixed": r["psnr_last"],
      "psnr_ema_fixed": r["psnr_last_ema"],
      "psnr_ema_sure_step": r["psnr_ema"],
      "psnr_ema_oracle_step": float(np.nanmax(h["psnr_ema"])),
      "estimate_error": estimate_error(h, burn_in),
      "estimate_noise": estimate_noise(h, burn_in),
      "psnr_sure_xbar": r.get("psnr_sure_xbar"),
      "psnr_sure_blend": r.get("psnr_sure_blend"),
      "oracle_psnr_sure_blend": r.get("oracle_psnr_sure_blend"),
      "psnr_candidates": r.get("psnr_candidates", {}),
      "fit_sure_weights": r.get("fit_sure_weights", {}),
    }
    if r["name"] in wmv:
      w = wmv[r["name"]]
      # against its own run's oracle: the ES-WMV fit is another run of the same settings (rounding differs)
      row.update(
        wmv_step=w["stop_step"], psnr_wmv_step=w["psnr_final"], wmv_gap=w["psnr_final"] - w["oracle_best_psnr"]
      )
    rows.append(row)
  return rows


COLUMNS = (
  ("oracle step", "psnr_oracle_step"),
  ("SURE step", "psnr_sure_step"),
  ("ES-WMV step", "psnr_wmv_step"),
  ("last step", "psnr_fixed"),
  ("EMA, oracle step", "psnr_ema_oracle_step"),
  ("EMA, SURE step", "psnr_ema_sure_step"),
  ("EMA, last", "psnr_ema_fixed"),
  ("FFDNet", None),
  ("SURE blend of x_bar candidates", "psnr_sure_xbar"),
  ("SURE blend with the fit (NAME_sure.png)", "psnr_sure_blend"),
  ("oracle blend with the fit", "oracle_psnr_sure_blend"),
)


def value(row: dict, key: str | None):
  return row["psnr_candidates"].get("ffdnet") if key is None else row.get(key)


def markdown(doc: dict) -> str:
  rows = doc["rows"]
  fmt = lambda v: "-" if v is None else f"{v:.2f}"
  lines = [
    f"# SURE along the fits: {doc['name']}",
    "",
    f"{doc['method']}, {doc['steps']} steps, sigma {doc['sigma']:g}, --sure_eps={doc['sure_eps']:g}; fits on "
    f"{doc['device']} at commit {doc['commit']}, {doc['date']}. Command: `{doc['command']}`. PSNR (dB) against "
    "the ground truth; columns marked oracle use it to choose, SURE and ES-WMV do not.",
    "",
    "| image | " + " | ".join(c for c, _ in COLUMNS) + " | steps: oracle / SURE / ES-WMV |",
    "|---" * (len(COLUMNS) + 2) + "|",
  ]
  for r in rows:
    steps = f"{r['oracle_step']:g} / {r['sure_step']:g} / " + (f"{r['wmv_step']:g}" if "wmv_step" in r else "-")
    lines.append(f"| {r['image']} | " + " | ".join(fmt(value(r, k)) for _, k in COLUMNS) + f" | {steps} |")
  mean = doc["mean"]
  lines.append("| **mean** | " + " | ".join(fmt(mean.get(c)) for c, _ in COLUMNS) + " | |")
  err = doc["estimate_error"]
  lines += [
    "",
    f"SURE step minus oracle step: {mean['gap_sure']:+.2f} dB (EMA: {mean['gap_sure_ema']:+.2f} dB)"
    + (f"; ES-WMV step minus its run's oracle step: {mean['gap_wmv']:+.2f} dB" if "gap_wmv" in mean else "")
    + ". SURE's PSNR estimate minus the true PSNR over eval steps after "
    f"{doc['burn_in']}: output {err['psnr']['mean']:+.2f} dB (mean |error| {err['psnr']['mean_abs']:.2f}), EMA "
    f"{err['psnr_ema']['mean']:+.2f} dB ({err['psnr_ema']['mean_abs']:.2f}).",
  ]
  if "estimate_noise" in doc:  # tables made before 2026-12-02 19:30 UTC do not have it
    noise = doc["estimate_noise"]
    at = lambda k: ", ".join(f"{s:g} dB -> {noise[k][f'shortfall_{s:g}']:.2f}" for s in NOISE_STDS)
    lines += [
      "",
      "How much of SURE's shortfall its estimate's noise explains: the std of SURE's error over those eval steps is "
      f"{noise['psnr']['std']:.2f} dB for the output and {noise['psnr_ema']['std']:.2f} for the EMA (mean over "
      "images); white noise of that std added to each true curve would pick steps "
      f"{noise['psnr']['shortfall']:.2f} / {noise['psnr_ema']['shortfall']:.2f} dB below the oracle step (200 "
      f"seeded draws). White noise of a given std costs, output: {at('psnr')}; EMA: {at('psnr_ema')}.",
    ]
  return "\n".join(lines) + "\n"


def summarize(rows: list[dict]) -> dict:
  mean = {}
  for c, k in COLUMNS:
    vals = [value(r, k) for r in rows]
    if all(v is not None for v in vals):
      mean[c] = float(np.mean(vals))
  mean["gap_sure"] = mean["SURE step"] - mean["oracle step"]
  mean["gap_sure_ema"] = mean["EMA, SURE step"] - mean["EMA, oracle step"]
  if "ES-WMV step" in mean:
    mean["gap_wmv"] = float(np.mean([r["wmv_gap"] for r in rows]))
  return mean


def main(argv):
  del argv
  run = outputs.read_json(os.path.join(F.sf_sure, "results.json"))
  cfg = outputs.read_json(os.path.join(F.sf_sure, "config.json"))
  wmv = outputs.read_json(os.path.join(F.sf_wmv, "results.json")) if F.sf_wmv else None
  rows = table(run, wmv, F.sf_sure, F.sf_burn_in)
  errs = [r["estimate_error"] for r in rows]
  doc = {
    "name": F.sf_name,
    "method": run["method"],
    "steps": run["steps"],
    "sigma": run["sigma"],
    "sure_eps": cfg["fit"].get("sure_eps", 0.01),  # runs made before the flag: its first value
    "device": run["device"],
    "commit": run["commit"],
    "date": run["date"],
    "command": F.sf_command,
    "burn_in": F.sf_burn_in,
    "table": outputs.provenance(),
    "rows": rows,
    "mean": summarize(rows),
    "estimate_error": {
      k: {s: float(np.mean([e[k][s] for e in errs])) for s in ("mean", "mean_abs")} for k in ("psnr", "psnr_ema")
    },
    "estimate_noise": {
      k: {s: float(np.mean([r["estimate_noise"][k][s] for r in rows])) for s in rows[0]["estimate_noise"][k]}
      for k in ("psnr", "psnr_ema")
    },
  }
  out = F.sf_results or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "sure")
  outputs.write_table(out, f"fits_{F.sf_name}", doc, markdown(doc))
  print(markdown(doc))


if __name__ == "__main__":
  app.run(main)
