"""How one call fits its runs: --batch_strategy=auto's timing of the candidates on the bucket's
shape (cached), XLA's memory analysis of the compiled step, the device's memory, and a retry at
half the batch when a call runs out of memory anyway."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

from idip_jax import outputs
from idip_jax.config import FitConfig, NetConfig
from idip_jax.data import OutputError
from idip_jax.fit import init_runs, make_fit_chunk, make_init, over_batch, sized
from idip_jax.train import Batch, make_model, make_optimizer, run_keys, train_step

MEMORY_HEADROOM = 0.85  # of the device's bytes_limit; XLA's estimate misses allocator slack


def lower_step(net_cfg: NetConfig, cfg: FitConfig, batch: int, height: int, width: int, with_gt: bool = True):
  """The jitted step over `batch` runs, lowered from shapes only (nothing is allocated); its
  pre-compile cost analysis counts every convolution on any backend."""
  model, tx = make_model(net_cfg, cfg), make_optimizer(cfg)
  step = jax.jit(over_batch(functools.partial(train_step, model, tx, cfg), cfg.batch_strategy), donate_argnums=0)
  keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch))
  # The init's traced output shapes (calling it inside eval_shape would nest its compiler options).
  states = jax.eval_shape(lambda s: sized(s, height, width), make_init(net_cfg, cfg).trace(keys).out_info)
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


# --batch_strategy=auto. Lowerings timed per batch size (convs.per_run_conv; "grouped", the
# control, is 2-3x slower per image on CPU and H100: bench_{cpu,gpu}.md) and the batch sizes
# tried on CPU: a 2-core CPU gains nothing from more parallel runs, only from fewer, larger ops
# (experiments/results/bench_cpu.md).
AUTO_LOWERINGS = ("loop", "im2col", "hybrid")
CPU_AUTO_BATCHES = (2, 4)
MAX_AUTO_BATCH = 16  # accelerators: the memory-based size, at most this
TIMING_STEPS = 2  # timed steps per repeat, after one warm-up chunk that compiles
TIMING_REPEATS = 2


@dataclasses.dataclass(frozen=True)
class Candidate:
  strategy: str  # FitConfig.batch_strategy
  batch_conv: str  # NetConfig.batch_conv
  batch: int  # runs per call

  @property
  def label(self) -> str:
    return "one run per call" if self.batch == 1 else f"{self.strategy}:{self.batch_conv} x{self.batch}"


def candidates(net_cfg: NetConfig, n_runs: int, sizes: list[int]) -> list[Candidate]:
  """vmap with each lowering (an explicit --batch_conv: that one) at each batch size, capped at
  n_runs; at size 1, one run per call (no lowering to choose)."""
  lowerings = AUTO_LOWERINGS if net_cfg.batch_conv == "auto" else (net_cfg.batch_conv,)
  sizes = sorted({min(b, n_runs) for b in sizes})
  single = [Candidate("vmap", lowerings[0], 1)] if 1 in sizes else []
  return single + [Candidate("vmap", lw, b) for b in sizes if b > 1 for lw in lowerings]


def time_candidate(
  net_cfg: NetConfig, cfg: FitConfig, c: Candidate, height: int, width: int, with_gt: bool
) -> tuple[float, float]:
  """(seconds per image-step, seconds of the first call) of candidate c on the bucket's shape:
  the fit's own chunk program on made-up images (so the winner's compile is reused on CPU's host
  loop), median of TIMING_REPEATS x TIMING_STEPS steps after a warm-up chunk."""
  from idip_jax import fit  # fit imports nothing of this module at import time; keep it that way

  net_c = dataclasses.replace(net_cfg, batch_conv=c.batch_conv)
  # The bucket's own configs (steps included), so that on a host loop the winner's compiled step is
  # the one its fit then runs (fit._host_programs is cached on them).
  cfg_c = dataclasses.replace(cfg, batch_strategy=c.strategy)
  n_dev = jax.local_device_count() if cfg.shard and c.batch % jax.local_device_count() == 0 else 1
  keys = [run_keys(0, k) for k in range(c.batch)]
  x = jax.random.uniform(jax.random.key(1), (c.batch, height, width, net_cfg.out_channels))
  f = cfg.sr_factor if cfg.task == "sr" else 1  # super-resolution's y is low-resolution
  y = x[:, ::f, ::f]
  batch = fit.make_batch(
    net_c,
    cfg_c,
    keys,
    y,
    prelim_NxHxWxC=x,
    clean_NxHxWxC=x if with_gt else None,
    mask_NxHxWx1=jnp.ones((*x.shape[:3], 1)),
    loss_mask_NxHxWx1=None if cfg.task == "denoise" else jnp.ones((*y.shape[:3], 1)),
  )
  states, noise = init_runs(net_c, cfg_c, keys, height, width)
  chunk = make_fit_chunk(net_c, cfg_c, TIMING_STEPS, n_dev)
  t = time.perf_counter()
  states, m = chunk(states, batch, noise, 0)
  jax.block_until_ready(m)
  first = time.perf_counter() - t
  times = []
  for r in range(TIMING_REPEATS):
    t = time.perf_counter()
    states, m = chunk(states, batch, noise, (r + 1) * TIMING_STEPS)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  return float(sorted(times)[len(times) // 2]) / (TIMING_STEPS * c.batch), first


def choice_key(
  net_cfg: NetConfig, cfg: FitConfig, shape: tuple[int, int, int], n_runs: int, batch_size: int, with_gt: bool
) -> str:
  """What a timing depends on: device kind and count, jax version, the bucket's shape, the net,
  the fit settings that change the compiled step, how many runs there are to fit."""
  d = jax.devices()[0]
  fit_part = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("steps", "seed", "seeds", "lr", "chunk")}
  text = json.dumps(
    [
      d.platform,
      getattr(d, "device_kind", ""),
      jax.local_device_count(),
      jax.__version__,
      list(shape),
      n_runs,
      batch_size,
      with_gt,
      dataclasses.asdict(net_cfg),
      fit_part,
    ],
    sort_keys=True,
    default=str,
  )
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_file(setting: str) -> str:
  """RunConfig.batch_cache -> the cache's path ('' when off)."""
  if setting == "none":
    return ""
  if setting:
    return os.path.expanduser(setting)
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "idip_jax", "batch_choice.json")


def _read_cache(path: str) -> dict:
  if not path or not os.path.isfile(path):
    return {}
  try:
    with open(path) as f:
      cache = json.load(f)
    return cache if isinstance(cache, dict) else {}
  except (OSError, ValueError):
    logging.warning("ignoring the unreadable --batch_cache %s (it will be rewritten)", path)
    return {}


def _chosen(c: Candidate, timings: dict) -> dict:
  return {
    "batch_strategy": c.strategy,
    "batch_conv": c.batch_conv,
    "batch_size": c.batch,
    "label": c.label,
    "timings": timings,
    "device": outputs.device_name(),
    "jax": jax.__version__,
    "date": outputs.now(),
  }


def choose(
  net_cfg: NetConfig,
  cfg: FitConfig,
  shape: tuple[int, int, int],
  n_runs: int,
  batch_size: int = 0,
  with_gt: bool = True,
  cache_path: str = "none",
  timer: Callable[[Candidate], tuple[float, float]] | None = None,
) -> dict:
  """--batch_strategy=auto for one bucket: time every candidate (timer: injectable, default
  time_candidate on the bucket's shape), keep the fastest per image-step, cache it under
  choice_key. Returns the bucket's batch_strategy, batch_conv, batch_size and the timings."""
  h, w, _ = shape
  if batch_size:
    sizes = [batch_size]
  elif jax.default_backend() == "cpu":
    sizes = [1, *CPU_AUTO_BATCHES]
  else:
    net_m, cfg_m = dataclasses.replace(net_cfg, batch_conv="loop"), dataclasses.replace(cfg, batch_strategy="vmap")
    sizes = [1, min(MAX_AUTO_BATCH, auto_batch_size(net_m, cfg_m, h, w, n_runs, with_gt=with_gt))]
  cands = candidates(net_cfg, n_runs, sizes)
  if len(cands) == 1:  # nothing to choose (one run, or --batch_size and --batch_conv both set)
    return _chosen(cands[0], {})
  key = choice_key(net_cfg, cfg, shape, n_runs, batch_size, with_gt)
  path = cache_file(cache_path)
  cache = _read_cache(path)
  if key in cache:
    hit = dict(cache[key], from_cache=path)
    logging.info("batch choice for %s (cached in %s): %s", "x".join(map(str, shape)), path, hit["label"])
    return hit
  timer = timer or (lambda c: time_candidate(net_cfg, cfg, c, h, w, with_gt))
  timings, rate = {}, {}
  for c in cands:
    release_compiled_if_crowded()
    try:
      per_image_step, first = timer(c)
    except Exception as e:
      if not is_out_of_memory(e):
        raise
      logging.info("batch timing %s: out of memory", c.label)
      continue
    rate[c] = 1.0 / per_image_step
    timings[c.label] = {"image_steps_per_s": rate[c], "first_call_s": first}
    logging.info("batch timing %s: %.2f image-steps/s (first call %.1fs)", c.label, rate[c], first)
  best = max(rate, key=rate.get)
  chosen = _chosen(best, timings)
  logging.info("batch choice for %s: %s", "x".join(map(str, shape)), best.label)
  if path:
    try:
      os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
      outputs.write_json(path, dict(_read_cache(path), **{key: chosen}))
    except (OSError, OutputError) as e:  # checks.validate warned before any compute
      logging.info("could not write --batch_cache %s: %s", path, e)
  return chosen
