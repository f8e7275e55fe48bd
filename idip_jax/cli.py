"""The entry point behind run.py: process-wide settings (logging, the compilation cache, multi-host
start), Ctrl-C handling, and one error line (and exit code) for bad input or unwritable output."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import glob
import logging as std_logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable

import jax
from absl import logging

from idip_jax import batch_choice, checks, config, loop, per_core, runner
from idip_jax.config import JobConfig, RunConfig
from idip_jax.data import InputError, OutputError


@contextlib.contextmanager
def stop_on_ctrl_c(on_quit: Callable[[], None]):
  """Ctrl-C stops the fit at its next chunk end, with a checkpoint (loop.INTERRUPTED), and says so
  at once; a second Ctrl-C calls on_quit (which exits). The main thread may be inside XLA's
  compiler for a minute, where no Python signal handler runs: so SIGINT is blocked in this thread
  (and the threads it starts) and a watcher thread takes it with sigtimedwait."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def pressed():
    if loop.INTERRUPTED.is_set():
      on_quit()
    loop.INTERRUPTED.set()
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
    loop.INTERRUPTED.clear()


def interrupted_line(workdir: str) -> str:
  """What a stopped run left and how to continue it."""
  if not glob.glob(os.path.join(glob.escape(workdir), "**", "config.json"), recursive=True):
    return f"interrupted before fitting began: nothing to resume in {workdir}"
  finished = sorted(glob.glob(os.path.join(glob.escape(workdir), "**", "results.json"), recursive=True))
  left = f"finished images are in {', '.join(finished)}" if finished else "no image had finished"
  if glob.glob(os.path.join(glob.escape(workdir), "**", "checkpoints", "*.npz"), recursive=True):
    left += "; the fit in progress is checkpointed"
  return f"interrupted: {left}; run the same command with --workdir={workdir} --resume to continue"


def log_to_stderr() -> None:
  """absl's progress lines at INFO; JAX's "Unable to initialize backend 'tpu'" (INFO on every machine
  without one, and it preceded every --resume refusal, which resolves the backend's settings) silenced."""
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.WARNING)


def run_cli(job: JobConfig, flags_text: str = "") -> int:
  """The entry point behind run.py: an exit code, one error line for bad input (before any
  compute) or for an output that cannot be written, progress through absl.logging, one line on
  Ctrl-C saying how to resume."""
  log_to_stderr()
  workdir = job.run.workdir

  def quit_now():
    print(interrupted_line(workdir), file=sys.stderr, flush=True)
    os._exit(130)  # from the watcher thread: the main thread may be inside XLA

  try:
    config.check(job)
    checks.unused_flags(job)
    if job.cpu_processes > 1 and job.distributed:
      raise InputError("--cpu_processes starts its own processes on this machine: leave it out with --distributed")
    if not job.methods or len(set(job.methods)) != len(job.methods):
      raise InputError(f"--method needs distinct methods (got {','.join(job.methods)})")
    workdir = workdir or f"runs/{'-'.join(job.methods)}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    cfgs = [dataclasses.replace(job.run, method=m, workdir=workdir) for m in job.methods]
    # Reruns skip XLA's compile (a 64 px, 5-step run: 66 s -> 14 s, measured).
    cache = job.compile_cache or os.environ.get(
      "IDIP_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "idip-jax", "jax")
    )
    if cache != "none":
      jax.config.update("jax_compilation_cache_dir", cache)
    layout = per_core.child_layout() if job.distributed else None
    if layout is None and not job.distributed:
      n, why, estimate = processes_for(job, cfgs)
      if n > 1:
        return per_core.launch(RUN_PY, flags_text, workdir, n, why, estimate)
      layout = {"processes": 1, "why": why, **estimate}
    if job.distributed:
      init_distributed(job.coordinator, job.num_processes, job.process_id)
    with stop_on_ctrl_c(quit_now):
      runner.run_methods(cfgs, flags_text=(layout or {}).pop("flags_text", flags_text), layout=layout)
  except (InputError, OutputError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2 if isinstance(e, InputError) else 1
  except KeyboardInterrupt:
    print(interrupted_line(workdir), file=sys.stderr)
    return 130
  return 0


RUN_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "run.py")


def processes_for(job: JobConfig, cfgs: list[RunConfig]) -> tuple[int, str, dict]:
  """(processes, why, estimate) of --cpu_processes: N as asked; under auto (0) per_core.plan on CPU for a one-method
  job under --batch_strategy=auto, from the stored rate (batch_choice.STORED) and the inputs' sizes. The inputs are
  read and checked here as the job would: bad input is one line before any process starts."""
  cfg, speed = cfgs[0], batch_choice.stored_speed()
  gates = (  # under auto, the first that holds keeps the job in one process
    (job.cpu_processes == 1, "--cpu_processes=1"),
    (jax.default_backend() != "cpu", "not on CPU"),
    (len(cfgs) > 1, "several methods"),
    (cfg.fit.batch_strategy != "auto" or cfg.batch_size > 0, "a fixed --batch_strategy or --batch_size"),
    (len(per_core.cores()) < 2, "one core"),
    (speed is None, "no stored rate for this device"),
  )
  if job.cpu_processes > 1 and jax.default_backend() != "cpu":
    raise InputError(f"--cpu_processes={job.cpu_processes} is for CPU runs: here JAX runs on {jax.default_backend()}")
  reason = "" if job.cpu_processes > 1 else next((why for holds, why in gates if holds), "")
  if reason or not os.path.isfile(RUN_PY):
    return 1, f"one process: {reason or 'no run.py beside the package'}", {}
  checks.validate(cfg)
  images = runner.load_inputs(cfg)
  if job.cpu_processes > 1:
    return min(job.cpu_processes, len(images) * cfg.fit.seeds), f"--cpu_processes={job.cpu_processes}", {}
  resolved = runner.resolve(cfg, runner.image_channels(images), "cpu")
  shapes = [im.noisy_HxWxC.shape for im in images]
  seconds = [batch_choice.expected_seconds(resolved.net, resolved.fit, s, resolved.fit.seeds, speed) for s in shapes]
  return per_core.plan(len(per_core.cores()), seconds, [math.sqrt(h * w) for h, w, _ in shapes])


def init_distributed(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> None:
  """jax.distributed.initialize; empty/default arguments are auto-detected (SLURM, TPU pods...)."""
  kw = {}
  if coordinator:
    kw.update(coordinator_address=coordinator)
  if num_processes:
    kw.update(num_processes=num_processes)
  if process_id >= 0:
    kw.update(process_id=process_id)
  try:
    jax.distributed.initialize(**kw)
  except (ValueError, RuntimeError) as e:  # e.g. no coordinator to detect outside a cluster
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise InputError(
      f"--distributed: jax.distributed.initialize failed ({first}); set --coordinator, --num_processes and "
      "--process_id, or run under a cluster manager it detects (SLURM, ...)"
    ) from None


def run_script(main: Callable[[list[str]], int | None], doc: str, fv=None, argv: list[str] | None = None) -> int:
  """The entry point of an experiments/ script, as careful as run.py's: its flags parsed without
  absl.app (whose refusals are several lines), then main(argv); bad input is one `error:` line and exit 2
  (main validates before it makes any folder), an output that cannot be written exit 1, Ctrl-C 130."""
  from absl import flags

  fv = fv if fv is not None else flags.FLAGS
  argv = list(sys.argv if argv is None else argv)
  if config.HELP_ARGS & set(argv[1:]):
    print(doc.strip() + "\n\n" + fv.get_help())
    return 0
  log_to_stderr()
  try:
    rest = config.parse_argv(fv, argv)
    with stop_on_ctrl_c(lambda: os._exit(130)):
      return main(rest) or 0
  except (InputError, OutputError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2 if isinstance(e, InputError) else 1
  except KeyboardInterrupt:
    print("interrupted: finished jobs are kept in their folders; the same command reuses them", file=sys.stderr)
    return 130


def parse_method_counts(name: str, items: list[str], known=config.METHODS) -> dict[str, int]:
  """--method_steps=dip=1500,idip=1200 -> {method: N}: a method of `known` and a count in 1..config.STEP_MAX."""
  out = {}
  for item in items:
    method, sep, n = item.partition("=")
    if not sep or method not in known:
      raise InputError(f"--{name}={item}: give METHOD=N with METHOD one of {', '.join(known)}")
    if not n.strip().isdigit() or not 1 <= int(n) <= config.STEP_MAX:
      raise InputError(f"--{name}={item}: N must be a step count in 1..{config.STEP_MAX}")
    out[method] = int(n)
  return out
