"""The README's commands stay true: its two first commands and every usage example name scripts,
flagfiles, extras and flags that exist (parsed by absl, flagfiles included), and docs/flags.md is
what config.py generates."""

import os
import re
import shlex

import pytest
import tomllib
from absl import flags
from conftest import ROOT, import_experiment, parsed_flags

from idip_jax import config_train

README = os.path.join(ROOT, "README.md")


def commands() -> list[str]:
  """Every `pip ...` / `python ...` command of the README's bash blocks (split at &&)."""
  text = open(README).read()
  out = []
  for block in re.findall(r"```bash\n(.*?)```", text, re.S):
    for line in block.splitlines():
      line = line.split(" #")[0].strip()
      for part in line.split("&&"):
        part = part.strip()
        if part.startswith(("python ", "pip ")):
          out.append(part)
  return out


def test_readme_is_short_and_starts_with_the_two_commands():
  lines = open(README).read().splitlines()
  assert len(lines) <= 150, len(lines)
  first = commands()[:4]
  assert first[0].startswith("pip install -e '.[demo]'")
  assert first[1] == "python run.py --flagfile=experiments/demo.flags"
  assert first[2].startswith("pip install -e '.[test]'") and first[3].startswith("python -m pytest")
  ci = open(os.path.join(ROOT, ".ci", "run")).read()
  assert "pip install -q -e '.[test]'" in ci and "python -m pytest" in ci


def test_every_readme_command_parses():
  extras = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]["optional-dependencies"]
  scripts = 0
  for cmd in commands():
    argv = shlex.split(cmd)
    if argv[0] == "pip":
      for spec in re.findall(r"\.\[([a-z,]+)\]", cmd):
        assert set(spec.split(",")) <= set(extras), cmd
      continue
    if argv[1] == "-m":  # python -m pytest ...
      continue
    script = argv[1]
    assert os.path.isfile(os.path.join(ROOT, script)), cmd
    if script == "run.py":
      import run as module  # defines run.py's flags
    else:
      module = import_experiment(os.path.splitext(os.path.basename(script))[0])
    for a in argv[2:]:  # flagfiles named on the command line exist (absl reads nested ones)
      if a.startswith("--flagfile="):
        assert os.path.isfile(os.path.join(ROOT, a.split("=", 1)[1])), cmd
    own = getattr(module, "FV", None)  # train_denoiser.py parses its own flag set
    if isinstance(own, flags.FlagValues):
      cwd = os.getcwd()
      os.chdir(ROOT)
      try:
        own([script] + argv[2:])
      finally:
        own.unparse_flags()
        os.chdir(cwd)
    else:
      with parsed_flags([script] + argv[2:]):  # unknown flags or bad values raise here
        pass
    scripts += 1
  assert scripts >= 5  # the demo and one example per job (denoise, tables, benchmark, training)


def test_docs_flags_md_is_generated_from_config():
  path = os.path.join(ROOT, "docs", "flags.md")
  if not os.path.isfile(path):
    pytest.fail("docs/flags.md is missing: " + config_train.flags_markdown.__doc__.splitlines()[-1].strip())
  assert open(path).read() == config_train.flags_markdown(), (
    "docs/flags.md is stale; regenerate it: " + config_train.flags_markdown.__doc__.splitlines()[-1].strip()
  )


def test_readme_links_resolve():
  text = open(README).read()
  for target in re.findall(r"\]\(([^)#]+)\)", text):
    if not target.startswith("http"):
      assert os.path.exists(os.path.join(ROOT, target)), target


def test_layout_names_every_module_and_none_is_over_400_lines():
  """The README's Layout gives every module of the package its one concern, and no module
  grows past 400 lines (split it by concern instead)."""
  layout = open(README).read().split("## Layout")[1].split("\n## ")[0]
  package = os.path.join(ROOT, "idip_jax")
  for name in sorted(os.listdir(package)):
    if not name.endswith(".py") or name == "__init__.py":
      continue
    assert f"`{name}`" in layout or f"`idip_jax/{name}`" in layout, f"README Layout does not name {name}"
    n = len(open(os.path.join(package, name)).read().splitlines())
    assert n <= 400, f"idip_jax/{name} has {n} lines"


def test_no_issue_numbers_anywhere_in_the_project():
  """A reader has no access to the project's tracker: code, docs, flagfiles, tests and results name the
  question or the measurement, never 'issue N'."""
  pattern = re.compile(r"\bissues? ?#?\d+", re.I)
  found = []
  for d, subdirs, files in os.walk(ROOT):
    subdirs[:] = [s for s in subdirs if not s.startswith(".") and s not in ("__pycache__", "runs", "build")]
    for name in files:
      if name.endswith((".py", ".md", ".flags", ".toml", ".json", ".txt")) and not name.startswith("."):
        path = os.path.join(d, name)
        with open(path, errors="replace") as f:
          found += [f"{os.path.relpath(path, ROOT)}: {m.group(0)}" for m in pattern.finditer(f.read(100_000))]
  assert not found, found[:10]
