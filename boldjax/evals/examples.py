"""Labelled examples of a run's data, built exactly as the training pipelines build batches.

All splits of the run's dataset are pooled: probes re-split them by subject themselves. An
example is one labelled unit -- a task block (decode mode), a run, or a flat map -- with K
crops of it (K = 1 unless multi-crop is asked for). Inputs are built as the training
pipelines build them (same z-scoring, padding, patch layout, tokenizer), so
`task.features(params, batch)` sees the batches it was trained on. Each data kind registers
its builder as registry.register("examples", kind); the kind is the pipeline's `kind`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
import numpy as np

from boldjax import registry
from boldjax.evals.labels import LabelSource, label_source


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
  """The data kind ('parcellated', 'flat', ...) the registered pipeline of
  config.data.source declares."""
  from boldjax.data import pipeline_for

  pipe = pipeline_for(config.data)
  kind = getattr(pipe, "kind", None)
  if kind not in registry.names("examples"):
    raise ValueError(
      f"config.data.source={config.data.source!r}: its pipeline's data kind {kind!r} has no "
      f"example builder for evaluation; known kinds: {registry.names('examples')}"
    )
  return kind


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


@registry.register("examples", "parcellated")
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


@registry.register("examples", "flat")
def flat_examples(
  config: ml_collections.ConfigDict,
  info: Any,
  source: LabelSource,
  *,
  crops: int = 1,
  crop_frames: int = 0,
  max_per_subject: int | None = None,
  seed: int = 0,
) -> ExampleSet:
  """Every flat map of every split: patches (N, D) in the layout order, tokens, order,
  subject_id, as the flat-map pipeline's eval batches (K = 1)."""
  del crop_frames
  if crops != 1:
    raise ValueError(f"--crops={crops}: flat maps have no time axis to crop; use 1")
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
  build = registry.get("examples", kind)
  return build(
    config, info, source, crops=crops, crop_frames=crop_frames,
    max_per_subject=max_per_subject, seed=seed,
  )  # fmt: skip
