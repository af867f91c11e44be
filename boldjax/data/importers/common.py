"""What every importer shares: options and their flags, subject names, the subject-wise
split and the dataset writer (bold_records), and the flag spellings of earlier releases.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from boldjax.cli import InputError
from boldjax.data import bold_records

_SUBJECT = re.compile(r"sub-([A-Za-z0-9]+)")


@dataclasses.dataclass
class ImportOptions:
  """What every importer shares: where to write, how to split, how to store."""

  out: str
  overwrite: bool = False
  val_fraction: float = 0.1
  test_fraction: float = 0.1
  split_seed: int = 0
  seq_min: int = 10
  dtype: str = "float16"
  name: str | None = None
  networks: str | None = None  # JSON file {"network_of_parcel": [...], "network_names": [...]}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--out", required=True, help="output dataset directory")
  parser.add_argument("--overwrite", action="store_true")
  parser.add_argument("--val-fraction", type=float, default=0.1, help="of subjects")
  parser.add_argument("--test-fraction", type=float, default=0.1, help="of subjects")
  parser.add_argument("--split-seed", type=int, default=0)
  parser.add_argument("--seq-min", type=int, default=10, help="refuse runs shorter than this")
  parser.add_argument("--dtype", choices=bold_records.BOLD_DTYPES, default="float16")
  parser.add_argument("--name", default=None, help="dataset name in meta.json")
  parser.add_argument("--networks", default=None, help="JSON with network_of_parcel, names")


def import_options(args: argparse.Namespace) -> ImportOptions:
  return ImportOptions(
    out=args.out,
    overwrite=args.overwrite,
    val_fraction=args.val_fraction,
    test_fraction=args.test_fraction,
    split_seed=args.split_seed,
    seq_min=args.seq_min,
    dtype=args.dtype,
    name=args.name,
    networks=args.networks,
  )


def subject_of(name: str, fallback: str) -> str:
  """BIDS 'sub-XX' in a key or file name, else the fallback."""
  m = _SUBJECT.search(name)
  return f"sub-{m.group(1)}" if m else fallback


def file_stem(path: str) -> str:
  base = os.path.basename(path)
  for ext in (".dtseries.nii", ".nii.gz", ".nii", ".tar.gz", ".tar", ".h5", ".hdf5"):
    if base.endswith(ext):
      return base[: -len(ext)]
  return base


def parse_json(path: str, key: str, ext: str, data: bytes) -> Any:
  try:
    return json.loads(data)
  except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
    raise InputError(f"{path}: sample {key!r} field {ext!r}: expected JSON, {e}") from e


def write_dataset(
  opts: ImportOptions,
  subjects: Iterable[str],
  records: Callable[[], Iterator[dict[str, Any]]],
  meta: dict[str, Any],
) -> str:
  """Split subjects, route records by subject, build the dataset."""
  subjects = sorted(set(subjects))
  if not subjects:
    source = meta.get("source", {})
    inputs = source.get("inputs", source.get("input", meta.get("name", "?")))
    raise InputError(f"{inputs}: field 'records' expected at least one run, found none")
  if opts.networks:
    with open(opts.networks, "rb") as f:
      net = parse_json(opts.networks, "networks", "file", f.read())
    if not isinstance(net, dict):
      raise InputError(f"{opts.networks}: expected a JSON object, found {type(net).__name__}")
    for key in ("network_of_parcel", "network_names"):
      if key not in net:
        raise ValueError(f"{opts.networks}: field {key!r} missing; found {sorted(net)}")
      meta[key] = net[key]
  splits = bold_records.subject_splits(
    subjects,
    val_fraction=opts.val_fraction,
    test_fraction=opts.test_fraction,
    seed=opts.split_seed,
  )
  ids = {s: i for i, s in enumerate(subjects)}
  streams = bold_records.split_streams(records(), splits, bold_records.SPLITS)
  meta.setdefault("name", opts.name or "parcellated")
  if opts.name:
    meta["name"] = opts.name
  meta["split_rule"] = (
    f"subject-wise: val {opts.val_fraction}, test {opts.test_fraction}, seed {opts.split_seed}"
  )
  return bold_records.build_bold_dataset(
    opts.out,
    streams,
    meta,
    bold_dtype=opts.dtype,
    seq_min=opts.seq_min,
    subject_ids=ids,
    overwrite=opts.overwrite,
  )


def parse_value(text: str) -> Any:
  """A python literal (3, 0.5, 'x', (1, 2)) or, failing that, the text itself."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


class _EarlierSpelling(argparse.Action):
  """A flag's spelling from an earlier release: accepted for one more, with a note."""

  def __init__(self, option_strings, dest, current: str, **kwargs):
    self.current = current
    super().__init__(option_strings, dest, **kwargs)

  def __call__(self, parser, namespace, values, option_string=None):
    print(
      f"{parser.prog}: {option_string} is deprecated and goes in the next release; "
      f"use {self.current}",
      file=sys.stderr,
    )
    setattr(namespace, self.dest, values)


def add_flag(parser: argparse.ArgumentParser, flag: str, *earlier: str, **kwargs: Any) -> None:
  """parser.add_argument(flag, ...) that also takes the `earlier` spellings (deprecated)."""
  action = parser.add_argument(flag, **kwargs)
  for old in earlier:
    parser.add_argument(
      old, dest=action.dest, type=kwargs.get("type"), current=flag,
      action=_EarlierSpelling, help=argparse.SUPPRESS,
    )  # fmt: skip
