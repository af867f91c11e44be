"""Build-once caching of flat-map datasets (the embedded synthetic default) and file locks.

ensure_synthetic_flat() turns the synthetic generator's stream into a dataset directory
under cache_dir/synthetic_flat-<hash of the spec>/, exactly once even when several
processes ask at the same time: an exclusive fcntl lock serialises builders, the build
happens in a temporary directory that is renamed into place, and later callers only see
the finished directory.

Synthetic splits are by trial, per subject: with n = spec.trials_per_subject, a seeded
permutation of each subject's trial positions puts round(0.1 n) trials (at least 1 when
n >= 3) in val, as many in test, and the rest in train. Every subject is in every split,
so subject embeddings are trained for all subjects the eval sees.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from boldjax.data import records

EVAL_FRACTION = 0.1  # of each subject's trials, for val and again for test
_KNOWN_FIELDS = {"activity", "subject_id", "label", "trial_id", "session_id", "nsd_id"}


@contextlib.contextmanager
def file_lock(path: str, what: str = "") -> Iterator[None]:
  """Exclusive advisory lock on `path` (created if needed); prints when it has to wait."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f"[boldjax.data] waiting for another process ({what or path})", flush=True)
      fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def spec_hash(spec: Any) -> str:
  """Stable 12-hex digest of a dataclass spec (class name, fields, storage format)."""
  payload = {
    "class": type(spec).__name__,
    "fields": dataclasses.asdict(spec),
    "format_version": records.FORMAT_VERSION,
  }
  text = json.dumps(payload, sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def trial_splits(num_trials: int, subject_id: int, seed: int) -> np.ndarray:
  """(num_trials,) array of split names for one subject's trials, by position."""
  n = int(num_trials)
  n_eval = max(1, round(EVAL_FRACTION * n)) if n >= 3 else 0
  rank = np.random.default_rng([seed, subject_id, 0x5EED]).permutation(n)
  out = np.full(n, "train", dtype=object)
  out[rank < n_eval] = "val"
  out[(rank >= n_eval) & (rank < 2 * n_eval)] = "test"
  return out


class _Demux:
  """Split one (split, example) stream into per-split streams, buffering only the others.

  TFDS writes splits one after another; with train first, memory holds only the val and
  test examples seen meanwhile (~20% of the data) instead of the whole dataset.
  """

  def __init__(self, stream: Iterator[tuple[str, dict[str, Any]]], splits: tuple[str, ...]):
    self._stream = stream
    self._buffers: dict[str, collections.deque] = {s: collections.deque() for s in splits}

  def stream(self, split: str) -> Iterator[dict[str, Any]]:
    buf = self._buffers[split]
    while True:
      while buf:
        yield buf.popleft()
      try:
        name, ex = next(self._stream)
      except StopIteration:
        return
      self._buffers[name].append(ex)


def _synthetic_stream(spec: Any, examples: Iterator[dict[str, Any]]):
  """Assign each generated trial to a split; keep the stored fields."""
  n = int(spec.trials_per_subject)
  seed = int(getattr(spec, "seed", 0))
  seen: dict[int, int] = collections.defaultdict(int)
  assignment: dict[int, np.ndarray] = {}
  for ex in examples:
    sub = int(ex["subject_id"])
    k = seen[sub]
    if k >= n:
      raise ValueError(
        f"synthetic generator: subject {sub} yielded more than trials_per_subject={n} trials"
      )
    seen[sub] = k + 1
    if sub not in assignment:
      assignment[sub] = trial_splits(n, sub, seed)
    out = {key: ex[key] for key in _KNOWN_FIELDS if key in ex}
    if "session" in ex and "session_id" not in out:
      out["session_id"] = ex["session"]
    yield assignment[sub][k], out


def build_synthetic_flat(
  out_dir: str,
  spec: Any,
  *,
  generate: Callable[[Any], tuple[Any, Iterator[dict[str, Any]]]] | None = None,
  overwrite: bool = False,
) -> str:
  """Generate the synthetic maps for `spec` and write them as a dataset at out_dir.

  generate(spec) -> (resampler with .mask, iterator of example dicts) defaults to
  boldjax.data.synthetic_flat.generate_flat_maps.
  """
  if generate is None:
    from boldjax.data.synthetic_flat import generate_flat_maps as generate
  start = time.monotonic()
  print(f"[boldjax.data] building synthetic flat maps into {out_dir}", flush=True)
  resampler, examples = generate(spec)
  demux = _Demux(_synthetic_stream(spec, examples), records.SPLITS)
  meta = {
    "name": "synthetic_flat",
    "source": {"generator": "boldjax.data.synthetic_flat", "spec": dataclasses.asdict(spec)},
    "num_subjects": int(spec.num_subjects),
    "num_classes": int(spec.num_classes),
    "split_rule": f"per subject by trial: val {EVAL_FRACTION}, test {EVAL_FRACTION}",
  }
  records.build_flat_dataset(
    out_dir,
    {s: demux.stream(s) for s in records.SPLITS},
    np.asarray(resampler.mask),
    meta,
    overwrite=overwrite,
  )
  print(f"[boldjax.data] built {out_dir} in {time.monotonic() - start:.1f}s", flush=True)
  return out_dir


def ensure_synthetic_flat(
  cache_dir: str,
  spec: Any,
  *,
  generate: Callable[[Any], tuple[Any, Iterator[dict[str, Any]]]] | None = None,
) -> str:
  """Build the synthetic dataset for `spec` once under cache_dir; return its directory."""
  cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
  key = spec_hash(spec)
  out_dir = os.path.join(cache_dir, f"synthetic_flat-{key}")
  done = os.path.join(out_dir, "meta.json")
  if os.path.exists(done):
    return out_dir
  with file_lock(os.path.join(cache_dir, f"synthetic_flat-{key}.lock"), f"building {out_dir}"):
    if os.path.exists(done):  # another process finished while we waited
      return out_dir
    for stale in glob.glob(f"{out_dir}.tmp-*"):  # left by a crashed build; we hold the lock
      shutil.rmtree(stale, ignore_errors=True)
    build_synthetic_flat(out_dir, spec, generate=generate, overwrite=True)
  return out_dir
