"""One denoising job: check the config and inputs, resolve the settings as run, make x_bar,
fit every same-shape bucket in calls, write results incrementally."""

from __future__ import annotations

import dataclasses
import glob
import os
import time

import jax
import numpy as np
from absl import logging

from idip_jax import (
  batching,
  buckets,
  checkpoint,
  config,
  data,
  fit,
  inits,
  locks,
  outputs,
  prelim,
  results,
  resume,
  stored,
  sure_fit,
  sure_twins,
  tasks,
)
from idip_jax.checks import validate
from idip_jax.config import DEFAULT_STEPS, METHODS, RunConfig
from idip_jax.data import Image, InputError


def image_channels(images: list[Image]) -> int:
  found = sorted({im.noisy_HxWxC.shape[-1] for im in images})
  if len(found) > 1:
    raise InputError(f"the inputs have {' and '.join(map(str, found))} channels; set --image_channels=1 or 3")
  return found[0]


def resolve(cfg: RunConfig, channels: int, backend: str | None = None, per_core: bool = False) -> RunConfig:
  """The config as run, every default and "auto" made explicit (config.json records it): the
  method's step count, its three IDIP changes (the net's complex connection and input channels,
  the x_bar loss weight: 0 without change 3), the network for `channels`-channel images, and
  the loop, conv path and (under vmap or on CPU) batch size of `backend`; per_core (a process of
  --cpu_processes): one run per call, the layout measured (per_core.py)."""
  backend = backend or jax.default_backend()
  net, fit_cfg = config.apply_method(cfg.method, cfg.net, cfg.fit, channels)
  fit_cfg = dataclasses.replace(fit_cfg, steps=cfg.fit.steps or DEFAULT_STEPS[cfg.method])
  net, fit_cfg = fit.for_backend(net, fit_cfg, backend)
  batch_size = cfg.batch_size
  if cfg.fit.batch_strategy == "auto" and per_core:
    fit_cfg, batch_size = dataclasses.replace(fit_cfg, batch_strategy="vmap"), 1
  elif cfg.fit.batch_strategy == "auto":
    # Chosen per bucket by timing the candidates on its shape (buckets.plan -> batch_choice.choose),
    # not by the backend's default; config.json records the choice per bucket.
    fit_cfg = dataclasses.replace(fit_cfg, batch_strategy="auto")
    net = dataclasses.replace(net, batch_conv=cfg.net.batch_conv)
  elif not batch_size and backend == "cpu":
    batch_size = 1  # no memory analysis to size a batch from on CPU
  return dataclasses.replace(cfg, net=net, fit=fit_cfg, batch_size=batch_size)


def load_inputs(cfg: RunConfig) -> list[Image]:
  """The images of a validated config: y (and the ground truth where there is one) per task."""
  task = cfg.fit.task
  images = data.load_images(
    cfg.input,
    cfg.sigma,
    cfg.noise_seed,
    cfg.image_channels,
    cfg.crop,
    cfg.noise,
    min_size=2**cfg.net.scales,
    skip=tasks.is_mask_file if task == "inpaint" else None,
  )
  if task != "denoise":  # the inputs are the ground truth; y is made from them
    images = [dataclasses.replace(im, clean_HxWxC=im.noisy_HxWxC) if im.clean_HxWxC is None else im for im in images]
  if task == "inpaint":
    images = tasks.inpaint_images(images, cfg.mask, cfg.noise_seed, cfg.crop)
  if task == "sr":
    images = tasks.sr_images(images, cfg.fit.sr_factor, 32 if cfg.sr_crop else 0)
    side = 2**cfg.net.scales
    for im in images:  # y is not padded: the HR output must fit the net as it is
      h, w, _ = im.noisy_HxWxC.shape
      if h % side or w % side:
        raise InputError(f"{im.name}: {h}x{w} HR is not a multiple of 2^scales = {side} (use --sr_crop)")
  image_channels(images)
  return images


def check_xbar(cfg: RunConfig, images: list[Image]) -> None:
  """x_bar's maker and --stop=sure's candidates can run on these images (weights, files, sizes)."""
  if cfg.prelim.name != "none":
    prelim.REGISTRY[cfg.prelim.name].check(prelim.spec_of(cfg), images)
  if cfg.fit.stop == "sure":  # NAME_sure.png blends the fit with these
    prelim.check_candidates(prelim.spec_of(cfg), images)


@locks.held()  # the workdir's lock, taken while checking it, is released when the job returns
def run(
  cfg: RunConfig,
  flags_text: str = "",
  images: list[Image] | None = None,
  prelim_images: dict[str, np.ndarray] | None = None,
  prelim_info: dict[str, dict] | None = None,
  layout: dict | None = None,
) -> dict:
  """One method's job in a straight line: validate -> load -> check x_bar and the workdir ->
  resolve (once) -> fit_and_record. images / prelim_images: already loaded inputs and x_bar by name
  (tables reuse them); prelim_info: what x_bar's maker reported per image (prelim.run)."""
  validate(cfg)
  images = load_inputs(cfg) if images is None else images
  if prelim_images is None:
    check_xbar(cfg, images)
  resolved = resolve(cfg, image_channels(images), per_core=(layout or {}).get("processes", 1) > 1)
  if cfg.init:
    inits.load(cfg.init, resolved.net)  # a missing, damaged or other net's init: one line, before compute
  resume.check_output_folder(cfg, resolved, images)  # every input error surfaces by here, before compute
  return fit_and_record(resolved, images, flags_text, prelim_images, prelim_info, layout)


def fit_and_record(
  cfg: RunConfig,
  images: list[Image],
  flags_text: str = "",
  prelim_images: dict[str, np.ndarray] | None = None,
  prelim_info: dict[str, dict] | None = None,
  layout: dict | None = None,
) -> dict:
  """The checked and resolved run: x_bar, every bucket's fits in calls, results written as they come."""
  t_start = time.perf_counter()
  n_proc, proc = jax.process_count(), jax.process_index()
  # Every process has checked the workdir before process 0 writes into it (--distributed).
  results.barrier("checked", n_proc)
  if proc == 0 and not cfg.resume:
    outputs.prepare_workdir(cfg.workdir, cfg.overwrite, resume.paths_read(cfg))
  results.barrier("workdir", n_proc)
  img_dir, hist_dir = os.path.join(cfg.workdir, "images"), os.path.join(cfg.workdir, "history")
  os.makedirs(img_dir, exist_ok=True), os.makedirs(hist_dir, exist_ok=True)
  all_images = images
  if n_proc > 1:
    # Multi-host (jax.distributed): each process fits every n_proc-th image on its own
    # devices, so one image never spans hosts and no collective runs inside a fit.
    images = images[proc::n_proc]
    logging.info("process %d/%d: %d of %d images", proc, n_proc, len(images), len(all_images))
  results_path = os.path.join(cfg.workdir, "results.json" if n_proc == 1 else f"results.process{proc}.json")
  if flags_text and proc == 0 and not cfg.resume:
    with outputs.atomic_open(os.path.join(cfg.workdir, "flags.txt"), "w") as f:
      f.write(flags_text)
  digests = resume.input_digests(cfg, all_images)
  records: dict[str, dict] = {}
  if cfg.resume:  # every finished image, whichever layout (one process, --cpu_processes) fitted it
    mine = {im.name for im in images}
    for path in [os.path.join(cfg.workdir, "results.json"), *resume.process_results(cfg.workdir)]:
      if os.path.isfile(path):
        records.update({r["name"]: r for r in stored.read_stored(path)["images"] if r["name"] in mine})
    for name, path in resume.missing_outputs(cfg.workdir, list(records)).items():
      logging.warning("--resume: %s is gone since the stored run; fitting %s again", path, name)
      del records[name]
    logging.info("resuming %s: %d of %d images finished", cfg.workdir, len(records), len(images))

  prelims: list[np.ndarray | None] = [None] * len(images)
  prelim_infos: list[dict] = [{} for _ in images]  # per image: what x_bar's maker reports (SURE weights)
  if prelim_images is not None:
    prelims = [prelim_images[im.name] for im in images]
    prelim_infos = [(prelim_info or {}).get(im.name, {}) for im in images]
  elif cfg.prelim.name != "none" and images:  # a process may get no images under --distributed
    prelims, prelim_infos = prelim.run_logged(prelim.spec_of(cfg), images)
  prelim_sigmas = _prelim_sigmas(cfg, images)
  twins, candidates = None, None
  if cfg.fit.stop == "sure" and images:
    twins, candidates = sure_twins.inputs(cfg, images, prelims)
  init_params = inits.load(cfg.init, cfg.net) if cfg.init else None
  plan = buckets.plan(cfg, images, set(records))
  recording = results.recording_of(cfg)
  if proc == 0 and not cfg.resume:
    outputs.write_json(
      os.path.join(cfg.workdir, "config.json"),
      dict(
        dataclasses.asdict(cfg),
        buckets=[dict(b, runs=len(b["runs"])) for b in plan],
        inputs=digests,
        **({"layout": layout} if layout else {}),
      ),
    )
  res_all = {
    "device": outputs.device_name(),
    "commit": outputs.git_commit(),
    "code_hash": outputs.code_hash(),
    "date": outputs.now(),
    "method": cfg.method,
    "prelim": cfg.prelim.name,
    "sigma": cfg.sigma,
    "task": cfg.fit.task,
    "steps": cfg.fit.steps,
    "seeds": cfg.fit.seeds,
    "stop": cfg.fit.stop,
    "images": [],
    "mean": {},
  }

  def record_finished() -> None:
    res_all["images"] = [records[im.name] for im in images if im.name in records]
    res_all["mean"] = results.summarize(res_all["images"])
    # A killed run leaves a results.json that says so: finished < expected, complete false.
    res_all.update(
      expected_images=len(images),
      finished_images=len(res_all["images"]),
      complete=len(res_all["images"]) == len(images),
      wall_seconds=time.perf_counter() - t_start,
    )

  record_finished()  # --resume: what the stored run finished (all of it: its summary is printed)
  runs_done: dict[int, list[dict]] = {}
  ckpt_dir = os.path.join(cfg.workdir, "checkpoints")
  for b, bucket in enumerate(plan):
    runs, shape = bucket["runs"], bucket["shape"]
    if not runs:
      continue
    what = "x".join(map(str, shape))
    logging.info(
      "bucket %d/%d %s: %d runs, %d per call (%s, %s)",
      b + 1,
      len(plan),
      what,
      len(runs),
      bucket["batch_size"],
      bucket["batch_strategy"],
      bucket["batch_conv"],
    )

    def fit_call(part, b=b, shape=shape, runs=runs, what=what):  # bound: the calls run in this iteration
      batch, keys = buckets.call_batch(cfg, images, prelims, part, shape, twins)
      start = runs.index(part[0])
      label = f"[bucket {b + 1}/{len(plan)} {what}, runs {start + 1}-{start + len(part)}/{len(runs)}] "
      ckpt = checkpoint.call_path(ckpt_dir, [f"{images[i].name}:{k}" for i, k in part])
      net_b, fit_b = buckets.configs(cfg, plan[b])
      return ckpt, fit.fit(
        net_b, fit_b, batch, keys, label=label, ckpt_path=ckpt, ckpt_every=cfg.checkpoint_every, init_params=init_params
      )

    for part, (ckpt, res) in batching.fit_in_calls(runs, bucket["batch_size"], fit_call, what):
      for j, (i, k) in enumerate(part):
        row = j * sure_fit.rows_per_run(cfg.fit)  # --stop=sure: the rows after a run's are its twins'.
        rec = results.run_record(
          recording, images[i], k, res, row, img_dir, hist_dir, len(part), candidates and candidates[i]
        )
        runs_done.setdefault(i, []).append(rec)
        if len(runs_done[i]) == cfg.fit.seeds:
          records[images[i].name] = dict(
            results.image_record(recording, images[i], prelims[i], runs_done[i], img_dir),
            prelim_sigma=prelim_sigmas.get(images[i].name),
            **prelim_infos[i],
          )
      record_finished()
      outputs.write_json(results_path, res_all)  # incremental
      if os.path.isfile(ckpt):
        os.remove(ckpt)  # the call's results are written: its checkpoint is spent
  if n_proc > 1:  # after the merge every process has finished its calls
    res_all = results.merge_processes(res_all, all_images, os.path.join(cfg.workdir, "results.json"), t_start)
  if res_all["complete"] and proc == 0:  # a run killed between writing a call's results and removing its checkpoint
    for spent in glob.glob(os.path.join(glob.escape(ckpt_dir), "call-*.npz")):
      os.remove(spent)
  if proc == 0 and all(im.clean_HxWxC is not None for im in all_images) and res_all["images"]:
    names = [r["name"] + ("_seed0" if cfg.fit.seeds > 1 else "") for r in res_all["images"]]
    outputs.plot_psnr_curves(
      os.path.join(cfg.workdir, "psnr_curve.png"),
      f"{cfg.method}: mean PSNR vs step",
      {cfg.method: [results.read_history(os.path.join(hist_dir, n + ".csv")) for n in names]},
    )
  if proc == 0:  # the merged table, once (--distributed)
    results.print_summary(res_all)
  return res_all


def _prelim_sigmas(cfg: RunConfig, images: list[Image]) -> dict[str, float]:
  """The noise level x_bar was made for, per image: --sigma, or the blind estimate (logged and
  recorded); warns when it lies outside what the denoiser was trained on."""
  if cfg.prelim.name in ("none", "file") or not images:
    return {}
  sigmas = dict(zip([im.name for im in images], prelim.sigmas_for(prelim.spec_of(cfg), images)))
  if not cfg.sigma:
    logging.info(
      "estimated noise levels (Chen et al. 2015, 0-255): %s", ", ".join(f"{n} {s:.1f}" for n, s in sigmas.items())
    )
  top = prelim.TRAINED_SIGMA_MAX.get(cfg.prelim.name)
  if top is not None and max(sigmas.values()) > top:
    logging.warning(
      "sigma %g is above the %g that %s's weights were trained on; x_bar is an extrapolation",
      max(sigmas.values()),
      top,
      cfg.prelim.name,
    )
  return sigmas


@locks.held()
def run_methods(cfgs: list[RunConfig], flags_text: str = "", layout: dict | None = None) -> dict:
  """Several methods on the same inputs, noise and x_bar (made once), each in its own
  sub-folder of the first config's workdir; prints and writes a comparison (summary.json). layout: the processes
  a one-method job runs as and why (cli.processes_for), for its config.json."""
  if len(cfgs) == 1:
    res = {cfgs[0].method: run(cfgs[0], flags_text, layout=layout)}
    if jax.process_index() == 0:
      print(where_outputs_are(cfgs[0].workdir, [""]))
    return res
  top = cfgs[0].workdir
  for c in cfgs:
    validate(c)
  images = load_inputs(cfgs[0])
  uses = lambda c: METHODS[c.method].prelim_input or METHODS[c.method].prelim_loss
  # Each method in its sub-folder; one without x_bar gets none (its fit never reads one).
  subs = [
    dataclasses.replace(c, workdir=os.path.join(top, c.method), prelim=c.prelim if uses(c) else no_prelim(c))
    for c in cfgs
  ]
  for c in subs:
    check_xbar(c, images)
  resolved = [resolve(c, image_channels(images)) for c in subs]
  for r in resolved:
    if r.init:
      inits.load(r.init, r.net)
  if cfgs[0].resume:
    locks.lock(top, os.path.join(top, outputs.MARKER))
    for c, r in zip(subs, resolved):
      resume.check_output_folder(c, r, images)
  else:
    resume.check_output_names(images)
    outputs.check_workdir(top, cfgs[0].overwrite, resume.paths_read(cfgs[0]))
  # every input error surfaces by here, before compute
  needs_prelim = [c for c in subs if uses(c)]
  prelims, prelim_info = None, None
  if needs_prelim:
    xbars, infos = prelim.run_logged(prelim.spec_of(needs_prelim[0]), images)
    prelims = dict(zip([im.name for im in images], xbars))
    prelim_info = dict(zip([im.name for im in images], infos))
  if not cfgs[0].resume:
    outputs.prepare_workdir(top, cfgs[0].overwrite, resume.paths_read(cfgs[0]))
  res = {}
  for c, r in zip(subs, resolved):
    logging.info("=== %s", c.method)
    if not c.resume:  # the sub-folder: new, inside the top folder just prepared
      resume.check_output_folder(c, r, images)
    res[c.method] = fit_and_record(
      r, images, flags_text, prelims if uses(c) else None, prelim_info if uses(c) else None
    )
  summary = {m: dict(r["mean"], steps=r["steps"], wall_seconds=r["wall_seconds"]) for m, r in res.items()}
  outputs.write_json(os.path.join(top, "summary.json"), summary)
  print("method   steps   noisy  x_bar   final     ema  seconds")
  fmt = lambda v: f"{v:7.2f}" if isinstance(v, float) else "      -"
  for m, r in summary.items():
    print(
      f"{m:8s} {r['steps']:5d} "
      + " ".join(fmt(r.get(k)) for k in ("psnr_noisy", "psnr_prelim", "psnr_final", "psnr_ema"))
      + f" {r['wall_seconds']:8.1f}"
    )
  print(where_outputs_are(top, [c.method for c in cfgs]) + ", the comparison in summary.json")
  return res


def no_prelim(cfg: RunConfig) -> config.PrelimConfig:
  """The x_bar settings of a method without x_bar: none; under --stop=sure the candidates' settings
  stay (NAME_sure.png blends them)."""
  if cfg.fit.stop != "sure":
    return config.PrelimConfig()
  return dataclasses.replace(cfg.prelim, name="none", x8=False, prelim_dir="")


def where_outputs_are(top: str, subs: list[str]) -> str:
  """The one line a run ends with: where its images and PSNR curves are."""
  sub = "{" + ",".join(subs) + "}/" if subs != [""] else ""
  curve = os.path.isfile(os.path.join(top, subs[0], "psnr_curve.png"))
  return f"outputs in {top}/: images in {sub}images/" + (f", PSNR curves in {sub}psnr_curve.png" if curve else "")
