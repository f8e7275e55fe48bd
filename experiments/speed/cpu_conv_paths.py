"""Why convs.conv_cpu rewrites convolutions on XLA:CPU (NetConfig.conv="cpu"): times one 3x3 conv with and
without zero padding, and the official net's fit step with the rewrites on and off.

python experiments/speed/cpu_conv_paths.py   (~2 min on the 2-core CI CPU)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from experiments.speed.cpu_probes import median_ms
from idip_jax import fit, train
from idip_jax.config import FitConfig, NetConfig

ms = functools.partial(median_ms, n=5)  # median of 5 calls after a warm-up, in ms


def step_ms(size: int, conv: str) -> float:
  net, cfg = NetConfig(out_channels=1, conv=conv), FitConfig()
  keys = [train.run_keys(0, 0)]
  y = jax.random.uniform(jax.random.key(1), (1, size, size, 1))
  b = fit.make_batch(net, cfg, keys, y)
  model, tx = train.make_model(net, cfg), train.make_optimizer(cfg)
  step = jax.jit(jax.vmap(lambda s, bb, k: train.train_step(model, tx, cfg, s, bb, k)))
  states, noise = fit.init_runs(net, cfg, keys, size, size)
  return ms(lambda: step(states, b, noise)[1])


def main():
  x = jax.random.normal(jax.random.key(0), (1, 128, 128, 132))
  w = jax.random.normal(jax.random.key(1), (3, 3, 132, 128)) * 0.05
  conv = lambda pad: jax.jit(
    lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
  )
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
  print(
    f"3x3 conv 132->128 at 128 px: reflection-padded input, no conv padding "
    f"{ms(conv('VALID'), xp, w):.1f} ms; zero padding 1 {ms(conv([(1, 1), (1, 1)]), x, w):.1f} ms"
  )
  for size in (64, 128):
    off, on = step_ms(size, "lax"), step_ms(size, "cpu")
    print(f"fit step, official gray net, {size} px: plain convs {off:.1f} ms, CPU rewrites {on:.1f} ms")


if __name__ == "__main__":
  main()
