"""Loader for the official MatConvNet releases of FFDNet and DnCNN (MATLAB v7.3 = HDF5).

`net/layers` is a cell array of object references; each layer has `type` (uint16
chars: conv, relu, SubP, concat) and, for conv, `weights` = {filter, bias}. h5py
sees MATLAB's arrays with reversed dimensions, so a (kh, kw, in, out) filter comes
out as (out, in, kw, kh): transposing with axes (3, 2, 1, 0) gives HWIO (swapping
kh and kw instead costs 3 dB). BatchNorm is already folded into the convs.
Converted parameters are cached as .npz keyed by the file's SHA-1.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from idip_jax.data import InputError


def cache_dir() -> str:
  return os.environ.get("IDIP_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "idip-jax"))


def _sha1(path: str) -> str:
  h = hashlib.sha1()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _read_mat(path: str) -> tuple[list[str], list[tuple[np.ndarray, np.ndarray]]]:
  try:
    import h5py
  except ImportError:
    raise InputError("reading the official weights needs h5py: pip install '.[weights]'") from None
  try:
    f = h5py.File(path, "r")
  except OSError:
    raise InputError(f"{path} is not a MATLAB v7.3 (HDF5) weight file, or it is truncated") from None
  with f:
    if "net" not in f or "layers" not in f["net"]:
      raise InputError(f"{path} has no net/layers: not a MatConvNet model")
    types, convs = [], []
    try:
      for ref in f["net/layers"][()].flatten():
        layer = f[ref]
        t = "".join(map(chr, layer["type"][()].flatten()))
        types.append(t)
        if t == "conv":
          w_ref, b_ref = layer["weights"][()].flatten()
          w, b = np.asarray(f[w_ref]), np.asarray(f[b_ref]).reshape(-1)
          if w.ndim == 3:  # MATLAB drops a trailing singleton dim (out = 1)
            w = w[None]
          convs.append((np.ascontiguousarray(w.transpose(3, 2, 1, 0), np.float32), b.astype(np.float32)))
    except (KeyError, ValueError, OSError) as e:
      raise InputError(f"{path}: unreadable MatConvNet layers ({type(e).__name__}); file damaged?") from None
  return types, convs


def load(path: str, expect: str) -> tuple[list[str], list[tuple[np.ndarray, np.ndarray]]]:
  """(layer types, [(HWIO kernel, bias)]) of an official file; expect 'ffdnet' or 'dncnn'."""
  if not os.path.isfile(path):
    raise InputError(
      f"weight file not found: {path} (set --weights_dir; official files: "
      f"github.com/cszn/FFDNet models/, github.com/cszn/DnCNN model/specifics/)"
    )
  key = _sha1(path)
  cached = os.path.join(cache_dir(), f"{os.path.basename(path)}.{key[:16]}.npz")
  if os.path.isfile(cached):
    z = np.load(cached, allow_pickle=False)
    types = [str(t) for t in z["types"]]
    convs = [(z[f"w{i}"], z[f"b{i}"]) for i in range(int(z["n"]))]
  else:
    types, convs = _read_mat(path)
  kind = "ffdnet" if "SubP" in types else "dncnn"
  if kind != expect:
    raise InputError(f"{path} is a {kind.upper()} file ({len(convs)} convs), not {expect.upper()}")
  if not convs:
    raise InputError(f"{path} has no conv layers")
  if not os.path.isfile(cached):
    try:
      os.makedirs(cache_dir(), exist_ok=True)
      arrays = {f"w{i}": w for i, (w, _) in enumerate(convs)}
      arrays.update({f"b{i}": b for i, (_, b) in enumerate(convs)})
      tmp = cached + ".tmp.npz"
      np.savez(tmp, types=np.array(types), n=len(convs), **arrays)
      os.replace(tmp, cached)
    except OSError:
      pass  # a read-only home just means no cache
  return types, convs
