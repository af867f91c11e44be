"""Evaluator of fMRI-to-image decoding: how close held-out reconstructions are to the seen
images, next to baselines that anyone could fit on the same split.

Metrics (numpy; images (n, H, W, 3) in [-1, 1], reconstructions clipped to [-1, 1] first:
what a picture shows):
- pixel_corr: Pearson correlation per image over all pixels and channels, averaged.
- ssim: scikit-image SSIM per image (see `ssim` for the settings), averaged.
- twoway_<space>: two-way identification (Ozcelik & VanRullen 2023, Takagi & Nishimoto
  2023): over ordered pairs (i, j), i != j, of held-out images, is the reconstruction of i
  more correlated with image i than with image j? Chance 0.5. Spaces: pixels; the frozen
  VAE's latent (posterior mean of the image through the VAE encoder, reconstruction and
  truth alike); a vision backbone's global token when config.evals.<name>.backbone names
  weights (skipped, and said so, otherwise: random weights measure nothing).

Baselines on the same split (rows: one per image, betas averaged over its repeats, as the
eval pass gives them): ridge voxels -> pixels, ridge voxels -> VAE latent decoded by the
same frozen decoder, and the mean training image. Ridge is fitted on the train images with
the alpha of the best validation MSE in its target space (closed form through one SVD of
the voxels, equal to scikit-learn's Ridge with an intercept: tested).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from boldjax import registry, sharding
from boldjax.data import pipeline_for

RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-2, 6, 9))
METHODS = ("model", "ridge_latent", "ridge_pixels", "mean_image")
METRICS = ("pixel_corr", "ssim", "twoway_pixel", "twoway_latent", "twoway_backbone")
SSIM_SIGMA = 1.5

# --------------------------------------------------------------------------------- metrics


def _rows(x: np.ndarray) -> np.ndarray:
  """(n, ...) -> (n, D) float64, each row centred and scaled to unit norm (0 if constant)."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  x = x - x.mean(axis=1, keepdims=True)
  norm = np.linalg.norm(x, axis=1, keepdims=True)
  return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


def correlation_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(n, ...) and (m, ...) -> (n, m) Pearson correlations of the flattened rows (0 where a
  row is constant)."""
  return _rows(a) @ _rows(b).T


def pixel_correlation(recon: np.ndarray, truth: np.ndarray) -> np.ndarray:
  """(n,) Pearson correlation of each reconstruction with its image over all pixels."""
  return np.sum(_rows(recon) * _rows(truth), axis=1)


def ssim(recon: np.ndarray, truth: np.ndarray) -> np.ndarray:
  """(n,) SSIM of each reconstruction with its image (skimage structural_similarity).

  Settings: colour images (channel_axis=-1, SSIM averaged over channels), data_range 2.0
  (images in [-1, 1]), Gaussian window sigma 1.5 without the sample-covariance correction
  (Wang et al. 2004; Brain-Diffuser's settings, there on grey images). Images smaller than
  the 11-pixel Gaussian window get a uniform window of the largest odd size that fits.
  """
  from skimage.metrics import structural_similarity

  recon, truth = np.asarray(recon, np.float64), np.asarray(truth, np.float64)
  side = min(truth.shape[1:3])
  if side >= 11:
    kw = {"gaussian_weights": True, "sigma": SSIM_SIGMA, "use_sample_covariance": False}
  else:
    kw = {"win_size": max(3, side - (1 - side % 2))}
  return np.array(
    [
      structural_similarity(r, t, channel_axis=-1, data_range=2.0, **kw)
      for r, t in zip(recon, truth, strict=True)
    ]
  )


def two_way_identification(pred_feats: np.ndarray, true_feats: np.ndarray) -> float:
  """Fraction of ordered pairs (i, j), i != j, with corr(pred_i, true_i) > corr(pred_i,
  true_j) (Pearson over the flattened features; ties count half). Chance 0.5."""
  n = len(pred_feats)
  if n < 2:
    raise ValueError(f"two-way identification: expected at least 2 images, found {n}")
  c = correlation_matrix(pred_feats, true_feats)
  own = np.diag(c)[:, None]
  wins = (own > c).astype(np.float64) + 0.5 * (own == c)
  off = ~np.eye(n, dtype=bool)
  return float(wins[off].mean())


# ----------------------------------------------------------------------------------- ridge


@dataclasses.dataclass
class RidgeFit:
  """Ridge from x to y (intercept included) at one alpha."""

  coef: np.ndarray  # (V, D)
  intercept: np.ndarray  # (D,)
  alpha: float
  val_mse: dict[float, float]  # validation MSE per alpha tried

  def predict(self, x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32) @ self.coef + self.intercept


def fit_ridge(
  x_train: np.ndarray,
  y_train: np.ndarray,
  x_val: np.ndarray,
  y_val: np.ndarray,
  alphas: tuple[float, ...] = RIDGE_ALPHAS,
) -> RidgeFit:
  """Multi-output ridge (sklearn Ridge(alpha, fit_intercept=True) for each alpha) with the
  alpha of the lowest validation MSE.

  One eigendecomposition of the smaller Gram matrix of the centred x (voxels x voxels, or
  images x images when there are fewer images) serves every alpha; the products with the
  targets (n x D, D = pixels) run once, in float32.
  """
  x = np.asarray(x_train, np.float64)
  y = np.asarray(y_train, np.float32).reshape(len(y_train), -1)
  x_mean, y_mean = x.mean(0), y.mean(0, dtype=np.float64)
  xc, yc = x - x_mean, y - y_mean.astype(np.float32)
  xv = np.asarray(x_val, np.float64) - x_mean
  primal = xc.shape[1] <= xc.shape[0]
  lam, vec = np.linalg.eigh(xc.T @ xc if primal else xc @ xc.T)
  lam = np.maximum(lam, 0.0)
  if primal:  # coef = V diag(1 / (lam + alpha)) V^T X^T Y
    back = vec
    proj = (xv @ vec).astype(np.float32)
    q = vec.T.astype(np.float32) @ (xc.T.astype(np.float32) @ yc)
  else:  # coef = X^T U diag(1 / (lam + alpha)) U^T Y
    back = xc.T @ vec
    proj = (xv @ back).astype(np.float32)
    q = vec.T.astype(np.float32) @ yc
  yv = (np.asarray(y_val, np.float64).reshape(len(y_val), -1) - y_mean).astype(np.float32)
  val_mse = {}
  for alpha in alphas:
    f = (1.0 / (lam + alpha)).astype(np.float32)
    val_mse[float(alpha)] = float(np.mean(np.square((proj * f) @ q - yv)))
  best = min(val_mse, key=val_mse.get)
  coef = (back / (lam + best)).astype(np.float32) @ q
  intercept = y_mean - x_mean @ coef.astype(np.float64)
  return RidgeFit(coef.astype(np.float32), intercept.astype(np.float32), best, val_mse)


# ------------------------------------------------------------------------------ the data


@dataclasses.dataclass
class SplitData:
  """One pass over a split (padding rows dropped): fmri (n, V), image (n, H, W, 3) in
  [-1, 1], image_id (n,), and the model's reconstructions (n, H, W, 3) when asked."""

  fmri: np.ndarray
  image: np.ndarray
  image_id: np.ndarray
  recon: np.ndarray | None = None


def collect_split(
  config: Any, info: Any, split: str, *, predict: Callable | None = None, params: Any = None,
  mesh: Any = None, rules: Any = (),
) -> SplitData:  # fmt: skip
  """The eval pass of a split (one row per image, betas averaged over its repeats);
  predict(params, global batch) -> recon runs on each batch when given."""
  batch_size = int(config.data.eval_batch_size) // jax.process_count()
  ds = pipeline_for(config.data).make_dataset(
    config.data, info, split=split, train=False, seed=config.seed, batch_size=batch_size,
    shard_index=jax.process_index(), shard_count=jax.process_count(),
  )  # fmt: skip
  parts: dict[str, list[np.ndarray]] = {"fmri": [], "image": [], "image_id": [], "recon": []}
  batch_sh = sharding.batch_sharding(mesh) if predict is not None else None
  with (
    jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext(),
    nn.logical_axis_rules(rules),
  ):
    for batch in ds:
      valid = np.asarray(batch["valid"]).astype(bool)
      for k in ("fmri", "image", "image_id"):
        parts[k].append(np.asarray(batch[k])[valid])
      if predict is not None:
        host = {k: v for k, v in batch.items() if k != "image_id"}
        recon = predict(params, sharding.to_global(host, batch_sh))
        parts["recon"].append(np.asarray(jax.device_get(recon), np.float32)[valid])
  if not parts["fmri"]:
    raise ValueError(
      f"{getattr(info, 'path', 'data')}: split {split!r}: expected images, found none"
    )
  out = {k: np.concatenate(v) for k, v in parts.items() if v}
  return SplitData(
    out["fmri"].astype(np.float32), out["image"].astype(np.float32), out["image_id"],
    out.get("recon"),
  )  # fmt: skip


def batched(fn: Callable, x: np.ndarray, batch_size: int) -> np.ndarray:
  """fn over x in fixed-size chunks (the last one padded: one compilation)."""
  outs = []
  for i in range(0, len(x), batch_size):
    chunk = x[i : i + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
    outs.append(np.asarray(jax.device_get(fn(chunk)), np.float32)[: batch_size - pad])
  return np.concatenate(outs)


# ---------------------------------------------------------------------- feature spaces


class VaeSpace:
  """The frozen VAE of an fmri2img task: images -> posterior mean, latents -> images.

  Uses task.encode_images(extra, images) / task.decode_latents(extra, z) (unscaled
  latents), jitted and run in fixed-size chunks."""

  def __init__(self, task: Any, extra: Any, batch_size: int = 32):
    self.batch_size = batch_size
    self._extra = extra
    self._encode = jax.jit(task.encode_images)
    self._decode = jax.jit(task.decode_latents)

  def encode(self, images: np.ndarray) -> np.ndarray:
    return batched(lambda x: self._encode(self._extra, x), images, self.batch_size)

  def decode(self, z: np.ndarray) -> np.ndarray:
    return batched(lambda x: self._decode(self._extra, x), z, self.batch_size)


class BackboneSpace:
  """A vision backbone's global token (one layer) of images in [-1, 1]: resized to the
  backbone's input size, normalised with the given mean/std (ImageNet's by default)."""

  def __init__(self, bcfg: Any, batch_size: int = 32):
    from boldjax.data import backbones, token_cache
    from boldjax.data.paths import setting
    from boldjax.models import vit

    self.backbone = backbones.load(bcfg)
    self.batch_size = batch_size
    self.layer = int(setting(bcfg, "layer", -1))
    mean = jnp.asarray(setting(bcfg, "mean", token_cache.IMAGENET_MEAN), jnp.float32)
    std = jnp.asarray(setting(bcfg, "std", token_cache.IMAGENET_STD), jnp.float32)
    cfg, size = self.backbone.config, self.backbone.image_size

    @jax.jit
    def features(params, images):
      x = (images + 1.0) / 2.0
      if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, 3), "bilinear")
      _, glob = vit.get_tokens(params, (x - mean) / std, cfg)
      return glob[:, self.layer]

    self._features = features

  def __call__(self, images: np.ndarray) -> np.ndarray:
    return batched(lambda x: self._features(self.backbone.params, x), images, self.batch_size)


def backbone_wanted(bcfg: Any, where: str = "config.evals.reconstruction.backbone") -> str:
  """'' when a backbone space should be measured, else why it is skipped (random weights
  only with allow_random, for tests: they measure nothing)."""
  from boldjax.cli import InputError
  from boldjax.data.paths import setting

  name = str(setting(bcfg, "name", "") or "") if bcfg else ""
  weights = str(setting(bcfg, "weights", "") or "") if bcfg else ""
  if not name and not weights:
    return f"no backbone configured ({where}.name and .weights)"
  if not name:
    raise InputError(
      f"{where}.name: expected the ViT preset of the weights {weights!r} (e.g. clip_b16), found ''"
    )
  if not weights and not bool(setting(bcfg, "allow_random", False)):
    return f"no backbone weights ({where}.weights)"
  return ""


def default_config(every_steps: int, split: str = "test") -> ml_collections.ConfigDict:
  """config.evals.<name> of a reconstruction evaluator, every field overridable from the
  command line (backbone: config.data.backbone's fields plus layer, mean, std)."""
  from boldjax.data import backbones, token_cache

  c = ml_collections.ConfigDict(
    {
      "type": "reconstruction",
      "split": split,
      "every_steps": every_steps,
      "baselines": True,
      "ridge_alphas": RIDGE_ALPHAS,
      "backbone": {
        "name": "",  # a models/vit.py preset (clip_b16, ...): with weights, else skipped
        "weights": "",  # open_clip / timm .safetensors or .npz
        "allow_pickle": False,
        "image_size": 0,  # 0: the preset's
        "layer": -1,  # whose global token (class token, or mean patch token)
        "mean": token_cache.IMAGENET_MEAN,
        "std": token_cache.IMAGENET_STD,
        "seed": 0,
        "init": "model",
        "allow_random": False,  # tests only: random weights measure nothing
      },
    }
  )
  c.backbone.arch = backbones.arch_config()
  return c


# ------------------------------------------------------------------------------ scoring


def clip(images: np.ndarray) -> np.ndarray:
  return np.clip(np.asarray(images, np.float32), -1.0, 1.0)


def score(
  recon: np.ndarray,
  truth: np.ndarray,
  *,
  truth_latent: np.ndarray | None = None,
  encode: Callable | None = None,
  truth_backbone: np.ndarray | None = None,
  backbone: Callable | None = None,
) -> dict[str, float]:
  """The metrics of reconstructions (n, H, W, 3) against the images, in every space given."""
  recon = clip(recon)
  out = {
    "pixel_corr": float(np.mean(pixel_correlation(recon, truth))),
    "ssim": float(np.mean(ssim(recon, truth))),
    "twoway_pixel": two_way_identification(recon, truth),
  }
  if encode is not None and truth_latent is not None:
    out["twoway_latent"] = two_way_identification(encode(recon), truth_latent)
  if backbone is not None and truth_backbone is not None:
    out["twoway_backbone"] = two_way_identification(backbone(recon), truth_backbone)
  return out


@dataclasses.dataclass
class Baselines:
  """Held-out reconstructions of the baselines, and the alphas ridge chose."""

  recon: dict[str, np.ndarray]
  alphas: dict[str, float]


def fit_baselines(
  train: SplitData, val: SplitData, test: SplitData, vae: VaeSpace | None,
  alphas: tuple[float, ...] = RIDGE_ALPHAS,
) -> Baselines:  # fmt: skip
  """ridge_pixels, ridge_latent (when a VAE is given) and mean_image on the test rows."""
  shape = test.image.shape[1:]
  recon, chosen = {}, {}
  if vae is not None:
    z_train, z_val = vae.encode(train.image), vae.encode(val.image)
    fit = fit_ridge(train.fmri, z_train, val.fmri, z_val, alphas)
    z_test = fit.predict(test.fmri).reshape(len(test.fmri), *z_train.shape[1:])
    recon["ridge_latent"], chosen["ridge_latent"] = vae.decode(z_test), fit.alpha
  fit = fit_ridge(train.fmri, train.image, val.fmri, val.image, alphas)
  recon["ridge_pixels"] = fit.predict(test.fmri).reshape(len(test.fmri), *shape)
  chosen["ridge_pixels"] = fit.alpha
  recon["mean_image"] = np.broadcast_to(train.image.mean(0), (len(test.fmri), *shape)).copy()
  return Baselines(recon, chosen)


@dataclasses.dataclass
class Results:
  """Everything the table and the gallery need."""

  split: str
  truth: np.ndarray  # (n, H, W, 3) in [-1, 1]
  image_id: np.ndarray
  recon: dict[str, np.ndarray]  # method -> (n, H, W, 3), clipped to [-1, 1]
  metrics: dict[str, dict[str, float]]  # method -> metric -> value
  alphas: dict[str, float]
  skipped: dict[str, str]  # metric -> why


class Reconstructor:
  """Model reconstructions and baselines of one run's held-out split; the baselines and
  the truth's features are computed once (they do not change while the model trains)."""

  def __init__(
    self, task: Any, config: Any, info: Any, mesh: Any, rules: Any, *, split: str = "test",
    backbone: Any = None, baselines: bool = True, alphas: tuple[float, ...] = RIDGE_ALPHAS,
    name: str = "reconstruction",
  ):  # fmt: skip
    self.task, self.config, self.info = task, config, info
    self.mesh, self.rules, self.split = mesh, rules, split
    self.with_baselines, self.alphas = baselines, tuple(alphas)
    self.backbone_cfg, self.name = backbone, name
    self._predict = jax.jit(lambda p, b: task.features(p, b)["recon"])
    self._fixed: dict[str, Any] | None = None

  def _prepare(self, extra: Any) -> dict[str, Any]:
    if self._fixed is not None:
      return self._fixed
    batch = int(self.config.data.eval_batch_size)
    vae = VaeSpace(self.task, extra, batch) if hasattr(self.task, "encode_images") else None
    skipped = {}
    if vae is None:
      skipped["twoway_latent"] = "the task has no encode_images (no frozen VAE)"
    why = backbone_wanted(self.backbone_cfg, f"config.evals.{self.name}.backbone")
    backbone = None if why else BackboneSpace(self.backbone_cfg, batch)
    if why:
      skipped["twoway_backbone"] = why
    test = collect_split(self.config, self.info, self.split)
    fixed = {
      "vae": vae, "backbone": backbone, "skipped": skipped, "test": test,
      "truth_latent": vae.encode(test.image) if vae else None,
      "truth_backbone": backbone(test.image) if backbone else None,
    }  # fmt: skip
    if self.with_baselines:
      train = collect_split(self.config, self.info, "train")
      val = collect_split(self.config, self.info, "val")
      base = fit_baselines(train, val, test, vae, self.alphas)
      fixed["baselines"] = base
      fixed["baseline_metrics"] = {m: self._score(fixed, r) for m, r in base.recon.items()}
    self._fixed = fixed
    return fixed

  def _score(self, fixed: dict[str, Any], recon: np.ndarray) -> dict[str, float]:
    vae, backbone = fixed["vae"], fixed["backbone"]
    return score(
      recon, fixed["test"].image,
      truth_latent=fixed["truth_latent"], encode=vae.encode if vae else None,
      truth_backbone=fixed["truth_backbone"], backbone=backbone,
    )  # fmt: skip

  def run(self, params: Any, extra: Any) -> Results:
    fixed = self._prepare(extra)
    fparams = self.task.feature_params(params, extra)
    data = collect_split(
      self.config, self.info, self.split, predict=self._predict, params=fparams,
      mesh=self.mesh, rules=self.rules,
    )  # fmt: skip
    test = fixed["test"]
    if not np.array_equal(data.image_id, test.image_id):
      raise RuntimeError(f"split {self.split!r}: the eval pass changed order between passes")
    recon = {"model": clip(data.recon)}
    metrics = {"model": self._score(fixed, data.recon)}
    alphas = {}
    if "baselines" in fixed:
      base = fixed["baselines"]
      recon.update({m: clip(r) for m, r in base.recon.items()})
      metrics.update(fixed["baseline_metrics"])
      alphas = dict(base.alphas)
    return Results(
      self.split, test.image, test.image_id, recon, metrics, alphas, dict(fixed["skipped"])
    )


def format_table(results: Results) -> str:
  """The metrics table: one row per method, one column per metric measured."""
  cols = [m for m in METRICS if any(m in v for v in results.metrics.values())]
  head = f"{'method':<14s}" + "".join(f"{c:>17s}" for c in cols)
  lines = [f"{results.split} split, {len(results.truth)} images (chance two-way 0.5)", head]
  for method in [m for m in METHODS if m in results.metrics]:
    vals = results.metrics[method]
    lines.append(
      f"{method:<14s}" + "".join(f"{vals[c]:>17.4f}" if c in vals else f"{'-':>17s}" for c in cols)
    )
  for metric, why in results.skipped.items():
    lines.append(f"{metric}: skipped ({why})")
  if results.alphas:
    lines.append("ridge alphas: " + ", ".join(f"{k} {v:g}" for k, v in results.alphas.items()))
  return "\n".join(lines)


def evaluator_settings(config: Any) -> tuple[str, Any]:
  """(name, settings) of the config.evals entry of type 'reconstruction' (("reconstruction",
  {}) when the run has none)."""
  for name, ev in config.get("evals", {}).items():
    if ev.get("type") == "reconstruction":
      return name, ev
  return "reconstruction", {}


def reconstructor_for(
  task: Any, config: Any, info: Any, mesh: Any, rules: Any, cfg: Any,
  split: str | None = None, name: str = "reconstruction",
) -> Reconstructor:  # fmt: skip
  """A Reconstructor from evaluator settings: split, backbone, baselines, ridge_alphas."""
  cfg = cfg or {}
  return Reconstructor(
    task, config, info, mesh, rules, split=split or cfg.get("split", "test"),
    backbone=cfg.get("backbone", None), baselines=bool(cfg.get("baselines", True)),
    alphas=tuple(cfg.get("ridge_alphas", None) or RIDGE_ALPHAS), name=name,
  )  # fmt: skip


@registry.register("evaluator", "reconstruction")
class ReconstructionEvaluator:
  """Held-out reconstruction metrics of the model and of each baseline:
  `<name>/<split>/<method>/<metric>` (methods in METHODS, metrics in METRICS)."""

  def __init__(self, name: str, cfg: ml_collections.ConfigDict, *, task, info, config, mesh, rules):
    self.name = name
    self.every_steps = cfg.every_steps
    self.reconstructor = reconstructor_for(task, config, info, mesh, rules, cfg, name=name)
    self._said_skipped = False

  def run(self, state, step: int) -> Iterator[tuple[str, float]]:
    del step
    res = self.reconstructor.run(state.params, state.extra)
    if res.skipped and not self._said_skipped:
      for metric, why in res.skipped.items():
        logging.warning("%s: %s skipped: %s", self.name, metric, why)
      self._said_skipped = True
    for method, vals in res.metrics.items():
      for metric, v in vals.items():
        yield f"{self.name}/{res.split}/{method}/{metric}", float(v)
