"""Fit-speed plumbing: sharding over devices, no recompilation, mixed precision."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import EXACT_XLA_FLAGS, NET, ROOT, smooth_image
from test_fit import CFG, make_batch

from idip_jax import batching, fit, runner, train

SHARD_CHECK = r"""
import dataclasses, jax, numpy as np, sys
sys.path.insert(0, "tests")
from idip_jax import fit
from conftest import smooth_image
from conftest import NET
from test_fit import CFG, make_batch
assert jax.local_device_count() == 4, jax.devices()
batch, keys = make_batch([smooth_image(32, 32, 1, seed=s) for s in range(3)])  # 3 runs on 4 devices
a = fit.fit(NET, CFG, batch, keys)
b = fit.fit(NET, dataclasses.replace(CFG, shard=False), batch, keys)
assert a.final_NxHxWxC.shape == (3, 32, 32, 1) and a.history["loss"].shape == (10, 3)
print("maxdiff", float(np.abs(a.history["loss"][0] - b.history["loss"][0]).max()),
      float(np.abs(a.final_NxHxWxC - b.final_NxHxWxC).max()),
      float(np.nanmax(np.abs(a.history["psnr"] - b.history["psnr"]))))
"""


def test_sharded_fit_equals_unsharded():
  # Four CPU devices and the users' emitters; conftest, imported by the child, keeps a user's XLA_FLAGS.
  xla_flags = "--xla_force_host_platform_device_count=4 " + EXACT_XLA_FLAGS
  env = dict(os.environ, XLA_FLAGS=xla_flags, IDIP_TEST_USER_XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
  p = subprocess.run(
    [sys.executable, "-c", SHARD_CHECK], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert p.returncode == 0, p.stderr[-3000:]
  diffs = [float(x) for x in p.stdout.split("maxdiff")[1].split()]
  # Step 1 agrees to rounding (3e-8 measured); per-device batch 1 vs batch 3 convolutions
  # round differently and Adam amplifies it to ~1e-3 by step 10 in one run (measured 8e-4).
  # A sharding bug (wrong keys, mixed BN statistics, lost runs) gives errors of order 0.1.
  assert diffs[0] < 1e-6 and diffs[1] < 3e-3 and diffs[2] < 1e-2, diffs


def test_host_loop_compiles_its_step_and_eval_once(monkeypatch):
  # fit.compile_host_programs compiles the step and the eval side by side before the first chunk;
  # the loop's calls must then find both in jax's cache, not compile them again.
  compiled = []
  jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: (
      compiled.append(kw.get("fun_name", "")) if event == "/jax/core/compile/backend_compile_duration" else None
    )
  )
  warmed, warm = [], fit.compile_host_programs
  monkeypatch.setattr(fit, "compile_host_programs", lambda *a: warmed.append(a) or warm(*a))
  batch, keys = make_batch([smooth_image(32, 32, 1, seed=s) for s in range(2)])
  cfg = dataclasses.replace(CFG, steps=10, chunk=5, eval_every=5, loop="host", seed=31)
  res = fit.fit(NET, cfg, batch, keys)
  assert len(warmed) == 1 and np.isfinite(res.history["psnr"][4]).all()
  assert sum("train_step" in n for n in compiled) == 1 and sum("evaluate_runs" in n for n in compiled) == 1, compiled


def test_no_recompilation_between_chunks():
  traced = []
  jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: traced.append(event) if event == "/jax/core/compile/jaxpr_trace_duration" else None
  )
  batch, keys = make_batch([smooth_image(32, 32, 1, seed=s) for s in range(2)])
  for loop in ("host", "scan"):
    counts = []
    # A new config each (new seed) is traced afresh; the first also traces what all fits share.
    for seed, steps in ((10, 5), (11, 5), (12, 15)):
      cfg = dataclasses.replace(CFG, steps=steps, chunk=5, loop=loop, seed=seed)
      before = len(traced)
      fit.fit(NET, cfg, batch, keys)
      counts.append(len(traced) - before)
    assert counts[1] > 0 and counts[2] == counts[1], (loop, counts)  # 3 chunks trace what 1 chunk does
    before = len(traced)
    fit.fit(NET, cfg, batch, keys)  # a same-config, same-shape refit traces nothing
    assert len(traced) == before, (loop, traced[before:])


def test_bf16_precision_plumbing():
  bf16 = dataclasses.replace(CFG, precision="bf16")
  model = train.make_model(NET, bf16)
  x = jnp.ones((1, 32, 32, NET.in_channels))
  params = model.init(jax.random.key(0), x)["params"]
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))  # params stay fp32
  jaxpr = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, x))(params))
  assert "conv_general_dilated" in jaxpr and "bf16" in jaxpr  # convs compute in bf16
  assert model.apply({"params": params}, x).dtype == jnp.float32  # output back in fp32
  batch, keys = make_batch([smooth_image(32, 32, 1, seed=1)])
  p32 = fit.fit(NET, CFG, batch, keys).history["psnr"][-1, 0]
  p16 = fit.fit(NET, bf16, batch, keys)
  opt_leaves = jax.tree_util.tree_leaves(fit.init_runs(NET, bf16, keys, 32, 32)[0].opt_state)
  assert all(leaf.dtype in (jnp.float32, jnp.int32) for leaf in opt_leaves)  # Adam state fp32
  assert abs(p16.history["psnr"][-1, 0] - p32) < 1.0 and p16.history["psnr"][-1, 0] != p32


@pytest.mark.fusion_emitters
def test_remat_same_gradients_fewer_saved_activations():
  import io
  from contextlib import redirect_stdout

  from jax.ad_checkpoint import print_saved_residuals

  x = jnp.asarray(smooth_image(32, 32, NET.in_channels, seed=1))[None]
  models = {r: train.make_model(NET, dataclasses.replace(CFG, remat=r)) for r in (False, True)}
  params = models[False].init(jax.random.key(0), x)["params"]
  loss = {r: (lambda p, m=m: jnp.mean(jnp.square(m.apply({"params": p}, x) - 0.5))) for r, m in models.items()}
  (la, ga), (lb, gb) = (jax.jit(jax.value_and_grad(loss[r]))(params) for r in (False, True))
  assert abs(float(la - lb)) < 1e-6
  for u, v in zip(jax.tree_util.tree_leaves(ga), jax.tree_util.tree_leaves(gb)):
    assert float(jnp.abs(u - v).max()) <= 1e-4 * (float(jnp.abs(u).max()) + 1e-6)

  def saved_floats(remat):
    out = io.StringIO()
    with redirect_stdout(out):
      print_saved_residuals(loss[remat], params)
    shapes = [s.split("]")[0] for s in out.getvalue().split("f32[")[1:]]
    return sum(int(np.prod([int(d) for d in s.split(",") if d])) for s in shapes)

  # XLA:CPU's memory analysis does not reflect remat, so count what autodiff keeps.
  assert saved_floats(True) < 0.6 * saved_floats(False)


def test_auto_batch_size_from_compiled_memory():
  one = batching.step_memory_bytes(NET, CFG, 1, 32, 32)
  two = batching.step_memory_bytes(NET, CFG, 2, 32, 32)
  four = batching.step_memory_bytes(NET, CFG, 4, 32, 32)
  per_run = two - one
  # Affine in the batch, up to XLA's buffer packing (5.6% of the total on the tiny net at 32 px).
  assert per_run > 0 and abs((four - one) - 3 * per_run) <= 0.08 * four
  fixed = one - per_run
  pick = lambda budget, n: batching.auto_batch_size(NET, CFG, 32, 32, n, memory_bytes=budget)
  assert pick(fixed + per_run, 12) == 1
  assert pick(fixed + 4 * per_run + per_run // 2, 12) == 4  # room for 4: 3 calls of 4
  assert pick(fixed + 8 * per_run, 10) == 5  # room for 8: two calls of 5, not 8 + 2
  assert pick(fixed + 100 * per_run, 10) == 10
  resolve = lambda backend, **kw: runner.resolve(
    runner.RunConfig(method="dip", fit=dataclasses.replace(CFG, steps=0, **kw)), 1, backend
  )
  # auto: the batch size and lowering are chosen per bucket by timing (batching.choose), on any backend.
  for backend in ("gpu", "cpu"):
    auto = resolve(backend, batch_strategy="auto")
    assert (auto.batch_size, auto.fit.batch_strategy, auto.net.batch_conv) == (0, "auto", "auto")
  # An explicit strategy on an accelerator: sized from memory per bucket; on CPU (no memory analysis): 1.
  assert all(resolve("gpu", batch_strategy=s).batch_size == 0 for s in ("vmap", "map", "unroll"))
  assert all(resolve("cpu", batch_strategy=s).batch_size == 1 for s in ("vmap", "map", "unroll"))


def test_runner_halves_the_batch_on_out_of_memory(tmp_path, monkeypatch):
  from conftest import write_png

  d = tmp_path / "in"
  d.mkdir()
  for s in range(3):
    write_png(str(d / f"im{s}.png"), smooth_image(32, 32, 1, seed=s))
  real_fit, calls = fit.fit, []

  def fit_with_small_memory(net_cfg, cfg, batch, keys, **kw):
    calls.append(len(keys))
    if len(keys) > 1:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 123 bytes.")
    return real_fit(net_cfg, cfg, batch, keys, **kw)

  monkeypatch.setattr(fit, "fit", fit_with_small_memory)
  cfg = runner.RunConfig(
    input=str(d),
    workdir=str(tmp_path / "out"),
    sigma=25,
    method="dip",
    batch_size=3,
    save_images=False,
    net=dataclasses.replace(NET, complex_connection=False),
    fit=dataclasses.replace(CFG, steps=2, chunk=2),
  )
  res = runner.run(cfg)
  assert calls == [3, 1, 1, 1]  # 3 -> 1 (halved) -> the rest at 1
  assert [r["name"] for r in res["images"]] == ["im0", "im1", "im2"]
  assert all(r["psnr_final"] > 0 for r in res["images"])
