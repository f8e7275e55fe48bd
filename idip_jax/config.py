"""Every setting of a job in one place: frozen dataclasses (name, type, default, help, allowed
values), from which the absl flags of run.py and of every experiment script are generated
(config_flags.py: the generation, parsing, checks and usage, re-exported here).

The dataclasses are also the compile-cache keys (fit.make_fit_chunk is cached on NetConfig and
FitConfig), so a setting that changes the compiled program must live in one of them.
"""

from __future__ import annotations

import dataclasses
import types

from idip_jax.config_flags import (  # noqa: F401  (re-exported: config.parse, config.check, ...)
  HELP_ARGS,
  bounds_text,
  check,
  define_flags,
  flag_name,
  from_flags,
  leaves,
  markdown,
  option,
  parse,
  parse_argv,
  usage,
)
from idip_jax.data import NOISE_PROTOCOLS

SEED_MAX = 2**32 - 1  # numpy's default_rng takes no negative seed; JAX's keys hold 32 bits per word
# Upper bounds of the count and size flags: a step count past int32 would fit for ever (and overflow the
# step counter); no image side or crop is larger than this.
STEP_MAX = 10**7
SIDE_MAX = 65536


# IDIP's three changes per method (paper Sec. 3; ablations IDIP-1 and IDIP-2, Table 1 and 2).
@dataclasses.dataclass(frozen=True)
class Method:
  complex_connection: bool  # change (1)
  prelim_input: bool  # change (2): x_bar replaces z
  prelim_loss: bool  # change (3): + MSE(out, x_bar)


METHODS = types.MappingProxyType(
  {
    "dip": Method(False, False, False),
    "idip1": Method(True, False, False),
    "idip2": Method(True, True, False),
    "idip": Method(True, True, True),
  }
)
# Steps when --steps=0: where each method's mean PSNR (clean-input output) peaks on holdout9
# (gray, sigma 25, 256 px crops, H100; experiments/results/gpu_h100/HOLDOUT.md): DIP 1190 (run
# 3000), IDIP 1500 (the end of its 1500-step run, the curve flat within 0.01 dB from 1000).
# IDIP-1 (architecture only) takes DIP's count and IDIP-2 (x_bar input) IDIP's: not measured.
DEFAULT_STEPS = types.MappingProxyType({"dip": 1190, "idip1": 1190, "idip2": 1500, "idip": 1500})
PRELIMS = ("none", "bm3d", "file", "ffdnet", "dncnn", "bicubic", "sure_blend")  # prelim.REGISTRY implements each
# x_bar candidates a SURE blend can weigh (prelim.CANDIDATES): "_x8" = geometric self-ensemble, "noisy" = y itself.
SURE_CANDIDATES = ("ffdnet", "ffdnet_x8", "dncnn", "dncnn_x8", "bm3d", "noisy")
PRECISIONS = ("tf32", "fp32", "bf16")  # train.PRECISIONS implements each
ACTIVATIONS = ("leaky_relu", "relu", "elu")  # models.ACTIVATIONS implements each
STOPS = ("fixed", "wmv", "emv", "sure")  # train.stop_score: wmv, emv; sure_fit: sure
TASKS = ("denoise", "inpaint", "sr")  # tasks.degrade and the runner implement each
INPUT_DISTS = ("uniform", "normal")  # train.random_input draws each


@dataclasses.dataclass(frozen=True)
class NetConfig:
  in_channels: int = option(
    32,
    "input channels: DIP's random code z (its input_depth; 0 = the image's, as DRP's seed); the runner "
    "sets the image's channels when x_bar is the input (idip2, idip)",
    lo=0,
    hi=1024,
  )
  out_channels: int = option(3, "image channels (set by the runner from the images)", flag=None)
  scales: int = option(5, "U-Net scales (official: 5)", lo=1, hi=8)
  width: int = option(128, "channels of every down/up block (official skip_n33d = skip_n33u = 128)", lo=1, hi=4096)
  skip_channels: int = option(4, "channels of each skip (official skip_n11 = 4)", lo=0, hi=1024)
  complex_connection: bool = option(False, "IDIP change (1) (set by the runner from the method)", flag=None)
  cc_features: int = option(
    96, "width of the complex connection's FC layer (96: +2.47% params, the paper's 'about 2.4%')", lo=1, hi=4096
  )
  upsample: str = option("bilinear", "upsampling", choices=("bilinear", "nearest"))
  pad: str = option("reflection", "conv padding", choices=("reflection", "zero"))
  act: str = option("leaky_relu", "activation", choices=ACTIVATIONS)
  sigmoid: bool = option(True, "sigmoid on the output (DIP's need_sigmoid)", flag=None)
  conv: str = option(
    "auto",
    "convolution path, same values: lax (plain) | cpu (rewrites faster on XLA:CPU; convs.conv_cpu) | "
    "im2col (one dot over patches; convs.conv_im2col) | auto (cpu on CPU, "
    "lax elsewhere)",
    choices=("auto", "lax", "cpu", "im2col"),
  )
  batch_conv: str = option(
    "auto",
    "how a batch of runs (vmap, per-run weights) lowers each convolution, same values (convs.per_run_conv): "
    "loop (a dense convolution per run) | im2col (batched matmuls over patches) | hybrid (im2col for outputs up "
    "to --hybrid_side px, loop above) | grouped (vmap's grouped convolutions, the slow control) | auto (chosen by "
    "--batch_strategy=auto's timing, else the backend's measured default: convs.DEFAULT_BATCH_CONV)",
    choices=("auto", "grouped", "loop", "im2col", "hybrid"),
  )
  hybrid_side: int = option(
    32, "--batch_conv=hybrid: im2col for outputs up to this many px on a side", lo=1, hi=SIDE_MAX
  )


@dataclasses.dataclass(frozen=True)
class FitConfig:
  task: str = option(
    "denoise",
    "denoise | inpaint (fit the observed pixels of --mask) | sr (fit the Lanczos2-downsampled output to the "
    "low-resolution image, x --sr_factor); for inpaint and sr the inputs are ground truth and y is made from them",
    choices=TASKS,
  )
  sr_factor: int = option(4, "super-resolution factor (DIP's notebook: 4 or 8)", lo=2, hi=16)
  steps: int = option(
    0,
    "Adam steps; 0 = the method's default, chosen on holdout9 (config.DEFAULT_STEPS: dip/idip1 1190, idip2/idip 1500)",
    lo=0,
    hi=STEP_MAX,
  )
  lr: float = option(0.01, "Adam learning rate", lo=0, hi=10)
  lr_schedule: str = option("constant", "learning-rate schedule", choices=("constant", "cosine"))
  reg_noise_std: float = option(1.0 / 30.0, "std of the per-step perturbation of DIP's code z", lo=0, hi=10)
  xbar_noise_std: float = option(
    1.0 / 30.0, "std of the per-step perturbation of x_bar as input (idip2, idip)", lo=0, hi=10
  )
  input_is_prelim: bool = option(False, "the input is x_bar, not z (set by the runner)", flag=None)
  ema_decay: float = option(0.99, "EMA of the outputs (DIP's exp_weight)", lo=0, hi=1, hi_open=True)
  backtrack_db: float = option(5.0, "restore when PSNR(out, y) drops by more (0 = off)", lo=0, hi=100)
  backtrack: str = option(
    "safe",
    "safe (restore weights and Adam state, skip the step) | dip (the official notebook's closure)",
    choices=("safe", "dip"),
  )
  prelim_weight: float = option(
    1.0,
    "weight w of IDIP change (3): loss = MSE(out, y) + w MSE(out, "
    "x_bar); the runner sets 0 for methods without change (3)",
    lo=0,
    hi=1000,
  )
  input_scale: float = option(0.1, "z ~ U[0, input_scale] (DIP's 'noise' input, var=1/10)", lo=0, hi=100)
  chunk: int = option(100, "steps per compiled chunk; metrics reach the host once per chunk", lo=1, hi=STEP_MAX)
  seed: int = option(0, "seed of init, z and perturbations", lo=0, hi=SEED_MAX)
  seeds: int = option(1, "independent runs per image (reported each and averaged)", lo=1, hi=1000)
  precision: str = option(
    "tf32",
    "tf32 (JAX's f32 default: TF32 convs on GPUs) | fp32 (full) | bf16 (params and Adam state stay fp32)",
    choices=PRECISIONS,
  )
  eval_every: int = option(10, "metrics of the clean-input output and EMA every k steps", lo=1, hi=STEP_MAX)
  batch_strategy: str = option(
    "auto",
    "how one call fits its runs: auto (the backend's measured default, vmap:loop x4 on CPU; where the job is long "
    "enough to repay it, time the candidates within 3% of the fit's expected time and keep the fastest; cached in "
    "--batch_cache; batch_choice.py) | vmap (per-run weights, "
    "convolutions lowered by --batch_conv) | map (lax.map: one after another inside a loop) | unroll (a Python "
    "loop over the runs inside the compiled step)",
    choices=("auto", "vmap", "map", "unroll"),
  )
  loop: str = option(
    "auto", "scan | host | auto (host loop on CPU, lax.scan elsewhere)", choices=("auto", "scan", "host")
  )
  stop: str = option(
    "fixed",
    "when a run ends: fixed (after --steps) | wmv (ES-WMV, Wang et al. TMLR 2023: variance of the last "
    "--stop_window outputs) | emv (ES-EMV: its exponential moving variance); wmv/emv report the output and EMA "
    "at the step of lowest variance and freeze a run --stop_patience steps after it (no ground truth used) | "
    "sure (MC-SURE of the whole fit from a twin run fitted to y + eps b: the output and the EMA at the eval "
    "step of lowest SURE, and NAME_sure.png, the SURE blend of both with the --sure_candidates; needs --sigma)",
    choices=STOPS,
  )
  stop_window: int = option(100, "ES-WMV's window W of outputs (its buffer_size); ES-EMV's burn-in", lo=2, hi=STEP_MAX)
  stop_patience: int = option(
    1000, "steps without a new lowest variance before a run stops (ES-WMV's P)", lo=1, hi=STEP_MAX
  )
  stop_alpha: float = option(0.1, "ES-EMV's smoothing alpha", lo=0, hi=1)
  sure_diff: str = option(
    "forward",
    "--stop=sure's divergence: forward (one twin, y + eps b) | central (two, y +- eps b: no second-order "
    "bias, 1.5x the rows)",
    choices=("forward", "central"),
  )
  sure_eps: float = option(
    0.5, "--stop=sure: the twin's finite-difference step, y + eps b, as a fraction of sigma", lo=1e-6, hi=10.0
  )
  sure_twins: int = option(
    1,
    "--stop=sure: twins per run, each fitted to y + eps b_k with its own probe b_k; the divergence is their mean "
    "(Monte-Carlo error / sqrt(K); K more rows per run, 2K with central)",
    lo=1,
    hi=64,
  )
  shard: bool = option(True, "split the runs of a call over all local devices")
  remat: bool = option(False, "recompute each conv block in the backward pass (less memory)")
  train: tuple[str, ...] = option(
    ("weights", "norms"),
    "what a fit trains: weights (conv and FC kernels and biases), norms (BatchNorm scales and biases), seed (a "
    "trainable offset of the net's input, through a BatchNorm of its own: Deep Random Projector, Li et al. CVPR "
    "2023: --train=seed,norms); the rest stays as initialised",
    choices=("weights", "norms", "seed"),
  )
  data_loss: str = option("mse", "the data term: mse | rmse (its square root, DRP's)", choices=("mse", "rmse"))
  tv_weight: float = option(0.0, "+ w TV(out), the mean absolute difference of neighbours (DRP: 0.45)", lo=0, hi=100)
  input_dist: str = option(
    "uniform", "DIP's code z: uniform U[0, input_scale] | normal N(0, input_scale^2) (DRP's seed)", choices=INPUT_DISTS
  )


@dataclasses.dataclass(frozen=True)
class PrelimConfig:
  name: str = option("none", "preliminary denoiser for x_bar", choices=PRELIMS, flag="prelim")
  prelim_dir: str = option("", "folder of precomputed x_bar images for --prelim=file", path=True)
  weights_dir: str = option("", "official FFDNet/DnCNN .mat files (default ../shared/weights)", path=True)
  weights: str = option(
    "",
    "one explicit FFDNet/DnCNN .mat file (overrides --weights_dir), or for dncnn the --workdir of a "
    "DnCNN trained by experiments/train_denoiser.py",
    path=True,
  )
  x8: bool = option(False, "--prelim=ffdnet|dncnn: average over the 8 flips and rotations (geometric self-ensemble)")
  sure_candidates: tuple[str, ...] = option(
    ("ffdnet", "ffdnet_x8", "dncnn", "bm3d", "noisy"),
    "--prelim=sure_blend and --stop=sure: the x_bar candidates, blended per image with the weights that "
    "minimise MC-SURE (needs --sigma; dncnn is left out where no DnCNN-S was trained within 2.5 of sigma)",
    choices=SURE_CANDIDATES,
  )
  sure_probes: int = option(
    2, "--prelim=sure_blend, --stop=sure: Monte-Carlo probes per x_bar candidate for its divergence", lo=1, hi=64
  )


@dataclasses.dataclass(frozen=True)
class RunConfig:
  input: str = option("", "image file, folder, glob, or skimage:NAME (required)", path=True)
  workdir: str = option("", "output folder (default runs/<method>-<time>)", path=True)
  method: str = option("idip", "the method of this run", choices=tuple(METHODS), flag=None)
  sigma: float = option(0.0, "AWGN std (0-255 scale) added to clean inputs; 0 = inputs are noisy", lo=0, hi=255)
  noise_seed: int = option(0, "seed of the AWGN (shared by all methods)", lo=0, hi=SEED_MAX)
  noise: str = option(
    "float",
    "noisy image from clean: float (x + n) | clip (to [0, 1], DIP's notebooks) | uint8 (clipped and rounded to 8 bits)",
    choices=NOISE_PROTOCOLS,
  )
  image_channels: int = option(0, "0 = as stored, 1 = convert to gray, 3 = to RGB", choices=(0, 1, 3))
  mask: str = option(
    "bernoulli:0.5",
    "--task=inpaint: bernoulli:P (each pixel kept with probability P, seeded by --noise_seed and the image name), "
    "a mask file (white = observed), or a folder of NAME_mask.png beside the images",
  )
  sr_crop: bool = option(
    True, "--task=sr: center-crop the HR image to a multiple of 32 (DIP's enforse_div32='CROP'); off: it must divide"
  )
  crop: int = option(0, "center crop to this size (0 = whole image)", lo=0, hi=SIDE_MAX)
  init: str = option(
    "",
    "a stored initialisation of the net (the init.npz of experiments/meta_init.py, made for this method and net): "
    "every run starts from its parameters instead of a random draw ('' = random, DIP's)",
    path=True,
  )
  batch_size: int = option(
    0,
    "runs per call (0 = auto: under --batch_strategy=auto its choice; otherwise the most that fit the device's "
    "memory, 1 on CPU)",
    lo=0,
    hi=4096,
  )
  batch_cache: str = option(
    "",
    "--batch_strategy=auto: JSON cache of the choices per device kind, shape, net, fit settings and jax version "
    "('' = $XDG_CACHE_HOME or ~/.cache, then idip_jax/batch_choice.json; 'none' = time every run)",
    path=True,
  )
  save_images: bool = option(True, "write PNGs")
  save_float: bool = option(False, "also write every image as float32 .npy (lossless, as fitted)")
  resume: bool = option(
    False,
    "continue the run in --workdir: finished images are kept, an "
    "unfinished call restarts from its last checkpoint; the settings must be the same",
  )
  checkpoint_every: int = option(
    500,
    "steps between checkpoints of a running call, written at the first chunk end past each multiple (0 = none); "
    "Ctrl-C also writes one",
    lo=0,
    hi=STEP_MAX,
  )
  overwrite: bool = option(False, "replace a non-empty workdir that idip-jax made (others are refused)")
  prelim: PrelimConfig = PrelimConfig()
  net: NetConfig = NetConfig()
  fit: FitConfig = FitConfig()


@dataclasses.dataclass(frozen=True)
class JobConfig:
  """What run.py runs: one or several methods on the same inputs, noise and x_bar."""

  methods: tuple[str, ...] = option(
    ("idip",),
    "dip | idip1 | idip2 | idip, or several (dip,idip): each in workdir/<method>, then compared",
    flag="method",
    choices=tuple(METHODS),
  )
  distributed: bool = option(False, "jax.distributed: each process fits its share of the images")
  coordinator: str = option("", "host:port of process 0 (--distributed; empty = auto-detect)")
  num_processes: int = option(0, "processes in all (--distributed; 0 = auto-detect)", lo=0, hi=65536)
  process_id: int = option(-1, "this process's index (--distributed; -1 = auto-detect)", lo=-1, hi=65535)
  cpu_processes: int = option(
    0,
    "processes on this machine, each on one core with one thread, fitting every N-th image (0 = auto: one per core "
    "on CPU under --batch_strategy=auto when the job's expected time says it pays; 1 = one process)",
    lo=0,
    hi=1024,
  )
  compile_cache: str = option(
    "",
    "folder of JAX's persistent compilation cache, so reruns skip XLA's compile ('' = $IDIP_JAX_CACHE or "
    "~/.cache/idip-jax/jax; none = off)",
    path=True,
  )
  run: RunConfig = RunConfig()


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Flags the experiment scripts share; each script adds its own, named nowhere else."""

  out: str = option("", "results path without extension (default: the script's)", path=True)
  data_dir: str = option("", "folder holding the test sets (default $IDIP_SHARED/data or ../shared/data)", path=True)
  max_images: int = option(0, "first N images of each set (0 = all)", lo=0, hi=100000)
  allow_other_code: bool = option(
    False,
    "tables.py, faithfulness.py: reuse finished jobs made by other code (e.g. stored GPU runs); each table row "
    "records the commit and code hash of its job",
  )
  dry_run: bool = option(False, "tables.py, bench.py and the studies (harness/catalogue.py): list, run nothing")
  smoke: bool = option(
    False,
    "tables.py, noise_protocol.py, prelim_psnr.py: 32 px crops of 3 images (fits: config.TINY_NET, 4 steps): the "
    "plumbing only",
  )
  lowerings: tuple[str, ...] = option(
    ("loop", "im2col", "hybrid", "grouped"),
    "bench.py, batch_equality.py: the --batch_conv lowerings of vmapped calls to compare (grouped: plain vmap, "
    "the control); bench.py also takes the --batch_strategy values map and unroll",
    choices=("loop", "im2col", "hybrid", "grouped", "map", "unroll"),
  )


def apply_method(method: str, net: NetConfig, fit: FitConfig, channels: int) -> tuple[NetConfig, FitConfig]:
  """The net and fit of `method` on `channels`-channel images: its three IDIP changes (the complex connection, x_bar
  as the input with the image's channels, the x_bar loss weight: 0 without change 3) and the image's channels."""
  m = METHODS[method]
  net = dataclasses.replace(
    net,
    out_channels=channels,
    complex_connection=m.complex_connection,
    in_channels=channels if m.prelim_input or not net.in_channels else net.in_channels,
  )
  fit = dataclasses.replace(
    fit, prelim_weight=fit.prelim_weight if m.prelim_loss else 0.0, input_is_prelim=m.prelim_input
  )
  return net, fit


# The smallest net that exercises every code path (2 scales, complex connection included):
# tests, the smoke tables and CPU plumbing checks use it, nothing else.
TINY_NET = NetConfig(in_channels=4, scales=2, width=8, skip_channels=2, cc_features=4)
