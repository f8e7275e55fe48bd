"""Checkpoints of a running fit call (its batched FitState, step count and history so far).

One .npz per call, written to a temporary file and renamed over the old one
(outputs.atomic_open), so a kill at any moment leaves either the previous checkpoint or the new one, never a
torn file. The state is stored as the leaves of its pytree; restoring unflattens them into the
tree structure of freshly initialised states of the same call, so nothing but arrays is stored.
"""

from __future__ import annotations

import hashlib
import os
import zipfile

import jax
import numpy as np

from idip_jax import outputs


def call_path(folder: str, run_names: list[str]) -> str:
  """The checkpoint file of the call that fits exactly these runs (image:seed names)."""
  return os.path.join(folder, "call-" + hashlib.sha1(",".join(run_names).encode()).hexdigest()[:12] + ".npz")


class Damaged(ValueError):
  """A checkpoint that cannot be read back (truncated, overwritten, or of another fit)."""


def save(path: str, done: int, states, history: dict[str, list[np.ndarray]]) -> None:
  leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(states))]
  arrays = {f"leaf{i}": x for i, x in enumerate(leaves)}
  arrays.update({f"history_{k}": np.concatenate(v, axis=0) for k, v in history.items()})
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with outputs.atomic_open(path) as f:
    np.savez(f, done=np.int64(done), n_leaves=np.int64(len(leaves)), **arrays)


def load(path: str, like_states):
  """(done, states, history) from `path`, states shaped like `like_states`; Damaged if unreadable."""
  try:
    with np.load(path) as z:
      leaves = [z[f"leaf{i}"] for i in range(int(z["n_leaves"]))]
      history = {k[len("history_") :]: [z[k]] for k in z.files if k.startswith("history_")}
      done = int(z["done"])
  except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
    raise Damaged(f"checkpoint {path} is damaged ({type(e).__name__})") from None
  like = jax.tree_util.tree_leaves(like_states)
  if len(leaves) != len(like) or any(a.shape != b.shape for a, b in zip(leaves, like)):
    raise Damaged(f"checkpoint {path} does not match this fit")
  treedef = jax.tree_util.tree_structure(like_states)
  return done, jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(x) for x in leaves]), history
