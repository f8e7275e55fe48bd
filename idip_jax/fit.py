"""Pure-functional DIP/IDIP fitting: one train step, `lax.scan` chunks, `vmap` over runs.

A "run" is one (image, seed) fit. Every array of a run (parameters, Adam state,
EMA, backtracking snapshot, input, targets) carries a leading run axis N, so a
whole same-shape bucket of a test set is fitted by one compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from idip_jax import checkpoint, metrics
from idip_jax.models import NetConfig, SkipUNet, min_side

# name -> (compute dtype, lax precision of the convolutions). "tf32" is JAX's default for f32:
# TF32 tensor cores on Ampere/Hopper GPUs (as PyTorch's cuDNN convolutions, so DIP's own code),
# exact fp32 on CPU. "fp32" forces full fp32 (Precision.HIGHEST). "bf16": bf16 convolutions;
# parameters, Adam state, BatchNorm statistics and outputs stay fp32 in every mode.
PRECISIONS = {"tf32": (None, None), "fp32": (None, jax.lax.Precision.HIGHEST),
              "bf16": (jnp.bfloat16, None)}
LR_SCHEDULES = ("constant", "cosine")
LOOPS = ("auto", "scan", "host")
# How a call fits its runs: "vmap" (per-run weights become grouped convolutions) or "map"
# (lax.map: the runs one after another inside the compiled chunk, dense convolutions).
STRATEGIES = ("vmap", "map")
# What happens when PSNR(out, y) drops by more than backtrack_db. "safe": restore the last good
# parameters and Adam moments, skip the update, keep the bad output out of the EMA. "dip": the
# official denoising notebook's closure: restore the weights only, then still apply Adam's step
# with the diverged pass's gradients; its EMA keeps the bad output; the check is skipped when
# i % 100 == 0 (i: the notebook's counter, which does not advance on a fallback).
BACKTRACK_RULES = ("safe", "dip")
DIP_SHOW_EVERY = 100


def resolve_loop(loop: str) -> str:
  # XLA:CPU runs convolutions inside a while loop (lax.scan) ~15x slower than the
  # same step outside one (measured on this project's 2-core CI machine: 6.2 s vs
  # 0.43 s per step at 128 px, no XLA flag helps), and unrolling costs ~9 s of
  # compilation per step. So on CPU a chunk is a host loop over the jitted step,
  # still with donated buffers and one metrics transfer per chunk.
  if loop != "auto":
    return loop
  return "host" if jax.default_backend() == "cpu" else "scan"


@dataclasses.dataclass(frozen=True)
class FitConfig:
  steps: int = 3000  # runner.DEFAULT_STEPS per method when a RunConfig says 0
  lr: float = 0.01
  lr_schedule: str = "constant"
  reg_noise_std: float = 1.0 / 30.0  # DIP perturbs its code z each step by N(0, 1/30)
  xbar_noise_std: float = 1.0 / 30.0  # perturbation of x_bar when it is the input (IDIP-2/IDIP)
  input_is_prelim: bool = False  # set by runner.resolve: the input is x_bar, not z
  ema_decay: float = 0.99  # DIP's exp_weight
  backtrack_db: float = 5.0  # restore when PSNR(out, y) drops by more than this; 0 = off
  backtrack: str = "safe"  # BACKTRACK_RULES: safe (ours) | dip (the official notebooks' closure)
  prelim_weight: float = 1.0  # IDIP change (3): loss = MSE(out, y) + w * MSE(out, x_bar); the runner
  # sets 0 for methods without change (3), so the paper's weight lives here only
  input_scale: float = 0.1  # z ~ U[0, input_scale] (DIP's 'noise' input, var=1/10)
  chunk: int = 100  # steps per compiled lax.scan; metrics reach the host once per chunk
  seed: int = 0
  seeds: int = 1
  precision: str = "tf32"
  eval_every: int = 10  # metrics of the clean-input output every k steps (and at the last)
  strategy: str = "vmap"  # vmap | map: how one call fits its runs
  loop: str = "auto"  # scan | host | auto (host on CPU, scan elsewhere)
  shard: bool = True  # split the run axis over all local devices (one run never spans two)
  remat: bool = False  # keep only each conv block's input for the backward pass, recompute the rest


@flax.struct.dataclass
class FitState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_HxWxC: jax.Array
  good_params: Any  # last parameters whose output passed the backtracking test
  good_opt_state: Any
  good_psnr_y: jax.Array
  dip_i: jax.Array  # the official notebook's step counter i (backtrack="dip")


@flax.struct.dataclass
class Batch:
  input_HxWxC: jax.Array  # z (DIP) or x_bar (IDIP-2/IDIP)
  y_HxWxC: jax.Array  # noisy image
  prelim_HxWxC: jax.Array  # x_bar; ignored when prelim_weight = 0
  mask_HxWx1: jax.Array  # 1 on the original extent, 0 on reflect padding
  gt_HxWxC: jax.Array | None = None  # clean image, for metrics only


def run_keys(seed: int, run: int) -> dict[str, jax.Array]:
  """Named keys of one run; they depend on (seed, run index) only, never on the
  image or its place in a batch, so a batched fit equals single-image fits."""
  init, inp, noise = jax.random.split(jax.random.fold_in(jax.random.key(seed), run), 3)
  return {"init": init, "input": inp, "noise": noise}


def make_model(net_cfg: NetConfig, fit_cfg: FitConfig) -> SkipUNet:
  dtype, precision = PRECISIONS[fit_cfg.precision]
  return SkipUNet(net_cfg, dtype=dtype, precision=precision, remat=fit_cfg.remat)


def make_optimizer(fit_cfg: FitConfig) -> optax.GradientTransformation:
  lr = fit_cfg.lr
  if fit_cfg.lr_schedule == "cosine":
    lr = optax.cosine_decay_schedule(fit_cfg.lr, max(fit_cfg.steps, 1))
  return optax.adam(lr)


def random_input(key: jax.Array, height: int, width: int, channels: int, scale: float) -> jax.Array:
  return jax.random.uniform(key, (height, width, channels), jnp.float32, 0.0, scale)


def create_fit_state(model: SkipUNet, tx: optax.GradientTransformation, key: jax.Array,
                     height: int, width: int) -> FitState:
  # Parameter shapes do not depend on the image size, and Flax draws them from the
  # key and module path only, so initialising at the smallest valid size gives the
  # same parameters as at full size and one compiled init serves every bucket.
  side = min_side(model.cfg)
  params = model.init(key, jnp.zeros((1, side, side, model.cfg.in_channels), jnp.float32))["params"]
  opt_state = tx.init(params)
  ema = jnp.zeros((height, width, model.cfg.out_channels), jnp.float32)
  return FitState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                  ema_HxWxC=ema, good_params=params, good_opt_state=opt_state,
                  good_psnr_y=jnp.array(-jnp.inf, jnp.float32), dip_i=jnp.zeros((), jnp.int32))


def perturbed_input(cfg: FitConfig, input_HxWxC: jax.Array, step: jax.Array, key: jax.Array) -> jax.Array:
  """The net's input at `step`: z + N(0, reg_noise_std) (DIP), x_bar + N(0, xbar_noise_std) (IDIP)."""
  std = cfg.xbar_noise_std if cfg.input_is_prelim else cfg.reg_noise_std
  return input_HxWxC + std * jax.random.normal(jax.random.fold_in(key, step), input_HxWxC.shape, jnp.float32)


def train_step(model: SkipUNet, tx: optax.GradientTransformation, cfg: FitConfig,
               state: FitState, batch: Batch, key: jax.Array) -> tuple[FitState, dict]:
  """One Adam step on one run; `key` is the run's noise key (per-step noise is
  fold_in(key, step), so results do not depend on how steps are chunked)."""
  net_in = perturbed_input(cfg, batch.input_HxWxC, state.step, key)

  def loss_fn(params):
    out = model.apply({"params": params}, net_in[None])[0]
    loss = metrics.masked_mse(out, batch.y_HxWxC, batch.mask_HxWx1)
    if cfg.prelim_weight:
      loss += cfg.prelim_weight * metrics.masked_mse(out, batch.prelim_HxWxC, batch.mask_HxWx1)
    return loss, out

  (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  psnr_y = metrics.psnr(out, batch.y_HxWxC, batch.mask_HxWx1)
  # DIP's EMA averages the outputs of the perturbed-input passes (out_avg in its notebooks).
  ema = jnp.where(state.step == 0, out,
                  cfg.ema_decay * state.ema_HxWxC + (1.0 - cfg.ema_decay) * out)
  if cfg.backtrack == "dip":
    new_state, diverged = _backtrack_dip(tx, cfg, state, grads, psnr_y, ema)
  else:
    new_state, diverged = _backtrack_safe(tx, cfg, state, grads, psnr_y, ema)
  step_metrics = {"loss": loss, "psnr_y": psnr_y, "backtracked": diverged}
  if batch.gt_HxWxC is not None:
    # The training pass's output (perturbed input): an extra column, not the reported image.
    step_metrics["psnr_perturbed"] = metrics.psnr(out, batch.gt_HxWxC, batch.mask_HxWx1)
  return new_state, step_metrics


def _where(cond, a, b):
  return jax.tree_util.tree_map(lambda x, y: jnp.where(cond, x, y), a, b)


def _backtrack_safe(tx, cfg: FitConfig, state: FitState, grads, psnr_y, ema):
  """A drop of PSNR(out, y) by more than backtrack_db, or a non-finite one, means Adam diverged: go back to the last
  good parameters and Adam moments and skip the update; the bad output stays out of the EMA
  (it would carry it for ~100 steps)."""
  # A non-finite loss is a divergence too (NaN fails every comparison, so the drop test alone
  # would never fire and the run would stay NaN).
  diverged = (cfg.backtrack_db > 0) & ((psnr_y < state.good_psnr_y - cfg.backtrack_db)
                                       | ~jnp.isfinite(psnr_y))
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  return state.replace(
      step=state.step + 1,
      params=_where(diverged, state.good_params, new_params),
      opt_state=_where(diverged, state.good_opt_state, new_opt_state),
      ema_HxWxC=jnp.where(diverged, state.ema_HxWxC, ema),
      good_params=_where(diverged, state.good_params, state.params),
      good_opt_state=_where(diverged, state.good_opt_state, state.opt_state),
      good_psnr_y=jnp.where(diverged, state.good_psnr_y, psnr_y),
      dip_i=state.dip_i + 1), diverged


def _backtrack_dip(tx, cfg: FitConfig, state: FitState, grads, psnr_y, ema):
  """The official closure (denoising.ipynb): `if i % show_every: if psnr_noisy - last < -5:
  restore last_net; return loss * 0` (backward() already ran, so optimizer.step() applies the
  diverged gradients to the restored weights), `else: last_net = params; last = psnr_noisy`;
  `i += 1` only when no fallback. The EMA was updated before the check."""
  check = (cfg.backtrack_db > 0) & (state.dip_i % DIP_SHOW_EVERY != 0)
  diverged = check & (psnr_y - state.good_psnr_y < -cfg.backtrack_db)
  base = _where(diverged, state.good_params, state.params)
  updates, new_opt_state = tx.update(grads, state.opt_state, base)
  snapshot = check & ~diverged
  return state.replace(
      step=state.step + 1, params=optax.apply_updates(base, updates), opt_state=new_opt_state,
      ema_HxWxC=ema, good_params=_where(snapshot, state.params, state.good_params),
      good_psnr_y=jnp.where(snapshot, psnr_y, state.good_psnr_y),
      dip_i=state.dip_i + (~diverged).astype(jnp.int32)), diverged


EVAL_KEYS = ("psnr", "ssim", "psnr_ema", "ssim_ema")


def eval_step(model: SkipUNet, state: FitState, batch: Batch) -> dict:
  """Metrics of the images a fit reports after `state.step` steps: the output on the
  unperturbed input (what psnr_final measures at the end) and the EMA."""
  out = model.apply({"params": state.params}, batch.input_HxWxC[None])[0]
  gt, mask = batch.gt_HxWxC, batch.mask_HxWx1
  return {"psnr": metrics.psnr(out, gt, mask), "ssim": metrics.ssim(out, gt, mask),
          "psnr_ema": metrics.psnr(state.ema_HxWxC, gt, mask),
          "ssim_ema": metrics.ssim(state.ema_HxWxC, gt, mask)}


def is_eval_step(cfg: FitConfig, done: jax.Array | int) -> jax.Array | bool:
  """After `done` steps: every eval_every steps, and always after the last one."""
  return (done % cfg.eval_every == 0) | (done == cfg.steps)


def over_batch(f: Callable, strategy: str) -> Callable:
  """f on one run -> f on a leading run axis."""
  if strategy == "map":
    return lambda *args: jax.lax.map(lambda a: f(*a), args)
  return jax.vmap(f)


TRACE_COUNT = {"chunk": 0}  # incremented at trace time; tests assert no recompilation


def runs_mesh(n_dev: int) -> Mesh:
  # This process's devices only: under jax.distributed each host fits its own images.
  return Mesh(np.array(jax.local_devices()[:n_dev]), ("runs",), axis_types=(AxisType.Auto,))


def over_runs(f: Callable, n_dev: int, out_specs=PartitionSpec("runs"),
              in_specs=PartitionSpec("runs")) -> Callable:
  """f maps arrays with a leading run axis; with several devices each runs f on its own
  runs (shard_map), so one image never spans devices and no collective is needed.
  (Letting the SPMD partitioner split vmap's grouped convolutions fails in XLA.)"""
  if n_dev == 1:
    return f
  return jax.shard_map(f, mesh=runs_mesh(n_dev), in_specs=in_specs, out_specs=out_specs)


def _nan_like_eval(n: int) -> dict:
  return {k: jnp.full((n,), jnp.nan, jnp.float32) for k in EVAL_KEYS}


@functools.lru_cache(maxsize=64)
def make_fit_chunk(net_cfg: NetConfig, cfg: FitConfig, length: int, loop: str = "scan",
                   n_dev: int = 1) -> Callable:
  """(states_N, batch_N, keys_N, done) -> (states_N, metrics_TxN): `length` steps of all
  runs, `done` steps having run before. Eval metrics (EVAL_KEYS) are NaN on steps that
  is_eval_step skips. Cached by config, so refits of same-shape batches reuse the program."""
  model = make_model(net_cfg, cfg)
  step = over_batch(functools.partial(train_step, model, make_optimizer(cfg), cfg), cfg.strategy)
  evaluate = jax.vmap(functools.partial(eval_step, model))

  if loop == "scan":
    def scan_chunk(states, batch, keys, done):
      def body(s, t):
        s, m = step(s, batch, keys)
        if batch.gt_HxWxC is not None:
          # The predicate is the same for every run (not batched), so this stays a real
          # conditional: the clean-input forward pass runs only on eval steps.
          m.update(jax.lax.cond(is_eval_step(cfg, done + t + 1), lambda: evaluate(s, batch),
                                lambda: _nan_like_eval(keys.shape[0])))
        return s, m
      return jax.lax.scan(body, states, jnp.arange(length))

    run_spec = PartitionSpec("runs")
    sharded = over_runs(scan_chunk, n_dev, (run_spec, PartitionSpec(None, "runs")),
                        (run_spec, run_spec, run_spec, PartitionSpec()))

    def chunk(states, batch, keys, done):
      TRACE_COUNT["chunk"] += 1
      return sharded(states, batch, keys, jnp.asarray(done, jnp.int32))

    return jax.jit(chunk, donate_argnums=0)

  def counted_step(states, batch, keys):
    TRACE_COUNT["chunk"] += 1
    return over_runs(step, n_dev)(states, batch, keys)

  jit_step = jax.jit(counted_step, donate_argnums=0)
  jit_eval = jax.jit(over_runs(evaluate, n_dev))

  def host_chunk(states, batch, keys, done):
    per_step = []
    for t in range(length):
      states, m = jit_step(states, batch, keys)
      if batch.gt_HxWxC is not None:
        n = keys.shape[0]
        m.update(jit_eval(states, batch) if is_eval_step(cfg, done + t + 1) else _nan_like_eval(n))
      per_step.append(m)  # stays on device until the chunk ends
    return states, jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_step)

  return host_chunk


# A vmapped batch runs its per-run convolutions as grouped convolutions, which are slower per
# image than one run at a time on both backends measured: XLA:CPU (experiments/results/bench_cpu.md,
# 64 px: 165 ms per image-step at batch 2 vs 92 ms at batch 1) and an H100 (bench_gpu.md, 256 px:
# 204 image-steps/s at batch 1; 62 / 99 / 124 / 119 at batch 2 / 4 / 8 / 16). So "auto" fits one
# run per call under --strategy=vmap; the memory-aware sizing below serves --strategy=map.
VMAP_AUTO_BATCH = 1
MEMORY_HEADROOM = 0.85  # of the device's bytes_limit; XLA's estimate misses allocator slack


def lower_step(net_cfg: NetConfig, cfg: FitConfig, batch: int, height: int, width: int,
               with_gt: bool = True):
  """The jitted step over `batch` runs, lowered from shapes only (nothing is allocated); its
  pre-compile cost analysis counts every convolution on any backend."""
  model, tx = make_model(net_cfg, cfg), make_optimizer(cfg)
  step = jax.jit(over_batch(functools.partial(train_step, model, tx, cfg), cfg.strategy),
                 donate_argnums=0)
  keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch))
  states = jax.eval_shape(lambda k: init_states(net_cfg, cfg, k, height, width), keys)
  img = lambda c: jax.ShapeDtypeStruct((batch, height, width, c), jnp.float32)
  b = Batch(input_HxWxC=img(net_cfg.in_channels), y_HxWxC=img(net_cfg.out_channels),
            prelim_HxWxC=img(net_cfg.out_channels), mask_HxWx1=img(1),
            gt_HxWxC=img(net_cfg.out_channels) if with_gt else None)
  return step.lower(states, b, keys)


@functools.lru_cache(maxsize=64)
def compile_step(net_cfg: NetConfig, cfg: FitConfig, batch: int, height: int, width: int,
                 with_gt: bool = True):
  """lower_step, compiled: its memory analysis serves batch sizing and the benchmark."""
  return lower_step(net_cfg, cfg, batch, height, width, with_gt).compile()


def step_memory_bytes(net_cfg: NetConfig, cfg: FitConfig, batch: int, height: int, width: int,
                      with_gt: bool = True) -> int:
  """Device bytes one step over `batch` runs needs (arguments + outputs + temporaries), from
  XLA's memory analysis of the compiled step."""
  mem = compile_step(net_cfg, cfg, batch, height, width, with_gt).memory_analysis()
  if mem is None:
    raise RuntimeError("this backend gives no memory analysis")
  # Donated state buffers are reused for the outputs, so they are counted once.
  return int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes)


def device_memory_bytes() -> int | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get("bytes_limit")


def auto_batch_size(net_cfg: NetConfig, cfg: FitConfig, height: int, width: int, n_runs: int,
                    memory_bytes: int | None = None, with_gt: bool = True) -> int:
  """Runs per call: the largest batch whose compiled step fits in `memory_bytes` (default:
  the device's limit x MEMORY_HEADROOM), per device when the batch is sharded. Memory is
  affine in the batch, so two compiles (batch 1 and 2) give it. Calls are then balanced:
  10 runs with room for 8 become two calls of 5, not 8 + 2. Under --strategy=vmap: VMAP_AUTO_BATCH."""
  if memory_bytes is None:
    if cfg.strategy == "vmap" or jax.default_backend() == "cpu":
      return min(VMAP_AUTO_BATCH, n_runs)
    limit = device_memory_bytes()
    if limit is None:
      return 1
    memory_bytes = int(limit * MEMORY_HEADROOM)
  n_dev = jax.local_device_count() if cfg.shard else 1
  one = step_memory_bytes(net_cfg, cfg, 1, height, width, with_gt)
  per_run = max(step_memory_bytes(net_cfg, cfg, 2, height, width, with_gt) - one, 1)
  fits = max(1, (memory_bytes - (one - per_run)) // per_run) * n_dev
  calls = -(-n_runs // min(fits, n_runs))
  return -(-n_runs // calls)


def is_out_of_memory(e: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


@functools.lru_cache(maxsize=64)
def make_predict(net_cfg: NetConfig, cfg: FitConfig, n_dev: int = 1) -> Callable:
  """Output of each run on its unperturbed input (the "final" image)."""
  model = make_model(net_cfg, cfg)
  return jax.jit(over_runs(jax.vmap(lambda params, x: model.apply({"params": params}, x[None])[0]), n_dev))


@dataclasses.dataclass
class FitResult:
  final_NxHxWxC: np.ndarray
  ema_NxHxWxC: np.ndarray
  history: dict[str, np.ndarray]  # name -> steps x N
  seconds: float  # the whole call, compilation included
  compile_seconds: float | None = None  # estimated (None when the fit was one chunk)


@functools.lru_cache(maxsize=64)
def make_init(net_cfg: NetConfig, cfg: FitConfig) -> Callable:
  """init keys_N -> states_N (EMA sized later)."""
  return jax.jit(jax.vmap(functools.partial(create_fit_state, make_model(net_cfg, cfg),
                                            make_optimizer(cfg), height=1, width=1)))


def init_states(net_cfg: NetConfig, cfg: FitConfig, init_keys_N: jax.Array,
                height: int, width: int) -> FitState:
  states = make_init(net_cfg, cfg)(init_keys_N)
  ema = jnp.zeros((init_keys_N.shape[0], height, width, net_cfg.out_channels), jnp.float32)
  return states.replace(ema_HxWxC=ema)


def fit(net_cfg: NetConfig, cfg: FitConfig, batch: Batch, keys: list[dict[str, jax.Array]],
        log: Callable[[str], None] | None = None, label: str = "", ckpt_path: str | None = None,
        ckpt_every: int = 0) -> FitResult:
  """Fits N runs in parallel; `batch` arrays and `keys` have a leading axis N. With ckpt_path,
  the fit resumes from that checkpoint if it exists and saves one every ckpt_every chunks."""
  t0 = time.perf_counter()
  n_runs = len(keys)
  n_dev = jax.local_device_count() if cfg.shard else 1
  pad = (-n_runs) % n_dev
  if pad:  # repeat the last run so the run axis splits evenly; its copies are dropped below
    keys = list(keys) + [keys[-1]] * pad
    batch = jax.tree_util.tree_map(lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], pad, 0)]), batch)
  stack = lambda name: jnp.stack([k[name] for k in keys])
  h, w = batch.y_HxWxC.shape[1:3]
  states = init_states(net_cfg, cfg, stack("init"), h, w)
  noise_keys = stack("noise")
  if n_dev > 1:
    runs = NamedSharding(runs_mesh(n_dev), PartitionSpec("runs"))
    states, batch, noise_keys = jax.device_put((states, batch, noise_keys), runs)
  loop = resolve_loop(cfg.loop)
  history: dict[str, list[np.ndarray]] = {}
  done, first, steady = 0, None, [0, 0.0]  # first chunk (compiles): (steps, s); later: [steps, s]
  if ckpt_path and os.path.isfile(ckpt_path):
    done, states, history = checkpoint.load(ckpt_path, states)
    if n_dev > 1:
      states = jax.device_put(states, NamedSharding(runs_mesh(n_dev), PartitionSpec("runs")))
    if log is not None:
      log(f"{label}resumed at step {done} from {ckpt_path}")
  chunks = 0
  while done < cfg.steps:
    length = min(cfg.chunk, cfg.steps - done)
    t_chunk = time.perf_counter()
    states, m = make_fit_chunk(net_cfg, cfg, length, loop, n_dev)(states, batch, noise_keys, done)
    m = jax.device_get(m)  # the one host transfer per chunk
    dt = time.perf_counter() - t_chunk
    if first is None:
      first = (length, dt)
    else:
      steady[0] += length
      steady[1] += dt
    for k, v in m.items():
      history.setdefault(k, []).append(np.asarray(v)[:, :n_runs])
    done += length
    chunks += 1
    if ckpt_path and ckpt_every and chunks % ckpt_every == 0 and done < cfg.steps:
      checkpoint.save(ckpt_path, done, states, history)
    if log is not None:
      # Rate and ETA from the chunks after the first, which also compiles.
      rate = steady[0] / steady[1] if steady[0] else first[0] / first[1]
      eta = (cfg.steps - done) / rate
      msg = (f"{label}step {done}/{cfg.steps}  {rate:.2f} steps/s  "
             f"{rate * n_runs:.1f} image-steps/s  ETA {eta:.0f}s  "
             f"loss {np.mean(m['loss'][-1]):.5f}  psnr(out,y) {np.mean(m['psnr_y'][-1]):.2f}")
      if "psnr" in m:  # the last evaluated step of the chunk
        last = np.flatnonzero(~np.isnan(m["psnr"][:, 0]))
        if last.size:
          msg += (f"  psnr {np.mean(m['psnr'][last[-1]]):.2f}"
                  f"  psnr_ema {np.mean(m['psnr_ema'][last[-1]]):.2f}")
      log(msg)
  # The first chunk's time beyond what its steps take at the steady rate: compilation.
  compile_s = max(0.0, first[1] - first[0] * steady[1] / steady[0]) if steady[0] else None
  final = make_predict(net_cfg, cfg, n_dev)(states.params, batch.input_HxWxC)
  return FitResult(final_NxHxWxC=np.asarray(final)[:n_runs],
                   ema_NxHxWxC=np.asarray(states.ema_HxWxC)[:n_runs],
                   history={k: np.concatenate(v, axis=0) for k, v in history.items()},
                   seconds=time.perf_counter() - t0, compile_seconds=compile_s)


def make_inputs(net_cfg: NetConfig, cfg: FitConfig, keys: list[dict[str, jax.Array]],
                prelim_NxHxWxC: np.ndarray | None, height: int, width: int,
                use_prelim_input: bool) -> jax.Array:
  """Network input per run: x_bar for IDIP-2/IDIP (change 2), else DIP's code z."""
  if use_prelim_input:
    return jnp.asarray(prelim_NxHxWxC, jnp.float32)
  return jnp.stack([random_input(k["input"], height, width, net_cfg.in_channels, cfg.input_scale)
                    for k in keys])

