"""Stored run files (config.json, results.json, a training run's summary.json): reading them, and the one
rule for "same settings as a stored run" that --resume (fits, denoiser and meta-init training) and the
experiments' reuse of finished jobs share."""

from __future__ import annotations

import json
import os
import types

from absl import logging

from idip_jax import locks, outputs
from idip_jax.data import InputError


def read_stored(path: str) -> dict:
  """A stored run's JSON file (config.json, results.json); one line if it is damaged."""
  try:
    with open(path) as f:
      stored = json.load(f)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    why = f"{type(e).__name__}: {e}"
  else:
    if isinstance(stored, dict):
      return stored
    why = f"it holds a JSON {type(stored).__name__}, not an object"
  raise InputError(f"stored run file {path} is damaged ({why}); restore it, or run again into a new --workdir")


# Renamed when the flags were generated from config.py; stored jobs (e.g. the GPU runs in
# experiments/results/gpu_h100/jobs) keep the old names.
LEGACY_KEYS = types.MappingProxyType({"channels": "image_channels", "net.channels": "net.width"})


def _dotted(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    out.update(_dotted(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {prefix + k: v})
  return out


def settings_difference(want: dict, have: dict, skip_top: tuple[str, ...] = (), lenient: bool = False) -> str | None:
  """The one rule for "same settings as a stored run": the first setting, in sorted dotted names,
  in which a stored config.json (`have`) differs from `want` (nested, or with dotted names), as "name (stored
  X, now Y)", or None. --resume compares every setting but those named in skip_top (RESUME_FREE: a top-level
  name, or a dotted one).
  lenient (experiments reusing a finished job, `want` = job_settings): only `want`'s settings, and one
  the stored run does not record (older code; LEGACY_KEYS renamed) or recorded as "auto" (older code
  recorded it unresolved) matches; the input set is compared by its folder's name."""
  a, b = _dotted(want), _dotted(have)
  if lenient:
    b = {LEGACY_KEYS.get(k, k): v for k, v in b.items()}
    if "input" in b:
      b["input"] = os.path.basename(os.path.normpath(b["input"]))
  for k in sorted(a if lenient else set(a) | set(b)):
    if k in skip_top or k.split(".")[0] in skip_top or (lenient and (k not in b or b[k] == "auto")):
      continue
    if a.get(k) != b.get(k):
      return f"{k} (stored {b.get(k)!r}, now {a.get(k)!r})"
  return None


def check_training_resume(
  workdir: str, settings: dict, free: tuple[str, ...], steps: int, done_key: str
) -> dict | None:
  """--resume of a training run (a denoiser, a meta-initialisation), run.py's rule: the stored run's folder (locked
  for this process) and the same settings but those in `free`; a finished run's stored summary.json (all `steps`
  done and its `done_key` recorded: nothing is trained or rewritten), else None."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise InputError(f"--resume: no training run in --workdir={workdir}")
  locks.lock(workdir, os.path.join(workdir, outputs.MARKER))
  diff = settings_difference(json.loads(json.dumps(settings)), read_stored(path), skip_top=free)  # tuples as stored
  if diff:
    raise InputError(f"--resume: the settings differ from the stored run in {workdir}: {diff}")
  summary = os.path.join(workdir, "summary.json")
  if os.path.isfile(summary):
    done = read_stored(summary)
    if done.get("steps") == steps and done.get(done_key) is not None:
      logging.info("%s finished its %d steps: nothing to resume", workdir, steps)
      return done
  return None
