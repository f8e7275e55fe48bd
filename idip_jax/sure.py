"""Stein's unbiased risk estimate at a known noise level (Monte-Carlo SURE: Ramani, Blu and Unser,
IEEE TIP 17(9), 2008), the SURE-optimal blend of several denoisers' outputs (SURE-LET style: SURE
is quadratic in the weights), and the geometric self-ensemble (x8) of a denoiser.

For y = x + n, n ~ N(0, sigma^2 I) with N values and a denoiser f:
  SURE(f) = |y - f(y)|^2 / N - sigma^2 + 2 sigma^2 div f(y) / N,  E[SURE] = E|x - f(y)|^2 / N,
  div f(y) ~ b . (f(y + eps b) - f(y)) / eps,  b ~ N(0, I)  (one extra call of f per probe).
Images are float arrays in [0, 1] (sigma on that scale: sigma_255 / 255).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np

Denoiser = Callable[[np.ndarray], np.ndarray]


def probes(shape: tuple[int, ...], seed: int, n: int) -> list[np.ndarray]:
  """n seeded N(0, I) probe images (the same for every denoiser given the same seed)."""
  rng = np.random.default_rng([seed, 0x5E7E])
  return [rng.standard_normal(shape).astype(np.float32) for _ in range(n)]


def probes_for(name: str, shape: tuple[int, ...], n: int) -> list[np.ndarray]:
  """An image's probes, seeded by its name: the same for every denoiser and every fit of it."""
  return probes(shape, zlib.crc32(name.encode()), n)


def eps_for(sigma: float) -> float:
  """The finite-difference step: small next to the noise, large next to float32 rounding."""
  return max(sigma, 1e-3) / 100.0


def divergence(
  f: Denoiser, y: np.ndarray, sigma: float, seed: int = 0, n_probes: int = 1, fy: np.ndarray | None = None
) -> float:
  """Monte-Carlo divergence of f at y, averaged over n_probes seeded probes; eps = sigma / 100 (the
  finite difference stays small next to the noise, and large next to float32 rounding)."""
  eps = eps_for(sigma)
  fy = f(y) if fy is None else fy
  divs = [float(np.sum(b.astype(np.float64) * (f(y + eps * b) - fy))) / eps for b in probes(y.shape, seed, n_probes)]
  return float(np.mean(divs))


def sure(y: np.ndarray, fy: np.ndarray, sigma: float, div: float) -> float:
  """SURE's estimate of the mean squared error per value of fy against the unknown clean image."""
  n = y.size
  return float(np.mean((y.astype(np.float64) - fy) ** 2) - sigma**2 + 2.0 * sigma**2 * div / n)


def psnr_of_mse(mse: float) -> float:
  return float(10.0 * np.log10(1.0 / max(mse, 1e-12)))


def clipped_psnr(x: np.ndarray, clean: np.ndarray) -> float:
  """PSNR (peak 1) of x clipped to [0, 1] as a saved image would be, in float64."""
  return psnr_of_mse(float(np.mean((np.clip(x, 0, 1) - clean) ** 2)))


def blend_weights(y: np.ndarray, outputs: list[np.ndarray], divs: list[float], sigma: float) -> np.ndarray:
  """Weights w minimising SURE(sum_k w_k f_k(y)) = |y - F w|^2 / N - sigma^2 + 2 sigma^2 (w . div) / N
  (unconstrained): the normal equations F^T F w = F^T y - sigma^2 div, one small solve."""
  f = np.stack([o.reshape(-1).astype(np.float64) for o in outputs], axis=1)
  lhs = f.T @ f
  rhs = f.T @ y.reshape(-1).astype(np.float64) - sigma**2 * np.asarray(divs, np.float64)
  return np.linalg.lstsq(lhs, rhs, rcond=None)[0]


def oracle_weights(clean: np.ndarray, outputs: list[np.ndarray]) -> np.ndarray:
  """The least-squares blend using the clean image (what SURE's weights estimate)."""
  f = np.stack([o.reshape(-1).astype(np.float64) for o in outputs], axis=1)
  return np.linalg.lstsq(f, clean.reshape(-1).astype(np.float64), rcond=None)[0]


def blend(outputs: list[np.ndarray], w: np.ndarray) -> np.ndarray:
  return np.tensordot(np.asarray(w), np.stack(outputs).astype(np.float64), axes=1).astype(np.float32)


def dihedral(x_HxWxC: np.ndarray, k: int) -> np.ndarray:
  """The k-th of the 8 flips and rotations of an image (k in 0..7)."""
  x = np.rot90(x_HxWxC, k % 4, axes=(0, 1))
  return x[:, ::-1] if k >= 4 else x


def undo_dihedral(x_HxWxC: np.ndarray, k: int) -> np.ndarray:
  x = x_HxWxC[:, ::-1] if k >= 4 else x_HxWxC
  return np.rot90(x, -(k % 4), axes=(0, 1))


def self_ensemble(f: Denoiser) -> Denoiser:
  """x8: the mean of f over the 8 flips and rotations of its input, each mapped back."""

  def f8(y_HxWxC: np.ndarray) -> np.ndarray:
    outs = [undo_dihedral(np.asarray(f(np.ascontiguousarray(dihedral(y_HxWxC, k)))), k) for k in range(8)]
    return np.mean(outs, axis=0).astype(np.float32)

  return f8


def blend_image(y: np.ndarray, names: list[str], cand: list, div: list[float], sigma: float) -> tuple:
  """One image's SURE blend (unclipped) at the known sigma (0-255) and its record: the weights and SURE's PSNR
  estimate of every candidate and of the blend."""
  s = sigma / 255.0
  w = blend_weights(y, cand, div, s)
  mixed = blend(cand, w)
  est = {c: psnr_of_mse(sure(y, o, s, d)) for c, o, d in zip(names, cand, div)}
  est["blend"] = psnr_of_mse(sure(y, mixed, s, float(np.dot(w, div))))
  return mixed, {"sure_weights": dict(zip(names, map(float, w))), "sure_psnr": est}
