"""run.py with a fault injected from outside the package (no test hook in production
code): SIGKILL, which no handler sees, right after EVENT: "checkpoint" (a checkpoint was written)
or "image" (results.json was written, i.e. an image finished).

  python tests/fault_run.py EVENT RUN_PY_FLAGS...
"""

import os
import runpy
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from idip_jax import checkpoint, outputs


def kill_after(module, name: str, when=lambda *args: True) -> None:
  original = getattr(module, name)

  def wrapped(*args, **kwargs):
    out = original(*args, **kwargs)
    if when(*args):
      os.kill(os.getpid(), signal.SIGKILL)
    return out

  setattr(module, name, wrapped)


if __name__ == "__main__":
  event = sys.argv.pop(1)
  if event == "checkpoint":
    kill_after(checkpoint, "save")
  elif event == "image":
    kill_after(outputs, "write_json", lambda path, *rest: os.path.basename(path) == "results.json")
  else:
    sys.exit(f"unknown fault event {event!r}: checkpoint or image")
  sys.argv[0] = os.path.join(ROOT, "run.py")
  runpy.run_path(sys.argv[0], run_name="__main__")
