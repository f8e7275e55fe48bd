"""One denoising job: read and check inputs, make x_bar, fit every bucket batched, write results."""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from idip_jax import checkpoint, data, fit, metrics, outputs, prelim
from idip_jax.data import Image, InputError
from idip_jax.fit import FitConfig
from idip_jax.models import ACTIVATIONS, PADDINGS, UPSAMPLING, NetConfig


@dataclasses.dataclass(frozen=True)
class Method:
  complex_connection: bool  # IDIP change (1)
  prelim_input: bool  # change (2): x_bar replaces z
  prelim_loss: bool  # change (3): + MSE(out, x_bar)


METHODS = {
    "dip": Method(False, False, False),
    "idip1": Method(True, False, False),
    "idip2": Method(True, True, False),
    "idip": Method(True, True, True),
}
# Steps when --steps=0: where each method's mean PSNR (clean-input output) peaks on holdout9
# (gray, sigma 25, 256 px crops, H100; experiments/results/gpu_h100/HOLDOUT.md): DIP 1190 (run
# 3000), IDIP 1500 (the end of its 1500-step run, the curve flat within 0.01 dB from 1000).
# IDIP-1 (architecture only) takes DIP's count and IDIP-2 (x_bar input) IDIP's: not measured.
DEFAULT_STEPS = {"dip": 1190, "idip1": 1190, "idip2": 1500, "idip": 1500}


@dataclasses.dataclass(frozen=True)
class RunConfig:
  input: str
  workdir: str
  sigma: float = 0.0  # AWGN std on the 0-255 scale added to clean inputs; 0 = inputs are noisy
  noise_seed: int = 0
  noise: str = "float"  # data.NOISE_PROTOCOLS: float (unclipped AWGN) | clip ([0, 1]) | uint8 (+ 8-bit rounding)
  channels: int = 0  # 0 = as stored, 1 = gray, 3 = RGB
  crop: int = 0  # center crop to this size (0 = full image)
  method: str = "idip"
  batch_size: int = 0  # runs per vmapped call; 0 = auto (fit.auto_batch_size: memory, backend)
  save_images: bool = True
  save_float: bool = False  # also each image as float32 .npy (lossless; PNGs are 8-bit)
  resume: bool = False  # continue the run in workdir: finished images kept, a call's checkpoint restored
  checkpoint_every: int = 10  # chunks between checkpoints of a running call (0 = none)
  overwrite: bool = False
  prelim: prelim.PrelimConfig = prelim.PrelimConfig()
  net: NetConfig = NetConfig()
  fit: FitConfig = FitConfig()


def validate(cfg: RunConfig) -> None:
  def need(ok, msg):
    if not ok:
      raise InputError(msg)
  need(cfg.method in METHODS, f"unknown --method={cfg.method}; choose one of {', '.join(METHODS)}")
  prelim.get(cfg.prelim.name)
  for part in (cfg, cfg.fit, cfg.prelim):  # --sigma=inf or --lr=nan would fit NaN everywhere
    for f in dataclasses.fields(part):
      v = getattr(part, f.name)
      need(not isinstance(v, float) or math.isfinite(v), f"--{f.name} must be finite (got {v})")
  need(cfg.sigma >= 0, f"--sigma must be >= 0 (got {cfg.sigma})")
  need(cfg.noise in data.NOISE_PROTOCOLS,
       f"unknown --noise={cfg.noise}; choose one of {', '.join(data.NOISE_PROTOCOLS)}")
  need(cfg.fit.eval_every >= 1, f"--eval_every must be >= 1 (got {cfg.fit.eval_every})")
  need(cfg.fit.strategy in fit.STRATEGIES,
       f"unknown --strategy={cfg.fit.strategy}; choose one of {', '.join(fit.STRATEGIES)}")
  need(cfg.fit.steps >= 0, f"--steps must be >= 0 (got {cfg.fit.steps}; 0 = the method's default)")
  need(cfg.fit.backtrack in fit.BACKTRACK_RULES,
       f"unknown --backtrack={cfg.fit.backtrack}; choose one of {', '.join(fit.BACKTRACK_RULES)}")
  need(cfg.fit.seeds >= 1, f"--seeds must be >= 1 (got {cfg.fit.seeds})")
  need(cfg.fit.chunk >= 1, f"--chunk must be >= 1 (got {cfg.fit.chunk})")
  need(cfg.batch_size >= 0, f"--batch_size must be >= 0 (got {cfg.batch_size})")
  need(cfg.channels in (0, 1, 3), f"--channels must be 0, 1 or 3 (got {cfg.channels})")
  need(cfg.crop >= 0, f"--crop must be >= 0 (got {cfg.crop})")
  need(1 <= cfg.net.scales <= 8, f"--scales must be in 1..8 (got {cfg.net.scales})")
  need(cfg.net.channels >= 1 and cfg.net.skip_channels >= 0, "--channels_net >= 1, --skip_channels >= 0")
  need(cfg.net.upsample in UPSAMPLING, f"unknown --upsample={cfg.net.upsample}")
  need(cfg.net.pad in PADDINGS, f"unknown --pad={cfg.net.pad}")
  need(cfg.net.act in ACTIVATIONS, f"unknown --act={cfg.net.act}")
  need(cfg.fit.precision in fit.PRECISIONS,
       f"unknown --precision={cfg.fit.precision}; choose one of {', '.join(fit.PRECISIONS)}")
  need(cfg.fit.loop in fit.LOOPS, f"unknown --loop={cfg.fit.loop}; choose one of {', '.join(fit.LOOPS)}")
  need(cfg.fit.lr_schedule in fit.LR_SCHEDULES, f"unknown --lr_schedule={cfg.fit.lr_schedule}")
  need(bool(cfg.workdir), "--workdir is empty")
  need(not (cfg.resume and cfg.overwrite), "--resume and --overwrite exclude each other")
  need(cfg.checkpoint_every >= 0, f"--checkpoint_every must be >= 0 (got {cfg.checkpoint_every})")
  m = METHODS[cfg.method]
  need(not (m.prelim_input or m.prelim_loss) or cfg.prelim.name != "none",
       f"--method={cfg.method} needs a preliminary denoiser: set --prelim (bm3d, file, ffdnet, dncnn)")
  need(not (m.complex_connection and cfg.net.skip_channels == 0),
       "the complex connection lives on the skips: --skip_channels must be > 0")


def resolve(cfg: RunConfig) -> RunConfig:
  """The config as run: the x_bar loss weight is 0 for methods without change (3), and the
  fit knows whether its input is x_bar (change 2) for the input perturbation."""
  m = METHODS[cfg.method]
  return dataclasses.replace(cfg, fit=dataclasses.replace(
      cfg.fit, prelim_weight=cfg.fit.prelim_weight if m.prelim_loss else 0.0,
      input_is_prelim=m.prelim_input, steps=cfg.fit.steps or DEFAULT_STEPS[cfg.method]))


def load_and_check(cfg: RunConfig) -> list[Image]:
  images = load_inputs(cfg)
  check_output_folder(cfg)
  return images


def load_inputs(cfg: RunConfig) -> list[Image]:
  validate(cfg)
  images = data.load_images(cfg.input, cfg.sigma, cfg.noise_seed, cfg.channels, cfg.crop,
                            cfg.noise, min_size=2 ** cfg.net.scales)
  if cfg.prelim.name != "none":
    prelim.get(cfg.prelim.name).check(cfg.prelim, images)
  return images


# Settings that may differ between a run and its --resume: where and how outputs are written.
RESUME_FREE = ("workdir", "overwrite", "resume", "batch_size", "checkpoint_every", "save_images", "save_float")


def check_output_folder(cfg: RunConfig) -> None:
  """A new run needs an empty (or --overwrite-able) workdir; --resume needs the stored run's
  folder and the same settings (one line naming the first that differs)."""
  if not cfg.resume:
    outputs.check_workdir(cfg.workdir, cfg.overwrite)
    return
  path = os.path.join(cfg.workdir, "config.json")
  if not os.path.isfile(path):
    raise InputError(f"--resume: no run to continue in --workdir={cfg.workdir} (no config.json)")
  with open(path) as f:
    have = json.load(f)
  want = json.loads(json.dumps(dataclasses.asdict(resolve(cfg))))

  def first_difference(a, b, where=""):
    for k in sorted(set(a) | set(b)):
      if k in RESUME_FREE and not where:
        continue
      if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
        d = first_difference(a[k], b[k], where + k + ".")
        if d:
          return d
      elif a.get(k) != b.get(k):
        return f"{where}{k} (stored {b.get(k)!r}, now {a.get(k)!r})"
    return None

  diff = first_difference(want, have)
  if diff:
    raise InputError(f"--resume: the settings differ from the stored run in {cfg.workdir}: {diff}")


def _psnr(a, b, clip: bool = True) -> float:
  return float(metrics.psnr(jnp.asarray(a), jnp.asarray(b), clip=clip))


def _ssim(a, b) -> float:
  return float(metrics.ssim(jnp.asarray(a), jnp.asarray(b)))


MEAN_KEYS = ("psnr_noisy", "psnr_prelim", "psnr_final", "psnr_ema", "ssim_final", "ssim_ema",
             "psnr_avg_final", "psnr_avg_ema", "oracle_best_psnr", "oracle_best_step", "seconds")


def summarize(records: list[dict]) -> dict:
  """Means over the images whose fit did not fail; "failed" counts the others."""
  ok = [r for r in records if not r.get("failed")]
  mean = {"failed": len(records) - len(ok)}
  for k in MEAN_KEYS:
    vals = [r[k] for r in ok if r.get(k) is not None]
    if vals and len(vals) == len(ok):
      mean[k] = float(np.mean(vals))
  return mean


def run(cfg: RunConfig, log: Callable[[str], None] = print, flags_text: str = "",
        images: list[Image] | None = None, prelim_images: dict[str, np.ndarray] | None = None) -> dict:
  """images / prelim_images: already loaded inputs and x_bar by name (tables reuse them)."""
  t_start = time.perf_counter()
  if images is None:
    images = load_and_check(cfg)  # every input error surfaces here, before compute
  else:
    validate(cfg)
    check_output_folder(cfg)
  method = METHODS[cfg.method]
  n_proc, proc = jax.process_count(), jax.process_index()
  if proc == 0 and not cfg.resume:
    outputs.prepare_workdir(cfg.workdir, cfg.overwrite)
  _barrier("workdir", n_proc)
  img_dir, hist_dir = os.path.join(cfg.workdir, "images"), os.path.join(cfg.workdir, "history")
  os.makedirs(img_dir, exist_ok=True), os.makedirs(hist_dir, exist_ok=True)
  all_images = images
  if n_proc > 1:
    # Multi-host (jax.distributed): each process fits every n_proc-th image on its own
    # devices, so one image never spans hosts and no collective runs inside a fit.
    images = images[proc::n_proc]
    log(f"process {proc}/{n_proc}: {len(images)} of {len(all_images)} images")
  results_path = os.path.join(cfg.workdir, "results.json" if n_proc == 1 else f"results.process{proc}.json")
  if flags_text and proc == 0 and not cfg.resume:
    with open(os.path.join(cfg.workdir, "flags.txt"), "w") as f:
      f.write(flags_text)
  cfg = resolve(cfg)
  if proc == 0 and not cfg.resume:
    outputs.write_json(os.path.join(cfg.workdir, "config.json"), dataclasses.asdict(cfg))
  records: dict[str, dict] = {}
  if cfg.resume and os.path.isfile(results_path):
    with open(results_path) as f:
      records = {r["name"]: r for r in json.load(f)["images"]}
    log(f"resuming {cfg.workdir}: {len(records)} of {len(images)} images finished")

  prelims: list[np.ndarray | None] = [None] * len(images)
  if prelim_images is not None:
    prelims = [prelim_images[im.name] for im in images]
  elif cfg.prelim.name != "none" and images:  # a process may get no images under --distributed
    t = time.perf_counter()
    prelims = prelim.get(cfg.prelim.name).run(cfg.prelim, images)
    log(f"preliminary denoiser {cfg.prelim.name}: {len(images)} images in {time.perf_counter() - t:.1f}s")

  prelim_sigmas = _prelim_sigmas(cfg, images, log)
  fit_cfg = cfg.fit
  results = {"device": outputs.device_name(), "commit": outputs.git_commit(),
             "code_hash": outputs.code_hash(), "date": outputs.now(),
             "method": cfg.method, "prelim": cfg.prelim.name, "sigma": cfg.sigma,
             "steps": fit_cfg.steps, "seeds": fit_cfg.seeds, "images": [], "mean": {}}
  runs_done: dict[int, list[dict]] = {}
  ckpt_dir = os.path.join(cfg.workdir, "checkpoints")
  buckets = list(data.bucket_keys(images, cfg.net.scales).items())
  for b, ((ph, pw, c), idx) in enumerate(buckets):
    net_cfg = dataclasses.replace(cfg.net, out_channels=c, complex_connection=method.complex_connection,
                                  in_channels=c if method.prelim_input else cfg.net.in_channels)
    runs = [(i, k) for i in idx for k in range(fit_cfg.seeds) if images[i].name not in records]
    if not runs:
      continue
    has_gt = images[idx[0]].clean_HxWxC is not None
    per_call = cfg.batch_size or fit.auto_batch_size(net_cfg, fit_cfg, ph, pw, len(runs), with_gt=has_gt)
    log(f"bucket {b + 1}/{len(buckets)} {ph}x{pw}x{c}: {len(runs)} runs, {per_call} per call"
        + ("" if cfg.batch_size else " (auto)"))
    start = 0
    while start < len(runs):
      part = runs[start:start + per_call]
      pad = lambda x: data.pad_reflect(x, ph, pw)
      ys = np.stack([pad(images[i].noisy_HxWxC) for i, _ in part])
      xbars = np.stack([pad(prelims[i]) for i, _ in part]) if prelims[0] is not None else np.zeros_like(ys)
      masks = np.stack([data.mask_for(*images[i].noisy_HxWxC.shape[:2], ph, pw) for i, _ in part])
      gts = np.stack([pad(images[i].clean_HxWxC) for i, _ in part]) if has_gt else None
      keys = [fit.run_keys(fit_cfg.seed, k) for _, k in part]
      batch = fit.Batch(
          input_HxWxC=fit.make_inputs(net_cfg, fit_cfg, keys, xbars, ph, pw, method.prelim_input),
          y_HxWxC=jnp.asarray(ys), prelim_HxWxC=jnp.asarray(xbars), mask_HxWx1=jnp.asarray(masks),
          gt_HxWxC=None if gts is None else jnp.asarray(gts))
      label = f"[bucket {b + 1}/{len(buckets)} {ph}x{pw}x{c}, runs {start + 1}-{start + len(part)}/{len(runs)}] "
      try:
        ckpt = checkpoint.call_path(ckpt_dir, [f"{images[i].name}:{k}" for i, k in part])
        res = fit.fit(net_cfg, fit_cfg, batch, keys, log=log, label=label, ckpt_path=ckpt,
                      ckpt_every=cfg.checkpoint_every)
      except Exception as e:  # a set that fits one image at a time must not fail on memory
        if not fit.is_out_of_memory(e):
          raise
        if len(part) == 1:
          raise RuntimeError(f"out of memory fitting one {ph}x{pw}x{c} image; try --remat") from e
        per_call = len(part) // 2
        log(f"out of memory at {len(part)} runs per call; retrying with {per_call}")
        continue
      start += len(part)
      for j, (i, k) in enumerate(part):
        runs_done.setdefault(i, []).append(
            _run_record(cfg, images[i], k, res, j, img_dir, hist_dir, len(part)))
        if len(runs_done[i]) == fit_cfg.seeds:
          records[images[i].name] = dict(_image_record(cfg, images[i], prelims[i], runs_done[i], img_dir),
                                          prelim_sigma=prelim_sigmas.get(images[i].name))
      results["images"] = [records[im.name] for im in images if im.name in records]
      results["mean"] = summarize(results["images"])
      # A killed run leaves a results.json that says so: finished < expected, complete false.
      results.update(expected_images=len(images), finished_images=len(results["images"]),
                     complete=len(results["images"]) == len(images))
      results["wall_seconds"] = time.perf_counter() - t_start
      outputs.write_json(results_path, results)  # incremental
      if os.path.isfile(ckpt):
        os.remove(ckpt)  # the call's results are written: its checkpoint is spent
      checkpoint.fault("image")
  if n_proc > 1:
    results = _merge_processes(results, all_images, cfg, results_path, t_start)
  if proc == 0 and all(im.clean_HxWxC is not None for im in all_images) and results["images"]:
    names = [r["name"] + ("_seed0" if fit_cfg.seeds > 1 else "") for r in results["images"]]
    outputs.plot_psnr_curves(os.path.join(cfg.workdir, "psnr_curve.png"), f"{cfg.method}: mean PSNR vs step",
                             {cfg.method: [outputs.read_history(os.path.join(hist_dir, n + ".csv")) for n in names]})
  _log_summary(results, log)
  return results


def _prelim_sigmas(cfg: RunConfig, images: list[Image], log) -> dict[str, float]:
  """The noise level x_bar was made for, per image: --sigma, or the blind estimate (logged and
  recorded); warns when it lies outside what the denoiser was trained on."""
  if cfg.prelim.name in ("none", "file") or not images:
    return {}
  sigmas = dict(zip([im.name for im in images], prelim.sigmas_for(cfg.prelim, images)))
  if not cfg.prelim.sigma:
    log("estimated noise levels (Chen et al. 2015, 0-255): "
        + ", ".join(f"{n} {s:.1f}" for n, s in sigmas.items()))
  top = prelim.TRAINED_SIGMA_MAX.get(cfg.prelim.name)
  if top is not None and max(sigmas.values()) > top:
    log(f"warning: sigma {max(sigmas.values()):g} is above the {top:g} that {cfg.prelim.name}'s "
        "weights were trained on; x_bar is an extrapolation")
  return sigmas


def run_methods(cfgs: list[RunConfig], log: Callable[[str], None] = print, flags_text: str = "") -> dict:
  """Several methods on the same inputs, noise and x_bar (made once), each in its own
  sub-folder of the first config's workdir; prints and writes a comparison (summary.json)."""
  if len(cfgs) == 1:
    return {cfgs[0].method: run(cfgs[0], log, flags_text)}
  top = cfgs[0].workdir
  for c in cfgs:
    validate(c)
  images = load_inputs(cfgs[0])  # every input error surfaces here, before compute
  if cfgs[0].resume:
    for c in cfgs:
      check_output_folder(dataclasses.replace(c, workdir=os.path.join(top, c.method)))
  else:
    outputs.check_workdir(top, cfgs[0].overwrite)
  needs_prelim = [c for c in cfgs if METHODS[c.method].prelim_input or METHODS[c.method].prelim_loss]
  for c in needs_prelim:
    prelim.get(c.prelim.name).check(c.prelim, images)
  prelims = None
  if needs_prelim:
    t = time.perf_counter()
    c = needs_prelim[0]
    prelims = dict(zip([im.name for im in images], prelim.get(c.prelim.name).run(c.prelim, images)))
    log(f"preliminary denoiser {c.prelim.name}: {len(images)} images in {time.perf_counter() - t:.1f}s")
  if not cfgs[0].resume:
    outputs.prepare_workdir(top, cfgs[0].overwrite)
  results = {}
  for c in cfgs:
    log(f"=== {c.method}")
    sub = dataclasses.replace(c, workdir=os.path.join(top, c.method))
    uses = c in needs_prelim
    results[c.method] = run(sub if uses else dataclasses.replace(sub, prelim=prelim.PrelimConfig()),
                            log, flags_text, images=images, prelim_images=prelims if uses else None)
  summary = {m: dict(r["mean"], steps=r["steps"], wall_seconds=r["wall_seconds"]) for m, r in results.items()}
  outputs.write_json(os.path.join(top, "summary.json"), summary)
  log("method   steps   noisy  x_bar   final     ema  seconds")
  fmt = lambda v: f"{v:7.2f}" if isinstance(v, float) else "      -"
  for m, r in summary.items():
    log(f"{m:8s} {r['steps']:5d} " + " ".join(fmt(r.get(k)) for k in ("psnr_noisy", "psnr_prelim", "psnr_final",
                                                                    "psnr_ema")) + f" {r['wall_seconds']:8.1f}")
  return results


def run_cli(methods: list[str], workdir: str, make_config: Callable[[str, str], RunConfig],
            flags_text: str = "", distributed: tuple[str, int, int] | None = None) -> int:
  """The entry point behind run.py, given the parsed flags: an exit code, one error line for
  bad input (before any compute), one line on Ctrl-C saying how to resume."""
  try:
    if not methods or len(set(methods)) != len(methods):
      raise InputError(f"--method needs distinct methods (got {','.join(methods)})")
    workdir = workdir or f"runs/{'-'.join(methods)}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    cfgs = [make_config(m, workdir) for m in methods]
    # Reruns skip compilation (a 64 px, 5-step run: 66 s -> 14 s measured in issue 13).
    jax.config.update("jax_compilation_cache_dir", os.environ.get(
        "IDIP_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "idip-jax", "jax")))
    if distributed is not None:
      init_distributed(*distributed)
    run_methods(cfgs, flags_text=flags_text)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"interrupted: finished images are in {workdir}/results.json; run the same command with "
          f"--workdir={workdir} --resume to continue", file=sys.stderr)
    return 130
  return 0


def init_distributed(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> None:
  """jax.distributed.initialize; empty/default arguments are auto-detected (SLURM, TPU pods...)."""
  kw = {}
  if coordinator:
    kw.update(coordinator_address=coordinator)
  if num_processes:
    kw.update(num_processes=num_processes)
  if process_id >= 0:
    kw.update(process_id=process_id)
  jax.distributed.initialize(**kw)


def _barrier(name: str, n_proc: int) -> None:
  if n_proc > 1:
    multihost_utils.sync_global_devices(name)


def _merge_processes(results: dict, images: list[Image], cfg: RunConfig, own_path: str,
                     t_start: float) -> dict:
  """Every process's image records, gathered over the network (no shared disk needed);
  process 0 writes them, in input order, as results.json."""
  blob = np.frombuffer(json.dumps(results["images"], default=float).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.array([blob.size]))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:blob.size] = blob
  blobs = multihost_utils.process_allgather(padded)
  records = {}
  for n, row in zip(np.ravel(sizes), blobs):
    records.update({r["name"]: r for r in json.loads(bytes(row[:n]).decode())})
  merged = dict(results, images=[records[im.name] for im in images if im.name in records],
                processes=jax.process_count(), wall_seconds=time.perf_counter() - t_start)
  merged["mean"] = summarize(merged["images"])
  if jax.process_index() == 0:
    outputs.write_json(os.path.join(cfg.workdir, "results.json"), merged)
  _barrier("results", jax.process_count())
  return merged


def _run_record(cfg, im: Image, k: int, res: fit.FitResult, j: int, img_dir: str, hist_dir: str,
                batch_runs: int) -> dict:
  h, w, _ = im.noisy_HxWxC.shape
  final, ema = res.final_NxHxWxC[j, :h, :w], res.ema_NxHxWxC[j, :h, :w]
  tag = im.name if cfg.fit.seeds == 1 else f"{im.name}_seed{k}"
  hist = {name: v[:, j] for name, v in res.history.items()}
  outputs.write_history(os.path.join(hist_dir, tag + ".csv"), hist)
  if cfg.save_images:
    outputs.save_image(os.path.join(img_dir, tag + "_final.png"), final, cfg.save_float)
    outputs.save_image(os.path.join(img_dir, tag + "_ema.png"), ema, cfg.save_float)
  rec = {"seed": k, "final": final, "ema": ema, "seconds": res.seconds, "compile_seconds": res.compile_seconds,
         "batch_runs": batch_runs,
         "backtracks": int(hist["backtracked"].sum()),
         # Backtracking keeps a run finite unless it was never finite; then it is reported as failed.
         "failed": not (np.isfinite(final).all() and np.isfinite(ema).all())}
  if im.clean_HxWxC is not None and not rec["failed"]:
    best = int(np.nanargmax(hist["psnr"]))  # clean-input output, on evaluated steps
    rec.update(psnr_final=_psnr(final, im.clean_HxWxC), psnr_ema=_psnr(ema, im.clean_HxWxC),
               ssim_final=_ssim(final, im.clean_HxWxC), ssim_ema=_ssim(ema, im.clean_HxWxC),
               oracle_best_psnr=float(hist["psnr"][best]), oracle_best_step=best + 1)
  return rec


def _image_record(cfg, im: Image, xbar, runs: list[dict], img_dir: str) -> dict:
  h, w, c = im.noisy_HxWxC.shape
  gt = im.clean_HxWxC
  rec = {"name": im.name, "height": h, "width": w, "channels": c, "steps": cfg.fit.steps,
         "seconds": float(np.mean([r["seconds"] for r in runs])), "compile_seconds": runs[0]["compile_seconds"],
         "batch_runs": runs[0]["batch_runs"],
         "backtracks": sum(r["backtracks"] for r in runs), "failed": any(r["failed"] for r in runs),
         "psnr_noisy": None, "psnr_prelim": None}
  if cfg.save_images:
    outputs.save_image(os.path.join(img_dir, im.name + "_noisy.png"), im.noisy_HxWxC, cfg.save_float)
    if xbar is not None:
      outputs.save_image(os.path.join(img_dir, im.name + "_prelim.png"), xbar, cfg.save_float)
  if gt is None or rec["failed"]:
    return rec
  rec["psnr_noisy"] = _psnr(im.noisy_HxWxC, gt, clip=False)  # the noisy image as fitted
  if xbar is not None:
    rec["psnr_prelim"] = _psnr(xbar, gt)
  for key in ("psnr_final", "psnr_ema", "ssim_final", "ssim_ema", "oracle_best_psnr", "oracle_best_step"):
    rec[key] = float(np.mean([r[key] for r in runs]))
  if len(runs) > 1:
    # DIP's "average of two runs": PSNR of the mean image of the K runs.
    rec["psnr_avg_final"] = _psnr(np.mean([r["final"] for r in runs], axis=0), gt)
    rec["psnr_avg_ema"] = _psnr(np.mean([r["ema"] for r in runs], axis=0), gt)
    rec["runs"] = [{k: r[k] for k in ("seed", "psnr_final", "psnr_ema", "ssim_final",
                                       "oracle_best_psnr", "oracle_best_step")} for r in runs]
  return rec


def _log_summary(results: dict, log) -> None:
  cols = ("psnr_noisy", "psnr_prelim", "psnr_final", "psnr_ema", "oracle_best_psnr")
  log("name            noisy  prelim   final     ema  oracle_best")
  fmt = lambda v: f"{v:7.2f}" if isinstance(v, float) else "      -"
  for r in results["images"] + [dict(results["mean"], name="MEAN")]:
    log(f"{r['name'][:14]:14s} " + " ".join(fmt(r.get(c)) for c in cols))
