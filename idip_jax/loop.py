"""The one training loop: chunks of compiled steps, progress (rate, ETA) once per chunk,
checkpoints every so many steps and on Ctrl-C. DIP/IDIP fits (fit.fit) and denoiser training
(denoiser_train.train) both run on it, each with its own chunk program, checkpoint writer and
log fields.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

from absl import logging

# Set by the Ctrl-C watcher of cli.stop_on_ctrl_c (run.py, train_denoiser.py); the loop saves a
# checkpoint and raises KeyboardInterrupt at the next chunk boundary. Python's own handler raises
# wherever the main thread is, and there JAX's gc callback (_xla_gc_callback) can swallow it as
# "Exception ignored" (seen under pytest-xdist: the run went on fitting).
INTERRUPTED = threading.Event()


@dataclasses.dataclass
class Timing:
  """Seconds of a loop's chunks: the first (which also compiles) apart from the steady ones."""

  start: float = dataclasses.field(default_factory=time.perf_counter)
  first: tuple[int, float] | None = None  # (steps, seconds from `start`: setup and compiling count)
  steady_steps: int = 0
  steady_seconds: float = 0.0

  def add(self, steps: int, seconds: float) -> None:
    if self.first is None:
      self.first = (steps, time.perf_counter() - self.start)
    else:
      self.steady_steps += steps
      self.steady_seconds += seconds

  @property
  def rate(self) -> float:
    """Steps per second, from the chunks after the first once there are any."""
    if self.steady_steps:
      return self.steady_steps / self.steady_seconds
    return self.first[0] / self.first[1]

  @property
  def compile_seconds(self) -> float | None:
    """The first chunk's time beyond what its steps take at the steady rate (None: one chunk)."""
    if not self.steady_steps:
      return None
    return max(0.0, self.first[1] - self.first[0] * self.steady_seconds / self.steady_steps)


@dataclasses.dataclass(frozen=True)
class Progress:
  label: str  # prefix of each progress line
  units: float  # work per step: images (a fit's runs) or patches (a training batch)
  unit: str  # its name in the rate: "image-steps", "patches"


def run(
  chunk: Callable[[Any, int, int], tuple[Any, dict]],
  state: Any,
  done: int,
  total: int,
  chunk_len: int,
  progress: Progress,
  after_chunk: Callable[[Any, int, dict], tuple[str, bool]],
  save: Callable[[Any, int], None] | None = None,
  save_every: int = 0,
  *,
  save_last: bool = False,
  timing: Timing | None = None,
) -> tuple[Any, int, Timing]:
  """Steps `state` from `done` to `total` in chunks of `chunk_len` -> (state, done, timing).

  chunk(state, done, length) -> (state, metrics on the host): `length` steps.
  after_chunk(state, done, metrics) -> (the progress line's own fields, stop now).
  save(state, done): before the last step, every save_every steps (at the first chunk end past each
  multiple) and on Ctrl-C (then KeyboardInterrupt); after the last step (or a stop) when save_last.
  """
  timing = timing or Timing()
  while done < total:
    length = min(chunk_len, total - done)
    t = time.perf_counter()
    state, metrics = chunk(state, done, length)
    timing.add(length, time.perf_counter() - t)
    done += length
    fields, stop = after_chunk(state, done, metrics)
    due = save_every and done // save_every > (done - length) // save_every
    final = done == total
    if save is not None and ((save_last and (final or stop)) or (not final and (due or INTERRUPTED.is_set()))):
      save(state, done)
    rate = timing.rate
    logging.info(
      f"{progress.label}step {done}/{total}  {rate:.2f} steps/s  {rate * progress.units:.1f} {progress.unit}/s  "
      f"ETA {(total - done) / rate:.0f}s  {fields}".rstrip()
    )
    if INTERRUPTED.is_set():
      raise KeyboardInterrupt
    if stop:
      break
  return state, done, timing
