"""A job's workdir before any compute: what --overwrite may not delete (paths the run reads), the
names of its outputs, --resume's rule for "same settings and same inputs" as a stored run, and
the experiments' rule for reusing a finished job folder (job_settings, finished_job)."""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os

import numpy as np

from idip_jax import config, data, locks, outputs, tasks
from idip_jax.config import RunConfig
from idip_jax.data import Image, InputError
from idip_jax.stored import read_stored, settings_difference


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
  if cfg.init:
    reads.append(cfg.init)
  return tuple(reads)


def input_digests(cfg: RunConfig, images: list[Image]) -> dict[str, str]:
  """A checksum per image of what it fits (y, ground truth, mask), of its x_bar file and of the --init file: a
  --resume refuses a stored run whose inputs changed since (config.json records them)."""
  out = {}
  init = b""
  if cfg.init and os.path.isfile(cfg.init):
    with open(cfg.init, "rb") as f:
      init = hashlib.sha1(f.read()).digest()
  for im in images:
    h = hashlib.sha1(init)
    for a in (im.noisy_HxWxC, im.clean_HxWxC, im.observed_HxWx1, im.lr_HxWxC):
      if a is not None:
        h.update(np.ascontiguousarray(a, np.float32).tobytes())
    if cfg.prelim.name == "file":
      with open(data.xbar_file(cfg.prelim.prelim_dir, im.name), "rb") as f:
        h.update(f.read())
    out[im.name] = h.hexdigest()[:16]
  return out


# Settings that may differ between a run and its --resume: where and how outputs are written.
RESUME_FREE = (
  "workdir",
  "overwrite",
  "resume",
  "batch_size",
  "fit.batch_strategy",  # how runs are grouped into calls: the same results to rounding (batch-equality tests)
  "net.batch_conv",
  "batch_cache",
  "checkpoint_every",
  "save_images",
  "save_float",
  "buckets",
  "layout",  # the processes it runs as (--cpu_processes)
  "inputs",  # compared by content (input_digests), below
)
# Output file names per image are NAME[_seedK]_KIND.png, written as .NAME..._KIND.png.XXXXXXXX.tmp first.
OUTPUT_NAME_EXTRA = 40


def check_output_names(images: list[Image]) -> None:
  for im in images:
    if len(im.name.encode()) + OUTPUT_NAME_EXTRA > 255:
      raise InputError(f"{im.name}: the image's name is too long for the names of its output files")


def check_output_folder(cfg: RunConfig, resolved: RunConfig, images: list[Image]) -> None:
  """A new run needs an empty (or --overwrite-able) workdir; --resume needs the stored run's
  folder, the same settings as run (`resolved`; one line naming the first that differs) and the
  same inputs."""
  check_output_names(images)
  if not cfg.resume:
    outputs.check_workdir(cfg.workdir, cfg.overwrite, paths_read(cfg))
    return
  path = os.path.join(cfg.workdir, "config.json")
  if not os.path.isfile(path):
    raise InputError(f"--resume: no run to continue in --workdir={cfg.workdir} (no config.json)")
  locks.lock(cfg.workdir, os.path.join(cfg.workdir, outputs.MARKER))  # one run at a time continues it
  have = read_stored(path)
  if os.path.isfile(os.path.join(cfg.workdir, "results.json")):
    read_stored(os.path.join(cfg.workdir, "results.json"))
  want = json.loads(json.dumps(dataclasses.asdict(resolved)))
  diff = settings_difference(want, have, skip_top=RESUME_FREE)
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
      what = "is new" if name not in stored else "is gone" if name not in now else "has changed (or x_bar/mask/init)"
      raise InputError(
        f"--resume: input {name} {what} since the stored run in {cfg.workdir}; its results would not be of "
        "these inputs: run again into a new --workdir"
      )


# How a job runs, not what it computes: a job stored by a GPU run is reused on a CPU.
HOW = ("weights_dir", "loop", "conv", "shard", "remat", "batch_strategy", "batch_conv", "hybrid_side")


def job_settings(resolved: RunConfig) -> dict:
  """What a job computes: every flag-set field of the resolved config except where and how outputs
  are written (RESUME_FREE) and how it runs (HOW); net.in_channels only where z is the input (else
  the image's); the input set by its folder's name (the same set copied to another machine)."""
  out = {}
  for path, f, _ in config.leaves(RunConfig):
    key = ".".join(path)
    if config.flag_name(f) is None or path[-1] in RESUME_FREE + HOW:
      continue
    if key == "net.in_channels" and config.METHODS[resolved.method].prelim_input:
      continue
    v = resolved
    for p in path:
      v = getattr(v, p)
    out[key] = v
  out["input"] = os.path.basename(os.path.normpath(out["input"]))
  return json.loads(json.dumps(out))


def finished_job(
  resolved: RunConfig, allow_other_code: bool = False, how: dict | None = None
) -> tuple[dict | None, str | None]:
  """(results.json of resolved.workdir, why) when that folder holds a finished run of the same job
  (settings_difference, lenient) made by this code (or any code with allow_other_code), run the way `how` asks
  (jobs.ran_as); else (None, why not), and (None, None) when the folder holds no run at all (nothing to say)."""
  res_path, cfg_path = (os.path.join(resolved.workdir, f) for f in ("results.json", "config.json"))
  if not (os.path.isfile(res_path) and os.path.isfile(cfg_path)):
    return None, None
  res, stored = read_stored(res_path), read_stored(cfg_path)
  diff = settings_difference(job_settings(resolved), stored, lenient=True)
  if diff:
    return None, f"{resolved.workdir} is another job: {diff}"
  # how: the ways of running a study compares (dotted HOW / RESUME_FREE settings), which job_settings leaves out
  if how and (diff := settings_difference(how, stored, lenient=True)):
    return None, f"{resolved.workdir} ran another way: {diff}"
  if res.get("code_hash") != outputs.code_hash():
    if not allow_other_code:
      return None, f"{resolved.workdir} was made by other code ({res.get('commit', '?')})"
    return res, f"reusing {resolved.workdir} from other code ({res.get('commit', '?')}, --allow_other_code)"
  return res, f"reusing finished job {resolved.workdir}"


def process_results(workdir: str) -> list[str]:
  """The per-process results files of a run made as several processes (--cpu_processes, --distributed)."""
  return sorted(glob.glob(os.path.join(glob.escape(workdir), "results.process*.json")))


def missing_outputs(workdir: str, names: list[str]) -> dict[str, str]:
  """Per finished image: the first of its files (images/, history/) that the workdir's marker lists as
  written but that is gone since (deleted by the user), so that --resume fits that image again rather than
  report it complete. A file belongs to the longest image name it starts with (NAME_..., NAME.csv)."""
  if not os.path.isfile(os.path.join(workdir, outputs.MARKER)):
    return {}
  by_length = sorted(names, key=len, reverse=True)
  missing: dict[str, str] = {}
  for rel in sorted(outputs.listed(workdir)):
    folder, base = os.path.split(rel)
    if folder not in ("images", "history") or os.path.exists(os.path.join(workdir, rel)):
      continue
    owner = next((n for n in by_length if base.startswith((n + "_", n + "."))), None)
    if owner is not None:
      missing.setdefault(owner, os.path.join(workdir, rel))
  return missing
