"""Evaluator of encoding models: held-out per-vertex R^2, a ridge baseline on the same cached
tokens, and (on the synthetic default) how well the planted answer is recovered.

R^2 per vertex is 1 - SS_res / SS_tot about the split's own mean (torchmetrics' R2Score per
output, as the seed reports). The baseline regresses each vertex on one layer's global
token (scikit-learn ridge, alpha and layer chosen per vertex on the validation split).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from boldjax import registry, sharding
from boldjax.data import pipeline_for

RIDGE_ALPHAS = (1e-1, 1.0, 1e1, 1e2, 1e3, 1e4, 1e5)


def r2_per_vertex(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
  """(n, N) predictions and targets -> (N,) R^2 (vertices with no variance give NaN)."""
  pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
  ss_res = np.sum((target - pred) ** 2, axis=0)
  ss_tot = np.sum((target - target.mean(0)) ** 2, axis=0)
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(ss_tot > 0, 1.0 - ss_res / ss_tot, np.nan)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  """Rank correlation; 0 when either side is constant (e.g. every vertex picked one layer)."""
  from scipy import stats

  if np.ptp(a) == 0 or np.ptp(b) == 0:
    return 0.0
  return float(stats.spearmanr(a, b).statistic)


def ridge_baseline(
  train: tuple[np.ndarray, np.ndarray],
  val: tuple[np.ndarray, np.ndarray],
  test: tuple[np.ndarray, np.ndarray],
  alphas: tuple[float, ...] = RIDGE_ALPHAS,
) -> dict[str, np.ndarray]:
  """Per-vertex ridge from single layers' global tokens.

  Each split is (global tokens (n, L, C), fmri (n, N)). Returns test R^2 (N,) of the
  (layer, alpha) with the best validation R^2 per vertex, and that layer and alpha.
  """
  from sklearn.linear_model import Ridge

  (g_tr, y_tr), (g_va, y_va), (g_te, y_te) = train, val, test
  num_layers, n_vertices = g_tr.shape[1], y_tr.shape[1]
  best_val = np.full(n_vertices, -np.inf)
  best_test = np.full(n_vertices, np.nan)
  best_layer = np.zeros(n_vertices, np.int64)
  best_alpha = np.zeros(n_vertices)
  for layer in range(num_layers):
    mu, sd = g_tr[:, layer].mean(0), g_tr[:, layer].std(0) + 1e-6
    x_tr, x_va, x_te = ((g[:, layer] - mu) / sd for g in (g_tr, g_va, g_te))
    for alpha in alphas:
      model = Ridge(alpha=alpha).fit(x_tr, y_tr)
      r2_val = r2_per_vertex(model.predict(x_va), y_va)
      better = np.nan_to_num(r2_val, nan=-np.inf) > best_val
      if better.any():
        r2_test = r2_per_vertex(model.predict(x_te), y_te)
        best_val[better] = r2_val[better]
        best_test[better] = r2_test[better]
        best_layer[better], best_alpha[better] = layer, alpha
  return {"r2": best_test, "layer": best_layer, "alpha": best_alpha}


def planted_recovery(selections: dict[str, np.ndarray], planted: dict[str, np.ndarray]) -> dict:
  """Agreement of the learned selections with the synthetic default's planted answer."""
  chosen = np.argmax(selections["sel_layer"], axis=-1)
  xy = selections["sel_space"]
  return {
    "layer_spearman": spearman(chosen, planted["layer"]),
    "layer_within1": float(np.mean(np.abs(chosen - planted["layer"]) <= 1)),
    "layer_exact": float(np.mean(chosen == planted["layer"])),
    "x_corr": float(np.corrcoef(xy[:, 0], planted["x"])[0, 1]),
    "y_corr": float(np.corrcoef(xy[:, 1], planted["y"])[0, 1]),
    "scale_corr": float(np.corrcoef(selections["sel_scale"][:, 0], planted["scale"])[0, 1]),
  }


def predict_split(task, params, extra, config, info, split: str, mesh, rules, predict=None):
  """(predictions (n, N), fmri (n, N)) over one split, padding rows dropped."""
  batch_size = config.data.eval_batch_size // jax.process_count()
  ds = pipeline_for(config.data).make_dataset(
    config.data, info, split=split, train=False, seed=config.seed, batch_size=batch_size,
    shard_index=jax.process_index(), shard_count=jax.process_count(),
  )  # fmt: skip
  if predict is None:
    predict = jax.jit(lambda p, b: task.features(p, b)["y"])
  preds, targets = [], []
  batch_sh = sharding.batch_sharding(mesh)
  feature_params = task.feature_params(params, extra)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for batch in ds:
      valid = np.asarray(batch["valid"])
      host = {k: v for k, v in batch.items() if k not in ("image_id",)}
      y = predict(feature_params, sharding.to_global(host, batch_sh))
      preds.append(np.asarray(jax.device_get(y))[valid])
      targets.append(np.asarray(batch["fmri"])[valid])
  return np.concatenate(preds), np.concatenate(targets)


def split_globals(info, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(global tokens (n, L, C) float32, fmri (n, N)) of a split, read from the cache."""
  from boldjax.data.encoding_pipeline import joined_split

  src = joined_split(info, split)
  rows = [src[i] for i in range(len(src))]  # one read per record
  return (
    np.stack([np.asarray(r["global"], np.float32) for r in rows]),
    np.stack([r["fmri"] for r in rows]),
  )


@registry.register("evaluator", "encoding")
class EncodingEvaluator:
  """Held-out R^2 (median, mean, fraction of the noise ceiling), the ridge baseline's, and
  the planted-answer recovery when the data has one."""

  def __init__(self, name: str, cfg: ml_collections.ConfigDict, *, task, info, config, mesh, rules):
    self.name = name
    self.every_steps = cfg.every_steps
    self.split = cfg.get("split", "test")
    self.baseline = bool(cfg.get("ridge_baseline", True))
    self._task, self._info, self._config = task, info, config
    self._mesh, self._rules = mesh, rules
    self._predict = jax.jit(lambda p, b: task.features(p, b)["y"])
    self._ridge: dict[str, float] | None = None

  def ridge(self) -> dict[str, float]:
    if self._ridge is None:
      data = [split_globals(self._info, s) for s in ("train", "val", self.split)]
      out = ridge_baseline(*data)
      self._ridge = {
        "ridge/r2_median": float(np.nanmedian(out["r2"])),
        "ridge/r2_mean": float(np.nanmean(out["r2"])),
      }
    return self._ridge

  def run(self, state, step: int) -> Iterator[tuple[str, float]]:
    del step
    info = self._info
    pred, target = predict_split(
      self._task, state.params, state.extra, self._config, info, self.split,
      self._mesh, self._rules, self._predict,
    )  # fmt: skip
    r2 = r2_per_vertex(pred, target)
    s = self.split
    yield f"{self.name}/{s}/r2_median", float(np.nanmedian(r2))
    yield f"{self.name}/{s}/r2_mean", float(np.nanmean(r2))
    if info.noise_ceiling is not None:
      frac = r2 / np.maximum(info.noise_ceiling, 1e-6)
      yield f"{self.name}/{s}/r2_frac_ceiling_median", float(np.nanmedian(frac))
    if self.baseline:
      for k, v in self.ridge().items():
        yield f"{self.name}/{k}", v
    if info.planted is not None:
      selections = self._task.selections(self._task.feature_params(state.params, state.extra))
      for k, v in planted_recovery(selections, info.planted).items():
        yield f"{self.name}/planted/{k}", v


def per_vertex_results(
  task, params, extra, config, info, split: str, mesh, rules
) -> dict[str, Any]:
  """Per-vertex R^2 and selections of a run (for maps and notebooks)."""
  pred, target = predict_split(task, params, extra, config, info, split, mesh, rules)
  out = {"r2": r2_per_vertex(pred, target)}
  out.update(task.selections(task.feature_params(params, extra)))
  return out
