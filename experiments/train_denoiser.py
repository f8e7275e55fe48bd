"""Train a DnCNN preliminary denoiser in JAX: supervised (clean targets) or Noise2Noise (issue 17).

python experiments/train_denoiser.py --flagfile=experiments/train/dncnn_s25.flags
Writes --workdir: checkpoints/train.npz, progress.csv and progress.png (loss, patches/s, validation
PSNR), summary.json. Use the result as x_bar: python run.py --prelim=dncnn --weights=<workdir> ...
"""

from __future__ import annotations

import os
import sys

from absl import flags, logging

from idip_jax import cli, config, denoiser_train
from idip_jax.data import InputError

# Its own flag set: the training settings share names (sigma, steps, lr...) with run.py's.
FV = flags.FlagValues()
config.define_flags(FV, config.TrainConfig)


def main(argv: list[str]) -> int:
  if config.HELP_ARGS & set(argv[1:]):
    print(config.usage(__doc__, FV, config.TrainConfig))
    return 0
  logging.use_absl_handler()
  logging.set_verbosity(logging.INFO)
  try:
    cfg = config.parse(FV, argv, config.TrainConfig)
    config.check(cfg)
    with cli.stop_on_ctrl_c(lambda: os._exit(130)):
      summary = denoiser_train.train(cfg)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"interrupted: checkpointed in {cfg.workdir}; the same command with --resume continues", file=sys.stderr)
    return 130
  print(f"{cfg.workdir}: validation PSNR {summary['val_psnr']:.2f} dB after {summary['steps']} steps")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
