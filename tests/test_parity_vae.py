"""Parity of boldjax's KL-VAE (boldjax/models/vae.py) with diffusers' AutoencoderKL.

1. The sd_vae fixtures (sizes from spec.json): posterior mean and logvar of the images,
   decoded latents (fed unscaled) and reconstructions decode(posterior mean).
2. The diffusers_sd15_vae key manifest: zero arrays of the real SD-1.5 VAE's names and
   shapes (np.broadcast_to: nothing allocated) convert with every key used and every param
   of PRESETS["sd15"] filled at jax.eval_shape's shapes.
3. The fixture under the old attention names (query / key / value / proj_attn, also as
   1x1 convs) converts to identical params.
4. Other configurations against live diffusers with random weights (skipped without
   diffusers, a test-extra dependency).
5. Bad files: one line naming the key, the config field, expected and found.
6. `python -m boldjax.convert sd_vae` writes a workdir that gives the fixture outputs.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest

from boldjax.cli import InputError
from boldjax.convert.vae import (
  OLD_ATTENTION,
  SdVaeConverter,
  config_from_state_dict,
  convert_state_dict,
)
from boldjax.models import vae
from tests import parity

CASES = parity.cases("sd_vae*")
OUTPUTS = ("posterior_mean", "posterior_logvar", "decoded", "reconstruction")


def config_of(args: dict) -> vae.VAEConfig:
  """VAEConfig of diffusers AutoencoderKL constructor arguments."""
  for kinds in (args.get("down_block_types", ()), args.get("up_block_types", ())):
    assert set(kinds) <= {"DownEncoderBlock2D", "UpDecoderBlock2D"}, kinds
  return vae.VAEConfig(
    in_channels=int(args.get("in_channels", 3)),
    out_channels=int(args.get("out_channels", 3)),
    block_out_channels=tuple(int(c) for c in args["block_out_channels"]),
    layers_per_block=int(args.get("layers_per_block", 1)),
    norm_num_groups=int(args.get("norm_num_groups", 32)),
    latent_channels=int(args.get("latent_channels", 4)),
    mid_attention=bool(args.get("mid_block_add_attention", True)),
    name="fixture",
  )


nhwc = lambda a: np.ascontiguousarray(np.asarray(a).transpose(0, 2, 3, 1))  # noqa: E731
nchw = lambda a: np.asarray(a).transpose(0, 3, 1, 2)  # noqa: E731


@functools.partial(jax.jit, static_argnums=3)
def _forward(params, images, latents, config):
  mean, logvar = vae.encode(params, images, config)
  return mean, logvar, vae.decode(params, latents, config), vae.decode(params, mean, config)


def run(params, config: vae.VAEConfig, images: np.ndarray, latents: np.ndarray) -> dict:
  """The fixture's outputs, NCHW, from NCHW inputs."""
  outs = _forward(params, nhwc(images), nhwc(latents), config)
  return {name: nchw(v) for name, v in zip(OUTPUTS, outs, strict=True)}


@functools.cache
def fixture_run(case: str):
  spec, sd, inputs, outputs = parity.load(case)
  config = config_of(spec["constructor_args"])
  params, notes = convert_state_dict(sd, config, source=f"{case}/state_dict.npz")
  actual = run(params, config, inputs["images"], inputs["latents"])
  return spec, sd, config, params, actual, outputs, notes


def compare(actual: dict, outputs: dict, spec: dict) -> None:
  missing = sorted(set(outputs) - set(actual))
  assert not missing, f"no boldjax value for fixture outputs {missing}"
  parity.check_all({k: actual[k] for k in outputs}, outputs, spec)


# ---------------------------------------------------------------------- 1. fixtures


@pytest.mark.parametrize("case", CASES)
def test_fixture_parity(case: str) -> None:
  spec, sd, config, params, actual, outputs, notes = fixture_run(case)
  compare(actual, outputs, spec)
  assert notes[0].endswith(f"{len(sd)} keys"), notes
  assert config_from_state_dict(sd, config) == config  # every size the weights show


@pytest.mark.parametrize("case", CASES[:1])
def test_a_nan_in_any_output_fails_vae_parity(case: str) -> None:
  spec, *_, actual, outputs, _ = fixture_run(case)
  parity.assert_nan_fails(lambda a, o: compare(a, o, spec), actual, outputs, list(outputs))


@pytest.mark.parametrize("case", CASES[:1])
def test_sampling_and_module_api_agree_with_the_helpers(case: str) -> None:
  """__call__ without a key decodes the mean; with one, z = mean + std * eps exactly."""
  spec, sd, config, params, actual, outputs, _ = fixture_run(case)
  _, _, inputs, _ = parity.load(case)
  x = nhwc(inputs["images"])
  model = vae.AutoencoderKL(config)
  out = model.apply({"params": params}, x)
  np.testing.assert_allclose(nchw(out["mean"]), actual["posterior_mean"], rtol=0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out["z"]), np.asarray(out["mean"]))
  np.testing.assert_allclose(nchw(out["recon"]), actual["reconstruction"], rtol=0, atol=1e-5)
  key = jax.random.key(3)
  sampled = model.apply({"params": params}, x, sample_rng=key)
  eps = jax.random.normal(key, out["mean"].shape)
  want = out["mean"] + np.exp(0.5 * np.asarray(out["logvar"])) * eps
  np.testing.assert_allclose(np.asarray(sampled["z"]), want, rtol=1e-6, atol=1e-6)
  # encode / decode read only their halves of the params.
  assert set(vae.encoder_params(params)) == {"encoder", "quant_conv"}
  assert set(vae.decoder_params(params)) == {"post_quant_conv", "decoder"}
  assert set(params) == set(vae.PARTS)


def test_kl_matches_diagonal_gaussian_formula() -> None:
  rng = np.random.default_rng(0)
  mean = rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
  logvar = rng.normal(size=(3, 4, 4, 2)).astype(np.float32)
  want = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
  np.testing.assert_allclose(np.asarray(vae.kl_divergence(mean, logvar)), want, rtol=1e-5)
  zero = np.zeros((2, 4, 4, 4), np.float32)
  np.testing.assert_array_equal(np.asarray(vae.kl_divergence(zero, zero)), [0.0, 0.0])


# ---------------------------------------------------------------------- 2. full-size manifest


def test_sd15_manifest_converts_completely() -> None:
  path = parity.PARITY_DIR / "vision_fullsize_keys.json"
  if not path.exists():
    parity.absent(f"no key manifest {path}")
  manifest = json.loads(path.read_text())
  if "diffusers_sd15_vae" not in manifest:
    parity.absent(f"{path}: no entry diffusers_sd15_vae")
  shapes = manifest["diffusers_sd15_vae"]
  zero = np.float32(0.0)
  sd = {k: np.broadcast_to(zero, tuple(s)) for k, s in shapes.items()}  # no memory
  cfg = vae.PRESETS["sd15"]
  assert config_from_state_dict(sd, cfg) == cfg
  params, notes = convert_state_dict(sd, cfg, source="diffusers_sd15_vae")  # every key used
  assert notes[0].endswith(f"{len(shapes)} keys"), notes
  flat = lambda t: {jax.tree_util.keystr(p): tuple(a.shape)  # noqa: E731
                    for p, a in jax.tree_util.tree_flatten_with_path(t)[0]}  # fmt: skip
  want, have = flat(vae.abstract_params(cfg)), flat(params)
  assert want == have
  n = sum(int(np.prod(s)) for s in shapes.values())
  assert n == vae.num_params(cfg) == 83_653_863  # SD-1.5's VAE


# ---------------------------------------------------------------------- 3. old names


def old_names(sd: dict, conv: bool) -> dict:
  out = {}
  for key, value in sd.items():
    for new, old in OLD_ATTENTION.items():
      tail = f".attentions.0.{new}."
      if tail in key:
        key = key.replace(tail, f".attentions.0.{old}.")
        if conv and value.ndim == 2:
          value = value.reshape(*value.shape, 1, 1)
    out[key] = value
  return out


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv1x1"])
@pytest.mark.parametrize("case", CASES[:1])
def test_old_attention_names_convert_identically(case: str, conv: bool) -> None:
  _, sd, config, params, *_ = fixture_run(case)
  renamed = old_names(sd, conv)
  olds = tuple(f".{name}." for name in OLD_ATTENTION.values())
  assert sum(any(o in k for o in olds) for k in renamed) == 16  # 4 Linear x 2 x 2 blocks
  again, notes = convert_state_dict(renamed, config, source="old")
  assert any("old names" in n for n in notes), notes
  jax.tree.map(np.testing.assert_array_equal, again, params)
  prefixed, notes = convert_state_dict({f"vae.{k}": v for k, v in sd.items()}, config)
  assert "'vae.' prefix" in notes[1], notes
  jax.tree.map(np.testing.assert_array_equal, prefixed, params)


# ---------------------------------------------------------------------- 4. live diffusers

VARIANTS = [
  dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8, sample=16),
  dict(
    block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=8, sample=8
  ),  # fmt: skip
  dict(
    block_out_channels=(12, 24),
    layers_per_block=1,
    norm_num_groups=6,
    in_channels=1,
    out_channels=2,
    mid_block_add_attention=False,
    sample=8,
  ),  # fmt: skip
]


@pytest.mark.parametrize("v", VARIANTS, ids=lambda v: "-".join(map(str, v["block_out_channels"])))
def test_variant_matches_live_diffusers(v: dict) -> None:
  diffusers = pytest.importorskip("diffusers")
  torch = parity.torch()
  args = {k: val for k, val in v.items() if k != "sample"}
  levels = len(args["block_out_channels"])
  torch.manual_seed(0)
  ref = diffusers.AutoencoderKL(
    down_block_types=("DownEncoderBlock2D",) * levels,
    up_block_types=("UpDecoderBlock2D",) * levels,
    **args,
  ).eval()
  with torch.no_grad():  # default init leaves the norms at 1 / 0: make them matter
    for name, p in ref.named_parameters():
      if "norm" in name:
        p.add_(0.2 * torch.randn_like(p))
  sd = {k: t.detach().numpy() for k, t in ref.state_dict().items()}
  config = config_of(args)
  params, _ = convert_state_dict(sd, config)
  rng = np.random.default_rng(1)
  s, f = v["sample"], 2 ** (levels - 1)
  images = rng.uniform(-1, 1, (2, config.in_channels, s, s)).astype(np.float32)
  latents = rng.normal(size=(2, config.latent_channels, s // f, s // f)).astype(np.float32)
  with torch.no_grad():
    post = ref.encode(torch.from_numpy(images)).latent_dist
    want = {
      "posterior_mean": post.mean.numpy(),
      "posterior_logvar": post.logvar.numpy(),
      "decoded": ref.decode(torch.from_numpy(latents)).sample.numpy(),
      "reconstruction": ref.decode(post.mean).sample.numpy(),
    }
  actual = run(params, config, images, latents)
  tol = {"atol": 1e-4, "rtol": 1e-4}
  for name in OUTPUTS:
    parity.check(name, actual[name], want[name], tol)


# ---------------------------------------------------------------------- 5. errors


@pytest.fixture
def small():
  case = CASES[0]
  _, sd, config, *_ = fixture_run(case)
  return dict(sd), config


def test_missing_key_names_key_and_field(small) -> None:
  sd, config = small
  key = "decoder.up_blocks.1.resnets.1.conv2.bias"
  del sd[key]
  with pytest.raises(InputError) as e:
    convert_state_dict(sd, config, source="f.npz")
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith(f"f.npz: {key}: missing"), msg
  assert "config.layers_per_block=1" in msg, msg


def test_wrong_shape_names_key_dim_and_field(small) -> None:
  sd, config = small
  key = "encoder.down_blocks.1.resnets.0.conv1.weight"
  sd[key] = np.zeros((48, 32, 3, 3), np.float32)
  with pytest.raises(InputError) as e:
    convert_state_dict(sd, config, source="f.npz")
  msg = str(e.value)
  assert "\n" not in msg and key in msg, msg
  assert "expected (64, 32, 3, 3), found (48, 32, 3, 3)" in msg, msg
  assert "dim 0: config.block_out_channels[1] = 64, found 48" in msg, msg


def test_unused_keys_hint_the_config_field(small) -> None:
  sd, config = small
  fewer = dataclasses.replace(config, mid_attention=False)
  with pytest.raises(InputError, match=r"20 key\(s\) not used.*config.mid_attention=False"):
    convert_state_dict(sd, fewer, source="f.npz")


def test_not_a_vae_and_ldm_layout_are_refused() -> None:
  with pytest.raises(InputError, match="expected a diffusers AutoencoderKL"):
    convert_state_dict({"conv1.weight": np.zeros((2, 3, 3, 3))}, vae.VAEConfig())
  with pytest.raises(InputError, match="CompVis/ldm layout"):
    convert_state_dict({"encoder.down.0.block.0.norm1.weight": np.zeros(2)}, vae.VAEConfig())


def test_converter_names_the_config_model_field(small) -> None:
  """The registered sd_vae converter checks the file's sizes against task.model's config."""
  sd, config = small

  class Task:
    vae_config = dataclasses.replace(config, block_out_channels=(32, 64, 64), latent_channels=8)

  conv = SdVaeConverter()
  with pytest.raises(InputError) as e:
    conv.convert(sd, Task(), None, None, None, None, "sd.safetensors")
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("sd.safetensors: the VAE weights do not fit"), msg
  assert "config.model.block_out_channels: config (32, 64, 64), checkpoint (32, 64)" in msg
  assert "config.model.latent_channels: config 8, checkpoint 4" in msg, msg
  assert "set --config.model.block_out_channels=(32,64) --config.model.latent_channels=4" in msg

  class Fits:
    vae_config = config

  out = conv.convert(sd, Fits(), None, None, None, None, "sd.safetensors")
  jax.tree.map(np.testing.assert_array_equal, out.params, fixture_run(CASES[0])[3])
  path = ("decoder", "mid_block", "attentions_0", "to_out", "kernel")
  assert conv.torch_name(path) == "decoder.mid_block.attentions.0.to_out.0.weight"


# ---------------------------------------------------------------------- 6. the convert CLI


@pytest.mark.parametrize("case", CASES[:1])
def test_convert_cli_writes_a_vae_workdir_with_the_fixture_outputs(tmp_path, case) -> None:
  """`python -m boldjax.convert sd_vae FILE --config=configs/vae.py` (sizes as overrides):
  the workdir's params, loaded as fmri2img loads them, give the fixture's outputs; a file
  that does not fit leaves nothing behind."""
  from pathlib import Path

  from boldjax import workdir as workdir_lib
  from boldjax.convert import cli, files
  from boldjax.tasks.vae import vae_config

  spec, sd, config, *_ = fixture_run(case)
  _, _, inputs, outputs = parity.load(case)
  path = tmp_path / "diffusion_pytorch_model.safetensors"
  files.write_safetensors(str(path), {f"vae.{k}": v for k, v in sd.items()})
  conf = f"{Path(__file__).resolve().parents[1] / 'configs/vae.py'}:runlocal"
  base = [
    "sd_vae", str(path), f"--config={conf}", f"--config.data.cache_dir={tmp_path / 'cache'}"
  ]  # fmt: skip
  sizes = [
    f"--config.model.block_out_channels=({','.join(map(str, config.block_out_channels))})",
    f"--config.model.layers_per_block={config.layers_per_block}",
    f"--config.model.norm_num_groups={config.norm_num_groups}",
  ]
  with pytest.raises(InputError, match=r"--config.model.block_out_channels="):
    cli.main([*base, f"--workdir={tmp_path / 'bad'}"])
  assert not (tmp_path / "bad").exists()
  assert cli.main([*base, f"--workdir={tmp_path / 'w'}", *sizes]) == 0
  run_ = workdir_lib.load_run(str(tmp_path / "w"))
  got = vae_config(run_.config.model)
  assert dataclasses.replace(got, name="fixture") == config
  params = jax.device_get(run_.state.params)
  actual = run(params, got, inputs["images"], inputs["latents"])
  compare(actual, outputs, spec)
