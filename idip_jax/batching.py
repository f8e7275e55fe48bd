"""How many runs one call fits: XLA's memory analysis of the compiled step, the device's memory, and a
retry at half the batch when a call runs out of memory anyway (batch_choice.py: which strategy)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from idip_jax.config import FitConfig, NetConfig
from idip_jax.fit import make_init, over_batch
from idip_jax.train import Batch, init_size, make_model, make_optimizer, sized, train_step

MEMORY_HEADROOM = 0.85  # of the device's bytes_limit; XLA's estimate misses allocator slack


def lower_step(net_cfg: NetConfig, cfg: FitConfig, batch: int, height: int, width: int, with_gt: bool = True):
  """The jitted step over `batch` runs, lowered from shapes only (nothing is allocated); its
  pre-compile cost analysis counts every convolution on any backend."""
  model, tx = make_model(net_cfg, cfg), make_optimizer(cfg)
  step = jax.jit(over_batch(functools.partial(train_step, model, tx, cfg), cfg.batch_strategy), donate_argnums=0)
  keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch))
  # The init's traced output shapes (calling it inside eval_shape would nest its compiler options).
  init = make_init(net_cfg, cfg, init_size(cfg, height, width))
  states = jax.eval_shape(lambda s: sized(s, height, width), init.trace(keys).out_info)
  img = lambda c, f=1: jax.ShapeDtypeStruct((batch, height // f, width // f, c), jnp.float32)
  f = cfg.sr_factor if cfg.task == "sr" else 1  # super-resolution's y is low-resolution
  b = Batch(
    net_input=img(net_cfg.in_channels),
    noisy=img(net_cfg.out_channels, f),
    prelim=img(net_cfg.out_channels),
    mask=img(1),
    clean=img(net_cfg.out_channels) if with_gt else None,
    loss_mask=None if cfg.task == "denoise" else img(1, f),
  )
  return step.lower(states, b, keys)


@functools.lru_cache(maxsize=64)
def compile_step(net_cfg: NetConfig, cfg: FitConfig, batch: int, height: int, width: int, with_gt: bool = True):
  """lower_step, compiled: its memory analysis serves batch sizing and the benchmark."""
  return lower_step(net_cfg, cfg, batch, height, width, with_gt).compile()


def step_memory_bytes(
  net_cfg: NetConfig, cfg: FitConfig, batch: int, height: int, width: int, with_gt: bool = True
) -> int:
  """Device bytes one step over `batch` runs needs (arguments + outputs + temporaries), from
  XLA's memory analysis of the compiled step."""
  mem = compile_step(net_cfg, cfg, batch, height, width, with_gt).memory_analysis()
  if mem is None:
    raise RuntimeError("this backend gives no memory analysis")
  # Donated state buffers are reused for the outputs, so they are counted once.
  return int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes)


def device_memory_bytes() -> int | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def auto_batch_size(
  net_cfg: NetConfig,
  cfg: FitConfig,
  height: int,
  width: int,
  n_runs: int,
  memory_bytes: int | None = None,
  with_gt: bool = True,
) -> int:
  """Runs per call: the largest batch whose compiled step fits in `memory_bytes` (default:
  the device's limit x MEMORY_HEADROOM), per device when the batch is sharded. Memory is
  affine in the batch, so two compiles (batch 1 and 2) give it. Calls are then balanced:
  10 runs with room for 8 become two calls of 5, not 8 + 2."""
  if memory_bytes is None:
    limit = device_memory_bytes()
    if limit is None:
      return 1
    memory_bytes = int(limit * MEMORY_HEADROOM)
  n_dev = jax.local_device_count() if cfg.shard else 1
  one = step_memory_bytes(net_cfg, cfg, 1, height, width, with_gt)
  per_run = max(step_memory_bytes(net_cfg, cfg, 2, height, width, with_gt) - one, 1)
  fits = max(1, (memory_bytes - (one - per_run)) // per_run) * n_dev
  calls = -(-n_runs // min(fits, n_runs))
  return -(-n_runs // calls)


def is_out_of_memory(e: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def release_compiled_if_crowded(fraction: float = 0.5) -> bool:
  """Drops every compiled program once the process holds `fraction` of the kernel's limit on memory mappings.
  XLA:CPU maps each compiled fusion into memory: a 64 px DIP fit's programs (init, step, eval) hold ~2,400
  mappings (measured), so a process that compiles many (--batch_strategy=auto's timing, a table's jobs)
  reaches vm.max_map_count (65,530 by default) and LLVM fails with "Cannot allocate memory" (a cpu_crop64
  refit did in its 4th job, 2026-12-02). A program needed again recompiles (or loads from the persistent
  compilation cache); jax.clear_caches() returned those 2,400 mappings, and a refit after it was identical."""
  try:
    with open("/proc/sys/vm/max_map_count") as f:
      cap = int(f.read())
    with open("/proc/self/maps") as f:
      held = sum(1 for _ in f)
  except (OSError, ValueError):  # not Linux: nothing to watch
    return False
  if held < fraction * cap:
    return False
  logging.info("%d of %d memory mappings held: dropping compiled programs", held, cap)
  jax.clear_caches()
  return True


def fit_in_calls(runs: list, per_call: int, fit_call: Callable[[list], Any], what: str) -> Iterator[tuple[list, Any]]:
  """(part, fit_call(part)) for consecutive parts of `runs`, per_call at a time; out of device
  memory, the part is retried at half the size (a set that fits one image at a time must not
  fail on memory)."""
  start = 0
  while start < len(runs):
    release_compiled_if_crowded()
    part = runs[start : start + per_call]
    try:
      res = fit_call(part)
    except Exception as e:
      if not is_out_of_memory(e):
        raise
      if len(part) == 1:
        raise RuntimeError(f"out of memory fitting one {what} image; try --remat") from e
      per_call = len(part) // 2
      logging.warning("out of memory at %d runs per call; retrying with %d", len(part), per_call)
      continue
    start += len(part)
    yield part, res
