"""Autoregressive sampling from a PatchGPT (boldGPT's generate, jitted).

One patch per step in the given (shuffled) order. Categorical models sample a token and feed
back its k-means centroid times the patch's in-mask pixels (as boldGPT); continuous models
feed back the masked prediction itself (deterministic: temperature and rng are unused).
With use_cache=True each step runs one token through the blocks against an explicit KV cache
inside lax.fori_loop; use_cache=False reruns the full forward every step (needed with
registers, which attend globally).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from boldjax.models.patch_gpt import PatchGPT, init_cache


def _resolve(task_or_model: Any) -> tuple[PatchGPT, Any]:
  """(model, data info or None) from a Task with a PatchGPT `.model`, or a bare PatchGPT."""
  if isinstance(task_or_model, PatchGPT):
    return task_or_model, None
  model = getattr(task_or_model, "model", None)
  if not isinstance(model, PatchGPT):
    raise TypeError(
      f"sample: expected a PatchGPT or a task with a PatchGPT .model, found {type(task_or_model)}"
    )
  return model, getattr(task_or_model, "info", None)


def nearest_tokens(patches: jax.Array, vocab: jax.Array) -> jax.Array:
  """argmin_v ||x - vocab_v||^2 in float32 (may differ from the float64 numpy tokenizer on
  near-ties; pass prefix_tokens to be exact)."""
  d = (
    jnp.sum(patches**2, -1, keepdims=True)
    - 2.0 * jnp.einsum("...d,vd->...v", patches, vocab)
    + jnp.sum(vocab**2, -1)
  )
  return jnp.argmin(d, axis=-1).astype(jnp.int32)


def _choose(
  logits: jax.Array,
  rng: jax.Array,
  temperature: jax.Array,
  *,
  greedy: bool,
  top_k: int | None,
) -> jax.Array:
  """Token ids (B,) from (B, V) logits: argmax, or softmax(logits / T) restricted to top_k."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is not None and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.lru_cache(maxsize=32)
def _sampler(
  model: PatchGPT, *, use_cache: bool, greedy: bool, top_k: int | None, return_logits: bool
):
  """Build (once per static setting) the jitted sampling loop."""
  N, P = model.num_patches, model.patch_dim
  categorical = model.categorical

  def run(params, subject, order, prefix_patches, prefix_tokens, vocab, patch_mask, rng, temp):
    variables = {"params": params}
    num, k = prefix_patches.shape[:2]
    model_order = order if model.with_next_pos else None
    masks = jnp.take(patch_mask, order, axis=0)  # (num, N, P) in sequence order
    patches = jnp.zeros((num, N, P), jnp.float32).at[:, :k].set(prefix_patches)
    tokens = jnp.zeros((num, N), jnp.int32).at[:, :k].set(prefix_tokens)
    logit_buf = jnp.zeros((num, N, model.num_outputs), jnp.float32) if return_logits else None

    def emit(t, logits, patches, tokens, logit_buf):
      mask_t = jax.lax.dynamic_index_in_dim(masks, t, axis=1, keepdims=False)
      if categorical:
        tok = _choose(logits, jax.random.fold_in(rng, t), temp, greedy=greedy, top_k=top_k)
        patch = vocab[tok] * mask_t
        tokens = tokens.at[:, t].set(tok)
      else:
        patch = logits * mask_t
      patches = patches.at[:, t].set(patch)
      if return_logits:
        logit_buf = logit_buf.at[:, t].set(logits)
      return patch, patches, tokens, logit_buf

    if use_cache:
      cache = init_cache(model, num, jnp.dtype(model.dtype))
      out, cache = model.apply(
        variables, prefix_patches, subject, model_order, cache, offset=-1, method="decode"
      )

      def body(t, carry):
        cache, logits, patches, tokens, logit_buf = carry
        patch, patches, tokens, logit_buf = emit(t, logits, patches, tokens, logit_buf)
        out, cache = model.apply(
          variables, patch[:, None], subject, model_order, cache, offset=t, method="decode"
        )
        return cache, out[:, -1], patches, tokens, logit_buf

      carry = (cache, out[:, -1], patches, tokens, logit_buf)
      _, _, patches, tokens, logit_buf = jax.lax.fori_loop(k, N, body, carry)
    else:

      def body(t, carry):
        patches, tokens, logit_buf = carry
        out = model.apply(variables, patches, subject, model_order)
        logits = jax.lax.dynamic_index_in_dim(out, t, axis=1, keepdims=False)
        _, patches, tokens, logit_buf = emit(t, logits, patches, tokens, logit_buf)
        return patches, tokens, logit_buf

      patches, tokens, logit_buf = jax.lax.fori_loop(k, N, body, (patches, tokens, logit_buf))
    result = tokens if categorical else patches
    return (result, logit_buf) if return_logits else result

  return jax.jit(run)


def sample(
  task_or_model: Any,
  params: Any,
  *,
  num: int,
  subject_id: int | np.ndarray | None = None,
  order: np.ndarray | None = None,
  rng: jax.Array | None = None,
  temperature: float = 1.0,
  top_k: int | None = None,
  prefix_tokens: np.ndarray | None = None,
  prefix_patches: np.ndarray | None = None,
  use_cache: bool = True,
  vocab: np.ndarray | None = None,
  patch_mask: np.ndarray | None = None,
  return_logits: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Sample `num` maps patch by patch; the first k positions may be observed (prefix).

  Returns tokens (num, N) int32 (categorical) or patches (num, N, D) (continuous), in the
  sequence order `order` ((N,) or (num, N); None = the layout order). temperature=0 means
  argmax. With return_logits, also the (num, N, V) head outputs that produced each sampled
  position (rows < k are zero). vocab / patch_mask default to the task's tokenizer / layout.
  """
  model, info = _resolve(task_or_model)
  N, P = model.num_patches, model.patch_dim
  if vocab is None and model.categorical:
    if info is None or getattr(info, "tokenizer", None) is None:
      raise ValueError("sample: a categorical model needs `vocab` (or a task with a tokenizer)")
    vocab = info.tokenizer.vocab
  if vocab is None:
    vocab = np.zeros((1, P), np.float32)
  vocab = jnp.asarray(vocab, jnp.float32)
  if model.categorical and vocab.shape != (model.vocab_size, P):
    raise ValueError(f"sample: vocab must be ({model.vocab_size}, {P}), found {vocab.shape}")
  if patch_mask is None:
    patch_mask = info.layout.patch_mask if info is not None else np.ones((N, P), bool)
  patch_mask = jnp.asarray(patch_mask, jnp.float32)
  if patch_mask.shape != (N, P):
    raise ValueError(f"sample: patch_mask must be ({N}, {P}), found {patch_mask.shape}")

  order = jnp.arange(N, dtype=jnp.int32) if order is None else jnp.asarray(order, jnp.int32)
  if order.shape not in ((N,), (num, N)):
    raise ValueError(f"sample: order must be ({N},) or ({num}, {N}), found {order.shape}")
  order = jnp.broadcast_to(order, (num, N))
  if subject_id is not None:
    subject_id = jnp.broadcast_to(jnp.asarray(subject_id, jnp.int32), (num,))

  if prefix_tokens is not None and not model.categorical:
    raise ValueError("sample: prefix_tokens needs a categorical model; use prefix_patches")
  if prefix_tokens is not None:
    prefix_tokens = jnp.asarray(prefix_tokens, jnp.int32)
    prefix_tokens = jnp.broadcast_to(prefix_tokens, (num,) + prefix_tokens.shape[-1:])
  if prefix_patches is not None:
    prefix_patches = jnp.asarray(prefix_patches, jnp.float32)
    prefix_patches = jnp.broadcast_to(prefix_patches, (num,) + prefix_patches.shape[-2:])
    if prefix_patches.shape[-1] != P:
      raise ValueError(f"sample: prefix_patches must end in dim {P}, found {prefix_patches.shape}")
  k = (
    prefix_patches.shape[1]
    if prefix_patches is not None
    else (prefix_tokens.shape[1] if prefix_tokens is not None else 0)
  )
  if prefix_tokens is not None and prefix_tokens.shape[1] != k:
    raise ValueError(
      f"sample: prefix_tokens has {prefix_tokens.shape[1]} positions, prefix_patches {k}"
    )
  if k > N:
    raise ValueError(f"sample: prefix length {k} exceeds the {N} patches")
  masks = jnp.take(patch_mask, order[:, :k], axis=0)
  if prefix_patches is None:
    prefix_patches = vocab[prefix_tokens] * masks if k else jnp.zeros((num, 0, P), jnp.float32)
  if prefix_tokens is None:
    prefix_tokens = (
      nearest_tokens(prefix_patches, vocab)
      if model.categorical and k
      else jnp.zeros((num, k), jnp.int32)
    )

  greedy = float(temperature) == 0.0
  if not greedy and model.categorical and rng is None:
    raise ValueError("sample: rng is required when temperature > 0")
  rng = jax.random.key(0) if rng is None else rng
  fn = _sampler(model, use_cache=use_cache, greedy=greedy, top_k=top_k, return_logits=return_logits)
  temp = jnp.asarray(1.0 if greedy else temperature, jnp.float32)
  return fn(params, subject_id, order, prefix_patches, prefix_tokens, vocab, patch_mask, rng, temp)
