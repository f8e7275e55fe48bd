"""The training scripts' settings (a DnCNN for x_bar, a meta-learned init for --init), beside run.py's in
config.py, and docs/flags.md, generated from them all."""

from __future__ import annotations

import dataclasses

from idip_jax.config import (
  SEED_MAX,
  SIDE_MAX,
  STEP_MAX,
  ExperimentConfig,
  FitConfig,
  JobConfig,
  NetConfig,
  markdown,
  option,
)
from idip_jax.data import InputError


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Training a DnCNN preliminary denoiser (idip_jax.denoiser_train, experiments/train_denoiser.py)."""

  workdir: str = option("runs/train_denoiser", "output folder: checkpoints, progress.csv/png, summary.json", path=True)
  train_dir: str = option("", "training images (default $IDIP_SHARED/data/Train400)", path=True)
  val_dir: str = option("", "validation images (default $IDIP_SHARED/data/Set12)", path=True)
  target: str = option(
    "clean",
    "clean (supervised DnCNN) | noisy (Noise2Noise: a second, independent noisy draw)",
    choices=("clean", "noisy"),
  )
  sigma: float = option(25.0, "noise std (0-255) of the training patches", lo=0, hi=255)
  sigma_max: float = option(
    0.0, "blind training: each patch's std ~ U[sigma, sigma_max] (DnCNN-B: 0, 55)", lo=0, hi=255
  )
  channels: int = option(1, "image channels (Train400 is gray)", choices=(1, 3))
  depth: int = option(17, "conv layers (DnCNN-S: 17, DnCNN-B: 20)", lo=3, hi=200)
  width: int = option(64, "filters per layer", lo=1, hi=4096)
  patch: int = option(40, "patch side (DnCNN-S: 40, DnCNN-B: 50)", lo=8, hi=SIDE_MAX)
  batch: int = option(128, "patches per step (DnCNN: 128)", lo=1, hi=65536)
  # DnCNN-S: 50 epochs of 238,400 patches (Train400 at scales 1/0.9/0.8/0.7, 40 px, stride 10) / 128.
  steps: int = option(93125, "Adam steps (default: the paper's 50 epochs)", lo=1, hi=STEP_MAX)
  lr: float = option(1e-3, "Adam learning rate", lo=0, hi=10)
  lr_drop: float = option(
    0.6, "fraction of the steps after which lr is divided by 10 (official: epoch 30 of 50)", lo=0, hi=1
  )
  seed: int = option(0, "seed of the init, patches, augmentations and noise", lo=0, hi=SEED_MAX)
  log_every: int = option(50, "steps per progress line and progress.csv row", lo=1, hi=STEP_MAX)
  eval_every: int = option(500, "steps between validation PSNRs (a multiple of --log_every)", lo=1, hi=STEP_MAX)
  checkpoint_every: int = option(500, "steps between checkpoints (a multiple of --log_every)", lo=1, hi=STEP_MAX)
  val_images: int = option(4, "validation: the first N images of --val_dir", lo=1, hi=100000)
  val_crop: int = option(128, "validation: center crop side", lo=8, hi=SIDE_MAX)
  val_sigma: float = option(25.0, "validation: noise std (seeded AWGN, not clipped)", lo=0, hi=255)
  resume: bool = option(False, "continue the run in --workdir from its last checkpoint")
  overwrite: bool = option(False, "replace a --workdir that idip-jax made")


@dataclasses.dataclass(frozen=True)
class MetaConfig:
  """Meta-learning an initialisation of the net for --init (idip_jax.meta_train, experiments/meta_init.py): Reptile
  (Nichol et al. 2018) whose inner loop is the engine's batched fit, as MetaDIP (Zhang et al. 2022) proposes."""

  workdir: str = option(
    "runs/meta_init", "output folder: init.npz, checkpoints, progress.csv/png, summary.json", path=True
  )
  train_dir: str = option("", "training images (default $IDIP_SHARED/data/Train400; never a test set)", path=True)
  val_dir: str = option(
    "", "validation images (default $IDIP_SHARED/data/holdout9, where settings are chosen)", path=True
  )
  method: str = option(
    "dip", "the method the init is for: dip (z input) | idip (x_bar from FFDNet)", choices=("dip", "idip")
  )
  weights_dir: str = option("", "--method=idip: the official FFDNet .mat files (default ../shared/weights)", path=True)
  channels: int = option(1, "image channels (Train400 is gray)", choices=(1, 3))
  crop: int = option(64, "side of the training crops (a multiple of 2^scales)", lo=4, hi=SIDE_MAX)
  tasks: int = option(4, "crops per meta step, fitted as one batched call", lo=1, hi=4096)
  inner_steps: int = option(20, "Adam steps of each task's fit from the current init", lo=1, hi=STEP_MAX)
  meta_steps: int = option(200, "outer (Reptile) updates", lo=1, hi=STEP_MAX)
  meta_lr: float = option(
    1.0, "Reptile's step: init += meta_lr (mean fitted params - init), to 0 linearly", lo=0, hi=10
  )
  sigma: float = option(15.0, "noise std (0-255) of the tasks: each ~ U[sigma, sigma_max]", lo=0, hi=255)
  sigma_max: float = option(50.0, "the tasks' highest noise std (0-255)", lo=0, hi=255)
  log_every: int = option(10, "meta steps per progress line and progress.csv row", lo=1, hi=STEP_MAX)
  val_every: int = option(50, "meta steps between validations (a multiple of --log_every)", lo=1, hi=STEP_MAX)
  checkpoint_every: int = option(
    50, "meta steps between checkpoints and init.npz (a multiple of --log_every)", lo=1, hi=STEP_MAX
  )
  val_images: int = option(3, "validation: the first N images of --val_dir", lo=1, hi=100000)
  val_steps: int = option(100, "validation: Adam steps of each fit from the init", lo=1, hi=STEP_MAX)
  val_sigma: float = option(25.0, "validation: noise std (clipped, as DIP's notebooks)", lo=0, hi=255)
  resume: bool = option(False, "continue the run in --workdir from its last checkpoint")
  overwrite: bool = option(False, "replace a --workdir that idip-jax made")
  net: NetConfig = NetConfig()
  # --seed (fit.seed): the first init, the crops, their noise and the codes z
  fit: FitConfig = FitConfig()


def check_intervals(cfg, names: tuple[str, ...]) -> None:
  """Each of a trainer's intervals `names` is a multiple of its --log_every (they act at chunk ends)."""
  for name in names:
    if getattr(cfg, name) % cfg.log_every:
      raise InputError(f"--{name}={getattr(cfg, name)} must be a multiple of --log_every={cfg.log_every}")


def flags_markdown() -> str:
  """docs/flags.md: every flag of run.py, the experiment scripts and train_denoiser.py, from the
  dataclasses above (tests/test_readme.py fails when the file is stale). Regenerate with
  python -c 'from idip_jax import config_train; print(config_train.flags_markdown(), end="")' > docs/flags.md"""
  return markdown(
    (
      ("`run.py`", JobConfig),
      ("experiment scripts (`experiments/*.py`, beside run.py's)", ExperimentConfig),
      ("`experiments/train_denoiser.py`", TrainConfig),
      ("`experiments/meta_init.py`", MetaConfig),
    )
  )
