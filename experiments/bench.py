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
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from idip_jax import fit, outputs  # noqa: E402
from idip_jax.models import NetConfig  # noqa: E402

F = flags.FLAGS
flags.DEFINE_list("sizes", ["64", "128", "256"], "square image sizes")
flags.DEFINE_list("batches", ["1", "2", "4", "8", "12"], "runs per vmapped call (stops at the first OOM)")
flags.DEFINE_list("precisions", ["fp32"], "fp32, bf16")
flags.DEFINE_integer("steps", 5, "timed steps per repeat")
flags.DEFINE_integer("repeats", 3, "repeats; the median is reported")
flags.DEFINE_integer("torch_steps", 5, "timed steps of the PyTorch reference (0 = skip it)")
flags.DEFINE_string("out", "", "results path without extension (default experiments/results/bench_<device>)")

# Dense peak FLOP/s by device kind (vendor datasheets, SXM parts): fp32 non-tensor, bf16 tensor.
PEAK = {"H100": {"fp32": 67e12, "bf16": 989e12}, "H200": {"fp32": 67e12, "bf16": 989e12}}


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
  return 2 * 2048 ** 3 * 5 / (time.perf_counter() - t), "measured 2048^3 fp32 matmul"


def bench_one(size: int, batch: int, precision: str) -> dict:
  net = NetConfig(out_channels=1)
  cfg = fit.FitConfig(precision=precision)
  keys = [fit.run_keys(0, k) for k in range(batch)]
  y = jax.random.uniform(jax.random.key(1), (batch, size, size, 1))
  b = fit.Batch(input_HxWxC=fit.make_inputs(net, cfg, keys, None, size, size, False), y_HxWxC=y,
                prelim_HxWxC=y, mask_HxWx1=jnp.ones((batch, size, size, 1)), gt_HxWxC=None)
  states = fit.init_states(net, cfg, jnp.stack([k["init"] for k in keys]), size, size)
  noise = jnp.stack([k["noise"] for k in keys])
  cost = fit.compile_step(net, cfg, batch, size, size, with_gt=False).cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  chunk = fit.make_fit_chunk(net, cfg, F.steps, fit.resolve_loop("auto"))
  states, m = chunk(states, b, noise)  # warm-up (compiles)
  jax.block_until_ready(m)
  times = []
  for _ in range(F.repeats):
    t = time.perf_counter()
    states, m = chunk(states, b, noise)
    jax.block_until_ready(m)
    times.append((time.perf_counter() - t) / F.steps)
  ms = 1000 * float(np.median(times))
  flops = float(cost.get("flops", 0.0))
  peak, _ = device_peak(precision)
  try:
    peak_bytes = fit.step_memory_bytes(net, cfg, batch, size, size, with_gt=False)
  except RuntimeError:  # no memory analysis on this backend
    peak_bytes = None
  return {"size": size, "batch": batch, "precision": precision, "ms_per_step": ms,
          "image_steps_per_s": 1000.0 * batch / ms, "flops_per_step": flops,
          "tflops": flops / (ms / 1000) / 1e12, "peak_fraction": flops / (ms / 1000) / peak,
          "bytes_per_step": float(cost.get("bytes accessed", 0.0)), "peak_memory_bytes": peak_bytes}


def main(_):
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
  for size in map(int, F.sizes):
    if have_torch:
      torch_ms[size] = time_fit(size, F.torch_steps, device=dev)
      print(f"torch size={size}: {torch_ms[size]:.1f} ms/step (one image)", flush=True)
    for precision in F.precisions:
      for batch in map(int, F.batches):
        try:
          r = bench_one(size, batch, precision)
        except Exception as e:  # out of memory ends this size's batch sweep
          if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
            print(f"size={size} batch={batch}: out of memory", flush=True)
            break
          raise
        r["torch_ms_per_step"] = torch_ms.get(size)
        r["ratio_vs_torch"] = (r["image_steps_per_s"] / (1000.0 / torch_ms[size])) if size in torch_ms else None
        rows.append(r)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
  peak, peak_src = device_peak("fp32")
  kind = getattr(jax.devices()[0], "device_kind", "cpu").replace(" ", "_")
  out = F.out or os.path.join("experiments", "results", f"bench_{jax.default_backend()}")
  meta = {"device": outputs.device_name(), "device_kind": kind, "commit": outputs.git_commit(),
          "date": outputs.now(), "jax": jax.__version__, "python": platform.python_version(),
          "torch": (__import__("torch").__version__ if have_torch else None),
          "peak_fp32_flops": peak, "peak_source": peak_src, "loop": fit.resolve_loop("auto"),
          "steps": F.steps, "repeats": F.repeats}
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  outputs.write_json(out + ".json", dict(meta, rows=rows))
  with open(out + ".md", "w") as f:
    f.write(f"# Fit-speed benchmark ({meta['device']})\n\nCommit {meta['commit']}, {meta['date']}, jax "
            f"{meta['jax']}, torch {meta['torch']}. Official DIP net (2.2M params, gray), one Adam step "
            f"incl. input noise, EMA and backtracking; median of {F.repeats} x {F.steps} steps after "
            f"warm-up. Peak: {peak / 1e12:.2f} TFLOP/s ({peak_src}). PyTorch: the reference loop "
            "(experiments/torch_reference.py), one image at a time, same device, same run.\n\n"
            "| size | batch | precision | ms/step | image-steps/s | TFLOP/s | % peak | MB moved/step | "
            "peak MB | torch ms/step (1 img) | ratio vs torch |\n|" + "---|" * 11 + "\n")
    for r in rows:
      f.write(f"| {r['size']} | {r['batch']} | {r['precision']} | {r['ms_per_step']:.1f} | "
              f"{r['image_steps_per_s']:.2f} | {r['tflops']:.3f} | {100 * r['peak_fraction']:.1f} | "
              f"{r['bytes_per_step'] / 1e6:.0f} | "
              f"{'-' if r['peak_memory_bytes'] is None else '%.0f' % (r['peak_memory_bytes'] / 1e6)} | "
              f"{'-' if r['torch_ms_per_step'] is None else '%.1f' % r['torch_ms_per_step']} | "
              f"{'-' if r['ratio_vs_torch'] is None else '%.2f' % r['ratio_vs_torch']} |\n")
  print("wrote", out + ".md")


if __name__ == "__main__":
  app.run(main)
