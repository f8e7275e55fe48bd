"""One DIP/IDIP run's pure train step (Adam, input perturbation, EMA, backtracking) and its eval.

Everything here acts on one run (arrays HxWxC); fit.py maps it over a leading run axis N.
"""

from __future__ import annotations

import types
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from idip_jax import metrics, tasks
from idip_jax.config import FitConfig, NetConfig
from idip_jax.models import ImageNorm, SkipUNet, init_skip_unet
from idip_jax.sure_fit import SureState, eval_dots, init_state

# config.PRECISIONS -> (compute dtype, lax precision of the convolutions). "tf32" is JAX's
# default for f32: TF32 tensor cores on Ampere/Hopper GPUs (as PyTorch's cuDNN convolutions, so
# DIP's own code), exact fp32 on CPU. "fp32" forces full fp32 (Precision.HIGHEST). "bf16": bf16
# convolutions; parameters, Adam state, BatchNorm statistics and outputs stay fp32 in every mode.
PRECISIONS = types.MappingProxyType(
  {"tf32": (None, None), "fp32": (None, jax.lax.Precision.HIGHEST), "bf16": (jnp.bfloat16, None)}
)
# backtrack="dip": the official notebook skips its check when i % show_every == 0.
DIP_SHOW_EVERY = 100


@flax.struct.dataclass
class StopState:
  """Automatic stopping (FitConfig.stop, ES-WMV / ES-EMV of Wang et al., TMLR 2023) of one run."""

  window: jax.Array  # wmv: the last W training outputs, WxHxWxC ring buffer; emv: their running mean, 1xHxWxC
  emv: jax.Array  # emv: the exponential moving variance
  best: jax.Array  # lowest variance so far
  best_step: jax.Array  # steps done when it was reached: the detected stopping step
  wait: jax.Array  # variance checks since then
  stopped: jax.Array  # patience ran out: the run is frozen
  params: Any  # parameters after best_step steps (their clean-input output is the reported image)
  ema: jax.Array  # the EMA of the outputs then


@flax.struct.dataclass
class FitState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema: jax.Array  # EMA of the outputs: HxWxC per run (NxHxWxC over a batch of runs)
  good_params: Any  # last parameters whose output passed the backtracking test
  good_opt_state: Any
  good_psnr_y: jax.Array
  dip_i: jax.Array  # the official notebook's step counter i (backtrack="dip")
  lr_scale: jax.Array  # the step's factor: halved by each backtrack of a deterministic step (retry_scale)
  stop: StopState | None = None  # --stop=wmv|emv, else None
  sure: SureState | None = None  # --stop=sure, else None


@flax.struct.dataclass
class Batch:
  """The arrays of one run, each HxWxC (mask HxWx1); of N runs, each with a leading axis N."""

  net_input: jax.Array  # z (DIP) or x_bar (IDIP-2/IDIP)
  noisy: jax.Array  # y, the fitting target
  prelim: jax.Array  # x_bar; ignored when prelim_weight = 0
  mask: jax.Array  # 1 on the original extent, 0 on reflect padding
  clean: jax.Array | None = None  # ground truth, for metrics only
  # The mask of the loss, shaped like `noisy` (HxWx1): inpainting's observed pixels, or all of
  # super-resolution's low-resolution y; None: `mask`.
  loss_mask: jax.Array | None = None
  # --stop=sure (sure_fit.py): the run's probe b (zero outside the extent), its finite-difference
  # step eps and the noise level (both [0, 1] scale, scalars per run); the same for a run and its twin.
  probe: jax.Array | None = None
  sure_eps: jax.Array | None = None
  sure_sigma: jax.Array | None = None


def run_keys(seed: int, run: int) -> dict[str, jax.Array]:
  """Named keys of one run; they depend on (seed, run index) only, never on the
  image or its place in a batch, so a batched fit equals single-image fits."""
  init, inp, noise = jax.random.split(jax.random.fold_in(jax.random.key(seed), run), 3)
  return {"init": init, "input": inp, "noise": noise}


def make_model(net_cfg: NetConfig, fit_cfg: FitConfig) -> SkipUNet:
  dtype, precision = PRECISIONS[fit_cfg.precision]
  return SkipUNet(net_cfg, dtype=dtype, precision=precision, remat=fit_cfg.remat)


def make_optimizer(fit_cfg: FitConfig) -> optax.GradientTransformation:
  """Adam; with --train other than weights and norms (DIP's), the parameters of the groups not trained get
  no update at all (optax.set_to_zero: they stay bit for bit as initialised)."""
  lr = fit_cfg.lr
  if fit_cfg.lr_schedule == "cosine":
    lr = optax.cosine_decay_schedule(fit_cfg.lr, max(fit_cfg.steps, 1))
  if set(fit_cfg.train) == {"weights", "norms"}:
    return optax.adam(lr)
  label = lambda path, _: "train" if param_group(path) in fit_cfg.train else "frozen"
  labels = lambda params: jax.tree_util.tree_map_with_path(label, params)
  return optax.multi_transform({"train": optax.adam(lr), "frozen": optax.set_to_zero()}, labels)


def param_group(path) -> str:
  """--train's group of a parameter: seed (the input offset and its BatchNorm), norms (BatchNorm), weights."""
  names = [getattr(p, "key", str(p)) for p in path]
  if names[0] in ("seed", "seed_norm"):
    return "seed"
  return "norms" if any(n.startswith("ImageNorm") for n in names) else "weights"


def seeded(cfg: FitConfig) -> bool:
  return "seed" in cfg.train


def init_size(cfg: FitConfig, height: int, width: int) -> tuple[int, int]:
  """The size a run's state is initialised at: 1x1 (one compiled init serves every bucket; sized makes the
  image buffers) unless the input offset is trained (--train=seed), a parameter of the image's size."""
  return (height, width) if seeded(cfg) else (1, 1)


def apply_net(model: SkipUNet, cfg: FitConfig, params, input_HxWxC: jax.Array) -> jax.Array:
  """The net's output on its input; with --train=seed, on BatchNorm(input + the trained offset) (DRP's BNNet of
  the seed), the net's own parameters under params["net"]."""
  if not seeded(cfg):
    return model.apply({"params": params}, input_HxWxC[None])[0]
  x = ImageNorm().apply({"params": params["seed_norm"]}, (input_HxWxC + params["seed"])[None])
  return model.apply({"params": params["net"]}, x)[0]


def random_input(key: jax.Array, height: int, width: int, channels: int, scale: float, dist: str = "uniform"):
  """DIP's code z, HxWxC: U[0, scale] (its 'noise' input) or N(0, scale^2) (DRP's seed)."""
  if dist == "normal":
    return scale * jax.random.normal(key, (height, width, channels), jnp.float32)
  return jax.random.uniform(key, (height, width, channels), jnp.float32, 0.0, scale)


def create_fit_state(
  model: SkipUNet,
  tx: optax.GradientTransformation,
  cfg: FitConfig,
  key: jax.Array,
  height: int,
  width: int,
  net_params=None,
) -> FitState:
  """A run's state before its first step: the net's parameters drawn from `key`, or `net_params` (a stored
  init, --init) as they are."""
  # Parameter shapes do not depend on the image size, and Flax draws them from the
  # key and module path only, so one compiled init (at the smallest valid size, in
  # models._init_plan) gives the full-size parameters and serves every bucket.
  params = init_skip_unet(model, key) if net_params is None else net_params
  if seeded(cfg):  # DRP: the offset starts at 0 (the input itself), its BatchNorm at the identity's affine part
    c = model.cfg.in_channels
    seed_norm = {"scale": jnp.ones((c,), jnp.float32), "bias": jnp.zeros((c,), jnp.float32)}
    params = {"net": params, "seed": jnp.zeros((height, width, c), jnp.float32), "seed_norm": seed_norm}
  opt_state = tx.init(params)
  ema = jnp.zeros((height, width, model.cfg.out_channels), jnp.float32)
  stop = None
  if cfg.stop in ("wmv", "emv"):
    stop = StopState(
      window=jnp.zeros((cfg.stop_window if cfg.stop == "wmv" else 1, *ema.shape), jnp.float32),
      emv=jnp.zeros((), jnp.float32),
      best=jnp.array(jnp.inf, jnp.float32),
      best_step=jnp.zeros((), jnp.int32),
      wait=jnp.zeros((), jnp.int32),
      stopped=jnp.zeros((), bool),
      params=params,
      ema=ema,
    )
  return FitState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=opt_state,
    ema=ema,
    good_params=params,
    good_opt_state=opt_state,
    good_psnr_y=jnp.array(-jnp.inf, jnp.float32),
    dip_i=jnp.zeros((), jnp.int32),
    lr_scale=jnp.ones((), jnp.float32),
    stop=stop,
    sure=init_state(ema.shape) if cfg.stop == "sure" else None,
  )


def sized(states: FitState, height: int, width: int) -> FitState:
  """States of N runs with their image buffers (the EMA, and the stopping window and snapshot)
  zeroed at HxW: make_init builds them 1x1 so that one compiled init serves every bucket."""
  resize = lambda a: jnp.zeros((*a.shape[:-3], height, width, a.shape[-1]), jnp.float32)
  states = states.replace(ema=resize(states.ema))
  if states.stop is not None:
    states = states.replace(stop=states.stop.replace(window=resize(states.stop.window), ema=resize(states.stop.ema)))
  if states.sure is not None:
    states = states.replace(sure=states.sure.replace(out=resize(states.sure.out), ema=resize(states.sure.ema)))
  return states


def stop_score(cfg: FitConfig, stop: StopState, step: jax.Array, out: jax.Array) -> tuple[StopState, jax.Array]:
  """The variance of the outputs after `out`, the training output of `step` (inf while the window
  fills). wmv: mean squared distance of the last W outputs to their mean (ES_WMV.ipynb's myMetric
  over its buffer); emv: ES_EMV.ipynb's update, with the squared norm as a per-pixel mean (the
  same minimum), checked after W steps as its `iterator > 100`."""
  if cfg.stop == "wmv":
    window = stop.window.at[step % cfg.stop_window].set(out)
    var = jnp.mean(jnp.square(window - jnp.mean(window, axis=0)))
    return stop.replace(window=window), jnp.where(step + 1 >= cfg.stop_window, var, jnp.inf)
  delta = out - stop.window[0]
  mean = jnp.where(step == 0, out, jnp.clip(stop.window[0] + cfg.stop_alpha * delta, 0.0, 1.0))
  emv = jnp.where(step == 0, 0.0, (1.0 - cfg.stop_alpha) * (stop.emv + cfg.stop_alpha * jnp.mean(jnp.square(delta))))
  return stop.replace(window=mean[None], emv=emv), jnp.where(step > cfg.stop_window, emv, jnp.inf)


def update_stop(cfg: FitConfig, state: FitState, out: jax.Array, ema: jax.Array) -> tuple[StopState, jax.Array]:
  """One step of early stopping: a new lowest variance snapshots the parameters that made `out`
  (and the EMA with it); `stop_patience` checks without one stop the run."""
  stop, var = stop_score(cfg, state.stop, state.step, out)
  better = var < stop.best
  checked = jnp.isfinite(var)
  wait = jnp.where(better, 0, stop.wait + checked.astype(jnp.int32))
  return stop.replace(
    best=jnp.where(better, var, stop.best),
    best_step=jnp.where(better, state.step, stop.best_step),
    wait=wait,
    stopped=wait >= cfg.stop_patience,
    params=_where(better, state.params, stop.params),
    ema=jnp.where(better, ema, stop.ema),
  ), var


def perturbed_input(cfg: FitConfig, input_HxWxC: jax.Array, step: jax.Array, key: jax.Array) -> jax.Array:
  """The net's input at `step`: z + N(0, reg_noise_std) (DIP), x_bar + N(0, xbar_noise_std) (IDIP)."""
  std = cfg.xbar_noise_std if cfg.input_is_prelim else cfg.reg_noise_std
  return input_HxWxC + std * jax.random.normal(jax.random.fold_in(key, step), input_HxWxC.shape, jnp.float32)


def train_step(
  model: SkipUNet, tx: optax.GradientTransformation, cfg: FitConfig, state: FitState, batch: Batch, key: jax.Array
) -> tuple[FitState, dict]:
  """One Adam step on one run; `key` is the run's noise key (per-step noise is
  fold_in(key, step), so results do not depend on how steps are chunked)."""
  net_in = perturbed_input(cfg, batch.net_input, state.step, key)

  loss_mask = batch.mask if batch.loss_mask is None else batch.loss_mask

  def loss_fn(params):
    out = apply_net(model, cfg, params, net_in)
    # ||A(out) - y||^2 (tasks.degrade: the identity, or the SR downsampler) over the observed pixels.
    observed = tasks.degrade(cfg.task, cfg.sr_factor, out)
    loss = metrics.masked_mse(observed, batch.noisy, loss_mask)
    if cfg.data_loss == "rmse":  # DRP's sqrt(MSE)
      loss = jnp.sqrt(loss)
    if cfg.tv_weight:  # DRP's tv1_loss
      loss += cfg.tv_weight * metrics.masked_tv(out, batch.mask)
    if cfg.prelim_weight:
      loss += cfg.prelim_weight * metrics.masked_mse(out, batch.prelim, batch.mask)
    return loss, (out, observed)

  (loss, (out, observed)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  psnr_y = metrics.psnr(observed, batch.noisy, loss_mask)
  # DIP's EMA averages the outputs of the perturbed-input passes (out_avg in its notebooks).
  ema = jnp.where(state.step == 0, out, cfg.ema_decay * state.ema + (1.0 - cfg.ema_decay) * out)
  if cfg.backtrack == "dip":
    new_state, diverged = _backtrack_dip(tx, cfg, state, grads, psnr_y, ema)
  else:
    new_state, diverged = _backtrack_safe(tx, cfg, state, grads, psnr_y, ema)
  step_metrics = {"loss": loss, "psnr_y": psnr_y, "backtracked": diverged}
  if state.stop is not None:
    # The variance of the training outputs (ES-WMV's choice); a stopped run keeps its whole state.
    stop, var = update_stop(cfg, state, out, new_state.ema)
    frozen = state.stop.stopped
    new_state = _where(frozen, state, new_state.replace(stop=stop))
    step_metrics["stop_score"] = jnp.where(frozen | ~jnp.isfinite(var), jnp.nan, var)
    step_metrics["stopped"] = new_state.stop.stopped
  if batch.clean is not None:
    # The training pass's output (perturbed input): an extra column, not the reported image.
    step_metrics["psnr_perturbed"] = metrics.psnr(out, batch.clean, batch.mask)
  return new_state, step_metrics


def _where(cond, a, b):
  return jax.tree_util.tree_map(lambda x, y: jnp.where(cond, x, y), a, b)


def retry_scale(cfg: FitConfig) -> float:
  """The step size's factor after a backtrack. A step whose input is perturbed (DIP's z + noise, IDIP's x_bar +
  noise) retries on another draw, as the official notebook does: 1 (unchanged). A deterministic step (no
  perturbation: DRP, --reg_noise_std=0) would retry the very update that diverged from the very same state, and
  backtrack every other step for the rest of the fit (measured: DRP on Set12 03 at 128 px, from step 14 on, its
  output flat at 11 dB); it retries at half the step instead, a backtracking line search."""
  std = cfg.xbar_noise_std if cfg.input_is_prelim else cfg.reg_noise_std
  return 1.0 if std > 0 else 0.5


def _backtrack_safe(tx, cfg: FitConfig, state: FitState, grads, psnr_y, ema):
  """A drop of PSNR(out, y) by more than backtrack_db, or a non-finite one, means Adam diverged: go back to the last
  good parameters and Adam moments and skip the update; the bad output stays out of the EMA
  (it would carry it for ~100 steps)."""
  # A non-finite loss is a divergence too (NaN fails every comparison, so the drop test alone
  # would never fire and the run would stay NaN).
  diverged = (cfg.backtrack_db > 0) & ((psnr_y < state.good_psnr_y - cfg.backtrack_db) | ~jnp.isfinite(psnr_y))
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  lr_scale, scale = state.lr_scale, retry_scale(cfg)  # a perturbed step's arithmetic is left as it was (bit for bit)
  if scale != 1.0:
    updates = jax.tree_util.tree_map(lambda u: u * state.lr_scale, updates)
    lr_scale = jnp.where(diverged, state.lr_scale * scale, state.lr_scale)
  new_params = optax.apply_updates(state.params, updates)
  return state.replace(
    lr_scale=lr_scale,
    step=state.step + 1,
    params=_where(diverged, state.good_params, new_params),
    opt_state=_where(diverged, state.good_opt_state, new_opt_state),
    ema=jnp.where(diverged, state.ema, ema),
    good_params=_where(diverged, state.good_params, state.params),
    good_opt_state=_where(diverged, state.good_opt_state, state.opt_state),
    good_psnr_y=jnp.where(diverged, state.good_psnr_y, psnr_y),
    dip_i=state.dip_i + 1,
  ), diverged


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
    step=state.step + 1,
    params=optax.apply_updates(base, updates),
    opt_state=new_opt_state,
    ema=ema,
    good_params=_where(snapshot, state.params, state.good_params),
    good_psnr_y=jnp.where(snapshot, psnr_y, state.good_psnr_y),
    dip_i=state.dip_i + (~diverged).astype(jnp.int32),
  ), diverged


EVAL_KEYS = ("psnr", "ssim", "psnr_ema", "ssim_ema")


def eval_step(model: SkipUNet, cfg: FitConfig, state: FitState, batch: Batch, with_output: bool = False) -> dict:
  """Metrics of the images a fit reports after `state.step` steps: the output on the
  unperturbed input (what psnr_final measures at the end) and the EMA; with_output adds that
  output ("out"), so one compiled program also gives the final image."""
  out = apply_net(model, cfg, state.params, batch.net_input)
  gt, mask = batch.clean, batch.mask
  ev = {"out": out} if with_output or batch.probe is not None else {}
  if gt is not None:
    ev |= {
      "psnr": metrics.psnr(out, gt, mask),
      "ssim": metrics.ssim(out, gt, mask),
      "psnr_ema": metrics.psnr(state.ema, gt, mask),
      "ssim_ema": metrics.ssim(state.ema, gt, mask),
    }
  if batch.probe is not None:
    ev |= eval_dots(out, state.ema, batch.noisy, batch.probe, mask)
  return ev


def is_eval_step(cfg: FitConfig, done: jax.Array | int) -> jax.Array | bool:
  """After `done` steps: every eval_every steps, and always after the last one."""
  return (done % cfg.eval_every == 0) | (done == cfg.steps)
