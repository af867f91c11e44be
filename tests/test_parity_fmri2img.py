"""Parity with aaalgo/fmri2img FmriEncoder (models/basic_ae.py) on every fmri2img_basic_ae*
fixture: each layer's output (fc1..fc3 before GELU, the channel-major reshape, the transposed
conv = latent), the surrogate latent MSE and its gradients by torch name. Sizes come from
spec.json (constructor_args Din, config batch); NHWC outputs are compared in NCHW.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boldjax.cli import InputError
from boldjax.convert.fmri2img import (
  Fmri2ImgConverter,
  convert_fmri_encoder,
  params_to_torch,
)
from boldjax.models.fmri2img import FmriEncoder, conv_transpose_torch
from tests import parity

CASES = parity.cases("fmri2img_basic_ae*")
nchw = lambda a: np.transpose(np.asarray(a), (0, 3, 1, 2))  # noqa: E731


@functools.cache
def computed(case: str):
  """(spec, actual, outputs) of a case, computed once."""
  spec, sd, inputs, outputs = parity.load(case)
  din = int(spec["constructor_args"]["Din"])
  params, st = convert_fmri_encoder(sd, source=f"{case}/state_dict.npz")
  assert st["input_dim"] == din and st["dropped_vae"] == 0

  # The converter is exactly invertible...
  back = params_to_torch(params)
  assert set(back) == set(sd)
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k], err_msg=k)

  target = inputs["target_latent"]  # (B, C, H, W)
  fmri = inputs["fmri"]
  assert fmri.shape == (int(spec["config"]["batch"]), din)
  model = FmriEncoder(
    input_dim=din,
    hidden=st["hidden"],
    latent_hw=tuple(target.shape[2:]),
    latent_channels=st["latent_channels"],
  )
  # ...and the params fit the model exactly (names and shapes).
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), fmri)["params"])
  want = jax.tree.map(lambda a: a.shape, nn.unbox(abstract))
  assert want == jax.tree.map(np.shape, params), f"{case}: params tree differs from FmriEncoder's"

  target_nhwc = jnp.asarray(np.transpose(target, (0, 2, 3, 1)))

  def loss_fn(p):
    out = model.apply({"params": p}, fmri)
    return jnp.mean(jnp.square(out["latent"] - target_nhwc)), out

  with jax.default_matmul_precision("highest"):
    (loss, out), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  actual: dict[str, np.ndarray] = {"surrogate_latent_mse": np.asarray(loss)}
  for k in ("fc1_out", "fc2_out", "fc3_out"):
    actual[k] = np.asarray(out[k])
  for k in ("deconv1_in", "deconv1_out", "latent"):
    actual[k] = nchw(out[k])
  grads_torch = params_to_torch(grads)
  for name in outputs:
    if name.startswith("grad/"):
      actual[name] = grads_torch[name[len("grad/") :]]
  return spec, actual, outputs


compare = parity.compare_outputs


@pytest.mark.parametrize("case", CASES)
def test_fmri2img_parity(case: str) -> None:
  spec, actual, outputs = computed(case)
  assert set(spec["tolerances"]) <= set(outputs)
  compare(case, spec, actual, outputs)


@pytest.mark.parametrize("case", CASES)
def test_a_nan_in_any_output_fails_fmri2img_parity(case: str) -> None:
  spec, actual, outputs = computed(case)
  compare_case = lambda a, o: compare(case, spec, a, o)  # noqa: E731
  parity.assert_nan_fails(compare_case, actual, outputs, list(outputs), broken_value=np.inf)


@pytest.mark.parametrize("case", CASES)
def test_fmri2image_checkpoint_converts_identically(case: str) -> None:
  """The whole Fmri2Image form ('encoder.' prefix, frozen 'vae.' keys) gives the same params;
  missing and unknown keys and bad shapes are named."""
  _, sd, _, _ = parity.load(case)
  plain, _ = convert_fmri_encoder(sd)
  wrapped = {f"encoder.{k}": v for k, v in sd.items()}
  wrapped["vae.decoder.conv_in.weight"] = np.zeros((2, 2), np.float32)
  params, st = convert_fmri_encoder(wrapped)
  assert st["dropped_vae"] == 1
  jax.tree.map(np.testing.assert_array_equal, params, plain)
  with pytest.raises(KeyError, match="unknown Fmri2Image keys"):
    convert_fmri_encoder({**wrapped, "optimizer.step": np.zeros(3)})
  with pytest.raises(KeyError, match=r"missing keys \['fc2.bias'\]"):
    convert_fmri_encoder({k: v for k, v in sd.items() if k != "fc2.bias"})
  width = sd["fc2.bias"].shape[0]  # the fixture's fc2 width (2048 in the seed)
  with pytest.raises(KeyError, match=rf"fc2.bias: expected \({width},\), found \(3,\)"):
    convert_fmri_encoder({**sd, "fc2.bias": np.zeros(3, np.float32)})


def test_conv_transpose_matches_torch_for_other_sizes() -> None:
  """conv_transpose_torch against torch ConvTranspose2d (odd grids, other channels, padding
  0 and 2, stride 1 and 3): the kernel layout and flip are right beyond the fixture."""
  torch = parity.torch()
  rng = np.random.default_rng(0)
  for (cin, cout, k, s, p, h, w) in [(3, 5, 4, 2, 1, 5, 7), (2, 4, 3, 1, 0, 4, 4),
                                     (4, 2, 5, 3, 2, 3, 6)]:  # fmt: skip
    x = rng.normal(size=(2, cin, h, w)).astype(np.float32)
    wt = rng.normal(size=(cin, cout, k, k)).astype(np.float32)
    ref = torch.nn.functional.conv_transpose2d(torch.tensor(x), torch.tensor(wt), stride=s,
                                               padding=p).numpy()  # fmt: skip
    with jax.default_matmul_precision("highest"):
      got = conv_transpose_torch(np.transpose(x, (0, 2, 3, 1)), wt.transpose(2, 3, 0, 1), s, p)
    parity.check(f"conv_transpose {cin}->{cout} k{k} s{s} p{p}", nchw(got), ref,
                 {"atol": 1e-5, "rtol": 1e-5})  # fmt: skip


def test_fmri2img_converter_names_config_fields() -> None:
  """A checkpoint whose voxel count or widths differ from the config's model is refused in one
  line naming the config field, expected and found."""
  rng = np.random.default_rng(0)
  sd = {
    "fc1.weight": rng.normal(size=(32, 10)).astype(np.float32),
    "fc1.bias": np.zeros(32, np.float32),
    "fc2.weight": rng.normal(size=(64, 32)).astype(np.float32),
    "fc2.bias": np.zeros(64, np.float32),
    "deconv1.weight": rng.normal(size=(4, 3, 4, 4)).astype(np.float32),
    "deconv1.bias": np.zeros(3, np.float32),
  }

  class FakeTask:
    model = FmriEncoder(input_dim=12, hidden=(32, 64), latent_hw=(8, 8), latent_channels=3)

  conv = Fmri2ImgConverter()
  with pytest.raises(InputError, match=r"info.num_voxels \(config.data\)=12 but the checkpoint "
                                       r"has 10") as e:  # fmt: skip
    conv.convert(sd, FakeTask(), None, None, None, None, "ckpt.npz")
  assert "\n" not in str(e.value) and str(e.value).startswith("ckpt.npz: ")
  FakeTask.model = FakeTask.model.clone(input_dim=10)
  out = conv.convert(sd, FakeTask(), None, None, None, None, "ckpt.npz")
  assert out.params["deconv1"]["kernel"].shape == (4, 4, 4, 3)
  assert conv.torch_name(("deconv1", "kernel")) == "deconv1.weight"
  FakeTask.model = FakeTask.model.clone(latent_channels=4)
  with pytest.raises(InputError, match="config.model.latent_channels=4 but the checkpoint has 3"):
    conv.convert(sd, FakeTask(), None, None, None, None, "ckpt.npz")
