"""DRP's frozen convolutions in a batch of runs: each run its own kernels (what the engine does: vmap over the whole
state, the per-run convolutions lowered by --batch_conv) against one set shared by all runs (the kernels unbatched
in the vmap, so each convolution is one dense convolution over all runs). Seconds per vmapped train step, DRP's
net and loss (experiments/drp.flags), gray images, interleaved repeats, medians. Run it alone on an idle machine.

  python experiments/speed/drp_shared_weights.py --dsw_sizes=64,128 --dsw_runs=4
  (about 3 minutes on 2 CPU cores; writes experiments/results/drp_shared_weights.{json,md})
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments.speed.time_to_psnr import METHODS
from idip_jax import cli, config, fit, outputs, train
from idip_jax.data import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
F = flags.FLAGS
flags.DEFINE_list("dsw_sizes", ["64", "128"], "square image sides")
flags.DEFINE_integer("dsw_runs", 4, "runs in the batch (images fitted together)", lower_bound=1, upper_bound=64)
flags.DEFINE_integer("dsw_steps", 20, "steps per timed call", lower_bound=1, upper_bound=10000)
flags.DEFINE_integer("dsw_repeats", 5, "interleaved repeats (the median is reported)", lower_bound=1, upper_bound=100)
flags.DEFINE_string("dsw_out", os.path.join(ROOT, "experiments", "results", "drp_shared_weights"), "path w/o extension")

# DRP's settings as time_to_psnr.py runs them (experiments/drp.flags), the seed of the image's one channel.
_, _, DRP_FIT, DRP_NET = METHODS["DRP"]
NET = dataclasses.replace(config.NetConfig(), **dict(dict(DRP_NET), in_channels=1, out_channels=1))
FIT = dataclasses.replace(config.FitConfig(), steps=100, prelim_weight=0.0, batch_strategy="vmap", **dict(DRP_FIT))


def is_weight(path) -> bool:
  return train.param_group(path) == "weights"


def steps(side: int, n: int) -> dict:
  """The two vmapped steps on the same states and batch: per_run (the engine's) and shared (run 0's kernels
  for every run, passed unbatched)."""
  net, cfg = fit.for_backend(NET, FIT, "cpu")
  rng = np.random.default_rng(0)
  ys = np.clip(0.5 + 0.1 * rng.standard_normal((n, side, side, 1)), 0, 1).astype(np.float32)
  keys = [train.run_keys(0, k) for k in range(n)]
  batch = fit.make_batch(net, cfg, keys, ys)
  model, tx = train.make_model(net, cfg), train.make_optimizer(cfg)
  states, noise = fit.init_runs(net, cfg, keys, side, side)
  one = lambda s, b, k: train.train_step(model, tx, cfg, s, b, k)

  def shared(states, batch, keys):
    kernels = jax.tree_util.tree_map_with_path(lambda p, x: x[0] if is_weight(p) else jnp.zeros(()), states.params)

    def run(s, b, k, kernels):
      params = jax.tree_util.tree_map_with_path(lambda p, x, w: w if is_weight(p) else x, s.params, kernels)
      return one(s.replace(params=params), b, k)

    return jax.vmap(run, in_axes=(0, 0, 0, None))(states, batch, keys, kernels)

  return {"per_run": jax.jit(jax.vmap(one)), "shared": jax.jit(shared)}, states, batch, noise


def main(argv: list[str]) -> None:
  del argv
  if not F.dsw_sizes or not all(s.isdigit() and 16 <= int(s) <= 4096 for s in F.dsw_sizes):
    raise InputError(f"--dsw_sizes must be sides of 16-4096 px (got {','.join(F.dsw_sizes)})")
  sizes = [int(s) for s in F.dsw_sizes]
  doc = dict(
    outputs.provenance(), command=" ".join(["python", "experiments/speed/drp_shared_weights.py"] + sys.argv[1:])
  )
  rows = []
  for side in sizes:
    fns, states, batch, noise = steps(side, F.dsw_runs)
    times = {k: [] for k in fns}
    for f in fns.values():  # compile, apart from the timing
      jax.block_until_ready(f(states, batch, noise))
    for _ in range(F.dsw_repeats):
      for name, f in fns.items():
        s, t = states, time.perf_counter()
        for _ in range(F.dsw_steps):
          s, _m = f(s, batch, noise)
        jax.block_until_ready(s)
        times[name].append((time.perf_counter() - t) / F.dsw_steps)
    med = {k: float(np.median(v)) for k, v in times.items()}
    rows.append(dict(size=side, runs=F.dsw_runs, **{f"{k}_ms": 1e3 * v for k, v in med.items()}, times_s=times))
    rows[-1]["per_run_over_shared"] = med["per_run"] / med["shared"]
    print(f"{side} px x{F.dsw_runs}: per run {1e3 * med['per_run']:.1f} ms, shared {1e3 * med['shared']:.1f} ms")
  doc["rows"] = rows
  md = [
    "# DRP's frozen convolutions: per run or shared across the runs of a batch\n\n",
    f"`{doc['command']}`; {doc['device']}, commit {doc['commit']}, {doc['date']}. Milliseconds per vmapped train "
    f"step of {F.dsw_runs} runs (DRP: experiments/drp.flags), median of {F.dsw_repeats} interleaved repeats of "
    f"{F.dsw_steps} steps.\n\n",
    "| size | runs | per run (the engine) ms | shared ms | per run / shared |\n|---|---|---|---|---|\n",
  ]
  md += [
    f"| {r['size']} | {r['runs']} | {r['per_run_ms']:.1f} | {r['shared_ms']:.1f} | {r['per_run_over_shared']:.3f} |\n"
    for r in rows
  ]
  outputs.write_table(os.path.dirname(F.dsw_out), os.path.basename(F.dsw_out), doc, "".join(md))


def entry(argv: list[str] | None = None) -> int:
  return cli.run_script(main, __doc__, F, argv)


if __name__ == "__main__":
  sys.exit(entry())
