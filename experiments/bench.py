"""Fit-speed benchmark: ms/step, image-steps/s, FLOP/s and memory of the batched DIP step,
beside the PyTorch reference loop (one image at a time) on the same device in the same run.

python experiments/bench.py --flagfile=experiments/bench/cpu.flags
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from idip_jax import batching, config, fit, outputs  # noqa: E402
from idip_jax.config import FitConfig, NetConfig  # noqa: E402
from idip_jax.train import run_keys  # noqa: E402

F = flags.FLAGS
config.define_flags(F, config.ExperimentConfig)  # --out: results path (default experiments/results/bench_<backend>)
flags.DEFINE_list("sizes", ["64", "128", "256"], "square image sizes")
flags.DEFINE_list(
  "batches",
  ["1", "2", "4", "8", "12"],
  "runs per call of the first strategy and precision (the main sweep; stops at the first OOM)",
)
flags.DEFINE_list("other_batches", ["1", "8"], "runs per call of every other strategy x precision")
flags.DEFINE_list(
  "strategies",
  ["vmap"],
  "--batch_strategy values (vmap, map, unroll) and vmap_im2col (vmap with --conv=im2col: batched matmuls)",
)
flags.DEFINE_list("precisions", ["tf32"], "tf32 (JAX default f32), fp32 (Precision.HIGHEST), bf16")
flags.DEFINE_integer(
  "eval_batch",
  1,
  "also time this batch with the clean-input eval every step (its cost over a step without it); 0 = skip",
)
flags.DEFINE_integer("timed_steps", 5, "timed steps per repeat")
flags.DEFINE_integer("repeats", 3, "repeats; the median is reported")
flags.DEFINE_integer("torch_steps", 5, "timed steps of the PyTorch reference (0 = skip it)")
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


def official_net(cfg: FitConfig, conv: str = "auto") -> tuple[NetConfig, FitConfig]:
  """DIP's denoising net on gray images, resolved for this backend."""
  return fit.for_backend(NetConfig(out_channels=1, conv=conv), cfg, jax.default_backend())


STRATEGY_CONV = {"vmap_im2col": ("vmap", "im2col")}  # bench label -> (--batch_strategy, --conv)


def merge(paths: list[str], out: str) -> None:
  """One results file from several runs on the same device (a session's calls), FLOP counts
  recomputed with step_cost; each row keeps the commit and date of its run."""
  runs = [json.load(open(p)) for p in paths]
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


def bench_one(size: int, batch: int, precision: str, strategy: str, eval_every: int = 0) -> dict:
  """eval_every=0: the step alone (no ground truth); k: with the clean-input eval every k steps."""
  batch_strategy, conv = STRATEGY_CONV.get(strategy, (strategy, "auto"))
  net, cfg = official_net(
    FitConfig(precision=precision, batch_strategy=batch_strategy, eval_every=max(eval_every, 1), steps=10**6), conv
  )
  keys = [run_keys(0, k) for k in range(batch)]
  y = jax.random.uniform(jax.random.key(1), (batch, size, size, 1))
  b = fit.make_batch(net, cfg, keys, y, clean_NxHxWxC=y if eval_every else None)
  states, noise = fit.init_runs(net, cfg, keys, size, size)
  cost = step_cost(size, precision)
  chunk = fit.make_fit_chunk(net, cfg, F.timed_steps)
  t = time.perf_counter()
  states, m = chunk(states, b, noise, 0)  # warm-up (compiles)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t
  times = []
  for r in range(F.repeats):
    t = time.perf_counter()
    states, m = chunk(states, b, noise, (r + 1) * F.timed_steps)
    jax.block_until_ready(m)
    times.append((time.perf_counter() - t) / F.timed_steps)
  ms = 1000 * float(np.median(times))
  flops = float(cost.get("flops", 0.0)) * batch
  peak, _ = device_peak(precision)
  try:
    peak_bytes = batching.step_memory_bytes(net, cfg, batch, size, size, with_gt=False)
  except RuntimeError:  # no memory analysis on this backend
    peak_bytes = None
  return {
    "size": size,
    "batch": batch,
    "precision": precision,
    "strategy": strategy,
    "conv": net.conv,
    "eval_every": eval_every,
    "ms_per_step": ms,
    "ms_spread": 1000 * float(np.ptp(times)),
    "image_steps_per_s": 1000.0 * batch / ms,
    "flops_per_step": flops,
    "tflops": flops / (ms / 1000) / 1e12,
    "peak_fraction": flops / (ms / 1000) / peak,
    "bytes_per_step": float(cost.get("bytes accessed", 0.0)) * batch,
    "peak_memory_bytes": peak_bytes,
    "first_call_s": compile_s,
  }


def write_results(out: str, meta: dict, rows: list[dict]) -> None:
  outputs.write_json(out + ".json", dict(meta, rows=rows))
  fmt = lambda v, f: "-" if v is None else f % v
  with open(out + ".md", "w") as f:
    f.write(
      f"# Fit-speed benchmark ({meta['device']})\n\nCommit {meta['commit']}, {meta['date']}, jax "
      f"{meta['jax']}, torch {meta['torch']}. Official DIP net (2.2M params, gray), one Adam step "
      "incl. input noise, EMA and backtracking (eval: + the clean-input forward pass and metrics "
      f"every step); median of {meta['repeats']} x {meta['steps']} steps after warm-up. "
      "% peak: against the dense peak of the precision the convolutions run in "
      f"({meta['peak_source']}). PyTorch: the reference loop (experiments/torch_reference.py: "
      "official loop, host PSNR each step, cuDNN benchmark mode, TF32 convolutions as PyTorch's "
      "default), one image at a time, same device, same run.\n\n"
      "| size | strategy | conv | precision | batch | eval | ms/step | image-steps/s | TFLOP/s | % peak | "
      "peak MB | first call s | torch ms/step (1 img) | ratio vs torch |\n|" + "---|" * 14 + "\n"
    )
    for r in rows:
      f.write(
        f"| {r['size']} | {r['strategy']} | {r.get('conv', '-')} | {r['precision']} | {r['batch']} | "
        f"{'every step' if r['eval_every'] else '-'} | {r['ms_per_step']:.1f} | "
        f"{r['image_steps_per_s']:.2f} | {r['tflops']:.2f} | {100 * r['peak_fraction']:.1f} | "
        f"{fmt(r['peak_memory_bytes'] and r['peak_memory_bytes'] / 1e6, '%.0f')} | "
        f"{r['first_call_s']:.1f} | {fmt(r['torch_ms_per_step'], '%.1f')} | "
        f"{fmt(r['ratio_vs_torch'], '%.2f')} |\n"
      )


def main(_):
  if F.merge:
    merge(F.merge, F.out)
    return
  import importlib.util

  rows, torch_ms = [], {}
  have_torch = F.torch_steps > 0 and importlib.util.find_spec("torch") is not None
  if have_torch:
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from torch_reference import time_fit

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu":
      torch.set_num_threads(os.cpu_count() or 1)
    else:
      torch.backends.cudnn.benchmark = True  # as the official DIP code sets it
  kind = getattr(jax.devices()[0], "device_kind", "cpu").replace(" ", "_")
  peak_flops = {p: device_peak(p)[0] for p in F.precisions}
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
    "peak_flops": peak_flops,
    "peak_source": peak_src,
    "loop": official_net(FitConfig())[1].loop,
    "steps": F.timed_steps,
    "repeats": F.repeats,
  }
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  pairs = [(s, p) for s in F.strategies for p in F.precisions]
  for size in map(int, F.sizes):
    if have_torch:
      torch_ms[size] = time_fit(size, F.torch_steps, device=dev)
      print(f"torch size={size}: {torch_ms[size]:.1f} ms/step (one image)", flush=True)
    plan = [(s, p, b, 0) for i, (s, p) in enumerate(pairs) for b in map(int, F.batches if i == 0 else F.other_batches)]
    if F.eval_batch:
      plan.append((*pairs[0], F.eval_batch, 1))
    oom = set()
    for strategy, precision, batch, eval_every in plan:
      if any(o[:2] == (strategy, precision) and batch >= o[2] for o in oom):
        continue
      try:
        r = bench_one(size, batch, precision, strategy, eval_every)
      except Exception as e:  # out of memory ends this strategy x precision's batch sweep
        if batching.is_out_of_memory(e):
          print(f"size={size} {strategy} {precision} batch={batch}: out of memory", flush=True)
          oom.add((strategy, precision, batch))
          continue
        raise
      r["torch_ms_per_step"] = torch_ms.get(size)
      r["ratio_vs_torch"] = (r["image_steps_per_s"] / (1000.0 / torch_ms[size])) if size in torch_ms else None
      rows.append(r)
      print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
      write_results(out, meta, rows)  # incremental: a run cut short keeps its rows
  write_results(out, meta, rows)
  print("wrote", out + ".md")


if __name__ == "__main__":
  app.run(main)
