"""Brain-Semantoks network-token self-distillation (SimDINO) with an EMA teacher.

State: params = the student {"encoder", "head"}; TrainState.extra = {"teacher": an EMA copy of
the student params, "buffers": the encoder's frozen SLConv kernel norms (shared by student
and teacher: both are fixed from the same initial kernels), "step": the last optimizer step
(the network-loss weight and the EMA momentum are functions of it)}.

Step (SimDINOModel.forward): both views of the batch through the student (token masks applied
on a random `mask_frequency` of the training batches, as the original's per-batch draw) and
through the teacher (never masked, no gradient); the shared head on the CLS tokens, on the
per-network time-averaged tokens and on the masked patch tokens (static shapes: the tokens
are sorted masked-first and the heads run on the chunks that hold masked ones,
simdino_objectives.masked_cosine_loss_on_masked_rows); losses from
tasks/simdino_objectives.simdino_losses. After the optimizer step, update_extra moves the
teacher by the original's cosine momentum schedule (pre-increment step).

Batches (data mode "views"): views (B, 2, R, L), masks (B, 2, N, P), valid (eval).
Networks listed in the dataset meta 'missing_networks' (an atlas the data lacks) have their
tokens replaced by the mask embedding in both models, and leave the masked-token loss.
Evaluation batches always apply the masks, so val/mask_loss is measured on every eval.

Collapse monitors (every train log and eval): teacher_feature_std = mean over dimensions of
the std across the batch of the L2-normalised teacher CLS head output (collapse -> 0;
uniform on the sphere -> 1/sqrt(p)), and effective_rank = the participation ratio of the
covariance spectrum of the teacher CLS embeddings (collapse -> 1).

features() runs the teacher (the original probes the teacher) on views-mode batches or on
sequence batches (bold (B, T, R), t_sec, mask: the decode-mode examples the sequence models
take), which it resamples to data.views_tr and cuts into task.probe_crops crops of L frames
(zero-padded when shorter, as the original's probe): 'cls' (B, K, 2D) = cls_avg per crop,
'tokens' (B, N*P, D) and 'token_mask' of the first crop.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from boldjax import registry
from boldjax.cli import InputError
from boldjax.models import semantoks
from boldjax.tasks import simdino_objectives as objectives
from boldjax.tasks.base import PyTree, Task, graft_pretrained, pretrained_extra, row_weights


def effective_rank(x: jax.Array, weights: jax.Array) -> jax.Array:
  """Participation ratio (sum l)^2 / sum l^2 of the eigenvalues l of the weighted covariance
  of the rows of x (m, d): 1 when collapsed to a line, d when isotropic.

  Computed from traces (tr C = sum l, ||C||_F^2 = sum l^2), without an eigen/SVD call: jaxlib's
  CPU LAPACK kernels can deadlock on a 2-thread pool when two run at once (see
  simdino_objectives._half_logdets).
  """
  w = weights[:, None]
  n = jnp.maximum(jnp.sum(w), 1.0)
  mean = jnp.sum(x * w, axis=0) / n
  xc = (x - mean) * jnp.sqrt(w)
  gram = xc @ xc.T / n  # (m, m): same non-zero eigenvalues as the covariance
  return jnp.trace(gram) ** 2 / jnp.maximum(jnp.sum(gram * gram), 1e-30)


def weighted_feature_std(x: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean over dimensions of the std across (weighted) rows."""
  w = weights[:, None]
  n = jnp.maximum(jnp.sum(w), 1.0)
  mean = jnp.sum(x * w, axis=0) / n
  return jnp.mean(jnp.sqrt(jnp.sum(w * (x - mean) ** 2, axis=0) / n))


@registry.register("task", "dino")
class DinoTask(Task):
  name = "dino"

  def __init__(self, config: Any, info: Any):
    super().__init__(config, info)
    m, d, t = config.model, config.data, config.task
    self.network_rois = semantoks.network_rois_from_map(np.asarray(info.networks, np.int64))
    self.num_networks = len(self.network_rois)
    self.crop_length, self.patch_size = int(d.crop_length), int(d.patch_size)
    self.num_patches = self.crop_length // self.patch_size
    if self.num_patches < 1:
      raise ValueError(
        f"config.data.crop_length={self.crop_length} is shorter than one patch "
        f"(config.data.patch_size={self.patch_size})"
      )
    self.views_tr = d.get("views_tr", None)
    branches = semantoks.branches_from_config(
      [dict(b) for b in m.tokenizer], source="config.model.tokenizer"
    )
    # Networks of atlases the dataset lacks (Semantoks HDF5 without tian3 / buckner7): the
    # encoder masks their tokens after the tokenizer, student and teacher alike.
    meta = getattr(info, "meta", None) or {}
    self.absent_networks = tuple(int(n) for n in meta.get("missing_networks", ()))
    self.encoder = semantoks.SemantoksEncoder(
      network_rois=self.network_rois,
      branches=branches,
      embed_dim=int(m.embed_dim),
      depth=int(m.depth),
      num_heads=int(m.num_heads),
      mlp_dim=int(m.mlp_dim),
      patch_size=self.patch_size,
      num_patches=self.num_patches,
      layer_scale_init=m.get("layer_scale_init", 0.1),
      absent_networks=self.absent_networks,
      drop_path_rate=float(m.get("drop_path_rate", 0.0)),
      emb_dropout=float(m.get("emb_dropout", 0.0)),
    )
    self.head = semantoks.DinoHead(
      hidden_dim=int(m.head_hidden_dim),
      bottleneck_dim=int(m.head_bottleneck_dim),
      nlayers=int(m.head_nlayers),
    )
    self.mask_frequency = float(t.get("mask_frequency", 0.5))
    self.mask_loss_weight = float(t.get("mask_loss_weight", 0.5))
    self.eps = float(t.get("mcr_eps", 0.05))
    self.coeff = float(t.get("mcr_coeff", 1.0))
    self.probe_crops = int(t.get("probe_crops", 8))
    total = int(config.total_steps)
    self.momentum = lambda s: objectives.teacher_momentum(
      s, base_momentum=float(t.get("teacher_momentum", 0.99)), total_steps=total
    )
    self.network_weight = lambda s: objectives.network_loss_weight(
      s,
      weight=float(t.get("network_loss_weight", 0.5)),
      delay_steps=int(t.get("network_loss_delay_steps", 0)),
      decay_steps=int(t.get("network_loss_decay_steps", 0)),
      schedule=str(t.get("network_loss_schedule", "cosine")),
    )

  # ----------------------------------------------------------------------------- state

  def init(self, rng: jax.Array, batch: dict[str, Any]) -> tuple[PyTree, PyTree]:
    views = self._views(batch)
    variables = semantoks.init_simdino(rng, self.encoder, self.head, views[:, 0])
    params = variables["params"]
    extra = {
      "teacher": params,  # the original deep-copies the student at step 0
      "buffers": variables["buffers"],
      "step": jnp.zeros((), jnp.int32),
    }
    return params, extra

  def load_pretrained_extra(self, params: PyTree, extra: PyTree) -> PyTree:
    """With task.init_from: the pretrained run's EMA teacher and tokenizer buffers."""
    init_from = self.config.task.get("init_from", "")
    if not init_from:
      return extra
    old = pretrained_extra(init_from)
    missing = [k for k in ("teacher", "buffers") if k not in old]
    if missing:
      raise InputError(
        f"config.task.init_from: {init_from}: expected a Semantoks DINO run (extra holds "
        f"'teacher' and 'buffers'), found extra keys {sorted(old)}"
      )
    grafted = {
      key: graft_pretrained(extra[key], init_from, pretrained=old[key], source=f"{init_from} {key}")
      for key in ("teacher", "buffers")
    }
    return {**extra, **grafted}

  def update_extra(self, params: PyTree, extra: PyTree, step: jax.Array) -> PyTree:
    """EMA of the student into the teacher with the momentum of the step just taken."""
    m = self.momentum(step - 1).astype(jnp.float32)
    teacher = jax.tree.map(lambda t, s: m * t + (1.0 - m) * s, extra["teacher"], params)
    return {**extra, "teacher": teacher, "step": jnp.asarray(step, jnp.int32)}

  # ----------------------------------------------------------------------------- model

  def _views(self, batch: dict[str, Any]) -> jax.Array:
    views = batch["views"]
    R = int(self.info.num_parcels)
    if views.ndim != 4 or views.shape[1] != 2 or views.shape[2] != R:
      raise ValueError(
        f"dino batch['views']: expected (B, 2, {R}, {self.crop_length}) (data mode 'views', "
        f"info.num_parcels), found {tuple(views.shape)}"
      )
    return jnp.asarray(views, jnp.float32)

  def _encode(self, params, buffers, x, mask, *, train: bool, rng=None):
    return self.encoder.apply(
      {"params": params["encoder"], "buffers": buffers["encoder"]},
      x,
      mask,
      deterministic=not train,
      rngs={"dropout": rng} if train and rng is not None else None,
    )

  def _heads(self, params, tokens: jax.Array) -> dict[str, jax.Array]:
    """The head on the CLS and the per-network mean tokens (the patch tokens' heads run in
    objectives.masked_cosine_loss_on_masked_rows, on the masked ones)."""
    parts = semantoks.split_tokens(tokens, self.num_networks, self.num_patches)
    head = lambda x: self.head.apply({"params": params["head"]}, x)
    return {"cls": head(parts["cls"]), "net": head(parts["net"])}

  def loss(
    self,
    params: PyTree,
    extra: PyTree,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    train: bool = True,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    views = self._views(batch)
    B = views.shape[0]
    masks = jnp.asarray(batch["masks"]).astype(bool)  # (B, 2, N, P)
    rng_mask, rng_drop = jax.random.split(rng)
    use_mask = jax.random.uniform(rng_mask) < self.mask_frequency if train else jnp.array(True)
    masks = masks & use_mask  # an all-False mask is exactly the unmasked forward
    if self.absent_networks:  # always masked (both models): no masked-token loss on them
      present = np.ones((self.num_networks, 1), bool)
      present[list(self.absent_networks)] = False
      masks = masks & jnp.asarray(present)
    # Both views in one call: rows [view 0 of every sample, view 1 of every sample].
    x = jnp.concatenate([views[:, 0], views[:, 1]], axis=0)
    m = jnp.concatenate([masks[:, 0], masks[:, 1]], axis=0)
    student = self._encode(params, extra["buffers"], x, m, train=train, rng=rng_drop)
    teacher = self._encode(extra["teacher"], extra["buffers"], x, None, train=False)
    teacher = jax.lax.stop_gradient(teacher)
    weights = row_weights(batch, B)
    per_view = lambda h: h.reshape(2, B, *h.shape[1:])
    view_masks = jnp.stack([masks[:, 0], masks[:, 1]])  # (2, B, N, P)
    s_heads = self._heads(params, student["tokens"])
    t_heads = jax.lax.stop_gradient(self._heads(extra["teacher"], teacher["tokens"]))
    mask_cos = None
    if self.mask_loss_weight != 0:
      # Heads on (about) the masked tokens only, as the original's x[mask] (issue #6).
      mask_cos = objectives.masked_cosine_loss_on_masked_rows(
        lambda r: self.head.apply({"params": params["head"]}, r),
        lambda r: jax.lax.stop_gradient(self.head.apply({"params": extra["teacher"]["head"]}, r)),
        per_view(student["tokens"][:, 1:]),
        per_view(teacher["tokens"][:, 1:]),
        view_masks.reshape(2, B, -1),
        row_weights=weights,
      )
    w_net = self.network_weight(extra["step"])
    losses = objectives.simdino_losses(
      {k: per_view(v) for k, v in s_heads.items()},
      {k: per_view(v) for k, v in t_heads.items()},
      view_masks,
      w_net,
      mask_loss_weight=self.mask_loss_weight,
      eps=self.eps,
      coeff=self.coeff,
      row_weights=weights,
      mask_cosine=mask_cos,
    )
    metrics = dict(losses)
    metrics["loss"] = losses["total_loss"]
    metrics["network_loss_weight"] = jnp.asarray(w_net, jnp.float32)
    metrics["mask_applied"] = use_mask.astype(jnp.float32)
    metrics["teacher_feature_std"] = weighted_feature_std(t_heads["cls"][:B], weights)
    metrics["effective_rank"] = effective_rank(teacher["cls"][:B], weights)
    return losses["total_loss"], metrics

  # ----------------------------------------------------------------------------- features

  def feature_params(self, params: PyTree, extra: PyTree) -> PyTree:
    """The teacher (what the original probes) with the buffers it needs."""
    del params
    return {"teacher": extra["teacher"], "buffers": extra["buffers"]}

  def features(self, params: PyTree, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """params: feature_params(...). cls (B, K, 2D): cls_avg of K crops; tokens of crop 0."""
    if "views" in batch:
      crops = self._views(batch)[:, :1]
    else:
      crops = self._crops(batch)
    B, K = crops.shape[:2]
    out = self._encode(
      params["teacher"],
      params["buffers"],
      crops.reshape(B * K, *crops.shape[2:]),
      None,
      train=False,
    )
    tokens = out["tokens"].reshape(B, K, *out["tokens"].shape[1:])
    return {
      "cls": out["cls_avg"].reshape(B, K, -1),
      "tokens": tokens[:, 0, 1:],
      "token_mask": jnp.ones(tokens.shape[:1] + (tokens.shape[2] - 1,), bool),
    }

  def _crops(self, batch: dict[str, jax.Array]) -> jax.Array:
    """Sequence batch -> (B, K, R, L): resampled to views_tr, K crops at linspace starts."""
    bold = jnp.asarray(batch["bold"], jnp.float32)  # (B, T, R), z-scored per run upstream
    B, T, R = bold.shape
    if R != int(self.info.num_parcels):
      raise ValueError(
        f"dino features batch['bold']: expected (B, T, {self.info.num_parcels}), found "
        f"{tuple(bold.shape)}"
      )
    length = jnp.sum(jnp.asarray(batch["mask"]).astype(jnp.int32), axis=1)  # (B,)
    tr = jnp.asarray(batch["tr"], jnp.float32).reshape(B)
    step = tr if self.views_tr is None else jnp.full((B,), float(self.views_tr), jnp.float32)
    # Resampled length (the pipeline's int(T * tr / views_tr)); crops start on its grid.
    n = jnp.floor(length * tr / step + 1e-6).astype(jnp.int32)
    L, K = self.crop_length, self.probe_crops
    frac = jnp.linspace(0.0, 1.0, K) if K > 1 else jnp.zeros((1,))
    starts = jnp.floor(frac[None] * jnp.maximum(n - L, 0)[:, None]).astype(jnp.int32)  # (B,K)
    j = starts[..., None] + jnp.arange(L)[None, None]  # (B, K, L) resampled frame index
    pos = j * (step / tr)[:, None, None]  # fractional source frame
    i0 = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, T - 1)
    i1 = jnp.clip(i0 + 1, 0, jnp.maximum(length - 1, 0)[:, None, None])
    f = (pos - jnp.floor(pos))[..., None]
    x = (1.0 - f) * _gather(bold, i0) + f * _gather(bold, i1)
    x = jnp.where((j < n[:, None, None])[..., None], x, 0.0)  # zero-pad short windows
    return jnp.swapaxes(x, 2, 3)  # (B, K, R, L)


def _gather(bold: jax.Array, idx: jax.Array) -> jax.Array:
  """bold (B, T, R), idx (B, K, L) -> (B, K, L, R)."""
  B, K, L = idx.shape
  rows = jnp.take_along_axis(bold, idx.reshape(B, K * L)[..., None], axis=1)
  return rows.reshape(B, K, L, bold.shape[-1])
