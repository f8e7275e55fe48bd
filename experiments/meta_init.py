"""Meta-learn an initialisation of the net (Reptile over Train400 crops; idip_jax.meta_train) for run.py --init.

python experiments/meta_init.py --flagfile=experiments/train/meta_dip.flags
Writes --workdir: init.npz (at every checkpoint and at the end), checkpoints/meta.npz, progress.csv and
progress.png (validation PSNR after --val_steps from the init, the random init's at step 0), summary.json.
Use it: python run.py --method=dip --init=<workdir>/init.npz ... (the same net flags).
"""

from __future__ import annotations

import sys

import numpy as np
from absl import flags

from idip_jax import cli, config, config_train, denoisers, meta_train

# Its own flag set: the meta settings share names (sigma, steps...) with run.py's.
FV = flags.FlagValues()
config.define_flags(FV, config_train.MetaConfig)


def ffdnet_xbar(cfg: config_train.MetaConfig) -> meta_train.MakeXbar:
  """IDIP's x_bar of each crop: the official FFDNet at the crop's own noise level (the paper's choice)."""
  net = denoisers.load_ffdnet(denoisers.ffdnet_path(cfg.weights_dir, cfg.channels), cfg.channels)
  return lambda noisy, sigmas: denoisers.ffdnet_denoise(net, noisy, np.asarray(sigmas, np.float32))


def main(argv: list[str]) -> int:
  del argv
  cfg = config.from_flags(FV, config_train.MetaConfig)
  meta_train.check(cfg, make_xbar=lambda *_: None)  # the settings first; the weights are read next
  make_xbar = ffdnet_xbar(cfg) if cfg.method == "idip" else None
  try:
    summary = meta_train.train(cfg, make_xbar)
  except KeyboardInterrupt:
    print(f"interrupted: checkpointed in {cfg.workdir}; the same command with --resume continues", file=sys.stderr)
    return 130
  print(
    f"{cfg.workdir}: validation PSNR {summary['val_psnr']:.2f} dB after {summary['val_steps']} steps from the "
    f"learned init (random init: {summary['val_psnr_random_init']:.2f}); use --init={summary['init']}"
  )
  return 0


def entry(argv: list[str] | None = None) -> int:
  return cli.run_script(main, __doc__, FV, argv)


if __name__ == "__main__":
  sys.exit(entry())
