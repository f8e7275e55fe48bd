"""Workdir handling and result files: PNGs, history.csv, config.json, results.json."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import subprocess
import tempfile

import numpy as np

from idip_jax.data import InputError

MARKER = ".idip-jax-workdir"  # written into every workdir this tool creates


def check_workdir(path: str, overwrite: bool) -> None:
  if os.path.exists(path) and not os.path.isdir(path):
    raise InputError(f"--workdir={path} exists and is not a folder")
  existing = os.path.abspath(path)
  while not os.path.exists(existing):  # the folder it would be made in
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise InputError(f"--workdir={path}: {existing} is a file, not a folder")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise InputError(f"--workdir={path}: {existing} is not writable")
  if os.path.isdir(path) and os.listdir(path):
    if not overwrite:
      raise InputError(f"--workdir={path} exists and is not empty; pass --overwrite to replace it")
    if not os.path.isfile(os.path.join(path, MARKER)):
      raise InputError(
        f"--workdir={path} was not made by idip-jax (no {MARKER} in it); --overwrite "
        "only replaces folders this tool made: choose another --workdir"
      )


def prepare_workdir(path: str, overwrite: bool) -> None:
  """Refuses a non-empty workdir unless --overwrite and made by this tool; never deletes anything else."""
  check_workdir(path, overwrite)
  if os.path.isdir(path) and os.listdir(path):
    shutil.rmtree(path)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, MARKER), "w") as f:
    f.write("made by idip-jax; --overwrite may replace this folder\n")


def _finite(obj):
  """NaN/inf -> None: strict JSON (json.dump would write NaN/Infinity, which parsers reject)."""
  if isinstance(obj, dict):
    return {k: _finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite(v) for v in obj]
  if isinstance(obj, (float, np.floating)):
    return float(obj) if np.isfinite(obj) else None
  return obj


def write_json(path: str, obj) -> None:
  """Atomic write: a crash mid-run leaves the previous complete file."""
  d = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(_finite(obj), f, indent=1, default=float, allow_nan=False)
  os.chmod(tmp, 0o644)  # mkstemp makes it private
  os.replace(tmp, path)


def save_image(path_png: str, x_HxWxC: np.ndarray, save_float: bool) -> None:
  """8-bit PNG (clipped, rounded), and with save_float the exact float32 array as .npy beside it."""
  save_png(path_png, x_HxWxC)
  if save_float:
    np.save(os.path.splitext(path_png)[0] + ".npy", np.asarray(x_HxWxC, np.float32))


def plot_psnr_curves(path: str, title: str, series: dict[str, list[dict[str, np.ndarray]]]) -> bool:
  """Mean PSNR of the clean-input output (solid) and of the EMA (dashed) vs step, one pair of
  lines per label (its images' histories); evaluated steps only. False without matplotlib."""
  lines = {}
  for label, histories in series.items():
    for key, style in (("psnr", "-"), ("psnr_ema", "--")):
      curve = np.mean([h[key] for h in histories], axis=0)
      steps = np.flatnonzero(~np.isnan(curve))
      lines[f"{label} {'EMA' if key == 'psnr_ema' else 'output'}"] = (steps + 1, curve[steps], style)
  return plot_xy(path, title, lines, "step", "mean PSNR to ground truth (dB)", ylim_bottom=15)


def plot_xy(
  path: str, title: str, lines: dict[str, tuple], xlabel: str, ylabel: str, ylim_bottom: float | None = None
) -> bool:
  """One line per label: (xs, ys, matplotlib style). False without matplotlib or lines."""
  if not lines:
    return False
  try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, (xs, ys, style) in lines.items():
    ax.plot(xs, ys, style, label=label)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  if ylim_bottom is not None:
    ax.set_ylim(bottom=ylim_bottom)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return True


def save_png(path: str, x_HxWxC: np.ndarray) -> None:
  import imageio.v3 as iio

  x = np.clip(np.asarray(x_HxWxC), 0.0, 1.0)
  x8 = np.round(x * 255.0).astype(np.uint8)
  iio.imwrite(path, x8[..., 0] if x8.shape[-1] == 1 else x8)


def git_commit() -> str:
  if os.environ.get("IDIP_COMMIT"):  # a copy of the tree without its .git (e.g. a GPU machine)
    return os.environ["IDIP_COMMIT"]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    head = subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
    ).stdout.strip()
    # "-dirty": the code differs from the commit (results files written meanwhile do not count).
    dirty = subprocess.run(
      ["git", "status", "--porcelain", "--untracked-files=no", "--", "idip_jax", "experiments/*.py", "run.py"],
      cwd=root,
      capture_output=True,
      text=True,
      timeout=10,
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return (head or "unknown") + ("-dirty" if dirty else "")


def code_hash() -> str:
  """SHA-1 of the package's source files: a finished job from other code is not reused."""
  pkg = os.path.dirname(os.path.abspath(__file__))
  h = hashlib.sha1()
  for name in sorted(f for f in os.listdir(pkg) if f.endswith(".py")):
    h.update(name.encode())
    with open(os.path.join(pkg, name), "rb") as f:
      h.update(f.read())
  return h.hexdigest()[:12]


def device_name() -> str:
  import jax

  d = jax.devices()[0]
  return f"{d.platform}:{getattr(d, 'device_kind', '')} x{jax.device_count()}"


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def provenance() -> dict:
  """Where and when a result was made: device, commit, date (every results file carries them)."""
  return {"device": device_name(), "commit": git_commit(), "date": now()}
