"""Checkpoints of a running fit call (its batched FitState, step count and history so far).

One .npz per call, written to a temporary file and renamed over the old one (os.replace is
atomic), so a kill at any moment leaves either the previous checkpoint or the new one, never a
torn file. The state is stored as the leaves of its pytree; restoring unflattens them into the
tree structure of freshly initialised states of the same call, so nothing but arrays is stored.
"""

from __future__ import annotations

import hashlib
import os
import signal
import tempfile

import jax
import numpy as np


def call_path(folder: str, run_names: list[str]) -> str:
  """The checkpoint file of the call that fits exactly these runs (image:seed names)."""
  return os.path.join(folder, "call-" + hashlib.sha1(",".join(run_names).encode()).hexdigest()[:12] + ".npz")


def save(path: str, done: int, states, history: dict[str, list[np.ndarray]]) -> None:
  leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(jax.device_get(states))]
  arrays = {f"leaf{i}": x for i, x in enumerate(leaves)}
  arrays.update({f"history_{k}": np.concatenate(v, axis=0) for k, v in history.items()})
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz.tmp")
  with os.fdopen(fd, "wb") as f:
    np.savez(f, done=np.int64(done), n_leaves=np.int64(len(leaves)), **arrays)
  os.replace(tmp, path)
  fault("checkpoint")


def load(path: str, like_states):
  """(done, states, history) from `path`, states shaped like `like_states`."""
  with np.load(path) as z:
    treedef = jax.tree_util.tree_structure(like_states)
    leaves = [z[f"leaf{i}"] for i in range(int(z["n_leaves"]))]
    like = jax.tree_util.tree_leaves(like_states)
    if len(leaves) != len(like) or any(a.shape != b.shape for a, b in zip(leaves, like)):
      raise ValueError(f"checkpoint {path} does not match this fit")
    history = {k[len("history_") :]: [z[k]] for k in z.files if k.startswith("history_")}
    return int(z["done"]), jax.tree_util.tree_unflatten(treedef, [jax.numpy.asarray(x) for x in leaves]), history


def fault(event: str) -> None:
  """Fault injection for the resume tests: IDIP_FAULT=<event> kills this process (SIGKILL,
  which no handler sees) right after `event` ("checkpoint": a checkpoint was written;
  "image": an image's results were written)."""
  if os.environ.get("IDIP_FAULT") == event:
    os.kill(os.getpid(), signal.SIGKILL)
