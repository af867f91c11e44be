"""Analytic FLOP counts of the benchmarked train steps, and the f32 matmul ceiling.

Convention (as in the PaLM / Chinchilla MFU accounting): a train step costs 3x its forward
(backward = 2x forward); the forward costs 2 * fan_in * fan_out per token for every weight
matmul, plus 4 * L^2 * D per attention layer and sequence (q k^T and weights @ v, the full
L x L square: XLA and torch both compute it whole under a causal mask). Elementwise work,
norms, softmax and gathers are not counted.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class FlopCount:
  matmul: float  # forward FLOPs of the weight matmuls
  attention: float  # forward FLOPs of q k^T and weights @ v

  @property
  def forward(self) -> float:
    return self.matmul + self.attention

  @property
  def train_step(self) -> float:
    return 3.0 * self.forward


def dense(tokens: int, fan_in: int, fan_out: int) -> float:
  """Forward FLOPs of one (tokens, fan_in) @ (fan_in, fan_out) matmul."""
  return 2.0 * tokens * fan_in * fan_out


def attention(batch: int, length: int, width: int, layers: int) -> float:
  """Forward FLOPs of q k^T and weights @ v over all heads and layers (full square)."""
  return 4.0 * batch * length * length * width * layers


def transformer_blocks(
  batch: int, length: int, width: int, layers: int, mlp_width: int
) -> FlopCount:
  """q, k, v, out projections and the two MLP matmuls of `layers` pre-LN blocks."""
  tokens = batch * length
  per_layer = 4 * dense(tokens, width, width) + 2 * dense(tokens, width, mlp_width)
  return FlopCount(per_layer * layers, attention(batch, length, width, layers))


def patch_gpt(model, batch: int) -> FlopCount:
  """boldjax PatchGPT on (batch, N) patches: patch_embed and head on N tokens, the blocks
  on N + 1 (the subject token)."""
  N, D = model.num_patches, model.embed_dim
  blocks = transformer_blocks(batch, N + 1, D, model.depth, int(D * model.mlp_ratio))
  io = dense(batch * N, model.patch_dim, D) + dense(batch * N, D, model.num_outputs)
  return FlopCount(blocks.matmul + io, blocks.attention)


def csm_gpt(model, batch: int, length: int) -> FlopCount:
  """boldjax LfbModel(style='csm') on (batch, length) frames: embedder, GPT-2, unembedder
  on every position (the original runs the whole padded sequence)."""
  D, P = model.embed_dim, model.in_dim
  blocks = transformer_blocks(batch, length, D, model.num_layers, D * model.intermediate_factor)
  io = 2 * dense(batch * length, P, D)  # embedder Linear and unembedder Linear
  return FlopCount(blocks.matmul + io, blocks.attention)


def matmul_ceiling(n: int = 2048, repeats: int = 7) -> float:
  """Achievable float32 GFLOP/s of one big jnp.dot on this machine, measured now (median)."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  b = jnp.asarray(np.random.default_rng(1).standard_normal((n, n)), jnp.float32)
  dot = jax.jit(lambda x, y: jnp.dot(x, y, precision="highest"))
  dot(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    dot(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2.0 * n**3 / float(np.median(times)) / 1e9
