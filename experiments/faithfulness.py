"""Why does IDIP not beat its own x_bar (issue 22)? One change at a time from the default IDIP,
on the same noisy images and x_bar, with the clean-input PSNR curve of each run beside x_bar's PSNR.

python experiments/faithfulness.py --flagfile=experiments/faithfulness/study.flags
Writes <out>.json (per variant and image: x_bar PSNR, peak clean-input PSNR and its step, final
and EMA PSNR at the last step; the commit and command) after every variant, and <out>.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from idip_jax import config, data, outputs, prelim, results, runner  # noqa: E402

F = flags.FLAGS
config.define_flags(F, config.RunConfig)  # the default IDIP run: --sigma, --noise, --crop, --steps, ...
config.define_flags(F, config.ExperimentConfig)
flags.DEFINE_list("images", ["classic10/cameraman", "holdout9/baboon", "holdout9/foreman"], "set/name of each image")
flags.DEFINE_bool(
  "reuse_finished",
  False,
  "a variant whose workdir's results.json already holds every --images image (e.g. an interrupted run's) is read, "
  "not refitted",
)
flags.DEFINE_list("variants", list(("idip", "w0.5", "w0.25", "lr0.001", "xbar_noise0", "uint8", "dip")), "see VARIANTS")

# name -> (method, RunConfig overrides, FitConfig overrides): one change from the default IDIP each.
VARIANTS = {
  "idip": ("idip", {}, {}),
  "w0.5": ("idip", {}, {"prelim_weight": 0.5}),
  "w0.25": ("idip", {}, {"prelim_weight": 0.25}),
  "lr0.001": ("idip", {}, {"lr": 0.001}),
  "xbar_noise0": ("idip", {}, {"xbar_noise_std": 0.0}),
  "uint8": ("idip", {"noise": "uint8"}, {}),  # the noisy image rounded to 8 bits (x_bar made from it)
  "dip": ("dip", {}, {}),  # DIP on the same noise
}


def load(cfg: config.RunConfig) -> list[data.Image]:
  ddir = F.data_dir or os.path.join(data.shared_dir(), "data")
  images = []
  for spec in F.images:
    folder, name = spec.split("/")
    path = data.find_image(os.path.join(ddir, folder), name)
    if path is None:
      raise data.InputError(f"--images: no image {spec} in {ddir}")
    images += data.load_images(path, cfg.sigma, cfg.noise_seed, 1, cfg.crop, cfg.noise, min_size=2**cfg.net.scales)
  return images


def main(argv):
  del argv
  base = dataclasses.replace(
    config.from_flags(F, config.RunConfig), input=",".join(F.images), image_channels=1, save_images=False
  )
  out = F.out or "experiments/results/faithfulness/study"
  os.makedirs(os.path.dirname(out), exist_ok=True)
  top = base.workdir or "runs/faithfulness"
  meta = {
    **outputs.provenance(),
    "command": "python experiments/faithfulness.py " + " ".join(sys.argv[1:]),
    "sigma": base.sigma,
    "crop": base.crop,
    "steps": base.fit.steps,
    "prelim": base.prelim.name,
    "variants": {},
  }
  xbars = {}  # noise protocol -> (images, x_bar by name)
  for name in F.variants:
    method, run_kw, fit_kw = VARIANTS[name]
    cfg = dataclasses.replace(
      base, method=method, workdir=os.path.join(top, name), **run_kw, fit=dataclasses.replace(base.fit, **fit_kw)
    )
    if cfg.noise not in xbars:
      images = load(cfg)
      xbars[cfg.noise] = (images, dict(zip([im.name for im in images], prelim.make(cfg, images))))
    images, xbar = xbars[cfg.noise]
    clean = {im.name: im.clean_HxWxC for im in images}
    res = finished(cfg, [im.name for im in images]) if F.reuse_finished else None
    res = res or runner.run(cfg, images=images, prelim_images=xbar)
    rows = {}
    for r in res["images"]:
      h = results.read_history(os.path.join(cfg.workdir, "history", r["name"] + ".csv"))
      best = int(np.nanargmax(h["psnr"]))
      rows[r["name"]] = {
        "xbar": results.psnr(xbar[r["name"]], clean[r["name"]]),
        "peak": float(h["psnr"][best]),
        "peak_step": best + 1,
        "final": r["psnr_final"],
        "ema": r["psnr_ema"],
        "curve_steps": (np.flatnonzero(~np.isnan(h["psnr"])) + 1).tolist(),
        "curve": h["psnr"][~np.isnan(h["psnr"])].tolist(),
      }
    meta["variants"][name] = {
      "method": method,
      "changes": {**run_kw, **fit_kw},
      "steps": res["steps"],
      "fit_commit": res["commit"],  # the code that fitted it (--reuse_finished reads older fits)
      "fit_device": res["device"],
      "images": rows,
    }
    outputs.write_json(out + ".json", meta)  # incremental
    write_markdown(meta, out + ".md")
    plot_curves(meta, out + "_curves.png")
    print(
      f"{name}: "
      + ", ".join(f"{n} peak {v['peak']:.2f}@{v['peak_step']} x_bar {v['xbar']:.2f}" for n, v in rows.items()),
      flush=True,
    )


def finished(cfg: config.RunConfig, names: list[str]) -> dict | None:
  """The stored results of these images in cfg.workdir (written incrementally by the runner), if all are there."""
  path = os.path.join(cfg.workdir, "results.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    res = json.load(f)
  recs = {r["name"]: r for r in res["images"]}
  if not all(n in recs for n in names) or res["steps"] != cfg.fit.steps:
    return None
  print(f"reusing {path} ({res['commit']})", flush=True)
  return dict(res, images=[recs[n] for n in names])


def plot_curves(meta: dict, path: str) -> None:
  """Clean-input PSNR minus x_bar's PSNR vs step, one line per variant and image (0 = x_bar)."""
  lines = {}
  for name, v in meta["variants"].items():
    for img, r in v["images"].items():
      lines[f"{name} {img}"] = (r["curve_steps"], np.array(r["curve"]) - r["xbar"], "-")
  lines["x_bar"] = ([1, meta["steps"]], [0.0, 0.0], "k--")
  outputs.plot_xy(path, "IDIP - x_bar (clean-input output, oracle view)", lines, "step", "PSNR - PSNR(x_bar) (dB)", -3)


def write_markdown(meta: dict, path: str) -> None:
  names = list(next(iter(meta["variants"].values()))["images"])
  lines = [
    f"# IDIP faithfulness study ({meta['device']})",
    "",
    f"Commit {meta['commit']}, {meta['date']}. `{meta['command']}`. sigma {meta['sigma']}, crop "
    f"{meta['crop'] or 'full'}, x_bar {meta['prelim']}. Per image: peak of the clean-input PSNR (oracle: "
    "uses the ground truth) and its step, final and EMA PSNR at the last step, x_bar's PSNR; dB.",
  ]
  fits = sorted({(v.get("fit_commit"), v.get("fit_device")) for v in meta["variants"].values()})
  if any(c != meta["commit"] for c, _ in fits):
    lines.append("Fits read back (--reuse_finished) from: " + ", ".join(f"commit {c} on {d}" for c, d in fits) + ".")
  lines += [
    "",
    "| variant | changes | steps | "
    + " | ".join(f"{n}: peak (step) / final / EMA / x_bar" for n in names)
    + " | mean peak - x_bar |",
    "|" + "---|" * (len(names) + 4),
  ]
  for name, v in meta["variants"].items():
    cells = [
      f"{r['peak']:.2f} ({r['peak_step']}) / {r['final']:.2f} / {r['ema']:.2f} / {r['xbar']:.2f}"
      for r in v["images"].values()
    ]
    gap = np.mean([r["peak"] - r["xbar"] for r in v["images"].values()])
    lines.append(f"| {name} | {v['changes'] or '-'} | {v['steps']} | " + " | ".join(cells) + f" | {gap:+.2f} |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  app.run(main)
