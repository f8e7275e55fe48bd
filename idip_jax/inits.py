"""Stored initialisations of the net (--init): one .npz of its parameters by path, and the settings that fix
their shapes and meaning (the net's fields and the method's), so a file made for another net is refused
before any compute. experiments/meta_init.py writes them (meta_train.py: Reptile over Train400 crops)."""

from __future__ import annotations

import dataclasses
import json
import zipfile

import flax
import jax
import jax.numpy as jnp
import numpy as np

from idip_jax import models, outputs
from idip_jax.config import NetConfig
from idip_jax.data import InputError

FORMAT = "idip-jax init 1"
# How the net runs, not what it computes: an init serves every lowering.
HOW = ("conv", "batch_conv", "hybrid_side")


def net_fields(net_cfg: NetConfig) -> dict:
  """The net settings an init belongs to: every NetConfig field but the lowerings (HOW)."""
  return {k: v for k, v in dataclasses.asdict(net_cfg).items() if k not in HOW}


def save(path: str, params, net_cfg: NetConfig, info: dict) -> None:
  """params (the net's own tree) with net_fields and `info` (what made them: method, steps, data...)."""
  flat = flax.traverse_util.flatten_dict(jax.device_get(params), sep="/")
  meta = {"format": FORMAT, "net": net_fields(net_cfg), **info}
  with outputs.atomic_open(path) as f:
    arrays = {k: np.asarray(v) for k, v in flat.items()}
    np.savez(f, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)


def read(path: str) -> tuple[dict, dict]:
  """(flat parameters by path, meta) of a stored init; one InputError line if missing or damaged."""
  try:
    with np.load(path) as z:
      meta = json.loads(bytes(z["__meta__"]).decode())
      flat = {k: z[k] for k in z.files if k != "__meta__"}
  except FileNotFoundError:
    raise InputError(f"--init={path}: no such file") from None
  except IsADirectoryError:
    raise InputError(f"--init={path} is a folder: name the init .npz in it") from None
  except (OSError, EOFError, KeyError, ValueError, UnicodeDecodeError, zipfile.BadZipFile) as e:
    raise InputError(f"--init={path} is damaged or not an idip-jax init ({type(e).__name__})") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("net"), dict):
    what = meta.get("format") if isinstance(meta, dict) else "?"
    raise InputError(f"--init={path} is not an idip-jax init (format {what})")
  return flat, meta


def load(path: str, net_cfg: NetConfig):
  """The stored parameters as the net's tree, checked against `net_cfg` (the resolved net of the run): the
  first net setting that differs (channels, scales, width, the complex connection...) is one InputError line."""
  flat, meta = read(path)
  want = net_fields(net_cfg)
  made_for = meta["net"].get("out_channels")
  if made_for is not None and made_for != net_cfg.out_channels:
    raise InputError(
      f"--init={path} was made for {made_for}-channel images, this run's have {net_cfg.out_channels} "
      "(--image_channels converts them)"
    )
  for k, v in want.items():
    if k in meta["net"] and meta["net"][k] != v:
      raise InputError(
        f"--init={path} was made for another net: {k} {meta['net'][k]} (this run's: {v}; method "
        f"{meta.get('method', '?')})"
      )
  like = flax.traverse_util.flatten_dict(
    jax.eval_shape(lambda: models.init_skip_unet(models.SkipUNet(net_cfg), jax.random.key(0))), sep="/"
  )
  if set(flat) != set(like) or any(flat[k].shape != like[k].shape for k in like):
    raise InputError(f"--init={path} does not hold the parameters of this net (names or shapes differ)")
  if not all(np.all(np.isfinite(v)) for v in flat.values()):
    raise InputError(f"--init={path} holds non-finite parameters")
  return flax.traverse_util.unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in flat.items()}, sep="/")
