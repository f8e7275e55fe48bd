"""Config dataclasses <-> absl flags: `option` declares a field (help, allowed values, bounds),
and these functions turn any config dataclass into flags, parse them back into a frozen instance,
check the values and print usage. config.py declares the settings and re-exports these.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import typing
from typing import Any

from absl import flags

from idip_jax.data import InputError


def option(
  default: Any,
  help: str,
  *,
  choices: tuple = (),
  lo: float | None = None,
  hi: float | None = None,
  hi_open: bool = False,
  flag: str | None = "",
  path: bool = False,
) -> Any:
  """A config field. flag: the flag's name ("" = the field's name, None = set by the library,
  not a flag); lo, hi: smallest and largest allowed values (hi_open: values must stay below hi);
  path: '~' is expanded."""
  meta = {"help": help, "choices": choices, "lo": lo, "hi": hi, "hi_open": hi_open, "flag": flag, "path": path}
  return dataclasses.field(default=default, metadata=meta)


def bounds_text(f: dataclasses.Field) -> str:
  """A numeric field's range as flags.md and the refusals say it: '>= 0, < 1'."""
  m = f.metadata
  num = lambda x: str(int(x)) if float(x).is_integer() else f"{x:g}"
  parts = [f">= {num(m['lo'])}" if m["lo"] is not None else ""]
  parts += [f"{'<' if m.get('hi_open') else '<='} {num(m['hi'])}" if m.get("hi") is not None else ""]
  return ", ".join(p for p in parts if p)


def leaves(cls: type, prefix: tuple[str, ...] = ()):
  """(path, field, type) of every non-dataclass field of cls, nested dataclasses flattened."""
  hints = typing.get_type_hints(cls)
  for f in dataclasses.fields(cls):
    t = hints[f.name]
    if dataclasses.is_dataclass(t):
      yield from leaves(t, prefix + (f.name,))
    else:
      yield prefix + (f.name,), f, t


def flag_name(f: dataclasses.Field) -> str | None:
  return f.name if f.metadata.get("flag") == "" else f.metadata.get("flag")


def define_flags(fv: flags.FlagValues, cls: type) -> None:
  """One flag per field of cls (nested dataclasses flattened); names must be unique. Defining the
  same fields again (two scripts in one process) is a no-op."""
  for _, f, t in leaves(cls):
    name = flag_name(f)
    if name is None:
      continue
    if name in fv:
      if getattr(fv[name], "config_field", None) is f:
        continue
      raise ValueError(f"flag --{name} is defined twice")
    kw = dict(name=name, default=f.default, help=f.metadata["help"], flag_values=fv)
    if t is bool:
      flags.DEFINE_bool(**kw)
    elif t is int:
      flags.DEFINE_integer(**kw)
    elif t is float:
      flags.DEFINE_float(**kw)
    elif t is str and f.metadata["choices"]:
      flags.DEFINE_enum(enum_values=list(f.metadata["choices"]), **kw)
    elif t is str:
      flags.DEFINE_string(**kw)
    elif typing.get_origin(t) is tuple:
      flags.DEFINE_list(**dict(kw, default=list(f.default)))
    else:
      raise TypeError(f"no flag type for {f.name}: {t}")
    fv[name].config_field = f


def from_flags(fv: flags.FlagValues, cls: type):
  """The parsed flags as a cls instance (nested dataclasses built from their own fields)."""
  hints = typing.get_type_hints(cls)
  kw = {}
  for f in dataclasses.fields(cls):
    if dataclasses.is_dataclass(hints[f.name]):
      kw[f.name] = from_flags(fv, hints[f.name])
    elif (name := flag_name(f)) is not None:
      v = fv[name].value
      kw[f.name] = tuple(v) if isinstance(v, list) else os.path.expanduser(v) if f.metadata["path"] else v
  return cls(**kw)


HELP_ARGS = frozenset({"-h", "--help", "-help", "--helpfull", "-?"})


def parse_argv(fv: flags.FlagValues, argv: list[str]) -> list[str]:
  """Parses argv into fv -> the program name and what is left; a bad flag or a stray argument raises
  InputError (one line)."""
  try:
    rest = fv(argv)
  except flags.Error as e:
    raise InputError(str(e)) from None
  if len(rest) > 1:
    raise InputError(f"unexpected arguments: {' '.join(rest[1:])}")
  return rest


def parse(fv: flags.FlagValues, argv: list[str], cls: type):
  """argv -> a cls instance; a bad flag or a stray argument raises InputError (one line)."""
  parse_argv(fv, argv)
  return from_flags(fv, cls)


def usage(doc: str, fv: flags.FlagValues, cls: type) -> str:
  names = {flag_name(f) for _, f, _ in leaves(cls)} - {None}
  lines = [
    doc.strip(),
    "",
    f"usage: python {os.path.basename(sys.argv[0])} --flagfile=FILE [--name=value ...]",
    "",
    "  --flagfile: read flags from FILE (one --name=value per line, '#' comments; files may include others)",
  ]
  for name in sorted(names):
    fl = fv[name]
    shown = f"[no]{name}" if fl.boolean else name
    lines.append(f"  --{shown}: {fl.help} (default: {fl.default_as_str or repr('')})")
  return "\n".join(lines)


def check(cfg) -> None:
  """Per-field rules of any config dataclass: finite numbers, allowed values, lower bounds."""
  for path, f, _ in leaves(type(cfg)):
    v = cfg
    for p in path:
      v = getattr(v, p)
    name = flag_name(f) or ".".join(path)
    if isinstance(v, float) and not math.isfinite(v):  # --sigma=inf or --lr=nan would fit NaN everywhere
      raise InputError(f"--{name} must be finite (got {v})")
    choices = f.metadata["choices"]
    for item in v if isinstance(v, tuple) else (v,):
      if choices and item not in choices:
        raise InputError(f"unknown --{name}={item}; choose one of {', '.join(map(str, choices))}")
    lo, hi = f.metadata["lo"], f.metadata.get("hi")
    if (lo is not None and v < lo) or (hi is not None and (v >= hi if f.metadata.get("hi_open") else v > hi)):
      raise InputError(f"--{name} must be {bounds_text(f).replace(', ', ' and ')} (got {v})")


def markdown(sections: tuple[tuple[str, type], ...]) -> str:
  """docs/flags.md (config_train.flags_markdown): a table of every flag per (title, config dataclass)."""
  out = [
    "# Flags",
    "",
    "Generated from `idip_jax/config.py` and `config_train.py` by `config_train.flags_markdown()`; do not edit by",
    "hand. Regenerate:",
    "`python -c 'from idip_jax import config_train; print(config_train.flags_markdown(), end=\"\")' > docs/flags.md`.",
    "Every flag file (`--flagfile=FILE`) holds one `--name=value` per line and may include others.",
  ]
  for title, cls in sections:
    groups: dict[str, list[str]] = {}
    for path, f, _ in leaves(cls):
      name = flag_name(f)
      if name is None:
        continue
      default = ",".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
      allowed = " \\| ".join(map(str, f.metadata["choices"]))
      allowed = allowed or bounds_text(f)
      meaning = f.metadata["help"].replace("|", "\\|")
      row = f"| `--{name}` | `{default!s}` | {allowed} | {meaning} |"
      groups.setdefault(".".join(path[:-1]) or cls.__name__, []).append(row)
    out += ["", f"## {title}"]
    for group, rows in groups.items():
      out += ["", f"### {group}", "", "| flag | default | allowed | meaning |", "|---|---|---|---|"] + rows
  return "\n".join(out) + "\n"
