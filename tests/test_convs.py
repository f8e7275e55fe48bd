"""The convolutions of a batch of runs (convs.per_run_conv): same values and gradients as per-run
dense convolutions, no grouped convolution in the batched step, every conv path reaching the net,
and --batch_strategy=auto's choice."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import NET, smooth_image
from test_fit import CFG

from idip_jax import batching, config, convs, models, train

LOWERINGS = ("loop", "im2col", "hybrid", "grouped")
# (kernel, stride, input side, padding): SkipUNet's convolutions take a reflection-padded input
# (VALID) or, with --pad=zero, explicit zero padding; 17 px exercises an odd side at stride 2.
CASES = [(3, 1, 18, "VALID"), (3, 2, 18, "VALID"), (3, 2, 17, "VALID"), (1, 1, 16, "VALID"), (3, 1, 16, ((1, 1),) * 2)]


def dense(x, w, stride, pad):
  return jax.lax.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=convs.NHWC)


def reflect(x_NxHxWxC):
  return jnp.pad(x_NxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")


@pytest.mark.parametrize("conv", ["lax", "cpu"])
@pytest.mark.parametrize("lowering", LOWERINGS)
def test_lowerings_equal_per_run_dense_convolutions(lowering, conv):
  # fp32, 1e-4 absolute on O(1) values: only the order of the float sums differs. hybrid_side=8
  # puts the 16-18 px cases' stride-2 outputs on the im2col side and the others on the loop side.
  rng = np.random.default_rng(0)
  f = convs.conv_general_dilated_for(conv, lowering, 8)
  for k, stride, h, pad in CASES:
    x_B = jnp.asarray(rng.normal(size=(3, 2, h - 2, h - 2, 5)) * 0.3, jnp.float32)
    w_B = jnp.asarray(rng.normal(size=(3, k, k, 5, 6)) * 0.3, jnp.float32)
    case = (lowering, conv, k, stride, h, pad)

    # As the model uses it: reflection padding inside the differentiated function.
    def ours(x, w, s=stride, p=pad):
      return f(reflect(x) if p == "VALID" else x, w, (s, s), p, dimension_numbers=convs.NHWC)

    def ref(x, w, s=stride, p=pad):
      return dense(reflect(x) if p == "VALID" else x, w, s, p)

    g_B = jnp.asarray(rng.normal(size=jax.vmap(ref)(x_B, w_B).shape), jnp.float32)
    vjp = lambda fn: lambda x, w, g: jax.vjp(fn, x, w)[1](g)
    want = [np.asarray(ref(x_B[0], w_B[0])), *map(np.asarray, vjp(ref)(x_B[0], w_B[0], g_B[0]))]
    got_alone = [ours(x_B[0], w_B[0]), *vjp(ours)(x_B[0], w_B[0], g_B[0])]
    for a, b in zip(got_alone, want):
      np.testing.assert_allclose(a, b, atol=1e-4, err_msg=f"alone {case}")
    want_B = [jax.vmap(ref)(x_B, w_B), *jax.vmap(vjp(ref))(x_B, w_B, g_B)]
    for how, fn in (("vmap", jax.vmap), ("jit(vmap)", lambda h: jax.jit(jax.vmap(h)))):
      got = [fn(ours)(x_B, w_B), *fn(vjp(ours))(x_B, w_B, g_B)]
      for a, b in zip(got, want_B):
        np.testing.assert_allclose(a, b, atol=1e-4, err_msg=f"{how} {case}")
    # Shared weights (vmap over images only) take the dense path folded over runs.
    w0 = w_B[0]
    shared = jax.vmap(ours, in_axes=(0, None))(x_B, w0)
    np.testing.assert_allclose(shared, jax.vmap(ref, in_axes=(0, None))(x_B, w0), atol=1e-4, err_msg=f"shared {case}")


def batched_step_stablehlo(batch_conv: str) -> str:
  """The StableHLO jax emits for a 3-run train step, before any XLA rewrite."""
  net = dataclasses.replace(NET, batch_conv=batch_conv, hybrid_side=8)
  cfg = dataclasses.replace(CFG, batch_strategy="vmap")
  return batching.lower_step(net, cfg, 3, 32, 32, with_gt=False).as_text()


@pytest.mark.parametrize("lowering", LOWERINGS)
def test_batched_step_emits_no_grouped_convolution(lowering):
  text = batched_step_stablehlo(lowering)
  groups = [int(g) for g in re.findall(r"(?:batch|feature)_group_count = (\d+)", text)]
  if lowering == "grouped":  # the control: vmap batches each per-run convolution (and its gradients) as groups
    assert groups.count(3) >= 3 * len(re.findall(r"stablehlo.convolution", text)) // 4, sorted(set(groups))
    return
  assert all(g == 1 for g in groups), (lowering, sorted(set(groups)))
  if lowering == "im2col":  # every convolution a matmul
    assert "stablehlo.convolution" not in text and "dot_general" in text
  if lowering == "loop":  # 3 dense convolutions where the control has one grouped one
    assert len(re.findall(r"stablehlo.convolution", text)) == 3 * len(
      re.findall(r"stablehlo.convolution", batched_step_stablehlo("grouped"))
    )


@pytest.mark.parametrize("conv", ["lax", "cpu", "im2col"])
def test_every_conv_path_reaches_the_net(conv):
  # NetConfig.conv picks the dense convolution of SkipUNet's layers: lax keeps every convolution,
  # cpu turns the 1x1 ones into matmuls, im2col turns all of them into matmuls.
  net = dataclasses.replace(NET, conv=conv)
  model = train.make_model(net, CFG)
  x = jnp.ones((1, 32, 32, net.in_channels))
  params = models.init_params(net, jax.random.key(0), 32, 32)
  jaxpr = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, x))(params))
  n_conv = jaxpr.count("conv_general_dilated")
  n_layers = sum(
    1 for path in jax.tree_util.tree_flatten_with_path(params)[0] if "Conv" in str(path[0]) and "kernel" in str(path[0])
  )
  n_1x1 = sum(1 for leaf in jax.tree_util.tree_leaves(params) if leaf.ndim == 4 and leaf.shape[:2] == (1, 1))
  expected = {"lax": n_layers, "cpu": n_layers - n_1x1, "im2col": 0}[conv]
  assert n_1x1 > 0 and n_conv == expected, (conv, n_conv, n_layers, n_1x1)
  plain = dataclasses.replace(net, conv="lax")
  y_plain = train.make_model(plain, CFG).apply({"params": params}, x)
  np.testing.assert_allclose(model.apply({"params": params}, x), y_plain, atol=1e-5)


def test_auto_strategy_picks_the_fastest_and_caches_it(tmp_path):
  cache = str(tmp_path / "choice.json")
  rates = {
    ("vmap", "loop", 1): 10.0,
    ("vmap", "loop", 2): 11.0,
    ("vmap", "im2col", 2): 14.0,
    ("vmap", "hybrid", 2): 12.0,
  }
  rates.update({("vmap", "loop", 4): 9.0, ("vmap", "im2col", 4): 13.0, ("vmap", "hybrid", 4): 13.5})
  timed = []

  def timer(c):
    timed.append(c)
    return 1.0 / rates[(c.strategy, c.batch_conv, c.batch)], 0.5

  net = dataclasses.replace(NET, batch_conv="auto")
  cfg = dataclasses.replace(CFG, batch_strategy="auto")
  pick = batching.choose(net, cfg, (32, 32, 1), 5, cache_path=cache, timer=timer)
  assert (pick["batch_strategy"], pick["batch_conv"], pick["batch_size"]) == ("vmap", "im2col", 2)
  assert {(c.batch_conv, c.batch) for c in timed} == {(lw, b) for lw, b in [(k[1], k[2]) for k in rates]}
  assert pick["timings"]["one run per call"]["image_steps_per_s"] == pytest.approx(10.0)
  stored = json.load(open(cache))
  assert [v["label"] for v in stored.values()] == ["vmap:im2col x2"]
  # Cached: the same key is answered without timing; another shape or net is timed again.
  n = len(timed)
  again = batching.choose(net, cfg, (32, 32, 1), 5, cache_path=cache, timer=timer)
  assert len(timed) == n and again["batch_conv"] == "im2col" and again["from_cache"] == cache
  batching.choose(net, cfg, (64, 32, 1), 5, cache_path=cache, timer=timer)
  assert len(timed) == 2 * n and len(json.load(open(cache))) == 2
  # Two runs cap the batch at 2; an explicit lowering is the only one timed; one run: no timing.
  timed.clear()
  two = batching.choose(dataclasses.replace(net, batch_conv="loop"), cfg, (32, 32, 1), 2, timer=timer)
  assert [(c.batch_conv, c.batch) for c in timed] == [("loop", 1), ("loop", 2)] and two["batch_size"] == 2
  timed.clear()
  one = batching.choose(net, cfg, (32, 32, 1), 1, timer=timer)
  assert timed == [] and one["batch_size"] == 1


def test_auto_strategy_times_real_steps_and_config_json_records_it(tmp_path):
  # The default timer on a real (tiny) bucket: every candidate gets a positive rate, and the run's
  # config.json records the choice per bucket (buckets.plan).
  from conftest import write_png

  from idip_jax import runner

  for s in range(2):
    write_png(str(tmp_path / f"im{s}.png"), smooth_image(32, 32, 1, seed=s))
  cfg = config.RunConfig(
    input=str(tmp_path / "im*.png"),
    workdir=str(tmp_path / "w"),
    method="dip",
    sigma=25,
    batch_cache="none",
    net=dataclasses.replace(config.TINY_NET, batch_conv="hybrid"),  # two candidates: two compiles
    fit=config.FitConfig(steps=4, chunk=2),
  )
  runner.run(cfg)
  stored = json.load(open(tmp_path / "w" / "config.json"))
  assert stored["fit"]["batch_strategy"] == "auto"
  (bucket,) = stored["buckets"]
  choice = bucket["batch_choice"]
  assert set(choice["timings"]) == {"one run per call", "vmap:hybrid x2"}
  assert all(t["image_steps_per_s"] > 0 for t in choice["timings"].values())
  best = max(choice["timings"], key=lambda k: choice["timings"][k]["image_steps_per_s"])
  assert choice["label"] == best and bucket["batch_size"] == choice["batch_size"]
  res = json.load(open(tmp_path / "w" / "results.json"))
  assert res["complete"] and len(res["images"]) == 2
