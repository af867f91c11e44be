"""Parity with SamGijsen/Brain-Semantoks on every semantoks* fixture in BOLDJAX_PARITY_DIR.

Each fixture holds the original SimDINOModel's state_dict (student + drifted EMA teacher),
two augmented views with their token masks, and every output of one forward: tokenizer
outputs, tokens, heads, cls_avg, each loss term (masked and unmasked batch), the gradients
of total_loss w.r.t. student parameters and the schedules. Every array in outputs.npz is
compared within spec["tolerances"]; sizes come from spec.json, never from this file.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boldjax.convert.semantoks import params_to_torch, semantoks_kwargs, semantoks_params
from boldjax.models.semantoks import DinoHead, SemantoksEncoder, split_tokens
from boldjax.tasks.simdino_objectives import schedules_from_config, simdino_losses
from tests import parity

CASES = parity.cases("semantoks*")


def _tolerance(spec: dict, name: str) -> dict:
  if name == "schedule/steps" and name not in spec["tolerances"]:
    return {"exact": True}
  return parity.tolerance(spec, name)


def compare(case: str, spec: dict, actual: dict, outputs: dict) -> None:
  """Every fixture output against boldjax's, NaN/Inf failing; prints the worst err/tol."""
  missing = sorted(set(outputs) - set(actual))
  assert not missing, f"{case}: no boldjax value for fixture outputs {missing}"
  failures, ratios = [], {}
  for k in outputs:
    try:
      ratios[k] = parity.check(f"{case}/{k}", actual[k], outputs[k], _tolerance(spec, k))
    except AssertionError as e:
      failures.append(str(e)[:400])
  assert not failures, "\n".join(failures)
  worst = max(ratios, key=ratios.get)
  print(f"{case}: {len(ratios)} outputs, worst err/tol {ratios[worst]:.3g} ({worst})")


@functools.cache
def computed(case: str):
  """(spec, state_dict, kw, student buffers, actual, outputs) of a case, computed once."""
  spec, sd, inputs, outputs = parity.load(case)
  kw = semantoks_kwargs(spec["constructor_kwargs"], inputs["network_map"], f"{case}/spec.json")
  derived = spec["derived"]
  enc_kw = kw["encoder"]
  N, P = len(enc_kw["network_rois"]), enc_kw["num_patches"]
  assert (N, P) == (derived["num_networks"], derived["num_patches"])
  assert [len(r) for r in enc_kw["network_rois"]] == derived["network_roi_counts"]
  conv = semantoks_params(sd, kw, f"{case}/state_dict.npz")

  # The converter is exactly invertible (student and teacher).
  for role in ("student", "teacher"):
    back = params_to_torch(conv[role]["params"], kw, role)
    for k, v in back.items():
      np.testing.assert_array_equal(v, sd[k], err_msg=k)

  encoder, head = SemantoksEncoder(**enc_kw), DinoHead(**kw["head"])
  B = inputs["view1"].shape[0]
  x = jnp.asarray(np.concatenate([inputs["view1"], inputs["view2"]]))  # (2B, R, T): both views
  masks = jnp.asarray(np.concatenate([inputs["mask1"], inputs["mask2"]]))  # (2B, N, P)
  w_net = float(inputs["network_loss_weight"])

  def by_view(a: jax.Array) -> jax.Array:  # (2B, ...) -> (2, B, ...)
    return a.reshape((2, B) + a.shape[1:])

  def heads(head_params, tokens):
    parts = split_tokens(tokens, N, P)
    return {k: by_view(head.apply({"params": head_params}, v)) for k, v in parts.items()}

  student_buffers = conv["student"]["buffers"]
  teacher = conv["teacher"]

  with jax.default_matmul_precision("highest"):

    @jax.jit
    def teacher_fn(t):
      out = encoder.apply({"params": t["params"]["encoder"], "buffers": t["buffers"]["encoder"]}, x)
      return out, heads(t["params"]["head"], out["tokens"])

    t_out, t_heads = teacher_fn(teacher)
    t_heads = jax.lax.stop_gradient(t_heads)

    def loss_fn(params, mask):
      out = encoder.apply(
        {"params": params["encoder"], "buffers": student_buffers["encoder"]}, x, mask
      )
      s_heads = heads(params["head"], out["tokens"])
      losses = simdino_losses(s_heads, t_heads, by_view(mask), w_net, **kw["loss"])
      return losses["total_loss"], (out, s_heads, losses)

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (_, (s_out, s_heads, losses)), grads = grad_fn(conv["student"]["params"], masks)
    # All-False masks == the original's unmasked batch (no mask token, no mask loss).
    (_, (_, _, plain)), _ = grad_fn(conv["student"]["params"], jnp.zeros_like(masks))

  actual: dict[str, np.ndarray] = {}
  m = [np.asarray(inputs["mask1"]).reshape(B, -1), np.asarray(inputs["mask2"]).reshape(B, -1)]
  for v in range(2):
    sl = slice(v * B, (v + 1) * B)
    sfx = f"_v{v + 1}"
    actual["teacher_tokens" + sfx] = t_out["tokens"][sl]
    actual["teacher_tokenizer_out" + sfx] = t_out["tokenizer_out"][sl]
    actual["teacher_cls_avg" + sfx] = t_out["cls_avg"][sl]
    actual["student_tokens" + sfx] = s_out["tokens"][sl]
    actual["student_tokenizer_out" + sfx] = s_out["tokenizer_out"][sl]
    for role, h in (("teacher", t_heads), ("student", s_heads)):
      actual[f"{role}_head_cls{sfx}"] = h["cls"][v]
      actual[f"{role}_head_net{sfx}"] = h["net"][v]
      actual[f"{role}_head_mask{sfx}"] = np.asarray(h["patch"][v])[m[v]]
  actual.update(losses)
  for name in ("total_loss", "cls_loss", "network_loss"):
    actual[f"{name}_unmasked_batch"] = plain[name]
  for name, g in params_to_torch(grads, kw, "student").items():
    actual[f"grad/{name}"] = g

  # Schedules in float64 at the tabulated steps, and the forward's network weight.
  cfg = spec["schedule_config"]
  with jax.enable_x64(True):
    scheds = schedules_from_config(cfg)
    steps = np.asarray(inputs["schedule_steps"])
    actual["schedule/steps"] = steps
    for name, fn in scheds.items():
      actual[f"schedule/{name}"] = np.asarray(fn(jnp.asarray(steps)))
    w_fwd = float(scheds["network_loss_weight"](spec["forward"]["forward_step"]))
  assert w_fwd == pytest.approx(w_net, rel=1e-12)
  assert cfg["total_steps"] == cfg["steps_per_epoch"] * cfg["epochs"]

  actual = {k: np.asarray(v) for k, v in actual.items()}
  return spec, sd, kw, student_buffers, actual, outputs


@pytest.mark.parametrize("case", CASES)
def test_semantoks_parity(case: str) -> None:
  spec, sd, kw, student_buffers, actual, outputs = computed(case)
  compare(case, spec, actual, outputs)

  # An uninitialised kernel_norm (flag False) is computed from the kernels as the original's
  # first forward would: it reproduces the stored buffers.
  fresh = {
    k: (np.array(False) if k.endswith("kernel_norm_initialized") else v) for k, v in sd.items()
  }
  redo = semantoks_params(fresh, kw)
  for a, b in zip(
    jax.tree.leaves(redo["student"]["buffers"]), jax.tree.leaves(student_buffers), strict=True
  ):
    np.testing.assert_allclose(a, b, rtol=1e-6)

  # Unexpected, missing or dead-but-misnamed keys are errors naming the key.
  with pytest.raises(KeyError, match="student_encoder.extra"):
    semantoks_params({**sd, "student_encoder.extra": np.zeros(1)}, kw)
  gone = "teacher_encoder.norm.bias"
  with pytest.raises(KeyError, match=gone):
    semantoks_params({k: v for k, v in sd.items() if k != gone}, kw)


@pytest.mark.parametrize("case", CASES[:1])
def test_a_nan_in_any_output_fails_semantoks_parity(case: str) -> None:
  spec, _, _, _, actual, outputs = computed(case)
  compare_case = lambda a, o: compare(case, spec, a, o)  # noqa: E731
  parity.assert_nan_fails(compare_case, actual, outputs, list(outputs), broken_value=np.inf)


def _slconv_reference(x, kernels, D, mult, norm):
  """numpy SLConv: true convolution per (roi, head), zero padding, + D skip, roi-major."""
  S = len(kernels)
  k = (
    np.concatenate(
      [
        np.repeat(kk, 2 ** max(0, i - 1), -1) * mult[None, :, None] ** (S - i - 1)
        for i, kk in enumerate(kernels)
      ],
      -1,
    )
    / norm
  )
  H, R, K = k.shape
  n, L, _ = x.shape
  left = (K - 1) // 2
  y = np.zeros((n, L, R, H))
  for b in range(n):
    for r in range(R):
      for h in range(H):
        full = np.convolve(x[b, :, r], k[h, r], "full")
        y[b, :, r, h] = full[K - 1 - left : K - 1 - left + L] + D[h, r] * x[b, :, r]
  return y.reshape(n, L, R * H)


def test_semantoks_variants() -> None:
  """Other tokenizer / head configurations: SLConv values, masking, cls_avg, head norm."""
  from boldjax.models.semantoks import SLConv, branches_from_config, network_rois_from_map

  rng = np.random.default_rng(0)
  slconv = SLConv(channels=5, heads=3, kernel_size=2, num_scales=4, decay_min=1.5, decay_max=3.0)
  x = rng.standard_normal((2, 20, 5)).astype(np.float32)
  variables = jax.jit(slconv.init)(jax.random.key(1), x)
  p = nn.unbox(variables["params"])
  norm = np.asarray(variables["buffers"]["kernel_norm"])
  kernels = [np.asarray(p[f"kernel_{i}"], np.float64) for i in range(4)]
  with jax.default_matmul_precision("highest"):
    y = jax.jit(slconv.apply)(variables, x)
  mult = np.linspace(1.5, 3.0, 5)
  want = _slconv_reference(x.astype(np.float64), kernels, np.asarray(p["D"]), mult, norm)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  full_kernel = np.concatenate(
    [
      np.repeat(k, 2 ** max(0, i - 1), -1) * mult[None, :, None] ** (3 - i)
      for i, k in enumerate(kernels)
    ],
    -1,
  )
  np.testing.assert_allclose(norm, np.linalg.norm(full_kernel, axis=-1, keepdims=True), rtol=1e-6)

  network_map = np.array([2, 0, 0, 1, 2, 1, 1, 0, 2, 2])
  rois = network_rois_from_map(network_map)
  assert rois == ((1, 2, 7), (3, 5, 6), (0, 4, 8, 9))
  branches = branches_from_config(
    [
      {"type": "dense", "kernel_size": 3, "depthwise": True, "out_channels": 8},
      {"type": "dilated", "kernel_size": 3, "dilation": 2, "out_channels": 8},
      {"type": "sgconv", "kernel_size": 2, "num_scales": 2, "out_channels": 16},
    ]
  )
  encoder = SemantoksEncoder(
    rois,
    branches,
    embed_dim=32,
    depth=1,
    num_heads=2,
    mlp_dim=64,
    patch_size=5,
    num_patches=3,
    layer_scale_init=None,
  )
  head = DinoHead(hidden_dim=16, bottleneck_dim=8, nlayers=3)
  xs = jnp.asarray(rng.standard_normal((2, 10, 16)), jnp.float32)  # T=16: last TR dropped
  ev = jax.jit(encoder.init)(jax.random.key(2), xs)
  apply = jax.jit(encoder.apply)
  none = jnp.zeros((2, 3, 3), bool)
  out = apply(ev, xs, none)
  assert out["tokens"].shape == (2, 1 + 3 * 3, 32)
  np.testing.assert_allclose(out["cls_avg"][:, :32], out["tokens"][:, 1:].mean(1), rtol=1e-6)
  np.testing.assert_array_equal(out["cls_avg"][:, 32:], out["cls"])
  # The dropped trailing TR does not matter; fully masked inputs give input-independent tokens.
  np.testing.assert_array_equal(apply(ev, xs.at[:, :, -1].set(7.0), none)["tokens"], out["tokens"])
  full = jnp.ones((2, 3, 3), bool)
  a = apply(ev, xs, full)["tokens"]
  b = apply(ev, 2 * xs + 1, full)["tokens"]
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  assert not np.allclose(a, out["tokens"])
  hv = jax.jit(head.init)(jax.random.key(3), out["cls"])
  z = jax.jit(head.apply)(hv, out["cls"])
  np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, rtol=1e-6)
  assert len(nn.unbox(hv["params"])) == 3
