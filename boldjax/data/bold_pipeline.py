"""Parcellated BOLD input pipeline: prepare() once per run, make_dataset() per split -> grain.

Modes (data_cfg.mode):
  pretrain  one example per run per epoch: a chunk of random length L in [seq_min, seq_max]
            (clipped to the run) starting at a random multiple of L below T - L, as
            learning-from-brains' batcher; label -1. With pairs=True a second chunk follows:
            the first (L - gap) // 2 frames are `bold`, the next ones after `gap` frames are
            `bold_next` (next_is_consecutive=True), or, with probability 1/2, `bold_next` is a
            chunk of the same length from another run, of another subject when possible.
  decode    one example per task block (stimulus onset + decode_shift_s for the HRF, its
            duration, at most seq_max frames), or per record with a record-level label
            (learning-from-brains downstream samples); label = the block's class.
  views     one example per run per epoch for network-token DINO (Brain-Semantoks): the
            z-scored run (optionally resampled onto views_tr) -> two crops of crop_length
            frames with the original's augmentations and a (N networks x P patches) token
            mask each; see boldjax/data/views.py. Batch: views (B,2,R,crop_length) f32
            (ROI-major), masks (B,2,N,P) bool (True = masked), view_starts (B,2) i32,
            subject_id, label (-1), valid when train=False. Eval crops come from
            (seed, plan row) only, so validation losses are reproducible.

Every random choice comes from grain's per-element rng (RandomMap), so iterator state
checkpoints exactly. Batches are host-local numpy dicts with fixed shapes (T = seq_max):
bold (B,T,R) f32, t_sec (B,T) f32 (= arange(length) * tr, 0 on padding), tr (B,), mask (B,T)
bool, length (B,) i32, subject_id (B,) i32, label (B,) i32, valid (B,) bool when train=False
(padding rows are well-formed zero runs of length seq_min with valid=False).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import grain
import ml_collections
import numpy as np

from boldjax import registry
from boldjax.data import bold_records, paths, views
from boldjax.data.paths import setting
from boldjax.data.pipeline import eval_shard_indices, to_iter_dataset
from boldjax.data.transforms import IndexedSource

ZSCORE_MODES = ("run", "none", "stored")
MODES = ("pretrain", "decode", "views")
_STD_FLOOR = 1e-6


def default_config() -> ml_collections.ConfigDict:
  """Every field prepare()/make_dataset() read, with its default."""
  c = ml_collections.ConfigDict()
  c.source = "synthetic_parcellated"  # or "parcellated" (path = a prepared dataset dir)
  c.path = ml_collections.config_dict.placeholder(str)
  c.cache_dir = os.environ.get("BOLDJAX_CACHE", "~/.cache/boldjax")
  c.synthetic = ml_collections.ConfigDict()  # SyntheticBoldSpec fields (defaults if empty)
  c.seq_min = 10
  c.seq_max = 49
  c.zscore = "run"  # run | none | stored
  c.split_seed = 0  # which training subjects train_subjects keeps
  c.train_subjects = ml_collections.config_dict.placeholder(int)  # None = all
  c.pairs = False  # Seq-BERT next-sequence pairs
  c.pair_gap = (0, 0)  # gap frames ~ randint(lo, hi) (learning-from-brains BERT: (1, 5))
  c.mode = "pretrain"  # pretrain | decode | views
  c.decode_shift_s = 5.0  # block onsets are shifted by this for the HRF in decode mode
  # views mode (Brain-Semantoks two-view input; defaults are the original's)
  c.crop_length = 100  # frames per view
  c.patch_size = 20  # frames per token: masks have crop_length // patch_size patches
  c.views_tr = ml_collections.config_dict.placeholder(float)  # None: keep each run's TR
  c.augment = (1, 1, 1, 1)  # switches (roi_dropout, time_block, noise, scale)
  c.roi_drop_range = (0.0, 0.1)  # fraction of ROIs zeroed per view ~ U(lo, hi)
  c.time_drop_range = (0.0, 0.3)  # fraction of frames zeroed (one block) ~ U(lo, hi)
  c.scale_range = (0.8, 1.2)  # amplitude factor ~ U(lo, hi)
  c.noise_std = 0.1  # additive Gaussian noise
  c.mask_ratio = (0.65, 0.85)  # slice_masker range (networks or patches masked)
  c.batch_size = 32  # global
  c.eval_batch_size = 32  # global
  c.num_workers = 0  # grain mp_prefetch processes
  c.num_threads = 2
  c.prefetch_buffer_size = 64
  return c


@dataclasses.dataclass
class BoldInfo:
  """What tasks and evaluators need to know about parcellated data."""

  path: str
  num_parcels: int
  networks: np.ndarray  # (R,) int32 network index per parcel
  network_names: list[str]
  num_networks: int
  num_subjects: int
  num_classes: int
  class_names: list[str]
  split_sizes: dict[str, int]  # examples per split in the configured mode
  seq_min: int
  seq_max: int
  trs: list[float]
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def synthetic_spec(data_cfg: Any):
  """The SyntheticBoldSpec described by data_cfg.synthetic."""
  from boldjax.data.synthetic_bold import SyntheticBoldSpec

  synthetic = setting(data_cfg, "synthetic", {})
  fields = synthetic.to_dict() if hasattr(synthetic, "to_dict") else dict(synthetic)
  known = {f.name for f in dataclasses.fields(SyntheticBoldSpec)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"data config: synthetic fields {unknown} unknown; known {sorted(known)}")
  for key in ("trs", "fixation_seconds"):
    if key in fields:
      fields[key] = tuple(fields[key])
  return SyntheticBoldSpec(**fields)


def dataset_path(data_cfg: Any) -> str:
  """data_cfg.path, or the synthetic dataset built once under cache_dir."""
  source = setting(data_cfg, "source", "synthetic_parcellated")
  path = setting(data_cfg, "path")
  cache = paths.cache_dir(data_cfg)
  if path:
    return paths.readable_dataset(path, cache)
  if source == "synthetic_parcellated":
    from boldjax.data.synthetic_bold import ensure_synthetic_bold

    return ensure_synthetic_bold(cache, synthetic_spec(data_cfg))
  raise ValueError(
    f"data config: field 'path' is required when source={source!r} (a directory written by "
    "python -m boldjax.prepare)"
  )


def _check_cfg(data_cfg: Any) -> tuple[int, int, str, str]:
  seq_min, seq_max = int(setting(data_cfg, "seq_min", 10)), int(setting(data_cfg, "seq_max", 49))
  if not 1 <= seq_min <= seq_max:
    raise ValueError(f"data config: need 1 <= seq_min <= seq_max, found {seq_min}, {seq_max}")
  zscore, mode = setting(data_cfg, "zscore", "run"), setting(data_cfg, "mode", "pretrain")
  if zscore not in ZSCORE_MODES:
    raise ValueError(
      f"data config: field 'zscore' expected one of {ZSCORE_MODES}, found {zscore!r}"
    )
  if mode not in MODES:
    raise ValueError(f"data config: field 'mode' expected one of {MODES}, found {mode!r}")
  return seq_min, seq_max, zscore, mode


def views_cfg(data_cfg: Any) -> tuple[int, int, float | None]:
  """(crop_length, patch_size, views_tr) of views mode, validated."""
  crop, patch = int(setting(data_cfg, "crop_length", 100)), int(setting(data_cfg, "patch_size", 20))
  if not 1 <= patch <= crop:
    raise ValueError(
      f"data config: field 'patch_size' expected 1 <= patch_size <= crop_length ({crop}), "
      f"found {patch}"
    )
  tr = setting(data_cfg, "views_tr")
  if tr is not None and not float(tr) > 0:
    raise ValueError(f"data config: field 'views_tr' expected > 0 s or None, found {tr}")
  return crop, patch, None if tr is None else float(tr)


def kept_train_subjects(ds: bold_records.BoldDataset, data_cfg: Any) -> list[int] | None:
  """Subject ids kept for training when data_cfg.train_subjects is set (seeded choice)."""
  n = setting(data_cfg, "train_subjects")
  if n is None:
    return None
  ids = sorted(set(ds.split_index("train")["subject_id"]))
  if not 1 <= int(n) <= len(ids):
    raise ValueError(
      f"data config: field 'train_subjects' expected 1..{len(ids)} ({ds.path} train split), "
      f"found {n}"
    )
  perm = np.random.default_rng([int(setting(data_cfg, "split_seed", 0)), 0x7E]).permutation(ids)
  return sorted(int(i) for i in perm[: int(n)])


def plan(ds: bold_records.BoldDataset, split: str, data_cfg: Any) -> np.ndarray:
  """(N, 4) int64 rows (record, start, length, label); start -1 = random chunk (pretrain,
  views). Views mode checks every kept run is at least crop_length frames (after views_tr)."""
  _, seq_max, _, mode = _check_cfg(data_cfg)
  if mode == "views":
    crop, _, views_tr = views_cfg(data_cfg)
  idx = ds.split_index(split)
  keep = None
  if split == "train":
    keep = kept_train_subjects(ds, data_cfg)
  rows = []
  shift = float(setting(data_cfg, "decode_shift_s", 5.0))
  for i, (t, tr, sub, label) in enumerate(
    zip(idx["length"], idx["tr"], idx["subject_id"], idx["label"], strict=True)
  ):
    if keep is not None and sub not in keep:
      continue
    if mode == "views":
      n = views.resampled_length(t, tr, views_tr)
      if n < crop:
        run = idx["run"][i] if "run" in idx else "?"
        note = "" if n == t else f" (T={t} at TR {tr:g} s resampled to views_tr {views_tr:g} s)"
        raise ValueError(
          f"{ds.path}/{split} record {i} (run {run!r}, subject_id {sub}): field "
          f"'crop_length' expected <= the run's {n} frames{note}, found {crop}"
        )
    if mode in ("pretrain", "views"):
      rows.append((i, -1, t, -1))
      continue
    onsets = idx["block_onset_s"][i]
    if onsets:
      for on, dur, lab in zip(
        onsets, idx["block_duration_s"][i], idx["block_label"][i], strict=True
      ):
        start = int(round((on + shift) / tr))
        n = min(max(1, int(round(dur / tr))), t - start, seq_max)
        if n >= 1 and lab >= 0:
          rows.append((i, start, n, lab))
    elif label >= 0:
      rows.append((i, 0, min(t, seq_max), label))
  return np.asarray(rows, np.int64).reshape(-1, 4)


def prepare(data_cfg: Any) -> BoldInfo:
  """Build/open the dataset; report its atlas, networks, classes and split sizes."""
  seq_min, seq_max, zscore, mode = _check_cfg(data_cfg)
  path = dataset_path(data_cfg)
  ds = bold_records.open_bold_dataset(path)
  meta = ds.meta
  if zscore == "stored" and not meta.get("bold_is_zscored") and ds.splits.get("train"):
    first = ds.split("train")[0]  # fail early; every record is checked again when read
    normalize_run(first, zscore, False, f"{path}/train")
  sizes = {s: int(len(plan(ds, s, data_cfg))) for s in ds.splits}
  if mode == "decode" and sizes.get("train", 0) == 0:
    raise ValueError(f"{path}: decode mode found no labelled blocks/records in split 'train'")
  networks = np.asarray(meta["network_of_parcel"], np.int32)
  info_meta = dict(meta)
  info_meta["train_subjects_kept"] = kept_train_subjects(ds, data_cfg)
  info_meta["mode"] = mode
  return BoldInfo(
    path=path,
    num_parcels=int(meta["num_parcels"]),
    networks=networks,
    network_names=list(meta["network_names"]),
    num_networks=int(meta["num_networks"]),
    num_subjects=int(meta["num_subjects"]),
    num_classes=int(meta["num_classes"]),
    class_names=list(meta["class_names"]),
    split_sizes=sizes,
    seq_min=seq_min,
    seq_max=seq_max,
    trs=[float(t) for t in meta["trs"]],
    meta=info_meta,
  )


def normalize_run(ex: dict[str, Any], mode: str, bold_is_zscored: bool, where: str) -> np.ndarray:
  """bold (T, R) -> float32 under the z-score policy (run: each parcel within its run)."""
  bold = np.asarray(ex["bold"], np.float32)
  if mode == "run":
    mean = bold.mean(axis=0)
    std = bold.std(axis=0)
    return (bold - mean) / np.maximum(std, _STD_FLOOR)
  if mode == "stored" and not bold_is_zscored:
    if not bool(ex.get("has_stats", False)):
      raise ValueError(
        f"{where}: zscore='stored' needs fields 'mean'/'std' in every record; record "
        f"{ex.get('subject', '?')}/{ex.get('run', '?')} has none"
      )
    std = np.maximum(np.asarray(ex["std"], np.float32), _STD_FLOOR)
    return (bold - np.asarray(ex["mean"], np.float32)) / std
  return bold


class PlannedSource:
  """Rows of a plan over a split: each item is the normalised run plus its crop/label."""

  def __init__(self, path: str, split: str, rows: np.ndarray, zscore: str, zscored: bool):
    self.source = bold_records.BoldSource(path, split)
    self.rows = np.asarray(rows, np.int64)
    self.zscore, self.zscored = zscore, bool(zscored)
    self.where = f"{path}/{split}"

  def __len__(self) -> int:
    return len(self.rows)

  def run(self, record: int) -> dict[str, Any]:
    ex = self.source[int(record)]
    return {
      "bold": normalize_run(ex, self.zscore, self.zscored, self.where),
      "tr": np.float32(ex["tr"]),
      "subject_id": np.int32(ex["subject_id"]),
    }

  def __getitem__(self, index: int) -> dict[str, Any]:
    record, start, length, label = (int(v) for v in self.rows[int(index)])
    out = self.run(record)
    out.update(
      record=np.int64(record),
      row=np.int64(index),
      start=np.int64(start),
      crop=np.int64(length),
      label=np.int32(label),
    )
    return out


def pad_run(num_parcels: int, seq_min: int) -> dict[str, Any]:
  """The padding example of eval batches: a zero run of seq_min frames at TR 1 s."""
  return {
    "bold": np.zeros((seq_min, num_parcels), np.float32),
    "tr": np.float32(1.0),
    "subject_id": np.int32(0),
    "record": np.int64(-1),
    "start": np.int64(0),
    "crop": np.int64(seq_min),
    "label": np.int32(-1),
  }


def sample_chunk(rng: np.random.Generator, t: int, seq_min: int, seq_max: int) -> tuple[int, int]:
  """(start, length) as learning-from-brains: L ~ U{seq_min..seq_max} (clipped to T), start
  a random multiple of L below T - L (0 when L >= T)."""
  lo, hi = min(seq_min, t), min(seq_max, t)
  length = int(rng.integers(lo, hi + 1))
  if length >= t:
    return 0, t
  starts = np.arange(0, t - length, length)
  return int(starts[rng.integers(len(starts))]), length


def _padded(bold: np.ndarray, tr: float, seq_max: int, prefix: str = "") -> dict[str, Any]:
  n, r = bold.shape
  out_bold = np.zeros((seq_max, r), np.float32)
  out_bold[:n] = bold
  t_sec = np.zeros(seq_max, np.float32)
  t_sec[:n] = np.arange(n, dtype=np.float32) * np.float32(tr)
  mask = np.zeros(seq_max, bool)
  mask[:n] = True
  return {
    f"bold{prefix}": out_bold,
    f"t_sec{prefix}": t_sec,
    f"mask{prefix}": mask,
    f"length{prefix}": np.int32(n),
  }


class MakeSequence(grain.transforms.RandomMap):
  """A planned run -> one fixed-shape example (random chunk, or the planned crop)."""

  def __init__(
    self,
    seq_min: int,
    seq_max: int,
    *,
    pairs: bool = False,
    pair_gap: tuple[int, int] = (0, 0),
    others: PlannedSource | None = None,
    other_subjects: np.ndarray | None = None,
  ):
    self.seq_min, self.seq_max = int(seq_min), int(seq_max)
    self.pairs = bool(pairs)
    self.gap = (int(pair_gap[0]), int(pair_gap[1]))
    self.others = others
    self.other_subjects = None if other_subjects is None else np.asarray(other_subjects)

  def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    bold, tr = element["bold"], float(element["tr"])
    start, crop = int(element["start"]), int(element["crop"])
    if start < 0:
      start, crop = sample_chunk(rng, len(bold), self.seq_min, self.seq_max)
    out = {"tr": np.float32(tr), "subject_id": np.int32(element["subject_id"])}
    out["label"] = np.int32(element["label"])
    if "valid" in element:
      out["valid"] = np.bool_(element["valid"])
    if not self.pairs:
      out.update(_padded(bold[start : start + crop], tr, self.seq_max))
      return out
    gap = int(rng.integers(*self.gap)) if self.gap[0] < self.gap[1] else self.gap[0]
    if gap > crop - 4:  # keep >= 2 frames on each side (learning-from-brains)
      gap = 0
    n_a = max(1, (crop - gap) // 2)
    n_b = max(1, crop - gap - n_a)
    first = bold[start : start + n_a]
    consecutive = bool(rng.random() < 0.5) or self.others is None or len(self.others) < 2
    if consecutive:
      second, tr_b = bold[start + n_a + gap : start + n_a + gap + n_b], tr
      if len(second) == 0:  # a run too short for a gap: fall back to the frames after a
        second = bold[start + n_a : start + n_a + n_b]
    else:
      second, tr_b = self._other(element, rng, n_b)
    out.update(_padded(first, tr, self.seq_max))
    out.update(_padded(second, tr_b, self.seq_max, "_next"))
    out["next_is_consecutive"] = np.bool_(consecutive)
    return out

  def _other(self, element, rng: np.random.Generator, n: int) -> tuple[np.ndarray, float]:
    """A chunk of n frames from another run (another subject when the split has one)."""
    records = self.others.rows[:, 0]
    me = int(element["record"])
    subject = int(element["subject_id"])
    pick = None
    for _ in range(16):
      j = int(rng.integers(len(records)))
      if records[j] != me and self.other_subjects[j] != subject:
        pick = j
        break
    if pick is None:
      pick = int(rng.integers(len(records)))
      if records[pick] == me:
        pick = (pick + 1) % len(records)
    other = self.others.run(int(records[pick]))
    t = len(other["bold"])
    n = min(n, t)
    starts = np.arange(0, max(t - n, 0) + 1, n)
    s = int(starts[rng.integers(len(starts))])
    return other["bold"][s : s + n], float(other["tr"])


def make_dataset(
  data_cfg: Any,
  info: BoldInfo,
  *,
  split: str,
  train: bool,
  seed: int,
  batch_size: int,
  shard_index: int = 0,
  shard_count: int = 1,
) -> grain.IterDataset:
  """Host-local batches for one process (batch_size is this process's batch).

  train=True: seeded shuffle reshuffled each epoch, repeated forever, this process's slice,
  drop_remainder. train=False: one pass in plan order over this process's slice, padded
  with valid=False rows to the same number of full batches on every process; its random
  chunks are seeded by `seed` alone, so every pass sees the same chunks.
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(
      f"make_dataset: need 0 <= shard_index < shard_count, found {shard_index}, {shard_count}"
    )
  seq_min, seq_max, zscore, mode = _check_cfg(data_cfg)
  ds_dir = bold_records.open_bold_dataset(info.path)
  rows = plan(ds_dir, split, data_cfg)
  if len(rows) == 0:
    raise ValueError(
      f"{info.path}: split {split!r} has no examples in mode {info.meta.get('mode')}"
    )
  zscored = bool(ds_dir.meta.get("bold_is_zscored", False))
  source = PlannedSource(info.path, split, rows, zscore, zscored)
  if mode == "views":
    return _views_dataset(data_cfg, info, source, train, seed, batch_size, shard_index, shard_count)
  pairs = bool(setting(data_cfg, "pairs", False))
  subjects = np.asarray(ds_dir.split_index(split)["subject_id"], np.int64)[rows[:, 0]]
  sampler = MakeSequence(
    seq_min,
    seq_max,
    pairs=pairs,
    pair_gap=tuple(setting(data_cfg, "pair_gap", (0, 0))),
    others=source if pairs else None,
    other_subjects=subjects if pairs else None,
  )
  n = len(source)
  if train:
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    ds = ds[shard_index::shard_count]
  else:
    idx = eval_shard_indices(n, batch_size, shard_index, shard_count)
    pad = pad_run(info.num_parcels, seq_min)
    ds = grain.MapDataset.source(IndexedSource(source, idx, pad))
  ds = ds.random_map(sampler, seed=(seed + 1) % 2**32)
  ds = ds.batch(batch_size, drop_remainder=train)
  return to_iter_dataset(ds, data_cfg)


def _views_dataset(
  data_cfg: Any,
  info: BoldInfo,
  source: PlannedSource,
  train: bool,
  seed: int,
  batch_size: int,
  shard_index: int,
  shard_count: int,
) -> grain.IterDataset:
  """Views mode. Training slices the global stream AFTER the random transform, so an
  example's crops depend on its place in the global stream and N processes together see
  exactly the 1-process batches."""
  crop, patch, views_tr = views_cfg(data_cfg)
  sampler = views.MakeViews(
    crop_length=crop,
    patch_size=patch,
    num_networks=info.num_networks,
    spec=views.augment_spec(data_cfg),
    ratio=views.mask_ratio(data_cfg),
    views_tr=views_tr,
    train=train,
    eval_seed=seed,
    where=source.where,
  )
  if train:
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    ds = ds.random_map(sampler, seed=(seed + 1) % 2**32)[shard_index::shard_count]
  else:
    idx = eval_shard_indices(len(source), batch_size, shard_index, shard_count)
    pad = pad_run(info.num_parcels, crop)
    pad.update(tr=np.float32(views_tr or 1.0), row=np.int64(-1))
    ds = grain.MapDataset.source(IndexedSource(source, idx, pad))
    ds = ds.random_map(sampler, seed=(seed + 1) % 2**32)
  ds = ds.batch(batch_size, drop_remainder=train)
  return to_iter_dataset(ds, data_cfg)


@registry.register("pipeline", "synthetic_parcellated")
@registry.register("pipeline", "parcellated")
class BoldPipeline:
  """Parcellated BOLD (the synthetic default or a prepared directory) for the train loop."""

  kind = "parcellated"  # evals.examples builds labelled examples per kind

  prepare = staticmethod(prepare)
  make_dataset = staticmethod(make_dataset)
