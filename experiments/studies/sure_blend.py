"""How much does a SURE blend of x_bar candidates gain over FFDNet at full size, without ground truth?
Per set and sigma, each candidate's PSNR,
the oracle blend (least squares with the clean image), the SURE blend (no clean image: MC-SURE
weights, idip_jax.prelim.sure_blend) and how far SURE's own PSNR estimate is from the truth.
Gray images (as the tables' holdout), AWGN without clipping seeded by (0, name), --sigmas.

  python experiments/studies/sure_blend.py --sets=holdout9 --sigmas=15,25,50
  (writes experiments/results/sure/<set>.{json,md}; holdout9 ~15 min on 2 CPU cores)
"""

from __future__ import annotations

import os
import time

import numpy as np
from absl import app, flags

from idip_jax import config, data, outputs, prelim, sure

F = flags.FLAGS
flags.DEFINE_list("sets", ["holdout9"], "image sets under --sure_data (folders of ../shared/data)")
flags.DEFINE_list("sigmas", ["15", "25", "50"], "noise levels (0-255)")
flags.DEFINE_list("sure_blend_candidates", list(config.PrelimConfig().sure_candidates), "x_bar candidates")
flags.DEFINE_integer("sure_blend_probes", 1, "Monte-Carlo probes per candidate (full-size images: one suffices)")
flags.DEFINE_string("sure_data", "", "folder of the sets (default $IDIP_SHARED/data)")
flags.DEFINE_string("sure_results", "", "output folder (default experiments/results/sure)")


psnr = sure.clipped_psnr


def one_set(name: str) -> dict:
  folder = os.path.join(F.sure_data or os.path.join(data.shared_dir(), "data"), name)
  rows = []
  for sigma in map(float, F.sigmas):
    images = data.load_images(folder, sigma, channels=1)
    pc = config.PrelimConfig(
      name="sure_blend", sure_candidates=tuple(F.sure_blend_candidates), sure_probes=F.sure_blend_probes
    )
    spec = prelim.XbarSpec(pc, sigma)
    prelim.REGISTRY["sure_blend"].check(spec, images)
    t = time.perf_counter()
    names, outs, divs = prelim.candidate_outputs(spec, images)
    for i, im in enumerate(images):
      cand = [outs[c][i] for c in names]
      blend, info = sure.blend_image(im.noisy_HxWxC, names, cand, [divs[c][i] for c in names], sigma)
      wo = sure.oracle_weights(im.clean_HxWxC, cand)
      rows.append(
        {
          "sigma": sigma,
          "image": im.name,
          "psnr": {c: psnr(o, im.clean_HxWxC) for c, o in zip(names, cand)},
          "psnr_sure_blend": psnr(blend, im.clean_HxWxC),
          "psnr_oracle_blend": psnr(sure.blend(cand, wo), im.clean_HxWxC),
          "sure_psnr_estimate": info["sure_psnr"]["blend"],
          "sure_weights": info["sure_weights"],
          "oracle_weights": dict(zip(names, map(float, wo))),
        }
      )
    print(f"{name} sigma {sigma:g}: {len(images)} images in {time.perf_counter() - t:.0f}s", flush=True)
  return {"set": name, "candidates": names, "probes": F.sure_blend_probes, "rows": rows}


def markdown(doc: dict) -> str:
  names = doc["candidates"]
  out = [
    f"# SURE blends of x_bar candidates: {doc['set']}",
    "",
    f"`{doc['command']}`; {doc['device']}, commit {doc['commit']}, {doc['date']}. Gray, full size, AWGN (float,",
    f"seeded by (0, name)), PSNR (dB) of the clipped image, mean over the set; {doc['probes']} probe(s) per",
    "candidate. Oracle blend: least-squares weights using the clean image; SURE blend: MC-SURE weights (no clean",
    "image); SURE's estimate: the SURE blend's PSNR as SURE predicts it.",
    "",
    "| sigma | " + " | ".join(names) + " | oracle blend | SURE blend | SURE blend - ffdnet | SURE's estimate |",
    "|---" * (len(names) + 5) + "|",
  ]
  for sigma in sorted({r["sigma"] for r in doc["rows"]}):
    rs = [r for r in doc["rows"] if r["sigma"] == sigma]
    mean = lambda f, rs=rs: float(np.mean([f(r) for r in rs]))
    cells = [f"{mean(lambda r, c=c: r['psnr'][c]):.2f}" for c in names]
    sb, ob = mean(lambda r: r["psnr_sure_blend"]), mean(lambda r: r["psnr_oracle_blend"])
    gain = sb - mean(lambda r: r["psnr"]["ffdnet"]) if "ffdnet" in names else float("nan")
    est = mean(lambda r: r["sure_psnr_estimate"])
    out.append(f"| {sigma:g} | " + " | ".join(cells) + f" | {ob:.2f} | {sb:.2f} | {gain:+.2f} | {est:.2f} |")
  return "\n".join(out) + "\n"


def main(argv):
  results = F.sure_results or os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "sure"
  )
  for name in F.sets:
    # absl consumes the flags, so the command is rebuilt from them: one set per file, the flags that made it.
    args = [f"--sets={name}", f"--sigmas={','.join(F.sigmas)}", f"--sure_blend_probes={F.sure_blend_probes}"]
    if F.sure_blend_candidates != list(config.PrelimConfig().sure_candidates):
      args.append(f"--sure_blend_candidates={','.join(F.sure_blend_candidates)}")
    doc = dict(outputs.provenance(), command=" ".join(["python", "experiments/studies/sure_blend.py", *args]))
    doc |= one_set(name)
    outputs.write_table(results, name, doc, markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
  app.run(main)
