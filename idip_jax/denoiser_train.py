"""Training the preliminary denoisers in JAX: DnCNN (Zhang et al., TIP 2017: residual
learning, BatchNorm, 17 3x3 conv layers of 64 filters, patches of Train400) with clean targets,
or Noise2Noise (Lehtinen et al., ICML 2018: the same net, the target a second, independent noisy
draw of the same patch, no clean image in the loss).

The whole pipeline runs on the device: Train400 is one array there; each step draws its patches,
dihedral augmentations, noise levels and noise from fold_in(seed key, step), so a run resumed from
a checkpoint takes exactly the steps an uninterrupted one would. The loop (loop.run) and the
checkpoints (checkpoint.py, one .npz) are the DIP fits' own; the net is denoisers.DnCNN.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from idip_jax import checkpoint, data, locks, loop, metrics, outputs
from idip_jax.config_train import TrainConfig, check_intervals
from idip_jax.data import InputError
from idip_jax.denoisers import DnCNN
from idip_jax.stored import check_training_resume

CSV_COLUMNS = ("step", "loss", "train_psnr", "val_psnr", "lr", "patches_per_s", "seconds")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  batch_stats: dict  # BatchNorm's running statistics (inference uses them)
  opt_state: optax.OptState


def make_dncnn(cfg: TrainConfig) -> DnCNN:
  """The training-time DnCNN: depth convs of width channels (the last back to the image's), BatchNorm."""
  return DnCNN((cfg.width,) * (cfg.depth - 1) + (cfg.channels,), batch_norm=True)


def lr_schedule(cfg: TrainConfig) -> optax.Schedule:
  """lr, then lr/10 from lr_drop of the steps: the official MatConvNet training code's schedule
  (Demo_Train_model_64_25_Res_Bnorm_Adam.m: 1e-3 for 30 epochs, 1e-4 for 20)."""
  return optax.piecewise_constant_schedule(cfg.lr, {int(cfg.steps * cfg.lr_drop): 0.1})


def make_dncnn_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  return optax.adam(lr_schedule(cfg))


def create_train_state(cfg: TrainConfig, key: jax.Array) -> TrainState:
  model, tx = make_dncnn(cfg), make_dncnn_optimizer(cfg)
  variables = model.init(key, jnp.zeros((1, cfg.patch, cfg.patch, cfg.channels), jnp.float32), train=False)
  params = variables["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables["batch_stats"], opt_state=tx.init(params)
  )


def dihedral(x_HxWxC: jax.Array, k: jax.Array) -> jax.Array:
  """One of the 8 flips/rotations (DnCNN's data_augmentation modes 0-7)."""
  flips = [x_HxWxC, x_HxWxC[::-1]]
  cands = [jnp.rot90(f, r, axes=(0, 1)) for f in flips for r in range(4)]
  return jax.lax.switch(k, [lambda c=c: c for c in cands])


def sample_batch(cfg: TrainConfig, images_NxHxWxC: jax.Array, key: jax.Array) -> dict[str, jax.Array]:
  """A batch of random augmented patches with noise drawn now: input = clean + n1 and target =
  clean (supervised) or clean + n2 (Noise2Noise: n2 independent of n1, same sigma)."""
  n, h, w, c = images_NxHxWxC.shape
  p, b = cfg.patch, cfg.batch
  k_img, k_y, k_x, k_aug, k_sig, k_in, k_tgt = jax.random.split(key, 7)
  idx = jax.random.randint(k_img, (b,), 0, n)
  ys, xs = jax.random.randint(k_y, (b,), 0, h - p + 1), jax.random.randint(k_x, (b,), 0, w - p + 1)
  crop = lambda i, y, x: jax.lax.dynamic_slice(images_NxHxWxC[i], (y, x, 0), (p, p, c))
  clean = jax.vmap(crop)(idx, ys, xs)
  clean = jax.vmap(dihedral)(clean, jax.random.randint(k_aug, (b,), 0, 8))
  # Blind training (DnCNN-B: sigma in [0, 55]): a level per patch.
  hi = max(cfg.sigma_max, cfg.sigma)
  sigma = jax.random.uniform(k_sig, (b, 1, 1, 1), jnp.float32, cfg.sigma, hi) / 255.0
  noisy = clean + sigma * jax.random.normal(k_in, clean.shape, jnp.float32)
  target = clean if cfg.target == "clean" else clean + sigma * jax.random.normal(k_tgt, clean.shape, jnp.float32)
  return {"input": noisy, "target": target, "clean": clean}


def dncnn_step(
  model: DnCNN, tx: optax.GradientTransformation, cfg: TrainConfig, state: TrainState, images, key: jax.Array
) -> tuple[TrainState, dict]:
  """One Adam step on a fresh batch (drawn from fold_in(key, step)); loss = MSE(output, target)."""
  batch = sample_batch(cfg, images, jax.random.fold_in(key, state.step))

  def loss_fn(params):
    out, upd = model.apply(
      {"params": params, "batch_stats": state.batch_stats}, batch["input"], train=True, mutable=["batch_stats"]
    )
    return jnp.mean(jnp.square(out - batch["target"])), (out, upd["batch_stats"])

  (loss, (out, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new = state.replace(
    step=state.step + 1, params=optax.apply_updates(state.params, updates), batch_stats=stats, opt_state=opt_state
  )
  # Against the clean patch, for monitoring only (Noise2Noise's loss never sees it).
  psnr = jax.vmap(functools.partial(metrics.psnr, clip=False))(out, batch["clean"])
  return new, {"loss": loss, "train_psnr": jnp.mean(psnr)}


def make_denoise(model: DnCNN):
  """(params, batch_stats, noisy_NxHxWxC) -> denoised, BatchNorm on its running statistics."""
  return jax.jit(lambda params, stats, x: model.apply({"params": params, "batch_stats": stats}, x, train=False))


def load_training_images(cfg: TrainConfig) -> np.ndarray:
  folder = cfg.train_dir or os.path.join(data.shared_dir(), "data", "Train400")
  return data.load_square_set(folder, cfg.channels, cfg.patch, "train_dir", "training")


def load_validation(cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
  """(noisy, clean) NxSxSxC: center crops of the first val_images of --val_dir, seeded noise."""
  folder = cfg.val_dir or os.path.join(data.shared_dir(), "data", "Set12")
  clean, noisy = data.load_validation_crops(
    folder, cfg.val_images, cfg.channels, cfg.val_crop, cfg.val_sigma, "float", "val_crop"
  )
  return noisy, clean


def checkpoint_path(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints", "train.npz")


def restore(workdir: str, like: TrainState) -> TrainState:
  """The last checkpoint of a training run (checkpoint.py's, as a fit's), shaped like `like`."""
  path = checkpoint_path(workdir)
  if not os.path.isfile(path):
    raise InputError(f"{workdir}: no checkpoint to load")
  try:
    return checkpoint.load(path, like)[1]
  except checkpoint.Damaged as e:
    raise InputError(str(e)) from None


# Settings a --resume may change: where and how often it writes, not what it trains.
RESUME_FREE = ("workdir", "resume", "overwrite", "checkpoint_every", "log_every", "eval_every")


def check_resume(cfg: TrainConfig) -> dict | None:
  """--resume's rule, as run.py's: the stored run's folder and the same settings; a finished run's summary."""
  return check_training_resume(cfg.workdir, dataclasses.asdict(cfg), RESUME_FREE, cfg.steps, "val_psnr")


@locks.held()
def train(cfg: TrainConfig) -> dict:
  """Trains (or resumes) the denoiser of `cfg` in cfg.workdir: checkpoints, progress.csv,
  progress.png (validation PSNR vs step) and summary.json."""
  check_intervals(cfg, ("eval_every", "checkpoint_every"))
  images = jnp.asarray(load_training_images(cfg))
  val_noisy, val_clean = map(jnp.asarray, load_validation(cfg))
  if cfg.resume:
    stored = check_resume(cfg)
    if stored is not None:
      return stored
  else:
    outputs.prepare_workdir(cfg.workdir, cfg.overwrite, tuple(p for p in (cfg.train_dir, cfg.val_dir) if p))
    outputs.write_json(os.path.join(cfg.workdir, "config.json"), dataclasses.asdict(cfg))
  model, tx = make_dncnn(cfg), make_dncnn_optimizer(cfg)
  key = jax.random.key(cfg.seed)
  state = create_train_state(cfg, jax.random.fold_in(key, 1))
  rows = []
  csv_path = os.path.join(cfg.workdir, "progress.csv")
  if cfg.resume and os.path.isfile(checkpoint_path(cfg.workdir)):
    state = restore(cfg.workdir, state)
    rows = outputs.read_csv_until(csv_path, int(state.step))
    logging.info("resumed %s at step %d", cfg.workdir, int(state.step))
  step_fn = jax.jit(functools.partial(dncnn_step, model, tx, cfg), donate_argnums=0)
  denoise = make_denoise(model)
  data_key = jax.random.fold_in(key, 2)
  start = int(state.step)
  val_psnr = float("nan")

  def validation_psnr(state) -> float:
    out = denoise(state.params, state.batch_stats, val_noisy)
    return float(jnp.mean(jax.vmap(metrics.psnr)(out, val_clean)))

  def chunk(state, done, length):
    t, ms = time.perf_counter(), []
    for _ in range(length):
      state, m = step_fn(state, images, data_key)
      ms.append(m)
    ms = jax.device_get(ms)  # one transfer per log interval
    return state, {"steps": ms, "patches_per_s": length * cfg.batch / (time.perf_counter() - t)}

  def after_chunk(state, step, m):
    nonlocal val_psnr
    evaluated = step % cfg.eval_every == 0 or step == cfg.steps
    if evaluated:
      val_psnr = validation_psnr(state)
    row = {
      "step": step,
      "loss": float(np.mean([s["loss"] for s in m["steps"]])),
      "train_psnr": float(np.mean([s["train_psnr"] for s in m["steps"]])),
      "val_psnr": val_psnr if evaluated else "",
      "lr": float(lr_schedule(cfg)(step - 1)),
      "patches_per_s": m["patches_per_s"],
      "seconds": time.perf_counter() - timing.start,
    }
    rows.append(row)
    write_progress(cfg.workdir, rows, plot=evaluated)
    return f"loss {row['loss']:.5f}  train psnr {row['train_psnr']:.2f}  val psnr {val_psnr:.2f}", False

  timing = loop.Timing()
  save = lambda state, done: checkpoint.save(checkpoint_path(cfg.workdir), done, state, {})
  progress = loop.Progress("", cfg.batch, "patches")
  state, _, _ = loop.run(
    chunk,
    state,
    start,
    cfg.steps,
    cfg.log_every,
    progress,
    after_chunk,
    save,
    cfg.checkpoint_every,
    save_last=True,
    timing=timing,
  )
  if np.isnan(val_psnr):  # nothing left to train (a run killed after its last checkpoint): validate it now
    val_psnr = validation_psnr(state)
  summary = {
    **outputs.provenance(),
    "target": cfg.target,
    "sigma": [cfg.sigma, max(cfg.sigma, cfg.sigma_max)],
    "steps": cfg.steps,
    "val_psnr": val_psnr,
    "val_sigma": cfg.val_sigma,
    "train_seconds": time.perf_counter() - timing.start,
    "steps_this_call": int(state.step) - start,
    "resumed_from": start if cfg.resume else None,
  }
  outputs.write_json(os.path.join(cfg.workdir, "summary.json"), summary)
  return summary


def write_progress(workdir: str, rows: list[dict], plot: bool) -> None:
  """progress.csv every log interval; progress.png when a validation PSNR is new."""
  outputs.write_csv(os.path.join(workdir, "progress.csv"), CSV_COLUMNS, rows)
  if not plot:
    return
  val = [(int(r["step"]), float(r["val_psnr"])) for r in rows if r["val_psnr"] != ""]
  train = [(int(r["step"]), float(r["train_psnr"])) for r in rows]
  lines = {"validation": (*zip(*val), "o-"), "training batches": (*zip(*train), "-")} if val else {}
  outputs.plot_xy(os.path.join(workdir, "progress.png"), "denoiser training", lines, "step", "PSNR (dB)")


@functools.lru_cache(maxsize=8)
def load_denoiser(workdir: str, channels: int):
  """A denoiser this module trained (its workdir) as x -> x_bar, BatchNorm on running statistics."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise InputError(f"--weights={workdir}: not a training run of experiments/train_denoiser.py (no config.json)")
  with open(path) as f:
    cfg = TrainConfig(**{k: v for k, v in json.load(f).items() if k in TrainConfig.__dataclass_fields__})
  if cfg.channels != channels:
    raise InputError(f"--weights={workdir} is a DnCNN for {cfg.channels}-channel images, the input has {channels}")
  state = restore(workdir, create_train_state(cfg, jax.random.key(0)))
  denoise = make_denoise(make_dncnn(cfg))
  return lambda x: denoise(state.params, state.batch_stats, x)
