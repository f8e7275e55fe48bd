"""The tables' report writer: a table's markdown (per-image rows, means, the paper's numbers,
provenance, the noise protocol's FFDNet row) and its PSNR curves, from the table dict that
tables.make_table builds (and <table>.json stores)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from experiments.harness.jobs import fitted
from idip_jax import outputs

NOISE_TEXT = {
  "float": "x + n, unclipped",
  "clip": "x + n clipped to [0, 1] (DIP's get_noisy_image)",
  "uint8": "x + n clipped and rounded to 8 bits",
}


TASK_TEXT = {
  "inpaint": "Task: inpainting, 50% of the pixels missing (a Bernoulli mask seeded by the image name, --mask="
  "bernoulli:0.5), the loss on the observed pixels only; the net of DIP's inpainting notebook (128-channel skips, "
  "nearest upsampling); PSNR over the whole image.",
  "SR4": "Task: 4x super-resolution: HR center-cropped to a multiple of 32 (DIP's enforse_div32), LR by PIL's "
  "Lanczos resize, the loss through DIP's Lanczos2 downsampler; bicubic = PIL's bicubic upsampling of LR; PSNR on "
  "the RGB HR crop (DIP's notebook; not the Y channel).",
}


def protocol_lines(t: dict) -> list[str]:
  """The FFDNet row of this table's set and sigma under every noise protocol, beside the paper's
  (experiments/studies/noise_protocol.py), so the table says why its protocol was chosen."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "noise_protocol.json")
  sets = {m["dataset"] for m in t["methods"].values()}
  if not os.path.isfile(path):
    return []
  rows = [r for r in outputs.read_json(path)["rows"] if r["set"] in sets and r["sigma"] in t["sigma"]]
  if not rows:
    return []
  names = list(rows[0]["per_image"])
  paper = rows[0]["paper_per_image"]
  lines = [
    "",
    f"Noise protocol: FFDNet on {rows[0]['set']} at sigma {rows[0]['sigma']} under each protocol "
    f"(experiments/results/noise_protocol.md), paper: {rows[0]['paper_source']}:",
    "",
    "| protocol | " + " | ".join(names) + " | mean |",
    "|" + "---|" * (len(names) + 2),
  ]
  for r in rows:
    lines.append(
      f"| {r['protocol']} | " + " | ".join(f"{r['per_image'][n]:.2f}" for n in names) + f" | {r['mean']:.2f} |"
    )
  lines.append("| paper | " + " | ".join(str(paper.get(n, "-")) for n in names) + f" | {rows[0]['paper_mean']} |")
  return lines


def write_markdown(t: dict, path: str) -> None:
  fitted = {k: m for k, m in t["methods"].items() if m["steps"]}
  provenance = sorted({(m["device"], m["commit"]) for m in fitted.values()})
  noise = next(iter(t["methods"].values()))["noise"]
  lines = [
    f"# {t['table']}" + (" (SMOKE: plumbing check only)" if t["smoke"] else ""),
    "",
    f"Fits run on {'; '.join(f'{d} at commit {c}' for d, c in provenance) or t['device']}; table "
    f"made {t['date']} by commit {t['commit']}. Crop: {t['crop'] or 'full images'}. "
    + TASK_TEXT.get(t["table"].split("_")[0], f"Noise: {NOISE_TEXT[noise]} (--noise={noise}).")
    + " Steps reported: "
    + ", ".join(
      f"{k} {m['steps']}"
      + (f" (run {m['run_steps']}, PSNR read from its history)" if m["run_steps"] != m["steps"] else "")
      for k, m in fitted.items()
    )
    + ". PSNR (dB) of the output on the unperturbed input at that step; columns marked oracle "
    "use the ground truth.",
    "",
  ]
  methods = t["methods"]
  names = list(next(iter(methods.values()))["per_image"])
  paper_im = t.get("paper_per_image", {})
  head = ["image"] + list(methods) + (["paper (DIP)"] if paper_im else [])
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for n in names:
    cells = [n] + [f"{m['per_image'].get(n, float('nan')):.2f}" for m in methods.values()]
    lines.append("| " + " | ".join(cells + ([str(paper_im.get(n, "-"))] if paper_im else [])) + " |")
  fmt = lambda vals: f"{np.mean(vals):.2f} ± {np.std(vals):.2f}"
  lines.append("| **mean ± std** | " + " | ".join(fmt(list(m["per_image"].values())) for m in methods.values()) + " |")
  lines.append("| paper | " + " | ".join(str(t["paper"].get(k, "-")) for k in methods) + " |")

  def summary_row(title: str, has: str, cell) -> None:
    lines.append(f"| {title} | " + " | ".join(cell(m) if has in m else "-" for m in methods.values()) + " |")

  summary_row("EMA", "mean_psnr_ema", lambda m: f"{m['mean_psnr_ema']:.2f}")
  if any("mean_psnr_prelim" in m for m in methods.values()):
    summary_row("its x_bar alone", "mean_psnr_prelim", lambda m: f"{m['mean_psnr_prelim']:.2f}")
  for title, key in (
    ("peak of the mean curve (step)", "curve_peak"),
    ("EMA: peak of the mean curve (step)", "curve_peak_ema"),
  ):
    summary_row(title, key, lambda m, key=key: f"{m[key]['psnr']:.2f} ({m[key]['step']})")
  summary_row(
    "oracle best per image, mean (step)",
    "oracle_mean_best_psnr",
    lambda m: f"{m['oracle_mean_best_psnr']:.2f} ({m['oracle_mean_best_step']:.0f})",
  )
  if any("mean_stop_step" in m for m in methods.values()):
    summary_row(
      "ES-WMV step, mean (PSNR below the oracle's)",
      "mean_stop_step",
      lambda m: f"{m['mean_stop_step']:.0f} ({m['mean_stop_gap_db']:.2f} dB)",
    )
  if t["paper"] and not set(t["paper"]) & set(methods):
    lines.append("\nPaper: " + ", ".join(f"{k} {v}" for k, v in t["paper"].items()))
  for k, m in methods.items():
    if "mean_psnr_avg_runs_ema" in m and not t["table"].startswith("IDIPplus"):  # there: IDIP-xK
      lines.append(
        f"\n{k}: average of 2 runs: final {m['mean_psnr_avg_runs_final']:.2f}, EMA {m['mean_psnr_avg_runs_ema']:.2f}"
      )
  if "fit_speed" in t:
    fs = t["fit_speed"]
    lines += [
      "",
      "Fit speed (oracle: DIP's best PSNR per image, first step each method reaches it):",
      "",
      "| image | DIP best (oracle) | DIP steps | IDIP steps | DIP s | IDIP s |",
      "|---|---|---|---|---|---|",
    ]
    for n, r in fs["per_image"].items():
      idip_s = "-" if r["idip_seconds"] is None else f"{r['idip_seconds']:.1f}"
      lines.append(
        f"| {n} | {r['dip_best_psnr']:.2f} | {r['dip_steps']} | {r['idip_steps'] or 'not reached'} | "
        f"{r['dip_seconds']:.1f} | {idip_s} |"
      )
    red = fs["mean_step_reduction_pct"]
    sec = fs["mean_seconds_reduction_pct"]
    lines.append(
      f"\nMean step reduction over the {fs['reached']}/{fs['images']} images IDIP reaches: "
      f"{'-' if red is None else f'{red:.1f}%'} (paper: about 80%); in seconds: "
      f"{'-' if sec is None else f'{sec:.1f}%'} (median s/step of one image's fit: DIP "
      f"{fs['seconds_per_step']['dip']:.3f}, IDIP {fs['seconds_per_step']['idip']:.3f}; making x_bar is not counted)."
    )
  lines += protocol_lines(t)
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def plot_curves(table: str, rows: list, run: Callable[[Any], dict], path: str) -> None:
  """Mean PSNR vs step of each fitted row; rows reading one job (IDIPplus) draw it once."""
  series, drawn = {}, set()
  for label, job in rows:
    if job.method != "prelim" and fitted(job) not in drawn:
      drawn.add(fitted(job))
      series[label] = list(run(job)["histories"].values())
  outputs.plot_psnr_curves(path, f"{table}: mean PSNR vs step", series)


# The studies' writers: each a pure function of the study's JSON (the .md rebuilds from it).


def image_names(variants: dict) -> list[str]:
  """Every image of the study, in first-seen order (the columns of the table)."""
  return list(dict.fromkeys(img for v in variants.values() for img in v["images"]))


def faithfulness_curves(meta: dict, path: str) -> None:
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


def faithfulness_markdown(meta: dict) -> str:
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
  return "\n".join(lines) + "\n"


def noise_protocol_markdown(doc: dict) -> str:
  """The .md of a stored .json (tests: the committed table rebuilds from its JSON byte for byte)."""
  lines = [
    f"# Noise protocol vs the papers' baseline rows\n\n{doc['device']}, commit {doc['commit']}, "
    f"{doc['date']}. `python experiments/studies/noise_protocol.py`. PSNR (dB) of the preliminary "
    "denoiser's clipped output; noisy image: float = x + n, clip = clipped to [0, 1], "
    "uint8 = clipped and rounded to 8 bits; same AWGN draw for all three.\n\n"
    "| set | sigma | denoiser | protocol | mean | paper | per image (paper) |\n|---|---|---|---|---|---|---|\n"
  ]
  for r in doc["rows"]:
    per = ", ".join(
      f"{n} {v:.2f}" + (f" ({r['paper_per_image'][n]})" if n in r["paper_per_image"] else "")
      for n, v in r["per_image"].items()
    )
    lines.append(
      f"| {r['set']} | {r['sigma']} | {r['denoiser']} | {r['protocol']} | {r['mean']:.2f} | "
      f"{r['paper_mean']} | {per} |\n"
    )
  return "".join(lines)


def prelim_psnr_markdown(doc: dict) -> str:
  """The .md of a stored .json (tests: the committed table rebuilds from its JSON byte for byte)."""
  lines = [
    f"# Preliminary denoisers: mean PSNR (dB)\n\nDevice {doc['device']}, commit {doc['commit']}, "
    f"{doc['date']}. Command: `python experiments/studies/prelim_psnr.py`. AWGN on [0,1] images seeded by "
    "(0, image name); PSNR of the clipped output. Published: FFDNet/DnCNN papers (Set12) and the "
    "IDIP paper's FFDNet row (classic10, sigma 30).\n\n",
    "| set | denoiser | sigma | ours | published | diff |\n|---|---|---|---|---|---|\n",
  ]
  for r in doc["rows"]:
    ref = r["published"]
    lines.append(
      f"| {r['set']} | {r['method']} | {r['sigma']} | {r['mean_psnr']:.2f} | "
      f"{ref if ref is not None else '-'} | "
      f"{'%+.2f' % (r['mean_psnr'] - ref) if ref is not None else '-'} |\n"
    )
  return "".join(lines)


def knobs_markdown(table: dict, meta: dict) -> str:
  sigmas = list(table)
  lines = [
    f"# IDIPplus knobs on {meta['set']} ({meta['crop']} px crops, K={meta['K']}): mean PSNR minus x_bar's (dB)",
    "",
    f"Commit {meta['commit']}, {meta['date']}, fits from commit(s) {', '.join(meta['fit_commits'])}. "
    f"`{meta['command']}`. The x_bar row is its own mean PSNR; a blend a * out + (1 - a) * x_bar uses a fixed a.",
    "",
    "| output | " + " | ".join(f"sigma {s}" for s in sigmas) + " | mean |",
    "|---|" + "---|" * (len(sigmas) + 1),
  ]
  for key in table[sigmas[0]]:
    if key == "x_bar":
      lines.append("| x_bar (PSNR) | " + " | ".join(f"{table[s][key]['mean']:.2f}" for s in sigmas) + " | |")
      continue
    d = [table[s][key]["minus_x_bar"] for s in sigmas]
    lines.append(f"| {key} | " + " | ".join(f"{v:+.2f}" for v in d) + f" | {np.mean(d):+.2f} |")
  return "\n".join(lines) + "\n"


def batch_equality_markdown(doc: dict) -> str:
  """experiments/studies/batch_equality.py's table (rebuilds byte for byte from its JSON)."""
  lws = doc["lowerings"]
  lines = [
    f"# Batched vs single-image fits\n\n{doc['device']}, commit {doc['commit']}, {doc['date']}. "
    "`python experiments/studies/batch_equality.py --flagfile=experiments/studies/batch_equality.flags`: "
    f"DIP (official net, defaults), holdout9 gray, {doc['crop']} px "
    f"crops, sigma 25 clipped, {doc['steps']} steps; the same run keys in every column. PSNR (dB) of the "
    "output after the last step; vmap rows: one call of all runs with that --batch_conv lowering.\n\n"
    "| image | one per call | " + " | ".join(f"vmap {lw} (diff)" for lw in lws) + " |\n"
    "|---|---|" + "---|" * len(lws) + "\n"
  ]
  for r in doc["rows"]:
    cells = " | ".join(f"{r[lw]:.3f} ({r[lw] - r['single']:+.3f})" for lw in lws)
    lines.append(f"| {r['name']} | {r['single']:.3f} | {cells} |\n")
  lines.append(
    "\n| lowering | per image max abs diff (dB) | mean diff (dB) | losses over "
    f"{doc['summary']['map_steps']} steps, max abs diff |\n|---|---|---|---|\n"
  )
  for lw in lws:
    v = doc["summary"][lw]
    lines.append(f"| vmap {lw} | {v['max_abs']:.3f} | {v['mean']:+.3f} | {v['loss_max_abs_diff']:.3g} |\n")
  lines.append(f"| lax.map | - | - | {doc['summary']['map_loss_max_abs_diff']:.3g} |\n")
  return "".join(lines)


def bench_markdown(doc: dict) -> str:
  """experiments/bench.py's table (rows with their ratio to one run per call, bench.with_ratios)."""
  fmt = lambda v, f: "-" if v is None else f % v
  lines = [
    f"# Fit-speed benchmark ({doc['device']})\n\nCommit {doc['commit']}, {doc['date']}, jax "
    f"{doc['jax']}, torch {doc['torch']}. Official DIP net (2.2M params, gray), one Adam step "
    "incl. input noise, EMA and backtracking (eval: + the clean-input forward pass and metrics "
    f"every step); median of {doc['repeats']} x {doc['steps']} steps after warm-up. Lowering: how vmap "
    "lowers the per-run convolutions of a batch (--batch_conv; grouped = plain vmap, the control), or another "
    "--batch_strategy. vs batch 1: image-steps/s over one run per call's, same size and precision, same run. "
    "compile s: the first call's time less its steps at the measured rate. "
    "% peak: against the dense peak of the precision the convolutions run in "
    f"({doc['peak_source']}). PyTorch: the reference loop (experiments/speed/torch_reference.py: "
    "official loop, host PSNR each step, cuDNN benchmark mode, TF32 convolutions as PyTorch's "
    "default), one image at a time, same device, same run.\n",
    "| size | lowering | precision | batch | eval | ms/step | image-steps/s | vs batch 1 | TFLOP/s | % peak | "
    "peak MB | compile s | torch ms/step (1 img) | vs torch |",
    "|" + "---|" * 14,
  ]
  for r in doc["rows"]:
    lines.append(
      f"| {r['size']} | {r.get('lowering', r['strategy'])} | {r['precision']} | {r['batch']} | "
      f"{'every step' if r['eval_every'] else '-'} | {r['ms_per_step']:.1f} | {r['image_steps_per_s']:.2f} | "
      f"{fmt(r['ratio_vs_batch1'], '%.2f')} | {r['tflops']:.2f} | {100 * r['peak_fraction']:.1f} | "
      f"{fmt(r['peak_memory_bytes'] and r['peak_memory_bytes'] / 1e6, '%.0f')} | "
      f"{fmt(r.get('compile_s'), '%.1f')} | {fmt(r['torch_ms_per_step'], '%.1f')} | "
      f"{fmt(r['ratio_vs_torch'], '%.2f')} |"
    )
  return "\n".join(lines) + "\n"


def auto_markdown(doc: dict) -> str:
  """experiments/speed/auto_first_run.py's table: end-to-end wall per job, strategy and cache, and the summary."""
  lines = [
    "# Does --batch_strategy=auto pay for its choice on a first run?\n\n",
    f"`{doc['command']}`; {doc['device']}, commit {doc['commit']}, {doc['date']}. Wall seconds of the whole "
    "`python run.py` command (DIP, sigma 25, --save_images=false): `default` is the flags a user gets "
    "(--batch_strategy=auto), the others fixed strategies; cold = empty JAX compilation and batch-choice "
    "caches, warm = the caches its cold run left. Jobs: "
    + "; ".join(f"{j}: {v['images']} images (set, first N, crop), {v['steps']} steps" for j, v in doc["jobs"].items())
    + ".\n\n| job | strategy | cache | round | wall s | choice per bucket |\n|---|---|---|---|---|---|\n",
  ]
  for r in doc["rows"]:
    choice = "; ".join(f"{'x'.join(map(str, b['shape']))}: {b['label'] or '-'}" for b in r["buckets"])
    if r.get("layout", {}).get("processes", 1) > 1:
      choice = f"{r['layout']['processes']} processes, one per core, one run per call each"
    lines.append(f"| {r['job']} | {r['strategy']} | {r['cache']} | {r['round']} | {r['wall_s']:.1f} | {choice} |\n")
  lines.append("\n| job | cache | default s | best fixed | its s | default / best fixed | vs one run per call |\n")
  lines.append("|---|---|---|---|---|---|---|\n")
  for s in doc.get("summary", []):
    vs = f"{s['speedup_vs_one_run_per_call']:.2f}x" if s["speedup_vs_one_run_per_call"] else "-"
    lines.append(
      f"| {s['job']} | {s['cache']} | {s['default_s']:.1f} | {s['best_fixed']} | {s['best_fixed_s']:.1f} | "
      f"{s['default_over_best_fixed']:.3f} | {vs} |\n"
    )
  return "".join(lines)
