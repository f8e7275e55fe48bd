"""Meta-learning the net's initialisation for --init: Reptile (Nichol, Achiam & Schulman 2018, first order), the
route MetaDIP (Zhang et al., arXiv 2209.08452) takes to DIP fits that reach their best PSNR in few steps, and
the one the IDIP paper's conclusion proposes.

Each meta step draws --tasks crops of the training images (a random flip or rotation, a noise level ~ U[sigma,
sigma_max], DIP's clipped AWGN, a code z per task drawn as a fit draws it, or x_bar from the caller's denoiser for
IDIP), fits them all from the current init with the engine's batched fit (fit.make_fit_chunk: run.py's train
step, Adam, input perturbation and backtracking) for --inner_steps, and moves the init toward the mean of the
fitted parameters. Every draw comes from (seed, meta step), so a run resumed from a checkpoint takes exactly the
steps an uninterrupted one would. The loop and the checkpoints are loop.py's and checkpoint.py's.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from idip_jax import checkpoint, config, data, fit, inits, locks, loop, outputs
from idip_jax.config import FitConfig, NetConfig
from idip_jax.config_train import MetaConfig, check_intervals
from idip_jax.data import InputError
from idip_jax.models import SkipUNet, init_skip_unet
from idip_jax.stored import check_training_resume
from idip_jax.train import run_keys, seeded

CSV_COLUMNS = ("step", "inner_loss", "val_loss", "val_psnr", "val_psnr_ema", "meta_lr", "tasks_per_s", "seconds")
# Training tasks' run indices start here: their codes z never repeat a validation image's (run i of the seed).
TASK_RUNS = 2**20
# x_bar of noisy crops: (noisy_NxHxWxC, sigmas_N on the 0-255 scale) -> x_bar_NxHxWxC (IDIP's input and target).
MakeXbar = Callable[[np.ndarray, np.ndarray], np.ndarray]


@flax.struct.dataclass
class MetaState:
  step: jax.Array
  params: Any  # the init being learned: the net's parameters


def inner_configs(cfg: MetaConfig, steps: int) -> tuple[NetConfig, FitConfig]:
  """The net and fit of one batched call of tasks, resolved for this backend (run.py's, for --method): `steps`
  Adam steps in one chunk; with a ground truth, its PSNR after the last step only."""
  net, fit_cfg = config.apply_method(cfg.method, cfg.net, cfg.fit, cfg.channels)
  fit_cfg = dataclasses.replace(fit_cfg, steps=steps, chunk=steps, eval_every=steps, stop="fixed")
  return fit.for_backend(net, fit_cfg, jax.default_backend())


def first_init(cfg: MetaConfig) -> MetaState:
  """The random init a fit of run 0 draws (run_keys' "init"): the meta-learning's start, and its baseline."""
  net, fit_cfg = inner_configs(cfg, cfg.inner_steps)
  params = init_skip_unet(SkipUNet(net), run_keys(fit_cfg.seed, 0)["init"])
  return MetaState(step=jnp.zeros((), jnp.int32), params=params)


def sample_tasks(cfg: MetaConfig, images_NxSxSxC: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(clean, noisy, sigmas) of meta step `step`'s tasks: random crops, each flipped or rotated, with clipped AWGN
  of a level ~ U[sigma, sigma_max], all drawn from (seed, step)."""
  rng = np.random.default_rng([cfg.fit.seed, step])
  n, side, _, _ = images_NxSxSxC.shape
  p = cfg.crop
  clean = []
  for i, y, x, k, flip in zip(
    rng.integers(0, n, cfg.tasks),
    rng.integers(0, side - p + 1, cfg.tasks),
    rng.integers(0, side - p + 1, cfg.tasks),
    rng.integers(0, 4, cfg.tasks),
    rng.integers(0, 2, cfg.tasks),
  ):
    crop = np.rot90(images_NxSxSxC[i, y : y + p, x : x + p], k)
    clean.append(crop[::-1] if flip else crop)
  clean = np.stack(clean).astype(np.float32)
  sigmas = rng.uniform(cfg.sigma, max(cfg.sigma, cfg.sigma_max), cfg.tasks).astype(np.float32)
  noisy = np.clip(clean + sigmas[:, None, None, None] / 255.0 * rng.standard_normal(clean.shape), 0.0, 1.0)
  return clean, noisy.astype(np.float32), sigmas


def fit_tasks(
  net: NetConfig, fit_cfg: FitConfig, params, noisy, xbar=None, clean=None, runs: list[int] | None = None
) -> tuple[Any, dict]:
  """The batched fit of N tasks from `params` (run.py's fit of N images of one bucket, --init=params):
  (their fitted parameters, leading axis N; the chunk's metrics, steps x N)."""
  runs = list(range(len(noisy))) if runs is None else runs
  keys = [run_keys(fit_cfg.seed, r) for r in runs]
  batch = fit.make_batch(net, fit_cfg, keys, noisy, xbar, clean)
  states, noise = fit.init_runs(net, fit_cfg, keys, *np.shape(noisy)[1:3], params)
  states, m = fit.make_fit_chunk(net, fit_cfg, fit_cfg.steps)(states, batch, noise, 0)
  fitted = states.params["net"] if seeded(fit_cfg) else states.params
  return fitted, jax.device_get(m)


@jax.jit
def reptile_update(params, fitted_N, step_size):
  """init + step_size (mean over tasks of the fitted parameters - init)."""
  return jax.tree_util.tree_map(lambda p, q: p + step_size * (jnp.mean(q, axis=0) - p), params, fitted_N)


def meta_lr(cfg: MetaConfig, step: int) -> float:
  """Reptile's outer step size at meta step `step` (0-based): --meta_lr, annealed linearly to 0 (Nichol et al.)."""
  return cfg.meta_lr * (1.0 - step / cfg.meta_steps)


def load_validation(cfg: MetaConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(clean, noisy, sigmas) of the validation tasks: center crops of the first --val_images, clipped AWGN
  seeded per image name (data.add_awgn, as run.py's --noise=clip)."""
  folder = cfg.val_dir or os.path.join(data.shared_dir(), "data", "holdout9")
  clean, noisy = data.load_validation_crops(
    folder, cfg.val_images, cfg.channels, cfg.crop, cfg.val_sigma, "clip", "crop"
  )
  return clean, noisy, np.full(len(clean), cfg.val_sigma, np.float32)


def check(cfg: MetaConfig, make_xbar: MakeXbar | None) -> None:
  """Every rule on the settings alone: one InputError line before any file is read."""
  config.check(cfg)
  check_intervals(cfg, ("val_every", "checkpoint_every"))
  if cfg.crop % 2**cfg.net.scales:
    raise InputError(f"--crop={cfg.crop} must be a multiple of 2^scales = {2**cfg.net.scales}")
  if cfg.sigma_max and cfg.sigma_max < cfg.sigma:
    raise InputError(f"--sigma_max={cfg.sigma_max:g} is below --sigma={cfg.sigma:g}")
  if cfg.resume and cfg.overwrite:
    raise InputError("--resume and --overwrite exclude each other")
  if cfg.method == "idip" and make_xbar is None:
    raise InputError("--method=idip needs x_bar of each crop: a denoiser (experiments/meta_init.py loads FFDNet)")


# Settings a --resume may change: where and how often it writes, not what it learns.
RESUME_FREE = ("workdir", "resume", "overwrite", "checkpoint_every", "log_every", "val_every")


def init_path(workdir: str) -> str:
  return os.path.join(workdir, "init.npz")


def checkpoint_path(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints", "meta.npz")


@locks.held()
def train(cfg: MetaConfig, make_xbar: MakeXbar | None = None) -> dict:
  """Learns (or resumes) the init of `cfg` in cfg.workdir: init.npz (for run.py --init) at every checkpoint and at
  the end, checkpoints, progress.csv/png (validation PSNR after --val_steps from the init) and summary.json."""
  check(cfg, make_xbar)
  train_dir = cfg.train_dir or os.path.join(data.shared_dir(), "data", "Train400")
  images = data.load_square_set(train_dir, cfg.channels, cfg.crop, "train_dir", "training")
  val_clean, val_noisy, val_sigmas = load_validation(cfg)
  if cfg.resume:
    stored = check_training_resume(cfg.workdir, dataclasses.asdict(cfg), RESUME_FREE, cfg.meta_steps, "val_psnr")
    if stored is not None:
      return stored
  else:
    reads = tuple(p for p in (cfg.train_dir, cfg.val_dir, cfg.weights_dir) if p)
    outputs.prepare_workdir(cfg.workdir, cfg.overwrite, reads)
    outputs.write_json(os.path.join(cfg.workdir, "config.json"), dataclasses.asdict(cfg))
  net, fit_cfg = inner_configs(cfg, cfg.inner_steps)
  val_net, val_fit = inner_configs(cfg, cfg.val_steps)
  xbar = (lambda noisy, sigmas: None) if make_xbar is None else make_xbar
  val_xbar = xbar(val_noisy, val_sigmas)
  state = first_init(cfg)
  rows: list[dict] = []
  csv_path = os.path.join(cfg.workdir, "progress.csv")
  if cfg.resume and os.path.isfile(checkpoint_path(cfg.workdir)):
    try:
      state = checkpoint.load(checkpoint_path(cfg.workdir), state)[1]
    except checkpoint.Damaged as e:
      raise InputError(str(e)) from None
    rows = outputs.read_csv_until(csv_path, int(state.step))
  start = int(state.step)
  info = {"method": cfg.method, "channels": cfg.channels, "crop": cfg.crop, "sigma": [cfg.sigma, cfg.sigma_max]}

  def validate(params) -> dict:
    _, m = fit_tasks(val_net, val_fit, params, val_noisy, val_xbar, val_clean)
    return {
      "val_loss": float(np.mean(m["loss"][-1])),
      "val_psnr": float(np.mean(m["psnr"][-1])),
      "val_psnr_ema": float(np.mean(m["psnr_ema"][-1])),
    }

  timing = loop.Timing()
  val = {}
  if start == 0:  # the random init's validation: the baseline every later row is read against
    val = validate(state.params)
    rows = [dict(step=0, inner_loss="", meta_lr="", tasks_per_s="", seconds=0.0, **val)]
    write_progress(cfg.workdir, rows)
  baseline = {k: float(rows[0][k]) for k in ("val_loss", "val_psnr")}

  def chunk(state, done, length):
    t, losses = time.perf_counter(), []
    for step in range(done, done + length):
      clean, noisy, sigmas = sample_tasks(cfg, images, step)
      runs = [TASK_RUNS + step * cfg.tasks + i for i in range(cfg.tasks)]
      fitted, m = fit_tasks(net, fit_cfg, state.params, noisy, xbar(noisy, sigmas), runs=runs)
      params = reptile_update(state.params, fitted, jnp.float32(meta_lr(cfg, step)))
      state = MetaState(step=state.step + 1, params=params)
      losses.append(float(np.mean(m["loss"][-1])))
    return state, {"inner_loss": float(np.mean(losses)), "tasks_per_s": length * cfg.tasks / (time.perf_counter() - t)}

  def after_chunk(state, step, m):
    nonlocal val
    evaluated = step % cfg.val_every == 0 or step == cfg.meta_steps
    val = validate(state.params) if evaluated else {}
    row = dict(step=step, meta_lr=meta_lr(cfg, step - 1), seconds=time.perf_counter() - timing.start, **m)
    rows.append(dict(row, **{k: val.get(k, "") for k in ("val_loss", "val_psnr", "val_psnr_ema")}))
    write_progress(cfg.workdir, rows)
    shown = f"  val psnr {val['val_psnr']:.2f} (random init {baseline['val_psnr']:.2f})" if val else ""
    return f"inner loss {m['inner_loss']:.5f}{shown}", False

  def save(state, done):
    checkpoint.save(checkpoint_path(cfg.workdir), done, state, {})
    inits.save(init_path(cfg.workdir), state.params, net, dict(info, meta_steps=done))

  progress = loop.Progress("meta ", cfg.tasks, "tasks")
  state, _, _ = loop.run(
    chunk, state, start, cfg.meta_steps, cfg.log_every, progress, after_chunk, save, cfg.checkpoint_every,
    save_last=True, timing=timing,
  )  # fmt: skip
  if not val:  # nothing left to learn (a run killed after its last checkpoint): validate it now
    val = validate(state.params)
  summary = {
    **outputs.provenance(),
    "method": cfg.method,
    "steps": cfg.meta_steps,
    **val,
    "val_loss_random_init": baseline["val_loss"],
    "val_psnr_random_init": baseline["val_psnr"],
    "val_steps": cfg.val_steps,
    "val_sigma": cfg.val_sigma,
    "train_seconds": time.perf_counter() - timing.start,
    "steps_this_call": int(state.step) - start,
    "resumed_from": start if cfg.resume else None,
    "init": init_path(cfg.workdir),
  }
  outputs.write_json(os.path.join(cfg.workdir, "summary.json"), summary)
  return summary


def write_progress(workdir: str, rows: list[dict]) -> None:
  """progress.csv every log interval; progress.png (validation PSNR against meta steps) when one is new."""
  outputs.write_csv(os.path.join(workdir, "progress.csv"), CSV_COLUMNS, rows)
  val = [(int(r["step"]), float(r["val_psnr"])) for r in rows if r["val_psnr"] != ""]
  if val and rows[-1]["val_psnr"] != "":
    lines = {"validation, after the fit's steps": (*zip(*val), "o-")}
    outputs.plot_xy(os.path.join(workdir, "progress.png"), "meta-learned init", lines, "meta step", "PSNR (dB)")
