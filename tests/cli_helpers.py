"""Run boldjax commands as a user does and check how they refuse bad input."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from boldjax import cli, prepare

REPO = Path(__file__).resolve().parents[1]


def check_refusal(code: int, stderr: str, prog: str, match: str, out: Path | str | None) -> str:
  """Exit status 2, exactly one stderr line `PROG: error: ...` matching `match`, no `out`."""
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert code == cli.EXIT_BAD_INPUT, stderr[-3000:]
  assert len(lines) == 1, stderr[-3000:]
  assert lines[0].startswith(prog) and ": error: " in lines[0], lines[0]
  assert re.search(match, lines[0]), f"{match!r} not in {lines[0]!r}"
  if out is not None:
    assert not Path(out).exists(), f"{out} was left behind"
  return lines[0]


def prepare_refuses(capsys, argv: list[str], match: str, out: Path | str | None) -> str:
  """`python -m boldjax.prepare ARGV` (in-process) refuses with a one-line error."""
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_info:
    cli.run_argparse(prepare.PROG, prepare.main, [str(a) for a in argv])
  return check_refusal(exit_info.value.code, capsys.readouterr().err, prepare.PROG, match, out)


def command_refuses(module: str, argv: list[str], match: str, out: Path | str | None = None) -> str:
  """`python -m MODULE ARGV` (a subprocess, as from a shell) refuses with a one-line error."""
  proc = subprocess.run(
    [sys.executable, "-m", module, *map(str, argv)],
    cwd=REPO, capture_output=True, text=True, timeout=600,
  )  # fmt: skip
  return check_refusal(proc.returncode, proc.stderr, f"python -m {module}", match, out)
