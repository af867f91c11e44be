"""Probe heads (linear, MLP, attentive) and their batched training: one head per learning
rate of a grid, trained in parallel (vmap) on padded, fixed-size batches so that every
split of a benchmark reuses one compilation.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax


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
def train_heads(head, optimizer: str, lrs, weight_decay, keys, x, y, batches):
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


def num_samples(x) -> int:
  """Training samples of (n, K, ...) features: every crop counts."""
  shape = np.shape(jax.tree.leaves(x)[0])
  return int(shape[0] * shape[1])


def flatten_crops(x, y: np.ndarray):
  """(n, K, ...) features + (n,) labels -> (n*K, ...) samples + repeated labels."""
  k = int(jax.tree.leaves(x)[0].shape[1])
  flat = jax.tree.map(lambda a: np.asarray(a).reshape(-1, *np.shape(a)[2:]), x)
  return flat, np.repeat(np.asarray(y), k), k


def pad_rows(x, rows: int):
  """Zero rows appended up to `rows` (fixed shapes: one compilation for every split)."""

  def pad(a):
    a = np.asarray(a)
    out = np.zeros((rows, *a.shape[1:]), a.dtype)
    out[: len(a)] = a
    return out

  return jax.tree.map(pad, x)


EVAL_CHUNK = 256  # examples per prediction call (padded, so one compilation)


def predict_logits(head, params, state, x) -> np.ndarray:
  """(L, n, K, C) logits of (n, K, ...) features, in fixed-size padded chunks."""
  n = _rows(x)
  out = []
  for start in range(0, n, EVAL_CHUNK):
    part = _take(x, slice(start, start + EVAL_CHUNK))
    m = _rows(part)
    flat, _, k = flatten_crops(pad_rows(part, EVAL_CHUNK), np.zeros(EVAL_CHUNK))
    logits = np.asarray(_predict_heads(head, params, state, jax.tree.map(jnp.asarray, flat)))
    out.append(logits.reshape(logits.shape[0], EVAL_CHUNK, k, -1)[:, :m])
  return np.concatenate(out, axis=1)


def _linear_batch(m: int, max_batch: int) -> int:
  """Semantoks' batch size: min(probe_batch_size, max(1, n // 8))."""
  return min(max_batch, max(1, m // 8))


def epoch_batches(
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


def stream_batches(m: int, batch: int, steps: int, rng: np.random.Generator) -> np.ndarray:
  """`steps` batches of `batch` rows drawn from consecutive shuffled epochs."""
  perms = [rng.permutation(m) for _ in range(math.ceil(steps * batch / m))]
  return np.concatenate(perms)[: steps * batch].reshape(steps, batch).astype(np.int32)
