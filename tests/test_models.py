import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idip_jax.config import TINY_NET, NetConfig
from idip_jax.models import SkipUNet, count_params, init_params, init_skip_unet, min_side


@pytest.mark.parametrize(
  "cc,in_ch,out_ch,expected",
  [
    # Official DIP denoising net (5 scales x 128, skip 4, z of depth 32): "about 2.2M".
    (False, 32, 3, 2_217_831),
    (False, 32, 1, 2_217_573),
    # IDIP-1: the complex connection adds 54,764 parameters (+2.47%).
    (True, 32, 3, 2_272_595),
    # IDIP-2/IDIP on a gray image: x_bar (1 channel) replaces z.
    (True, 1, 1, 2_233_525),
  ],
)
def test_official_param_counts(cc, in_ch, out_ch, expected):
  cfg = NetConfig(in_channels=in_ch, out_channels=out_ch, complex_connection=cc)
  params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), 64, 64))
  assert count_params(params) == expected


def test_complex_connection_overhead_near_paper():
  counts = {
    cc: count_params(
      jax.eval_shape(lambda cc=cc: init_params(NetConfig(complex_connection=cc), jax.random.key(0), 64, 64))
    )
    for cc in (False, True)
  }
  overhead = counts[True] / counts[False] - 1
  assert 0.02 < overhead < 0.03  # paper: "about 2.4%"


@pytest.mark.parametrize("cc", [False, True])
@pytest.mark.parametrize("upsample,pad", [("bilinear", "reflection"), ("nearest", "zero")])
def test_output_shape_and_range(cc, upsample, pad):
  cfg = dataclasses.replace(TINY_NET, in_channels=5, out_channels=3, complex_connection=cc, upsample=upsample, pad=pad)
  x = jax.random.uniform(jax.random.key(1), (2, 32, 48, 5))
  params = init_params(cfg, jax.random.key(0), 32, 48)
  y = SkipUNet(cfg).apply({"params": params}, x)
  assert y.shape == (2, 32, 48, 3)
  assert float(y.min()) > 0 and float(y.max()) < 1  # sigmoid output
  names = " ".join(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params))
  assert ("Dense" in names) == cc  # the FC of the complex connection exists only when switched on


def test_batchnorm_sees_each_image_alone():
  """DIP's BN normalises with the statistics of the single image; under vmap an
  image's output must not depend on the other images of the batch."""
  cfg = dataclasses.replace(TINY_NET, in_channels=3, out_channels=1)
  params = init_params(cfg, jax.random.key(0), 16, 16)
  model = SkipUNet(cfg)
  x = jax.random.uniform(jax.random.key(1), (3, 16, 16, 3))
  single = jnp.concatenate([model.apply({"params": params}, x[i : i + 1]) for i in range(3)])
  batched = jax.vmap(lambda xi: model.apply({"params": params}, xi[None])[0])(x)
  np.testing.assert_allclose(np.asarray(batched), np.asarray(single), atol=1e-6)
  x2 = x.at[1].set(x[1] * 10)
  batched2 = jax.vmap(lambda xi: model.apply({"params": params}, xi[None])[0])(x2)
  np.testing.assert_allclose(np.asarray(batched2[0]), np.asarray(single[0]), atol=1e-6)


def test_batched_init_equals_flax_init_bit_for_bit():
  # The fits draw their parameters with init_skip_unet (one compiled program for all draws);
  # every number ever fitted assumes Flax's own init, for every run key. The net has every kind of
  # parameter (convs, BatchNorm, the complex connection's Dense) and two shapes of most.
  cfg = dataclasses.replace(TINY_NET, in_channels=1, out_channels=3, complex_connection=True, scales=3, width=12)
  keys = jnp.stack([jax.random.key(0), jax.random.key(7)])
  x = jnp.zeros((1, min_side(cfg), min_side(cfg), cfg.in_channels))
  flax_init = jax.jit(jax.vmap(lambda k: SkipUNet(cfg).init(k, x)["params"]))(keys)
  for remat in (False, True):  # --remat is a way to run: it must not change the parameters
    batched = jax.jit(jax.vmap(lambda k, r=remat: init_skip_unet(SkipUNet(cfg, remat=r), k)))(keys)
    assert jax.tree_util.tree_structure(batched) == jax.tree_util.tree_structure(flax_init)
    for a, b in zip(jax.tree_util.tree_leaves(batched), jax.tree_util.tree_leaves(flax_init)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(*np.asarray(jax.tree_util.tree_leaves(batched)[0]))  # two keys, two inits
