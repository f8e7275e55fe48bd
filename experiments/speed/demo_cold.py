"""The README's first command as a new user meets it: a fresh clone of this repository's HEAD, a
new virtualenv, `pip install -e '.[demo]'` (downloads included), then the demo with empty caches
(no JAX compilation cache, no batch-choice cache); then the demo once more with the caches it left
(warm). Writes experiments/results/demo_cold.json. Needs network access for the install; run it
alone on an idle machine (~10 min on 2 cores, most of it the install).

  python experiments/speed/demo_cold.py
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)  # experiments/speed/ -> the repository


def sh(cmd: list[str], **kw) -> tuple[float, subprocess.CompletedProcess]:
  t = time.perf_counter()
  p = subprocess.run(cmd, capture_output=True, text=True, **kw)
  if p.returncode:
    raise SystemExit(f"error: {' '.join(cmd)} failed ({p.returncode}): {p.stderr[-3000:]}")
  return time.perf_counter() - t, p


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
  except (OSError, StopIteration):
    return platform.processor()


def demo(clone: str, python: str, home: str, workdir: str) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in ("IDIP_JAX_CACHE", "IDIP_CACHE", "XLA_FLAGS", "PYTHONPATH")}
  env.update(HOME=home, XDG_CACHE_HOME=os.path.join(home, ".cache"), JAX_PLATFORMS="cpu")
  wall, p = sh([python, "run.py", "--flagfile=experiments/demo.flags", f"--workdir={workdir}"], cwd=clone, env=env)
  methods = {}
  for m in sorted(os.listdir(workdir)):
    path = os.path.join(workdir, m, "results.json")
    if os.path.isfile(path):
      with open(path) as f:
        r = json.load(f)
      im = r["images"][0]
      methods[m] = {
        "seconds": round(im["seconds"], 1),
        "compile_seconds": round(im["compile_seconds"], 1),
        "psnr_final": round(im["psnr_final"], 2),
        "psnr_ema": round(im["psnr_ema"], 2),
        "psnr_prelim": None if im["psnr_prelim"] is None else round(im["psnr_prelim"], 2),
        "psnr_noisy": round(im["psnr_noisy"], 2),
      }
  last = [ln for ln in p.stdout.splitlines() if ln.strip()][-1]
  return {"wall_s": round(wall, 1), "methods": methods, "last_line": last}


def main() -> None:
  from idip_jax import outputs

  tmp = tempfile.mkdtemp(prefix="idip-demo-cold-")
  clone, venv, home = (os.path.join(tmp, d) for d in ("clone", "venv", "home"))
  os.makedirs(home)
  sh(["git", "clone", "--quiet", ROOT, clone])
  commit = sh(["git", "rev-parse", "HEAD"], cwd=clone)[1].stdout.strip()
  sh([sys.executable, "-m", "venv", venv])
  python = os.path.join(venv, "bin", "python")
  env = dict(os.environ, HOME=home, XDG_CACHE_HOME=os.path.join(home, ".cache"))
  install_s, _ = sh([python, "-m", "pip", "install", "-q", "-e", f"{clone}[demo]"], env=env)
  cold = demo(clone, python, home, os.path.join(tmp, "demo_cold"))
  warm = demo(clone, python, home, os.path.join(tmp, "demo_warm"))
  doc = {
    "command": "python experiments/speed/demo_cold.py",
    "what": "fresh clone, new virtualenv, pip install -e '.[demo]', then python run.py "
    "--flagfile=experiments/demo.flags with empty caches (cold) and again (warm: JAX's compilation cache)",
    "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()},
    "commit": commit,
    "date": outputs.now(),
    "install_s": round(install_s, 1),
    "cold": cold,
    "warm": warm,
  }
  out = os.path.join(ROOT, "experiments", "results", "demo_cold.json")
  outputs.write_json(out, doc)
  print(json.dumps(doc, indent=1))


def entry(argv: list[str] | None = None) -> int:
  """No flags: a stray argument or flag is refused in one line."""
  from absl import flags

  from idip_jax import cli

  return cli.run_script(lambda _: main(), __doc__, flags.FlagValues(), argv)


if __name__ == "__main__":
  sys.exit(entry())
