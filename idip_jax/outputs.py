"""Workdir handling and result files: PNGs, history.csv, config.json, results.json."""

from __future__ import annotations

import contextlib
import csv
import datetime
import hashlib
import json
import os
import shutil
import subprocess
import tempfile

import numpy as np

from idip_jax import locks
from idip_jax.data import InputError, OutputError

MARKER = ".idip-jax-workdir"  # written into every workdir this tool creates; lists what it wrote


def _name_max(folder: str) -> int:
  try:
    return os.pathconf(folder, "PC_NAME_MAX")
  except (OSError, ValueError):
    return 255


def check_workdir(path: str, overwrite: bool, reads: tuple[str, ...] = ()) -> None:
  """A new run's workdir: empty, or (with --overwrite) made by this tool, holding only files it
  wrote and none of the paths the run reads (`reads`: inputs, x_bar folder, masks, weights)."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise InputError(f"--workdir={path} exists and is not a folder")
  existing = os.path.abspath(path)
  while not os.path.exists(existing):  # the folder it would be made in
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise InputError(f"--workdir={path}: {existing} is a file, not a folder")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise InputError(f"--workdir={path}: {existing} is not writable")
  # ENAMETOOLONG would surface only when the first file is written; 40 bytes: the longest file the
  # tool writes inside (checkpoints/.call-<hash>.npz.<random>.tmp).
  longest = max(os.path.abspath(path).split(os.sep), key=lambda part: len(part.encode()))
  if len(longest.encode()) > _name_max(existing):
    raise InputError(
      f"--workdir: the folder name {longest[:40]}... ({len(longest.encode())} bytes) is longer than the file "
      f"system allows ({_name_max(existing)})"
    )
  if len(os.path.abspath(path).encode()) + 40 > os.pathconf(existing, "PC_PATH_MAX"):
    raise InputError(
      f"--workdir: the path {path[:40]}... ({len(os.path.abspath(path).encode())} bytes) is longer than the file "
      "system allows"
    )
  if not (os.path.isdir(path) and os.listdir(path)):
    return
  if not overwrite:
    raise InputError(f"--workdir={path} exists and is not empty; pass --overwrite to replace it")
  if not os.path.isfile(os.path.join(path, MARKER)):
    raise InputError(
      f"--workdir={path} was not made by idip-jax (no {MARKER} in it); --overwrite "
      "only replaces folders this tool made: choose another --workdir"
    )
  locks.lock(path, os.path.join(path, MARKER))  # a live run in it is refused before anything is deleted
  top = os.path.realpath(path)
  for read in reads:
    real = os.path.realpath(read)
    if real == top or real.startswith(top + os.sep):
      raise InputError(
        f"--overwrite would delete {read}, which this run reads: it lies inside --workdir={path}; "
        "choose another --workdir"
      )
  foreign = not_written_by_tool(path)
  if foreign:
    more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
    raise InputError(
      f"--workdir={path} holds files idip-jax did not write ({foreign[0]}{more}); --overwrite "
      "deletes only what it wrote: move them out or choose another --workdir"
    )


def listed(folder: str) -> set[str]:
  """The files (and, ending in '/', folders) the marker of a tool-made folder lists."""
  with open(os.path.join(folder, MARKER)) as f:
    return {ln[len("wrote ") :].rstrip("\n") for ln in f if ln.startswith("wrote ")}


def not_written_by_tool(path: str) -> list[str]:
  """Files under a tool-made folder that its markers (the nearest above each file) do not list;
  leftover temporary files of listed ones (.NAME.*.tmp) count as the tool's."""
  foreign, lists = [], {}
  for d, subdirs, files in os.walk(path):
    subdirs.sort()
    owner = d
    while owner != path and not os.path.isfile(os.path.join(owner, MARKER)):
      owner = os.path.dirname(owner)
    if owner not in lists:
      lists[owner] = listed(owner)
    for name in sorted(files) + [s for s in subdirs if os.path.islink(os.path.join(d, s))]:
      rel = os.path.relpath(os.path.join(d, name), owner)
      folder, base = os.path.split(rel)
      tmp_of = base[1:].rsplit(".", 2)[0] if base.startswith(".") and base.endswith(".tmp") else None
      if (
        name == MARKER
        or rel in lists[owner]
        or (tmp_of is not None and os.path.join(folder, tmp_of) in lists[owner])
        or any(rel.startswith(p) for p in lists[owner] if p.endswith("/"))
      ):
        continue
      foreign.append(os.path.join(d, name))
  return foreign


def prepare_workdir(path: str, overwrite: bool, reads: tuple[str, ...] = ()) -> None:
  """Refuses a non-empty workdir unless --overwrite and it holds only what this tool wrote
  (check_workdir); never deletes anything else. The new folder is locked for this process (locks.py)."""
  check_workdir(path, overwrite, reads)
  real = os.path.realpath(path)  # a --workdir that is a link: its folder is replaced, the link kept
  if os.path.isdir(real) and os.listdir(real):
    shutil.rmtree(real)
  os.makedirs(real, exist_ok=True)
  with open(os.path.join(real, MARKER), "w") as f:
    f.write("made by idip-jax; --overwrite may replace this folder if it holds only the files listed here\n")
  locks.lock(path, os.path.join(real, MARKER))


def note_written(path: str) -> None:
  """Lists `path` (a folder if it ends in '/') in the marker of the tool-made folder nearest
  above it, so --overwrite knows the tool wrote it; outside such a folder it does nothing."""
  full = os.path.realpath(path) + ("/" if path.endswith("/") else "")
  d = os.path.dirname(full.rstrip("/"))
  while not os.path.isfile(os.path.join(d, MARKER)):
    if os.path.dirname(d) == d:
      return
    d = os.path.dirname(d)
  rel = os.path.relpath(full.rstrip("/"), d) + ("/" if full.endswith("/") else "")
  if rel not in listed(d):  # a rewritten file (results.json, a checkpoint) is listed once
    with open(os.path.join(d, MARKER), "a") as f:
      f.write(f"wrote {rel}\n")


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "wb", **open_kw):
  """A file written under a temporary name (.NAME.*.tmp) and renamed to `path` when complete, so
  a kill or a full disk never leaves a partial file under a result's name. An OSError (ENOSPC,
  EDQUOT, EROFS...) becomes one OutputError line naming the file."""
  note_written(path)
  folder, base = os.path.split(os.path.abspath(path))
  try:
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{base}.", suffix=".tmp")
  except OSError as e:
    raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
  try:
    with os.fdopen(fd, mode, **open_kw) as f:
      yield f
    os.chmod(tmp, 0o644)  # mkstemp makes it private
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    if isinstance(e, OSError):
      raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    raise


def _finite(obj):
  """NaN/inf -> None: strict JSON (json.dump would write NaN/Infinity, which parsers reject)."""
  if isinstance(obj, dict):
    return {k: _finite(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_finite(v) for v in obj]
  if isinstance(obj, (float, np.floating)):
    return float(obj) if np.isfinite(obj) else None
  return obj


def write_table(folder: str, stem: str, doc: dict, markdown: str) -> None:
  """An experiment's table: folder/stem.json (the data) and folder/stem.md (the same, for reading)."""
  os.makedirs(folder, exist_ok=True)
  write_json(os.path.join(folder, stem + ".json"), doc)
  with atomic_open(os.path.join(folder, stem + ".md"), "w") as f:
    f.write(markdown)


def read_json(path: str):
  with open(path) as f:
    return json.load(f)


def write_csv(path: str, columns: tuple[str, ...], rows: list[dict]) -> None:
  """A trainer's progress.csv, rewritten whole (atomically) every log interval."""
  with atomic_open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=columns)
    w.writeheader()
    w.writerows(rows)


def read_csv_until(path: str, step: int) -> list[dict]:
  """The rows of a progress.csv up to `step` (a resumed run redoes the rows past its checkpoint)."""
  with open(path) as f:
    return [r for r in csv.DictReader(f) if int(r["step"]) <= step]


def write_json(path: str, obj) -> None:
  """Atomic write: a crash mid-run leaves the previous complete file."""
  with atomic_open(path, "w") as f:
    json.dump(_finite(obj), f, indent=1, default=float, allow_nan=False)


def save_image(path_png: str, x_HxWxC: np.ndarray, save_float: bool) -> None:
  """8-bit PNG (clipped, rounded), and with save_float the exact float32 array as .npy beside it."""
  save_png(path_png, x_HxWxC)
  if save_float:
    with atomic_open(os.path.splitext(path_png)[0] + ".npy") as f:
      np.save(f, np.asarray(x_HxWxC, np.float32))


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
  try:
    with atomic_open(path) as f:
      fig.savefig(f, dpi=90, format=os.path.splitext(path)[1][1:] or "png")
  finally:
    plt.close(fig)
  return True


def save_png(path: str, x_HxWxC: np.ndarray) -> None:
  import imageio.v3 as iio

  x = np.clip(np.asarray(x_HxWxC), 0.0, 1.0)
  x8 = np.round(x * 255.0).astype(np.uint8)
  with atomic_open(path) as f:
    iio.imwrite(f, x8[..., 0] if x8.shape[-1] == 1 else x8, extension=os.path.splitext(path)[1])


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
