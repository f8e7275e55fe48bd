"""CPU probes behind the README's Speed notes; run one at a time on an idle machine.

--probe=step: one fit step of the official gray net, batch 1, as a host loop and inside lax.scan;
  run it under different XLA_FLAGS to compare them, e.g.
  XLA_FLAGS=--xla_cpu_use_onednn=true python experiments/speed/cpu_probes.py --probe=step --probe_size=64
  XLA_FLAGS=--xla_cpu_multi_thread_eigen=false python experiments/speed/cpu_probes.py --probe=step \
    --probe_size=128 --noprobe_scan
  (two processes, one core each: prefix two such commands with `taskset -c 0` and `taskset -c 1`
  and start them together; --probe_runs=N vmaps N runs per call, as a batch inside each process)
--probe=conv: forward+backward of one 3x3 128->128 convolution with per-run weights under vmap,
  batch 1/2/4, with each --batch_conv lowering (convs.per_run_conv; grouped = plain vmap).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from idip_jax import convs, fit, train
from idip_jax.config import FitConfig, NetConfig

F = flags.FLAGS
flags.DEFINE_enum("probe", "step", ["step", "conv"], "what to time")
flags.DEFINE_integer("probe_size", 64, "square image size")
flags.DEFINE_string("probe_conv", "cpu", "--conv of the step probe: lax | cpu | im2col")
flags.DEFINE_bool("probe_scan", True, "step probe: also time the step inside lax.scan")
flags.DEFINE_integer("probe_runs", 1, "step probe: runs per call (vmap, loop)", lower_bound=1, upper_bound=16)


def median_ms(f, *args, n: int = 3) -> float:
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(n):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t)
  return 1000 * float(np.median(times))


def step_ms(size: int, conv: str, loop: str, runs: int = 1) -> float:
  """Milliseconds per step of `runs` runs vmapped in one call (batch_conv loop when runs > 1)."""
  net = NetConfig(out_channels=1, conv=conv, batch_conv="loop")
  net, cfg = fit.for_backend(net, FitConfig(steps=10**6, loop=loop), "cpu")
  keys = [train.run_keys(0, i) for i in range(runs)]
  batch = fit.make_batch(net, cfg, keys, jax.random.uniform(jax.random.key(1), (runs, size, size, 1)))
  states, noise = fit.init_runs(net, cfg, keys, size, size)
  chunk = fit.make_fit_chunk(net, cfg, 2)
  box = {"states": states, "done": 0}

  def two_steps():
    box["states"], m = chunk(box["states"], batch, noise, box["done"])
    box["done"] += 2
    return m

  return median_ms(two_steps) / 2


def main(_):
  flags_text = os.environ.get("XLA_FLAGS", "default XLA flags")
  if F.probe == "step":
    host = step_ms(F.probe_size, F.probe_conv, "host", F.probe_runs)
    msg = f"{flags_text}: conv {F.probe_conv}, {F.probe_size} px, {F.probe_runs} run(s), host loop {host:.0f} ms/step"
    if F.probe_scan:
      msg += f", lax.scan {step_ms(F.probe_size, F.probe_conv, 'scan', F.probe_runs):.0f} ms/step"
    print(msg, flush=True)
    return
  size = F.probe_size
  for n in (1, 2, 4):
    x = jax.random.normal(jax.random.key(0), (n, 1, size + 2, size + 2, 128))
    w = jax.random.normal(jax.random.key(1), (n, 3, 3, 128, 128)) * 0.05
    row = []
    for lowering in convs.BATCH_CONVS:
      conv = convs.conv_general_dilated_for("cpu", lowering, F.probe_size)
      loss = lambda x, w, c=conv: jnp.sum(c(x, w, (1, 1), "VALID", dimension_numbers=convs.NHWC) ** 2)
      grads = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))
      row.append(f"{lowering} {median_ms(grads, x, w, n=5):.1f} ms")
    print(f"{size} px, batch {n}: " + ", ".join(row), flush=True)


if __name__ == "__main__":
  app.run(main)
