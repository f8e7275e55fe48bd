"""--batch_strategy=auto: how one bucket's calls fit their runs (one run per call, or vmap with a lowering
of its convolutions at a batch size), chosen so that the choice pays for itself.

A first run used to time every candidate (a compile each) before fitting: 110 s of timing on a 4-image,
200-step, 64 px job that fits in ~90 s. Now:
- the backend's default (from the benchmark, STORED) is the choice unless the job is long enough: the
  fit's expected seconds come from the stored rate scaled to the bucket's pixels and the net's width, and
  timing is allowed TIMING_BUDGET of them; a job too short to repay one candidate's compile times nothing;
- within the budget the default is timed first, then the other candidates one at a time while the
  measured cost plus the next one's estimate fits; a candidate clearly behind after its first repeat is
  dropped, the rest are timed again, interleaved, and the best median wins (single short timings on a
  2-core CPU are noise-bound);
- the log and config.json say what was chosen, why, and how many seconds choosing took.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
from absl import logging

from idip_jax import batching, convs, outputs
from idip_jax.config import FitConfig, NetConfig
from idip_jax.data import OutputError
from idip_jax.fit import init_runs, make_batch, make_fit_chunk
from idip_jax.train import run_keys

# Lowerings timed per batch size (convs.per_run_conv; "grouped", the control, is 2-3x slower per image on
# CPU and H100: bench_{cpu,gpu}.md) and the batch sizes tried on CPU: a 2-core CPU gains nothing from more
# parallel runs, only from fewer, larger ops (experiments/results/bench_cpu.md).
AUTO_LOWERINGS = ("loop", "im2col", "hybrid")
CPU_AUTO_BATCHES = (2, 4)
MAX_AUTO_BATCH = 16  # accelerators: the memory-based size, at most this
# The CPU default: vmap:loop at 4 runs per call, 1.09 / 1.12 / 1.06x one run per call per image at 64 / 128 /
# 256 px in experiments/results/bench_cpu.md (the steadiest row; im2col x4 was 1.28x at 256 px but 1.03-1.04x
# below); a 4-image 64 px job ran 88 s with it, 111 s one run per call.
CPU_DEFAULT_BATCH = 4
TIMING_STEPS = 2  # timed steps per repeat, after one warm-up chunk that compiles
TIMING_REPEATS = 2  # repeats of a candidate still in the race after its first
TIMING_BUDGET = 0.03  # the share of the fit's expected seconds that choosing may cost
DROP_BELOW = 0.85  # after its first repeat, a candidate under this share of the best rate is dropped


@dataclasses.dataclass(frozen=True)
class Speed:
  """A device kind's measured speed for the official net (width 128), one run per call."""

  side: int  # image side of the measurement
  image_steps_per_s: float
  candidate_s: float  # one candidate's timing: compiling its step and eval, warm-up, timed steps


# By device kind (a substring of jax's device_kind; "cpu" for XLA:CPU): CPU 64 px 15.9 image-steps/s, a fit's own
# rate one run per call at the default precision (experiments/results/time_to_psnr/holdout9_s25_64.json, DIP:
# 0.063 s per step; bench_cpu.md's 5.17 is at Precision.HIGHEST), compile_time.md: step 5.7 s + eval 1.9 s to
# compile cold; bench_gpu.md (H100 256 px: 4.9 ms per step; the GPU's compiles take 12-40 s per candidate).
# Other devices: the default is timed to learn the rate.
STORED = types.MappingProxyType(
  {"cpu": Speed(64, 15.9, 8.0), "H100": Speed(256, 204.0, 20.0), "H200": Speed(256, 204.0, 20.0)}
)


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


def stored_speed() -> Speed | None:
  d = jax.devices()[0]
  kind = "cpu" if d.platform == "cpu" else getattr(d, "device_kind", "")
  return next((v for k, v in STORED.items() if k in kind), None)


def expected_seconds(net_cfg: NetConfig, cfg: FitConfig, shape, n_runs: int, speed: Speed) -> float:
  """The fit's seconds at the stored rate, scaled to the bucket's pixels and (as the convolutions' FLOPs) to
  the square of the net's width."""
  h, w, _ = shape
  rate = speed.image_steps_per_s * (speed.side**2 / (h * w)) * (128 / net_cfg.width) ** 2
  return n_runs * cfg.steps / rate


def time_candidate(
  net_cfg: NetConfig, cfg: FitConfig, c: Candidate, height: int, width: int, with_gt: bool, repeats: int = 1
) -> tuple[list[float], float]:
  """(seconds per image-step of each repeat, seconds of the first call) of candidate c on the bucket's shape:
  the fit's own chunk program on made-up images (so the winner's compile is reused on CPU's host loop), each
  repeat TIMING_STEPS steps after a warm-up chunk (which compiles, the first time)."""
  net_c = dataclasses.replace(net_cfg, batch_conv=c.batch_conv)
  # The bucket's own configs (steps included), so that on a host loop the winner's compiled step is
  # the one its fit then runs (fit._host_programs is cached on them).
  cfg_c = dataclasses.replace(cfg, batch_strategy=c.strategy)
  n_dev = jax.local_device_count() if cfg.shard and c.batch % jax.local_device_count() == 0 else 1
  keys = [run_keys(0, k) for k in range(c.batch)]
  x = jax.random.uniform(jax.random.key(1), (c.batch, height, width, net_cfg.out_channels))
  f = cfg.sr_factor if cfg.task == "sr" else 1  # super-resolution's y is low-resolution
  y = x[:, ::f, ::f]
  batch = make_batch(
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
  for r in range(repeats):
    t = time.perf_counter()
    states, m = chunk(states, batch, noise, (r + 1) * TIMING_STEPS)
    jax.block_until_ready(m)
    times.append((time.perf_counter() - t) / (TIMING_STEPS * c.batch))
  return times, first


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


def _chosen(c: Candidate, timings: dict, why: str, seconds: float) -> dict:
  return {
    "batch_strategy": c.strategy,
    "batch_conv": c.batch_conv,
    "batch_size": c.batch,
    "label": c.label,
    "why": why,
    "choosing_s": round(seconds, 3),
    "timings": timings,
    "device": outputs.device_name(),
    "jax": jax.__version__,
    "date": outputs.now(),
  }


def default_candidate(net_cfg: NetConfig, cfg: FitConfig, shape, n_runs: int, batch_size: int, with_gt: bool):
  """The backend's measured default: vmap with convs.DEFAULT_BATCH_CONV (or the explicit --batch_conv) at
  --batch_size, else CPU_DEFAULT_BATCH runs per call on CPU and the memory-based size on accelerators."""
  backend = jax.default_backend()
  lowering = convs.DEFAULT_BATCH_CONV.get(backend, "loop") if net_cfg.batch_conv == "auto" else net_cfg.batch_conv
  if batch_size:
    size = batch_size
  elif backend == "cpu":
    size = CPU_DEFAULT_BATCH
  else:
    net_m, cfg_m = dataclasses.replace(net_cfg, batch_conv="loop"), dataclasses.replace(cfg, batch_strategy="vmap")
    size = min(MAX_AUTO_BATCH, batching.auto_batch_size(net_m, cfg_m, shape[0], shape[1], n_runs, with_gt=with_gt))
  size = min(size, n_runs)
  single = AUTO_LOWERINGS[0] if net_cfg.batch_conv == "auto" else net_cfg.batch_conv  # as candidates() names it
  return Candidate("vmap", lowering if size > 1 else single, size)


def _median(xs: list[float]) -> float:
  return sorted(xs)[len(xs) // 2]


def choose(
  net_cfg: NetConfig,
  cfg: FitConfig,
  shape: tuple[int, int, int],
  n_runs: int,
  batch_size: int = 0,
  with_gt: bool = True,
  cache_path: str = "none",
  timer: Callable[[Candidate, int], tuple[list[float], float]] | None = None,
  clock: Callable[[], float] = time.perf_counter,
  speed: Speed | None | str = "stored",
) -> dict:
  """--batch_strategy=auto for one bucket (module docstring): the bucket's batch_strategy, batch_conv and
  batch_size, the timings, why and how long choosing took. timer(c, repeats) -> (seconds per image-step of
  each repeat, first call's seconds), default time_candidate on the bucket's shape; clock and speed (STORED's
  entry for this device; None: not known) are injectable for tests."""
  start = clock()
  h, w, _ = shape
  if batch_size:
    sizes = [batch_size]
  elif jax.default_backend() == "cpu":
    sizes = [1, *CPU_AUTO_BATCHES]
  else:
    sizes = [1, default_candidate(net_cfg, cfg, shape, n_runs, 0, with_gt).batch]
  cands = candidates(net_cfg, n_runs, sizes)
  default = default_candidate(net_cfg, cfg, shape, n_runs, batch_size, with_gt)
  cands = [default] + [c for c in cands if c != default]
  what = "x".join(map(str, shape))
  if len(cands) == 1:  # nothing to choose (one run, or --batch_size and --batch_conv both set)
    return _chosen(default, {}, "the only candidate", clock() - start)
  key = choice_key(net_cfg, cfg, shape, n_runs, batch_size, with_gt)
  path = cache_file(cache_path)
  cache = _read_cache(path)
  if key in cache:
    hit = dict(cache[key], from_cache=path, why=f"timed before (cached in {path})")
    logging.info("batch choice for %s (cached in %s): %s", what, path, hit["label"])
    return hit
  speed = stored_speed() if speed == "stored" else speed
  if speed is not None:
    expected = expected_seconds(net_cfg, cfg, shape, n_runs, speed)
    if TIMING_BUDGET * expected < speed.candidate_s:
      why = (
        f"the backend's default: the fit is expected to take ~{expected:.0f} s, too short to repay timing another "
        f"candidate (~{speed.candidate_s:.0f} s each; the budget is {TIMING_BUDGET:.0%} of the fit)"
      )
      logging.info("batch choice for %s: %s (%s)", what, default.label, why)
      return _chosen(default, {}, why, clock() - start)
  timer = timer or (lambda c, repeats: time_candidate(net_cfg, cfg, c, h, w, with_gt, repeats))
  rates: dict[Candidate, list[float]] = {}  # image-steps/s of each repeat
  timings: dict[str, dict] = {}
  # Per candidate, from its first timing: the seconds it took (compile, warm-up, a repeat), its first call's.
  cost, first_call = {}, {}

  def measure(c: Candidate, repeats: int) -> None:
    t = clock()
    batching.release_compiled_if_crowded()
    try:
      per_image_step, first = timer(c, repeats)
    except Exception as e:
      if not batching.is_out_of_memory(e):
        raise
      logging.info("batch timing %s: out of memory", c.label)
      rates.setdefault(c, [])  # an empty list: out of the race
      return
    rates.setdefault(c, []).extend(1.0 / s for s in per_image_step)
    cost.setdefault(c, clock() - t)
    first_call.setdefault(c, first)
    rate = _median(rates[c])
    timings[c.label] = {"image_steps_per_s": rate, "first_call_s": first_call[c], "repeats": len(rates[c])}
    logging.info("batch timing %s: %.2f image-steps/s (%d repeats)", c.label, rate, len(rates[c]))

  measure(default, 1)
  if not rates[default]:  # the default itself ran out of memory: one run per call, untimed
    single = next((c for c in cands if c.batch == 1), Candidate("vmap", default.batch_conv, 1))
    return _chosen(single, timings, f"{default.label} ran out of memory", clock() - start)
  budget = TIMING_BUDGET * n_runs * cfg.steps / rates[default][0]
  best = lambda: max(rates[c][0] for c in rates if rates[c])
  skipped = []
  for c in cands[1:]:
    spent, estimate = clock() - start, max(cost.values())
    if spent + estimate > budget:
      skipped.append(c.label)
      continue
    measure(c, 1)
  racing = [c for c in rates if rates[c] and rates[c][0] >= DROP_BELOW * best()]
  dropped = [c.label for c in rates if rates[c] and c not in racing]
  for _ in range(TIMING_REPEATS if len(racing) > 1 else 0):
    if clock() - start + len(racing) * min(cost.values()) > budget:  # a round's cost, at most its first timings'
      break
    for c in racing:  # interleaved: a slow spell of the machine hits every candidate alike
      measure(c, 1)
  chosen = max(racing, key=lambda c: _median(rates[c]))
  why = f"fastest median of {len(racing)} timed" + (f"; dropped early: {', '.join(dropped)}" if dropped else "")
  why += f"; not timed (budget {budget:.0f} s): {', '.join(skipped)}" if skipped else ""
  result = _chosen(chosen, timings, why, clock() - start)
  logging.info("batch choice for %s: %s (%s; choosing took %.1f s)", what, chosen.label, why, clock() - start)
  if path and not skipped:  # a choice made with every candidate timed is one to keep
    try:
      os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
      outputs.write_json(path, dict(_read_cache(path), **{key: result}))
    except (OSError, OutputError) as e:  # checks.validate warned before any compute
      logging.info("could not write --batch_cache %s: %s", path, e)
  return result
