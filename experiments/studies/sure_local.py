"""How far can a blend of x_bar candidates go (a goal was +0.3 dB over FFDNet)?

Per set and sigma, at full size: each candidate's PSNR and SURE's error on it, the global blends of
sure_blend.py (one weight per candidate and image: SURE's and the oracle's, which uses the clean image) and
local blends (weights on a grid of nodes every --sl_tiles px, bilinear between them: a SURE-LET basis h_r *
f_k whose SURE is still quadratic in the weights, the divergence of each basis function from the same probe).

  python experiments/studies/sure_local.py --sl_sets=holdout9 --sl_sigmas=15,25,50
  (writes experiments/results/sure/local_<set>[_probesP].{json,md}; the candidates' outputs and probe outputs are
  cached in --sl_cache: ~25 min for holdout9 at three sigmas on 2 CPU cores, then ~1 min per table)
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import scipy.sparse as sp
from absl import app, flags

from idip_jax import config, data, outputs, prelim, sure

F = flags.FLAGS
flags.DEFINE_list("sl_sets", ["holdout9"], "image sets under $IDIP_SHARED/data")
flags.DEFINE_list("sl_sigmas", ["15", "25", "50"], "noise levels (0-255)")
flags.DEFINE_list("sl_tiles", ["128", "64"], "node spacings (px) of the local blends")
flags.DEFINE_integer("sl_probes", 1, "Monte-Carlo probes per candidate", lower_bound=1)
flags.DEFINE_string("sl_cache", "runs/sure_local_cache", "cache of the candidates' outputs")
flags.DEFINE_string("sl_results", "", "output folder (default experiments/results/sure)")

# name -> (x_bar candidate, factor on sigma of the denoiser's noise-level input): the default SURE blend's
# five, and three more (DnCNN x8; FFDNet told a lower and a higher sigma: a smoother and a sharper image).
CANDIDATES = {
  "ffdnet": ("ffdnet", 1.0),
  "ffdnet_x8": ("ffdnet_x8", 1.0),
  "dncnn": ("dncnn", 1.0),
  "dncnn_x8": ("dncnn_x8", 1.0),
  "bm3d": ("bm3d", 1.0),
  "ffdnet_lo": ("ffdnet", 0.8),
  "ffdnet_hi": ("ffdnet", 1.25),
  "noisy": ("noisy", 1.0),
}
SETS = {  # the blends compared: the default candidates (config.PrelimConfig.sure_candidates), and all eight
  "default 5": ("ffdnet", "ffdnet_x8", "dncnn", "bm3d", "noisy"),
  "all 8": tuple(CANDIDATES),
  "CNNs + y": ("ffdnet", "ffdnet_x8", "dncnn", "noisy"),
}


def cache(folder: str, name: str, sigma: float, probes: int) -> str:
  """Writes (once) y, x, the probes b and each candidate's f(y), f(y + eps b_p); returns the folder."""
  out = os.path.join(F.sl_cache, f"{name}_s{sigma:g}")
  os.makedirs(out, exist_ok=True)
  images = data.load_images(folder, sigma, channels=1)
  eps = sure.eps_for(sigma / 255.0)
  bs = [sure.probes_for(im.name, im.noisy_HxWxC.shape, probes) for im in images]
  if not os.path.isfile(os.path.join(out, "base.npz")):
    arrays = {f"y_{im.name}": im.noisy_HxWxC for im in images} | {f"x_{im.name}": im.clean_HxWxC for im in images}
    np.savez(os.path.join(out, "base.npz"), **arrays, **{f"b_{im.name}": b[0] for im, b in zip(images, bs)})
  for cand, (c, factor) in CANDIDATES.items():
    if c == "noisy":
      continue
    spec = prelim.XbarSpec(config.PrelimConfig(), sigma * factor)
    run = prelim.CANDIDATES[c].run
    path = os.path.join(out, f"{cand}.npz")
    if not os.path.isfile(path):
      fy = run(spec, images)
      moved = [dataclasses.replace(im, noisy_HxWxC=im.noisy_HxWxC + eps * b[0]) for im, b in zip(images, bs)]
      fb = run(spec, moved)
      arrays = {f"fy_{im.name}": np.asarray(a, np.float32) for im, a in zip(images, fy)}
      np.savez(path, **arrays, **{f"fb_{im.name}": np.asarray(a, np.float32) for im, a in zip(images, fb)})
      print(f"{name} sigma {sigma:g}: {cand}", flush=True)
    for p in range(1, probes):  # more probes, where asked
      ppath = os.path.join(out, f"{cand}_probe{p}.npz")
      if not os.path.isfile(ppath):
        moved = [dataclasses.replace(im, noisy_HxWxC=im.noisy_HxWxC + eps * b[p]) for im, b in zip(images, bs)]
        np.savez(ppath, **{f"fb_{im.name}": np.asarray(a, np.float32) for im, a in zip(images, run(spec, moved))})
        print(f"{name} sigma {sigma:g}: {cand} probe {p}", flush=True)
  return out


def tent_basis(h: int, w: int, tile: int) -> sp.csr_matrix:
  """(H*W) x nodes: bilinear weights of a grid of nodes about `tile` px apart (rows sum to 1)."""

  def axis(n):
    nodes = max(round(n / tile), 1) + 1
    pos = np.linspace(0, nodes - 1, n)
    i0 = np.minimum(np.floor(pos).astype(int), nodes - 2)
    return nodes, i0, pos - i0

  ny, iy, fy = axis(h)
  nx, ix, fx = axis(w)
  pix = np.arange(h * w).reshape(h, w)
  rows, cols, vals = [], [], []
  for dy, wy in ((0, 1 - fy), (1, fy)):
    for dx, wx in ((0, 1 - fx), (1, fx)):
      rows.append(pix.ravel())
      cols.append(((iy + dy)[:, None] * nx + (ix + dx)[None, :]).ravel())
      vals.append((wy[:, None] * wx[None, :]).ravel())
  return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(h * w, ny * nx))


def local_blend(f_NxK, d_NxK, y_N, s: float, basis, clean_N=None) -> np.ndarray:
  """The blend sum_r sum_k w_rk h_r f_k minimising SURE (d: each candidate's per-pixel divergence terms
  b * (f(y + eps b) - f(y)) / eps), or, given the clean image, the squared error (oracle)."""
  phi = sp.hstack([basis.multiply(f_NxK[:, [k]]) for k in range(f_NxK.shape[1])]).tocsc()
  gram = (phi.T @ phi).toarray()
  if clean_N is None:
    div = np.concatenate([basis.T @ d_NxK[:, k] for k in range(d_NxK.shape[1])])
    rhs = phi.T @ y_N - s**2 * div
  else:
    rhs = phi.T @ clean_N
  return phi @ np.linalg.lstsq(gram, rhs, rcond=None)[0]


psnr = sure.clipped_psnr


def analyse(out: str, sigma: float, probes: int, tiles: list[int]) -> list[dict]:
  base = np.load(os.path.join(out, "base.npz"))
  cached = {c: np.load(os.path.join(out, f"{c}.npz")) for c in CANDIDATES if c != "noisy"}
  more = {(c, p): np.load(os.path.join(out, f"{c}_probe{p}.npz")) for c in cached for p in range(1, probes)}
  s, eps = sigma / 255.0, sure.eps_for(sigma / 255.0)
  rows = []
  for name in sorted(k[2:] for k in base if k.startswith("y_")):
    y, x = base[f"y_{name}"].astype(np.float64), base[f"x_{name}"].astype(np.float64)
    bs = [b.astype(np.float64) for b in sure.probes_for(name, y.shape, probes)]
    f, d = {}, {}
    for c in CANDIDATES:
      if c == "noisy":
        f[c], d[c] = y, np.mean([b * b for b in bs], axis=0)
        continue
      f[c] = cached[c][f"fy_{name}"].astype(np.float64)
      fbs = [cached[c][f"fb_{name}"]] + [more[c, p][f"fb_{name}"] for p in range(1, probes)]
      d[c] = np.mean([b * (fb - f[c]) / eps for b, fb in zip(bs, fbs)], axis=0)
    row = {"sigma": sigma, "image": name, "psnr": {c: psnr(f[c], x) for c in CANDIDATES}}
    row["sure_error_db"] = {  # SURE's PSNR estimate minus the true PSNR, per candidate
      c: sure.psnr_of_mse(sure.sure(y, f[c], s, float(d[c].sum()))) - sure.psnr_of_mse(float(np.mean((f[c] - x) ** 2)))
      for c in CANDIDATES
      if c != "noisy"
    }
    basis = {t: tent_basis(y.shape[0], y.shape[1], t) for t in tiles}
    for label, cands in SETS.items():
      fs = [f[c] for c in cands]
      w = sure.blend_weights(y, fs, [float(d[c].sum()) for c in cands], s)
      blends = {"sure": psnr(sure.blend(fs, w), x), "oracle": psnr(sure.blend(fs, sure.oracle_weights(x, fs)), x)}
      f_nk = np.stack([a.ravel() for a in fs], 1)
      d_nk = np.stack([d[c].ravel() for c in cands], 1)
      for t in tiles:
        blends[f"local{t} sure"] = psnr(local_blend(f_nk, d_nk, y.ravel(), s, basis[t]), x.ravel())
        blends[f"local{t} oracle"] = psnr(local_blend(f_nk, d_nk, y.ravel(), s, basis[t], x.ravel()), x.ravel())
      row[label] = blends
    rows.append(row)
  return rows


def markdown(doc: dict) -> str:
  kinds = list(doc["rows"][0][next(iter(SETS))])
  lines = [
    f"# How far blends of x_bar candidates go: {doc['set']}",
    "",
    f"`{doc['command']}`; {doc['device']}, commit {doc['commit']}, {doc['date']}. Gray, full size, AWGN",
    f"(float, seeded by (0, name)); {doc['probes']} probe(s) per candidate. Mean gain in dB over FFDNet's PSNR.",
    "Global: one weight per candidate and image (sure_blend.py); localT: weights on nodes every T px, bilinear",
    "between them. 'oracle' uses the clean image (an upper bound for that family of blends), 'sure' does not.",
    "",
    "| sigma | candidates | " + " | ".join(kinds) + " |",
    "|---" * (len(kinds) + 2) + "|",
  ]
  for sigma in sorted({r["sigma"] for r in doc["rows"]}):
    rs = [r for r in doc["rows"] if r["sigma"] == sigma]
    base = np.mean([r["psnr"]["ffdnet"] for r in rs])
    for label in SETS:
      cells = [f"{np.mean([r[label][k] for r in rs]) - base:+.2f}" for k in kinds]
      lines.append(f"| {sigma:g} | {label} | " + " | ".join(cells) + " |")
  lines += [
    "",
    "SURE's error on each candidate (its PSNR estimate minus the true PSNR, dB): mean, and mean |error|:",
    "",
  ]
  cands = list(doc["rows"][0]["sure_error_db"])
  lines += ["| sigma | " + " | ".join(cands) + " |", "|---" * (len(cands) + 1) + "|"]
  for sigma in sorted({r["sigma"] for r in doc["rows"]}):
    rs = [r for r in doc["rows"] if r["sigma"] == sigma]
    cells = [
      f"{np.mean([r['sure_error_db'][c] for r in rs]):+.2f} / {np.mean([abs(r['sure_error_db'][c]) for r in rs]):.2f}"
      for c in cands
    ]
    lines.append(f"| {sigma:g} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  results = F.sl_results or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results", "sure")
  for name in F.sl_sets:
    folder = os.path.join(data.shared_dir(), "data", name)
    rows = []
    for sigma in map(float, F.sl_sigmas):
      out = cache(folder, name, sigma, F.sl_probes)
      rows += analyse(out, sigma, F.sl_probes, [int(t) for t in F.sl_tiles])
    doc = dict(outputs.provenance(), command=" ".join(["python", "experiments/studies/sure_local.py"] + argv[1:]))
    doc |= {"set": name, "probes": F.sl_probes, "tiles": F.sl_tiles, "rows": rows}
    outputs.write_table(
      results, f"local_{name}" + (f"_probes{F.sl_probes}" if F.sl_probes > 1 else ""), doc, markdown(doc)
    )
    print(markdown(doc))


if __name__ == "__main__":
  app.run(main)
