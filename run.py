"""python run.py --flagfile=experiments/demo.flags  (flags -> frozen RunConfig -> idip_jax.runner.run)."""

import os
import sys

from absl import flags

from idip_jax import prelim, runner
from idip_jax.data import InputError
from idip_jax.fit import FitConfig
from idip_jax.models import NetConfig

F = flags.FLAGS
flags.DEFINE_string("input", None, "image file, folder, glob, or skimage:NAME")
flags.DEFINE_float("sigma", 0.0, "AWGN std (0-255 scale) added to clean inputs; 0 = inputs are noisy")
flags.DEFINE_integer("noise_seed", 0, "seed of the AWGN (shared by all methods)")
flags.DEFINE_string("noise", "float", "noisy image from clean: float (x + n) | clip (to [0, 1], DIP's "
                    "notebooks) | uint8 (clipped and rounded to 8 bits)")
flags.DEFINE_integer("channels", 0, "0 = as stored, 1 = convert to gray, 3 = to RGB")
flags.DEFINE_integer("crop", 0, "center crop to this size (0 = whole image)")
flags.DEFINE_list("method", ["idip"], "dip | idip1 | idip2 | idip, or several (dip,idip): each in "
                  "workdir/<method> on the same noise and x_bar, then compared")
flags.DEFINE_string("prelim", "none", "preliminary denoiser for x_bar: none | bm3d | file | ffdnet | dncnn")
flags.DEFINE_string("prelim_dir", "", "folder of precomputed x_bar images for --prelim=file")
flags.DEFINE_string("weights_dir", "", "official FFDNet/DnCNN .mat files (default ../shared/weights)")
flags.DEFINE_string("weights", "", "one explicit FFDNet/DnCNN .mat file (overrides --weights_dir)")
flags.DEFINE_float("prelim_weight", 1.0, "weight of MSE(out, x_bar) for --method=idip")
flags.DEFINE_integer("steps", 0, "Adam steps; 0 = the method's default, chosen on holdout9 "
                     "(runner.DEFAULT_STEPS: dip/idip1 1190, idip2/idip 1500)")
flags.DEFINE_float("lr", 0.01, "Adam learning rate")
flags.DEFINE_string("lr_schedule", "constant", "constant | cosine")
flags.DEFINE_float("reg_noise_std", 1.0 / 30.0, "std of the per-step perturbation of DIP's code z")
flags.DEFINE_float("xbar_noise_std", 1.0 / 30.0, "std of the per-step perturbation of x_bar as input "
                   "(idip2, idip)")
flags.DEFINE_float("ema_decay", 0.99, "EMA of the outputs")
flags.DEFINE_float("backtrack_db", 5.0, "restore when PSNR(out, y) drops by more (0 = off)")
flags.DEFINE_string("backtrack", "safe", "safe (restore weights and Adam state, skip the step) | dip "
                    "(the official notebook's closure)")
flags.DEFINE_integer("seed", 0, "seed of init, z and perturbations")
flags.DEFINE_integer("seeds", 1, "independent runs per image (reported each and averaged)")
flags.DEFINE_integer("chunk", 100, "steps per compiled lax.scan chunk")
flags.DEFINE_string("precision", "tf32", "tf32 (JAX's f32 default: TF32 convs on GPUs) | fp32 (full) | "
                    "bf16 (params and Adam state stay fp32)")
flags.DEFINE_integer("eval_every", 10, "metrics of the clean-input output and EMA every k steps")
flags.DEFINE_string("strategy", "vmap", "vmap (grouped convs) | map (runs one after another in a call)")
flags.DEFINE_string("loop", "auto", "scan | host | auto (host loop on CPU, lax.scan elsewhere)")
flags.DEFINE_integer("batch_size", 0, "runs per vmapped call (0 = auto: the most that fit the "
                     "device's memory, 1 on CPU)")
flags.DEFINE_bool("remat", False, "recompute each conv block in the backward pass (less memory)")
flags.DEFINE_bool("distributed", False, "jax.distributed: each process fits its share of the images")
flags.DEFINE_string("coordinator", "", "host:port of process 0 (--distributed; empty = auto-detect)")
flags.DEFINE_integer("num_processes", 0, "processes in all (--distributed; 0 = auto-detect)")
flags.DEFINE_integer("process_id", -1, "this process's index (--distributed; -1 = auto-detect)")
flags.DEFINE_integer("scales", 5, "U-Net scales")
flags.DEFINE_integer("net_channels", 128, "channels at every scale")
flags.DEFINE_integer("skip_channels", 4, "channels of each skip")
flags.DEFINE_integer("cc_features", 96, "width of the complex connection's FC layer")
flags.DEFINE_integer("input_depth", 32, "channels of DIP's random code z")
flags.DEFINE_string("upsample", "bilinear", "bilinear | nearest")
flags.DEFINE_string("pad", "reflection", "reflection | zero")
flags.DEFINE_string("act", "leaky_relu", "leaky_relu | relu | elu")
flags.DEFINE_string("workdir", "", "output folder (default runs/<method>-<time>)")
flags.DEFINE_bool("overwrite", False, "replace a non-empty workdir that idip-jax made (others are refused)")
flags.DEFINE_bool("save_images", True, "write PNGs")
flags.DEFINE_bool("resume", False, "continue the run in --workdir: finished images are kept, an "
                  "unfinished call restarts from its last checkpoint; the settings must be the same")
flags.DEFINE_integer("checkpoint_every", 10, "chunks between checkpoints of a running call (0 = none)")
flags.DEFINE_bool("save_float", False, "also write every image as float32 .npy (lossless, as fitted)")


def config_from_flags(method: str, workdir: str) -> runner.RunConfig:
  path = os.path.expanduser  # ~ in any path flag
  return runner.RunConfig(
      input=path(F.input), workdir=path(workdir), sigma=F.sigma, noise_seed=F.noise_seed,
      noise=F.noise, channels=F.channels, crop=F.crop, method=method,
      batch_size=F.batch_size, save_images=F.save_images, save_float=F.save_float, overwrite=F.overwrite,
      resume=F.resume, checkpoint_every=F.checkpoint_every,
      prelim=prelim.PrelimConfig(F.prelim, path(F.prelim_dir), path(F.weights_dir), path(F.weights), F.sigma, F.crop,
                                  F.batch_size),
      net=NetConfig(in_channels=F.input_depth, scales=F.scales, channels=F.net_channels,
                    skip_channels=F.skip_channels, cc_features=F.cc_features,
                    upsample=F.upsample, pad=F.pad, act=F.act),
      fit=FitConfig(steps=F.steps, lr=F.lr, lr_schedule=F.lr_schedule,
                    reg_noise_std=F.reg_noise_std, xbar_noise_std=F.xbar_noise_std, ema_decay=F.ema_decay,
                    backtrack_db=F.backtrack_db, backtrack=F.backtrack, prelim_weight=F.prelim_weight,
                    chunk=F.chunk, seed=F.seed, seeds=F.seeds, precision=F.precision,
                    eval_every=F.eval_every, strategy=F.strategy, loop=F.loop, remat=F.remat))


HELP_FLAGS = {"-h", "--help", "-help", "--helpfull", "-?"}


def print_help() -> None:
  print(f"{__doc__}\nusage: python run.py --flagfile=FILE [--name=value ...]\n\n"
        "  --flagfile: read flags from FILE (one --name=value per line, '#' comments; files may include "
        "others)\n" + F.module_help(sys.modules[__name__]))


def main(argv) -> int:
  if HELP_FLAGS & set(argv[1:]):  # flags are parsed without absl.app, which would define these
    print_help()
    return 0
  try:
    rest = F(argv)
    if len(rest) > 1:
      raise InputError(f"unexpected arguments: {' '.join(rest[1:])}")
    if not F.input:
      raise InputError("--input is required (a file, folder, glob or skimage:NAME)")
  except (flags.Error, InputError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  dist = (F.coordinator, F.num_processes, F.process_id) if F.distributed else None
  return runner.run_cli(F.method, F.workdir, config_from_flags, F.flags_into_string(), dist)

if __name__ == "__main__":
  sys.exit(main(sys.argv))
