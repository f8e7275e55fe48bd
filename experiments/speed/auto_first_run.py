"""Does the default --batch_strategy=auto pay for its own choice on a job's first run? End-to-end wall time of
`python run.py` per job, with the flags a user gets (default) beside fixed strategies (one run per call, vmap:loop
x4, one single-threaded process per core), each with empty caches (cold: a new JAX compilation cache and
batch-choice cache) and again with the caches its cold run left (warm); rounds interleave the strategies so a
slow spell of the machine hits all alike, each round starting with another strategy (the first run of a job also
warms the machine's file caches).

  python experiments/speed/auto_first_run.py                       # the small jobs (~25 min on 2 cores)
  python experiments/speed/auto_first_run.py --afr_jobs=set12_128  # 12 Set12 images at 128 px, 300 steps (hours)
  python experiments/speed/auto_first_run.py --afr_jobs=set12_128_long --afr_caches=cold \
    --afr_strategies="default,one run per call"                      # 1000 steps (~75 min)

Writes experiments/results/auto_first_run.{json,md} after every run (the JSON's rows: job, strategy, cache,
wall_s, command, and the batch choice each run's config.json recorded).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import flags

from experiments.harness import report
from idip_jax import cli, data, outputs
from idip_jax.data import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# job -> (images: (set, first N, crop side) groups, steps). two_sizes: two buckets, the choice paid per bucket.
JOBS = {
  "small": ([("Set12", 4, 64)], 200),
  "two_sizes": ([("classic10", 2, 64), ("classic10", 2, 96)], 100),
  "set12_128": ([("Set12", 12, 128)], 300),
  "set12_128_long": ([("Set12", 12, 128)], 1000),
}
STRATEGIES = {
  "default": [],
  "one run per call": ["--batch_strategy=vmap", "--batch_size=1"],
  "vmap:loop x4": ["--batch_strategy=vmap", "--batch_size=4", "--batch_conv=loop"],
  # one single-threaded process per core of this 2-core machine (per_core.py), each one run per call
  "per-core x2": ["--batch_strategy=vmap", "--batch_size=1", "--cpu_processes=2"],
}

F = flags.FLAGS
flags.DEFINE_list("afr_jobs", ["small", "two_sizes"], f"jobs to time: {', '.join(JOBS)}")
flags.DEFINE_list("afr_strategies", list(STRATEGIES), f"strategies to time: {', '.join(STRATEGIES)}")
flags.DEFINE_list("afr_caches", ["cold", "warm"], "cold, warm or both (warm reruns with the caches its cold run left)")
flags.DEFINE_integer("afr_rounds", 1, "rounds; each times every strategy cold then warm", lower_bound=1, upper_bound=20)
flags.DEFINE_string("afr_out", os.path.join(ROOT, "experiments", "results", "auto_first_run"), "results path stem")
flags.DEFINE_string("afr_data", "", "folder of the test sets (default $IDIP_SHARED/data)")
flags.DEFINE_bool("afr_append", False, "add the rounds to the stored results file (its rows kept, rounds numbered on)")


def make_inputs(job: str, folder: str) -> None:
  """The job's images as PNG files in one folder: center crops of the first N images of each set."""
  groups, _ = JOBS[job]
  root = F.afr_data or os.path.join(data.shared_dir(), "data")
  for name, n, side in groups:
    for path in data.list_inputs(os.path.join(root, name))[:n]:
      x = data.center_crop(data.read_image(path, 1), side)
      outputs.save_png(os.path.join(folder, f"{data.image_name(path)}_{side}.png"), x)


def run_once(job: str, inputs: str, strategy: str, caches: str, work: str) -> dict:
  _, steps = JOBS[job]
  args = [f"--input={inputs}", "--sigma=25", "--method=dip", f"--steps={steps}", "--save_images=false"]
  args += [f"--workdir={work}", f"--compile_cache={caches}/jax"] + STRATEGIES[strategy]
  if strategy == "default":  # the choice's cache (run.py refuses it beside a fixed strategy)
    args.append(f"--batch_cache={caches}/batch_choice.json")
  drop = ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")  # as a user runs it
  env = {k: v for k, v in os.environ.items() if k not in drop}
  t = time.perf_counter()
  p = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, env=env)
  wall = time.perf_counter() - t
  if p.returncode:
    raise RuntimeError(f"run.py failed ({p.returncode}): {p.stderr[-2000:]}")
  stored = json.load(open(os.path.join(work, "config.json")))
  choice = [
    {k: b.get("batch_choice", {}).get(k) for k in ("label", "why", "choosing_s")} | {"shape": b["shape"]}
    for b in stored["buckets"]
  ]
  layout = stored.get("layout", {})  # processes (--cpu_processes) and why
  return {"wall_s": round(wall, 2), "command": "python run.py " + " ".join(args), "buckets": choice, "layout": layout}


def main(argv: list[str]) -> None:
  del argv
  unknown = [j for j in F.afr_jobs if j not in JOBS]
  if unknown:
    raise InputError(f"unknown --afr_jobs={unknown[0]}; choose from {', '.join(JOBS)}")
  if not F.afr_caches or set(F.afr_caches) - {"cold", "warm"} or F.afr_caches == ["warm"]:
    raise InputError(f"--afr_caches={','.join(F.afr_caches)}: give cold, or cold,warm")
  unknown = [s for s in F.afr_strategies if s not in STRATEGIES]
  if unknown:
    raise InputError(f"unknown --afr_strategies={unknown[0]}; choose from {', '.join(STRATEGIES)}")
  doc = dict(outputs.provenance(), command=" ".join(["python", "experiments/speed/auto_first_run.py"] + sys.argv[1:]))
  doc.update(jobs={j: {"images": JOBS[j][0], "steps": JOBS[j][1]} for j in F.afr_jobs}, rows=[])
  first = 0
  if F.afr_append and os.path.isfile(F.afr_out + ".json"):
    stored = outputs.read_json(F.afr_out + ".json")
    doc["rows"], doc["jobs"] = stored["rows"], dict(stored["jobs"], **doc["jobs"])
    doc["command"] = stored["command"] + "; then " + doc["command"]
    first = 1 + max(r["round"] for r in stored["rows"])
  tmp = tempfile.mkdtemp(prefix="idip-afr-")
  try:
    for job in F.afr_jobs:
      inputs = os.path.join(tmp, job, "in")
      os.makedirs(inputs)
      make_inputs(job, inputs)
      for r in range(first, first + F.afr_rounds):
        names = [s for s in STRATEGIES if s in F.afr_strategies]
        for strategy in names[r % len(names) :] + names[: r % len(names)]:  # each round starts elsewhere
          caches = os.path.join(tmp, job, f"caches-{r}-{len(doc['rows'])}")
          for cache in [c for c in ("cold", "warm") if c in F.afr_caches]:
            row = run_once(job, inputs, strategy, caches, os.path.join(tmp, job, f"w{len(doc['rows'])}"))
            doc["rows"].append(dict(row, job=job, strategy=strategy, cache=cache, round=r, commit=doc["commit"]))
            print(f"{job} {strategy} {cache}: {row['wall_s']:.1f} s {row['buckets']}", flush=True)
            doc["summary"] = summarize(doc["rows"])
            outputs.write_table(os.path.dirname(F.afr_out), os.path.basename(F.afr_out), doc, report.auto_markdown(doc))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def summarize(rows: list[dict]) -> list[dict]:
  """Per job and cache: the default's median wall over the best fixed strategy's, and over one run per call's."""
  out = []
  for job in dict.fromkeys(r["job"] for r in rows):
    for cache in ("cold", "warm"):
      med = {
        s: float(np.median([r["wall_s"] for r in rows if (r["job"], r["strategy"], r["cache"]) == (job, s, cache)]))
        for s in STRATEGIES
        if any((r["job"], r["strategy"], r["cache"]) == (job, s, cache) for r in rows)
      }
      fixed = {s: v for s, v in med.items() if s != "default"}
      if "default" in med and fixed:
        best = min(fixed, key=fixed.get)
        single = med.get("one run per call")
        out.append(
          {
            "job": job,
            "cache": cache,
            "default_s": med["default"],
            "best_fixed": best,
            "best_fixed_s": fixed[best],
            "default_over_best_fixed": med["default"] / fixed[best],
            "speedup_vs_one_run_per_call": single / med["default"] if single else None,
          }
        )
  return out


def entry(argv: list[str] | None = None) -> int:
  return cli.run_script(main, __doc__, F, argv)


if __name__ == "__main__":
  sys.exit(entry())
