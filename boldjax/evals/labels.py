"""Label sources: which examples get which class.

Registered as registry.register("labels", name): a LabelSource says which data kind it
applies to, which unit it labels and how it labels candidate examples from their metadata
columns (subject, subject_id, run, label). A path to a CSV file (columns
subject[,run],label) is accepted wherever a name is, and so is a label key the importer
kept per run in the dataset's meta 'run_labels' (a Brain-Semantoks HDF5's keys).
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from boldjax import registry

KINDS = ("parcellated", "flat")


@dataclasses.dataclass(frozen=True)
class LabelSource:
  """How to label examples: label(columns) -> ((n,) int labels, -1 = unlabelled; names)."""

  name: str
  kinds: tuple[str, ...]
  unit: str  # "block": decode-mode task blocks | "run": whole runs | "map": flat maps
  label: Callable[[dict[str, np.ndarray], list[str]], tuple[np.ndarray, list[str]]]
  description: str = ""


def _dataset_labels(cols: dict[str, np.ndarray], class_names: list[str]):
  return np.asarray(cols["label"], np.int64), list(class_names)


registry.register("labels", "state")(
  LabelSource(
    "state",
    ("parcellated",),
    "block",
    _dataset_labels,
    "mental state of each task block (decode mode), or a record-level label",
  )
)


def _run_task_labels(cols: dict[str, np.ndarray], class_names: list[str]):
  del class_names
  names = sorted({str(t) for t in cols["task"]})
  return np.asarray([names.index(str(t)) for t in cols["task"]], np.int64), names


registry.register("labels", "task")(
  LabelSource(
    "task",
    ("parcellated",),
    "run",
    _run_task_labels,
    "the run's task name (synthetic: rest vs task), one example per run (Semantoks-style)",
  )
)


registry.register("labels", "stimulus")(
  LabelSource("stimulus", ("flat",), "map", _dataset_labels, "stimulus class of each flat map")
)


def csv_label_source(path: str, kind: str) -> LabelSource:
  """Labels from a CSV with a header: subject,label or subject,run,label.

  subject matches the dataset's subject name (parcellated: meta 'subjects', e.g. sub-01)
  or its integer subject_id; run matches the run name (parcellated) or session_id (flat).
  Labels are strings; classes are their sorted unique values. Unmatched examples drop out.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"--labels={path}: no such file")
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    fields = reader.fieldnames or []
    if "subject" not in fields or "label" not in fields:
      raise ValueError(f"{path}: header expected columns subject[,run],label, found {fields}")
    by_run = "run" in fields
    table: dict[tuple[str, str | None], str] = {}
    for line, row in enumerate(reader, start=2):
      key = (row["subject"].strip(), row["run"].strip() if by_run else None)
      label = (row["label"] or "").strip()
      if not label:
        continue
      if key in table and table[key] != label:
        raise ValueError(
          f"{path}:{line}: field 'label' for {key} is {label!r}, found {table[key]!r} earlier"
        )
      table[key] = label
  if not table:
    raise ValueError(f"{path}: no labelled rows")
  classes = sorted(set(table.values()))

  def label(cols: dict[str, np.ndarray], class_names: list[str]):
    del class_names
    out = np.full(len(cols["subject"]), -1, np.int64)
    for i, (name, sid, run) in enumerate(
      zip(cols["subject"], cols["subject_id"], cols["run"], strict=True)
    ):
      for subject in (str(name), str(int(sid))):
        value = table.get((subject, str(run) if by_run else None))
        if value is not None:
          out[i] = classes.index(value)
          break
    return out, classes

  unit = "run" if kind == "parcellated" else "map"
  return LabelSource(os.path.basename(path), (kind,), unit, label, f"CSV {path}")


def dataset_label_source(name: str, meta: Mapping[str, Any] | None) -> LabelSource | None:
  """A label key the importer kept per run in the dataset's meta 'run_labels' (every label
  of a Brain-Semantoks HDF5: age_5c, sex_bi, labels/<name>): one example per run, found by
  its run name (the input row). None when the dataset has no such key."""
  table = (meta or {}).get("run_labels") or {}
  key = next((k for k in (name, f"labels/{name}") if k in table), None)
  if key is None:
    return None
  entry = table[key]
  if entry.get("continuous"):
    raise ValueError(
      f"--labels={name!r}: the dataset's label key {key!r} is continuous, expected class "
      "labels (the probes classify; store binned classes in the file, e.g. age_5c)"
    )
  values, classes = list(entry["values"]), list(entry["class_names"])

  def label(cols: dict[str, np.ndarray], class_names: list[str]):
    del class_names
    out = np.full(len(cols["run"]), -1, np.int64)
    for i, run in enumerate(cols["run"]):
      row = int(run) if str(run).isdigit() else -1
      if 0 <= row < len(values):
        out[i] = values[row]
    return out, classes

  return LabelSource(key, ("parcellated",), "run", label, f"dataset label key {key!r}")


def label_source(name: str, kind: str, meta: Mapping[str, Any] | None = None) -> LabelSource:
  """A registered label source, a CSV path or a label key of the dataset (meta
  'run_labels', see dataset_label_source); 'auto' = the kind's default."""
  if kind not in KINDS:
    raise ValueError(f"label_source: data kind expected one of {KINDS}, found {kind!r}")
  if name == "auto":
    name = "state" if kind == "parcellated" else "stimulus"
  if name.endswith(".csv") or (os.path.sep in name and not name.startswith("labels/")):
    return csv_label_source(name, kind)
  try:
    source = registry.get("labels", name)
  except KeyError as e:
    own = dataset_label_source(name, meta) if kind == "parcellated" else None
    if own is not None:
      return own
    keys = sorted((meta or {}).get("run_labels") or {})
    own_keys = f", the dataset's label keys {keys}," if keys else ""
    raise KeyError(
      f"--labels={name!r}: unknown label source; known: {registry.names('labels')}{own_keys} "
      "or a path to a CSV file (subject[,run],label)"
    ) from e
  if kind not in source.kinds:
    usable = [n for n in registry.names("labels") if kind in registry.get("labels", n).kinds]
    raise ValueError(
      f"--labels={name!r} applies to {source.kinds} data; this run's data is {kind!r} "
      f"(usable: {usable} or a CSV path)"
    )
  return source
