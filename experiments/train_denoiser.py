"""Train a DnCNN preliminary denoiser in JAX: supervised (clean targets) or Noise2Noise.

python experiments/train_denoiser.py --flagfile=experiments/train/dncnn_s25.flags
Writes --workdir: checkpoints/train.npz, progress.csv and progress.png (loss, patches/s, validation
PSNR), summary.json. Use the result as x_bar: python run.py --prelim=dncnn --weights=<workdir> ...
"""

from __future__ import annotations

import sys

from absl import flags

from idip_jax import cli, config, config_train, denoiser_train

# Its own flag set: the training settings share names (sigma, steps, lr...) with run.py's.
FV = flags.FlagValues()
config.define_flags(FV, config_train.TrainConfig)


def main(argv: list[str]) -> int:
  del argv
  cfg = config.from_flags(FV, config_train.TrainConfig)
  config.check(cfg)
  try:
    summary = denoiser_train.train(cfg)
  except KeyboardInterrupt:
    print(f"interrupted: checkpointed in {cfg.workdir}; the same command with --resume continues", file=sys.stderr)
    return 130
  print(f"{cfg.workdir}: validation PSNR {summary['val_psnr']:.2f} dB after {summary['steps']} steps")
  return 0


def entry(argv: list[str] | None = None) -> int:
  return cli.run_script(main, __doc__, FV, argv)


if __name__ == "__main__":
  sys.exit(entry())
