"""PyTorch baseline for the benchmark: DIP's skip net and its fitting loop, one image at a time.

Written from the architecture description (not part of the package): the same layers
as idip_jax.models.SkipUNet, and the loop of DIP's denoising notebook: perturb z,
forward, MSE, backward, Adam step, EMA of the output, PSNR(out, y) on the host each
step for backtracking (which is how the official code runs).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as tnn
import torch.nn.functional as F


def conv(cin, cout, k, stride=1):
  pad = (k - 1) // 2
  layers = [tnn.ReflectionPad2d(pad)] if pad else []
  return tnn.Sequential(*layers, tnn.Conv2d(cin, cout, k, stride))


def block(cin, cout, k, stride=1):
  return tnn.Sequential(conv(cin, cout, k, stride), tnn.BatchNorm2d(cout), tnn.LeakyReLU(0.2))


class Level(tnn.Module):
  def __init__(self, cin, ch, skip, scales_left, complex_connection, cc_features):
    super().__init__()
    self.skip = block(cin, skip, 1)
    self.cc = None
    if complex_connection:
      self.cc = tnn.Linear(cin, cc_features)
      self.cc_mix = block(skip + cc_features, skip, 1)
    self.down = tnn.Sequential(block(cin, ch, 3, 2), block(ch, ch, 3))
    self.deeper = Level(ch, ch, skip, scales_left - 1, complex_connection, cc_features) if scales_left > 1 else None
    self.bn = tnn.BatchNorm2d(skip + ch)
    self.up = tnn.Sequential(block(skip + ch, ch, 3), block(ch, ch, 1))

  def forward(self, x):
    s = self.skip(x)
    if self.cc is not None:
      g = self.cc(x.mean(dim=(2, 3)))[:, :, None, None].expand(-1, -1, *s.shape[2:])
      s = self.cc_mix(torch.cat([s, g], 1))
    d = self.down(x)
    if self.deeper is not None:
      d = self.deeper(d)
    d = F.interpolate(d, scale_factor=2, mode="bilinear", align_corners=False)
    return self.up(self.bn(torch.cat([s, d], 1)))


class SkipNet(tnn.Module):
  def __init__(self, cin=32, cout=1, scales=5, ch=128, skip=4, complex_connection=False, cc_features=96):
    super().__init__()
    self.body = Level(cin, ch, skip, scales, complex_connection, cc_features)
    self.out = tnn.Conv2d(ch, cout, 1)

  def forward(self, x):
    return torch.sigmoid(self.out(self.body(x)))


def time_fit(size: int, steps: int, warmup: int = 2, channels: int = 1, device: str = "cpu", **net_kw) -> float:
  """Median-free simple timing: ms per step of the official-style loop on one image."""
  torch.manual_seed(0)
  net = SkipNet(cout=channels, **net_kw).to(device)
  opt = torch.optim.Adam(net.parameters(), lr=0.01)
  z = torch.rand(1, 32, size, size, device=device) * 0.1
  y = torch.rand(1, channels, size, size, device=device)
  y_np = y.cpu().numpy()
  ema = None
  last_psnr = -np.inf
  t0 = None
  for i in range(warmup + steps):
    if i == warmup:
      if device != "cpu":
        torch.cuda.synchronize()
      t0 = time.perf_counter()
    opt.zero_grad()
    out = net(z + torch.randn_like(z) / 30.0)
    ema = out.detach() if ema is None else 0.99 * ema + 0.01 * out.detach()
    loss = F.mse_loss(out, y)
    loss.backward()
    out_np = out.detach().cpu().numpy()  # the official loop computes PSNR on the host every step
    psnr = -10 * np.log10(np.mean((np.clip(out_np, 0, 1) - y_np) ** 2))
    if psnr - last_psnr >= -5:
      last_psnr = psnr
    opt.step()
  if device != "cpu":
    torch.cuda.synchronize()
  return 1000.0 * (time.perf_counter() - t0) / steps


def count_params(**net_kw) -> int:
  return sum(p.numel() for p in SkipNet(**net_kw).parameters())
