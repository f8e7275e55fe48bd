import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from idip_jax import data, metrics


@pytest.mark.parametrize("shape", [(48, 40, 1), (33, 57, 3)])
def test_ssim_and_psnr_match_skimage(shape):
  rng = np.random.default_rng(0)
  a = rng.random(shape).astype(np.float32)
  b = np.clip(a + 0.1 * rng.standard_normal(shape), 0, 1).astype(np.float32)
  ref = structural_similarity(
    b, a, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0, channel_axis=-1
  )
  assert abs(float(metrics.ssim(jnp.asarray(b), jnp.asarray(a))) - ref) < 1e-3
  assert abs(float(metrics.psnr(jnp.asarray(b), jnp.asarray(a))) - peak_signal_noise_ratio(a, b, data_range=1.0)) < 1e-3


def test_masked_metrics_equal_cropped():
  rng = np.random.default_rng(1)
  a = rng.random((40, 56, 1)).astype(np.float32)
  b = np.clip(a + 0.05 * rng.standard_normal(a.shape), 0, 1).astype(np.float32)
  pa, pb = data.pad_reflect(a, 64, 64), data.pad_reflect(b, 64, 64)
  m = jnp.asarray(data.mask_for(40, 56, 64, 64))
  assert abs(float(metrics.psnr(pb, pa, m)) - float(metrics.psnr(b, a))) < 1e-4
  assert abs(float(metrics.ssim(pb, pa, m)) - float(metrics.ssim(b, a))) < 1e-5
