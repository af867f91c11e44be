"""`python -m boldjax.prepare FORMAT ...`: turn raw data into a boldjax dataset directory.

Each format is an importer registered as registry.register("importer", name): a class with
`help`, `add_arguments(parser)` and `run(args) -> output path`. New formats (webdataset,
HDF5, NIfTI/CIFTI + atlas) only register another importer.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from boldjax import cli, registry
from boldjax.data import paths

PROG = "python -m boldjax.prepare"


def build_parser() -> argparse.ArgumentParser:
  import boldjax.data  # noqa: F401  (registers the built-in importers)

  parser = cli.ArgumentParser(prog=PROG, description="Import raw data into a boldjax dataset.")
  parser.add_argument(cli.VERBOSE_FLAG, action="store_true", help="show tracebacks")
  sub = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
  for name in registry.names("importer"):
    importer = registry.get("importer", name)
    importer.add_arguments(sub.add_parser(name, help=importer.help))
  return parser


def main(argv: list[str] | None = None) -> str:
  """Parse argv, run the chosen importer, return the output directory."""
  args = build_parser().parse_args(argv)
  start = time.monotonic()
  importer = registry.get("importer", args.format)
  if paths.is_remote(args.out):  # build on local disk, then upload the finished folder
    paths.check_new_output(args.out, getattr(args, "overwrite", False))
    remote, staging = args.out, tempfile.mkdtemp(prefix="boldjax-prepare-")
    try:
      args.out = os.path.join(staging, "dataset")
      out = paths.upload_dataset(importer.run(args), remote, overwrite=True)
    finally:
      shutil.rmtree(staging, ignore_errors=True)
  else:
    out = importer.run(args)
  print(f"[prepare] {args.format}: wrote {out} in {time.monotonic() - start:.1f}s", flush=True)
  return out


if __name__ == "__main__":
  cli.run_argparse(PROG, main, sys.argv[1:])
