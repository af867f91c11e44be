"""Probes on frozen features, pure functions of arrays: subject splits, heads, protocols.

Features come as arrays with a crop axis: vectors (n, K, F) or tokens ((n, K, N, D),
mask (n, K, N)); K = 1 without multi-crop. Each crop is a separate training sample; an
example's prediction averages the logits of its K crops (the Semantoks protocol). Every
protocol selects its hyperparameter on the validation subjects by balanced accuracy of
those crop-averaged predictions and reports the test balanced accuracy of the choice.

Protocols:
  linear     Brain-Semantoks linear_probe.py: BatchNorm1d + Linear (weight trunc-normal std
             2e-5), SGD momentum 0.9, no weight decay, 50 epochs, batch min(256, n/8), one
             head per learning rate in a grid, trained in parallel (vmap).
  logistic   Brainmarks: StandardScaler + scikit-learn LogisticRegression, C chosen on val,
             refitted on train + val.
  attentive  Brainmarks `attn` head: LayerNorm, one learned query, multi-head attention
             over the (masked) tokens, Linear; AdamW, learning-rate grid.
  mlp        BatchNorm + Linear-GELU-Linear, AdamW, learning-rate grid (the identity
             baseline's head in Brainmarks).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

Split = tuple[Any, np.ndarray]  # (features, labels (n,))

LINEAR_LRS = (3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)
HEAD_LRS = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
LOGISTIC_CS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
PROTOCOL_INPUT = {"linear": "vector", "logistic": "vector", "mlp": "vector", "attentive": "tokens"}


@dataclasses.dataclass(frozen=True)
class ProbeOptions:
  """Hyperparameters of every protocol (defaults: small enough for a CPU)."""

  linear_lrs: tuple[float, ...] = LINEAR_LRS
  linear_epochs: int = 50
  linear_max_batch: int = 256
  head_lrs: tuple[float, ...] = HEAD_LRS
  head_steps: int = 500
  head_batch: int = 128
  head_weight_decay: float = 1e-4
  mlp_hidden: int = 128
  attentive_heads: int = 4
  logistic_cs: tuple[float, ...] = LOGISTIC_CS
  logistic_max_iter: int = 1000
  # Refit the chosen logistic C on train + val (Brainmarks). Off for label-scarce probes,
  # where val only selects and the training set stays the few subjects asked for.
  logistic_refit_on_val: bool = True


@dataclasses.dataclass
class ProbeResult:
  test: float  # balanced accuracy of the chosen head on the test examples
  val: float  # its validation balanced accuracy (the selection criterion)
  chosen: dict[str, float]  # the selected hyperparameter(s)
  notes: dict[str, Any] = dataclasses.field(default_factory=dict)


# -----------------------------------------------------------------------------------------
# Metrics and crop averaging.
# -----------------------------------------------------------------------------------------


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
  """Mean over the classes present in y_true of their recall (sklearn's definition)."""
  y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
  if y_true.shape != y_pred.shape or y_true.ndim != 1 or len(y_true) == 0:
    raise ValueError(
      f"balanced_accuracy: expected two equal (n,) arrays with n > 0, found {y_true.shape} "
      f"and {y_pred.shape}"
    )
  recalls = [np.mean(y_pred[y_true == c] == c) for c in np.unique(y_true)]
  return float(np.mean(recalls))


def crop_average(logits: np.ndarray) -> np.ndarray:
  """(n, K, C) per-crop logits -> (n, C) example logits (mean over the K crops)."""
  logits = np.asarray(logits)
  if logits.ndim != 3:
    raise ValueError(f"crop_average: expected (n, K, C) logits, found {logits.shape}")
  return logits.mean(axis=1)


def score(logits: np.ndarray, y: np.ndarray) -> float:
  """Balanced accuracy of crop-averaged (n, K, C) logits; -1 when any logit is not finite."""
  if not np.all(np.isfinite(logits)):
    return -1.0
  return balanced_accuracy(y, np.argmax(crop_average(logits), axis=-1))


# -----------------------------------------------------------------------------------------
# Subject splits.
# -----------------------------------------------------------------------------------------


def subject_splits(
  subjects: np.ndarray,
  seed: int,
  *,
  val_fraction: float = 0.2,
  test_fraction: float = 0.2,
  labels: np.ndarray | None = None,
  train_subjects: int | None = None,
) -> dict[str, np.ndarray]:
  """Sorted subject ids of train / val / test (disjoint), as Semantoks' two-stage
  train_test_split (test = ceil(test_fraction * S) subjects, val from the rest).

  train_subjects keeps a seeded subset of that many training subjects (val and test are
  unchanged), so label-scarce curves share their test subjects with the full probe.

  When every subject carries one label (a trait), the split is stratified by it if each
  class has enough subjects; otherwise subjects are drawn uniformly.
  """
  from sklearn.model_selection import train_test_split

  subjects = np.asarray(subjects)
  uniq = np.unique(subjects)
  if len(uniq) < 3:
    raise ValueError(
      f"subject splits: need at least 3 subjects (train/val/test), found {len(uniq)} "
      f"({uniq.tolist()}); use more subjects or split by example (--split_by=example)"
    )
  if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
    raise ValueError(
      f"subject splits: need 0 < val_fraction, test_fraction and a sum < 1, found "
      f"{val_fraction}, {test_fraction}"
    )
  strat = None
  if labels is not None:
    labels = np.asarray(labels)
    per_subject = [np.unique(labels[subjects == s]) for s in uniq]
    if all(len(p) == 1 for p in per_subject):
      strat = np.array([p[0] for p in per_subject])

  def split(items, size, strata):
    try:
      return train_test_split(items, test_size=size, random_state=seed, stratify=strata)
    except ValueError:  # a class with too few subjects to stratify: plain random draw
      return train_test_split(items, test_size=size, random_state=seed)

  idx = np.arange(len(uniq))
  rest, test = split(idx, test_fraction, strat)
  rest_strat = None if strat is None else strat[rest]
  train, val = split(rest, val_fraction / (1.0 - test_fraction), rest_strat)
  out = {
    name: np.sort(uniq[part]) for name, part in (("train", train), ("val", val), ("test", test))
  }
  if min(len(v) for v in out.values()) == 0:
    raise ValueError(
      f"subject splits: {len(uniq)} subjects leave an empty split "
      f"({ {k: len(v) for k, v in out.items()} }); change val_fraction/test_fraction"
    )
  if train_subjects is not None:
    if not 1 <= train_subjects <= len(out["train"]):
      raise ValueError(
        f"train_subjects: expected 1..{len(out['train'])} (the training split of "
        f"{len(uniq)} subjects), found {train_subjects}"
      )
    keep = np.random.default_rng([seed, 0x5B]).permutation(len(out["train"]))[:train_subjects]
    out["train"] = np.sort(out["train"][keep])
  return out


def split_indices(subjects: np.ndarray, split: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Example indices of each split (an example belongs to its subject's split)."""
  subjects = np.asarray(subjects)
  return {name: np.flatnonzero(np.isin(subjects, ids)) for name, ids in split.items()}


# -----------------------------------------------------------------------------------------
# Heads trained with JAX (one per learning rate, vmapped).
# -----------------------------------------------------------------------------------------


def _batchnorm(p, state, x, w, train: bool, eps: float = 1e-5, momentum: float = 0.1):
  """torch BatchNorm1d over rows of x (weights w mark real rows); running stats for eval."""
  if not train:
    y = (x - state["mean"]) / jnp.sqrt(state["var"] + eps)
    return y * p["scale"] + p["bias"], state
  n = jnp.maximum(jnp.sum(w), 1.0)
  mean = jnp.sum(w[:, None] * x, axis=0) / n
  var = jnp.sum(w[:, None] * (x - mean) ** 2, axis=0) / n
  unbiased = var * n / jnp.maximum(n - 1.0, 1.0)
  new = {
    "mean": (1 - momentum) * state["mean"] + momentum * mean,
    "var": (1 - momentum) * state["var"] + momentum * unbiased,
  }
  y = (x - mean) / jnp.sqrt(var + eps)
  return y * p["scale"] + p["bias"], jax.tree.map(jax.lax.stop_gradient, new)


def _bn_init(f: int):
  return (
    {"scale": jnp.ones((f,)), "bias": jnp.zeros((f,))},
    {"mean": jnp.zeros((f,)), "var": jnp.ones((f,))},
  )


def _torch_linear(key, f_in: int, f_out: int, std: float | None = None):
  """torch nn.Linear init (or trunc-normal weights of `std`, as Semantoks' probe head)."""
  kw, kb = jax.random.split(key)
  bound = 1.0 / math.sqrt(f_in)
  if std is None:
    w = jax.random.uniform(kw, (f_in, f_out), minval=-bound, maxval=bound)
  else:
    w = std * jax.random.truncated_normal(kw, -2.0 / std, 2.0 / std, (f_in, f_out))
  b = jax.random.uniform(kb, (f_out,), minval=-bound, maxval=bound)
  return {"w": w, "b": b}


@dataclasses.dataclass(frozen=True)
class LinearHead:
  """BatchNorm1d + Linear (Semantoks' LinearProbeHead)."""

  num_classes: int

  def init(self, key, x):
    f = x.shape[-1]
    bn, state = _bn_init(f)
    return {"bn": bn, "fc": _torch_linear(key, f, self.num_classes, std=2e-5)}, state

  def apply(self, p, state, x, w, train):
    h, state = _batchnorm(p["bn"], state, x.astype(jnp.float32), w, train)
    return h @ p["fc"]["w"] + p["fc"]["b"], state


@dataclasses.dataclass(frozen=True)
class MlpHead:
  """BatchNorm1d + Linear-GELU-Linear."""

  num_classes: int
  hidden: int = 128

  def init(self, key, x):
    f = x.shape[-1]
    k1, k2 = jax.random.split(key)
    bn, state = _bn_init(f)
    params = {
      "bn": bn,
      "fc1": _torch_linear(k1, f, self.hidden),
      "fc2": _torch_linear(k2, self.hidden, self.num_classes),
    }
    return params, state

  def apply(self, p, state, x, w, train):
    h, state = _batchnorm(p["bn"], state, x.astype(jnp.float32), w, train)
    h = jax.nn.gelu(h @ p["fc1"]["w"] + p["fc1"]["b"], approximate=False)
    return h @ p["fc2"]["w"] + p["fc2"]["b"], state


def _num_heads(dim: int, wanted: int) -> int:
  """The largest head count <= wanted that divides dim."""
  return max(h for h in range(1, max(1, wanted) + 1) if dim % h == 0)


@dataclasses.dataclass(frozen=True)
class AttentiveHead:
  """LayerNorm, one learned query, multi-head attention over the tokens, Linear.

  Exactly multi-head attention with one query (q, W_k, W_v, W_o per head), computed as
  scores = x . (W_k q) and out = (sum_n a_n x_n) W_v, which costs O(N D H) rather than the
  O(N D^2) of projecting every token (key/value biases cancel in the softmax / add a
  constant after the convex combination, and are omitted).
  """

  num_classes: int
  num_heads: int = 4

  def init(self, key, x):
    tokens, _ = x
    d = tokens.shape[-1]
    h = _num_heads(d, self.num_heads)
    dh = d // h
    kq, kk, kv, ko, kc = jax.random.split(key, 5)
    s = 1.0 / math.sqrt(d)
    params = {
      "ln": {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))},
      "query": 0.02 * jax.random.normal(kq, (h, dh)),
      "wk": s * jax.random.normal(kk, (h, d, dh)),
      "wv": s * jax.random.normal(kv, (h, d, dh)),
      "out": _torch_linear(ko, d, d),
      "fc": _torch_linear(kc, d, self.num_classes),
    }
    return params, {}

  def apply(self, p, state, x, w, train):
    del w, train
    tokens, mask = x
    # LayerNorm without its affine part first: it does not depend on the params, so it is
    # computed once per batch for every vmapped head. The affine (scale s, bias b) is
    # folded in exactly: scores shift by b . k (cancels in the softmax) and the pooled
    # value is (sum_n a_n t_n) * s + b.
    t = tokens.astype(jnp.float32)
    mu = t.mean(-1, keepdims=True)
    t = (t - mu) * jax.lax.rsqrt(((t - mu) ** 2).mean(-1, keepdims=True) + 1e-6)
    scale, bias = p["ln"]["scale"], p["ln"]["bias"]
    dh = p["query"].shape[-1]
    key_dirs = jnp.einsum("hde,he->hd", p["wk"], p["query"]) * scale  # (H, D)
    b, n, d = t.shape
    # (B*N, D) @ (D, H): one plain matmul (much faster on CPU than a "bnd,hd->bhn" einsum).
    scores = (t.reshape(b * n, d) @ key_dirs.T).reshape(b, n, -1) / math.sqrt(dh)
    mask = mask.astype(bool)
    scores = jnp.where(mask[:, :, None], scores, -1e30)
    any_valid = jnp.any(mask, axis=-1).astype(jnp.float32)[:, None, None]
    att = jax.nn.softmax(scores, axis=1) * any_valid  # (B, N, H)
    pooled = jnp.einsum("bnh,bnd->bhd", att, t) * scale + bias * any_valid
    heads = jnp.einsum("bhd,hde->bhe", pooled, p["wv"]).reshape(b, -1)
    out = heads @ p["out"]["w"] + p["out"]["b"]
    return out @ p["fc"]["w"] + p["fc"]["b"], state


def _take(x, i):
  return jax.tree.map(lambda a: a[i], x)


@functools.partial(jax.jit, static_argnames=("head", "optimizer"))
def _train_heads(head, optimizer: str, lrs, weight_decay, keys, x, y, batches):
  """Train one head per learning rate on the same batch sequence (batches (S, B) int32,
  -1 = padding row; a step with only padding rows changes nothing). Returns stacked
  (params, state, last real loss)."""

  def make_tx(lr):
    if optimizer == "sgd":
      return optax.sgd(lr, momentum=0.9)
    return optax.adamw(lr, weight_decay=weight_decay)

  def one(lr, key):
    params, state = head.init(key, _take(x, jnp.zeros((1,), jnp.int32)))
    tx = make_tx(lr)

    def step(carry, idx):
      params, state, opt_state, last = carry
      w = (idx >= 0).astype(jnp.float32)
      i = jnp.maximum(idx, 0)
      xb, yb = _take(x, i), y[i]

      def loss_fn(p):
        logits, new_state = head.apply(p, state, xb, w, True)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
        return jnp.sum(w * ce) / jnp.maximum(jnp.sum(w), 1.0), new_state

      (loss, new_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, new_opt = tx.update(grads, opt_state, params)
      new = (optax.apply_updates(params, updates), new_state, new_opt, loss)
      real = jnp.sum(w) > 0
      old = (params, state, opt_state, last)
      return jax.tree.map(lambda a, b: jnp.where(real, a, b), new, old), None

    init = (params, state, tx.init(params), jnp.float32(0.0))
    (params, state, _, last), _ = jax.lax.scan(step, init, batches)
    return params, state, last

  return jax.vmap(one)(lrs, keys)


@functools.partial(jax.jit, static_argnames=("head",))
def _predict_heads(head, params, state, x):
  """(L, B, C) eval-mode logits of every head."""
  w = jnp.ones((jax.tree.leaves(x)[0].shape[0],), jnp.float32)
  return jax.vmap(lambda p, s: head.apply(p, s, x, w, False)[0])(params, state)


def _rows(x) -> int:
  return int(jax.tree.leaves(x)[0].shape[0])


def _samples(x) -> int:
  """Training samples of (n, K, ...) features: every crop counts."""
  shape = np.shape(jax.tree.leaves(x)[0])
  return int(shape[0] * shape[1])


def _flatten_crops(x, y: np.ndarray):
  """(n, K, ...) features + (n,) labels -> (n*K, ...) samples + repeated labels."""
  k = int(jax.tree.leaves(x)[0].shape[1])
  flat = jax.tree.map(lambda a: np.asarray(a).reshape(-1, *np.shape(a)[2:]), x)
  return flat, np.repeat(np.asarray(y), k), k


def _pad_rows(x, rows: int):
  """Zero rows appended up to `rows` (fixed shapes: one compilation for every split)."""

  def pad(a):
    a = np.asarray(a)
    out = np.zeros((rows, *a.shape[1:]), a.dtype)
    out[: len(a)] = a
    return out

  return jax.tree.map(pad, x)


EVAL_CHUNK = 256  # examples per prediction call (padded, so one compilation)


def _logits(head, params, state, x) -> np.ndarray:
  """(L, n, K, C) logits of (n, K, ...) features, in fixed-size padded chunks."""
  n = _rows(x)
  out = []
  for start in range(0, n, EVAL_CHUNK):
    part = _take(x, slice(start, start + EVAL_CHUNK))
    m = _rows(part)
    flat, _, k = _flatten_crops(_pad_rows(part, EVAL_CHUNK), np.zeros(EVAL_CHUNK))
    logits = np.asarray(_predict_heads(head, params, state, jax.tree.map(jnp.asarray, flat)))
    out.append(logits.reshape(logits.shape[0], EVAL_CHUNK, k, -1)[:, :m])
  return np.concatenate(out, axis=1)


def _linear_batch(m: int, max_batch: int) -> int:
  """Semantoks' batch size: min(probe_batch_size, max(1, n // 8))."""
  return min(max_batch, max(1, m // 8))


def _epoch_batches(
  m: int, max_batch: int, epochs: int, rng: np.random.Generator, capacity: int
) -> np.ndarray:
  """Shuffled epochs of Semantoks' batch size, the last batch of each padded with -1
  (DataLoader drop_last=False), laid into the (steps, batch) shape of the largest layout
  any m <= capacity needs (the extra steps are all padding and are skipped)."""
  batch = _linear_batch(m, max_batch)
  per_epoch = math.ceil(m / batch)
  real = np.full((epochs, per_epoch * batch), -1, np.int32)
  for e in range(epochs):
    real[e, :m] = rng.permutation(m)
  real = real.reshape(-1, batch)
  width = _linear_batch(capacity, max_batch)
  steps = epochs * max(math.ceil(c / _linear_batch(c, max_batch)) for c in range(1, capacity + 1))
  out = np.full((steps, width), -1, np.int32)
  out[: len(real), :batch] = real
  return out


def _stream_batches(m: int, batch: int, steps: int, rng: np.random.Generator) -> np.ndarray:
  """`steps` batches of `batch` rows drawn from consecutive shuffled epochs."""
  perms = [rng.permutation(m) for _ in range(math.ceil(steps * batch / m))]
  return np.concatenate(perms)[: steps * batch].reshape(steps, batch).astype(np.int32)


def _fit_select(
  head,
  optimizer: str,
  lrs,
  weight_decay: float,
  data: dict[str, Split],
  batches: np.ndarray,
  seed: int,
  capacity: int,
) -> ProbeResult:
  """Train one head per lr on train, choose on val (first best in grid order), test it."""
  x, y, _ = _flatten_crops(*data["train"])
  keys = jax.random.split(jax.random.key(seed), len(lrs))
  params, state, last_loss = _train_heads(
    head,
    optimizer,
    jnp.asarray(lrs, jnp.float32),
    jnp.float32(weight_decay),
    keys,
    jax.tree.map(jnp.asarray, _pad_rows(x, capacity)),
    jnp.asarray(_pad_rows(y, capacity), jnp.int32),
    jnp.asarray(batches),
  )
  val_logits = _logits(head, params, state, data["val"][0])
  val_scores = [score(val_logits[i], data["val"][1]) for i in range(len(lrs))]
  best = int(np.argmax(val_scores))
  best_params = jax.tree.map(lambda a: a[best : best + 1], params)
  best_state = jax.tree.map(lambda a: a[best : best + 1], state)
  test_logits = _logits(head, best_params, best_state, data["test"][0])[0]
  return ProbeResult(
    test=score(test_logits, data["test"][1]),
    val=float(val_scores[best]),
    chosen={"lr": float(lrs[best])},
    notes={
      "val_by_lr": [float(v) for v in val_scores],
      "diverged": int(sum(not np.isfinite(v) for v in np.asarray(last_loss))),
    },
  )


# -----------------------------------------------------------------------------------------
# Protocols: fn(data, num_classes, seed, options) -> ProbeResult.
# data = {"train" | "val" | "test": (features, labels)}.
# -----------------------------------------------------------------------------------------


def linear_probe(
  data: dict[str, Split],
  num_classes: int,
  seed: int,
  options: ProbeOptions = ProbeOptions(),
  capacity: int | None = None,
) -> ProbeResult:
  """Semantoks linear probe (BatchNorm + Linear, SGD, LR grid, crop-averaged test).

  capacity: an upper bound on the training samples of any split to be probed (all
  calls with the same capacity and feature shape share one compilation)."""
  m = _samples(data["train"][0])
  capacity = max(m, capacity or m)
  batches = _epoch_batches(
    m, options.linear_max_batch, options.linear_epochs, np.random.default_rng(seed), capacity
  )
  head = LinearHead(num_classes)
  return _fit_select(head, "sgd", options.linear_lrs, 0.0, data, batches, seed, capacity)


def mlp_probe(
  data: dict[str, Split],
  num_classes: int,
  seed: int,
  options: ProbeOptions = ProbeOptions(),
  capacity: int | None = None,
) -> ProbeResult:
  """BatchNorm + 1-hidden-layer MLP, AdamW, LR grid."""
  return _adamw_probe(MlpHead(num_classes, options.mlp_hidden), data, seed, options, capacity)


def attentive_probe(
  data: dict[str, Split],
  num_classes: int,
  seed: int,
  options: ProbeOptions = ProbeOptions(),
  capacity: int | None = None,
) -> ProbeResult:
  """One-query multi-head attention pooling over tokens ((n, K, N, D), (n, K, N))."""
  head = AttentiveHead(num_classes, options.attentive_heads)
  return _adamw_probe(head, data, seed, options, capacity)


def _adamw_probe(
  head: Any,
  data: dict[str, Split],
  seed: int,
  options: ProbeOptions,
  capacity: int | None,
) -> ProbeResult:
  """The learned heads' recipe: shuffled minibatch stream, AdamW, LR grid picked on val."""
  m = _samples(data["train"][0])
  capacity = max(m, capacity or m)
  batches = _stream_batches(m, options.head_batch, options.head_steps, np.random.default_rng(seed))
  return _fit_select(
    head, "adamw", options.head_lrs, options.head_weight_decay, data, batches, seed, capacity
  )


def logistic_probe(
  data: dict[str, Split],
  num_classes: int,
  seed: int,
  options: ProbeOptions = ProbeOptions(),
  capacity: int | None = None,
) -> ProbeResult:
  """StandardScaler + LogisticRegression; C on val, refit on train + val (unless
  options.logistic_refit_on_val is off), test."""
  from sklearn.exceptions import ConvergenceWarning
  from sklearn.linear_model import LogisticRegression
  from sklearn.preprocessing import StandardScaler

  del num_classes, capacity
  x_tr, y_tr, _ = _flatten_crops(*data["train"])
  not_converged = 0

  def fit(x, y, c):
    nonlocal not_converged
    scaler = StandardScaler().fit(x)
    model = LogisticRegression(C=c, max_iter=options.logistic_max_iter, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always", ConvergenceWarning)
      model.fit(scaler.transform(x), y)
    not_converged += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    return scaler, model

  def logits(scaler, model, x3):
    n, k = x3.shape[:2]
    flat = np.asarray(x3, np.float64).reshape(n * k, -1)
    return model.predict_log_proba(scaler.transform(flat)).reshape(n, k, -1), model.classes_

  def scored(scaler, model, split):
    lp, classes = logits(scaler, model, data[split][0])
    if not np.all(np.isfinite(lp)):
      lp = np.nan_to_num(lp, neginf=-1e30)
    pred = classes[np.argmax(crop_average(lp), axis=-1)]
    return balanced_accuracy(data[split][1], pred)

  val_scores = []
  for c in options.logistic_cs:
    scaler, model = fit(x_tr, y_tr, c)
    val_scores.append(scored(scaler, model, "val"))
  best = int(np.argmax(val_scores))
  best_c = options.logistic_cs[best]
  if options.logistic_refit_on_val:
    x_va, y_va, _ = _flatten_crops(*data["val"])
    scaler, model = fit(np.concatenate([x_tr, x_va]), np.concatenate([y_tr, y_va]), best_c)
  else:
    scaler, model = fit(x_tr, y_tr, best_c)
  return ProbeResult(
    test=scored(scaler, model, "test"),
    val=float(val_scores[best]),
    chosen={"C": float(best_c)},
    notes={"val_by_C": [float(v) for v in val_scores], "not_converged": int(not_converged)},
  )


PROTOCOLS: dict[str, Callable[..., ProbeResult]] = {
  "linear": linear_probe,
  "logistic": logistic_probe,
  "attentive": attentive_probe,
  "mlp": mlp_probe,
}


# -----------------------------------------------------------------------------------------
# The benchmark: rows x protocols x repeated subject splits.
# -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class FeatureRow:
  """One table row: vectors (n, K, F), tokens ((n, K, N, D), (n, K, N)), or n/a + why."""

  name: str
  kind: str  # "vector" | "tokens"
  data: Any = None
  na_reason: str | None = None


def _select(x, idx: np.ndarray):
  return jax.tree.map(lambda a: np.asarray(a)[idx], x)


def run_benchmark(
  rows: Sequence[FeatureRow],
  labels: np.ndarray,
  subjects: np.ndarray,
  *,
  protocols: Sequence[str],
  repeats: int = 3,
  seed: int = 0,
  val_fraction: float = 0.2,
  test_fraction: float = 0.2,
  train_subjects: int | None = None,
  options: ProbeOptions = ProbeOptions(),
  log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
  """Every (row, protocol) on the same `repeats` subject splits (seeds seed..seed+R-1).

  Returns {"rows": {row: {protocol: {"mean", "sd", "test", "val", "chosen"} | {"na": why}}},
  "splits": [{"seed", "subjects": {split: ids}, "examples": {split: count}}], "chance",
  "num_classes", "classes"}. sd is the population sd over repeats (np.std, as Semantoks).
  train_subjects: every probe trains on that many training subjects (subject_splits), and
  the logistic probe does not refit on train + val.
  """
  unknown = [p for p in protocols if p not in PROTOCOLS]
  if unknown:
    raise KeyError(f"unknown protocols {unknown}; known: {sorted(PROTOCOLS)}")
  if train_subjects is not None:  # val selects; it must not join the few training subjects
    options = dataclasses.replace(options, logistic_refit_on_val=False)
  labels = np.asarray(labels)
  classes = np.unique(labels)
  y = np.searchsorted(classes, labels).astype(np.int32)
  num_classes = len(classes)
  if num_classes < 2:
    raise ValueError(f"probes: need at least 2 classes in the labels, found {classes.tolist()}")
  splits = []
  for r in range(repeats):
    s = subject_splits(
      subjects, seed + r, val_fraction=val_fraction, test_fraction=test_fraction,
      labels=labels, train_subjects=train_subjects,
    )  # fmt: skip
    idx = split_indices(subjects, s)
    splits.append({"seed": seed + r, "subjects": s, "indices": idx})
  # Every split's training set fits in the largest one: one compilation per row shape.
  crops = {int(np.shape(jax.tree.leaves(r.data)[0])[1]) for r in rows if r.data is not None}
  capacity = max(len(s["indices"]["train"]) for s in splits) * max(crops | {1})
  out_rows: dict[str, dict[str, Any]] = {}
  for row in rows:
    cells: dict[str, Any] = {}
    for protocol in protocols:
      if row.na_reason is not None:
        cells[protocol] = {"na": row.na_reason}
        continue
      if PROTOCOL_INPUT[protocol] != row.kind:
        why = (
          "needs per-token features (see the tokens row)"
          if row.kind == "vector"
          else "takes vectors (see the cls/mean rows)"
        )
        cells[protocol] = {"na": why}
        continue
      tests, vals, chosen, notes = [], [], [], []
      start = time.perf_counter()
      for split in splits:
        data = {k: (_select(row.data, i), y[i]) for k, i in split["indices"].items()}
        res = PROTOCOLS[protocol](data, num_classes, split["seed"], options, capacity)
        tests.append(res.test)
        vals.append(res.val)
        chosen.append(res.chosen)
        notes.append(res.notes)
      cells[protocol] = {
        "mean": float(np.mean(tests)),
        "sd": float(np.std(tests)),
        "test": [float(t) for t in tests],
        "val": [float(v) for v in vals],
        "chosen": chosen,
        "notes": notes,
      }
      if log is not None:
        log(
          f"[boldjax.evaluate] {row.name:>18s} {protocol:<9s} balanced accuracy "
          f"{np.mean(tests):.3f} +- {np.std(tests):.3f} ({time.perf_counter() - start:.1f}s)"
        )
    out_rows[row.name] = cells
  return {
    "rows": out_rows,
    "splits": [
      {
        "seed": s["seed"],
        "subjects": {k: np.asarray(v).tolist() for k, v in s["subjects"].items()},
        "examples": {k: int(len(v)) for k, v in s["indices"].items()},
      }
      for s in splits
    ],
    "chance": 1.0 / num_classes,
    "num_classes": num_classes,
    "classes": classes.tolist(),
  }
