"""Flat-map records, build-once synthetic caching, and the grain pipeline (values, resume)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import threading

import numpy as np
import pytest

from boldjax.data import flat_builder, pipeline, records, transforms
from boldjax.data.patching import PatchLayout
from tests import parity

REPO = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class TinySpec:
  """Stand-in for SyntheticFlatSpec (same field names the builder reads)."""

  height: int = 30
  width: int = 40
  num_subjects: int = 3
  trials_per_subject: int = 20
  num_classes: int = 4
  seed: int = 0


class _Resampler:
  def __init__(self, mask):
    self.mask = mask


CALLS: list[TinySpec] = []


def tiny_mask(h: int, w: int) -> np.ndarray:
  yy, xx = np.mgrid[:h, :w]
  return ((yy - h / 2) / (h * 0.45)) ** 2 + ((xx - w / 2) / (w * 0.45)) ** 2 < 1


def tiny_map(spec: TinySpec, subject: int, trial: int) -> tuple[np.ndarray, int]:
  rng = np.random.default_rng([spec.seed, subject, trial])
  label = int(rng.integers(spec.num_classes))
  act = rng.normal(size=(spec.height, spec.width)) + 0.5 * label - 0.2 * subject
  return (np.clip(act, -2.5, 2.5) * tiny_mask(spec.height, spec.width)).astype(np.float32), label


def tiny_generate(spec: TinySpec):
  """Stand-in for synthetic_flat.generate_flat_maps: (resampler, iterator of dicts)."""
  CALLS.append(spec)

  def examples():
    for s in range(spec.num_subjects):
      for t in range(spec.trials_per_subject):
        act, label = tiny_map(spec, s, t)
        yield {
          "activity": act,
          "subject_id": s,
          "label": label,
          "trial_id": 1000 * s + t,
          "session": t // 5,
        }

  return _Resampler(tiny_mask(spec.height, spec.width)), examples()


def test_quantize_matches_nsd_flat_and_boldgpt():
  q = np.arange(256, dtype=np.uint8)
  x = records.dequantize(q)
  assert x.dtype == np.float32
  np.testing.assert_array_equal(x, q.astype(np.float32) / np.float32(255) * 5 - np.float32(2.5))
  assert abs(float(x[127]) + 0.0098039) < 1e-6  # NSD-Flat's background value
  vals = np.array([-3.0, -2.5, -0.001, 0.0, 0.0098, 1.0, 2.4999, 2.5, 9.0], np.float32)
  np.testing.assert_array_equal(records.quantize(vals), [0, 0, 127, 127, 127, 178, 254, 255, 255])


def test_dequantize_matches_boldgpt_fixture():
  inputs = np.load(parity.folder(parity.cases("boldgpt_*")[0]) / "inputs.npz")
  got = records.dequantize(inputs["activity_uint8"])
  np.testing.assert_array_equal(got.view(np.uint32), inputs["activity"].view(np.uint32))


def test_build_open_round_trip(tmp_path):
  mask = tiny_mask(12, 16)
  rng = np.random.default_rng(0)
  acts = [rng.integers(0, 256, size=(12, 16), dtype=np.uint8) for _ in range(7)]
  train = [
    {"activity": a, "subject_id": i % 2, "trial_id": 10 + i, "label": i % 3, "nsd_id": 5 * i}
    for i, a in enumerate(acts[:5])
  ]
  floats = rng.uniform(-3, 3, size=(2, 12, 16)).astype(np.float32)
  val = [{"activity": f, "subject_id": 1, "trial_id": 100 + i} for i, f in enumerate(floats)]
  path = records.build_flat_dataset(
    str(tmp_path / "ds"),
    {"train": train, "val": val, "test": []},
    mask,
    {"name": "unit", "source": "test"},
  )
  ds = records.open_flat_dataset(path)
  np.testing.assert_array_equal(ds.mask, mask)
  assert ds.splits == {"train": 5, "val": 2, "test": 0}
  assert ds.meta["num_subjects"] == 2 and ds.meta["num_classes"] == 3
  assert ds.meta["height"] == 12 and ds.meta["quantization"] == "uint8"
  source = ds.split("train")
  got = {int(source[i]["trial_id"]): source[i] for i in range(len(source))}
  for i, a in enumerate(acts[:5]):
    ex = got[10 + i]
    np.testing.assert_array_equal(ex["activity"], a)
    assert ex["activity"].dtype == np.uint8
    assert (ex["subject_id"], ex["label"], ex["nsd_id"], ex["session_id"]) == (
      i % 2,
      i % 3,
      5 * i,
      -1,
    )
    assert ex["subject_id"].dtype == np.int32 and ex["trial_id"].dtype == np.int64
  vsource = ds.split("val")
  vgot = {int(vsource[i]["trial_id"]): vsource[i]["activity"] for i in range(2)}
  for i in range(2):  # float activity is quantised like NSD-Flat on the way in
    np.testing.assert_array_equal(vgot[100 + i], records.quantize(floats[i]))
  assert len(ds.split("test")) == 0
  with pytest.raises(FileExistsError, match="exists and is not empty"):
    records.build_flat_dataset(path, {"train": train}, mask, {"name": "u", "source": "t"})


def test_float16_storage(tmp_path):
  mask = tiny_mask(12, 16)
  x = np.random.default_rng(1).normal(size=(12, 16)).astype(np.float32)
  path = records.build_flat_dataset(
    str(tmp_path / "f16"),
    {"train": [{"activity": x, "subject_id": 4, "trial_id": 7}]},
    mask,
    {"name": "f16", "source": "test", "quantization": "float16"},
  )
  ds = records.open_flat_dataset(path)
  ex = ds.split("train")[0]
  assert ex["activity"].dtype == np.float16 and ds.meta["num_subjects"] == 5
  np.testing.assert_array_equal(ex["activity"], x.astype(np.float16))
  out = transforms.Dequantize(mask).map(ex)["activity"]
  np.testing.assert_array_equal(out, x.astype(np.float16).astype(np.float32) * mask)


def test_build_rejects_bad_examples(tmp_path):
  mask = tiny_mask(12, 16)
  meta = {"name": "bad", "source": "test"}
  good = {"activity": np.zeros((12, 16), np.uint8), "subject_id": 0, "trial_id": 0}
  cases = [
    (
      {**good, "activity": np.zeros((12, 15), np.uint8)},
      r"bad/train: example 1 field "
      r"'activity' must have shape \(12, 16\), found \(12, 15\)",
    ),
    ({**good, "colour": 1}, r"bad/train: example 1 has unknown fields \['colour'\]"),
    ({k: v for k, v in good.items() if k != "trial_id"}, "example 1 has no field 'trial_id'"),
    ({**good, "label": 1.5}, "field 'label' must be an integer scalar, found 1.5"),
    ({**good, "activity": np.full((12, 16), np.nan)}, "field 'activity' has non-finite values"),
  ]
  for bad, message in cases:
    with pytest.raises(ValueError, match=message):
      records.build_flat_dataset(str(tmp_path / "x"), {"train": [good, bad]}, mask, meta)
    assert not os.path.exists(tmp_path / "x")
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # temp dir cleaned up


def test_ensure_synthetic_builds_once_and_splits_per_subject(tmp_path):
  spec = TinySpec()
  CALLS.clear()
  results = []
  threads = [
    threading.Thread(
      target=lambda: results.append(
        flat_builder.ensure_synthetic_flat(str(tmp_path), spec, generate=tiny_generate)
      )
    )
    for _ in range(2)
  ]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert len(CALLS) == 1 and len(set(results)) == 1  # flock: the second caller waited
  path = results[0]
  assert os.path.basename(path) == f"synthetic_flat-{flat_builder.spec_hash(spec)}"
  assert flat_builder.ensure_synthetic_flat(str(tmp_path), spec, generate=tiny_generate) == path
  assert len(CALLS) == 1
  ds = records.open_flat_dataset(path)
  assert ds.splits == {"train": 48, "val": 6, "test": 6}  # 20 trials: 2 val + 2 test each
  assert ds.meta["num_subjects"] == 3 and ds.meta["num_classes"] == 4
  seen = {}
  for split in records.SPLITS:
    source = ds.split(split)
    for i in range(len(source)):
      ex = source[i]
      seen[int(ex["trial_id"])] = (split, ex)
  assert sorted(seen) == [1000 * s + t for s in range(3) for t in range(20)]
  for s in range(3):
    expected = flat_builder.trial_splits(20, s, spec.seed)
    for t in range(20):
      split, ex = seen[1000 * s + t]
      assert split == expected[t]
      act, label = tiny_map(spec, s, t)
      np.testing.assert_array_equal(ex["activity"], records.quantize(act))
      assert (ex["subject_id"], ex["label"], ex["session_id"]) == (s, label, t // 5)
    assert (expected == "val").sum() == 2 and (expected == "test").sum() == 2
  other = flat_builder.ensure_synthetic_flat(
    str(tmp_path), TinySpec(seed=1), generate=tiny_generate
  )
  assert other != path and len(CALLS) == 2


@pytest.fixture(scope="module")
def flat_data(tmp_path_factory):
  root = tmp_path_factory.mktemp("flat")
  path = flat_builder.ensure_synthetic_flat(
    str(root), TinySpec(trials_per_subject=30), generate=tiny_generate
  )
  cfg = pipeline.default_config()
  cfg.source = "array_record"
  cfg.path = path
  cfg.cache_dir = str(root / "cache")
  cfg.patch_size = 5
  cfg.tokenizer.vocab_size = 32
  cfg.tokenizer.num_maps = 40
  cfg.token_count_maps = 30
  info = pipeline.prepare(cfg)
  return cfg, info


def _canonical(info, batch):
  """Undo each row's order: patches in layout order, plus the dequantised map."""
  inverse = np.argsort(batch["order"], axis=1)
  patches = np.take_along_axis(batch["patches"], inverse[..., None], axis=1)
  return patches, info.layout.unpatchify(patches)


def _key(m: np.ndarray) -> bytes:
  return (m + np.float32(0)).tobytes()  # -0.0 -> 0.0: compare values, not signs of zero


def _reference_maps(info, split):
  source = records.open_flat_dataset(info.path).split(split)
  dq = transforms.Dequantize(info.mask, info.value_range)
  return [(dq.map(source[i])["activity"], source[i]) for i in range(len(source))]


def test_prepare_tokenizer_and_counts(flat_data):
  cfg, info = flat_data
  assert info.num_subjects == 3 and info.num_classes == 4
  assert info.split_sizes == {"train": 72, "val": 9, "test": 9}
  ref = PatchLayout.from_mask(info.mask, 5, "radial")
  np.testing.assert_array_equal(info.layout.patch_indices, ref.patch_indices)
  assert info.tokenizer.vocab.shape == (32, 25)
  files = sorted(f for f in os.listdir(info.path) if f.startswith("tokenizer_"))
  assert files == ["tokenizer_32_5_radial_42_n40.npz", "tokenizer_32_5_radial_42_n40_counts30.npz"]
  n = info.layout.num_patches
  assert info.token_counts["train"].sum() == 30 * n and info.token_counts["val"].sum() == 9 * n
  mtime = os.path.getmtime(os.path.join(info.path, files[0]))
  again = pipeline.prepare(cfg)  # reuses the stored tokenizer
  assert os.path.getmtime(os.path.join(info.path, files[0])) == mtime
  np.testing.assert_array_equal(again.tokenizer.vocab, info.tokenizer.vocab)
  np.testing.assert_array_equal(again.token_counts["train"], info.token_counts["train"])
  # the counts are the histogram of the tokenizer's own encoding of those maps
  maps = np.stack([m for m, _ in _reference_maps(info, "val")])
  tokens = info.tokenizer.encode(info.layout.patchify(maps))
  np.testing.assert_array_equal(np.bincount(tokens.ravel(), minlength=32), info.token_counts["val"])


def test_train_batches_values(flat_data):
  cfg, info = flat_data
  ds = pipeline.make_dataset(cfg, info, split="train", train=True, seed=3, batch_size=8)
  it = iter(ds)
  refs = _reference_maps(info, "train")
  n = info.layout.num_patches
  for _ in range(2):
    batch = next(it)
    assert set(batch) == {"patches", "tokens", "order", "subject_id", "label"}
    assert batch["patches"].shape == (8, n, 25) and batch["patches"].dtype == np.float32
    assert batch["tokens"].dtype == np.int32 and batch["order"].dtype == np.int32
    assert batch["subject_id"].dtype == np.int32 and batch["label"].dtype == np.int32
    np.testing.assert_array_equal(
      np.sort(batch["order"], axis=1), np.broadcast_to(np.arange(n), (8, n))
    )
    assert len({tuple(o) for o in batch["order"]}) == 8  # a fresh random order per sample
    np.testing.assert_array_equal(batch["tokens"], info.tokenizer.encode(batch["patches"]))
    _, maps = _canonical(info, batch)
    for row in range(8):
      matches = [ex for m, ex in refs if np.array_equal(m, maps[row])]
      assert len(matches) == 1
      assert batch["subject_id"][row] == matches[0]["subject_id"]
      assert batch["label"][row] == matches[0]["label"]
  # one epoch = a permutation of the split (72 = 9 batches of 8)
  ds = pipeline.make_dataset(cfg, info, split="train", train=True, seed=4, batch_size=8)
  it = iter(ds)
  epoch = np.concatenate([_canonical(info, next(it))[1] for _ in range(9)])
  keys = {_key(m) for m in epoch}
  assert len(keys) == 72 and keys == {_key(m) for m, _ in refs}
  cfg2 = cfg.copy_and_resolve_references()
  cfg2.shuffle_order = False
  batch = next(
    iter(pipeline.make_dataset(cfg2, info, split="train", train=True, seed=3, batch_size=4))
  )
  np.testing.assert_array_equal(batch["order"], np.broadcast_to(np.arange(n), (4, n)))


def test_train_determinism_and_resume(flat_data, tmp_path):
  cfg, info = flat_data

  def make(seed):
    return iter(
      pipeline.make_dataset(cfg, info, split="train", train=True, seed=seed, batch_size=8)
    )

  a, b, c = make(0), make(0), make(1)
  first = [next(a) for _ in range(5)]
  for x in first:
    y = next(b)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  z = next(c)
  assert not np.array_equal(first[0]["patches"], z["patches"])

  it = make(0)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  fresh = make(0)
  fresh.set_state(state)
  for e in expected:
    got = next(fresh)
    for key in e:
      np.testing.assert_array_equal(got[key], e[key])

  # the same through orbax + grain's checkpoint handler (as boldjax/checkpoint.py saves it)
  import grain
  import orbax.checkpoint as ocp

  it = make(0)
  for _ in range(3):
    next(it)
  mngr = ocp.CheckpointManager(
    str(tmp_path / "ckpt"), item_handlers={"data_iter": grain.checkpoint.CheckpointHandler()}
  )
  mngr.save(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = [next(it) for _ in range(2)]
  fresh = make(0)
  mngr.restore(3, args=ocp.args.Composite(data_iter=grain.checkpoint.CheckpointRestore(fresh)))
  for e in expected:
    got = next(fresh)
    for key in e:
      np.testing.assert_array_equal(got[key], e[key])
  mngr.close()


def test_eval_sharded_padded_one_pass(flat_data):
  cfg, info = flat_data
  refs = _reference_maps(info, "val")  # 9 maps
  shards = [
    list(
      pipeline.make_dataset(
        cfg, info, split="val", train=False, seed=0, batch_size=2, shard_index=i, shard_count=2
      )
    )
    for i in range(2)
  ]
  assert [len(s) for s in shards] == [3, 3]  # ceil(ceil(9 / 2) / 2) full batches each
  n = info.layout.num_patches
  seen = []
  for shard in shards:
    for batch in shard:
      assert set(batch) == {"patches", "tokens", "order", "subject_id", "label", "valid"}
      assert batch["valid"].dtype == np.bool_ and batch["patches"].shape == (2, n, 25)
      np.testing.assert_array_equal(batch["order"], np.broadcast_to(np.arange(n), (2, n)))
      _, maps = _canonical(info, batch)
      for row in np.flatnonzero(batch["valid"]):
        seen.append(_key(maps[row]))
      assert np.all(batch["label"][~batch["valid"]] == -1)
  assert sum(int(b["valid"].sum()) for s in shards for b in s) == 9
  assert sorted(seen) == sorted(_key(m) for m, _ in refs)


def test_meta_json_is_plain(flat_data):
  _, info = flat_data
  with open(os.path.join(info.path, "meta.json")) as f:
    meta = json.load(f)
  assert meta["split_sizes"] == {"train": 72, "val": 9, "test": 9}
  assert meta["source"]["spec"]["trials_per_subject"] == 30
  assert meta["value_range"] == [-2.5, 2.5]


def test_mp_prefetch_matches_in_process(flat_data):
  cfg, info = flat_data
  cfg2 = cfg.copy_and_resolve_references()
  cfg2.num_workers = 2
  plain = iter(pipeline.make_dataset(cfg, info, split="train", train=True, seed=5, batch_size=4))
  mp = iter(pipeline.make_dataset(cfg2, info, split="train", train=True, seed=5, batch_size=4))
  for _ in range(4):
    x, y = next(plain), next(mp)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  mp.close()


def test_real_synthetic_generator(tmp_path):
  from boldjax.data import synthetic_flat as synthetic

  spec = synthetic.SyntheticFlatSpec(num_subjects=2, trials_per_subject=10, seed=0)
  path = flat_builder.ensure_synthetic_flat(str(tmp_path), spec)
  ds = records.open_flat_dataset(path)
  assert sum(ds.splits.values()) == 20 and ds.splits["val"] == 2 and ds.splits["test"] == 2
  resampler, examples = synthetic.generate_flat_maps(spec)
  np.testing.assert_array_equal(ds.mask, resampler.mask)
  first = next(examples)
  stored = {}
  for split in records.SPLITS:
    src = ds.split(split)
    for i in range(len(src)):
      ex = src[i]
      stored[(int(ex["subject_id"]), int(ex["trial_id"]))] = ex
  ex = stored[(int(first["subject_id"]), int(first["trial_id"]))]
  np.testing.assert_array_equal(ex["activity"], records.quantize(first["activity"]))
  assert ex["label"] == first["label"]
  # the config path used by training: source="synthetic_flat", no path
  cfg = pipeline.default_config()
  cfg.cache_dir = str(tmp_path)
  cfg.synthetic = {"num_subjects": 2, "trials_per_subject": 10, "seed": 0}
  cfg.patch_size = 10
  cfg.tokenizer.vocab_size = 8
  cfg.tokenizer.num_maps = 16
  cfg.token_count_maps = 4
  info = pipeline.prepare(cfg)
  assert info.path == path and info.num_subjects == 2
  batch = next(
    iter(pipeline.make_dataset(cfg, info, split="train", train=True, seed=0, batch_size=4))
  )
  assert batch["patches"].shape == (4, info.layout.num_patches, 100)
  np.testing.assert_array_equal(batch["tokens"], info.tokenizer.encode(batch["patches"]))
