"""Parity with athms/learning-from-brains on every lfb_* fixture in BOLDJAX_PARITY_DIR.

Each fixture holds the original model's state_dict, inputs and outputs (eval mode, explicit
masking draws); every output listed under spec["tolerances"] must be reproduced within its
tolerance ('exact' ones bit for bit). Sizes come from spec.json, never from this file.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boldjax.convert.lfb import convert_lfb, model_kwargs_from_spec, params_to_torch
from boldjax.models.lfb import LfbModel
from boldjax.tasks.autoencoder import reconstruction_loss
from boldjax.tasks.csm import l1_rows
from boldjax.tasks.decode import cross_entropy
from boldjax.tasks.seq_bert import bert_losses
from tests import parity

_DECODING_KEYS = ("inputs", "t_rs", "attention_mask", "labels")
CASES = parity.cases("lfb_*")


def passthrough_source(name: str, inputs: dict) -> str | None:
  """The input a 'prep/X' output is a copy of (the original's batch preparation passes it
  through unchanged), or None. Such outputs are not checks of boldjax and are not counted."""
  for prefix, lead in (("decoding/prep/", "decoding/"), ("prep/", "")):
    if name.startswith(prefix):
      key = name[len(prefix) :]
      return next((k for k in (lead + key, key) if k in inputs), None)
  return None


def compare(case: str, spec: dict, actual: dict, outputs: dict, inputs: dict) -> list[str]:
  """Every listed output against boldjax's (NaN/Inf failing); returns the passthroughs."""
  tolerances = {k: v for k, v in spec["tolerances"].items() if isinstance(v, dict)}
  passthrough = []
  for name in sorted(set(tolerances) - set(actual)):
    source = passthrough_source(name, inputs)
    if source is not None and np.array_equal(np.asarray(outputs[name]), inputs[source]):
      passthrough.append(f"{name} = inputs[{source!r}]")
  unchecked = sorted(set(tolerances) - set(actual) - {p.split(" = ")[0] for p in passthrough})
  assert not unchecked, f"{case}: no boldjax value for fixture outputs {unchecked}"
  failures, ratios = [], {}
  for name, tol in tolerances.items():
    if name not in actual:
      continue
    try:
      ratios[name] = parity.check(f"{case}/{name}", actual[name], outputs[name], tol)
    except AssertionError as e:
      failures.append(str(e)[:400])
  assert not failures, "\n".join(failures)
  worst = max(ratios, key=ratios.get)
  print(f"{case}: {len(ratios)} outputs checked, worst err/tol {ratios[worst]:.3g} ({worst}); "
        f"not counted (passed through unchanged by the original): {passthrough}")  # fmt: skip
  return passthrough


def _pretrain(model, params, inputs, style):
  """(loss_fn(params) -> (loss, outputs), extra arrays) for the fixture's pretraining run."""
  x = jnp.asarray(inputs["inputs"])
  t = jnp.asarray(inputs["t_rs"])
  am = jnp.asarray(inputs["attention_mask"]).astype(bool)
  B, S, P = x.shape
  ones = jnp.ones((B,), jnp.float32)
  if style == "csm":
    i = jnp.asarray(inputs["masking_i"]).astype(jnp.int32)

    def fn(p):
      out = model.apply({"params": p}, x, t, i, method="csm")
      target = jnp.take_along_axis(x, i[:, None, None], axis=1)[:, 0]
      out["masking_loss"] = out["loss"] = l1_rows(out["masked_predictions"], target, ones)
      return out["loss"], out

    mm = np.zeros((B, S, P), bool)
    mm[np.arange(B), np.asarray(i)] = True
  elif style in ("bert", "netbert"):
    if style == "bert":
      mm = np.broadcast_to(np.asarray(inputs["frame_mask"])[..., None], (B, S, P))
    else:
      mm = np.asarray(inputs["network_mask"])[:, None, :] & np.asarray(am)[..., None]
    tt = jnp.asarray(inputs["token_type_ids"]).astype(jnp.int32)
    is_next = jnp.asarray(inputs["is_next"]).astype(jnp.int32)

    def fn(p):
      out = model.apply({"params": p}, x, t, am, tt, jnp.asarray(mm), method="bert")
      out.update(bert_losses(out, x, is_next, ones))
      return out["loss"], out
  else:

    def fn(p):
      out = model.apply({"params": p}, x, t, False, method="autoencode")
      out["reconstruction_loss"] = out["loss"] = reconstruction_loss(out["outputs"], x, am, ones)
      return out["loss"], out

    mm = None
  return fn, mm


@functools.cache
def computed(case: str) -> tuple[dict, dict, dict, dict]:
  """(spec, actual, outputs, inputs) of a case, computed once."""
  spec, sd, inputs, outputs = parity.load(case)
  kwargs = model_kwargs_from_spec(spec, source=f"{case}/spec.json")
  params, st = convert_lfb(sd, num_heads=kwargs["num_heads"], source=f"{case}/state_dict")
  for key in ("style", "in_dim", "embed_dim", "num_layers", "embed_layers"):
    assert st[key] == kwargs[key], f"{case}: spec {key}={kwargs[key]} but weights imply {st[key]}"
  assert st["num_tr_embeddings"] == int(kwargs["tr_max"] / kwargs["tr_precision"]) + 1
  model = LfbModel(**kwargs, num_classes=st["num_classes"])
  # The converter is exactly invertible.
  back = params_to_torch(params, st, kwargs["num_heads"])
  assert set(back) <= set(sd)
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k], err_msg=k)
  # ...and the params fit the model exactly (names and shapes).
  x0 = jnp.zeros(inputs["inputs"].shape[:2] + (kwargs["in_dim"],))
  abstract = jax.eval_shape(
    lambda: model.init(jax.random.key(0), x0, x0[..., 0], x0[..., 0] == 0)["params"]
  )
  import flax.linen as nn

  want = jax.tree.map(lambda a: a.shape, nn.unbox(abstract))
  have = jax.tree.map(np.shape, params)
  assert want == have, f"{case}: params tree differs from LfbModel's"

  style = kwargs["style"]
  actual: dict[str, np.ndarray] = {}
  with jax.default_matmul_precision("highest"):
    fn, mm = _pretrain(model, params, inputs, style)
    (_, out), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
    out = jax.device_get(out)
    for key in out:
      if key in outputs or key.startswith(("prep/", "encoder/", "decoder/")):
        actual[key] = np.asarray(out[key])
    if style == "autoencoder":
      actual["encoder/hidden"] = np.asarray(out["encoder/hidden"])[None]
    if style == "csm":  # the inputs under boldjax's own modelling mask
      actual["prep/masked_inputs"] = inputs["inputs"][np.asarray(out["prep/modelling_mask"]) > 0]
    elif mm is not None:  # BERT: the mask is the fixture's draw (an input), applied as drawn
      actual["prep/masked_inputs"] = inputs["inputs"][mm]
    if style in ("bert", "netbert"):
      actual["masked_predictions"] = np.asarray(out["frame_predictions"])[mm]
    for name, g in params_to_torch(grads, st, kwargs["num_heads"]).items():
      actual[f"grad/{name}"] = g

    if st["num_classes"]:
      # A separate decoding batch when the fixture has one, else the pretraining inputs.
      dk = {k: f"decoding/{k}" if f"decoding/{k}" in inputs else k for k in _DECODING_KEYS}
      x = jnp.asarray(inputs[dk["inputs"]])
      t = jnp.asarray(inputs[dk["t_rs"]])
      am = jnp.asarray(inputs[dk["attention_mask"]]).astype(bool)
      labels = jnp.asarray(inputs[dk["labels"]]).astype(jnp.int32)
      dec = jax.device_get(
        jax.jit(lambda p: model.apply({"params": p}, x, t, am, method="decode"))(params)
      )
      ce = cross_entropy(jnp.asarray(dec["logits"]), labels, jnp.ones(labels.shape))
      actual.update({"decoding/decoding_loss": ce, "decoding/loss": ce})
      for key, value in dec.items():
        actual[f"decoding/{key}"] = np.asarray(value)

  return spec, {k: np.asarray(v) for k, v in actual.items()}, outputs, inputs


@pytest.mark.parametrize("case", CASES)
def test_lfb_parity(case: str) -> None:
  spec, actual, outputs, inputs = computed(case)
  passthrough = compare(case, spec, actual, outputs, inputs)
  # What the original passes through unchanged is named, and never more than that.
  assert all(p.split(" = ")[0].split("/")[-2] == "prep" for p in passthrough), passthrough


@pytest.mark.parametrize("case", CASES[:1])
def test_a_nan_in_any_output_fails_lfb_parity(case: str) -> None:
  spec, actual, outputs, inputs = computed(case)
  names = [n for n in actual if n in spec["tolerances"] and actual[n].dtype.kind == "f"]
  compare_case = lambda a, o: compare(case, spec, a, o, inputs)  # noqa: E731
  parity.assert_nan_fails(compare_case, actual, outputs, names)
