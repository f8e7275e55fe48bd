"""python run.py --flagfile=experiments/demo.flags: denoise images with DIP or IDIP.

Flags are generated from the config dataclasses (idip_jax/config.py), parsed once into a frozen
JobConfig and handed to idip_jax.runner.
"""

import os
import sys

from absl import flags

from idip_jax import cli, config
from idip_jax.data import InputError

config.define_flags(flags.FLAGS, config.JobConfig)


def main(argv: list[str]) -> int:
  if config.HELP_ARGS & set(argv[1:]):  # parsed without absl.app, which would define these
    print(config.usage(__doc__, flags.FLAGS, config.JobConfig))
    return 0
  try:
    job = config.parse(flags.FLAGS, argv, config.JobConfig)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return cli.run_cli(job, flags.FLAGS.flags_into_string())


if __name__ == "__main__":
  code = main(sys.argv)
  if code == 130:  # Ctrl-C mid-compute: XLA's threads may crash the interpreter's teardown (seen: SIGSEGV)
    sys.stdout.flush(), sys.stderr.flush(), os._exit(code)
  sys.exit(code)
