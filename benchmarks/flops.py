"""Analytic FLOP counts of the benchmarked train steps, and the f32 matmul ceiling.

Convention (as in the PaLM / Chinchilla MFU accounting): a train step costs 3x its forward
(backward = 2x forward); the forward costs 2 * fan_in * fan_out per token for every weight
matmul, plus 4 * L^2 * D per attention layer and sequence (q k^T and weights @ v, the full
L x L square: XLA and torch both compute it whole under a causal mask). Elementwise work,
norms, softmax and gathers are not counted. Forward passes that take no gradient (the EMA
teacher of DINO) count once (`no_grad`).
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class FlopCount:
  matmul: float  # forward FLOPs of the weight matmuls
  attention: float  # forward FLOPs of q k^T and weights @ v
  no_grad: float = 0.0  # forward FLOPs run without a backward (EMA teacher), counted once

  @property
  def forward(self) -> float:
    """The differentiated forward (what the backward doubles)."""
    return self.matmul + self.attention

  @property
  def train_step(self) -> float:
    return 3.0 * self.forward + self.no_grad


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


def seq_bert(model, batch: int, length: int) -> FlopCount:
  """boldjax LfbModel(style='bert') on (batch, length) packed tokens (length = frames of
  seq_a + seq_b + 2 SEP + CLS): embedder, BERT, unembedder on every position (the original
  runs the padded sequence), pooler + NSP head on the index-0 state."""
  D, P = model.embed_dim, model.in_dim
  blocks = transformer_blocks(batch, length, D, model.num_layers, D * model.intermediate_factor)
  io = 2 * dense(batch * length, P, D)  # embedder Linear and unembedder Linear
  heads = dense(batch, D, D) + dense(batch, D, 1)  # pooler, is_next_head
  return FlopCount(blocks.matmul + io + heads, blocks.attention)


def lstm_autoencoder(model, batch: int, length: int) -> FlopCount:
  """boldjax LfbModel(style='autoencoder') on (batch, length) frames: embedder, L
  bidirectional encoder LSTMs, pooler, L decoder LSTMs stepped `length` times with the
  output Linear at every step, unembedder. An LSTM costs x W_ih and h W_hh (4D gates each)
  per step and direction; the gates' elementwise work is not counted."""
  D, P, L = model.embed_dim, model.in_dim, model.num_layers
  tokens = batch * length
  lstm = 2 * dense(tokens, D, 4 * D)  # input and recurrent projections over all steps
  encoder = L * 2 * lstm + dense(batch, D, D)  # two directions per layer, pooler
  decoder = L * lstm + dense(tokens, D, D)  # one direction, output Linear per step
  io = dense(tokens, P, D) + dense(tokens, D, P)
  return FlopCount(encoder + decoder + io, 0.0)


def semantoks_tokenizers(encoder, sequences: int) -> float:
  """Network tokenizers of a SemantoksEncoder on `sequences` inputs (forward FLOPs).

  Per network n (R_n ROIs) and patch time step: a dense Conv1d branch = R_n*k -> C matmul;
  an SLConv branch = heads*R_n output channels with K+1 taps each (long kernel + skip),
  then Linear(heads*R_n -> C).
  """
  steps = sequences * encoder.num_patches * encoder.patch_size
  total = 0.0
  for rois in encoder.network_rois:
    r = len(rois)
    for b in encoder.branches:
      if b.type == "sgconv":
        heads = math.ceil(b.out_channels / r)
        K = b.kernel_size * sum(2 ** max(0, i - 1) for i in range(b.num_scales))
        total += dense(steps, K + 1, heads * r) + dense(steps, heads * r, b.out_channels)
      elif b.depthwise:
        total += dense(steps, b.kernel_size, r) + dense(steps, r, b.out_channels)
      else:
        total += dense(steps, r * b.kernel_size, b.out_channels)
  return total


def dino_head(head, embed_dim: int, tokens: int) -> float:
  """DinoHead MLP on `tokens` rows: D -> hidden (-> hidden ...) -> bottleneck."""
  n = max(head.nlayers, 1)
  dims = [embed_dim] + [head.hidden_dim] * (n - 1) + [head.bottleneck_dim]
  return sum(dense(tokens, a, b) for a, b in zip(dims[:-1], dims[1:], strict=True))


def semantoks_forward(encoder, head, sequences: int) -> FlopCount:
  """Encoder + head on CLS, per-network means and every patch token, for `sequences` views
  (boldjax runs the head on all N*P patch tokens; the original only on the masked ones)."""
  N, P, D = len(encoder.network_rois), encoder.num_patches, encoder.embed_dim
  L = 1 + N * P
  blocks = transformer_blocks(sequences, L, D, encoder.depth, encoder.mlp_dim)
  heads = dino_head(head, D, sequences * (1 + N + N * P))
  return FlopCount(
    blocks.matmul + semantoks_tokenizers(encoder, sequences) + heads, blocks.attention
  )


def dino(encoder, head, batch: int) -> FlopCount:
  """A SimDINO step on `batch` samples of 2 views: the student forward (differentiated) and
  the same forward for the EMA teacher without gradient. The loss-side matmuls (coding-rate
  covariances, Cholesky) are not counted."""
  student = semantoks_forward(encoder, head, 2 * batch)
  return FlopCount(student.matmul, student.attention, no_grad=student.forward)


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
