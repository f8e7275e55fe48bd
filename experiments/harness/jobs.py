"""Experiments' jobs and the one job runner. A Job is a test set, sigma, method, x_bar source and
variant; Runner fits it once per process through runner.run (the same engine as run.py), or reuses
its folder when that holds the same job (resume.finished_job: the rule --resume uses); a prelim-only
job is its x_bar's PSNR (xbar_psnrs: a study of such jobs). at_step, blend_psnrs and mean_curve_peak read a
job's results. Every table and study is a list of jobs (catalogue.py); nothing here reads flags.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import numpy as np

from idip_jax import config, data, metrics, prelim, results, resume, runner


@dataclasses.dataclass(frozen=True)
class Job:
  dataset: str  # a set (a folder of the data dir), or set/name images joined by commas (a study's picks)
  sigma: float
  method: str  # dip | idip1 | idip2 | idip, or "prelim": the x_bar alone, no fit
  prelim: str = "none"
  seeds: int = 1
  channels: int = 1
  fit: tuple[tuple[str, float | str], ...] = ()  # FitConfig overrides of this row (a variant)
  net: tuple[tuple[str, float | str], ...] = ()  # NetConfig overrides (the inpainting net, a --batch_conv)
  run: tuple[tuple[str, float | str], ...] = ()  # RunConfig overrides (a study's noise protocol, batch size)
  report: str = "final"  # which of the job's numbers the row reports (REPORT); not part of the job


# Row reports -> result keys: the output on the unperturbed input (final; at the criterion's step
# under --stop), its EMA, the K runs' mean image (ensemble), the last state under --stop (the
# fixed-step result), and the per-image best step (oracle: uses the ground truth).
REPORT = {
  "final": "psnr_final",
  "ema": "psnr_ema",
  "ensemble": "psnr_avg_final",
  "ensemble_ema": "psnr_avg_ema",
  "last": "psnr_last",
  "last_ema": "psnr_last_ema",
  "ensemble_last": "psnr_avg_last",
  "ensemble_last_ema": "psnr_avg_last_ema",
  "oracle": "oracle_best_psnr",
  "input": "psnr_noisy",  # the input image as fitted: SR's bicubic upsampling (tasks.sr_images)
}
EMA_OF = {"final": "ema", "ensemble": "ensemble_ema", "last": "last_ema", "ensemble_last": "ensemble_last_ema"}
# A report "blend:A:BASE" is A * (the BASE image) + (1 - A) * x_bar, read from the job's float images
# (--save_float): a fixed mix of IDIP's output and its input, no ground truth per image.
BLEND_IMAGES = {"ensemble_last": "last", "ensemble_last_ema": "last_ema"}  # the K-run mean images


def blend_psnrs(res: dict, report: str) -> dict[str, float]:
  _, a, base = report.split(":")
  cfg, a = res["cfg"], float(a)
  out = {}
  for r in res["images"]:
    paths = [os.path.join(cfg.workdir, "images", f"{r['name']}_{t}.npy") for t in (BLEND_IMAGES[base], "prelim")]
    if not all(os.path.isfile(p) for p in paths):
      raise ValueError(f"report {report} needs the job's float images (--save_float): {paths[0]} is missing")
    img, xbar = (np.load(p) for p in paths)
    gt = data.read_image(data.find_image(cfg.input, r["name"]), cfg.image_channels)
    gt = data.center_crop(gt, cfg.crop) if cfg.crop else gt
    out[r["name"]] = results.psnr(a * img + (1 - a) * xbar, gt)
  return out


def fitted(job: Job) -> Job:
  """The job a row reads: rows differing only in what they report share one fit."""
  return dataclasses.replace(job, report="final")


def job_dir(job: Job, workdir: str, noise: str) -> str:
  """The job's folder: its set, sigma, noise protocol (the job's own, else the settings'), method, x_bar,
  runs per image and overrides."""
  run = dict(job.run)
  name = f"{job.dataset.replace('/', '-').replace(',', '+')}_s{job.sigma:g}_{run.pop('noise', noise)}"
  name += f"_{job.method}_{job.prelim}_x{job.seeds}" + "".join(
    f"_{k}{v:g}" if isinstance(v, float | int) else f"_{k}{v}" for k, v in job.fit + job.net + tuple(run.items())
  )
  return os.path.join(workdir, name)


def ran_as(job: Job) -> dict:
  """How the job asks to be run, by dotted name: its overrides of settings that the same-settings rule
  ignores (resume.HOW, resume.RESUME_FREE), which a study comparing ways of running one job names
  (batch_equality: one run per call, vmap with each lowering, lax.map)."""
  free = resume.HOW + resume.RESUME_FREE
  return {p + k: v for p, kv in (("fit.", job.fit), ("net.", job.net), ("", job.run)) for k, v in kv if k in free}


def image_specs(job: Job) -> list[str] | None:
  """A study's set/name images, or None for a whole set."""
  return job.dataset.split(",") if "/" in job.dataset else None


def with_histories(res: dict, cfg: runner.RunConfig) -> dict:
  """Adds each image's per-step history (the first seed's) read from the job folder, and the
  job's config (where its images and inputs are: blend reports read them)."""
  res["cfg"] = cfg
  suffix = "_seed0" if cfg.fit.seeds > 1 else ""
  res["histories"] = {
    r["name"]: results.read_history(os.path.join(cfg.workdir, "history", r["name"] + suffix + ".csv"))
    for r in res["images"]
  }
  return res


@dataclasses.dataclass(frozen=True)
class Settings:
  """What every job of a table or study shares (the experiment script's flags, read once there)."""

  base: runner.RunConfig  # run.py's settings: crop, noise, steps, chunk, save_float...
  workdir: str  # the job folders go under it (job_dir)
  data_dir: str = ""  # the test sets ("" = $IDIP_SHARED/data or ../shared/data)
  smoke: bool = False  # 32 px crops, config.TINY_NET, 4 steps, 3 images: the plumbing only
  max_images: int = 0  # the first N images of each set (0 = all)
  allow_other_code: bool = False  # reuse job folders made by other code (stored GPU runs)
  resume_unfinished: bool = False  # a job folder of the same settings without results continues (--resume's rule)


class Runner:
  """The one job runner: fits a job once per process (runner.run), or reuses its folder when that
  holds the same job (resume.finished_job); `steps` overrides a method's step count."""

  def __init__(self, settings: Settings, steps: dict[str, int] | None = None):
    self.settings, self.steps, self.done, self.prelims = settings, steps or {}, {}, {}

  def finished(self, cfg: runner.RunConfig, specs: list[str] | None = None, how: dict | None = None) -> dict | None:
    """A job folder whose run completed with exactly this job (resume.finished_job) on all its images (the
    set's, or `specs`), and in the way `how` asks (ran_as), is reused, not rerun."""
    s = self.settings
    res, why = resume.finished_job(runner.resolve(cfg, cfg.image_channels), s.allow_other_code, how)
    if res is None:
      if why:
        print(f"rerunning: {why}", flush=True)
      return None
    n = s.max_images or (3 if s.smoke else None)
    if n is None and len(res["images"]) < len(specs or data.list_inputs(cfg.input)):
      return None
    print(why, flush=True)
    if n is not None and len(res["images"]) > n:  # same images as the table's other rows
      res["images"] = res["images"][:n]
      res["mean"] = results.summarize(res["images"])
    return with_histories(res, cfg)

  def config(self, job: Job, workdir: str) -> runner.RunConfig:
    """The job's RunConfig: the flags' settings (shared with run.py), the job's set, sigma,
    method, x_bar and variant; --smoke shrinks everything to config.TINY_NET scale."""
    base, s = self.settings.base, self.settings
    ddir = s.data_dir or os.path.join(data.shared_dir(), "data")
    fit_cfg = dataclasses.replace(
      base.fit, **{"steps": self.steps.get(job.method, base.fit.steps), "seeds": job.seeds, **dict(job.fit)}
    )
    cfg = dataclasses.replace(
      base,
      **dict(job.run),
      net=dataclasses.replace(base.net, **dict(job.net)),
      input=job.dataset if image_specs(job) else os.path.join(ddir, job.dataset),
      workdir=workdir,
      sigma=job.sigma,
      method=job.method,
      image_channels=job.channels,
      prelim=dataclasses.replace(base.prelim, name=job.prelim),
      fit=fit_cfg,
    )
    if s.smoke:
      cfg = dataclasses.replace(
        cfg,
        crop=32,
        save_images=base.save_float,  # float images only where asked (blend reports read them)
        net=config.TINY_NET,
        fit=dataclasses.replace(fit_cfg, steps=4, chunk=4, eval_every=2, stop_window=2),
      )
    return cfg

  def images(self, job: Job, cfg: runner.RunConfig) -> list[data.Image]:
    """The job's images: its set (the first --max_images; 3 with --smoke), or a study's set/name picks."""
    specs = image_specs(job)
    if specs is None:
      images = runner.load_inputs(cfg)
    else:
      ddir = self.settings.data_dir or os.path.join(data.shared_dir(), "data")
      images = []
      for spec in specs:
        folder, name = spec.split("/")
        path = data.find_image(os.path.join(ddir, folder), name)
        if path is None:
          raise data.InputError(f"no image {spec} in {ddir}")
        images += data.load_images(
          path, cfg.sigma, cfg.noise_seed, cfg.image_channels, cfg.crop, cfg.noise, min_size=2**cfg.net.scales
        )
    if self.settings.max_images or self.settings.smoke:
      images = images[: self.settings.max_images or 3]
    return images

  def run(self, job: Job) -> dict:
    job = fitted(job)
    if job in self.done:
      return self.done[job]
    cfg = self.config(
      dataclasses.replace(job, method="idip" if job.method == "prelim" else job.method),
      job_dir(job, self.settings.workdir, self.settings.base.noise),
    )
    if job.method != "prelim" and (done := self.finished(cfg, image_specs(job), ran_as(job))) is not None:
      self.done[job] = done
      return done
    if self.settings.resume_unfinished and job.method != "prelim" and os.path.isfile(f"{cfg.workdir}/config.json"):
      # An interrupted job goes on from its last checkpoint (a full-size CPU fit takes ~30 min).
      print(f"resuming {cfg.workdir}", flush=True)
      cfg = dataclasses.replace(cfg, resume=True, overwrite=False)
    images = self.images(job, cfg)
    key = (job.dataset, job.sigma, job.prelim, job.channels, job.run)
    if job.prelim != "none" and key not in self.prelims:
      self.prelims[key] = dict(zip([im.name for im in images], prelim.make(prelim.spec_of(cfg), images)))
    if job.method == "prelim":
      recs = [
        {"name": im.name, "psnr_prelim": float(metrics.psnr(self.prelims[key][im.name], im.clean_HxWxC))}
        for im in images
      ]
      self.done[job] = {"images": recs, "mean": {"psnr_prelim": float(np.mean([r["psnr_prelim"] for r in recs]))}}
      return self.done[job]
    res = with_histories(runner.run(cfg, images=images, prelim_images=self.prelims.get(key)), cfg)
    self.done[job] = res
    return res


def print_jobs(rows: list[tuple[str, Job]]) -> None:
  """A study's --dry_run: each row's label and job."""
  for label, job in rows:
    print(label, job)


def xbar_psnrs(rows: list[tuple[str, Job]], data_dir: str, smoke: bool) -> Iterator[tuple[Job, dict[str, float]]]:
  """The x_bar-only jobs of a study through the one runner, one at a time (the caller prints as they come):
  each job and its x_bar's PSNR per image."""
  runner_ = Runner(Settings(config.RunConfig(), "-", data_dir=data_dir, smoke=smoke))
  for _, job in rows:
    yield job, {r["name"]: r["psnr_prelim"] for r in runner_.run(job)["images"]}


def at_step(res: dict, n: int) -> dict:
  """The job's results as a run stopped after n steps would report them: the clean-input
  output and the EMA at step n, read from each image's history (n must be an eval step)."""
  if n >= res["steps"]:
    return res
  images = []
  for r in res["images"]:
    h = res["histories"][r["name"]]
    if np.isnan(h["psnr"][n - 1]):
      raise ValueError(f"step {n} was not evaluated in the stored history (eval_every)")
    images.append(
      dict(
        r,
        psnr_final=float(h["psnr"][n - 1]),
        psnr_ema=float(h["psnr_ema"][n - 1]),
        ssim_final=float(h["ssim"][n - 1]),
        ssim_ema=float(h["ssim_ema"][n - 1]),
      )
    )
  return dict(res, images=images, mean=results.summarize(images), steps=n, run_steps=res["steps"])


def mean_curve_peak(res: dict, steps: int) -> dict:
  """Peak of the images' mean PSNR curve (clean-input output, and EMA) over steps 1..steps: on
  HOLDOUT this picks each method's default step count; on a table's own images it is an oracle."""
  out = {}
  for key, name in (("psnr", "curve_peak"), ("psnr_ema", "curve_peak_ema")):
    curve = np.mean([h[key][:steps] for h in res["histories"].values()], axis=0)
    if np.all(np.isnan(curve)):
      continue
    i = int(np.nanargmax(curve))
    out[name] = {"step": i + 1, "psnr": float(curve[i])}
  return out
