"""Probes on frozen features, pure functions of arrays: subject splits and protocols (the
heads they train are in evals/heads.py).

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
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from boldjax.evals.heads import (
  AttentiveHead,
  LinearHead,
  MlpHead,
  epoch_batches,
  flatten_crops,
  num_samples,
  pad_rows,
  predict_logits,
  stream_batches,
  train_heads,
)

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
# Protocols: fn(data, num_classes, seed, options) -> ProbeResult.
# data = {"train" | "val" | "test": (features, labels)}.
# -----------------------------------------------------------------------------------------


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
  x, y, _ = flatten_crops(*data["train"])
  keys = jax.random.split(jax.random.key(seed), len(lrs))
  params, state, last_loss = train_heads(
    head,
    optimizer,
    jnp.asarray(lrs, jnp.float32),
    jnp.float32(weight_decay),
    keys,
    jax.tree.map(jnp.asarray, pad_rows(x, capacity)),
    jnp.asarray(pad_rows(y, capacity), jnp.int32),
    jnp.asarray(batches),
  )
  val_logits = predict_logits(head, params, state, data["val"][0])
  val_scores = [score(val_logits[i], data["val"][1]) for i in range(len(lrs))]
  best = int(np.argmax(val_scores))
  best_params = jax.tree.map(lambda a: a[best : best + 1], params)
  best_state = jax.tree.map(lambda a: a[best : best + 1], state)
  test_logits = predict_logits(head, best_params, best_state, data["test"][0])[0]
  return ProbeResult(
    test=score(test_logits, data["test"][1]),
    val=float(val_scores[best]),
    chosen={"lr": float(lrs[best])},
    notes={
      "val_by_lr": [float(v) for v in val_scores],
      "diverged": int(sum(not np.isfinite(v) for v in np.asarray(last_loss))),
    },
  )


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
  m = num_samples(data["train"][0])
  capacity = max(m, capacity or m)
  batches = epoch_batches(
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
  m = num_samples(data["train"][0])
  capacity = max(m, capacity or m)
  batches = stream_batches(m, options.head_batch, options.head_steps, np.random.default_rng(seed))
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
  x_tr, y_tr, _ = flatten_crops(*data["train"])
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
    x_va, y_va, _ = flatten_crops(*data["val"])
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
