"""The embedded synthetic sources as prepare subcommands (`python -m boldjax.prepare
synthetic_flat | synthetic_parcellated --out=DIR [--set FIELD=VALUE ...]`)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from boldjax import registry
from boldjax.data.importers.common import parse_value


def add_spec_arguments(parser: argparse.ArgumentParser, spec_name: str) -> None:
  parser.add_argument("--out", required=True, help="output dataset directory")
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    metavar="FIELD=VALUE",
    help=f"{spec_name} field (repeatable), e.g. --set num_subjects=4",
  )
  parser.add_argument("--overwrite", action="store_true")


def spec_from_settings(spec_class: type, items: list[str]) -> Any:
  """spec_class(**fields) from --set FIELD=VALUE items; unknown fields are refused."""
  fields = {}
  for item in items:
    if "=" not in item:
      raise ValueError(f"--set: expected FIELD=VALUE, found {item!r}")
    key, value = item.split("=", 1)
    fields[key.strip()] = parse_value(value.strip())
  known = {f.name for f in dataclasses.fields(spec_class)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(
      f"--set: unknown {spec_class.__name__} fields {unknown}; known {sorted(known)}"
    )
  return spec_class(**fields)


@registry.register("importer", "synthetic_flat")
class SyntheticFlatImporter:
  help = "synthetic flat maps on real cortical geometry -> flat-map ArrayRecord dataset"

  @staticmethod
  def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_spec_arguments(parser, "SyntheticFlatSpec")

  @staticmethod
  def run(args: argparse.Namespace) -> str:
    from boldjax.data.flat_builder import build_synthetic_flat
    from boldjax.data.synthetic_flat import SyntheticFlatSpec

    spec = spec_from_settings(SyntheticFlatSpec, args.set)
    return build_synthetic_flat(args.out, spec, overwrite=args.overwrite)


@registry.register("importer", "synthetic_parcellated")
class SyntheticBoldImporter:
  help = "synthetic parcellated BOLD on the HCP-MMP atlas -> parcellated dataset"

  @staticmethod
  def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_spec_arguments(parser, "SyntheticBoldSpec")

  @staticmethod
  def run(args: argparse.Namespace) -> str:
    from boldjax.data.synthetic_bold import SyntheticBoldSpec, build_synthetic_bold

    spec = spec_from_settings(SyntheticBoldSpec, args.set)
    return build_synthetic_bold(args.out, spec, overwrite=args.overwrite)
