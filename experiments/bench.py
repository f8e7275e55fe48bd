"""Fit-speed benchmark: ms/step, image-steps/s, FLOP/s and memory of the batched DIP step,
beside the PyTorch reference loop (one image at a time) on the same device in the same run.

python experiments/bench.py --flagfile=experiments/bench/cpu.flags
"""

from __future__ import annotations

import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments.harness import report
from idip_jax import batching, cli, config, fit, outputs
from idip_jax.config import FitConfig, NetConfig
from idip_jax.data import InputError
from idip_jax.train import run_keys

F = flags.FLAGS
config.define_flags(F, config.ExperimentConfig)  # --out: results path (default experiments/results/bench_<backend>)
flags.DEFINE_list("sizes", ["64", "128", "256"], "square image sizes")
flags.DEFINE_list(
  "batches", ["1", "2", "4"], "runs per call (1 = one run per call; a lowering's sweep stops at its first OOM)"
)
flags.DEFINE_list(
  "fastest_precisions", [], "precisions also timed for the fastest batched row of each size (e.g. bf16)"
)
flags.DEFINE_list("precisions", ["tf32"], "tf32 (JAX default f32), fp32 (Precision.HIGHEST), bf16: every row's")
flags.DEFINE_integer(
  "eval_batch",
  1,
  "also time this batch with the clean-input eval every step (its cost over a step without it); 0 = skip",
  lower_bound=0,
  upper_bound=4096,
)
flags.DEFINE_integer("timed_steps", 5, "timed steps per repeat", lower_bound=1, upper_bound=10000)
flags.DEFINE_bool(
  "memory_analysis", True, "each row's device memory from XLA's analysis of its step (one more compile)"
)
flags.DEFINE_integer("repeats", 3, "repeats; the median is reported", lower_bound=1, upper_bound=1000)
flags.DEFINE_integer(
  "torch_steps", 5, "timed steps of the PyTorch reference (0 = skip it)", lower_bound=0, upper_bound=10000
)
flags.DEFINE_list("merge", [], "instead of running: merge these results .json files into --out")

# Dense peak FLOP/s by device kind and the precision the convolutions run in (NVIDIA datasheets,
# SXM parts): tf32 and bf16 on tensor cores, fp32 (Precision.HIGHEST) on the CUDA cores.
PEAK = {
  "H100": {"tf32": 495e12, "fp32": 67e12, "bf16": 989e12},
  "H200": {"tf32": 495e12, "fp32": 67e12, "bf16": 989e12},
}


def device_peak(precision: str) -> tuple[float, str]:
  kind = getattr(jax.devices()[0], "device_kind", "")
  for k, v in PEAK.items():
    if k in kind:
      return v[precision], f"{k} datasheet"
  # CPU: measured large fp32 matmul rate stands in for the peak.
  a = jnp.ones((2048, 2048), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  t = time.perf_counter()
  for _ in range(5):
    f(a).block_until_ready()
  return 2 * 2048**3 * 5 / (time.perf_counter() - t), "measured 2048^3 fp32 matmul"


def step_cost(size: int, precision: str) -> dict:
  """XLA's cost analysis of one run's step before compilation, backend-independent: the GPU
  compiler's analysis counts cuDNN convolutions (custom calls) as 0 FLOPs (it reported 4.9 of
  124.8 GFLOP at 256 px on the H100). A row's FLOPs are this times its runs (a lax.map loop
  body would be counted once, not once per run)."""
  net, cfg = official_net(FitConfig(precision=precision))
  cost = batching.lower_step(net, cfg, 1, size, size, with_gt=False).cost_analysis()
  return cost[0] if isinstance(cost, list) else cost


def official_net(cfg: FitConfig, batch_conv: str = "auto", hybrid_side: int = 32) -> tuple[NetConfig, FitConfig]:
  """DIP's denoising net on gray images, resolved for this backend."""
  net = NetConfig(out_channels=1, batch_conv=batch_conv, hybrid_side=hybrid_side)
  return fit.for_backend(net, cfg, jax.default_backend())


def row_config(lowering: str, precision: str, eval_every: int) -> tuple[NetConfig, FitConfig]:
  """A row's configs: a --batch_conv lowering under vmap, or another --batch_strategy (map, unroll)."""
  strategy, batch_conv = (lowering, "auto") if lowering in ("map", "unroll") else ("vmap", lowering)
  fit_cfg = FitConfig(precision=precision, batch_strategy=strategy, eval_every=max(eval_every, 1), steps=10**6)
  return official_net(fit_cfg, batch_conv)


def merge(paths: list[str], out: str) -> None:
  """One results file from several runs on the same device (a session's calls), FLOP counts
  recomputed with step_cost; each row keeps the commit and date of its run."""
  runs = [outputs.read_json(p) for p in paths]
  rows = []
  for run in runs:
    for r in run["rows"]:
      flops = float(step_cost(r["size"], r["precision"])["flops"]) * r["batch"]
      peak = run["peak_flops"][r["precision"]]
      rows.append(
        dict(
          r,
          flops_per_step=flops,
          tflops=flops / (r["ms_per_step"] / 1000) / 1e12,
          peak_fraction=flops / (r["ms_per_step"] / 1000) / peak,
          commit=run["commit"],
          date=run["date"],
        )
      )
  meta = {k: v for k, v in runs[0].items() if k != "rows"}
  meta.update(
    commit=", ".join(dict.fromkeys(r["commit"] for r in runs)),
    date=", ".join(r["date"] for r in runs),
    merged_from=paths,
    peak_flops={k: v for r in runs for k, v in r["peak_flops"].items()},
  )
  write_results(out, meta, rows)


def prepare(size: int, batch: int, precision: str, lowering: str, eval_every: int = 0) -> dict:
  """A row ready to time: its configs, states and chunk, compiled by one warm-up chunk.
  eval_every=0: the step alone (no ground truth); k: with the clean-input eval every k steps."""
  net, cfg = row_config(lowering, precision, eval_every)
  keys = [run_keys(0, k) for k in range(batch)]
  y = jax.random.uniform(jax.random.key(1), (batch, size, size, 1))
  b = fit.make_batch(net, cfg, keys, y, clean_NxHxWxC=y if eval_every else None)
  states, noise = fit.init_runs(net, cfg, keys, size, size)
  chunk = fit.make_fit_chunk(net, cfg, F.timed_steps)
  t = time.perf_counter()
  states, m = chunk(states, b, noise, 0)  # warm-up (compiles)
  jax.block_until_ready(m)
  row = dict(size=size, batch=batch, precision=precision, lowering=lowering, eval_every=eval_every)
  return dict(
    row, net=net, cfg=cfg, chunk=chunk, states=states, b=b, noise=noise, first=time.perf_counter() - t, times=[]
  )


def time_once(p: dict, r: int) -> None:
  t = time.perf_counter()
  p["states"], m = p["chunk"](p["states"], p["b"], p["noise"], (r + 1) * F.timed_steps)
  jax.block_until_ready(m)
  p["times"].append((time.perf_counter() - t) / F.timed_steps)


def result_row(p: dict) -> dict:
  size, batch, precision, net, cfg = p["size"], p["batch"], p["precision"], p["net"], p["cfg"]
  ms = 1000 * float(np.median(p["times"]))
  cost = step_cost(size, precision)
  flops = float(cost.get("flops", 0.0)) * batch
  peak, _ = device_peak(precision)
  peak_bytes = None
  if F.memory_analysis:
    try:
      peak_bytes = batching.step_memory_bytes(net, cfg, batch, size, size, with_gt=bool(p["eval_every"]))
    except RuntimeError:  # no memory analysis on this backend
      pass
  return {
    "size": size,
    "batch": batch,
    "precision": precision,
    "lowering": "one run per call" if batch == 1 else p["lowering"],
    "strategy": cfg.batch_strategy,
    "conv": net.conv,
    "batch_conv": net.batch_conv,
    "eval_every": p["eval_every"],
    "ms_per_step": ms,
    "ms_spread": 1000 * float(np.ptp(p["times"])),
    "image_steps_per_s": 1000.0 * batch / ms,
    "flops_per_step": flops,
    "tflops": flops / (ms / 1000) / 1e12,
    "peak_fraction": flops / (ms / 1000) / peak,
    "bytes_per_step": float(cost.get("bytes accessed", 0.0)) * batch,
    "peak_memory_bytes": peak_bytes,
    "first_call_s": p["first"],  # compile + one chunk of steps
    "compile_s": max(0.0, p["first"] - F.timed_steps * ms / 1000),
  }


def with_ratios(rows: list[dict]) -> list[dict]:
  """ratio_vs_batch1: a row's image-steps/s over that of the one-run-per-call row timed in the same
  group (interleaved with it), or else at the same size and precision."""
  base = {}
  for r in rows:
    if r["batch"] == 1 and not r["eval_every"]:
      base.setdefault((r["size"], r["precision"], r.get("group")), r["image_steps_per_s"])
      base.setdefault((r["size"], r["precision"], None), r["image_steps_per_s"])
  out = []
  for r in rows:
    ref = base.get((r["size"], r["precision"], r.get("group"))) or base.get((r["size"], r["precision"], None))
    out.append(dict(r, ratio_vs_batch1=r["image_steps_per_s"] / ref if ref else None))
  return out


def write_results(out: str, meta: dict, rows: list[dict]) -> None:
  doc = dict(meta, rows=with_ratios(rows))
  outputs.write_table(os.path.dirname(out) or ".", os.path.basename(out), doc, report.bench_markdown(doc))


def run_group(
  size: int, plan: list[tuple[str, str, int, int]], torch_ms: dict, rows: list, out: str, meta: dict
) -> None:
  """Times the (lowering, precision, batch, eval_every) rows of plan interleaved: every row compiles
  first, then each repeat times every row once, so a slow spell of a noisy machine hits all rows
  alike. A row that runs out of memory is dropped. Results are written after the group."""
  group = len({(r["size"], r.get("group")) for r in rows}) + 1
  preps = []
  for lowering, precision, batch, eval_every in plan:
    try:
      preps.append(prepare(size, batch, precision, lowering, eval_every))
    except Exception as e:
      if not batching.is_out_of_memory(e):
        raise
      print(f"size={size} {lowering} {precision} batch={batch}: out of memory", flush=True)
  for r in range(F.repeats):
    for p in preps:
      time_once(p, r)
  for p in preps:
    r = dict(result_row(p), group=group, commit=meta["commit"], date=meta["date"], device=meta["device"])
    r["torch_ms_per_step"] = torch_ms.get(size)
    r["ratio_vs_torch"] = (r["image_steps_per_s"] / (1000.0 / torch_ms[size])) if size in torch_ms else None
    rows.append(r)
    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
  del preps
  write_results(out, meta, rows)  # incremental: a run cut short keeps its groups


def counts(name: str, items: list[str], lo: int) -> list[int]:
  """A list flag of integers, each >= lo; one line for anything else."""
  if not items:
    raise InputError(f"--{name} is empty")
  for v in items:
    if not v.strip().isdigit() or int(v) < lo:
      raise InputError(f"--{name}={v}: give integers >= {lo}")
  return [int(v) for v in items]


def check_flags() -> tuple[list[int], list[int]]:
  """Every flag, before anything is timed or written: (sizes, batches)."""
  config.check(config.from_flags(F, config.ExperimentConfig))  # --lowerings' names
  sizes, batches = counts("sizes", F.sizes, 1), counts("batches", F.batches, 1)
  side = 2 ** NetConfig().scales  # the official net: 5 scales, the deepest map at least 2 px (data.padded_size)
  for size in sizes:
    if size % side or size < 2 * side:
      raise InputError(f"--sizes={size}: the official net needs a multiple of {side} px, at least {2 * side}")
  for name in ("precisions", "fastest_precisions"):
    for p in getattr(F, name):
      if p not in config.PRECISIONS:
        raise InputError(f"unknown --{name}={p}; choose one of {', '.join(config.PRECISIONS)}")
  for path in F.merge:
    if not os.path.isfile(path):
      raise InputError(f"--merge: no results file {path}")
  if F.out and os.path.isdir(F.out):
    raise InputError(f"--out={F.out} is a folder: give the results path without extension")
  return sizes, batches


def plan_groups(sizes: list[int], batches: list[int]) -> list[tuple[int, list[tuple[str, str, int, int]]]]:
  """(size, rows timed together) of every group main times, in order (the --fastest_precisions groups,
  which depend on the timings, excluded)."""
  groups = []
  for size in sizes:
    for p in F.precisions:
      for b in [b for b in batches if b > 1] or [1]:
        groups.append((size, [(F.lowerings[0], p, 1, 0)] + ([(lw, p, b, 0) for lw in F.lowerings] if b > 1 else [])))
    if F.eval_batch:
      groups.append((size, [(F.lowerings[0], F.precisions[0], F.eval_batch, e) for e in (0, 1)]))
  return groups


def main(_):
  sizes, batches = check_flags()
  if F.dry_run:
    for size, plan in plan_groups(sizes, batches):
      print(f"size {size}: " + ", ".join(f"{lw} {p} batch {b}" + (" with eval" if e else "") for lw, p, b, e in plan))
    return
  if F.merge:
    merge(F.merge, F.out)
    return
  import importlib.util

  rows, torch_ms = [], {}
  have_torch = F.torch_steps > 0 and importlib.util.find_spec("torch") is not None
  if have_torch:
    import torch

    from experiments.speed.torch_reference import time_fit

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
      torch.set_num_threads(os.cpu_count() or 1)
    else:
      torch.backends.cudnn.benchmark = True  # as the official DIP code sets it
  kind = getattr(jax.devices()[0], "device_kind", "cpu").replace(" ", "_")
  precisions = list(dict.fromkeys(F.precisions + F.fastest_precisions))
  out = F.out or os.path.join("experiments", "results", f"bench_{jax.default_backend()}")
  _, peak_src = device_peak("fp32")
  meta = {
    "device": outputs.device_name(),
    "device_kind": kind,
    "commit": outputs.git_commit(),
    "date": outputs.now(),
    "jax": jax.__version__,
    "python": platform.python_version(),
    "torch": (__import__("torch").__version__ if have_torch else None),
    "peak_flops": {p: device_peak(p)[0] for p in precisions},
    "peak_source": peak_src,
    "loop": official_net(FitConfig())[1].loop,
    "steps": F.timed_steps,
    "repeats": F.repeats,
    "hybrid_side": NetConfig().hybrid_side,
    "command": " ".join(sys.argv),
  }
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  groups = plan_groups(sizes, batches)
  for size in sizes:
    if have_torch:
      torch_ms[size] = time_fit(size, F.torch_steps, device=dev)
      print(f"torch size={size}: {torch_ms[size]:.1f} ms/step (one image)", flush=True)
    # One group per precision and batch size: one run per call beside every lowering at that batch.
    for _, plan in [g for g in groups if g[0] == size]:
      run_group(size, plan, torch_ms, rows, out, meta)
    batched = [r for r in rows if r["size"] == size and r["batch"] > 1 and not r["eval_every"]]
    if F.fastest_precisions and batched:
      best = max(batched, key=lambda r: r["image_steps_per_s"])
      for p in F.fastest_precisions:
        run_group(
          size, [(best["lowering"], p, 1, 0), (best["lowering"], p, best["batch"], 0)], torch_ms, rows, out, meta
        )
  write_results(out, meta, rows)
  print("wrote", out + ".md")


def entry(argv: list[str] | None = None) -> int:
  return cli.run_script(main, __doc__, F, argv)


if __name__ == "__main__":
  sys.exit(entry())
