"""Parity with huzeyann/BrainDecodesDeepNets FactorTopy on every bddn_encoding* fixture.

Each fixture holds the seed's FactorTopy state_dict (selector output layers drawn non-zero),
random per-layer tokens (local before and after the 8x8 resize, global), vertex coordinates,
targets and two global steps, and every output of one forward + objective + backward:
bottlenecks, position encoding, selections, y, reg, smooth-L1, the regulariser's decay,
term and the loss at each step, and gradients by torch name. Every array in outputs.npz is
compared within spec["tolerances"]; sizes come from spec.json (layers, widths, bottleneck,
N, batch, grid), never from this file.
"""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boldjax.convert.bddn import convert_factortopy, params_to_torch
from boldjax.models.factortopy import (
  FactorTopy,
  position_encoding,
  reg_decay,
  resize_bilinear,
  smooth_l1,
)
from tests import parity

CASES = parity.cases("bddn_encoding*")
# local_tokens/* are fixture inputs (no spec tolerance): the resize of local_tokens_raw/* in
# float32 differs from torch's by rounding only (measured 1.8e-7 on N(0, 1) tokens).
RESIZE_TOL = {"atol": 1e-6, "rtol": 1e-6}


def objective_constants(spec: dict) -> tuple[float, int, float]:
  """(LAMBDA, DECAY_TOTAL_STEPS, smooth-L1 beta) of the fixture's seed config.

  The spec states them in its reference file list and output descriptions; the seed's
  values (0.1, 2000, 0.1) when a spec does not."""
  text = " ".join(spec["reference"]["files"]) + " ".join(
    v.get("meaning", "") for v in spec["outputs"].values()
  )
  lam = re.search(r"LAMBDA=([0-9.eE+-]+)", text)
  total = re.search(r"DECAY_TOTAL_STEPS=(\d+)", text)
  beta = re.search(r"beta=([0-9.eE+-]+)", text)
  return (
    float(lam.group(1).rstrip(";,")) if lam else 0.1,
    int(total.group(1)) if total else 2000,
    float(beta.group(1).rstrip(";,)")) if beta else 0.1,
  )


@functools.cache
def computed(case: str):
  """(spec, actual, outputs) of a case, computed once."""
  spec, sd, inputs, outputs = parity.load(case)
  cfg = spec["config"]
  keys = [str(layer) for layer in cfg["layers"]]
  params, st = convert_factortopy(sd, layers=cfg["layers"], source=f"{case}/state_dict.npz")
  assert st["layers"] == keys
  assert st["layer_widths"] == list(cfg["layer_widths"])
  assert st["num_vertices"] == cfg["n_vertices"] and st["bottleneck"] == cfg["bottleneck_dim"]
  assert st["coords"] is None and st["dropped_backbone"] == 0

  # The converter is exactly invertible...
  back = params_to_torch(params, keys)
  assert set(back) == set(sd)
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k], err_msg=k)

  model = FactorTopy(
    num_vertices=st["num_vertices"],
    num_layers=len(keys),
    token_dim=tuple(st["layer_widths"]),
    bottleneck=st["bottleneck"],
    hidden=st["hidden"],
    num_freqs=st["num_freqs"],
  )
  nhwc = lambda a: np.transpose(a, (0, 2, 3, 1))  # noqa: E731
  local = [nhwc(inputs[f"local_tokens/{k}"]) for k in keys]  # per layer: widths may differ
  glob = [inputs[f"global_tokens/{k}"] for k in keys]
  coords = inputs["coords"]
  B = int(cfg["batch"])
  assert local[0].shape[0] == B and coords.shape == (st["num_vertices"], 3)
  pe = position_encoding(coords, st["num_freqs"])

  # ...and the params fit the model exactly (names and shapes).
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), pe, local, glob)["params"])
  want = jax.tree.map(lambda a: a.shape, nn.unbox(abstract))
  assert want == jax.tree.map(np.shape, params), f"{case}: params tree differs from FactorTopy's"

  lam, total, beta = objective_constants(spec)
  steps = [int(s) for s in inputs["steps"]]
  # Forward outputs and gradients are those of the objective at the step the spec names.
  named = [re.search(r"d loss/step(\d+)", v.get("meaning", "")) for v in spec["outputs"].values()]
  grad_step = next((int(m.group(1)) for m in named if m), steps[0])
  assert grad_step in steps, f"{case}: gradients at step {grad_step}, not one of {steps}"
  target = jnp.asarray(inputs["fmri"])

  def loss_fn(p, decay):
    out = model.apply({"params": p}, pe, local, glob)
    sl1 = smooth_l1(out["y"], target, beta)
    term = out["reg"] * jnp.float32(lam) * decay
    return sl1 + term, (out, sl1, term)

  actual: dict[str, np.ndarray] = {"pe": pe}
  with jax.default_matmul_precision("highest"):
    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    for step in steps:
      decay = reg_decay(step, total)
      (loss, (out, sl1, term)), grads = grad_fn(params, jnp.float32(decay))
      actual[f"reg_decay/step{step}"] = np.float64(decay)
      actual[f"reg_term/step{step}"] = term
      actual[f"loss/step{step}"] = loss
      if step == grad_step:
        first = (out, sl1, grads)
    out, sl1, grads = first
  for name in ("sel_space", "sel_layer", "sel_scale", "y", "reg"):
    actual[name] = out[name]
  actual["smooth_l1"] = sl1
  for i, k in enumerate(keys):
    actual[f"local_bottleneck/{k}"] = np.transpose(np.asarray(out["local_bottleneck"][:, i]),
                                                   (0, 3, 1, 2))  # fmt: skip
    actual[f"global_bottleneck/{k}"] = out["global_bottleneck"][:, i]
  grads_torch = params_to_torch(grads, keys)
  for name in outputs:
    if name.startswith("grad/"):
      actual[name] = grads_torch[name[len("grad/") :]]

  # The resize the token cache uses reproduces the seed's F.interpolate inputs.
  grid = local[0].shape[1:3]
  for k in keys:
    raw = nhwc(inputs[f"local_tokens_raw/{k}"])
    assert raw.shape[1] == raw.shape[2] == cfg.get("raw_grid", raw.shape[1])
    mine = np.asarray(resize_bilinear(raw, grid))
    parity.check(f"{case}/local_tokens/{k}", nhwc(inputs[f"local_tokens/{k}"]), mine, RESIZE_TOL)
  actual = {k: np.asarray(v) for k, v in actual.items()}
  return spec, actual, outputs


compare = parity.compare_outputs


@pytest.mark.parametrize("case", CASES)
def test_bddn_parity(case: str) -> None:
  spec, actual, outputs = computed(case)
  assert set(spec["tolerances"]) <= set(outputs)
  compare(case, spec, actual, outputs)


@pytest.mark.parametrize("case", CASES)
def test_a_nan_in_any_output_fails_bddn_parity(case: str) -> None:
  spec, actual, outputs = computed(case)
  compare_case = lambda a, o: compare(case, spec, a, o)  # noqa: E731
  parity.assert_nan_fails(compare_case, actual, outputs, list(outputs), broken_value=np.inf)


@pytest.mark.parametrize("case", CASES)
def test_bddn_plmodel_checkpoint_converts_identically(case: str) -> None:
  """The PLModel form ('model.' prefix, frozen coords, backbone.* keys) gives the same params."""
  spec, sd, inputs, _ = parity.load(case)
  keys = spec["config"]["layers"]
  plain, _ = convert_factortopy(sd, layers=keys)
  wrapped = {f"model.{k}": v for k, v in sd.items()}
  wrapped["coords"] = inputs["coords"]
  wrapped["backbone.visual.proj"] = np.zeros((2, 2), np.float32)
  params, st = convert_factortopy(wrapped, layers=keys)
  np.testing.assert_array_equal(st["coords"], inputs["coords"])
  assert st["dropped_backbone"] == 1
  jax.tree.map(np.testing.assert_array_equal, params, plain)
  with pytest.raises(KeyError, match="unknown PLModel keys"):
    convert_factortopy({**wrapped, "train_r2.total": np.zeros(3)}, layers=keys)
  with pytest.raises(KeyError, match="missing keys"):
    convert_factortopy({k: v for k, v in sd.items() if k != "bias"}, layers=keys)


def test_grid_sample_and_resize_match_torch() -> None:
  """grid_sample_bilinear (values and both gradients, points inside, on the border and
  outside the map) and resize_bilinear (down and up) against torch on random inputs."""
  torch = parity.torch()
  from boldjax.models.factortopy import grid_sample_bilinear

  rng = np.random.default_rng(0)
  maps = rng.normal(size=(2, 5, 7, 3)).astype(np.float32)  # (B, H, W, C)
  xy = rng.uniform(-1.3, 1.3, size=(40, 2)).astype(np.float32)
  xy[:4] = [[-1, -1], [1, 1], [6 / 7, -0.8], [0, 0]]
  cot = rng.normal(size=(2, 40, 3)).astype(np.float32)

  tm = torch.tensor(maps.transpose(0, 3, 1, 2), requires_grad=True)
  txy = torch.tensor(xy, requires_grad=True)
  grid = txy[None, :, None, :].expand(2, -1, 1, 2)
  ref = torch.nn.functional.grid_sample(tm, grid, mode="bilinear", padding_mode="zeros",
                                        align_corners=False)[..., 0].permute(0, 2, 1)  # fmt: skip
  (ref * torch.tensor(cot)).sum().backward()

  with jax.default_matmul_precision("highest"):
    out, vjp = jax.vjp(grid_sample_bilinear, jnp.asarray(maps), jnp.asarray(xy))
    d_maps, d_xy = vjp(jnp.asarray(cot))
  tol = {"atol": 1e-6, "rtol": 1e-5}
  parity.check("grid_sample", out, ref.detach().numpy(), tol)
  parity.check("grid_sample d maps", d_maps, tm.grad.numpy().transpose(0, 2, 3, 1), tol)
  parity.check("grid_sample d xy", d_xy, txy.grad.numpy(), {"atol": 1e-5, "rtol": 1e-5})

  x = rng.normal(size=(3, 11, 9, 4)).astype(np.float32)
  for size in ((8, 8), (5, 3), (16, 12)):
    want = torch.nn.functional.interpolate(torch.tensor(x.transpose(0, 3, 1, 2)), size=size,
                                           mode="bilinear", align_corners=False)  # fmt: skip
    got = resize_bilinear(x, size)
    parity.check(f"resize {size}", got, want.numpy().transpose(0, 2, 3, 1), RESIZE_TOL)
