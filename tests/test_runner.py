"""The runner is a straight line; each check and the resolution run once per method."""

import collections

from conftest import TINY_ARGS, smooth_image, write_png
from test_cli import run_cli

from idip_jax import runner


def test_validate_resolve_and_xbar_check_run_once_per_method(tmp_path, capsys, monkeypatch):
  d, xb = tmp_path / "in", tmp_path / "xbar"
  d.mkdir(), xb.mkdir()
  for i, name in enumerate("ab"):
    write_png(str(d / f"{name}.png"), smooth_image(32, 32, 1, seed=i))
    write_png(str(xb / f"{name}.png"), smooth_image(32, 32, 1, seed=i))
  counts = collections.Counter()
  for name in ("validate", "resolve", "check_xbar", "load_inputs"):
    original = getattr(runner, name)
    monkeypatch.setattr(runner, name, lambda *a, _f=original, _n=name, **k: (counts.update([_n]), _f(*a, **k))[1])
  args = [f"--input={d}", "--sigma=25", "--prelim=file", f"--prelim_dir={xb}", "--steps=2", *TINY_ARGS]
  for methods, resume in (("dip,idip", False), ("dip,idip", True), ("idip", False)):
    counts.clear()
    wd = tmp_path / methods.replace(",", "-")
    code, err = run_cli(args + [f"--method={methods}", f"--workdir={wd}"] + (["--resume"] if resume else []), capsys)
    assert code == 0, err
    n = len(methods.split(","))
    assert counts == {"validate": n, "resolve": n, "check_xbar": n, "load_inputs": 1}, (methods, resume, counts)
