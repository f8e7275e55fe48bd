"""How many seconds of fitting does each method need to reach DIP's best PSNR on the same image?

Gray images; denoising, or --ttp_task=inpaint|sr (DIP's other tasks, where no x_bar exists). Per method (DIP;
DRP, Li et al. CVPR 2023: frozen random weights, the seed and the BatchNorms trained, one scale; IDIP with
FFDNet's x_bar; META: DIP from a meta-learned --ttp_init; META_IDIP: IDIP from a meta-learned --ttp_idip_init),
each image is fitted one run per call (so a run's seconds are its own) with its history every --ttp_eval_every
steps. DIP's best PSNR of an image is the oracle (found with the ground truth); a method's seconds to it are its
first evaluated step at or above it times its fitting seconds per step (compile excluded, reported apart). Also
the PSNR after --ttp_budget seconds of fitting.

  python experiments/speed/time_to_psnr.py --ttp_set=holdout9 --ttp_max_images=3 --ttp_crop=64 --ttp_sigma=25

Writes experiments/results/time_to_psnr/<set>_s<sigma>_<crop>.{json,md,png} (<set>_<task>_<crop> for inpaint
and sr); the JSON's `summary` holds one record per (method, set, task, sigma, size): seconds_to_dip_best,
steps_to_dip_best, speedup_vs_dip, psnr_at_30s, and each method's best and last output and EMA PSNR.
A finished fit of the same job and inputs in --ttp_workdir is read, not refitted (--ttp_reuse_only: only read).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys

import numpy as np
from absl import flags

from idip_jax import cli, config, data, inits, outputs, results, resume, runner
from idip_jax.data import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# method -> (run.py's method, x_bar, FitConfig overrides, NetConfig overrides). DRP: its denoising script
# (sun-umn/Deep-Random-Projector, 1_Denoising): skip net at 1 scale of width 64, the seed N(0, 0.1^2) with
# as many channels as the image, Adam at 0.1, sqrt(MSE) + 0.45 TV, no input perturbation.
DRP_FIT = (
  ("train", ("seed", "norms")),
  ("lr", 0.1),
  ("tv_weight", 0.45),
  ("data_loss", "rmse"),
  ("input_dist", "normal"),
  ("reg_noise_std", 0.0),
)
METHODS = {
  "DIP": ("dip", "none", (), ()),
  # DIP from a meta-learned init (--ttp_init: experiments/meta_init.py's init.npz, MetaDIP's idea); its seconds are
  # the fit's own: the meta-training, paid once for every image, is reported in its summary.json.
  "META": ("dip", "none", (), ()),
  "DRP": ("dip", "none", DRP_FIT, (("scales", 1), ("width", 64), ("in_channels", 0))),
  # DRP's super-resolution script (2_Super_Resolution): width 128, Adam at 0.5, TV weight 0.75 (the rest as above).
  "DRP_SR": (
    "dip",
    "none",
    tuple(dict(DRP_FIT, lr=0.5, tv_weight=0.75).items()),
    (("scales", 1), ("width", 128), ("in_channels", 0)),
  ),
  # Learning-rate schedules (the cheap route to fewer steps): DIP at 3x Adam's step, constant or decayed to 0 over
  # the run's steps (optax.cosine_decay_schedule).
  "DIP_LR3": ("dip", "none", (("lr", 0.03),), ()),
  "DIP_COS3": ("dip", "none", (("lr", 0.03), ("lr_schedule", "cosine")), ()),
  "IDIP": ("idip", "ffdnet", (), ()),
  # IDIP from a meta-learned IDIP init (--ttp_idip_init: meta_init.py --method=idip, x_bar from FFDNet per crop).
  "META_IDIP": ("idip", "ffdnet", (), ()),
  # DRP's two ideas on IDIP: x_bar as the input of DRP's frozen one-scale net, only its BatchNorms and the input's
  # trained correction fitted (Adam at 0.1), IDIP's loss MSE(out, y) + MSE(out, x_bar), no input perturbation.
  "IDIP_DRP": (
    "idip",
    "ffdnet",
    (("train", ("seed", "norms")), ("lr", 0.1), ("xbar_noise_std", 0.0)),
    (("scales", 1), ("width", 64)),
  ),
}

F = flags.FLAGS
flags.DEFINE_string("ttp_set", "holdout9", "test set (settings are chosen on holdout9 only)")
flags.DEFINE_integer("ttp_max_images", 3, "first N images of the set (0 = all)", lower_bound=0, upper_bound=1000)
flags.DEFINE_list("ttp_images", [], "these images of the set by name (file name without extension), not the first N")
flags.DEFINE_integer("ttp_crop", 64, "center crop side (0 = whole images)", lower_bound=0, upper_bound=65536)
flags.DEFINE_float("ttp_sigma", 25.0, "AWGN sigma (0-255), clipped as DIP's notebooks", lower_bound=1, upper_bound=255)
flags.DEFINE_list("ttp_methods", ["DIP", "DRP", "IDIP"], f"methods: {', '.join(METHODS)} (META needs --ttp_init)")
flags.DEFINE_list(
  "ttp_steps",
  ["DIP=1500", "DRP=1500", "IDIP=600", "IDIP_DRP=600", "META=600", "META_IDIP=600"],
  "METHOD=steps of each fit",
)
flags.DEFINE_enum(
  "ttp_task",
  "denoise",
  ["denoise", "inpaint", "sr"],
  "denoise (AWGN of --ttp_sigma) | inpaint (half "
  "the pixels, bernoulli:0.5) | sr (x4 from the Lanczos-downsampled image); IDIP only denoises",
)
flags.DEFINE_string("ttp_init", "", "META: the meta-learned init (init.npz of experiments/meta_init.py, default net)")
flags.DEFINE_string("ttp_idip_init", "", "META_IDIP: the meta-learned IDIP init (meta_init.py --method=idip)")
flags.DEFINE_integer("ttp_eval_every", 10, "steps between history rows", lower_bound=1, upper_bound=10000)
flags.DEFINE_float("ttp_budget", 30.0, "seconds of fitting per image for the PSNR-at-budget column", lower_bound=0.1)
flags.DEFINE_string("ttp_workdir", "runs/time_to_psnr", "where the fits go (a finished fit of the same job is reused)")
flags.DEFINE_bool("ttp_reuse_only", False, "write the files from finished fits only; one that would run is an error")
flags.DEFINE_string("ttp_out", os.path.join(ROOT, "experiments", "results", "time_to_psnr"), "results folder")


INIT_FLAGS = {"META": "ttp_init", "META_IDIP": "ttp_idip_init"}  # method -> the flag naming the init it fits from


def check_flags() -> tuple[list[str], dict[str, int]]:
  unknown = [m for m in F.ttp_methods if m not in METHODS]
  if unknown or not F.ttp_methods or "DIP" not in F.ttp_methods:
    raise InputError(f"--ttp_methods must name DIP and any of {', '.join(METHODS)} (got {','.join(F.ttp_methods)})")
  steps = cli.parse_method_counts("ttp_steps", F.ttp_steps, METHODS)
  missing = [m for m in F.ttp_methods if m not in steps]
  if missing:
    raise InputError(f"--ttp_steps names no step count for {missing[0]}")
  if F.ttp_task != "denoise" and {"IDIP", "IDIP_DRP", "META_IDIP"} & set(F.ttp_methods):
    raise InputError(f"--ttp_task={F.ttp_task}: IDIP's x_bar is a denoiser's; run DIP, DRP, META")
  for method, flag in INIT_FLAGS.items():
    if (method in F.ttp_methods) != bool(F[flag].value):
      raise InputError(f"--ttp_methods={method} and --{flag}=FILE go together (the init that {method} fits from)")
    if F[flag].value:
      inits.read(F[flag].value)  # missing or damaged: one line now; another net's: when its job is checked
  return F.ttp_methods, steps


def job_name() -> str:
  """<set>_s<sigma>_<crop> for denoising, <set>_<task>_<crop> for the others: the results' and workdir's name."""
  what = f"s{F.ttp_sigma:g}" if F.ttp_task == "denoise" else F.ttp_task
  return f"{F.ttp_set}_{what}_{F.ttp_crop}" + "".join(f"_{n}" for n in F.ttp_images)


def selected_inputs(folder: str) -> list[str]:
  """The set's first --ttp_max_images images, or those --ttp_images names (one line for a name not in the set)."""
  paths = data.list_inputs(folder)
  if not F.ttp_images:
    return paths[: F.ttp_max_images or None]
  by_name = {os.path.splitext(os.path.basename(p))[0]: p for p in paths}
  missing = [n for n in F.ttp_images if n not in by_name]
  if missing:
    raise InputError(f"--ttp_images: {missing[0]} is not an image of {folder} (it has {', '.join(sorted(by_name))})")
  return [by_name[n] for n in F.ttp_images]


def reusable(cfg: config.RunConfig, images: list[data.Image]) -> dict | None:
  """The results of a finished fit of this job in cfg.workdir, made by any commit: the same settings
  (resume.finished_job) and the same inputs, image by image (input_digests, as --resume checks them); else None."""
  resolved = runner.resolve(cfg, runner.image_channels(images))
  res, _ = resume.finished_job(resolved, allow_other_code=True)
  if res is None or not res.get("complete"):
    return None
  stored = outputs.read_json(os.path.join(cfg.workdir, "config.json")).get("inputs")
  return res if stored == resume.input_digests(resolved, images) else None


def fit_method(name: str, steps: int, folder: str) -> tuple[dict, dict]:
  """One method's fits of every image, one run per call: per image, PSNR per evaluated step, fitting seconds
  per step and the compile seconds; and the commit and date the fits ran at (a reused fit keeps its own)."""
  method, prelim, fit_over, net_over = METHODS[name]
  base = config.RunConfig()
  init = F[INIT_FLAGS[name]].value if name in INIT_FLAGS else ""
  if init:  # a finished META job is reused only for the same init file
    with open(init, "rb") as f:
      name += "-" + hashlib.sha1(f.read()).hexdigest()[:10]
  cfg = dataclasses.replace(
    base,
    input=folder,
    init=init,
    workdir=os.path.join(F.ttp_workdir, job_name(), f"{name}-{steps}"),  # a finished fit is reused at its steps only
    method=method,
    sigma=F.ttp_sigma if F.ttp_task == "denoise" else 0.0,
    noise="clip",
    image_channels=1,  # gray, as the tables' holdout9, classic10 and Set12 rows
    crop=F.ttp_crop,
    batch_size=1,
    save_images=False,
    prelim=dataclasses.replace(base.prelim, name=prelim),
    net=dataclasses.replace(base.net, **dict(net_over)),
    fit=dataclasses.replace(
      base.fit, task=F.ttp_task, steps=steps, eval_every=F.ttp_eval_every, batch_strategy="vmap", **dict(fit_over)
    ),
  )
  images = runner.load_inputs(cfg)  # read once: checked against a stored fit, else fitted
  res = reusable(cfg, images)
  if res is None and F.ttp_reuse_only:
    raise InputError(f"--ttp_reuse_only: {cfg.workdir} holds no finished fit of {name} with these settings and inputs")
  if res is None:
    res = runner.run(dataclasses.replace(cfg, overwrite=True), images=images)
  per = {}
  for r in res["images"]:
    hist = results.read_history(os.path.join(cfg.workdir, "history", r["name"] + ".csv"))
    fitting = (r["seconds"] - (r["compile_seconds"] or 0.0)) / r["steps"]
    evaluated = ~np.isnan(hist["psnr"])
    per[r["name"]] = {
      "steps": (np.flatnonzero(evaluated) + 1).tolist(),
      "psnr": hist["psnr"][evaluated].tolist(),
      "psnr_ema": hist["psnr_ema"][evaluated].tolist(),  # DIP's EMA of the outputs (not part of the oracle)
      "seconds_per_step": fitting,
      "compile_seconds": r["compile_seconds"],
    }
  return per, {k: res[k] for k in ("commit", "date")}


def mean_of(per: dict[str, dict], f) -> float | None:
  """The mean over images of f(image's fit); None where a fit lacks the curve (files made before the EMA was kept)."""
  try:
    return float(np.mean([f(v) for v in per.values()]))
  except KeyError:
    return None


def summarize(fits: dict[str, dict], budget: float) -> list[dict]:
  """Per method: mean over images of the seconds and steps to DIP's oracle best, DIP's seconds over them,
  and the PSNR after `budget` seconds of fitting."""
  out = []
  dip = fits["DIP"]
  target = {n: max(v["psnr"]) for n, v in dip.items()}
  dip_best_s = {n: v["steps"][int(np.argmax(v["psnr"]))] * v["seconds_per_step"] for n, v in dip.items()}
  for m, per in fits.items():
    steps, secs, at = [], [], []
    for n, v in per.items():
      hit = next((s for s, p in zip(v["steps"], v["psnr"]) if p >= target[n]), None)
      steps.append(hit)
      secs.append(None if hit is None else hit * v["seconds_per_step"])
      within = [p for s, p in zip(v["steps"], v["psnr"]) if s * v["seconds_per_step"] <= budget]
      at.append(within[-1] if within else None)
    reached = [s for s in secs if s is not None]
    mean_s = float(np.mean(reached)) if len(reached) == len(secs) else None
    out.append(
      {
        "method": m,
        "set": F.ttp_set,
        "task": F.ttp_task,
        "sigma": F.ttp_sigma,
        "size": F.ttp_crop,
        "images": len(per),
        "reached_dip_best": len(reached),
        "seconds_to_dip_best": mean_s,
        "steps_to_dip_best": float(np.mean(steps)) if mean_s is not None else None,
        "speedup_vs_dip": float(np.mean(list(dip_best_s.values()))) / mean_s if mean_s else None,
        f"psnr_at_{budget:g}s": (float(np.mean(at)) if all(a is not None for a in at) else None),
        "dip_oracle_best_psnr": float(np.mean(list(target.values()))),
        "best_psnr": float(np.mean([max(v["psnr"]) for v in per.values()])),
        "best_psnr_ema": mean_of(per, lambda v: np.nanmax(v["psnr_ema"])),
        "final_psnr": mean_of(per, lambda v: v["psnr"][-1]),
        "final_psnr_ema": mean_of(per, lambda v: v["psnr_ema"][-1]),
        "seconds_per_step": float(np.mean([v["seconds_per_step"] for v in per.values()])),
        "compile_seconds": float(np.mean([v["compile_seconds"] or 0.0 for v in per.values()])),
      }
    )
  return out


def what(doc: dict) -> str:
  task = doc.get("task", "denoise")
  return {"denoise": f"sigma {doc['sigma']:g}", "inpaint": "inpainting 50%", "sr": "x4 super-resolution"}[task]


def reused(doc: dict) -> str:
  """The fits that a finished job of an earlier commit supplied (its workdir's results.json), named with it."""
  old = {m: r for m, r in doc.get("fits_ran_at", {}).items() if r["commit"] != doc["commit"]}
  said = ", ".join(f"{m} at {r['commit'][:7]} ({r['date']})" for m, r in old.items())
  return f" Fits reused from a finished job of an earlier commit: {said}." if old else ""


def markdown(doc: dict) -> str:
  budget = f"psnr_at_{doc['budget']:g}s"
  fmt = lambda v, f="{:.2f}": "-" if v is None else f.format(v)
  lines = [
    f"# Time to DIP's best PSNR: {doc['set']}, {what(doc)}, {doc['size'] or 'full'} px\n\n",
    f"`{doc['command']}`; {doc['device']}, commit {doc['commit']}, {doc['date']}. Per image, one run per call; "
    "DIP's best PSNR is the oracle (the ground truth picks the step); seconds are fitting seconds (compile apart), "
    f"the mean over {doc['summary'][0]['images']} images; a method that never reached it on an image has no mean. "
    f"PSNR at {doc['budget']:g} s: the last evaluated PSNR within that much fitting (a fit that ended sooner: its "
    f"end). Steps run: {', '.join(f'{m} {n}' for m, n in doc['steps'].items())}.{reused(doc)}\n\n",
    f"| method | DIP's best (oracle) | its best | seconds to DIP's best | steps | speedup vs DIP | PSNR at "
    f"{doc['budget']:g} s | at its last step: output / EMA | its best EMA | s/step | compile s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|\n",
  ]
  for s in doc["summary"]:
    lines.append(
      f"| {s['method']} | {s['dip_oracle_best_psnr']:.2f} | {s['best_psnr']:.2f} | "
      f"{fmt(s['seconds_to_dip_best'], '{:.1f}')} ({s['reached_dip_best']}/{s['images']} reached) | "
      f"{fmt(s['steps_to_dip_best'], '{:.0f}')} | "
      f"{fmt(s['speedup_vs_dip'])}x | {fmt(s[budget])} | {fmt(s.get('final_psnr'))} / "
      f"{fmt(s.get('final_psnr_ema'))} | {fmt(s.get('best_psnr_ema'))} | {s['seconds_per_step']:.3f} | "
      f"{s['compile_seconds']:.1f} |\n"
    )
  return "".join(lines)


def plot(doc: dict, path: str) -> None:
  """Mean PSNR against seconds of fitting, one curve per method (each image's PSNR at its last evaluated step
  within the time; a curve ends with its shortest fit)."""
  lines, horizon = {}, max(v["steps"][-1] * v["seconds_per_step"] for f in doc["fits"].values() for v in f.values())
  grid = np.linspace(0, horizon, 200)[1:]
  for m, per in doc["fits"].items():
    curves = []
    for v in per.values():
      t = np.asarray(v["steps"]) * v["seconds_per_step"]
      idx = np.searchsorted(t, grid, side="right") - 1
      inside = (idx >= 0) & (grid <= t[-1])  # each curve ends where its fit ended
      curves.append(np.where(inside, np.asarray(v["psnr"])[np.maximum(idx, 0)], np.nan))
    with np.errstate(all="ignore"):
      lines[m] = (grid, np.mean(curves, axis=0), "-")  # NaN once any image's fit has ended
  title = f"{doc['set']} {what(doc)}, {doc['size'] or 'full'} px: mean PSNR vs fitting seconds"
  outputs.plot_xy(path, title, lines, "seconds of fitting per image", "PSNR (dB)")


def main(argv: list[str]) -> None:
  del argv
  methods, steps = check_flags()
  # The commit and date when the fits start (the code they ran), not when the last one ended.
  doc = dict(outputs.provenance(), command=" ".join(["python", "experiments/speed/time_to_psnr.py"] + sys.argv[1:]))
  folder = os.path.join(data.shared_dir(), "data", F.ttp_set)
  paths = selected_inputs(folder)
  stem = os.path.join(F.ttp_out, job_name())
  inputs = os.path.join(F.ttp_workdir, "inputs", os.path.basename(stem))
  os.makedirs(inputs, exist_ok=True)
  chosen = {os.path.basename(p) for p in paths}
  for name in os.listdir(inputs):  # links this tool made for another selection (a file there is not touched)
    if name not in chosen and os.path.islink(os.path.join(inputs, name)):
      os.unlink(os.path.join(inputs, name))
  for p in paths:  # the selected images, as they are (run.py crops them)
    target = os.path.join(inputs, os.path.basename(p))
    if not os.path.exists(target):
      os.symlink(os.path.abspath(p), target)
  fits, ran = {}, {}
  for m in methods:
    fits[m], ran[m] = fit_method(m, steps[m], inputs)
  doc.update(set=F.ttp_set, task=F.ttp_task, sigma=F.ttp_sigma, size=F.ttp_crop, budget=F.ttp_budget)
  doc.update(steps=steps, fits=fits, fits_ran_at=ran)
  doc["summary"] = summarize(fits, F.ttp_budget)
  outputs.write_table(os.path.dirname(stem), os.path.basename(stem), doc, markdown(doc))
  plot(doc, stem + ".png")
  print(markdown(doc))


def entry(argv: list[str] | None = None) -> int:
  return cli.run_script(main, __doc__, F, argv)


if __name__ == "__main__":
  sys.exit(entry())
