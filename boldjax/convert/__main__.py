"""`python -m boldjax.convert FAMILY CHECKPOINT --config=... --workdir=W` (see convert/cli.py)."""

from boldjax.convert.cli import run

if __name__ == "__main__":
  run()
