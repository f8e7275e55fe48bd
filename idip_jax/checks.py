"""Every rule on a job's settings alone, checked before any file is read: per-field ranges
(config.check), the rules between settings (validate), and flags that another flag makes
meaningless (unused_flags: refused rather than silently ignored)."""

from __future__ import annotations

import dataclasses
import functools
import os
import types
from collections.abc import Callable

from absl import logging

from idip_jax import batch_choice, config, tasks
from idip_jax.config import DEFAULT_STEPS, METHODS, JobConfig, RunConfig
from idip_jax.data import InputError


def validate(cfg: RunConfig) -> None:
  """Every rule on the settings alone (before reading any file): one InputError line."""
  config.check(cfg)

  def need(ok, msg):
    if not ok:
      raise InputError(msg)

  need(bool(cfg.input), "--input is required (a file, folder, glob or skimage:NAME)")
  need(bool(cfg.workdir), "--workdir is empty")
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
  need(bool(cfg.fit.train), "--train is empty: name what the fit trains (weights, norms, seed)")
  need(
    not (m.complex_connection and cfg.net.skip_channels == 0),
    "the complex connection lives on the skips: --skip_channels must be > 0",
  )
  cache = batch_choice.cache_file(cfg.batch_cache) if cfg.fit.batch_strategy == "auto" else ""
  need(not os.path.isdir(cache), f"--batch_cache={cache} is a folder: name a JSON file in it (or none)")
  if cache and not _writable(cache):
    logging.warning("--batch_cache %s cannot be written: the batch choice is timed but not cached", cache)


def _writable(path: str) -> bool:
  if os.path.exists(path):
    return os.access(path, os.W_OK)
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):  # made on the first write
    parent = os.path.dirname(parent)
  return os.path.isdir(parent) and os.access(parent, os.W_OK | os.X_OK)


# Flags that only another setting makes meaningful: (field path, does this method's config use it, what it
# needs). A flag set away from its default where no method of the job uses it is refused in one line when it
# names something the user gave (a mask, an x_bar folder, weights, a cache) or a task's setting: ignoring it
# would silently leave their data or request unused. The net's and the input's shape and the tuning knobs of
# an optional mechanism (SOFT: one flagfile commonly serves several methods or stopping rules, e.g. --stop=sure
# beside --stop=wmv) are a warning instead.
_M = lambda c: METHODS[c.method]
_STOP_SURE = lambda c: c.fit.stop == "sure"
_CNN_XBAR = lambda c: c.prelim.name in ("ffdnet", "dncnn", "sure_blend") or _STOP_SURE(c)
_BLEND = lambda c: c.prelim.name == "sure_blend" or _STOP_SURE(c)
NEEDS: tuple[tuple[str, Callable[[RunConfig], bool], str], ...] = (
  ("mask", lambda c: c.fit.task == "inpaint", "--task=inpaint"),
  ("sr_crop", lambda c: c.fit.task == "sr", "--task=sr"),
  ("fit.sr_factor", lambda c: c.fit.task == "sr", "--task=sr"),
  ("prelim.prelim_dir", lambda c: c.prelim.name == "file", "--prelim=file"),
  ("prelim.weights", _CNN_XBAR, "--prelim=ffdnet, dncnn or sure_blend (or --stop=sure)"),
  ("prelim.weights_dir", _CNN_XBAR, "--prelim=ffdnet, dncnn or sure_blend (or --stop=sure)"),
  ("prelim.sure_candidates", _BLEND, "--prelim=sure_blend or --stop=sure"),
  ("prelim.sure_probes", _BLEND, "--prelim=sure_blend or --stop=sure"),
  ("fit.sure_diff", _STOP_SURE, "--stop=sure"),
  ("fit.sure_eps", _STOP_SURE, "--stop=sure"),
  ("fit.sure_twins", _STOP_SURE, "--stop=sure"),
  ("fit.stop_window", lambda c: c.fit.stop in ("wmv", "emv"), "--stop=wmv or emv"),
  ("fit.stop_patience", lambda c: c.fit.stop in ("wmv", "emv"), "--stop=wmv or emv"),
  ("fit.stop_alpha", lambda c: c.fit.stop == "emv", "--stop=emv"),
  ("fit.backtrack", lambda c: c.fit.backtrack_db > 0, "--backtrack_db > 0"),
  ("noise", lambda c: c.sigma > 0, "--sigma > 0 (noise is added to clean inputs)"),
  ("batch_cache", lambda c: c.fit.batch_strategy == "auto", "--batch_strategy=auto"),
  ("net.hybrid_side", lambda c: c.net.batch_conv in ("hybrid", "auto"), "--batch_conv=hybrid (or auto)"),
  ("fit.reg_noise_std", lambda c: not _M(c).prelim_input, "a method whose input is z (dip, idip1)"),
  ("net.in_channels", lambda c: not _M(c).prelim_input, "a method whose input is z (dip, idip1)"),
  ("fit.xbar_noise_std", lambda c: _M(c).prelim_input, "a method whose input is x_bar (idip2, idip)"),
  ("fit.input_dist", lambda c: not _M(c).prelim_input, "a method whose input is z (dip, idip1)"),
  ("fit.prelim_weight", lambda c: _M(c).prelim_loss, "a method with x_bar in its loss (idip)"),
  ("net.cc_features", lambda c: _M(c).complex_connection, "a method with the complex connection (idip1, idip2, idip)"),
)
SOFT = (
  *("fit.reg_noise_std", "net.in_channels", "fit.xbar_noise_std", "fit.prelim_weight", "net.cc_features"),
  *("prelim.sure_candidates", "prelim.sure_probes", "fit.sure_diff", "fit.sure_eps", "fit.sure_twins"),
  *("fit.stop_window", "fit.stop_patience", "fit.stop_alpha", "fit.backtrack", "net.hybrid_side", "noise"),
  "fit.input_dist",
)
_JOB_NEEDS = (("coordinator", "num_processes", "process_id"), "--distributed")


# Every run setting by its dotted path (config.leaves), and the job's own.
RUN_FIELDS = types.MappingProxyType({".".join(path): f for path, f, _ in config.leaves(RunConfig)})
JOB_FIELDS = types.MappingProxyType({f.name: f for f in dataclasses.fields(JobConfig)})


def unused_flags(job: JobConfig) -> None:
  """One line for the first flag set away from its default that no method of the job uses (e.g. --mask
  without --task=inpaint, --prelim_dir with --prelim=bm3d): such a flag would be silently ignored."""
  cfgs = [dataclasses.replace(job.run, method=m) for m in job.methods]
  for path, used, needs in NEEDS:
    f, name = RUN_FIELDS[path], config.flag_name(RUN_FIELDS[path])
    value = functools.reduce(getattr, path.split("."), job.run)
    if value != f.default and not any(used(c) for c in cfgs):
      if path not in SOFT:
        raise InputError(f"--{name}={value} has no effect here: it needs {needs}")
      logging.warning("--%s=%s has no effect here: it needs %s", name, value, needs)
  names, needs = _JOB_NEEDS
  for name in names:
    if getattr(job, name) != JOB_FIELDS[name].default and not job.distributed:
      raise InputError(f"--{name} has no effect here: it needs {needs}")
