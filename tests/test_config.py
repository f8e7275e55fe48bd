"""One source of configuration: flags generated from the dataclasses, each defined
once, every default in one place, the configs as run recorded, no mutable module state."""

import dataclasses
import glob
import importlib
import os
import pkgutil
import re
import types

import pytest
from absl import flags
from conftest import ROOT, parsed_flags

import idip_jax
import run as run_py
from idip_jax import config, config_train, convs, data, models, prelim, runner, train


def test_flag_defaults_are_the_dataclass_defaults():
  fv = flags.FlagValues()
  config.define_flags(fv, config.JobConfig)
  n = 0
  for _, f, _ in config.leaves(config.JobConfig):
    name = config.flag_name(f)
    if name is None:
      continue
    default = fv[name].default
    assert (tuple(default) if isinstance(default, list) else default) == f.default, name
    assert fv[name].help.endswith(f.metadata["help"]), name  # enums prefix their choices
    n += 1
  assert n >= 45
  # and parsing no flags gives the dataclasses' own defaults
  fv(["run.py"])
  assert config.from_flags(fv, config.JobConfig) == config.JobConfig()


def test_no_flag_is_defined_twice_across_run_py_and_experiments():
  generated = {
    config.flag_name(f) for cls in (config.JobConfig, config.ExperimentConfig) for _, f, _ in config.leaves(cls)
  } - {None}
  literal = {}
  for path in [os.path.join(ROOT, "run.py")] + glob.glob(os.path.join(ROOT, "experiments", "*.py")):
    for name in re.findall(r'flags\.DEFINE_\w+\(\s*"(\w+)"', open(path).read()):
      assert name not in generated, (path, name)  # a config field: generated, not written again
      assert name not in literal, (path, name, literal.get(name))
      literal[name] = path
  assert "flags.DEFINE" not in open(os.path.join(ROOT, "run.py")).read()
  assert len(open(os.path.join(ROOT, "run.py")).read().splitlines()) < 40


def test_choices_match_the_implementations():
  f = {fl.name: fl for fl in dataclasses.fields(config.NetConfig)}
  assert set(f["act"].metadata["choices"]) == set(models.ACTIVATIONS)
  assert set(config.PRECISIONS) == set(train.PRECISIONS)
  assert set(config.PRELIMS) == set(prelim.REGISTRY)
  rf = {fl.name: fl for fl in dataclasses.fields(config.RunConfig)}
  assert rf["noise"].metadata["choices"] == data.NOISE_PROTOCOLS


def test_bad_values_are_one_line_errors_naming_the_flag():
  with pytest.raises(data.InputError, match="--width must be >= 1"):
    config.check(config.RunConfig(net=config.NetConfig(width=0)))
  with pytest.raises(data.InputError, match="unknown --method=foo"):
    config.check(config.JobConfig(methods=("dip", "foo")))
  with pytest.raises(data.InputError, match="--lr must be finite"):
    config.check(config.RunConfig(fit=config.FitConfig(lr=float("nan"))))
  fv = flags.FlagValues()
  config.define_flags(fv, config.RunConfig)
  config.define_flags(fv, config.RunConfig)  # the same fields again (two scripts in a process): no-op
  other = flags.FlagValues()
  flags.DEFINE_integer("sigma", 0, "hand-written", flag_values=other)
  with pytest.raises(ValueError, match="defined twice"):
    config.define_flags(other, config.RunConfig)


def test_resolve_makes_every_auto_explicit():
  cfg = config.RunConfig(method="idip", prelim=config.PrelimConfig("bm3d"))
  cpu = runner.resolve(cfg, 1, "cpu")
  assert (cpu.fit.loop, cpu.net.conv, cpu.fit.steps) == ("host", "cpu", config.DEFAULT_STEPS["idip"])
  # --batch_strategy=auto stays auto: each bucket's batch size and lowering are timed (batching.choose).
  assert (cpu.batch_size, cpu.fit.batch_strategy, cpu.net.batch_conv) == (0, "auto", "auto")
  vmap = runner.resolve(dataclasses.replace(cfg, fit=config.FitConfig(batch_strategy="vmap")), 1, "cpu")
  assert (vmap.batch_size, vmap.net.batch_conv) == (1, convs.DEFAULT_BATCH_CONV["cpu"])
  assert (cpu.net.in_channels, cpu.net.out_channels, cpu.net.complex_connection) == (1, 1, True)
  gpu = runner.resolve(dataclasses.replace(cfg, method="dip"), 3, "gpu")
  assert (gpu.fit.loop, gpu.net.conv, gpu.net.in_channels, gpu.net.out_channels) == ("scan", "lax", 32, 3)
  assert not gpu.net.complex_connection and gpu.fit.prelim_weight == 0.0


def test_no_mutable_module_state_in_the_package():
  mutable = (dict, list, set, bytearray)
  for mod in pkgutil.iter_modules(idip_jax.__path__):
    m = importlib.import_module(f"idip_jax.{mod.name}")
    for name, v in vars(m).items():
      if name.startswith("__") or isinstance(v, (types.ModuleType, type)) or callable(v):
        continue
      if f"{mod.name}.{name}" == "locks._HELD":  # the workdir locks this process holds: a kernel resource
        continue
      assert not isinstance(v, mutable), f"idip_jax.{mod.name}.{name} is a mutable {type(v).__name__}"


def test_help_and_parse_use_the_generated_flags():
  text = config.usage(run_py.__doc__, flags.FLAGS, config.JobConfig)
  for name in ("--width", "--in_channels", "--image_channels", "--conv", "--method", "--prelim"):
    assert f"  {name}:" in text, name
  with parsed_flags(["run.py", "--method=dip,idip", "--width=16", "--image_channels=1", "--loop=scan"]) as fv:
    job = config.from_flags(fv, config.JobConfig)
  assert job.methods == ("dip", "idip") and job.run.net.width == 16 and job.run.image_channels == 1
  assert job.run.fit.loop == "scan"


def test_every_numeric_flag_has_a_range():
  """Every int/float flag of run.py, the experiments and training has a lower and an upper bound (a step
  count of 1e20 fitted for ever, --ema_decay=1.5 diverged), unless its values are a list of choices; each
  bound is enforced in one line."""
  for cls in (config.JobConfig, config.ExperimentConfig, config_train.TrainConfig, config_train.MetaConfig):
    for path, f, t in config.leaves(cls):
      if t in (int, float) and config.flag_name(f) and not f.metadata["choices"]:
        assert f.metadata["lo"] is not None and f.metadata["hi"] is not None, ".".join(path)
  with pytest.raises(data.InputError, match=r"--ema_decay must be >= 0 and < 1 \(got 1.0\)"):
    config.check(config.FitConfig(ema_decay=1.0))  # hi_open: 1 itself is out (the EMA would never move)
  config.check(config.FitConfig(ema_decay=0.999))
  with pytest.raises(data.InputError, match=r"--steps must be >= 0 and <= 10000000"):
    config.check(config.FitConfig(steps=config.STEP_MAX + 1))


def test_flags_another_flag_makes_meaningless_are_refused_or_warned():
  from idip_jax import checks

  job = lambda methods, **run: config.JobConfig(methods=methods, run=config.RunConfig(**run))
  with pytest.raises(data.InputError, match="--prelim_dir=x has no effect here: it needs --prelim=file"):
    checks.unused_flags(job(("idip",), prelim=config.PrelimConfig(name="bm3d", prelim_dir="x")))
  checks.unused_flags(job(("idip",), prelim=config.PrelimConfig(name="file", prelim_dir="x")))
  # A method-dependent flag is meaningful when any method of the job uses it (--method=dip,idip).
  weighted = dict(fit=config.FitConfig(prelim_weight=0.5))
  checks.unused_flags(job(("dip", "idip"), **weighted))
  with pytest.raises(data.InputError, match="--sr_factor=8 has no effect here: it needs --task=sr"):
    checks.unused_flags(job(("dip",), fit=config.FitConfig(sr_factor=8)))
  checks.unused_flags(job(("dip",), fit=config.FitConfig(sure_twins=2)))  # a tuning knob: a warning
  with pytest.raises(data.InputError, match="--process_id has no effect here: it needs --distributed"):
    checks.unused_flags(config.JobConfig(process_id=1))
