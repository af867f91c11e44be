"""Flat-map input pipeline: prepare() once per run, make_dataset() per split -> grain.

prepare() builds or opens the dataset, the patch layout and the k-means tokenizer (fitted
once and stored next to the data), and token histograms for the unigram baseline.
make_dataset() returns a grain IterDataset of host-local numpy batches whose iterator state
can be checkpointed (grain.checkpoint / get_state) and resumes on exactly the next batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from typing import Any

import grain
import ml_collections
import numpy as np

from boldjax import registry
from boldjax.data import flat_builder, paths, records, transforms
from boldjax.data.patching import ORDERINGS, PatchLayout
from boldjax.data.paths import setting
from boldjax.data.tokenizer import KMeansTokenizer

TRAIN_KEYS = ("patches", "tokens", "order", "subject_id", "label")
EVAL_KEYS = (*TRAIN_KEYS, "valid")


def default_config() -> ml_collections.ConfigDict:
  """Every field prepare()/make_dataset() read, with its default."""
  c = ml_collections.ConfigDict()
  c.source = "synthetic_flat"  # or "array_record" (a directory written by build_flat_dataset)
  c.path = ml_collections.config_dict.placeholder(str)  # None -> synthetic under cache_dir
  c.cache_dir = os.environ.get("BOLDJAX_CACHE", "~/.cache/boldjax")
  c.synthetic = ml_collections.ConfigDict()  # SyntheticFlatSpec fields (defaults if empty)
  c.patch_size = 10
  c.ordering = "radial"  # raster | radial | reverse_radial | path to an (H, W) .npy priority
  c.shuffle_order = True  # random per-sample patch order in training (boldGPT's IGPT)
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.vocab_size = 1024  # 0 -> no tokenizer (continuous targets)
  c.tokenizer.num_maps = 4000  # train maps whose interior patches fit the k-means
  c.tokenizer.seed = 42
  c.tokenizer.path = ml_collections.config_dict.placeholder(str)  # a given vocabulary (.npz)
  c.token_count_maps = 2000  # maps per split (train, val) for the unigram histograms
  c.batch_size = 64  # global
  c.eval_batch_size = 64  # global
  c.num_workers = 0  # grain mp_prefetch processes (0 = in-process threads only)
  c.num_threads = 2  # grain ReadOptions threads
  c.prefetch_buffer_size = 64
  return c


@dataclasses.dataclass
class FlatMapInfo:
  """What tasks and evaluators need to know about the data."""

  path: str
  mask: np.ndarray
  layout: PatchLayout
  tokenizer: KMeansTokenizer | None
  num_subjects: int
  num_classes: int
  split_sizes: dict[str, int]
  token_counts: dict[str, np.ndarray] | None  # 'train'/'val' histograms over token ids
  value_range: tuple[float, float] = records.VALUE_RANGE
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)


def _dataset_path(data_cfg: Any) -> str:
  source = setting(data_cfg, "source", "synthetic_flat")
  path = setting(data_cfg, "path")
  if path:
    return paths.readable_dataset(path, paths.cache_dir(data_cfg))
  if source == "synthetic_flat":
    from boldjax.data.synthetic_flat import SyntheticFlatSpec

    synthetic = setting(data_cfg, "synthetic", {})
    fields = synthetic.to_dict() if hasattr(synthetic, "to_dict") else dict(synthetic)
    spec = SyntheticFlatSpec(**fields)
    return flat_builder.ensure_synthetic_flat(paths.cache_dir(data_cfg), spec)
  if source == "array_record":
    raise ValueError("data config: field 'path' is required when source='array_record'")
  raise ValueError(
    f"data config: field 'source' must be 'synthetic_flat' or 'array_record', found {source!r}"
  )


def _ordering(data_cfg: Any) -> tuple[str | np.ndarray, str]:
  """(ordering for PatchLayout.from_mask, short name for file names)."""
  ordering = setting(data_cfg, "ordering", "radial")
  if ordering in ORDERINGS:
    return ordering, ordering
  if isinstance(ordering, str) and ordering.endswith(".npy") and os.path.exists(ordering):
    priority = np.load(ordering)
    digest = hashlib.sha256(np.ascontiguousarray(priority, np.float32).tobytes()).hexdigest()
    return priority, f"custom{digest[:8]}"
  raise ValueError(
    f"data config: field 'ordering' must be one of {ORDERINGS} or an existing .npy "
    f"priority map, found {ordering!r}"
  )


def _store_dir(path: str, data_cfg: Any) -> str:
  """Where derived files go: the dataset dir if writable, else a per-dataset cache dir."""
  if os.access(path, os.W_OK):
    return path
  digest = hashlib.sha256(path.encode()).hexdigest()[:12]
  out = os.path.join(paths.cache_dir(data_cfg), "derived", digest)
  os.makedirs(out, exist_ok=True)
  return out


def _sample_indices(n: int, k: int, seed: int) -> np.ndarray:
  k = min(int(k), n)
  return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def _read_patches(
  source: Any, indices: np.ndarray, layout: PatchLayout, value_range, label: str
) -> np.ndarray:
  """Dequantised, masked, patchified maps for `indices`: (len, N, D) float32."""
  dq = transforms.Dequantize(layout.mask, value_range)
  out = np.empty((len(indices), layout.num_patches, layout.patch_dim), np.float32)
  start = last = time.monotonic()
  for j, i in enumerate(indices):
    out[j] = layout.patchify(dq.map(source[int(i)])["activity"])
    if time.monotonic() - last > 10:
      last = time.monotonic()
      rate = (j + 1) / (last - start)
      print(f"[boldjax.data] {label}: read {j + 1}/{len(indices)} maps ({rate:.0f}/s)", flush=True)
  return out


def _fit_tokenizer(ds: records.FlatDataset, layout: PatchLayout, tcfg: Any) -> KMeansTokenizer:
  train = ds.split("train")
  idx = _sample_indices(len(train), setting(tcfg, "num_maps", 4000), setting(tcfg, "seed", 42))
  patches = _read_patches(train, idx, layout, ds.value_range, "tokenizer fit")
  interior = patches[:, layout.interior()].reshape(-1, layout.patch_dim)
  vocab_size = int(setting(tcfg, "vocab_size", 1024))
  if len(interior) < vocab_size:
    raise ValueError(
      f"{ds.path}: tokenizer.vocab_size={vocab_size} needs at least as many interior patches; "
      f"found {len(interior)} in {len(idx)} maps ({int(layout.interior().sum())} per map). "
      "Lower tokenizer.vocab_size or patch_size, or raise tokenizer.num_maps."
    )
  print(
    f"[boldjax.data] fitting k-means V={vocab_size} on {len(interior)} interior patches",
    flush=True,
  )
  start = time.monotonic()
  tok = KMeansTokenizer.fit(interior, vocab_size=vocab_size, seed=int(setting(tcfg, "seed", 42)))
  print(f"[boldjax.data] k-means done in {time.monotonic() - start:.1f}s", flush=True)
  return tok


def _token_counts(
  ds: records.FlatDataset, layout: PatchLayout, tok: KMeansTokenizer, num_maps: int, seed: int
) -> dict[str, np.ndarray]:
  """Histograms of token ids over all N positions of up to num_maps maps per split."""
  counts = {}
  for offset, split in enumerate(("train", "val")):
    source = ds.split(split)
    if len(source) == 0:
      counts[split] = np.zeros(tok.vocab_size, np.int64)
      continue
    idx = _sample_indices(len(source), num_maps, seed + 1 + offset)
    tokens = tok.encode(_read_patches(source, idx, layout, ds.value_range, f"{split} counts"))
    counts[split] = np.bincount(tokens.ravel(), minlength=tok.vocab_size).astype(np.int64)
  return counts


def prepare(data_cfg: Any) -> FlatMapInfo:
  """Build/open the dataset, layout, tokenizer and token counts (once; safe in parallel)."""
  path = _dataset_path(data_cfg)
  ds = records.open_flat_dataset(path)
  ordering, ordering_name = _ordering(data_cfg)
  patch_size = int(setting(data_cfg, "patch_size", 10))
  layout = PatchLayout.from_mask(ds.mask, patch_size, ordering)
  tcfg = setting(data_cfg, "tokenizer", {})
  vocab_size = int(setting(tcfg, "vocab_size", 0))
  tokenizer, token_counts = None, None
  if setting(tcfg, "path"):
    tokenizer = _given_tokenizer(str(setting(tcfg, "path")), layout, vocab_size)
    digest = hashlib.sha256(tokenizer.vocab.tobytes()).hexdigest()[:12]
    count_maps = int(setting(data_cfg, "token_count_maps", 2000))
    store = _store_dir(path, data_cfg)
    stem = f"tokenizer_given{digest}_{patch_size}_{ordering_name}"
    counts_path = os.path.join(store, f"{stem}_counts{count_maps}.npz")
    if not os.path.exists(counts_path):
      with flat_builder.file_lock(os.path.join(store, f".{stem}.lock"), f"counting {stem}"):
        if not os.path.exists(counts_path):
          seed = int(setting(tcfg, "seed", 42))
          counts = _token_counts(ds, layout, tokenizer, count_maps, seed)
          _atomic_save(lambda f: np.savez(f, **counts), counts_path)
    with np.load(counts_path) as z:
      token_counts = {k: z[k] for k in z.files}
  elif vocab_size > 0:
    num_maps = int(setting(tcfg, "num_maps", 4000))
    seed = int(setting(tcfg, "seed", 42))
    count_maps = int(setting(data_cfg, "token_count_maps", 2000))
    store = _store_dir(path, data_cfg)
    stem = f"tokenizer_{vocab_size}_{patch_size}_{ordering_name}_{seed}_n{num_maps}"
    tok_path = os.path.join(store, stem + ".npz")
    counts_path = os.path.join(store, f"{stem}_counts{count_maps}.npz")
    if not (os.path.exists(tok_path) and os.path.exists(counts_path)):
      with flat_builder.file_lock(os.path.join(store, f".{stem}.lock"), f"fitting {tok_path}"):
        if not os.path.exists(tok_path):
          tok = _fit_tokenizer(ds, layout, tcfg)
          _atomic_save(tok.save, tok_path)
        if not os.path.exists(counts_path):
          tok = KMeansTokenizer.load(tok_path)
          counts = _token_counts(ds, layout, tok, count_maps, seed)
          _atomic_save(lambda f: np.savez(f, **counts), counts_path)
    tokenizer = KMeansTokenizer.load(tok_path)
    if tokenizer.dim != layout.patch_dim:
      raise ValueError(
        f"{tok_path}: vocab dim expected {layout.patch_dim} (patch_size {patch_size}), "
        f"found {tokenizer.dim}"
      )
    with np.load(counts_path) as z:
      token_counts = {k: z[k] for k in z.files}
  meta = ds.meta
  return FlatMapInfo(
    path=path,
    mask=ds.mask,
    layout=layout,
    tokenizer=tokenizer,
    num_subjects=int(meta["num_subjects"]),
    num_classes=int(meta["num_classes"]),
    split_sizes=ds.splits,
    token_counts=token_counts,
    value_range=ds.value_range,
    meta=meta,
  )


def _given_tokenizer(tok_path: str, layout: PatchLayout, vocab_size: int) -> KMeansTokenizer:
  """config.data.tokenizer.path: a k-means vocabulary fitted elsewhere (e.g. the one a
  converted boldGPT checkpoint carries), used as is so its token ids keep their meaning."""
  from boldjax.cli import InputError, one_line

  field = "config.data.tokenizer.path"
  if not os.path.isfile(tok_path):
    raise InputError(f"{tok_path}: {field} expected an existing .npz file, found none")
  try:
    tokenizer = KMeansTokenizer.load(tok_path)
  except (OSError, ValueError) as e:
    raise InputError(
      f"{tok_path}: {field} expected an .npz with a (V, D) 'vocab', found {one_line(e)}"
    ) from e
  if tokenizer.dim != layout.patch_dim:
    raise InputError(
      f"{tok_path}: field 'vocab' expected dim {layout.patch_dim} (config.data.patch_size "
      f"{layout.patch_size} squared), found {tokenizer.vocab.shape}"
    )
  if vocab_size and vocab_size != tokenizer.vocab_size:
    raise InputError(
      f"{tok_path}: field 'vocab' expected {vocab_size} entries "
      f"(config.data.tokenizer.vocab_size), found {tokenizer.vocab_size}"
    )
  return tokenizer


def _atomic_save(save, path: str) -> None:
  """save(fileobj) into a temp file, then rename: readers never see half a file."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    save(f)
  os.replace(tmp, path)


def _pad_example(info: FlatMapInfo) -> dict[str, np.ndarray]:
  h, w = info.mask.shape
  return {
    "activity": np.zeros((h, w), np.float32),
    "subject_id": np.int32(0),
    "label": np.int32(-1),
    "trial_id": np.int64(-1),
    "session_id": np.int32(-1),
    "nsd_id": np.int64(-1),
  }


def make_dataset(
  data_cfg: Any,
  info: FlatMapInfo,
  *,
  split: str,
  train: bool,
  seed: int,
  batch_size: int,
  shard_index: int = 0,
  shard_count: int = 1,
) -> grain.IterDataset:
  """Host-local batches for one process; batch_size is this process's (local) batch.

  train=True: seeded shuffle (reshuffled each epoch), repeat forever, this process's slice
  [shard_index::shard_count] of the global stream, random per-sample order if
  data_cfg.shuffle_order, drop_remainder. train=False: one pass in layout order over this
  process's slice, padded (valid=False rows) so every process yields the same number of
  full batches. Keys: patches (B,N,D) f32, tokens (B,N) i32 (with a tokenizer), order
  (B,N) i32, subject_id (B,) i32, label (B,) i32, and valid (B,) bool when train=False.
  """
  if not 0 <= shard_index < shard_count:
    raise ValueError(
      f"make_dataset: need 0 <= shard_index < shard_count, found {shard_index}, {shard_count}"
    )
  source = records.open_flat_dataset(info.path).split(split)
  n = len(source)
  if n == 0:
    raise ValueError(f"{info.path}: split {split!r} is empty")
  if train:
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    keys = TRAIN_KEYS
  else:
    idx = eval_shard_indices(n, batch_size, shard_index, shard_count)
    ds = grain.MapDataset.source(transforms.IndexedSource(source, idx, _pad_example(info)))
    keys = EVAL_KEYS
  ds = ds.map(transforms.Dequantize(info.mask, info.value_range))
  ds = ds.map(transforms.Patchify(info.layout))
  ordering = "random" if (train and bool(setting(data_cfg, "shuffle_order", False))) else "fixed"
  order_seed = (seed + 1) % 2**32
  ds = ds.random_map(transforms.PatchOrder(info.layout.num_patches, ordering), seed=order_seed)
  ds = ds.map(transforms.SelectKeys(keys))
  if train:
    # Slice after the random transforms: an example's random order depends on its place
    # in the global stream, so N processes together see exactly the 1-process batches.
    ds = ds[shard_index::shard_count]
  ds = ds.batch(batch_size, drop_remainder=train)
  if info.tokenizer is not None:
    ds = ds.map(transforms.Tokenize(info.tokenizer))  # one BLAS call per batch
  return to_iter_dataset(ds, data_cfg)


def eval_shard_indices(n: int, batch_size: int, shard_index: int, shard_count: int):
  """This process's example indices, padded with -1 so every process has equal full batches."""
  per_shard = math.ceil(n / shard_count)
  padded = math.ceil(per_shard / batch_size) * batch_size
  idx = np.arange(n)[shard_index::shard_count]
  return np.concatenate([idx, np.full(padded - len(idx), -1, np.int64)])


def to_iter_dataset(ds: grain.MapDataset, data_cfg: Any) -> grain.IterDataset:
  """Threaded reads, plus worker processes when data_cfg.num_workers > 0."""
  read = grain.ReadOptions(
    num_threads=int(setting(data_cfg, "num_threads", 2)),
    prefetch_buffer_size=int(setting(data_cfg, "prefetch_buffer_size", 64)),
  )
  it_ds = ds.to_iter_dataset(read)
  workers = int(setting(data_cfg, "num_workers", 0))
  if workers > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
  return it_ds


@registry.register("pipeline", "synthetic_flat")
@registry.register("pipeline", "array_record")
class FlatMapPipeline:
  """Flat-map datasets (the synthetic default or a prepared directory) for the train loop."""

  kind = "flat"  # evals.examples builds labelled examples per kind

  prepare = staticmethod(prepare)
  make_dataset = staticmethod(make_dataset)


def keyed_batches(
  source: Any,
  pad: dict[str, np.ndarray] | None,
  keys: tuple[str, ...],
  data_cfg: Any,
  *,
  train: bool,
  seed: int,
  batch_size: int,
  shard_index: int = 0,
  shard_count: int = 1,
  train_map: Any = None,
) -> grain.IterDataset:
  """Batches of `keys` from a random-access source of examples: train shuffled, repeated,
  (train_map, a grain RandomMap, applied,) sliced per process, drop_remainder; eval one pass
  in record order, this process's share padded with `pad` (valid False) to full batches."""
  if not 0 <= shard_index < shard_count:
    raise ValueError(
      f"make_dataset: need 0 <= shard_index < shard_count, found {shard_index}, {shard_count}"
    )
  if train:
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat()
    if train_map is not None:
      ds = ds.random_map(train_map, seed=(seed + 1) % 2**32)
    ds = ds.map(transforms.SelectKeys(keys))[shard_index::shard_count]
  else:
    idx = eval_shard_indices(len(source), batch_size, shard_index, shard_count)
    ds = grain.MapDataset.source(transforms.IndexedSource(source, idx, pad))
    ds = ds.map(transforms.SelectKeys(keys))
  ds = ds.batch(batch_size, drop_remainder=train)
  return to_iter_dataset(ds, data_cfg)
