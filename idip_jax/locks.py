"""One run per workdir: an advisory lock (flock) on the workdir's marker file, held while a job
runs in it. A second run into the same folder (another --resume, an --overwrite that would delete
the live run's files) is refused with one line naming the process that holds it. The kernel drops
the lock when its process ends, so a crashed or killed run leaves nothing stuck."""

from __future__ import annotations

import contextlib
import fcntl
import os

from idip_jax.data import InputError

_HELD: dict[str, tuple[int, int]] = {}  # marker path -> (fd holding the lock, inode it locks)


def holder(marker: str) -> str:
  """'pid N (its command line)' of the process holding a flock on `marker`, from /proc/locks
  (Linux); 'another process' where that cannot be read."""
  try:
    ino = os.stat(marker).st_ino
    with open("/proc/locks") as f:
      for line in f:
        parts = line.split()
        if "FLOCK" in parts and parts[-3].split(":")[-1] == str(ino):
          pid = parts[parts.index("FLOCK") + 3]
          with open(f"/proc/{pid}/cmdline", "rb") as c:
            cmd = c.read().replace(b"\0", b" ").decode(errors="replace").strip()
          return f"pid {pid} ({cmd[:100]}{'...' if len(cmd) > 100 else ''})"
  except (OSError, ValueError, IndexError):
    pass
  return "another process"


def lock(workdir: str, marker: str) -> None:
  """Takes the lock of a tool-made workdir (its marker file) for this process, or refuses in one line
  while another process holds it. Taking it again in the same process is a no-op; a marker made anew
  (--overwrite) is locked anew. Under jax.distributed only process 0 locks (the others share its run)."""
  import jax

  if jax.process_index() != 0 or not os.path.isfile(marker):
    return
  key, ino = os.path.abspath(marker), os.stat(marker).st_ino
  if key in _HELD:
    if _HELD[key][1] == ino:
      return
    release(key)  # the folder was replaced (--overwrite) under this process's old lock
  fd = os.open(marker, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    raise InputError(
      f"--workdir={workdir} is in use by {holder(marker)}: wait for that run to end, or choose another --workdir"
    ) from None
  _HELD[key] = (fd, ino)


def release(key: str) -> None:
  fd, _ = _HELD.pop(key)
  os.close(fd)  # closing the only descriptor drops the flock


@contextlib.contextmanager
def held():
  """Releases, on exit, every workdir lock taken inside (a job's): a process that runs many jobs
  (tables.py, the test suite) holds only its current ones."""
  before = set(_HELD)
  try:
    yield
  finally:
    for key in set(_HELD) - before:
      release(key)
