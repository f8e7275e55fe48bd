"""Convolutions of SkipUNet: the dense paths of one run (NetConfig.conv) and how a batch of runs
with per-run weights lowers them under `vmap` (NetConfig.batch_conv).

Under plain `vmap` a convolution whose weights are batched becomes a grouped convolution
(feature_group_count = B) and its weight gradient one with batch_group_count = B (jax's conv
batching and transpose rules). XLA:CPU rewrites the latter with a size-B dilated dimension, about
B times the work (xla/service/convolution_group_converter.cc), and cuDNN's grouped kernels are
slow (jax #26568, #13800): a batch was slower per image than one run at a time on both
(experiments/results/bench_{cpu,gpu}.md: the `grouped` rows). `per_run_conv` owns its batching rule
(`jax.custom_batching.custom_vmap` on the forward pass and on each gradient, tied together by
`jax.custom_vjp`), so none of those grouped convolutions is ever emitted:

- loop: a static loop over the runs, each a dense convolution (forward and both gradients);
- im2col: batched matmuls over patches (a 1x1 convolution needs none), weight gradient
  einsum('bpk,bpo->bko');
- hybrid: im2col while the output is at most `hybrid_side` px on a side, loop above;
- grouped: the plain convolution, as vmap makes it (the control).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap

NHWC = jax.lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), ("NHWC", "HWIO", "NHWC"))
BATCH_CONVS = ("grouped", "loop", "im2col", "hybrid")
# NetConfig.batch_conv="auto" without --batch_strategy=auto's timing, by backend.
# CPU: loop runs each run's convolutions with the same dense kernels as one run per call (the closest numbers) and
# was 0.97-1.12x its image rate (experiments/results/bench_cpu.md, 2026-12-02; --batch_strategy=auto times im2col and
# hybrid too). Accelerators: not yet measured (bench/gpu.flags); hybrid keeps cuDNN's dense kernels on the large maps
# and batched matmuls on the small ones, where one run's kernels are launch-bound.
DEFAULT_BATCH_CONV = types.MappingProxyType({"cpu": "loop", "gpu": "hybrid", "tpu": "hybrid"})


def _is_simple(kw) -> bool:
  """NHWC/HWIO, no groups, no dilation: the convolutions SkipUNet makes."""
  dilations = (kw.get("lhs_dilation") or (1, 1)) + (kw.get("rhs_dilation") or (1, 1))
  return (
    kw.get("dimension_numbers") == NHWC and kw.get("feature_group_count", 1) == 1 and all(d == 1 for d in dilations)
  )


def _explicit(padding) -> tuple[tuple[int, int], tuple[int, int]]:
  if padding == "VALID":
    return ((0, 0), (0, 0))
  if isinstance(padding, str):
    raise ValueError(f"padding {padding!r}: SkipUNet passes VALID or explicit pairs")
  return tuple(tuple(int(v) for v in p) for p in padding)


def conv_cpu(lhs, rhs, window_strides, padding, **kw):
  """lax.conv_general_dilated, with two rewrites that give the same values and are faster on
  XLA:CPU (NetConfig.conv="cpu", the runner's choice on CPU).

  On XLA:CPU (jax 0.10.2) a conv with no padding (our reflection-padded input) runs
  ~3x slower than the same conv with any zero padding (experiments/speed/cpu_conv_paths.py:
  91 vs 27 ms, 3x3, 132->128 ch, 128 px). So an unpadded conv gets one zero row and
  column at the far edge and the extra output row/column is dropped. A 1x1 conv is a
  matmul: XLA:CPU's dot beats its 1x1 conv and, under vmap, becomes a batched dot.
  """
  plain = functools.partial(jax.lax.conv_general_dilated, lhs, rhs, window_strides, padding, **kw)
  unpadded = padding == "VALID" or all(tuple(p) == (0, 0) for p in padding)
  if not unpadded or not _is_simple(kw):
    return plain()
  kh, kw_ = rhs.shape[:2]
  if (kh, kw_) == (1, 1) and tuple(window_strides) == (1, 1):
    return jnp.einsum("nhwc,cf->nhwf", lhs, rhs[0, 0], precision=kw.get("precision"))
  sh, sw = window_strides
  out_h, out_w = (lhs.shape[1] - kh) // sh + 1, (lhs.shape[2] - kw_) // sw + 1
  y = jax.lax.conv_general_dilated(lhs, rhs, window_strides, [(0, 1), (0, 1)], **kw)
  return y[:, :out_h, :out_w]


def patches(x_NxHxWxC: jax.Array, kh: int, kw: int, strides, padding) -> jax.Array:
  """im2col: NxHoxWox(kh*kw*C) strided slices, concatenated in HWIO order (so an HWIO kernel is
  only reshaped). Costs kh*kw times the input's memory."""
  (pt, pb), (pl, pr) = _explicit(padding)
  if pt or pb or pl or pr:
    x_NxHxWxC = jnp.pad(x_NxHxWxC, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  sh, sw = strides
  out_h, out_w = (x_NxHxWxC.shape[1] - kh) // sh + 1, (x_NxHxWxC.shape[2] - kw) // sw + 1
  cols = [
    x_NxHxWxC[:, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw, :]
    for i in range(kh)
    for j in range(kw)
  ]
  return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def conv_im2col(lhs, rhs, window_strides, padding, **kw):
  """lax.conv_general_dilated as one dot over im2col patches, with the same values."""
  if not _is_simple(kw):
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kw)
  kh, kw_, c, f = rhs.shape
  p = patches(lhs, kh, kw_, window_strides, padding)
  return jnp.einsum("nhwk,kf->nhwf", p, rhs.reshape(kh * kw_ * c, f), precision=kw.get("precision"))


# NetConfig.conv -> the dense convolution of one run ("auto" is resolved by the runner; unresolved
# it is the plain one).
CONV_PATHS: types.MappingProxyType[str, Callable] = types.MappingProxyType(
  {"auto": jax.lax.conv_general_dilated, "lax": jax.lax.conv_general_dilated, "cpu": conv_cpu, "im2col": conv_im2col}
)


def _stack_runs(f: Callable, n: int, *args_B) -> jax.Array:
  """f over the leading run axis as a static loop: n dense calls, no batching."""
  return jnp.stack([f(*(a[b] for a in args_B)) for b in range(n)])


def _broadcast(axis_size: int, in_batched, *args):
  return [a if bt else jnp.broadcast_to(a, (axis_size, *a.shape)) for a, bt in zip(args, in_batched)]


@functools.lru_cache(maxsize=256)
def per_run_conv(
  strides: tuple[int, int],
  padding: tuple[tuple[int, int], tuple[int, int]],
  precision: jax.lax.Precision | None,
  conv: str,
  batch_conv: str,
  hybrid_side: int,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """(x_NxHxWxC, w_HWIO) -> NxHoxWoxO, a dense convolution of one run (CONV_PATHS[conv]) whose
  vmap over runs with per-run weights lowers as `batch_conv` (module docstring). Values and
  gradients equal the dense convolution's, alone, under jit and under vmap."""
  dense_conv = CONV_PATHS[conv]

  def dense(x, w):
    return dense_conv(x, w, strides, padding, dimension_numbers=NHWC, precision=precision)

  def dense_dx(x, w, g):
    return jax.vjp(lambda x_: dense(x_, w), x)[1](g)[0]

  def dense_dw(x, w, g):
    return jax.vjp(lambda w_: dense(x, w_), w)[1](g)[0]

  def use_im2col(x_B, w_B) -> bool:
    """hybrid: by the output's side (a 3x3 conv's reflection-padded input is 2 px larger)."""
    (pt, pb), (pl, pr) = padding
    out_h = (x_B.shape[2] + pt + pb - w_B.shape[1]) // strides[0] + 1
    out_w = (x_B.shape[3] + pl + pr - w_B.shape[2]) // strides[1] + 1
    return batch_conv == "im2col" or (batch_conv == "hybrid" and max(out_h, out_w) <= hybrid_side)

  def im2col_fwd(x_B, w_B):
    b, kh, kw, c, o = w_B.shape
    if (kh, kw) == (1, 1) and strides == (1, 1) and padding == ((0, 0), (0, 0)):
      return jnp.einsum("bnhwc,bco->bnhwo", x_B, w_B[:, 0, 0], precision=precision)
    p_B = jax.vmap(lambda x: patches(x, kh, kw, strides, padding))(x_B)
    return jnp.einsum("bnhwk,bko->bnhwo", p_B, w_B.reshape(b, kh * kw * c, o), precision=precision)

  def im2col_dw(x_B, w_B, g_B):
    b, kh, kw, c, o = w_B.shape
    p_B = jax.vmap(lambda x: patches(x, kh, kw, strides, padding))(x_B)
    return jnp.einsum("bnhwk,bnhwo->bko", p_B, g_B, precision=precision).reshape(w_B.shape)

  def im2col_dx(x_B, w_B, g_B):
    # The transpose of im2col_fwd in x: the patches' adjoint (pads and adds), no convolution.
    return jax.vjp(lambda x: im2col_fwd(x, w_B), x_B)[1](g_B)[0]

  def batched(dense_f, im2col_f):
    """dense_f(x, w, ...) as a custom_vmap: shared weights fold the run axis into N (one dense
    call); per-run weights take the chosen lowering."""
    f = custom_vmap(dense_f)

    @f.def_vmap
    def rule(axis_size, in_batched, x, w, *rest):
      if not in_batched[1] and dense_f is not dense_dw:
        # Shared weights (not our per-run case): runs are more images of one convolution.
        x, *rest = _broadcast(axis_size, [in_batched[0], *in_batched[2:]], x, *rest)
        fold = lambda a: a.reshape(-1, *a.shape[2:])
        out = dense_f(fold(x), w, *map(fold, rest))
        return out.reshape(axis_size, x.shape[1], *out.shape[1:]), True
      args = _broadcast(axis_size, in_batched, x, w, *rest)
      if axis_size == 1:  # one run: its dense convolution
        return dense_f(*(a[0] for a in args))[None], True
      if batch_conv == "grouped":
        return jax.vmap(dense_f)(*args), True
      if use_im2col(args[0], args[1]):
        return im2col_f(*args), True
      return _stack_runs(dense_f, axis_size, *args), True

    return f

  fwd_c, dx_c, dw_c = batched(dense, im2col_fwd), batched(dense_dx, im2col_dx), batched(dense_dw, im2col_dw)

  @jax.custom_vjp
  def conv_fn(x, w):
    return fwd_c(x, w)

  def fwd(x, w):
    return fwd_c(x, w), (x, w)

  def bwd(res, g):
    x, w = res
    return dx_c(x, w, g), dw_c(x, w, g)

  conv_fn.defvjp(fwd, bwd)
  return conv_fn


def conv_general_dilated_for(conv: str, batch_conv: str, hybrid_side: int) -> Callable:
  """A drop-in for lax.conv_general_dilated (flax's nn.Conv calls it) that routes SkipUNet's
  convolutions through per_run_conv; the control ("grouped") is the dense path itself."""
  dense_conv = CONV_PATHS[conv]
  if batch_conv == "grouped":
    return dense_conv

  def conv_fn(lhs, rhs, window_strides, padding, **kw):
    if not _is_simple(kw):
      return dense_conv(lhs, rhs, window_strides, padding, **kw)
    f = per_run_conv(tuple(window_strides), _explicit(padding), kw.get("precision"), conv, batch_conv, hybrid_side)
    return f(lhs, rhs)

  return conv_fn
