"""How the package is put together: imports go one way (no circle), the pure step and the fit engine
never reach the x_bar producers, and the runner is the one module that joins the two (docs/design.md,
Imports)."""

import ast
import os

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "idip_jax")
ENGINE = {"train", "fit", "batching", "buckets", "models", "convs"}  # the pure step and the fit engine
XBAR = {"prelim", "denoisers", "denoiser_train", "matconvnet", "noise_level", "sure_twins"}  # x_bar's makers


def import_graph() -> dict[str, set[str]]:
  """Module -> the package modules it imports, at the top or inside a function."""
  graph = {}
  for name in sorted(os.listdir(PACKAGE)):
    if not name.endswith(".py"):
      continue
    deps = set()
    for node in ast.walk(ast.parse(open(os.path.join(PACKAGE, name)).read())):
      if isinstance(node, ast.ImportFrom) and node.module == "idip_jax":
        deps |= {a.name for a in node.names}
      elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("idip_jax."):
        deps.add(node.module.split(".")[1])
      elif isinstance(node, ast.Import):
        deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("idip_jax.")}
    graph[name[:-3]] = deps - {name[:-3]}
  return graph


def reach(graph: dict[str, set[str]], start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    for d in graph.get(todo.pop(), ()):
      if d not in seen:
        seen.add(d)
        todo.append(d)
  return seen


def test_imports_have_no_circle():
  graph = import_graph()
  circles = sorted(m for m in graph if m in reach(graph, m))
  assert not circles, circles


def test_the_engine_never_reaches_the_x_bar_producers_and_only_the_runner_joins_them():
  graph = import_graph()
  for m in ENGINE:
    assert not reach(graph, m) & XBAR, (m, reach(graph, m) & XBAR)
  joins = sorted(m for m, deps in graph.items() if deps & ENGINE and deps & XBAR)
  assert joins == ["runner"], joins


def test_experiments_top_level_is_what_a_user_runs_and_each_study_asks_a_question():
  """`ls experiments/` explains it: at most 8 things to run at the top (scripts and run.py flagfiles; base.flags
  is include-only), the rest in folders named for their purpose; every study's first docstring line is the
  question it answers."""
  top = os.path.join(ROOT, "experiments")
  runnable = [f for f in os.listdir(top) if f.endswith((".py", ".flags")) and f not in ("__init__.py", "base.flags")]
  assert len(runnable) <= 8, sorted(runnable)
  folders = {f for f in os.listdir(top) if os.path.isdir(os.path.join(top, f)) and not f.startswith(("_", "."))}
  assert {"harness", "studies", "speed", "results"} <= folders, folders
  studies = os.path.join(top, "studies")
  for name in sorted(os.listdir(studies)):
    if name.endswith(".py") and name != "__init__.py":
      doc = ast.get_docstring(ast.parse(open(os.path.join(studies, name)).read())) or ""
      assert doc.splitlines()[0].rstrip().endswith("?"), (name, doc.splitlines()[:1])
