"""Why does IDIP not beat its own x_bar (issue 22)? One change at a time from the default IDIP,
on the same noisy images and x_bar, with the clean-input PSNR curve of each run beside x_bar's PSNR.

python experiments/faithfulness.py --flagfile=experiments/faithfulness/study.flags
Writes <out>.json (per variant and image: x_bar PSNR, peak clean-input PSNR and its step, final
and EMA PSNR at the last step; the commit and command) after every variant, and <out>.md.

Full size on a 2-core CPU: one process per image, each pinned to a core with Eigen's threads off
(1.28x one process's image rate, README "On CPU"), then one table from their files:
python experiments/faithfulness.py --merge_studies=a.json,b.json --out=experiments/results/faithfulness/full
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from idip_jax import config, data, outputs, prelim, results, resume, runner  # noqa: E402

F = flags.FLAGS
config.define_flags(F, config.RunConfig)  # the default IDIP run: --sigma, --noise, --crop, --steps, ...
config.define_flags(F, config.ExperimentConfig)
flags.DEFINE_list("images", ["classic10/cameraman", "holdout9/baboon", "holdout9/foreman"], "set/name of each image")
flags.DEFINE_bool(
  "reuse_finished",
  False,
  "a variant whose workdir holds the same job (resume.finished_job: same settings and code) with every --images "
  "image is read, not refitted; an unfinished one continues from its last checkpoint (--resume's rule)",
)
flags.DEFINE_list(
  "merge_studies",
  [],
  "study JSON files (same sigma, crop, x_bar) to combine into --out per variant and image; fits nothing",
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
  if F.merge_studies:
    return write_merged(F.merge_studies, F.out, F.overwrite)
  base = dataclasses.replace(
    config.from_flags(F, config.RunConfig), input=",".join(F.images), image_channels=1, save_images=False
  )
  out = F.out or "experiments/results/faithfulness/study"
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
    res = finished(cfg, images) if F.reuse_finished else None
    if res is None and F.reuse_finished and os.path.isfile(os.path.join(cfg.workdir, "config.json")):
      # An interrupted variant goes on from its last checkpoint (a full-size fit takes ~30 min on the CPU).
      print(f"resuming {cfg.workdir}", flush=True)
      cfg = dataclasses.replace(cfg, resume=True, overwrite=False)
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
        "fit_commit": res["commit"],  # the code that fitted it (--reuse_finished reads older fits)
        "fit_device": res["device"],
      }
    meta["variants"][name] = {"method": method, "changes": {**run_kw, **fit_kw}, "steps": res["steps"], "images": rows}
    write_study(meta, out)  # incremental
    print(
      f"{name}: "
      + ", ".join(f"{n} peak {v['peak']:.2f}@{v['peak_step']} x_bar {v['xbar']:.2f}" for n, v in rows.items()),
      flush=True,
    )


def write_study(meta: dict, out: str) -> None:
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  outputs.write_json(out + ".json", meta)
  write_markdown(meta, out + ".md")
  plot_curves(meta, out + "_curves.png")


def image_names(variants: dict) -> list[str]:
  """Every image of the study, in first-seen order (the columns of the table)."""
  return list(dict.fromkeys(img for v in variants.values() for img in v["images"]))


def merge(studies: list[dict]) -> dict:
  """One study from several (e.g. one process per image): variants in first-seen order, each (variant, image) once."""
  keys = ("sigma", "crop", "prelim")
  for s in studies[1:]:
    if any(s[k] != studies[0][k] for k in keys):
      raise ValueError(f"--merge_studies: the files differ in {', '.join(k for k in keys if s[k] != studies[0][k])}")
  variants = {}
  for s in studies:
    for name, v in s["variants"].items():
      m = variants.setdefault(name, {**v, "images": {}})
      if (m["method"], m["changes"], m["steps"]) != (v["method"], v["changes"], v["steps"]):
        raise ValueError(f"--merge_studies: variant {name} has other settings or steps in another file")
      for img, r in v["images"].items():
        if img in m["images"]:
          raise ValueError(f"--merge_studies: variant {name}, image {img} is in two files")
        # Older files kept the fit's commit per variant.
        m["images"][img] = {"fit_commit": v.get("fit_commit"), "fit_device": v.get("fit_device"), **r}
  images = image_names(variants)
  for v in variants.values():  # the same image order in every row
    v["images"] = {img: v["images"][img] for img in images if img in v["images"]}
  steps = max(v["steps"] for v in variants.values())
  return {**{k: studies[0][k] for k in keys}, "steps": steps, "variants": variants}


def write_merged(paths: list[str], out: str | None, overwrite: bool) -> None:
  if not out:
    sys.exit("error: --merge_studies needs --out")
  if os.path.exists(out + ".json") and not overwrite:
    sys.exit(f"error: {out}.json exists: add --overwrite to replace it")
  if any(os.path.abspath(out + ".json") == os.path.abspath(p) for p in paths):
    sys.exit(f"error: --out {out} would overwrite one of the --merge_studies files")
  studies = []
  for p in paths:
    try:
      with open(p) as f:
        studies.append(json.load(f))
    except (OSError, ValueError) as e:
      sys.exit(f"error: --merge_studies: cannot read {p}: {e}")
  try:
    merged = merge(studies)
  except ValueError as e:
    sys.exit(f"error: {e}")
  meta = {**outputs.provenance(), "command": "python experiments/faithfulness.py " + " ".join(sys.argv[1:])}
  write_study({**meta, "merged_from": paths, **merged}, out)


def finished(cfg: config.RunConfig, images: list[data.Image]) -> dict | None:
  """The stored results of these images in cfg.workdir (written incrementally by the runner), if all are
  there and the folder holds the same job (resume.finished_job: sigma, crop, noise, x_bar, steps, code...)."""
  res, why = resume.finished_job(runner.resolve(cfg, runner.image_channels(images)), F.allow_other_code)
  if res is not None:
    recs = {r["name"]: r for r in res["images"]}
    if all(im.name in recs for im in images):
      print(f"{why} ({res['commit']})", flush=True)
      return dict(res, images=[recs[im.name] for im in images])
    why = f"{cfg.workdir} holds {len(recs)} of the {len(images)} images"
  if why:
    print(f"not reusing: {why}", flush=True)
  return None


def plot_curves(meta: dict, path: str) -> None:
  """Clean-input PSNR minus x_bar's PSNR vs step, one line per variant and image (0 = x_bar)."""
  lines = {}
  images = image_names(meta["variants"])
  dashes = ("-", "--", ":", "-.")
  for i, (name, v) in enumerate(meta["variants"].items()):  # colour: the variant; line style: the image
    for img, r in v["images"].items():
      style = f"C{i % 10}{dashes[images.index(img) % len(dashes)]}"
      lines[f"{name} {img}"] = (r["curve_steps"], np.array(r["curve"]) - r["xbar"], style)
  lines["x_bar"] = ([1, meta["steps"]], [0.0, 0.0], "k--")
  outputs.plot_xy(path, "IDIP - x_bar (clean-input output, oracle view)", lines, "step", "PSNR - PSNR(x_bar) (dB)", -3)


def write_markdown(meta: dict, path: str) -> None:
  names = image_names(meta["variants"])
  lines = [
    f"# IDIP faithfulness study ({meta['device']})",
    "",
    f"Commit {meta['commit']}, {meta['date']}. `{meta['command']}`. sigma {meta['sigma']}, crop "
    f"{meta['crop'] or 'full'}, x_bar {meta['prelim']}. Per image: peak of the clean-input PSNR (oracle: "
    "uses the ground truth) and its step, final and EMA PSNR at the last step, x_bar's PSNR; dB.",
  ]
  rows = [r for v in meta["variants"].values() for r in v["images"].values()]
  fits = sorted({(r.get("fit_commit"), r.get("fit_device")) for r in rows})
  if any(c != meta["commit"] for c, _ in fits):
    lines.append("Fits read back (--reuse_finished) from: " + ", ".join(f"commit {c} on {d}" for c, d in fits) + ".")
  if meta.get("merged_from"):
    lines.append("Merged from: " + ", ".join(f"`{p}`" for p in meta["merged_from"]) + " (their commands are inside).")
  lines += [
    "",
    "| variant | changes | steps | "
    + " | ".join(f"{n}: peak (step) / final / EMA / x_bar" for n in names)
    + " | mean - x_bar: final / EMA / peak |",
    "|" + "---|" * (len(names) + 4),
  ]
  for name, v in meta["variants"].items():
    cells = [
      f"{r['peak']:.2f} ({r['peak_step']}) / {r['final']:.2f} / {r['ema']:.2f} / {r['xbar']:.2f}"
      if (r := v["images"].get(n))
      else "-"
      for n in names
    ]
    # Final PSNR at the fixed step count is the headline; the peak is an oracle.
    gaps = " / ".join(
      f"{np.mean([r[k] - r['xbar'] for r in v['images'].values()]):+.2f}" for k in ("final", "ema", "peak")
    )
    part = "" if len(v["images"]) == len(names) else f" ({len(v['images'])} of {len(names)} images)"
    lines.append(f"| {name} | {v['changes'] or '-'} | {v['steps']} | " + " | ".join(cells) + f" | {gaps}{part} |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  app.run(main)
