"""Where a fit's compile time goes: per compiled program (init, step, eval, predict), the seconds
of tracing, lowering to StableHLO and XLA's backend compile (jax.monitoring's events), for each
method and image size, cold (an empty persistent compilation cache) and warm (the same cache, a
second process). Run it alone on an idle machine.

  python experiments/speed/compile_time.py --ct_sizes=64,256 --ct_out=experiments/results/compile_time
  (a few minutes on 2 CPU cores; writes compile_time.{json,md})
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

ROOT = os.path.dirname(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)  # experiments/speed/ -> the repository

F = flags.FLAGS
flags.DEFINE_list("ct_sizes", ["64", "256"], "square image sides")
flags.DEFINE_list("ct_methods", ["dip", "idip"], "methods (net and loss as run.py resolves them for gray images)")
flags.DEFINE_integer("ct_steps", 10, "steps of each fit (the first chunk of 5 compiles)")
flags.DEFINE_string("ct_cache_dir", "", "persistent compilation cache ('' = a fresh temporary folder: cold)")
flags.DEFINE_bool("ct_warm", True, "rerun in a second process with the same cache folder")
flags.DEFINE_string(
  "ct_out", os.path.join(ROOT, "experiments", "results", "compile_time"), "results path without extension"
)
flags.DEFINE_string("ct_child", "", "internal: run one measurement and print its JSON")

EVENTS = {
  "/jax/core/compile/jaxpr_trace_duration": "trace_s",
  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
  "/jax/core/compile/backend_compile_duration": "compile_s",
}
PROGRAMS = {
  "create_fit_state": "init",
  "train_step": "step",
  "evaluate_runs": "eval",
  "eval_step": "eval",
  "<lambda>": "predict",
}


def measure(method: str, size: int, steps: int) -> dict:
  """One fit of one gray image, as run.py makes it, with the seconds per program and event."""
  import jax
  import numpy as np
  from jax import monitoring

  from idip_jax import config, fit, train

  seen: dict = collections.defaultdict(lambda: collections.defaultdict(float))

  def listen(event, secs, **kw):
    if event in EVENTS:
      name = kw.get("fun_name", "?")
      program = next((p for k, p in PROGRAMS.items() if k in name), name)
      seen[program][EVENTS[event]] += secs

  monitoring.register_event_duration_secs_listener(listen)
  m = config.METHODS[method]
  net = dataclasses.replace(
    config.NetConfig(),
    out_channels=1,
    in_channels=1 if m.prelim_input else config.NetConfig().in_channels,
    complex_connection=m.complex_connection,
  )
  fit_cfg = dataclasses.replace(
    config.FitConfig(),
    steps=steps,
    chunk=5,
    input_is_prelim=m.prelim_input,
    prelim_weight=1.0 if m.prelim_loss else 0.0,
  )
  net, fit_cfg = fit.for_backend(net, fit_cfg, jax.default_backend())
  rng = np.random.default_rng(0)
  y = rng.random((1, size, size, 1), np.float32)
  keys = [train.run_keys(0, 0)]
  t = time.perf_counter()
  batch = fit.make_batch(net, fit_cfg, keys, y, prelim_NxHxWxC=y, clean_NxHxWxC=y)
  res = fit.fit(net, fit_cfg, batch, keys)
  wall = time.perf_counter() - t
  programs = {p: {k: round(v, 2) for k, v in d.items()} for p, d in seen.items()}
  total = {k: round(sum(d.get(k, 0.0) for d in seen.values()), 2) for k in EVENTS.values()}
  return {
    "method": method,
    "size": size,
    "steps": steps,
    "wall_s": round(wall, 2),
    "first_chunk_compile_s": None if res.compile_seconds is None else round(res.compile_seconds, 2),
    "programs": programs,
    "total": total,
  }


def child(spec: str) -> None:
  method, size, steps = spec.split(":")
  print("RESULT " + json.dumps(measure(method, int(size), int(steps))), flush=True)


def run_child(spec: str, cache_dir: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  cmd = [
    sys.executable,
    os.path.abspath(__file__),
    f"--ct_child={spec}",
    f"--ct_cache_dir={cache_dir}",
  ]
  p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
  line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
  if p.returncode or not line:
    raise SystemExit(f"error: {spec} failed: {p.stderr[-2000:]}")
  return json.loads(line[0][len("RESULT ") :])


def main(argv):
  import jax

  if F.ct_child:
    jax.config.update("jax_compilation_cache_dir", F.ct_cache_dir)
    return child(F.ct_child)
  from idip_jax import outputs

  rows = []
  for size in map(int, F.ct_sizes):
    for method in F.ct_methods:
      cache = F.ct_cache_dir or tempfile.mkdtemp(prefix="idip-ct-")
      spec = f"{method}:{size}:{F.ct_steps}"
      for state in ("cold", "warm") if F.ct_warm else ("cold",):
        r = dict(run_child(spec, cache), cache=state)
        rows.append(r)
        print(
          f"{method} {size}px {state}: wall {r['wall_s']:.1f}s  trace {r['total']['trace_s']:.1f}  lower "
          f"{r['total']['lower_s']:.1f}  backend compile {r['total']['compile_s']:.1f}  programs {r['programs']}",
          flush=True,
        )
  doc = dict(
    outputs.provenance(), command=" ".join(["python", "experiments/speed/compile_time.py"] + argv[1:]), rows=rows
  )
  os.makedirs(os.path.dirname(F.ct_out), exist_ok=True)
  outputs.write_json(F.ct_out + ".json", doc)
  write_markdown(doc, F.ct_out + ".md")


def write_markdown(doc: dict, path: str) -> None:
  lines = [
    "# Compile time of one fit",
    "",
    f"`{doc['command']}`; {doc['device']}, commit {doc['commit']}, {doc['date']}. One gray image, the official",
    "net, a host-loop fit of 10 steps (wall includes them). Seconds summed over the programs: tracing, lowering",
    "to StableHLO, XLA's backend compile (warm: loading the program from the persistent cache instead);",
    "'small' is the eager random ops that make z and the keys (before this issue: also the predict program).",
    "",
    *([doc["note"], ""] if doc.get("note") else []),
    "| method | size | cache | wall s | trace s | lower s | backend compile s | step | eval | init | small |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in doc["rows"]:
    c = {p: d.get("compile_s", 0.0) for p, d in r["programs"].items()}
    main = [c.pop(p, 0.0) for p in ("step", "eval", "init")]
    t = r["total"]
    lines.append(
      f"| {r['method']} | {r['size']} | {r['cache']} | {r['wall_s']:.1f} | {t['trace_s']:.1f} | {t['lower_s']:.1f} | "
      f"{t['compile_s']:.1f} | " + " | ".join(f"{v:.1f}" for v in main) + f" | {sum(c.values()):.1f} |"
    )
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  app.run(main)
