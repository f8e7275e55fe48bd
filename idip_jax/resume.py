"""A job's workdir before any compute: what --overwrite may not delete (paths the run reads), the
names of its outputs, and --resume's one rule for "same settings and same inputs" as a stored run."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from idip_jax import data, outputs, prelim, tasks
from idip_jax.config import RunConfig
from idip_jax.data import Image, InputError


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
  have = read_stored(path)
  if os.path.isfile(os.path.join(cfg.workdir, "results.json")):
    read_stored(os.path.join(cfg.workdir, "results.json"))
  want = json.loads(json.dumps(dataclasses.asdict(resolved)))

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
