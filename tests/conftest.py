import atexit
import contextlib
import os
import shutil
import tempfile

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests are dominated by XLA:CPU compilation of many small programs; optimisation level 0
# halves the suite's time (test_fit.py: 110 s -> 56 s) and changes results only by rounding. XLA:CPU's older
# elemental emitters instead of its fusion emitters cut the rest by a quarter (backend compile of a tiny-net fit
# 3.8 -> 1.75 s; the suite 393 -> 325 s on 2 cores, jax 0.10.2), but with them two rows of one batch fitted to the
# same data are no longer bit-identical (a SURE twin drifted 1e-4 from its run in 3 steps). The tests of such
# equalities are marked `fusion_emitters` and run in a process of their own with the users' emitters
# (pytest_pyfunc_call below). A user's own XLA_FLAGS are kept for every process (recorded by the first one).
USER_XLA_FLAGS = os.environ.setdefault("IDIP_TEST_USER_XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
EXACT_XLA_FLAGS = USER_XLA_FLAGS or "--xla_backend_optimization_level=0"
TEST_XLA_FLAGS = USER_XLA_FLAGS or EXACT_XLA_FLAGS + " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = EXACT_XLA_FLAGS if os.environ.get("IDIP_TEST_EXACT") else TEST_XLA_FLAGS
# One persistent compilation cache for the whole suite: made by the first process (pytest's controller, before
# the xdist workers start, which inherit it), shared by the workers and every subprocess a test starts (run.py,
# tables.py), and removed by the process that made it when it exits. Every program is cached, however fast it
# compiled (min compile time 0): the suite compiles the same tiny nets in many modules and processes, and
# fresh_compile_caches below drops the in-memory ones after each module. No run of the suite reads another's.
# --batch_strategy=auto's choices (batch_choice.cache_file) go to a temporary folder per process, not ~/.cache.
if "IDIP_JAX_CACHE" not in os.environ:
  os.environ["IDIP_JAX_CACHE"] = tempfile.mkdtemp(prefix="idip-jax-cache-")
  atexit.register(shutil.rmtree, os.environ["IDIP_JAX_CACHE"], ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["IDIP_JAX_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="idip-jax-xdg-")
atexit.register(shutil.rmtree, os.environ["XDG_CACHE_HOME"], ignore_errors=True)

import dataclasses
import subprocess
import sys

from idip_jax import config, fit
from idip_jax.data import shared_dir

SHARED = shared_dir()
DATA = os.path.join(SHARED, "data")
WEIGHTS = os.path.join(SHARED, "weights")


def need_path(path: str):
  """Skip with a clear reason when ../shared (data or weights) is absent."""
  if not os.path.exists(path):
    pytest.skip(f"shared resource absent: {path} (set IDIP_SHARED to the folder holding data/ and weights/)")
  return path


def smooth_image(h: int, w: int, c: int = 1, seed: int = 0) -> np.ndarray:
  """A small synthetic test image: smooth blobs and an edge, in [0.1, 0.9]."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  img = np.zeros((h, w, c), np.float32)
  for ch in range(c):
    a, b = rng.uniform(2, 6, 2)
    img[..., ch] = 0.5 + 0.25 * np.sin(a * np.pi * xx) * np.cos(b * np.pi * yy)
    img[..., ch] += 0.15 * (xx > 0.5)
  return np.clip(img, 0.1, 0.9).astype(np.float32)


def write_png(path: str, x_HxWxC: np.ndarray) -> str:
  import imageio.v3 as iio

  x8 = np.round(np.clip(x_HxWxC, 0, 1) * 255).astype(np.uint8)
  iio.imwrite(path, x8[..., 0] if x8.shape[-1] == 1 else x8)
  return path


# The one tiny net of the suite (config.TINY_NET), on gray images with IDIP's complex connection,
# resolved for XLA:CPU; and the same net as run.py flags.
NET, _ = fit.for_backend(
  dataclasses.replace(config.TINY_NET, out_channels=1, complex_connection=True), config.FitConfig(), "cpu"
)
TINY_ARGS = [
  f"--{k}={getattr(config.TINY_NET, k)}" for k in ("in_channels", "scales", "width", "skip_channels", "cc_features")
] + ["--chunk=5", "--batch_strategy=vmap"]
# --batch_strategy=vmap in TINY_ARGS: one run per call on CPU, as before --batch_strategy=auto existed; the auto
# strategy's timing
# (a compile per candidate) would dominate these tiny fits. It is tested in test_convs.py.


@contextlib.contextmanager
def parsed_flags(argv: list[str]):
  """absl's global FLAGS parsed from argv (run.py's and experiments' flags share it), reset after."""
  from absl import flags

  cwd = os.getcwd()
  os.chdir(ROOT)  # flagfiles include each other by repo-relative path
  flags.FLAGS.unparse_flags()
  try:
    flags.FLAGS(argv)
    yield flags.FLAGS
  finally:
    flags.FLAGS.unparse_flags()
    os.chdir(cwd)


def import_experiment(name: str):
  """An experiments/ script as a module, in this process: an entry point (experiments.NAME) or one in a folder
  named for its purpose (experiments.harness.NAME, .studies.NAME, .speed.NAME)."""
  import importlib
  import importlib.util

  for package in ("experiments", "experiments.harness", "experiments.studies", "experiments.speed"):
    if importlib.util.find_spec(f"{package}.{name}") is not None:
      return importlib.import_module(f"{package}.{name}")
  raise ModuleNotFoundError(f"no experiments script named {name}")


@pytest.fixture(autouse=True, scope="module")
def fresh_compile_caches():
  """Each test module starts without the programs earlier modules compiled in this worker. Two suite
  runs (2026-12-02) lost a worker to an XLA:CPU crash inside compilation late in its life (stop 26
  saw the same class); bounding what a worker holds is the cheap mitigation."""
  yield
  import jax

  from idip_jax import batching, convs

  jax.clear_caches()
  for cached in (fit.make_fit_chunk, fit._host_programs, fit.make_predict, fit.make_init, batching.compile_step):
    cached.cache_clear()
  convs.per_run_conv.cache_clear()


def interrupt_at_step(monkeypatch, module, step: int, train, cfg) -> None:
  """Runs train(cfg) with Ctrl-C pressed (loop.INTERRUPTED, as the scripts' watcher sets it) once
  module.write_progress has written `step`'s row; the loop checkpoints there and raises KeyboardInterrupt."""
  import pytest

  from idip_jax import loop

  write = module.write_progress

  def press(workdir, rows, *args, **kw):
    write(workdir, rows, *args, **kw)
    if int(rows[-1]["step"]) == step:
      loop.INTERRUPTED.set()

  monkeypatch.setattr(module, "write_progress", press)
  try:
    with pytest.raises(KeyboardInterrupt):
      train(cfg)
  finally:
    loop.INTERRUPTED.clear()
    monkeypatch.setattr(module, "write_progress", write)


def pytest_configure(config):
  config.addinivalue_line("markers", "fusion_emitters: run in a process with XLA:CPU's fusion emitters (bit equality)")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
  """A test marked fusion_emitters runs in a pytest process of its own whose XLA keeps the fusion emitters, as
  users' does (EXACT_XLA_FLAGS); its result is this test's."""
  if pyfuncitem.get_closest_marker("fusion_emitters") is None or os.environ.get("IDIP_TEST_EXACT"):
    return None
  argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-p", "no:cacheprovider", "-o", "addopts="]
  env = dict(os.environ, IDIP_TEST_EXACT="1")
  p = subprocess.run(argv + [pyfuncitem.nodeid], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stdout[-6000:] + p.stderr[-2000:]
  return True
