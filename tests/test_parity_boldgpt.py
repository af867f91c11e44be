"""Parity with clane9/boldGPT (IGPT) on every boldgpt_* fixture in BOLDJAX_PARITY_DIR.

Each fixture holds a state_dict, inputs and the outputs of the original PyTorch code; every
output listed under spec["tolerances"] must be reproduced within its tolerance (integer
outputs and pure gathers exactly). Sizes come from spec.json, never from this file.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boldjax.convert.boldgpt import convert_boldgpt, model_kwargs_from_spec, params_to_torch
from boldjax.models.patch_gpt import PatchGPT
from boldjax.tasks.next_patch import categorical_loss, continuous_loss
from tests import parity

CASES = parity.cases("boldgpt_*")


def compare(case: str, spec: dict, actual: dict, outputs: dict) -> None:
  """Every output spec.json lists, NaN/Inf failing; prints the worst err/tol."""
  tolerances = {k: v for k, v in spec["tolerances"].items() if k != "note"}
  unchecked = sorted(set(tolerances) - set(actual))
  assert not unchecked, f"{case}: no boldjax value for fixture outputs {unchecked}"
  ratios = {name: parity.check(f"{case}/{name}", actual[name], outputs[name], tol)
            for name, tol in tolerances.items()}  # fmt: skip
  worst = max(ratios, key=ratios.get)
  print(f"{case}: {len(ratios)} outputs, worst err/tol {ratios[worst]:.3g} ({worst})")


@functools.cache
def computed(case: str) -> tuple[dict, dict, dict]:
  """(spec, actual, outputs) of a case, computed once."""
  spec, sd, inputs, outputs = parity.load(case)
  kwargs = model_kwargs_from_spec(spec)
  model = PatchGPT(**kwargs)
  params, extras = convert_boldgpt(
    sd, num_heads=kwargs["num_heads"], model=model, source=f"{case}/state_dict"
  )
  for key, value in extras["model_kwargs"].items():  # the weights agree with the spec
    if key in kwargs:
      assert kwargs[key] == value, f"{case}: spec {key}={kwargs[key]} but weights imply {value}"
  # The converter is exactly invertible on the decoder weights.
  back = params_to_torch(params)
  assert set(back) == {k for k in sd if k.startswith("decoder.")}
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k], err_msg=k)

  layout, tokenizer = extras["layout"], extras["tokenizer"]
  categorical = kwargs["categorical"]
  head_key = "logits" if categorical else "predictions"
  patch_mask = jnp.asarray(layout.patch_mask)

  def loss_fn(p, patches, targets, subject_id, order):
    out = model.apply({"params": p}, patches, subject_id, order)
    if categorical:
      loss = categorical_loss(out, targets)[0]
    else:
      mask = patch_mask[None] if order is None else jnp.take(patch_mask, order, axis=0)
      loss = continuous_loss(out, patches, mask)[0]
    return loss, out

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  actual: dict[str, np.ndarray] = {}
  patches = layout.patchify(inputs["activity"])
  actual["patchify_inverse"] = layout.unpatchify(outputs["patches"])
  subject_id = inputs["subject_id"].astype(np.int32)
  runs = {"": None}
  if "order_random" in inputs:
    runs["_random_order"] = inputs["order_random"].astype(np.int32)
  with jax.default_matmul_precision("highest"):
    for suffix, order in runs.items():
      x = patches if order is None else np.take_along_axis(patches, order[..., None], axis=1)
      actual["patches" + suffix] = x
      tokens = None
      if tokenizer is not None:
        tokens = tokenizer.encode(x)
        actual["tokens" + suffix] = tokens
      targets = tokens if categorical else x
      (loss, out), grads = grad_fn(params, x, targets, subject_id, order)
      actual[head_key + suffix] = out
      actual["loss" + suffix] = loss
      for name, g in params_to_torch(grads).items():
        actual[f"grad{suffix}/{name}"] = g

  return spec, {k: np.asarray(v) for k, v in actual.items()}, outputs


@pytest.mark.parametrize("case", CASES)
def test_boldgpt_parity(case: str) -> None:
  compare(case, *computed(case))


@pytest.mark.parametrize("case", CASES[:1])
def test_a_nan_in_any_output_fails_boldgpt_parity(case: str) -> None:
  spec, actual, outputs = computed(case)
  names = [n for n in spec["tolerances"] if n != "note"]
  compare_case = lambda a, o: compare(case, spec, a, o)  # noqa: E731
  parity.assert_nan_fails(compare_case, actual, outputs, names)
