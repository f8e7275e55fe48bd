"""One denoising job: check the config and inputs, resolve the settings as run, make x_bar,
fit every same-shape bucket in calls, write results incrementally."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import glob
import hashlib
import json
import logging as std_logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from idip_jax import batching, checkpoint, config, data, fit, outputs, prelim, results, sure_fit, tasks
from idip_jax.config import DEFAULT_STEPS, METHODS, JobConfig, RunConfig
from idip_jax.data import Image, InputError, OutputError
from idip_jax.train import Batch, run_keys


def validate(cfg: RunConfig) -> None:
  """Every rule on the settings alone (before reading any file): one InputError line."""
  config.check(cfg)

  def need(ok, msg):
    if not ok:
      raise InputError(msg)

  need(bool(cfg.input), "--input is required (a file, folder, glob or skimage:NAME)")
  need(bool(cfg.workdir), "--workdir is empty")
  need(cfg.net.scales <= 8, f"--scales must be in 1..8 (got {cfg.net.scales})")
  need(not (cfg.resume and cfg.overwrite), "--resume and --overwrite exclude each other")
  m = METHODS[cfg.method]
  need(
    not (m.prelim_input or m.prelim_loss) or cfg.prelim.name != "none",
    f"--method={cfg.method} needs a preliminary denoiser: set --prelim (bm3d, file, ffdnet, dncnn)",
  )
  task = cfg.fit.task
  need(
    task == "denoise" or not (m.prelim_input or m.prelim_loss) or (task == "sr" and cfg.prelim.name == "bicubic"),
    f"--task={task} runs --method=dip or idip1 (x_bar, IDIP's changes 2 and 3, is a denoiser's output; "
    "for --task=sr: --prelim=bicubic)",
  )
  need(task == "sr" or cfg.prelim.name != "bicubic", "--prelim=bicubic is super-resolution's x_bar: set --task=sr")
  need(
    not cfg.prelim.x8 or cfg.prelim.name in ("ffdnet", "dncnn"),
    f"--x8 is the self-ensemble of a CNN x_bar: --prelim=ffdnet or dncnn (got {cfg.prelim.name})",
  )
  need(task != "sr" or cfg.sigma == 0, "--task=sr fits noise-free low-resolution images: leave --sigma at 0")
  if task == "inpaint":
    tasks.parse_keep(cfg.mask)  # a bad bernoulli:P fails here
    need(
      cfg.mask.startswith("bernoulli:") or os.path.exists(cfg.mask),
      f"--mask={cfg.mask}: no such file or folder (or use bernoulli:P)",
    )
  steps = cfg.fit.steps or DEFAULT_STEPS[cfg.method]
  need(
    cfg.fit.stop not in ("wmv", "emv") or cfg.fit.stop_window + 1 < steps,
    f"--stop={cfg.fit.stop} needs --stop_window ({cfg.fit.stop_window}) below --steps - 1 ({steps - 1}): "
    "its variance is first known after the window fills",
  )
  if cfg.fit.stop == "sure":
    need(cfg.sigma > 0, "--stop=sure needs the noise level: set --sigma (SURE is unbiased only at a known sigma)")
    need(task == "denoise", f"--stop=sure estimates a denoiser's error: --task=denoise (got {task})")
    need(
      cfg.prelim.name not in ("file",) or not (m.prelim_input or m.prelim_loss),
      "--stop=sure fits a twin to y + eps b, whose x_bar must be made too: --prelim=file cannot",
    )
  need(
    not (m.complex_connection and cfg.net.skip_channels == 0),
    "the complex connection lives on the skips: --skip_channels must be > 0",
  )


def image_channels(images: list[Image]) -> int:
  found = sorted({im.noisy_HxWxC.shape[-1] for im in images})
  if len(found) > 1:
    raise InputError(f"the inputs have {' and '.join(map(str, found))} channels; set --image_channels=1 or 3")
  return found[0]


def resolve(cfg: RunConfig, channels: int, backend: str | None = None) -> RunConfig:
  """The config as run, every default and "auto" made explicit (config.json records it): the
  method's step count, its three IDIP changes (the net's complex connection and input channels,
  the x_bar loss weight: 0 without change 3), the network for `channels`-channel images, and
  the loop, conv path and (under vmap or on CPU) batch size of `backend`."""
  m = METHODS[cfg.method]
  backend = backend or jax.default_backend()
  net = dataclasses.replace(
    cfg.net,
    out_channels=channels,
    complex_connection=m.complex_connection,
    in_channels=channels if m.prelim_input else cfg.net.in_channels,
  )
  fit_cfg = dataclasses.replace(
    cfg.fit,
    steps=cfg.fit.steps or DEFAULT_STEPS[cfg.method],
    prelim_weight=cfg.fit.prelim_weight if m.prelim_loss else 0.0,
    input_is_prelim=m.prelim_input,
  )
  net, fit_cfg = fit.for_backend(net, fit_cfg, backend)
  batch_size = cfg.batch_size
  if cfg.fit.batch_strategy == "auto":
    # Chosen per bucket by timing the candidates on its shape (plan_buckets -> batching.choose),
    # not by the backend's default; config.json records the choice per bucket.
    fit_cfg = dataclasses.replace(fit_cfg, batch_strategy="auto")
    net = dataclasses.replace(net, batch_conv=cfg.net.batch_conv)
  elif not batch_size and backend == "cpu":
    batch_size = 1  # no memory analysis to size a batch from on CPU
  return dataclasses.replace(cfg, net=net, fit=fit_cfg, batch_size=batch_size)


def load_inputs(cfg: RunConfig) -> list[Image]:
  validate(cfg)
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
  if cfg.prelim.name != "none":
    prelim.REGISTRY[cfg.prelim.name].check(cfg, images)
  if cfg.fit.stop == "sure":  # NAME_sure.png blends the fit with these
    prelim.check_candidates(cfg, images)
  return images


def paths_read(cfg: RunConfig) -> tuple[str, ...]:
  """Every file and folder the run reads: --overwrite must not delete any of them."""
  try:
    reads = [p for p in data.list_inputs(cfg.input) if not p.startswith("skimage:")]
  except InputError:  # images handed to run() by an experiment, cfg.input a label
    reads = []
  if cfg.prelim.name == "file":
    reads.append(cfg.prelim.prelim_dir)
  if cfg.prelim.name in ("ffdnet", "dncnn"):
    reads += [p for p in (cfg.prelim.weights, cfg.prelim.weights_dir) if p]
  if cfg.fit.task == "inpaint" and tasks.parse_keep(cfg.mask) is None:
    reads.append(cfg.mask)
  return tuple(reads)


def input_digests(cfg: RunConfig, images: list[Image]) -> dict[str, str]:
  """A checksum per image of what it fits (y, ground truth, mask) and of its x_bar file: a
  --resume refuses a stored run whose inputs changed since (config.json records them)."""
  out = {}
  for im in images:
    h = hashlib.sha1()
    for a in (im.noisy_HxWxC, im.clean_HxWxC, im.observed_HxWx1, im.lr_HxWxC):
      if a is not None:
        h.update(np.ascontiguousarray(a, np.float32).tobytes())
    if cfg.prelim.name == "file":
      with open(prelim.file_for(cfg, im.name), "rb") as f:
        h.update(f.read())
    out[im.name] = h.hexdigest()[:16]
  return out


def read_stored(path: str) -> dict:
  """A stored run's JSON file (config.json, results.json); one line if it is damaged."""
  try:
    with open(path) as f:
      return json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise InputError(
      f"--resume: {path} is damaged ({type(e).__name__}: {e}); restore it, or run again into a new --workdir"
    ) from None


def load_and_check(cfg: RunConfig) -> list[Image]:
  images = load_inputs(cfg)
  check_output_folder(cfg, images)
  return images


# Settings that may differ between a run and its --resume: where and how outputs are written.
RESUME_FREE = (
  "workdir",
  "overwrite",
  "resume",
  "batch_size",
  "batch_cache",
  "checkpoint_every",
  "save_images",
  "save_float",
  "buckets",
  "inputs",  # compared by content (input_digests), below
)
# Output file names per image are NAME[_seedK]_KIND.png, written as .NAME..._KIND.png.XXXXXXXX.tmp first.
OUTPUT_NAME_EXTRA = 40


def check_output_names(images: list[Image]) -> None:
  for im in images:
    if len(im.name.encode()) + OUTPUT_NAME_EXTRA > 255:
      raise InputError(f"{im.name}: the image's name is too long for the names of its output files")


def check_output_folder(cfg: RunConfig, images: list[Image]) -> None:
  """A new run needs an empty (or --overwrite-able) workdir; --resume needs the stored run's
  folder and the same settings (one line naming the first that differs)."""
  check_output_names(images)
  if not cfg.resume:
    outputs.check_workdir(cfg.workdir, cfg.overwrite, paths_read(cfg))
    return
  path = os.path.join(cfg.workdir, "config.json")
  if not os.path.isfile(path):
    raise InputError(f"--resume: no run to continue in --workdir={cfg.workdir} (no config.json)")
  have = read_stored(path)
  if os.path.isfile(os.path.join(cfg.workdir, "results.json")):
    read_stored(os.path.join(cfg.workdir, "results.json"))
  want = json.loads(json.dumps(dataclasses.asdict(resolve(cfg, image_channels(images)))))

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
  stored = have.get("inputs")
  if stored is None:
    raise InputError(
      f"--resume: the stored run in {cfg.workdir} records no input checksums (made before they were), so "
      "its results cannot be checked against the inputs: run again into a new --workdir"
    )
  now = input_digests(cfg, images)
  for name in sorted(set(stored) | set(now)):
    if stored.get(name) != now.get(name):
      what = "is new" if name not in stored else "is gone" if name not in now else "has changed (or its x_bar/mask)"
      raise InputError(
        f"--resume: input {name} {what} since the stored run in {cfg.workdir}; its results would not be of "
        "these inputs: run again into a new --workdir"
      )


def plan_buckets(cfg: RunConfig, images: list[Image], done: set[str]) -> list[dict]:
  """Same-shape buckets of the images (padded to a multiple of 2^scales), each with its runs
  (image index, seed) still to fit and its runs per call."""
  plan = []
  for (ph, pw, c), idx in data.bucket_keys(images, cfg.net.scales).items():
    runs = [(i, k) for i in idx for k in range(cfg.fit.seeds) if images[i].name not in done]
    has_gt = images[idx[0]].clean_HxWxC is not None
    bucket = {"shape": [ph, pw, c], "images": len(idx), "runs": runs}
    if cfg.fit.batch_strategy == "auto":  # a bucket with no runs left (--resume) times nothing: one candidate
      choice = batching.choose(
        cfg.net, cfg.fit, (ph, pw, c), max(len(runs), 1), cfg.batch_size, has_gt, cfg.batch_cache
      )
      bucket.update({k: choice[k] for k in ("batch_size", "batch_strategy", "batch_conv")}, batch_choice=choice)
    else:
      per_call = cfg.batch_size or (
        batching.auto_batch_size(cfg.net, cfg.fit, ph, pw, len(runs), with_gt=has_gt) if runs else 1
      )
      bucket.update(batch_size=per_call, batch_strategy=cfg.fit.batch_strategy, batch_conv=cfg.net.batch_conv)
    if cfg.fit.stop == "sure" and not cfg.batch_size:  # each run comes with its twins: 2 or 3 rows per run
      bucket["batch_size"] = max(1, bucket["batch_size"] // sure_fit.rows_per_run(cfg.fit))
    plan.append(bucket)
  return plan


def bucket_configs(cfg: RunConfig, bucket: dict) -> tuple:
  """The net and fit configs a bucket's calls run with: its batch strategy and lowering."""
  return (
    dataclasses.replace(cfg.net, batch_conv=bucket["batch_conv"]),
    dataclasses.replace(cfg.fit, batch_strategy=bucket["batch_strategy"]),
  )


def make_call_batch(
  cfg: RunConfig, images: list[Image], prelims: list, part: list[tuple[int, int]], shape: list[int], twins=None
) -> tuple[Batch, list]:
  """The batch of a call's runs; with twins (--stop=sure: per twin sign, sure_fit.twin of each image
  and its x_bar) each run's row is followed by its twins' rows: same seed, y + eps b (and y - eps b)."""
  if twins is not None:
    group = 1 + len(twins)
    rows = [(i, k, g) for i, k in part for g in range(group)]
    ims = [images[i] if g == 0 else twins[g - 1][0][i] for i, _, g in rows]
    pres = [prelims[i] if g == 0 else twins[g - 1][1][i] for i, _, g in rows]
    batch, keys = make_call_batch(cfg, ims, pres, [(r, k) for r, (_, k, _) in enumerate(rows)], shape)
    ph, pw, _ = shape
    probe = [
      data.pad_reflect(sure_fit.probe_for(images[i].name, images[i].noisy_HxWxC.shape), ph, pw) for i, _, _ in rows
    ]
    s = np.full((len(rows),), cfg.sigma / 255.0, np.float32)
    eps = np.full_like(s, cfg.fit.sure_eps * cfg.sigma / 255.0)
    return batch.replace(
      probe=jnp.asarray(np.stack(probe) * batch.mask), sure_eps=jnp.asarray(eps), sure_sigma=jnp.asarray(s)
    ), keys
  ph, pw, _ = shape
  pad = lambda x: data.pad_reflect(x, ph, pw)
  keys = [run_keys(cfg.fit.seed, k) for _, k in part]
  has_gt = images[part[0][0]].clean_HxWxC is not None
  extent = np.stack([data.mask_for(*images[i].noisy_HxWxC.shape[:2], ph, pw) for i, _ in part])
  # y and the loss's mask per task (tasks.py): the noisy image; the masked image and its
  # observed pixels; the low-resolution image, all of it (SR images are never padded).
  y, loss_mask = np.stack([pad(images[i].noisy_HxWxC) for i, _ in part]), None
  if cfg.fit.task == "inpaint":
    loss_mask = extent * np.stack([pad(images[i].observed_HxWx1) for i, _ in part])
  if cfg.fit.task == "sr":
    y = np.stack([images[i].lr_HxWxC for i, _ in part])
    loss_mask = np.ones((*y.shape[:3], 1), np.float32)
  batch = fit.make_batch(
    cfg.net,
    cfg.fit,
    keys,
    y,
    prelim_NxHxWxC=np.stack([pad(prelims[i]) for i, _ in part]) if prelims[part[0][0]] is not None else None,
    clean_NxHxWxC=np.stack([pad(images[i].clean_HxWxC) for i, _ in part]) if has_gt else None,
    mask_NxHxWx1=extent,
    loss_mask_NxHxWx1=loss_mask,
  )
  return batch, keys


def run(
  cfg: RunConfig,
  flags_text: str = "",
  images: list[Image] | None = None,
  prelim_images: dict[str, np.ndarray] | None = None,
  prelim_info: dict[str, dict] | None = None,
) -> dict:
  """images / prelim_images: already loaded inputs and x_bar by name (tables reuse them);
  prelim_info: what x_bar's maker reported per image (prelim.run)."""
  t_start = time.perf_counter()
  if images is None:
    images = load_and_check(cfg)  # every input error surfaces here, before compute
  else:
    validate(cfg)
    check_output_folder(cfg, images)
  n_proc, proc = jax.process_count(), jax.process_index()
  if proc == 0 and not cfg.resume:
    outputs.prepare_workdir(cfg.workdir, cfg.overwrite, paths_read(cfg))
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
  digests = input_digests(cfg, all_images)
  cfg = resolve(cfg, image_channels(all_images))
  records: dict[str, dict] = {}
  if cfg.resume and os.path.isfile(results_path):
    records = {r["name"]: r for r in read_stored(results_path)["images"]}
    logging.info("resuming %s: %d of %d images finished", cfg.workdir, len(records), len(images))

  prelims: list[np.ndarray | None] = [None] * len(images)
  prelim_infos: list[dict] = [{} for _ in images]  # per image: what x_bar's maker reports (SURE weights)
  if prelim_images is not None:
    prelims = [prelim_images[im.name] for im in images]
    prelim_infos = [(prelim_info or {}).get(im.name, {}) for im in images]
  elif cfg.prelim.name != "none" and images:  # a process may get no images under --distributed
    t = time.perf_counter()
    prelims, prelim_infos = prelim.run(cfg, images)
    logging.info("preliminary denoiser %s: %d images in %.1fs", cfg.prelim.name, len(images), time.perf_counter() - t)
  prelim_sigmas = _prelim_sigmas(cfg, images)
  twins, candidates = None, None
  if cfg.fit.stop == "sure" and images:
    twins, candidates = sure_inputs(cfg, images, prelims)
  plan = plan_buckets(cfg, images, set(records))
  if proc == 0 and not cfg.resume:
    outputs.write_json(
      os.path.join(cfg.workdir, "config.json"),
      dict(dataclasses.asdict(cfg), buckets=[dict(b, runs=len(b["runs"])) for b in plan], inputs=digests),
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
      batch, keys = make_call_batch(cfg, images, prelims, part, shape, twins)
      start = runs.index(part[0])
      label = f"[bucket {b + 1}/{len(plan)} {what}, runs {start + 1}-{start + len(part)}/{len(runs)}] "
      ckpt = checkpoint.call_path(ckpt_dir, [f"{images[i].name}:{k}" for i, k in part])
      net_b, fit_b = bucket_configs(cfg, plan[b])
      return ckpt, fit.fit(net_b, fit_b, batch, keys, label=label, ckpt_path=ckpt, ckpt_every=cfg.checkpoint_every)

    for part, (ckpt, res) in batching.fit_in_calls(runs, bucket["batch_size"], fit_call, what):
      for j, (i, k) in enumerate(part):
        row = j * sure_fit.rows_per_run(cfg.fit)  # --stop=sure: the rows after a run's are its twins'.
        rec = results.run_record(
          cfg, images[i], k, res, row, img_dir, hist_dir, len(part), candidates and candidates[i]
        )
        runs_done.setdefault(i, []).append(rec)
        if len(runs_done[i]) == cfg.fit.seeds:
          records[images[i].name] = dict(
            results.image_record(cfg, images[i], prelims[i], runs_done[i], img_dir),
            prelim_sigma=prelim_sigmas.get(images[i].name),
            **prelim_infos[i],
          )
      record_finished()
      outputs.write_json(results_path, res_all)  # incremental
      if os.path.isfile(ckpt):
        os.remove(ckpt)  # the call's results are written: its checkpoint is spent
  if res_all["complete"]:  # a run killed between writing a call's results and removing its checkpoint
    for spent in glob.glob(os.path.join(glob.escape(ckpt_dir), "call-*.npz")):
      os.remove(spent)
  if n_proc > 1:
    res_all = results.merge_processes(res_all, all_images, cfg, results_path, t_start)
  if proc == 0 and all(im.clean_HxWxC is not None for im in all_images) and res_all["images"]:
    names = [r["name"] + ("_seed0" if cfg.fit.seeds > 1 else "") for r in res_all["images"]]
    outputs.plot_psnr_curves(
      os.path.join(cfg.workdir, "psnr_curve.png"),
      f"{cfg.method}: mean PSNR vs step",
      {cfg.method: [results.read_history(os.path.join(hist_dir, n + ".csv")) for n in names]},
    )
  results.print_summary(res_all)
  return res_all


def sure_inputs(cfg: RunConfig, images: list[Image], prelims: list) -> tuple[list, list[dict]]:
  """--stop=sure: each image's twins (y + eps b; central: and y - eps b) with their x_bar, and the
  x_bar candidates that NAME_sure.png blends with the fit (per image: names, outputs, divergences
  from the same probe)."""
  t = time.perf_counter()
  eps = cfg.fit.sure_eps * cfg.sigma / 255.0
  twins = []
  for sign in (1.0, -1.0)[: sure_fit.rows_per_run(cfg.fit) - 1]:
    twin_images = [sure_fit.twin(im, sign * eps) for im in images]
    twins.append((twin_images, prelim.run(cfg, twin_images)[0] if prelims[0] is not None else [None] * len(images)))
  names, outs, divs = prelim.candidate_outputs(cfg, images)
  candidates = [
    {"names": names, "outputs": [outs[c][i] for c in names], "divs": [divs[c][i] for c in names]}
    for i in range(len(images))
  ]
  logging.info(
    "--stop=sure: twins and x_bar candidates (%s) of %d images in %.1fs",
    ",".join(names),
    len(images),
    time.perf_counter() - t,
  )
  return twins, candidates


def _prelim_sigmas(cfg: RunConfig, images: list[Image]) -> dict[str, float]:
  """The noise level x_bar was made for, per image: --sigma, or the blind estimate (logged and
  recorded); warns when it lies outside what the denoiser was trained on."""
  if cfg.prelim.name in ("none", "file") or not images:
    return {}
  sigmas = dict(zip([im.name for im in images], prelim.sigmas_for(cfg, images)))
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


def run_methods(cfgs: list[RunConfig], flags_text: str = "") -> dict:
  """Several methods on the same inputs, noise and x_bar (made once), each in its own
  sub-folder of the first config's workdir; prints and writes a comparison (summary.json)."""
  if len(cfgs) == 1:
    res = {cfgs[0].method: run(cfgs[0], flags_text)}
    print(where_outputs_are(cfgs[0].workdir, [""]))
    return res
  top = cfgs[0].workdir
  for c in cfgs:
    validate(c)
  images = load_inputs(cfgs[0])  # every input error surfaces here, before compute
  subs = [dataclasses.replace(c, workdir=os.path.join(top, c.method)) for c in cfgs]
  if cfgs[0].resume:
    for c in subs:
      check_output_folder(c, images)
  else:
    check_output_names(images)
    outputs.check_workdir(top, cfgs[0].overwrite, paths_read(cfgs[0]))
  needs_prelim = [c for c in subs if METHODS[c.method].prelim_input or METHODS[c.method].prelim_loss]
  for c in needs_prelim:
    prelim.REGISTRY[c.prelim.name].check(c, images)
  prelims, prelim_info = None, None
  if needs_prelim:
    t = time.perf_counter()
    c = needs_prelim[0]
    xbars, infos = prelim.run(c, images)
    prelims = dict(zip([im.name for im in images], xbars))
    prelim_info = dict(zip([im.name for im in images], infos))
    logging.info("preliminary denoiser %s: %d images in %.1fs", c.prelim.name, len(images), time.perf_counter() - t)
  if not cfgs[0].resume:
    outputs.prepare_workdir(top, cfgs[0].overwrite, paths_read(cfgs[0]))
  res = {}
  for c in subs:
    logging.info("=== %s", c.method)
    uses = c in needs_prelim
    res[c.method] = run(
      c if uses else dataclasses.replace(c, prelim=no_prelim(c)),
      flags_text,
      images=images,
      prelim_images=prelims if uses else None,
      prelim_info=prelim_info if uses else None,
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


@contextlib.contextmanager
def stop_on_ctrl_c(on_quit: Callable[[], None]):
  """Ctrl-C stops the fit at its next chunk end, with a checkpoint (fit.INTERRUPTED), and says so
  at once; a second Ctrl-C calls on_quit (which exits). The main thread may be inside XLA's
  compiler for a minute, where no Python signal handler runs: so SIGINT is blocked in this thread
  (and the threads it starts) and a watcher thread takes it with sigtimedwait."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def pressed():
    if fit.INTERRUPTED.is_set():
      on_quit()
    fit.INTERRUPTED.set()
    print(
      "Ctrl-C: stopping at the end of the current chunk of steps (after compiling, if it is compiling), with a "
      "checkpoint; press Ctrl-C again to quit at once",
      file=sys.stderr,
      flush=True,
    )

  stop = threading.Event()

  def watch():
    while not stop.is_set():
      if signal.sigtimedwait({signal.SIGINT}, 0.2) is not None:
        pressed()

  # A thread that does not block SIGINT (started before this) may still take it: then Python's
  # handler runs in the main thread, between bytecodes, as before.
  previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed())
  watcher = None
  if hasattr(signal, "sigtimedwait"):  # not on macOS: there only the handler above
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    watcher = threading.Thread(target=watch, name="ctrl-c", daemon=True)
    watcher.start()
  try:
    yield
  finally:
    if watcher is not None:
      stop.set()
      watcher.join()
      signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    signal.signal(signal.SIGINT, previous)
    fit.INTERRUPTED.clear()


def interrupted_line(workdir: str) -> str:
  """What a stopped run left and how to continue it."""
  if not glob.glob(os.path.join(glob.escape(workdir), "**", "config.json"), recursive=True):
    return f"interrupted before fitting began: nothing to resume in {workdir}"
  finished = sorted(glob.glob(os.path.join(glob.escape(workdir), "**", "results.json"), recursive=True))
  left = f"finished images are in {', '.join(finished)}" if finished else "no image had finished"
  if glob.glob(os.path.join(glob.escape(workdir), "**", "checkpoints", "*.npz"), recursive=True):
    left += "; the fit in progress is checkpointed"
  return f"interrupted: {left}; run the same command with --workdir={workdir} --resume to continue"


def run_cli(job: JobConfig, flags_text: str = "") -> int:
  """The entry point behind run.py: an exit code, one error line for bad input (before any
  compute) or for an output that cannot be written, progress through absl.logging, one line on
  Ctrl-C saying how to resume."""
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  # JAX logs "Unable to initialize backend 'tpu'" at INFO on every machine without one (and it
  # preceded every --resume refusal, which resolves the backend's settings).
  std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)
  workdir = job.run.workdir

  def quit_now():
    print(interrupted_line(workdir), file=sys.stderr, flush=True)
    os._exit(130)  # from the watcher thread: the main thread may be inside XLA

  try:
    config.check(job)
    if not job.methods or len(set(job.methods)) != len(job.methods):
      raise InputError(f"--method needs distinct methods (got {','.join(job.methods)})")
    workdir = workdir or f"runs/{'-'.join(job.methods)}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    cfgs = [dataclasses.replace(job.run, method=m, workdir=workdir) for m in job.methods]
    # Reruns skip XLA's compile (a 64 px, 5-step run: 66 s -> 14 s measured in issue 13).
    cache = job.compile_cache or os.environ.get(
      "IDIP_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "idip-jax", "jax")
    )
    if cache != "none":
      jax.config.update("jax_compilation_cache_dir", cache)
    if job.distributed:
      init_distributed(job.coordinator, job.num_processes, job.process_id)
    with stop_on_ctrl_c(quit_now):
      run_methods(cfgs, flags_text=flags_text)
  except (InputError, OutputError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2 if isinstance(e, InputError) else 1
  except KeyboardInterrupt:
    print(interrupted_line(workdir), file=sys.stderr)
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
