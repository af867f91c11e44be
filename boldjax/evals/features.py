"""Labelled examples of a run's data and the task's features for every one of them.

All splits of the run's dataset are pooled: probes re-split them by subject themselves.
An example is one labelled unit -- a task block (decode mode), a run, or a flat map -- with
K crops of it (K = 1 unless multi-crop is asked for). Inputs are built exactly as the
training pipelines build them (same z-scoring, padding, patch layout, tokenizer), so
`task.features(params, batch)` sees the batches it was trained on.

Label sources are registered as registry.register("labels", name): a LabelSource says which
data kind it applies to, which unit it labels and how it labels candidate examples from
their metadata columns (subject, subject_id, run, label). A path to a CSV file
(columns subject[,run],label) is accepted wherever a name is, and so is a label key the
importer kept per run in the dataset's meta 'run_labels' (a Brain-Semantoks HDF5's keys).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from boldjax import registry

KINDS = ("parcellated", "flat")


# -----------------------------------------------------------------------------------------
# Label sources.
# -----------------------------------------------------------------------------------------


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


# -----------------------------------------------------------------------------------------
# Examples.
# -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class ExampleSet:
  """Every labelled example, host-side. inputs have leading (n, K) axes (K crops)."""

  kind: str
  inputs: dict[str, np.ndarray]
  labels: np.ndarray  # (n,) int
  subjects: np.ndarray  # (n,) int subject_id
  subject_names: list[str]  # indexed by subject_id
  class_names: list[str]
  source_split: np.ndarray  # (n,) the dataset split each example came from
  label_name: str
  unit: str
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def num_examples(self) -> int:
    return len(self.labels)

  @property
  def num_crops(self) -> int:
    return int(next(iter(self.inputs.values())).shape[1])


def data_kind(config: ml_collections.ConfigDict) -> str:
  """'parcellated' or 'flat', from the registered pipeline of config.data.source."""
  from boldjax.data import pipeline_for
  from boldjax.data.bold_pipeline import BoldPipeline
  from boldjax.data.pipeline import FlatMapPipeline

  pipe = pipeline_for(config.data)
  if pipe is BoldPipeline:
    return "parcellated"
  if pipe is FlatMapPipeline:
    return "flat"
  raise ValueError(
    f"config.data.source={config.data.source!r}: evaluation knows the parcellated and "
    "flat-map pipelines only"
  )


def crop_starts(start: int, length: int, crop: int, crops: int) -> np.ndarray:
  """K crop starts of `crop` frames spread evenly over [start, start + length - crop]
  (Semantoks' linspace(0, max_start, K)); crop >= length gives K copies of the window."""
  if crop >= length:
    return np.full(crops, start, np.int64)
  return start + np.round(np.linspace(0, length - crop, crops)).astype(np.int64)


def _subsample(keep: np.ndarray, subjects: np.ndarray, limit: int | None, seed: int):
  """At most `limit` examples per subject (seeded), as a boolean mask over `keep`."""
  if limit is None:
    return keep
  rng = np.random.default_rng([seed, 0xE7A1])
  out = np.zeros_like(keep)
  for s in np.unique(subjects[keep]):
    idx = np.flatnonzero(keep & (subjects == s))
    out[rng.permutation(idx)[:limit]] = True
  return out


def parcellated_examples(
  config: ml_collections.ConfigDict,
  info: Any,
  source: LabelSource,
  *,
  crops: int = 1,
  crop_frames: int = 0,
  max_per_subject: int | None = None,
  seed: int = 0,
) -> ExampleSet:
  """Decode-mode blocks (unit 'block') or whole runs (unit 'run'), K crops each.

  A crop has min(crop_frames or seq_max, window) frames; batches hold bold (T, R), t_sec,
  mask, length and tr as the parcellated pipeline's (T = seq_max, zero padded).
  """
  from boldjax.data import bold_pipeline, bold_records

  data_cfg = ml_collections.ConfigDict(config.data.to_dict())
  data_cfg.mode, data_cfg.train_subjects, data_cfg.pairs = "decode", None, False
  _, seq_max, zscore, _ = bold_pipeline._check_cfg(data_cfg)  # validated as in training
  ds = bold_records.open_bold_dataset(info.path)
  zscored = bool(ds.meta.get("bold_is_zscored", False))
  names = list(ds.meta.get("subjects", []))
  cand = []  # (split, record, start, length, label)
  for split in bold_records.SPLITS:
    if ds.splits.get(split, 0) == 0:
      continue
    if source.unit == "block":
      rows = bold_pipeline.plan(ds, split, data_cfg)
    else:
      idx = ds.split_index(split)
      rows = np.asarray(
        [
          (i, 0, t, lab) for i, (t, lab) in enumerate(zip(idx["length"], idx["label"], strict=True))
        ],
        np.int64,
      ).reshape(-1, 4)
    cand += [(split, *map(int, r)) for r in rows]
  if not cand:
    raise ValueError(f"{info.path}: no examples for labels {source.name!r}")
  index = {s: ds.split_index(s) for s in {c[0] for c in cand}}
  sid = np.array([index[c[0]]["subject_id"][c[1]] for c in cand], np.int64)
  cols = {
    "subject": np.array([names[s] if s < len(names) else str(s) for s in sid]),
    "subject_id": sid,
    "run": np.array([index[c[0]].get("run", [""] * (c[1] + 1))[c[1]] for c in cand]),
    "task": np.array([index[c[0]].get("task", [""] * (c[1] + 1))[c[1]] for c in cand]),
    "label": np.array([c[4] for c in cand], np.int64),
  }
  labels, class_names = source.label(cols, list(info.class_names))
  keep = _subsample(labels >= 0, sid, max_per_subject, seed)
  if not keep.any():
    raise ValueError(f"{info.path}: labels {source.name!r} matched no example")
  kept = [c for c, k in zip(cand, keep, strict=True) if k]
  n, r = len(kept), int(info.num_parcels)
  bold = np.zeros((n, crops, seq_max, r), np.float32)
  t_sec = np.zeros((n, crops, seq_max), np.float32)
  mask = np.zeros((n, crops, seq_max), bool)
  length = np.zeros((n, crops), np.int32)
  tr = np.zeros((n, crops), np.float32)
  sources: dict[str, Any] = {}
  cache: tuple[tuple[str, int], dict[str, Any]] | None = None
  for j, (split, record, start, window, _) in enumerate(kept):
    if cache is None or cache[0] != (split, record):
      if split not in sources:
        sources[split] = bold_pipeline.PlannedSource(
          info.path, split, np.zeros((0, 4), np.int64), zscore, zscored
        )
      cache = ((split, record), sources[split].run(record))
    run = cache[1]
    window = min(window, len(run["bold"]) - start)
    crop = min(crop_frames or seq_max, seq_max, window)
    for k, s in enumerate(crop_starts(start, window, crop, crops)):
      frames = run["bold"][s : s + crop]
      m = len(frames)
      bold[j, k, :m] = frames
      t_sec[j, k, :m] = np.arange(m, dtype=np.float32) * np.float32(run["tr"])
      mask[j, k, :m] = True
      length[j, k] = m
      tr[j, k] = run["tr"]
  subjects = sid[keep]
  return ExampleSet(
    kind="parcellated",
    inputs={
      "bold": bold,
      "t_sec": t_sec,
      "mask": mask,
      "length": length,
      "tr": tr,
      "subject_id": np.repeat(subjects[:, None], crops, axis=1).astype(np.int32),
    },
    labels=labels[keep],
    subjects=subjects,
    subject_names=names or [str(i) for i in range(int(sid.max()) + 1)],
    class_names=class_names,
    source_split=np.array([c[0] for c in kept]),
    label_name=source.name,
    unit=source.unit,
    meta={"num_parcels": r, "seq_max": seq_max},
  )


def flat_examples(
  config: ml_collections.ConfigDict,
  info: Any,
  source: LabelSource,
  *,
  max_per_subject: int | None = None,
  seed: int = 0,
) -> ExampleSet:
  """Every flat map of every split: patches (N, D) in the layout order, tokens, order,
  subject_id, as the flat-map pipeline's eval batches (K = 1)."""
  from boldjax.data import records, transforms

  del config
  ds = records.open_flat_dataset(info.path)
  cand, maps = [], []
  cols = {"subject": [], "subject_id": [], "run": [], "label": []}
  for split in records.SPLITS:
    if ds.splits.get(split, 0) == 0:
      continue
    src = ds.split(split)
    for i in range(len(src)):
      ex = src[i]
      cand.append(split)
      maps.append(ex["activity"])
      sid = int(ex["subject_id"])
      cols["subject"].append(str(sid))
      cols["subject_id"].append(sid)
      cols["run"].append(str(int(ex["session_id"])))
      cols["label"].append(int(ex["label"]))
  cols = {k: np.asarray(v) for k, v in cols.items()}
  num_classes = int(info.num_classes)
  labels, class_names = source.label(cols, [str(i) for i in range(num_classes)])
  sid = cols["subject_id"].astype(np.int64)
  keep = _subsample(labels >= 0, sid, max_per_subject, seed)
  if not keep.any():
    raise ValueError(f"{info.path}: labels {source.name!r} matched no flat map")
  layout = info.layout
  dq = transforms.Dequantize(info.mask, info.value_range)
  kept = np.flatnonzero(keep)
  patches = np.zeros((len(kept), 1, layout.num_patches, layout.patch_dim), np.float32)
  for j, i in enumerate(kept):
    patches[j, 0] = layout.patchify(dq.map({"activity": maps[i]})["activity"])
  subjects = sid[keep]
  inputs = {
    "patches": patches,
    "order": np.broadcast_to(np.arange(layout.num_patches, dtype=np.int32), patches.shape[:3]),
    "subject_id": subjects[:, None].astype(np.int32),
  }
  if info.tokenizer is not None:
    inputs["tokens"] = info.tokenizer.encode(patches).astype(np.int32)
  return ExampleSet(
    kind="flat",
    inputs=inputs,
    labels=labels[keep],
    subjects=subjects,
    subject_names=[str(i) for i in range(int(sid.max()) + 1)],
    class_names=class_names,
    source_split=np.asarray(cand)[kept],
    label_name=source.name,
    unit=source.unit,
    meta={"patch_mask": np.asarray(layout.patch_mask, bool)},
  )


def load_examples(
  config: ml_collections.ConfigDict,
  info: Any,
  labels: str = "auto",
  *,
  crops: int = 1,
  crop_frames: int = 0,
  max_per_subject: int | None = None,
  seed: int = 0,
) -> ExampleSet:
  """The labelled examples of a run's data (kind from config.data.source)."""
  kind = data_kind(config)
  source = label_source(labels, kind, getattr(info, "meta", None))
  if crops < 1:
    raise ValueError(f"--crops: expected >= 1, found {crops}")
  if kind == "parcellated":
    return parcellated_examples(
      config, info, source, crops=crops, crop_frames=crop_frames,
      max_per_subject=max_per_subject, seed=seed,
    )  # fmt: skip
  if crops != 1:
    raise ValueError(f"--crops={crops}: flat maps have no time axis to crop; use 1")
  return flat_examples(config, info, source, max_per_subject=max_per_subject, seed=seed)


# -----------------------------------------------------------------------------------------
# Features.
# -----------------------------------------------------------------------------------------


def _to_global(batch: dict[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """The same full batch on every process -> global arrays split over the data axes."""
  return {
    k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
    for k, v in batch.items()
  }


def _to_host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def vector_keys(sample: dict[str, Any], keys: tuple[str, ...] | None) -> list[str]:
  """Keys probed as vectors: `keys`, or every (B, F) output plus 'cls' (B, K, F)."""
  if keys:
    missing = [k for k in keys if k not in sample]
    if missing:
      raise KeyError(f"--features {missing}: not in features() output {sorted(sample)}")
    for k in keys:
      if len(sample[k].shape) not in (2, 3) or k in ("tokens", "token_mask"):
        raise ValueError(
          f"--features {k!r}: expected a (B, F) or (B, K, F) vector feature, found shape "
          f"{tuple(sample[k].shape)}"
        )
    return list(keys)
  out = [k for k, v in sample.items() if len(v.shape) == 2 and k != "token_mask"]
  if "cls" in sample and len(sample["cls"].shape) == 3:
    out.append("cls")
  return sorted(out)


def extract_features(
  task: Any,
  params: Any,
  examples: ExampleSet,
  *,
  mesh: Any,
  rules: Any,
  batch_size: int = 64,
  keys: tuple[str, ...] | None = None,
  tokens: bool = True,
  label: str = "model",
  log: Callable[[str], None] | None = print,
) -> dict[str, np.ndarray]:
  """{key: (n, K', F)} vector features (+ 'tokens' (n, K, N, D) float16 and 'token_mask'
  (n, K, N) when tokens=True and features() gives them), computed in jitted batches
  sharded over the mesh's data axes; the last batch is padded by repeating a row."""
  import flax.linen as nn

  from boldjax import sharding

  n, k = examples.num_examples, examples.num_crops
  flat = {key: v.reshape(n * k, *v.shape[2:]) for key, v in examples.inputs.items()}
  m = n * k
  shards = int(np.prod([mesh.shape[a] for a in ("data", "fsdp")]))
  b = max(shards, (min(batch_size, m) + shards - 1) // shards * shards)
  batch_sh = sharding.batch_sharding(mesh)
  fn = jax.jit(task.features)
  outs: dict[str, list[np.ndarray]] = {}
  chosen: list[str] | None = None
  start_t = last = time.perf_counter()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for start in range(0, m, b):
      stop = min(start + b, m)
      idx = np.minimum(np.arange(start, start + b), m - 1)
      batch = _to_global({key: v[idx] for key, v in flat.items()}, batch_sh)
      out = fn(params, batch)
      if chosen is None:
        chosen = vector_keys(out, keys)
        if tokens and "tokens" in out:
          chosen += ["tokens", "token_mask"]
      for key in chosen:
        if key == "token_mask" and "token_mask" not in out:
          value = np.ones(out["tokens"].shape[:2], bool)
        else:
          value = _to_host(out[key])
        if key == "tokens":
          value = value.astype(np.float16)
        outs.setdefault(key, []).append(value[: stop - start])
      now = time.perf_counter()
      if log is not None and (now - last > 10 or stop == m):
        last = now
        log(
          f"[boldjax.evaluate] {label} features: {stop}/{m} crops "
          f"({stop / max(now - start_t, 1e-9):.0f}/s)"
        )
  result = {}
  for key, parts in outs.items():
    arr = np.concatenate(parts).reshape(n, k, *parts[0].shape[1:])
    if key not in ("tokens", "token_mask") and arr.ndim == 4:  # model crops (B, K', F)
      arr = arr.reshape(n, -1, arr.shape[-1])
    result[key] = arr
  return result
