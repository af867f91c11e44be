"""Brain Decodes Deep Nets encoding objective: FactorTopy on cached frozen-backbone tokens.

Batches: local (B, L, h, w, C) and global (B, L, C) tokens (bfloat16 / float16 / float32
from the token cache), fmri (B, N) float32, valid (B,) (eval padding). info: coords (N, 3),
num_layers, token_dim, grid, num_vertices.

Loss (the seed's PLModel.training_step): smooth-L1 (beta task.smooth_l1_beta) over the valid
rows and every vertex + reg * task.reg_weight * max(1 - step / task.reg_steps, 0). The loss
has no step argument, so TrainState.extra carries it: extra = {"step": the optimizer steps
taken (update_extra sets it after each step, like the DINO task), "pe": the (N, 6F)
position encoding of info.coords}. The encoding is a constant of the vertex set, computed
once on the host in float64; kept in extra it is checkpointed with the run and reaches the
jitted step as an argument rather than a 30 MB constant baked into every executable.

features() and selections() / readout_weights() take feature_params(params, extra) =
{"params", "pe"} (plain params work too: the encoding is then the host copy).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from boldjax import registry
from boldjax.cli import InputError
from boldjax.models.factortopy import FactorTopy, position_encoding, reg_decay, smooth_l1
from boldjax.tasks.base import PyTree, Task, row_weights


def r2_batch(pred: jax.Array, target: jax.Array, weights: jax.Array) -> jax.Array:
  """Mean over vertices of the batch R^2 over the weighted rows (for monitoring); vertices
  whose targets do not vary in the batch are left out (0 when none varies)."""
  w = weights[:, None]
  total = jnp.maximum(jnp.sum(weights), 1e-12)
  mean = jnp.sum(w * target, axis=0) / total
  ss_tot = jnp.sum(w * jnp.square(target - mean), axis=0)
  ss_res = jnp.sum(w * jnp.square(target - pred), axis=0)
  ok = ss_tot > 1e-12
  r2 = jnp.where(ok, 1.0 - ss_res / jnp.where(ok, ss_tot, 1.0), 0.0)
  return jnp.sum(r2) / jnp.maximum(jnp.sum(ok), 1)


@registry.register("task", "encoding")
class EncodingTask(Task):
  name = "encoding"

  def __init__(self, config: Any, info: Any):
    super().__init__(config, info)
    t = config.task
    where = getattr(info, "path", "the encoding data")
    coords = np.asarray(info.coords)
    if coords.ndim != 2 or coords.shape[1] != 3:
      raise InputError(f"{where}: info.coords: expected shape (N, 3), found {coords.shape}")
    self.num_freqs = int(t.get("num_freqs", 32))
    try:
      self.pe = position_encoding(coords, self.num_freqs)
    except ValueError as e:
      raise InputError(f"{where}: info.{e}") from e
    self.model = FactorTopy(
      num_vertices=int(coords.shape[0]),
      num_layers=int(info.num_layers),
      token_dim=int(info.token_dim),
      bottleneck=int(t.get("bottleneck", 128)),
      hidden=int(t.get("hidden", 128)),
      num_freqs=self.num_freqs,
    )
    self.reg_weight = float(t.get("reg_weight", 0.1))
    self.reg_steps = int(t.get("reg_steps", 2000))
    self.beta = float(t.get("smooth_l1_beta", 0.1))
    if self.reg_steps <= 0:
      raise InputError(
        f"config.task.reg_steps: expected a positive integer, found {self.reg_steps}"
      )
    if self.beta < 0:
      raise InputError(f"config.task.smooth_l1_beta: expected >= 0, found {self.beta}")

  # ----------------------------------------------------------------------------- state

  def _tokens(self, batch: dict[str, Any]) -> tuple[jax.Array, jax.Array]:
    local, glob = batch["local"], batch["global"]
    m, (h, w) = self.model, tuple(self.info.grid)
    want = (m.num_layers, h, w, m.token_dim)
    if tuple(local.shape[1:]) != want or tuple(glob.shape[1:]) != (m.num_layers, m.token_dim):
      raise ValueError(
        f"encoding batch: expected local (B, {', '.join(map(str, want))}) and global "
        f"(B, {m.num_layers}, {m.token_dim}) (info.num_layers, grid, token_dim), found "
        f"{tuple(local.shape)} and {tuple(glob.shape)}"
      )
    return local, glob

  def init(self, rng: jax.Array, batch: dict[str, Any]) -> tuple[PyTree, PyTree]:
    local, glob = self._tokens(batch)
    pe = jnp.asarray(self.pe)
    params = self.model.init(rng, pe, local[:1], glob[:1])["params"]
    return params, {"step": jnp.zeros((), jnp.int32), "pe": pe}

  def update_extra(self, params: PyTree, extra: PyTree, step: jax.Array) -> PyTree:
    """The regulariser's decay reads the optimizer steps taken so far (the seed's
    global_step at the next training_step)."""
    del params
    return {**extra, "step": jnp.asarray(step, jnp.int32)}

  # ----------------------------------------------------------------------------- objective

  def loss(
    self,
    params: PyTree,
    extra: PyTree,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    train: bool = True,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    del rng, train  # deterministic model
    local, glob = self._tokens(batch)
    out = self.model.apply({"params": params}, extra["pe"], local, glob)
    target = jnp.asarray(batch["fmri"], jnp.float32)
    weights = row_weights(batch, target.shape[0])
    sl1 = smooth_l1(out["y"], target, self.beta, weights)
    reg = out["reg"]
    reg_scale = jnp.float32(self.reg_weight) * reg_decay(extra["step"], self.reg_steps)
    loss = sl1 + reg * reg_scale  # XLA may fuse this multiply-add (one rounding, not two)
    metrics = {
      "loss": loss,
      "smooth_l1": sl1,
      "reg": reg,
      "reg_weight": reg_scale,
      "r2": r2_batch(out["y"], target, weights),
    }
    return loss, metrics

  # ----------------------------------------------------------------------------- outputs

  def feature_params(self, params: PyTree, extra: PyTree) -> PyTree:
    return {"params": params, "pe": extra["pe"]}

  def _split(self, params: PyTree) -> tuple[PyTree, jax.Array]:
    if isinstance(params, dict) and set(params) == {"params", "pe"}:
      return params["params"], params["pe"]
    return params, jnp.asarray(self.pe)

  def features(self, params: PyTree, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """y (B, N) predictions; sel_layer (B, N, L), sel_space (B, N, 2), sel_scale (B, N, 1):
    the per-vertex selections broadcast over the batch (they do not depend on the input)."""
    p, pe = self._split(params)
    local, glob = self._tokens(batch)
    out = self.model.apply({"params": p}, pe, local, glob)
    B = out["y"].shape[0]
    feats = {"y": out["y"]}
    for k in ("sel_layer", "sel_space", "sel_scale"):
      feats[k] = jnp.broadcast_to(out[k][None], (B, *out[k].shape))
    return feats

  def selections(self, params: PyTree) -> dict[str, np.ndarray]:
    """sel_space (N, 2) (x = width, y = height in (-1, 1)), sel_layer (N, L), sel_scale (N, 1)
    (the global token's weight), as host arrays for maps."""
    p, pe = self._split(params)
    out = self.model.apply({"params": p}, pe, method="selections")
    return {k: np.asarray(jax.device_get(v)) for k, v in out.items()}

  def readout_weights(self, params: PyTree) -> np.ndarray:
    """(N, bottleneck) per-vertex readout weights W (the seed clusters their channels)."""
    p, _ = self._split(params)
    return np.asarray(jax.device_get(p["weight"]))
