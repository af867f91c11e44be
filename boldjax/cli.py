"""What every boldjax command shares: bad input is one line on stderr and exit status 2.

A user who mistypes a path or a config key wants to read what is wrong, not a traceback;
the traceback is still there with `--verbose` (or BOLDJAX_VERBOSE=1). Commands raise
`InputError` (or the ValueError / OSError / KeyError family the data code raises, whose
messages name the file, the field, the expected and the found value); anything else is a
bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import runpy
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags
from absl import logging as absl_logging

from boldjax import xla_flags

EXIT_BAD_INPUT = 2
VERBOSE_FLAG = "--verbose"
VERBOSE_ENV = "BOLDJAX_VERBOSE"


class InputError(ValueError):
  """Bad user input; the message names the file, the field, the expected and found value."""


# What counts as bad input at the command line. ValueError covers the importers' and
# config parsers' checks; OSError the files a user named; KeyError unknown registry names.
BAD_INPUT = (ValueError, OSError, KeyError, app.UsageError, flags.Error)


def verbose(argv: Sequence[str] | None = None) -> bool:
  argv = sys.argv if argv is None else argv
  return VERBOSE_FLAG in argv or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def one_line(error: BaseException) -> str:
  """The error's message as one line (KeyError's repr quotes stripped)."""
  if isinstance(error, KeyError) and error.args:
    text = str(error.args[0])
  else:
    text = str(error) or type(error).__name__
  return " ".join(text.split())


def fail(prog: str, error: BaseException | str, argv: Sequence[str] | None = None) -> NoReturn:
  """Print `prog: error: message` (one line; traceback only when verbose), exit 2."""
  if isinstance(error, BaseException) and verbose(argv):
    traceback.print_exception(error, file=sys.stderr)
  message = one_line(error) if isinstance(error, BaseException) else " ".join(error.split())
  traced = isinstance(error, BaseException) and not isinstance(error, app.UsageError | flags.Error)
  hint = f" (rerun with {VERBOSE_FLAG} for the traceback)" if traced and not verbose(argv) else ""
  print(f"{prog}: error: {message}{hint}", file=sys.stderr, flush=True)
  sys.exit(EXIT_BAD_INPUT)


def _without_embedded_traceback(message: str) -> str:
  """config_flags pastes the config file's traceback into its message: keep its last line."""
  head, sep, tail = message.partition("Traceback (most recent call last):")
  if not sep:
    return message
  raised = list(re.finditer(r"\b[A-Za-z_.]*(?:Error|Exception): ", tail))
  last = tail[raised[-1].start() :] if raised else tail.rsplit(" File ", 1)[-1]
  return f"{head.strip()} {last.strip()}"


def unknown_override(argv: Sequence[str], flag: str = "config") -> str | None:
  """'--config.a.b: no field 'b' in config.a; known: [...]; did you mean ...' or None."""
  try:
    config = _load_config_file(argv, flag)
  except Exception:  # noqa: BLE001 - the config file itself is broken: nothing to diagnose
    return None
  for arg in argv:
    if not arg.startswith(f"--{flag}."):
      continue
    dotted = arg[2:].split("=", 1)[0]
    node, walked = config, flag
    for part in dotted.split(".")[1:]:
      if not hasattr(node, "keys") or part not in node:
        known = sorted(node.keys()) if hasattr(node, "keys") else []
        close = difflib.get_close_matches(part, known, n=1)
        hint = f'; Did you mean "{close[0]}" instead of "{part}"?' if close else ""
        return f"--{dotted}: {walked} has no field {part!r}; known fields: {known}{hint}"
      node, walked = node[part], f"{walked}.{part}"
  return None


def _load_config_file(argv: Sequence[str], flag: str) -> Any:
  """get_config(arg) of the `--config=path.py:arg` in argv (flag parsing stopped midway)."""
  spec = next(a.split("=", 1)[1] for a in argv if a.startswith(f"--{flag}="))
  file, _, arg = spec.partition(":")
  get_config = runpy.run_path(file)["get_config"]
  return get_config(arg) if arg else get_config()


def guarded(prog: str, main: Callable[..., Any]) -> Callable[..., Any]:
  """main(...) with bad input turned into `fail` (one line, exit 2)."""

  def wrapped(*args: Any, **kwargs: Any) -> Any:
    try:
      return main(*args, **kwargs)
    except BAD_INPUT as e:
      fail(prog, e)

  return wrapped


def run_absl(prog: str, main: Callable[[list[str]], Any]) -> None:
  """app.run(main) where flag errors (unknown flags, config overrides) exit 2 on one line."""

  def parse(argv: list[str]) -> list[str]:
    argv = [a for a in argv if a != VERBOSE_FLAG]
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      fail(prog, unknown_override(argv) or _without_embedded_traceback(one_line(e)))
    except (AttributeError, KeyError, ValueError, TypeError) as e:  # raised by a config file
      spec = next((a for a in argv if a.startswith("--config=")), "")
      fail(prog, unknown_override(argv) or f"{spec}: {type(e).__name__}: {one_line(e)}")

  def quiet_main(argv: list[str]) -> Any:
    # absl logs INFO to stderr (orbax writes ~60 lines a save): keep stderr for warnings
    # and errors unless the user asks for more.
    if not verbose() and not any(a.startswith(("--verbosity", "-v")) for a in sys.argv):
      absl_logging.set_verbosity(absl_logging.WARNING)
    return main(argv)

  xla_flags.apply_defaults()
  app.run(guarded(prog, quiet_main), flags_parser=parse)


def run_argparse(prog: str, main: Callable[[list[str]], Any], argv: Sequence[str]) -> Any:
  """main(argv) for argparse commands; `--verbose` is taken out before parsing."""
  rest = [a for a in argv if a != VERBOSE_FLAG]
  xla_flags.apply_defaults()
  return guarded(prog, main)(rest)


class ArgumentParser(argparse.ArgumentParser):
  """argparse whose usage errors are one line and exit 2, like every other bad input."""

  def error(self, message: str) -> NoReturn:
    fail(self.prog, f"{message} (see {self.prog} --help)")
