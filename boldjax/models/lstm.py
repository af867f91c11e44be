"""LSTM autoencoder of learning-from-brains: bidirectional encoder, autoregressive decoder.

Weights keep PyTorch's LSTM layout transposed to (in, 4H) / (H, 4H) with the gate order
i, f, g, o and two biases (bias_ih, bias_hh), so converting is a transpose.

Encoder: L single-layer bidirectional LSTMs; between layers x = LN(out_prev + in_prev) ->
dropout, where out_prev is the mean of the two directions. The (h, c) state is chained: layer
k starts from layer k-1's final state per direction (the backward one is the state at t=0).
Padded frames are not packed away: they run through the LSTMs like the original.
pooler = dropout -> Linear -> tanh -> dropout on the direction-mean of the last final h.

Decoder: L unidirectional LSTMs stepped S times; inside a step the state is chained across
layers and the state leaving the last layer enters layer 0 at the next step. Step 0 starts
from h = encoder hidden, c = 0 with the pooler output as input; then each step's input is
the previous output (after dropout -> Linear -> dropout), or, with teacher forcing (drawn
once per batch, training only), the embedded frame at the SAME index as the original does.

The decoder loop runs in `jax.lax.scan` on explicitly fetched weights (pure functions), so
no flax module is called inside the scan. The encoder's recurrences have a hand-written
backward through time (`_recurrence`) that forms dW_hh as one matmul after the loop.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from boldjax.models import layers


def _uniform(scale: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -scale, scale)

  return init


class LSTMWeights(nn.Module):
  """One direction's LSTM parameters (PyTorch init U(-1/sqrt(H), 1/sqrt(H)))."""

  in_dim: int
  hidden: int

  @nn.compact
  def __call__(self) -> dict[str, jax.Array]:
    init = _uniform(1.0 / math.sqrt(self.hidden))
    H4 = 4 * self.hidden
    return {
      "weight_ih": self.param(
        "weight_ih", layers.partitioned(init, ("embed", "mlp")), (self.in_dim, H4)
      ),
      "weight_hh": self.param(
        "weight_hh", layers.partitioned(init, ("embed", "mlp")), (self.hidden, H4)
      ),
      "bias_ih": self.param("bias_ih", layers.partitioned(init, ("mlp",)), (H4,)),
      "bias_hh": self.param("bias_hh", layers.partitioned(init, ("mlp",)), (H4,)),
    }


class NormWeights(nn.Module):
  dim: int

  @nn.compact
  def __call__(self) -> dict[str, jax.Array]:
    return {
      "scale": self.param(
        "scale", layers.partitioned(nn.initializers.ones, ("embed",)), (self.dim,)
      ),
      "bias": self.param(
        "bias", layers.partitioned(nn.initializers.zeros, ("embed",)), (self.dim,)
      ),
    }


class DenseWeights(nn.Module):
  in_dim: int
  out_dim: int

  @nn.compact
  def __call__(self) -> dict[str, jax.Array]:
    bound = 1.0 / math.sqrt(self.in_dim)  # PyTorch nn.Linear default
    return {
      "kernel": self.param(
        "kernel",
        layers.partitioned(_uniform(bound), ("embed", "embed")),
        (self.in_dim, self.out_dim),
      ),
      "bias": self.param("bias", layers.partitioned(_uniform(bound), ("embed",)), (self.out_dim,)),
    }


def layer_norm(x: jax.Array, w: dict[str, jax.Array], eps: float = 1e-5) -> jax.Array:
  """PyTorch LayerNorm (two-pass biased variance) in float32."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + eps) * w["scale"] + w["bias"]
  return y.astype(x.dtype)


def dense(x: jax.Array, w: dict[str, jax.Array]) -> jax.Array:
  return x @ w["kernel"].astype(x.dtype) + w["bias"].astype(x.dtype)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout (layers.Dropout's hash bits: threefry bernoulli bits made the
  decoder's 3 dropouts per step ~20 ms of a 160 ms step); identity when key is None (eval)."""
  if key is None:
    return x
  return layers.hash_dropout(x, rate, key)


def lstm_step(
  w: dict[str, jax.Array], x_proj: jax.Array, h: jax.Array, c: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """One LSTM step from the projected input x W_ih + b_ih (B, 4H); gates i, f, g, o."""
  gates = x_proj + h @ w["weight_hh"].astype(h.dtype) + w["bias_hh"].astype(h.dtype)
  h, c, _ = _cell(gates, c)
  return h, c


def _cell(z: jax.Array, c_prev: jax.Array):
  """Gate pre-activations z (B, 4H) and c_prev -> h, c and (i, f, g, o, tanh c), the
  activations the hand-written backward needs."""
  zi, zf, zg, zo = jnp.split(z, 4, axis=-1)
  i, f, g, o = jax.nn.sigmoid(zi), jax.nn.sigmoid(zf), jnp.tanh(zg), jax.nn.sigmoid(zo)
  c = f * c_prev + i * g
  tc = jnp.tanh(c)
  return o * tc, c, (i, f, g, o, tc)


def _gates_scan(w_hh, b_hh, xs, h0, c0):
  """The recurrence over time-major xs (S, B, 4H) -> (hs, final h, final c, saved)."""

  def step(carry, xt):
    h_prev, c_prev = carry
    h, c, acts = _cell(xt + h_prev @ w_hh + b_hh, c_prev)
    return (h, c), (h, (h_prev, c_prev, *acts))

  (h, c), (hs, saved) = jax.lax.scan(step, (h0, c0), xs)
  return hs, h, c, saved


@jax.custom_vjp
def _recurrence(w_hh, b_hh, xs, h0, c0):
  hs, h, c, _ = _gates_scan(w_hh, b_hh, xs, h0, c0)
  return hs, h, c


def _recurrence_fwd(w_hh, b_hh, xs, h0, c0):
  hs, h, c, saved = _gates_scan(w_hh, b_hh, xs, h0, c0)
  return (hs, h, c), (w_hh, saved)


def _recurrence_bwd(res, cotangents):
  """Backward through time with dW_hh as ONE matmul after the loop (autodiff of the scan
  would accumulate it step by step: S small dots and adds)."""
  w_hh, (h_prev, c_prev, i, f, g, o, tc) = res
  d_hs, d_h, d_c = cotangents

  def step(carry, xs):
    dh, dc = carry
    dy, h_p, c_p, i_t, f_t, g_t, o_t, tc_t = xs
    dh = dh + dy
    dc = dc + dh * o_t * (1.0 - tc_t * tc_t)
    dz = jnp.concatenate(
      [
        dc * g_t * i_t * (1.0 - i_t),
        dc * c_p * f_t * (1.0 - f_t),
        dc * i_t * (1.0 - g_t * g_t),
        dh * tc_t * o_t * (1.0 - o_t),
      ],
      axis=-1,
    )
    return (dz @ w_hh.T, dc * f_t), dz

  (dh0, dc0), dzs = jax.lax.scan(
    step, (d_h, d_c), (d_hs, h_prev, c_prev, i, f, g, o, tc), reverse=True
  )
  H4 = dzs.shape[-1]
  d_w = h_prev.reshape(-1, h_prev.shape[-1]).T @ dzs.reshape(-1, H4)
  return d_w, dzs.reshape(-1, H4).sum(0), dzs, dh0, dc0


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def run_lstm(
  w: dict[str, jax.Array], x: jax.Array, h0: jax.Array, c0: jax.Array, *, reverse: bool = False
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """x (B, S, In) -> outputs (B, S, H), final (h, c); reverse runs from t = S-1 to 0."""
  x_proj = x @ w["weight_ih"].astype(x.dtype) + w["bias_ih"].astype(x.dtype)
  xs = jnp.swapaxes(x_proj, 0, 1)
  if reverse:
    xs = xs[::-1]
  hs, h, c = _recurrence(w["weight_hh"].astype(x.dtype), w["bias_hh"].astype(x.dtype), xs, h0, c0)
  if reverse:
    hs = hs[::-1]
  return jnp.swapaxes(hs, 0, 1), (h, c)


class LSTMEncoder(nn.Module):
  num_layers: int
  dim: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, *, deterministic: bool = True) -> dict[str, jax.Array]:
    B = x.shape[0]
    keys = (
      None if deterministic else jax.random.split(self.make_rng("dropout"), self.num_layers + 1)
    )
    h = [jnp.zeros((B, self.dim), x.dtype)] * 2
    c = [jnp.zeros((B, self.dim), x.dtype)] * 2
    prev = None
    for i in range(self.num_layers):
      if i > 0:
        norm = NormWeights(self.dim, name=f"layer_norms_{i - 1}")()
        x = dropout(layer_norm(x + prev, norm), self.dropout, None if keys is None else keys[i])
      fwd = LSTMWeights(self.dim, self.dim, name=f"lstms_{i}_fwd")()
      bwd = LSTMWeights(self.dim, self.dim, name=f"lstms_{i}_bwd")()
      out_f, (h[0], c[0]) = run_lstm(fwd, x, h[0], c[0])
      out_b, (h[1], c[1]) = run_lstm(bwd, x, h[1], c[1], reverse=True)
      prev, x = x, (out_f + out_b) / 2.0
    hidden = (h[0] + h[1]) / 2.0
    pool = DenseWeights(self.dim, self.dim, name="pooler")()
    k = (None, None) if keys is None else jax.random.split(keys[-1])
    pooled = dropout(jnp.tanh(dense(dropout(hidden, self.dropout, k[0]), pool)), self.dropout, k[1])
    return {"outputs": x, "hidden": hidden, "pooler_outputs": pooled}


class LSTMDecoder(nn.Module):
  num_layers: int
  dim: int
  dropout: float = 0.0

  @nn.compact
  def __call__(
    self,
    first_input: jax.Array,
    hidden: jax.Array,
    targets: jax.Array,
    teacher_forcing: jax.Array | bool = False,
    *,
    deterministic: bool = True,
  ) -> jax.Array:
    """first_input (B, D), hidden (B, D), targets (B, S, D) -> outputs (B, S, D)."""
    lstms = [LSTMWeights(self.dim, self.dim, name=f"lstms_{i}")() for i in range(self.num_layers)]
    norms = [NormWeights(self.dim, name=f"layer_norms_{i}")() for i in range(self.num_layers - 1)]
    out_w = DenseWeights(self.dim, self.dim, name="linear_output")()
    S = targets.shape[1]
    n_keys = self.num_layers + 1  # layer norms (L-1) + two around the output layer
    if deterministic or self.dropout == 0.0:
      step_keys = jnp.zeros((S,), jnp.uint32)  # unused placeholder
      use_keys = False
    else:
      step_keys = jax.random.split(self.make_rng("dropout"), S)
      use_keys = True
    teacher_forcing = jnp.asarray(teacher_forcing, bool)

    def step(carry, xs):
      inp, h, c = carry
      target, key = xs
      keys = jax.random.split(key, n_keys) if use_keys else [None] * n_keys
      x = jnp.where(teacher_forcing, target, inp)
      prev = None
      for i, w in enumerate(lstms):
        if i > 0:
          x = dropout(layer_norm(x + prev, norms[i - 1]), self.dropout, keys[i - 1])
        x_proj = x @ w["weight_ih"].astype(x.dtype) + w["bias_ih"].astype(x.dtype)
        h, c = lstm_step(w, x_proj, h, c)
        prev, x = x, h
      y = dropout(x, self.dropout, keys[-2])
      y = dropout(dense(y, out_w), self.dropout, keys[-1])
      return (y, h, c), y

    init = (first_input, hidden, jnp.zeros_like(hidden))
    _, ys = jax.lax.scan(step, init, (jnp.swapaxes(targets, 0, 1), step_keys))
    return jnp.swapaxes(ys, 0, 1)


class LSTMAutoencoder(nn.Module):
  num_layers: int
  dim: int
  dropout: float = 0.0

  def setup(self) -> None:
    self.encoder = LSTMEncoder(self.num_layers, self.dim, self.dropout)
    self.decoder = LSTMDecoder(self.num_layers, self.dim, self.dropout)

  def encode(self, x: jax.Array, *, deterministic: bool = True) -> dict[str, jax.Array]:
    return self.encoder(x, deterministic=deterministic)

  def __call__(
    self, x: jax.Array, teacher_forcing: jax.Array | bool = False, *, deterministic: bool = True
  ) -> dict[str, jax.Array]:
    """x (B, S, D) embedded frames -> encoder outputs + decoder outputs (B, S, D)."""
    enc = self.encoder(x, deterministic=deterministic)
    dec = self.decoder(
      enc["pooler_outputs"], enc["hidden"], x, teacher_forcing, deterministic=deterministic
    )
    return {**{f"encoder/{k}": v for k, v in enc.items()}, "decoder/outputs": dec}
