"""benchmarks/: analytic FLOP counts, and torch re-implementations that match boldjax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from benchmarks import flops as flops_lib
from boldjax import optim
from boldjax.models.lfb import LfbModel
from boldjax.models.patch_gpt import PatchGPT
from boldjax.tasks.csm import l1_rows
from boldjax.tasks.next_patch import categorical_loss, continuous_loss

B, N, PD, V = 3, 13, 24, 40


def _cost(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def _patch_gpt(categorical: bool = True, embed_dim: int = 32, depth: int = 2) -> PatchGPT:
  return PatchGPT(
    num_patches=N,
    patch_dim=PD,
    categorical=categorical,
    vocab_size=V,
    num_subjects=5,
    embed_dim=embed_dim,
    depth=depth,
    num_heads=2,
  )


def _patch_batch(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
    "patches": rng.standard_normal((B, N, PD)).astype(np.float32),
    "tokens": rng.integers(0, V, (B, N)).astype(np.int32),
    "order": np.stack([rng.permutation(N) for _ in range(B)]).astype(np.int32),
    "subject_id": rng.integers(0, 5, (B,)).astype(np.int32),
  }


def _perturbed(params, seed: int = 1):
  """Random non-trivial values everywhere (zero-initialised tokens / biases matter too)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda x: (np.asarray(x) + 0.3 * rng.standard_normal(x.shape)).astype(np.float32), params
  )


# ---------------------------------------------------------------------------------------
# FLOP counts.
# ---------------------------------------------------------------------------------------
def test_transformer_flops_by_hand():
  # batch 2, length 5, width 8, 3 layers, MLP 32: per token and layer q,k,v,out = 4*2*8*8
  # = 512, MLP = 2*2*8*32 = 1024; 10 tokens * 3 layers * 1536 = 46080. Attention:
  # 4 * 2 * 25 * 8 * 3 = 4800.
  count = flops_lib.transformer_blocks(2, 5, 8, 3, 32)
  assert count.matmul == 46080.0
  assert count.attention == 4800.0
  assert count.train_step == 3 * (46080.0 + 4800.0)


def test_patch_gpt_flops_by_hand():
  m = _patch_gpt(embed_dim=32, depth=2)
  c = flops_lib.patch_gpt(m, B)
  tokens, D = B * (N + 1), 32
  blocks = 2 * (4 * 2 * tokens * D * D + 2 * 2 * tokens * D * 4 * D)
  io = 2 * B * N * PD * D + 2 * B * N * D * V
  assert c.matmul == blocks + io
  assert c.attention == 4 * B * (N + 1) ** 2 * D * 2


def test_patch_gpt_flops_match_xla_cost_analysis():
  """XLA counts matmuls plus elementwise work: within [1, 1.12] of the analytic count."""
  m = PatchGPT(
    num_patches=31, patch_dim=48, vocab_size=64, num_subjects=4, embed_dim=128, depth=2,
    num_heads=2,
  )  # fmt: skip
  b = 4
  p, s = jnp.ones((b, 31, 48)), jnp.zeros((b,), jnp.int32)
  o = jnp.tile(jnp.arange(31), (b, 1))
  params = m.init(jax.random.key(0), p, s, o)
  analytic = flops_lib.patch_gpt(m, b)
  fwd = _cost(lambda v: m.apply(v, p, s, o), params)
  grad = _cost(jax.grad(lambda v: m.apply(v, p, s, o).sum()), params)
  assert 1.0 <= fwd / analytic.forward <= 1.12, fwd / analytic.forward
  assert 1.0 <= grad / analytic.train_step <= 1.12, grad / analytic.train_step


def test_csm_flops_by_hand():
  m = LfbModel(style="csm", in_dim=10, embed_dim=16, num_layers=2, num_heads=2)
  c = flops_lib.csm_gpt(m, 4, 7)
  t = 28
  assert c.matmul == 2 * (4 * 2 * t * 16 * 16 + 2 * 2 * t * 16 * 64) + 2 * 2 * t * 10 * 16
  assert c.attention == 4 * 4 * 49 * 16 * 2


def test_dense_flops_equal_xla():
  a, w = jnp.ones((96, 40)), jnp.ones((40, 24))
  assert _cost(jnp.dot, a, w) == flops_lib.dense(96, 40, 24)


# ---------------------------------------------------------------------------------------
# Torch re-implementations load boldjax weights and compute the same loss.
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("categorical", [True, False])
def test_torch_patch_gpt_same_loss(categorical):
  torch = pytest.importorskip("torch")
  from benchmarks import torch_patch_gpt

  m = _patch_gpt(categorical)
  batch = _patch_batch()
  params = jax.jit(m.init)(jax.random.key(0), batch["patches"], batch["subject_id"], batch["order"])
  params = _perturbed(params["params"])
  out = jax.jit(m.apply)({"params": params}, batch["patches"], batch["subject_id"], batch["order"])
  pmask = np.random.default_rng(3).random((N, PD)) > 0.3
  if categorical:
    want, _ = categorical_loss(out, batch["tokens"])
  else:
    want, _ = continuous_loss(out, batch["patches"], jnp.take(pmask, batch["order"], axis=0))
  net = torch_patch_gpt.from_boldjax(m, jax.device_get(params)).eval()
  tb = {k: torch.from_numpy(v).long() if v.dtype == np.int32 else torch.from_numpy(v)
        for k, v in batch.items()}  # fmt: skip
  with torch.no_grad():
    got = float(net.loss(tb, categorical, torch.from_numpy(pmask)))
  np.testing.assert_allclose(got, float(want), rtol=1e-5)


def test_torch_csm_same_loss():
  torch = pytest.importorskip("torch")
  from benchmarks import torch_lfb_gpt

  m = LfbModel(style="csm", in_dim=12, embed_dim=16, num_layers=2, num_heads=2, dropout=0.1)
  rng = np.random.default_rng(0)
  S = 9
  x = rng.standard_normal((B, S, 12)).astype(np.float32)
  t = (np.arange(S)[None] * 0.72 + rng.random((B, 1)) * 3).astype(np.float32)
  length = np.array([9, 5, 1], np.int32)
  i = np.array([4, 2, 1], np.int32)
  params = jax.jit(m.init)(jax.random.key(0), x, t, np.ones((B, S), bool))["params"]
  params = _perturbed(params)
  out = jax.jit(lambda p: m.apply({"params": p}, x, t, i, method="csm"))(params)
  target = jnp.take_along_axis(jnp.asarray(x), jnp.asarray(i)[:, None, None], axis=1)[:, 0]
  want = l1_rows(out["masked_predictions"], target, jnp.asarray(length >= 2, jnp.float32))
  net = torch_lfb_gpt.from_boldjax(m, jax.device_get(params)).eval()
  tb = {"bold": torch.from_numpy(x), "t_sec": torch.from_numpy(t),
        "length": torch.from_numpy(length).long()}  # fmt: skip
  with torch.no_grad():
    got = float(net.loss(tb, torch.from_numpy(i).long()))
  np.testing.assert_allclose(got, float(want), rtol=1e-5)


def test_torch_optimizer_step_equals_optax():
  """One clipped AdamW step with warmup lr and decay groups gives the same parameters."""
  torch = pytest.importorskip("torch")
  from benchmarks import run, torch_patch_gpt
  from boldjax.convert.boldgpt import params_to_torch

  cfg = ml_collections.ConfigDict(
    dict(lr=1e-2, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05, clip_norm=0.5,
         warmup_steps=4, warmup_init=0.1, min_lr_ratio=0.05, accum_steps=1,
         no_decay=("pos_embed", "sub_embed", "next_pos_query", "eos_query", "group_token"))
  )  # fmt: skip
  m = _patch_gpt(True)
  batch = _patch_batch()
  init = jax.jit(m.init)
  params = _perturbed(
    init(jax.random.key(0), batch["patches"], batch["subject_id"], batch["order"])["params"]
  )

  def loss(p):
    out = m.apply({"params": p}, batch["patches"], batch["subject_id"], batch["order"])
    return categorical_loss(out, batch["tokens"])[0]

  tx, _ = optim.make_optimizer(cfg, 20)

  @jax.jit
  def update(p):
    updates, _ = tx.update(jax.grad(loss)(p), tx.init(p), p)
    return updates

  updates = update(params)
  want = params_to_torch(jax.tree.map(lambda a, u: a + u, params, updates))

  net = torch_patch_gpt.from_boldjax(m, jax.device_get(params))
  opt, sched = run.torch_optimizer(net, cfg, 20)
  tb = {k: torch.from_numpy(v).long() if v.dtype == np.int32 else torch.from_numpy(v)
        for k, v in batch.items()}  # fmt: skip
  step = run._torch_step(net, lambda: net.loss(tb, True, None), opt, sched, cfg.clip_norm)
  step()
  got = {k: v.detach().numpy() for k, v in net.state_dict().items()}
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
