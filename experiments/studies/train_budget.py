"""Does a Noise2Noise DnCNN serve IDIP as x_bar as well as a supervised one trained with the same budget?

python experiments/studies/train_budget.py --flagfile=experiments/studies/train_budget.flags
Trains both (same steps, batch, seed: only the target differs), measures Set12 sigma-25 PSNR of each
and of the official DnCNN-S weights on the full images, then fits IDIP on classic10 center crops
with each x_bar. Writes <out>.json ({"device", "commit", "date", "budget_s", "runs": {...}}) and .md.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import numpy as np
from absl import flags, logging

from idip_jax import config, config_train, data, denoiser_train, metrics, outputs, prelim, runner
from idip_jax.data import InputError

FV = flags.FlagValues()
config.define_flags(FV, config_train.TrainConfig)  # the training recipe of both runs (--target is set per run)
flags.DEFINE_string("results_path", "experiments/results/training", "results path without extension", flag_values=FV)
flags.DEFINE_integer("idip_crop", 64, "IDIP: classic10 center crop side", flag_values=FV)
flags.DEFINE_integer("idip_steps", 300, "IDIP: Adam steps", flag_values=FV)
flags.DEFINE_float("test_sigma", 25.0, "Set12 and IDIP noise std (0-255)", flag_values=FV)


def set12_psnr(weights: str, sigma: float) -> tuple[float, dict[str, float]]:
  """Mean PSNR on the full Set12 images, AWGN seeded by (0, name), as experiments/studies/prelim_psnr.py."""
  images = data.load_images(os.path.join(data.shared_dir(), "data", "Set12"), sigma, 0, 1)
  spec = prelim.XbarSpec(config.PrelimConfig("dncnn", weights=weights), sigma)
  per = {im.name: float(metrics.psnr(o, im.clean_HxWxC)) for o, im in zip(prelim.make(spec, images), images)}
  return float(np.mean(list(per.values()))), per


def idip_with(weights: str, workdir: str) -> dict:
  """IDIP on classic10 crops with this DnCNN's x_bar (tables' protocol: clipped noise)."""
  cfg = config.RunConfig(
    input=os.path.join(data.shared_dir(), "data", "classic10"),
    workdir=workdir,
    method="idip",
    sigma=FV.test_sigma,
    noise="clip",
    crop=FV.idip_crop,
    image_channels=1,
    save_images=False,
    overwrite=True,
    prelim=config.PrelimConfig("dncnn", weights=weights),
    fit=config.FitConfig(steps=FV.idip_steps, chunk=50),
  )
  res = runner.run(cfg)
  return {k: res["mean"][k] for k in ("psnr_prelim", "psnr_final", "psnr_ema", "oracle_best_psnr")}


def main(argv: list[str]) -> int:
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  try:
    base = config.parse(FV, argv, config_train.TrainConfig)
    config.check(base)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  out = FV.results_path
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  res = {
    **outputs.provenance(),
    "command": "python experiments/studies/train_budget.py " + " ".join(argv[1:]),
    "budget_s": 0.0,
    "recipe": {k: getattr(base, k) for k in ("steps", "batch", "patch", "depth", "width", "lr", "lr_drop", "sigma")},
    "idip": {"set": "classic10", "crop": FV.idip_crop, "steps": FV.idip_steps, "sigma": FV.test_sigma},
    "runs": {},
  }
  official = os.path.join(data.shared_dir(), "weights", "dncnn", "dncnn_sigma25.mat")
  for name, target in (("supervised", "clean"), ("noise2noise", "noisy")):
    cfg = dataclasses.replace(base, target=target, workdir=os.path.join(base.workdir, name))
    t = time.perf_counter()
    summary = denoiser_train.train(cfg)
    seconds = time.perf_counter() - t
    res["budget_s"] += seconds
    psnr, per = set12_psnr(cfg.workdir, FV.test_sigma)
    res["runs"][name] = {
      "target": target,
      "train_seconds": seconds,
      "val_psnr": summary["val_psnr"],
      "set12_psnr_25": psnr,
      "set12_per_image": per,
      "idip_classic10_crops": idip_with(cfg.workdir, os.path.join(base.workdir, "idip_" + name)),
    }
    outputs.write_json(out + ".json", res)  # incremental
    print(f"{name}: Set12 sigma 25 {psnr:.2f} dB after {cfg.steps} steps ({seconds:.0f} s)", flush=True)
  res["official"] = {  # the official DnCNN-S(25) weights, same measurement (published 30.44, ours 30.41)
    "set12_psnr_25": set12_psnr(official, FV.test_sigma)[0],
    "idip_classic10_crops": idip_with(official, os.path.join(base.workdir, "idip_official")),
  }
  outputs.write_json(out + ".json", res)
  write_markdown(res, out + ".md")
  return 0


def write_markdown(res: dict, path: str) -> None:
  r = res["recipe"]
  i = res["idip"]
  lines = [
    "# Training the preliminary denoiser: supervised DnCNN vs Noise2Noise, same budget",
    "",
    f"{res['device']}, commit {res['commit']}, {res['date']}. `{res['command']}`. Budget: {res['budget_s']:.0f} s "
    f"of training in all; each run {r['steps']} Adam steps of {r['batch']} patches of {r['patch']} px, DnCNN "
    f"{r['depth']} x {r['width']}, lr {r['lr']} (/10 after {r['lr_drop']:.0%}), sigma {r['sigma']}. Set12: full "
    f"images, AWGN sigma 25 seeded by (0, name), PSNR of the clipped output. IDIP: {i['set']} {i['crop']} px center "
    f"crops, sigma {i['sigma']:g} clipped, {i['steps']} steps, that net's x_bar.",
    "",
    "| x_bar from | training s | Set12 sigma 25 | IDIP crops: x_bar | IDIP final | IDIP EMA | IDIP oracle best |",
    "|---|---|---|---|---|---|---|",
  ]
  rows = [(n, v) for n, v in res["runs"].items()] + ([("official DnCNN-S weights", res["official"])])
  for name, v in rows:
    d = v["idip_classic10_crops"]
    secs = f"{v['train_seconds']:.0f}" if "train_seconds" in v else "-"
    lines.append(
      f"| {name} | {secs} | {v['set12_psnr_25']:.2f} | {d['psnr_prelim']:.2f} | {d['psnr_final']:.2f} | "
      f"{d['psnr_ema']:.2f} | {d['oracle_best_psnr']:.2f} |"
    )
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  sys.exit(main(sys.argv))
