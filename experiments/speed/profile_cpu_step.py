"""Where one fit step of the official gray net spends its time on XLA:CPU: per XLA op
kind, from a profiler trace (needs `pip install xprof`).

XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true python experiments/speed/profile_cpu_step.py --profile_size=128
"""

from __future__ import annotations

import glob
import json
import os
import re
import tempfile
from collections import defaultdict

import jax
from absl import app, flags

from idip_jax import fit, train
from idip_jax.config import FitConfig, NetConfig

F = flags.FLAGS
flags.DEFINE_integer("profile_size", 128, "square image size")
flags.DEFINE_integer("profile_steps", 3, "profiled steps (after a warm-up chunk)")
WRAPPERS = ("Threadpool", "ThunkExecutor", "$", "Pjit", "SlinkyThreadPool")  # spans that contain the ops


def main(_):
  from xprof.convert import raw_to_tool_data

  size, steps = F.profile_size, F.profile_steps
  net, cfg = fit.for_backend(NetConfig(out_channels=1), FitConfig(steps=10**6), jax.default_backend())
  keys = [train.run_keys(0, 0)]
  y = jax.random.uniform(jax.random.key(1), (1, size, size, 1))
  batch = fit.make_batch(net, cfg, keys, y)
  states, noise = fit.init_runs(net, cfg, keys, size, size)
  chunk = fit.make_fit_chunk(net, cfg, steps)
  states, m = chunk(states, batch, noise, 0)
  jax.block_until_ready(m)
  trace = tempfile.mkdtemp(prefix="idip-trace-")
  with jax.profiler.trace(trace):
    states, m = chunk(states, batch, noise, steps)
    jax.block_until_ready(m)
  path = glob.glob(os.path.join(trace, "**", "*.xplane.pb"), recursive=True)[-1]
  data, _ = raw_to_tool_data.xspace_to_tool_data([path], "trace_viewer@", {})
  events = json.loads(data if isinstance(data, str) else data.decode())["traceEvents"]
  by_kind = defaultdict(float)
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(WRAPPERS):
      by_kind[re.sub(r"[.]\d+$", "", e["name"])] += e.get("dur", 0) / 1000 / steps
  total = sum(by_kind.values())
  print(f"{size} px, ms per step summed over XLA ops: {total:.1f}")
  for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1])[:15]:
    print(f"{kind[:40]:40s} {ms:8.1f} ms {100 * ms / total:5.1f}%")


if __name__ == "__main__":
  app.run(main)
