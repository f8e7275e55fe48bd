"""--cpu_processes: one single-threaded process per core on CPU, each fitting every N-th image through the
--distributed path (runner.fit_and_record's split, results.merge_processes' merge), one run per call, XLA's
Eigen threading off, pinned to its own core.

Why: on this project's 2-core CPU one fit step of the official net takes 73 / 197 ms at 64 / 128 px in one
default process, and 103 / 332 ms in each of two such processes side by side: 1.42x / 1.19x the image rate
(experiments/speed/cpu_probes.py --probe=step, both layouts; docs/performance.md), more than the best in-process
batch (vmap:loop x4, 1.09-1.12x one run per call, bench_cpu.md). Under the default (--cpu_processes=0 with
--batch_strategy=auto) it is chosen when the job is expected to finish sooner so, counting the extra start of
the processes (plan below); the parent process only checks the inputs, starts the others and waits.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

from absl import logging

# Aggregate image rate of one single-threaded process per core over one default process, both one run per call,
# by image side (2 cores; interpolated in log2(side), held beyond the ends): the measurement above.
GAIN_BY_SIDE = ((64, 1.42), (128, 1.19))
# What the in-process default gains over one run per call (vmap:loop x4: 1.09 / 1.12 / 1.06x at 64 / 128 / 256 px,
# bench_cpu.md): the rate per-core must beat.
IN_PROCESS_GAIN = 1.1
# Seconds the layout adds to a job's wall, cold: the processes start Python and jax and read the inputs (~2 s), and
# each compiles its programs on its one core, ~18 s against ~8 s with both (4 Set12 images at 64 px, 200 steps,
# empty caches: 67 s per-core, fitting at 9.3 steps/s in each process, against 64 s in one process).
START_S = 20.0
ENV = "IDIP_JAX_LAYOUT"  # a child's layout (processes, why, the parent's flags), set by launch
SINGLE_THREAD_XLA = "--xla_cpu_multi_thread_eigen=false"


def cores() -> list[int]:
  """The cores this process may run on."""
  return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def gain(side: float) -> float:
  (s0, g0), (s1, g1) = GAIN_BY_SIDE
  t = min(max((math.log2(max(side, 1)) - math.log2(s0)) / (math.log2(s1) - math.log2(s0)), 0.0), 1.0)
  return g0 + t * (g1 - g0)


def plan(n_cores: int, image_seconds: list[float], image_sides: list[float]) -> tuple[int, str, dict]:
  """(processes, why, estimate) for a job whose images take image_seconds each one run per call in one default
  process: one process per core (at most one per image) when that is expected to end sooner than the in-process
  default, counting START_S; the runner gives process p the images p, p+N, ..."""
  one = sum(image_seconds) / IN_PROCESS_GAIN
  n = min(n_cores, len(image_seconds))
  estimate = {"one_process_s": round(one, 1), "cores": n_cores}
  if n < 2:
    return 1, f"one process: {'one core' if n_cores < 2 else 'one image'} to fit", estimate
  per_core = START_S + max(
    sum(s * n / gain(side) for s, side in zip(image_seconds[p::n], image_sides[p::n])) for p in range(n)
  )
  estimate["per_core_s"] = round(per_core, 1)
  if per_core < one:
    return n, f"one single-threaded process per core ({n}): ~{per_core:.0f} s expected, one ~{one:.0f} s", estimate
  return 1, f"one process: ~{one:.0f} s expected, one per core ~{per_core:.0f} s (their start does not repay)", estimate


def child_layout() -> dict | None:
  """In a process that launch started: its layout (processes, why, the parent's flags)."""
  text = os.environ.get(ENV)
  return json.loads(text) if text else None


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _pin(core: int):
  def pre_exec():
    os.sched_setaffinity(0, {core})
    try:  # the child ends with its parent (PR_SET_PDEATHSIG = 1): a killed run leaves no orphan fitting
      ctypes.CDLL(None).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
      pass

  return pre_exec


def launch(run_py: str, flags_text: str, workdir: str, n: int, why: str, estimate: dict | None = None) -> int:
  """Runs the job as n processes of run_py (the parent's flags, its workdir, --distributed on a local port), one
  per core; returns the first failing exit code (the others are stopped) or 0. A Ctrl-C is passed on once to every
  process (each checkpoints and stops, as one process would); they run in their own session so that the terminal's
  Ctrl-C does not reach them twice."""
  port, where = _free_port(), cores()
  env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {SINGLE_THREAD_XLA}".strip())
  env[ENV] = json.dumps({"processes": n, "why": why, **(estimate or {}), "flags_text": flags_text})
  common = [*flags_text.splitlines(), f"--workdir={workdir}", "--distributed", f"--coordinator=127.0.0.1:{port}"]
  common += [f"--num_processes={n}", "--cpu_processes=1"]
  logging.info("starting %d processes, one per core: %s", n, why)
  procs = [
    subprocess.Popen(
      [sys.executable, run_py, *common, f"--process_id={i}"],
      env=env,
      start_new_session=True,
      preexec_fn=_pin(where[i % len(where)]) if hasattr(os, "sched_setaffinity") else None,
    )
    for i in range(n)
  ]
  interrupted = []

  def forward(signum, frame):
    interrupted.append(signum)
    for p in procs:
      if p.poll() is None:
        p.send_signal(signal.SIGINT)

  previous = signal.signal(signal.SIGINT, forward)
  try:
    while True:
      codes = [p.poll() for p in procs]
      failed = [c for c in codes if c not in (None, 0)]
      if failed and not interrupted and 130 not in failed:  # one failed: the others would wait for it at a barrier
        for p in procs:
          if p.poll() is None:
            p.terminate()
        for p in procs:
          p.wait()
        return failed[0]
      if None not in codes:
        return next((c for c in codes if c), 0)
      time.sleep(0.2)
  finally:
    signal.signal(signal.SIGINT, previous)
