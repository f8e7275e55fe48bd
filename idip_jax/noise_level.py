"""AWGN level estimation for real noisy photos (unknown sigma).

Chen, Zhu & Heng, "An Efficient Statistical Method for Image Noise Level
Estimation", ICCV 2015: the covariance of all 8x8 patches has, past the few
eigenvalues that carry image structure, a bulk of eigenvalues equal to sigma^2.
Discard the largest eigenvalues until the rest have mean == median; sqrt(mean)
is sigma. Accuracy on Set12 is measured in tests/test_denoisers.py.
"""

from __future__ import annotations

import numpy as np


def estimate_sigma(noisy_HxWxC: np.ndarray, patch: int = 8, stride: int = 3) -> float:
  """Noise std on the 0-255 scale of a [0, 1] image (channels pooled)."""
  x = np.asarray(noisy_HxWxC, np.float64)
  if x.ndim == 2:
    x = x[..., None]
  win = np.lib.stride_tricks.sliding_window_view(x, (patch, patch), axis=(0, 1))
  win = win[::stride, ::stride]  # h' x w' x C x p x p
  pch_DxN = win.transpose(2, 3, 4, 0, 1).reshape(-1, win.shape[0] * win.shape[1])
  pch_DxN = pch_DxN - pch_DxN.mean(axis=1, keepdims=True)
  cov = pch_DxN @ pch_DxN.T / pch_DxN.shape[1]
  eig = np.sort(np.linalg.eigvalsh(cov))  # ascending
  for r in range(len(eig), 0, -1):
    tail = eig[:r]
    tau = tail.mean()
    if np.sum(tail > tau) == np.sum(tail < tau):
      return float(np.sqrt(max(tau, 0.0)) * 255.0)
  return float(np.sqrt(max(eig[0], 0.0)) * 255.0)
