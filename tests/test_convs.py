"""The convolutions of a batch of runs (convs.per_run_conv): same values and gradients as per-run
dense convolutions, no grouped convolution in the batched step, every conv path reaching the net,
and --batch_strategy=auto's choice."""

import collections
import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import NET, smooth_image
from test_fit import CFG

from idip_jax import batch_choice, batching, config, convs, models, train

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


class FakeClock:
  """An injected clock: each timing of a candidate costs `per_timing` fake seconds."""

  def __init__(self, per_timing: float):
    self.now, self.per_timing = 0.0, per_timing

  def __call__(self) -> float:
    return self.now


def fake_timer(rates: dict, clock: FakeClock, timed: list, drift: dict | None = None):
  """timer(c, repeats) of batch_choice.choose: a candidate's rate (image-steps/s) from `rates`, its later
  repeats from `drift` (a first timing that noise made look better or worse)."""

  def timer(c, repeats):
    key = (c.batch_conv, c.batch)
    rate = (drift or {}).get(key, rates[key]) if key in [(t.batch_conv, t.batch) for t in timed] else rates[key]
    timed.append(c)
    clock.now += clock.per_timing
    return [1.0 / rate] * repeats, 0.5

  return timer


RATES = {
  ("loop", 1): 10.0,
  ("loop", 2): 11.0,
  ("im2col", 2): 14.0,
  ("hybrid", 2): 12.0,
  ("loop", 4): 9.0,
  ("im2col", 4): 13.0,
  ("hybrid", 4): 13.5,
}
NET_AUTO = dataclasses.replace(NET, batch_conv="auto")
LONG = dataclasses.replace(CFG, batch_strategy="auto", steps=10**7)  # long enough to time every candidate


def test_auto_strategy_picks_the_fastest_median_and_caches_it(tmp_path):
  """A long job: the default (vmap:loop x4 on CPU) first, then every candidate; those within reach of the best
  are timed again, interleaved, and the best median wins; the choice is cached (another shape is timed again)."""
  cache, clock, timed = str(tmp_path / "choice.json"), FakeClock(1.0), []
  timer = fake_timer(RATES, clock, timed)
  pick = batch_choice.choose(NET_AUTO, LONG, (32, 32, 1), 5, cache_path=cache, timer=timer, clock=clock)
  assert (pick["batch_strategy"], pick["batch_conv"], pick["batch_size"]) == ("vmap", "im2col", 2)
  assert (timed[0].batch_conv, timed[0].batch) == ("loop", 4)  # the default first
  assert {(c.batch_conv, c.batch) for c in timed} == set(RATES)
  assert pick["timings"]["one run per call"]["image_steps_per_s"] == pytest.approx(10.0)
  assert pick["why"].startswith("fastest median") and pick["choosing_s"] == pytest.approx(clock.now)
  stored = json.load(open(cache))
  assert [v["label"] for v in stored.values()] == ["vmap:im2col x2"]
  n = len(timed)
  again = batch_choice.choose(NET_AUTO, LONG, (32, 32, 1), 5, cache_path=cache, timer=timer, clock=clock)
  assert len(timed) == n and again["batch_conv"] == "im2col" and again["from_cache"] == cache
  batch_choice.choose(NET_AUTO, LONG, (64, 32, 1), 5, cache_path=cache, timer=timer, clock=clock)
  assert len(timed) == 2 * n and len(json.load(open(cache))) == 2
  # Two runs cap the batch at 2; an explicit lowering is the only one timed; one run: no timing.
  timed.clear()
  two = batch_choice.choose(dataclasses.replace(NET, batch_conv="loop"), LONG, (32, 32, 1), 2, timer=timer, clock=clock)
  assert {(c.batch_conv, c.batch) for c in timed} == {("loop", 1), ("loop", 2)} and two["batch_size"] == 2
  timed.clear()
  one = batch_choice.choose(NET_AUTO, LONG, (32, 32, 1), 1, timer=timer, clock=clock)
  assert timed == [] and one["batch_size"] == 1 and one["why"] == "the only candidate"


def test_auto_strategy_times_nothing_for_a_short_job():
  """The 4-image, 200-step 64 px job of the official net: at the stored CPU rate it fits in ~50 s, and 3% of
  that does not repay one candidate's compile: the backend's default, no timing at all."""
  clock, timed = FakeClock(1.0), []
  net = dataclasses.replace(config.NetConfig(), out_channels=1)  # the official net
  short = dataclasses.replace(CFG, batch_strategy="auto", steps=200)
  pick = batch_choice.choose(net, short, (64, 64, 1), 4, timer=fake_timer(RATES, clock, timed), clock=clock)
  assert timed == [] and (pick["batch_conv"], pick["batch_size"]) == ("loop", 4) and "too short" in pick["why"]
  # The same job at 1000x the steps is worth timing.
  long = dataclasses.replace(short, steps=200_000)
  pick = batch_choice.choose(net, long, (64, 64, 1), 4, timer=fake_timer(RATES, clock, timed), clock=clock)
  assert len({(c.batch_conv, c.batch) for c in timed}) == len(RATES)


def test_auto_strategy_drops_a_candidate_clearly_behind_and_keeps_to_its_budget():
  """After one repeat, a candidate under 85% of the best rate is not timed again; the others are (interleaved).
  The budget (3% of the fit's expected seconds at the default's measured rate) stops the timing of further
  candidates once the clock says it is spent."""
  clock, timed = FakeClock(1.0), []
  rates = {**RATES, ("loop", 1): 5.0}  # one run per call: half the best
  pick = batch_choice.choose(NET_AUTO, LONG, (32, 32, 1), 5, timer=fake_timer(rates, clock, timed), clock=clock)
  counts = collections.Counter((c.batch_conv, c.batch) for c in timed)
  assert counts[("loop", 1)] == 1 and counts[("im2col", 2)] == 1 + batch_choice.TIMING_REPEATS
  assert "one run per call" in pick["why"] and pick["batch_conv"] == "im2col"
  # A first timing that noise flattered: the repeats decide (median), not the first.
  timed.clear()
  pick = batch_choice.choose(
    NET_AUTO, LONG, (32, 32, 1), 5, timer=fake_timer(RATES, clock, timed, drift={("im2col", 2): 9.5}), clock=clock
  )
  assert pick["batch_conv"] == "hybrid" and pick["batch_size"] == 4
  # Budget: the default's rate 9 image-steps/s, 5 runs x 6000 steps -> 3333 s, 3% = 100 s; each timing costs 40 s.
  timed.clear()
  clock = FakeClock(40.0)
  mid = dataclasses.replace(LONG, steps=6000)
  timer = fake_timer(RATES, clock, timed)
  pick = batch_choice.choose(NET_AUTO, mid, (32, 32, 1), 5, timer=timer, clock=clock, speed=None)  # rate: measured
  assert len(timed) == 2 and "not timed (budget 100 s)" in pick["why"]


def test_auto_strategy_config_json_records_the_choice_and_why(tmp_path):
  # A run's config.json records the choice per bucket (buckets.plan), with why it was made: this tiny job is
  # too short to time anything (the real timer: test_a_fit_that_timed_candidates_equals_...).
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
    net=dataclasses.replace(config.TINY_NET, batch_conv="hybrid"),
    fit=config.FitConfig(steps=4, chunk=2),
  )
  runner.run(cfg)
  stored = json.load(open(tmp_path / "w" / "config.json"))
  assert stored["fit"]["batch_strategy"] == "auto"
  (bucket,) = stored["buckets"]
  choice = bucket["batch_choice"]
  assert "too short" in choice["why"] and choice["label"] == "vmap:hybrid x2" and bucket["batch_size"] == 2
  res = json.load(open(tmp_path / "w" / "results.json"))
  assert res["complete"] and len(res["images"]) == 2


def test_a_fit_that_timed_candidates_equals_the_same_fit_with_its_choice_fixed(tmp_path, monkeypatch):
  """Timing happens on made-up images before the fit: the fit's runs are those of the chosen strategy, fixed
  (budget forced open so that the real timer times both candidates of a 2-image bucket: one run per call and
  vmap:loop x2)."""
  from conftest import write_png

  from idip_jax import runner

  monkeypatch.setattr(batch_choice, "TIMING_BUDGET", 1e9)
  for s in range(2):
    write_png(str(tmp_path / f"im{s}.png"), smooth_image(32, 32, 1, seed=s))
  base = config.RunConfig(
    input=str(tmp_path / "im*.png"),
    method="dip",
    sigma=25,
    batch_cache="none",
    net=dataclasses.replace(config.TINY_NET, batch_conv="loop"),
    fit=config.FitConfig(steps=6, chunk=3, eval_every=3),
  )
  auto = runner.run(dataclasses.replace(base, workdir=str(tmp_path / "auto")))
  (bucket,) = json.load(open(tmp_path / "auto" / "config.json"))["buckets"]
  timings = bucket["batch_choice"]["timings"]
  assert bucket["batch_choice"]["why"].startswith("fastest median") and len(timings) == 2
  # each timed on real steps, and again (interleaved) unless dropped early or alone in the race
  assert all(
    t["image_steps_per_s"] > 0 and t["repeats"] in (1, 1 + batch_choice.TIMING_REPEATS) for t in timings.values()
  )
  fixed = dataclasses.replace(
    base,
    workdir=str(tmp_path / "fixed"),
    batch_size=bucket["batch_size"],
    net=dataclasses.replace(config.TINY_NET, batch_conv=bucket["batch_conv"]),
    fit=dataclasses.replace(base.fit, batch_strategy=bucket["batch_strategy"]),
  )
  res = runner.run(fixed)
  for a, b in zip(auto["images"], res["images"]):
    assert a["name"] == b["name"] and a["psnr_final"] == pytest.approx(b["psnr_final"], abs=1e-5)
    assert a["psnr_ema"] == pytest.approx(b["psnr_ema"], abs=1e-5)
