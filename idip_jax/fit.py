"""Fitting N runs at once: `lax.scan` chunks of the train step (or a host loop on CPU), `vmap`
or `lax.map` over runs, `shard_map` over local devices, checkpoints and progress.

A "run" is one (image, seed) fit. Every array of a run (parameters, Adam state, EMA,
backtracking snapshot, input, targets) carries a leading run axis N, so a whole same-shape
bucket of a test set is fitted by one compiled program.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
import time
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from idip_jax import checkpoint, convs, loop, sure_fit
from idip_jax.config import FitConfig, NetConfig
from idip_jax.train import (
  EVAL_KEYS,
  Batch,
  FitState,
  apply_net,
  create_fit_state,
  eval_step,
  init_size,
  is_eval_step,
  make_model,
  make_optimizer,
  random_input,
  sized,
  train_step,
)


def for_backend(net_cfg: NetConfig, cfg: FitConfig, backend: str) -> tuple[NetConfig, FitConfig]:
  """The configs with every "auto" resolved for `backend` (the runner calls it once; fit needs it).

  XLA:CPU runs convolutions inside a while loop (lax.scan) ~15x slower than the same step
  outside one (measured on this project's 2-core CI machine: 6.2 s vs 0.43 s per step at
  128 px, no XLA flag helps), and unrolling costs ~9 s of compilation per step. So on CPU a
  chunk is a host loop over the jitted step, still with donated buffers and one metrics
  transfer per chunk; and the convolutions take convs.conv_cpu's faster path.
  """
  cpu = backend == "cpu"
  if net_cfg.conv == "auto":
    net_cfg = dataclasses.replace(net_cfg, conv="cpu" if cpu else "lax")
  if cfg.batch_strategy == "auto":  # without the runner's timing (batch_choice.choose): vmap
    cfg = dataclasses.replace(cfg, batch_strategy="vmap")
  if net_cfg.batch_conv == "auto":
    net_cfg = dataclasses.replace(net_cfg, batch_conv=convs.DEFAULT_BATCH_CONV.get(backend, "loop"))
  if cfg.loop == "auto":
    cfg = dataclasses.replace(cfg, loop="host" if cpu else "scan")
  return net_cfg, cfg


def _check_resolved(net_cfg: NetConfig, cfg: FitConfig) -> None:
  got = dict(loop=cfg.loop, batch_strategy=cfg.batch_strategy, conv=net_cfg.conv, batch_conv=net_cfg.batch_conv)
  if "auto" in got.values() or cfg.steps < 1:
    raise ValueError(f"resolve the configs with fit.for_backend and set steps >= 1 (got {got}, steps={cfg.steps})")


def over_batch(f: Callable, strategy: str) -> Callable:
  """f on one run -> f on a leading run axis (config.FitConfig.batch_strategy)."""
  if strategy == "map":
    return lambda *args: jax.lax.map(lambda a: f(*a), args)
  if strategy == "unroll":

    def unrolled(*args):
      n = jax.tree_util.tree_leaves(args)[0].shape[0]
      outs = [f(*jax.tree_util.tree_map(lambda a, i=i: a[i], args)) for i in range(n)]
      return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *outs)

    return unrolled
  return jax.vmap(f)


def runs_mesh(n_dev: int) -> Mesh:
  # This process's devices only: under jax.distributed each host fits its own images.
  return Mesh(np.array(jax.local_devices()[:n_dev]), ("runs",), axis_types=(AxisType.Auto,))


def over_runs(f: Callable, n_dev: int, out_specs=PartitionSpec("runs"), in_specs=PartitionSpec("runs")) -> Callable:
  """f maps arrays with a leading run axis; with several devices each runs f on its own
  runs (shard_map), so one image never spans devices and no collective is needed.
  (Letting the SPMD partitioner split vmap's grouped convolutions fails in XLA.)"""
  if n_dev == 1:
    return f
  return jax.shard_map(f, mesh=runs_mesh(n_dev), in_specs=in_specs, out_specs=out_specs)


def eval_keys(batch: Batch) -> tuple[str, ...]:
  """The history's eval columns: against the ground truth (EVAL_KEYS), and SURE's (--stop=sure)."""
  return (EVAL_KEYS if batch.clean is not None else ()) + (sure_fit.HISTORY_KEYS if batch.probe is not None else ())


def _nan_like_eval(n: int, keys: tuple[str, ...]) -> dict:
  return {k: jnp.full((n,), jnp.nan, jnp.float32) for k in keys}


def evaluate_runs(evaluate: Callable, cfg: FitConfig, states: FitState, batch: Batch, done: jax.Array) -> tuple:
  """The eval of N runs after `done` steps -> (SureState or None, metrics and output): with
  --stop=sure, SURE of each group of rows (a run and its twins) and the lowest-SURE images kept
  (sure_fit.track)."""
  ev = evaluate(states, batch)
  if states.sure is None:
    return None, ev
  sure, m = sure_fit.track(states.sure, ev, states.ema, batch, done, cfg)
  return sure, ev | m


@functools.lru_cache(maxsize=64)
def make_fit_chunk(net_cfg: NetConfig, cfg: FitConfig, length: int, n_dev: int = 1) -> Callable:
  """(states_N, batch_N, keys_N, done) -> (states_N, metrics_TxN): `length` steps of all
  runs, `done` steps having run before. Eval metrics (EVAL_KEYS) are NaN on steps that
  is_eval_step skips. Cached by config, so refits of same-shape batches reuse the program."""
  _check_resolved(net_cfg, cfg)
  if cfg.loop == "scan":
    model = make_model(net_cfg, cfg)
    step = over_batch(functools.partial(train_step, model, make_optimizer(cfg), cfg), cfg.batch_strategy)
    evaluate = jax.vmap(functools.partial(eval_step, model, cfg))

    def scan_chunk(states, batch, keys, done):
      names = eval_keys(batch)

      def body(s, t):
        s, m = step(s, batch, keys)
        if names:

          def run_eval():
            sure, ev = evaluate_runs(evaluate, cfg, s, batch, done + t + 1)
            return sure, {k: ev[k] for k in names}

          # The predicate is the same for every run (not batched), so this stays a real
          # conditional: the clean-input forward pass runs only on eval steps.
          sure, em = jax.lax.cond(
            is_eval_step(cfg, done + t + 1), run_eval, lambda: (s.sure, _nan_like_eval(keys.shape[0], names))
          )
          s = s.replace(sure=sure)
          m.update(em)
        return s, m

      return jax.lax.scan(body, states, jnp.arange(length))

    run_spec = PartitionSpec("runs")
    sharded = over_runs(
      scan_chunk, n_dev, (run_spec, PartitionSpec(None, "runs")), (run_spec, run_spec, run_spec, PartitionSpec())
    )

    jit_chunk = jax.jit(sharded, donate_argnums=0)
    return lambda states, batch, keys, done: jit_chunk(states, batch, keys, jnp.asarray(done, jnp.int32))

  jit_step, jit_eval = _host_programs(net_cfg, cfg, n_dev)

  def host_chunk(states, batch, keys, done):
    per_step, names = [], eval_keys(batch)
    for t in range(length):
      states, m = jit_step(states, batch, keys)
      if names:
        evaluated = _nan_like_eval(keys.shape[0], names)
        if is_eval_step(cfg, done + t + 1):
          sure, evaluated = jit_eval(states, batch, done + t + 1)
          states = states.replace(sure=sure)
        m.update({k: evaluated[k] for k in names})
      per_step.append(m)  # stays on device until the chunk ends
    return states, jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_step)

  return host_chunk


@functools.lru_cache(maxsize=64)
def _host_programs(net_cfg: NetConfig, cfg: FitConfig, n_dev: int) -> tuple[Callable, Callable]:
  """The jitted step and eval of a host loop, shared by chunks of every length (so the timing of
  --batch_strategy=auto compiles the program the fit then runs). The eval also returns the
  output ("out"): the final image of a fit with ground truth, with no predict program to compile
  (2.5 s of XLA:CPU compile at 64 px, docs/performance.md)."""
  model = make_model(net_cfg, cfg)
  step = over_batch(functools.partial(train_step, model, make_optimizer(cfg), cfg), cfg.batch_strategy)
  evaluate = functools.partial(evaluate_runs, jax.vmap(functools.partial(eval_step, model, cfg, with_output=True)), cfg)
  run_spec = PartitionSpec("runs")
  return (
    jax.jit(over_runs(step, n_dev), donate_argnums=0),
    jax.jit(over_runs(evaluate, n_dev, in_specs=(run_spec, run_spec, PartitionSpec()))),
  )


def compile_host_programs(net_cfg: NetConfig, cfg: FitConfig, n_dev: int, states, batch: Batch, noise_keys) -> None:
  """Compiles the host loop's step in a second thread while this one compiles its eval (XLA's compile
  releases the GIL); the loop's calls find both in jax's in-memory cache (tested: each compiled once)."""
  jit_step, jit_eval = _host_programs(net_cfg, cfg, n_dev)
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    step = pool.submit(lambda: jit_step.lower(states, batch, noise_keys).compile())
    jit_eval.lower(states, batch, 1).compile()
    step.result()


# Programs run once per fit (init, predict): on CPU, compiled at XLA's lowest optimisation level,
# which halves their compile (init 7.4 -> 4.2 s at 64 px) and costs a fraction of a second once.
ONCE = types.MappingProxyType({"xla_backend_optimization_level": 0})


def _once_options() -> dict | None:
  return dict(ONCE) if jax.default_backend() == "cpu" else None


@functools.lru_cache(maxsize=64)
def make_predict(net_cfg: NetConfig, cfg: FitConfig, n_dev: int = 1) -> Callable:
  """Output of each run on its unperturbed input (the "final" image)."""
  model = make_model(net_cfg, cfg)
  return jax.jit(
    over_runs(jax.vmap(lambda params, x: apply_net(model, cfg, params, x)), n_dev),
    compiler_options=_once_options(),
  )


@dataclasses.dataclass
class FitResult:
  final_NxHxWxC: np.ndarray  # with --stop=wmv|emv: at each run's stop_step
  ema_NxHxWxC: np.ndarray
  history: dict[str, np.ndarray]  # name -> steps x N
  seconds: float  # the whole call, compilation included
  compile_seconds: float | None = None  # estimated (None when the fit was one chunk)
  stop_step_N: np.ndarray | None = None  # --stop=wmv|emv|sure: the step each run's criterion chose
  # --stop=sure: per run, SURE's step for the EMA, and the divergence and SURE estimate (MSE) of the
  # reported output and EMA (sure_fit.SureState): step_ema, div, div_ema, mse, mse_ema
  sure_N: dict[str, np.ndarray] | None = None
  # --stop=wmv|emv|sure: the output and EMA of each run's last state (at --steps unless it stopped), so
  # one fit also gives the fixed-step result
  last_NxHxWxC: np.ndarray | None = None
  last_ema_NxHxWxC: np.ndarray | None = None


@functools.lru_cache(maxsize=64)
def make_init(net_cfg: NetConfig, cfg: FitConfig, size: tuple[int, int] = (1, 1), stored: bool = False) -> Callable:
  """init keys_N -> states_N (EMA sized later; size: train.init_size's); stored: (keys_N, the net's parameters)
  -> states_N, every run starting from those parameters (--init)."""
  model, tx = make_model(net_cfg, cfg), make_optimizer(cfg)
  init = lambda key, params=None: create_fit_state(model, tx, cfg, key, *size, net_params=params)
  return jax.jit(jax.vmap(init, (0, None) if stored else 0), compiler_options=_once_options())


def init_runs(net_cfg: NetConfig, cfg: FitConfig, keys: list, height: int, width: int, init_params=None) -> tuple:
  """(initial states, per-step noise keys) of N runs (keys: each run's run_keys); init_params: the net's parameters
  every run starts from (--init), else each run's own random draw."""
  args = [jnp.stack([k["init"] for k in keys])] + ([] if init_params is None else [init_params])
  states = make_init(net_cfg, cfg, init_size(cfg, height, width), init_params is not None)(*args)
  return sized(states, height, width), jnp.stack([k["noise"] for k in keys])


def make_batch(
  net_cfg: NetConfig,
  cfg: FitConfig,
  keys: list[dict[str, jax.Array]],
  noisy_NxHxWxC,
  prelim_NxHxWxC=None,
  clean_NxHxWxC=None,
  mask_NxHxWx1=None,
  loss_mask_NxHxWx1=None,
) -> Batch:
  """The Batch of N runs: x_bar is the input when cfg.input_is_prelim (IDIP change 2), else
  DIP's code z from each run's key; the mask defaults to the whole image. The output's size is
  the mask's (super-resolution's y is smaller), else y's."""
  n, h, w, _ = np.shape(noisy_NxHxWxC if mask_NxHxWx1 is None else mask_NxHxWx1)
  noisy = jnp.asarray(noisy_NxHxWxC, jnp.float32)
  prelim = noisy if prelim_NxHxWxC is None else jnp.asarray(prelim_NxHxWxC, jnp.float32)
  if cfg.input_is_prelim:
    net_input = prelim
  else:
    net_input = jnp.stack(
      [random_input(k["input"], h, w, net_cfg.in_channels, cfg.input_scale, cfg.input_dist) for k in keys]
    )
  mask = jnp.ones((n, h, w, 1), jnp.float32) if mask_NxHxWx1 is None else jnp.asarray(mask_NxHxWx1, jnp.float32)
  return Batch(
    net_input=net_input,
    noisy=noisy,
    prelim=prelim,
    mask=mask,
    clean=None if clean_NxHxWxC is None else jnp.asarray(clean_NxHxWxC, jnp.float32),
    loss_mask=None if loss_mask_NxHxWx1 is None else jnp.asarray(loss_mask_NxHxWx1, jnp.float32),
  )


def progress_fields(m: dict, n_runs: int, unit: int) -> tuple[str, bool]:
  """A chunk's progress-line fields (means over the runs at its last step, or its last eval step)
  and whether every run's stopping criterion has stopped it (their states no longer change)."""
  msg = f"loss {np.mean(m['loss'][-1]):.5f}  psnr(out,y) {np.mean(m['psnr_y'][-1]):.2f}"
  if "psnr" in m:
    last = np.flatnonzero(~np.isnan(m["psnr"][:, 0]))
    if last.size:
      msg += f"  psnr {np.mean(m['psnr'][last[-1]]):.2f}  psnr_ema {np.mean(m['psnr_ema'][last[-1]]):.2f}"
  if "sure_psnr" in m:  # the runs' own rows (not the twins')
    last = np.flatnonzero(~np.isnan(m["sure_psnr"][:, 0]))
    if last.size:
      msg += f"  sure_psnr {np.mean(m['sure_psnr'][last[-1], 0:n_runs:unit]):.2f}"
  if "stopped" not in m:
    return msg, False
  stopped = m["stopped"][-1]
  return msg + f"  stopped {int(np.sum(stopped))}/{n_runs}", bool(np.all(stopped))


# FitResult.sure_N's entries: the SureState fields they come from
SURE_RESULTS = types.MappingProxyType(
  {"step_ema": "best_ema_step", "div": "best_div", "div_ema": "best_ema_div", "mse": "best", "mse_ema": "best_ema"}
)


def fit(
  net_cfg: NetConfig,
  cfg: FitConfig,
  batch: Batch,
  keys: list[dict[str, jax.Array]],
  label: str = "",
  ckpt_path: str | None = None,
  ckpt_every: int = 0,
  init_params=None,
) -> FitResult:
  """Fits N runs in parallel; `batch` arrays and `keys` have a leading axis N; init_params: the net's stored
  initialisation (--init, inits.load), else each run's random draw. With ckpt_path,
  the fit resumes from that checkpoint if it exists (a damaged one is ignored, with a warning) and
  saves one every ckpt_every steps and on Ctrl-C.
  Progress (rate, ETA, PSNR) is logged once per chunk."""
  _check_resolved(net_cfg, cfg)
  timing = loop.Timing()  # from here: the init and the programs compiled in the first chunk count
  n_runs = len(keys)
  n_dev = jax.local_device_count() if cfg.shard else 1
  unit = sure_fit.rows_per_run(cfg)  # --stop=sure: a run and its twins stay together on a device
  pad = (-n_runs) % (n_dev * unit)
  if pad:  # repeat the last run (pair) so the run axis splits evenly; its copies are dropped below
    rows = list(range(n_runs)) + [n_runs - unit + i % unit for i in range(pad)]
    keys = [keys[i] for i in rows]
    batch = jax.tree_util.tree_map(lambda a: a[np.asarray(rows)], batch)
  states, noise_keys = init_runs(net_cfg, cfg, keys, *batch.mask.shape[1:3], init_params)
  if n_dev > 1:
    runs = NamedSharding(runs_mesh(n_dev), PartitionSpec("runs"))
    states, batch, noise_keys = jax.device_put((states, batch, noise_keys), runs)
  history: dict[str, list[np.ndarray]] = {}
  done = 0
  if ckpt_path and os.path.isfile(ckpt_path):
    try:
      done, states, history = checkpoint.load(ckpt_path, states)
    except checkpoint.Damaged as e:  # the call starts over; the next checkpoint replaces the file
      logging.warning("%s%s: fitting this call from step 0", label, e)
    else:
      if n_dev > 1:
        states = jax.device_put(states, NamedSharding(runs_mesh(n_dev), PartitionSpec("runs")))
      logging.info("%sresumed at step %d from %s", label, done, ckpt_path)

  if cfg.loop == "host" and eval_keys(batch):
    compile_host_programs(net_cfg, cfg, n_dev, states, batch, noise_keys)

  def chunk(states, done, length):
    states, m = make_fit_chunk(net_cfg, cfg, length, n_dev)(states, batch, noise_keys, done)
    return states, jax.device_get(m)  # the one host transfer per chunk

  def after_chunk(states, done, m):
    for k, v in m.items():
      history.setdefault(k, []).append(np.asarray(v)[:, :n_runs])
    return progress_fields(m, n_runs, unit)

  save = None if not ckpt_path else lambda states, done: checkpoint.save(ckpt_path, done, states, history)
  progress = loop.Progress(label, n_runs, "image-steps")
  states, _, _ = loop.run(
    chunk, states, done, cfg.steps, cfg.chunk, progress, after_chunk, save, ckpt_every, timing=timing
  )
  stop, sure = states.stop, states.sure
  if cfg.loop == "host" and eval_keys(batch):
    last = np.asarray(_host_programs(net_cfg, cfg, n_dev)[1](states, batch, cfg.steps)[1]["out"])[:n_runs]
  else:
    last = np.asarray(make_predict(net_cfg, cfg, n_dev)(states.params, batch.net_input))[:n_runs]
  predict = lambda params: make_predict(net_cfg, cfg, n_dev)(params, batch.net_input)
  watched = stop is not None or sure is not None
  if sure is not None:
    final, ema, stop_step = sure.out, sure.ema, sure.best_step
  elif stop is not None:
    final, ema, stop_step = predict(stop.params), stop.ema, stop.best_step
  else:
    final, ema, stop_step = last, states.ema, None
  host = lambda a: None if a is None else np.asarray(a)[:n_runs]
  return FitResult(
    final_NxHxWxC=host(final),
    ema_NxHxWxC=host(ema),
    stop_step_N=host(stop_step),
    sure_N=None if sure is None else {k: host(getattr(sure, f)) for k, f in SURE_RESULTS.items()},
    last_NxHxWxC=last if watched else None,
    last_ema_NxHxWxC=host(states.ema) if watched else None,
    history={k: np.concatenate(v, axis=0) for k, v in history.items()},
    seconds=time.perf_counter() - timing.start,
    compile_seconds=timing.compile_seconds,
  )
