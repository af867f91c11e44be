"""Vision backbones: boldjax.models.vit + boldjax.convert.vision against open_clip and timm.

1. Parity on every openclip_vit* / timm_vit* fixture (open_clip 3.3.0 and timm 1.0.31
   outputs): every block, the final features, the pooled feature and the CLIP embedding,
   sizes from spec.json; get_tokens() read against the same block outputs.
2. The full-size key manifests (CLIP ViT-B/16 visual, DINOv2 ViT-S/14 reg4, MAE ViT-B/16):
   zero arrays of those names and shapes (np.broadcast_to: nothing allocated) convert with
   every key used and every param filled at jax.eval_shape's shapes of the matching preset.
3. Variants the fixtures do not cover (GELU vs QuickGELU, registers, position embedding on
   patches only, LayerScale, avg pool + fc_norm, interpolation to other image sizes, the
   `visual.` prefix with a text tower, a timm head, facebookresearch/dinov2's layout) against
   a float64 numpy forward written from the torch layout, and the errors for bad files.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import numpy as np
import pytest
from scipy.special import erf

from boldjax.cli import InputError
from boldjax.convert import files
from boldjax.convert.vision import config_from_state_dict, convert_state_dict, load_backbone
from boldjax.models.vit import (
  PRESETS,
  ViT,
  ViTConfig,
  abstract_params,
  get_tokens,
  resample_pos_grid,
)
from tests import parity

OPENCLIP = parity.cases("openclip_vit*")
TIMM = parity.cases("timm_vit*")
MANIFEST = {
  "openclip_ViT-B-16_visual": "clip_b16",
  "timm_vit_small_patch14_reg4_dinov2": "dinov2_s14",
  "timm_vit_base_patch16_224_mae": "mae_b16",
}


@functools.cache
def run(cfg: ViTConfig):
  """jitted ViT(cfg).apply at float32-exact matmuls (one compile per config)."""

  def fn(params, images):
    with jax.default_matmul_precision("highest"):
      return ViT(cfg).apply({"params": params}, images)

  return jax.jit(fn)


def flat_outputs(out: dict) -> dict[str, np.ndarray]:
  """ViT outputs under the fixtures' names: block{i}, features, pooled, embedding."""
  flat = {f"block{i}": np.asarray(b) for i, b in enumerate(out["blocks"])}
  flat.update({k: np.asarray(out[k]) for k in ("features", "pooled", "embedding")})
  return flat


# ---------------------------------------------------------------- 1. fixtures


def openclip_config(spec: dict) -> ViTConfig:
  args, v = spec["constructor_args"], spec["constructor_args"]["vision_cfg"]
  covered = {
    "attentional_pool": False, "pos_embed_type": "learnable", "pool_type": "tok",
    "qk_norm": False, "timm_model_name": None, "act_kwargs": None, "norm_kwargs": None,
  }  # fmt: skip
  for key, want in covered.items():
    assert v.get(key, want) == want, f"fixture option {key}={v[key]!r} is not covered here"
  return ViTConfig(
    image_size=v["image_size"], patch_size=v["patch_size"], width=v["width"],
    layers=v["layers"], heads=v["width"] // v["head_width"], mlp_ratio=v["mlp_ratio"],
    layerscale_init=v.get("ls_init_value"), ln_pre=not v.get("no_ln_pre", False),
    output_dim=args["embed_dim"], act="quick_gelu" if args.get("quick_gelu") else "gelu",
    ln_eps=1e-5, patch_bias=False, name=spec["case"],
  )  # fmt: skip


def timm_config(spec: dict) -> ViTConfig:
  a = spec["constructor_args"]
  pool = a.get("global_pool", "token")
  assert pool in ("token", "avg"), f"fixture global_pool={pool!r} is not covered here"
  fc_norm = a["fc_norm"] if a.get("fc_norm") is not None else pool == "avg"  # timm's rule
  return ViTConfig(
    image_size=a["img_size"], patch_size=a["patch_size"], width=a["embed_dim"],
    layers=a["depth"], heads=a["num_heads"], mlp_ratio=a.get("mlp_ratio", 4.0),
    num_registers=a.get("reg_tokens", 0), class_token=a.get("class_token", True),
    pos_embed_on="patches" if a.get("no_embed_class") else "all",
    layerscale_init=a.get("init_values"), qkv_bias=a.get("qkv_bias", True),
    ln_pre=bool(a.get("pre_norm", False)), final_norm=not fc_norm, fc_norm=fc_norm,
    pool=pool, ln_eps=1e-6, name=spec["case"],
  )  # fmt: skip


@functools.cache
def fixture_run(case: str):
  spec, sd, inputs, outputs = parity.load(case)
  cfg = openclip_config(spec) if spec["reference"]["library"] == "open_clip" else timm_config(spec)
  params, notes = convert_state_dict(sd, cfg, source=f"{case}/state_dict.npz")
  images = np.ascontiguousarray(inputs["images"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
  actual = flat_outputs(run(cfg)(params, images))
  return spec, sd, cfg, params, images, actual, outputs, notes


def compare(actual: dict, outputs: dict, spec: dict) -> None:
  missing = sorted(set(outputs) - set(actual))
  assert not missing, f"no boldjax value for fixture outputs {missing}"
  parity.check_all({k: actual[k] for k in outputs}, outputs, spec)


@pytest.mark.parametrize("case", OPENCLIP + TIMM)
def test_fixture_parity(case: str) -> None:
  spec, sd, cfg, params, images, actual, outputs, notes = fixture_run(case)
  compare(actual, outputs, spec)
  assert notes[0].endswith(f"{len(sd)} keys"), notes
  assert config_from_state_dict(sd, cfg) == cfg  # every size the weights show, read back

  # get_tokens: the same block outputs, patches on the grid, prefix tokens dropped.
  local, glob = jax.jit(get_tokens, static_argnums=2)(params, images, cfg)
  g = images.shape[1] // cfg.patch_size, images.shape[2] // cfg.patch_size
  for i in range(cfg.layers):
    block = outputs[f"block{i}"]
    tol = parity.tolerance(spec, f"block{i}")
    patches = block[:, cfg.num_prefix :].reshape(block.shape[0], *g, -1)
    parity.check(f"local{i}", np.asarray(local[:, i]), patches, tol)
    parity.check(f"global{i}", np.asarray(glob[:, i]), block[:, 0], tol)


@pytest.mark.parametrize("case", (OPENCLIP + TIMM)[:1])
def test_a_nan_in_any_output_fails_vision_parity(case: str) -> None:
  spec, *_, actual, outputs, _ = fixture_run(case)
  cmp = lambda a, o: compare(a, o, spec)  # noqa: E731
  parity.assert_nan_fails(cmp, actual, outputs, list(outputs))


# ---------------------------------------------------------------- 2. full-size manifests


@pytest.mark.parametrize("arch", sorted(MANIFEST))
def test_fullsize_keys_convert_completely(arch: str) -> None:
  path = parity.PARITY_DIR / "vision_fullsize_keys.json"
  if not path.exists():
    parity.absent(f"no key manifest {path}")
  shapes = json.loads(path.read_text())[arch]
  zero = np.float32(0.0)
  sd = {k: np.broadcast_to(zero, tuple(s)) for k, s in shapes.items()}  # no memory
  cfg = PRESETS[MANIFEST[arch]]
  params, notes = convert_state_dict(sd, cfg, source=arch)  # raises on any unused key
  assert notes[0].endswith(f"{len(shapes)} keys"), notes
  want = jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]
  have = jax.tree_util.tree_flatten_with_path(params)[0]
  want = {jax.tree_util.keystr(p): tuple(a.shape) for p, a in want}
  have = {jax.tree_util.keystr(p): tuple(a.shape) for p, a in have}
  assert have == want
  n_params = sum(int(np.prod(s)) for s in want.values())
  assert n_params == sum(int(np.prod(s)) for s in shapes.values())  # qkv split, nothing lost
  assert all(not np.any(a) for a in jax.tree.leaves(params))


# ---------------------------------------------------------------- 3. variants vs numpy


def _ln(x, w, b, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * w + b


def _act(x, act):
  if act == "quick_gelu":
    return x / (1.0 + np.exp(-1.702 * x))
  return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def _attn(x, w_qkv, b_qkv, w_out, b_out, heads):
  """torch's packed-qkv multi-head attention (nn.MultiheadAttention / timm Attention)."""
  b, n, c = x.shape
  qkv = x @ w_qkv.T + (0.0 if b_qkv is None else b_qkv)
  q, k, v = (qkv[..., i * c : (i + 1) * c].reshape(b, n, heads, -1) for i in range(3))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(c // heads)
  att = np.exp(logits - logits.max(-1, keepdims=True))
  att /= att.sum(-1, keepdims=True)
  y = np.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, n, c)
  return y @ w_out.T + b_out


def reference(sd: dict, v: dict, images: np.ndarray, resample=None) -> dict[str, np.ndarray]:
  """float64 forward of a torch-named state_dict, as open_clip / timm / dinov2 compute it.

  v: the variant's description (family, act, eps, heads, ...); images NHWC; resample(pos,
  new_grid): the library's position-embedding resampling (torch) for other image sizes.
  """
  sd = {k: np.asarray(a, np.float64) for k, a in sd.items()}
  if v["family"] == "open_clip":
    sd = {k[len("visual.") :]: a for k, a in sd.items() if k.startswith("visual.")} or sd
  clip = v["family"] == "open_clip"
  n = _NAMES["open_clip" if clip else "timm"]
  x = np.asarray(images, np.float64).transpose(0, 3, 1, 2)  # NCHW as torch
  w = sd[n["patch"] + ".weight"]
  p, c = w.shape[-1], w.shape[0]
  b, _, hh, ww = x.shape
  gh, gw = hh // p, ww // p
  x = x[:, :, : gh * p, : gw * p].reshape(b, -1, gh, p, gw, p)
  x = np.einsum("bciujv,ocuv->bijo", x, w).reshape(b, gh * gw, c)
  x = x + sd.get(n["patch"] + ".bias", 0.0)

  pos = sd[n["pos"]].reshape(1, -1, c)
  cls = sd[n["cls"]].reshape(1, 1, c) if n["cls"] in sd else None
  fb = v.get("facebook", False)  # dinov2's own layout: pos on [cls, patches], regs after
  regs = sd.get("register_tokens" if fb else n["reg"])
  n_pos_prefix = pos.shape[1] - v["grid"] ** 2
  if (gh, gw) != (v["grid"], v["grid"]):
    pos = np.concatenate([pos[:, :n_pos_prefix], resample(pos[:, n_pos_prefix:], (gh, gw))], 1)
  tile = lambda t: np.broadcast_to(t, (b,) + t.shape[1:])  # noqa: E731
  prefix = [tile(t) for t in (cls, regs) if t is not None]
  if fb:
    x = np.concatenate([tile(cls), x], 1) + pos
    x = np.concatenate([x[:, :1], tile(regs), x[:, 1:]], 1)
  elif n_pos_prefix == 0:  # timm no_embed_class
    x = np.concatenate(prefix + [x + pos], 1)
  else:
    x = np.concatenate(prefix + [x], 1) + pos
  eps = v["eps"]
  if n["ln_pre"] + ".weight" in sd:
    x = _ln(x, sd[n["ln_pre"] + ".weight"], sd[n["ln_pre"] + ".bias"], eps)
  out = {}
  for i in range(v["layers"]):
    g = functools.partial(lambda pre, name: sd.get(pre + name), f"{n['blocks']}{i}.")
    ls1, ls2 = g(n["ls1"]), g(n["ls2"])
    y = _ln(x, g(n["norm1"] + ".weight"), g(n["norm1"] + ".bias"), eps)
    y = _attn(y, g(n["qkv_w"]), g(n["qkv_b"]), g(n["out"] + ".weight"), g(n["out"] + ".bias"),
              v["heads"])  # fmt: skip
    x = x + (y if ls1 is None else y * ls1)
    y = _ln(x, g(n["norm2"] + ".weight"), g(n["norm2"] + ".bias"), eps)
    y = _act(y @ g(n["fc1"] + ".weight").T + g(n["fc1"] + ".bias"), v["act"])
    y = y @ g(n["fc2"] + ".weight").T + g(n["fc2"] + ".bias")
    x = x + (y if ls2 is None else y * ls2)
    out[f"block{i}"] = x
  if n["final"] + ".weight" in sd:
    x = _ln(x, sd[n["final"] + ".weight"], sd[n["final"] + ".bias"], eps)
  out["features"] = x
  pooled = x[:, 0] if v.get("pool", "token") == "token" else x[:, len(prefix) :].mean(1)
  if "fc_norm.weight" in sd:
    pooled = _ln(pooled, sd["fc_norm.weight"], sd["fc_norm.bias"], eps)
  out["pooled"] = pooled
  out["embedding"] = pooled @ sd["proj"] if clip and "proj" in sd else pooled
  return out


_NAMES = {  # written from open_clip's / timm's module names, independently of the converter
  "open_clip": dict(
    patch="conv1", cls="class_embedding", reg="-", pos="positional_embedding", ln_pre="ln_pre",
    blocks="transformer.resblocks.", final="ln_post", norm1="ln_1", qkv_w="attn.in_proj_weight",
    qkv_b="attn.in_proj_bias", out="attn.out_proj", ls1="ls_1.gamma", norm2="ln_2",
    fc1="mlp.c_fc", fc2="mlp.c_proj", ls2="ls_2.gamma",
  ),
  "timm": dict(
    patch="patch_embed.proj", cls="cls_token", reg="reg_token", pos="pos_embed",
    ln_pre="norm_pre", blocks="blocks.", final="norm", norm1="norm1", qkv_w="attn.qkv.weight",
    qkv_b="attn.qkv.bias", out="attn.proj", ls1="ls1.gamma", norm2="norm2", fc1="mlp.fc1",
    fc2="mlp.fc2", ls2="ls2.gamma",
  ),
}  # fmt: skip


def random_state_dict(v: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """Random torch-layout weights of a variant (every parameter away from its init)."""
  rng = np.random.default_rng(seed)
  c, p, m, grid = v["width"], v["patch"], v["width"] * 2, v["grid"]
  clip = v["family"] == "open_clip"
  n = _NAMES[v["family"]]
  r = lambda *s, scale=1.0: (rng.normal(size=s) * scale).astype(np.float32)  # noqa: E731
  lin = lambda o, i: r(o, i, scale=i**-0.5)  # noqa: E731
  sd = {n["patch"] + ".weight": r(c, 3, p, p, scale=(3 * p * p) ** -0.5)}
  if v.get("patch_bias", not clip):
    sd[n["patch"] + ".bias"] = r(c, scale=0.1)
  regs = v.get("registers", 0)
  if v.get("class_token", True):
    sd[n["cls"]] = r(c) if clip else r(1, 1, c)
  if regs:
    sd["register_tokens" if v.get("facebook") else "reg_token"] = r(1, regs, c)
  prefix = int(v.get("class_token", True)) + regs
  n_pos = grid**2 + (1 if v.get("facebook") else prefix if v.get("pos", "all") == "all" else 0)
  sd[n["pos"]] = r(n_pos, c, scale=0.5) if clip else r(1, n_pos, c, scale=0.5)

  def norm(name: str) -> None:
    sd[f"{name}.weight"], sd[f"{name}.bias"] = 1 + r(c, scale=0.2), r(c, scale=0.2)

  if v.get("ln_pre"):
    norm(n["ln_pre"])
  for i in range(v["layers"]):
    pre = f"{n['blocks']}{i}."
    norm(pre + n["norm1"])
    sd[pre + n["qkv_w"]] = lin(3 * c, c)
    sd[pre + n["qkv_b"]] = r(3 * c, scale=0.1)
    sd[pre + n["out"] + ".weight"], sd[pre + n["out"] + ".bias"] = lin(c, c), r(c, scale=0.1)
    norm(pre + n["norm2"])
    sd[pre + n["fc1"] + ".weight"], sd[pre + n["fc1"] + ".bias"] = lin(m, c), r(m, scale=0.1)
    sd[pre + n["fc2"] + ".weight"], sd[pre + n["fc2"] + ".bias"] = lin(c, m), r(c, scale=0.1)
    if v.get("layerscale"):
      sd[pre + n["ls1"]], sd[pre + n["ls2"]] = 0.5 + r(c, scale=0.2), 0.5 + r(c, scale=0.2)
  if v.get("final_norm", True):
    norm(n["final"])
  if v.get("fc_norm"):
    norm("fc_norm")
  if v.get("proj"):
    sd["proj"] = lin(v["proj"], c).T.copy()
  if v.get("head"):  # a timm classifier head
    sd["head.weight"], sd["head.bias"] = lin(10, c), r(10)
  if v.get("mask_token"):
    sd["mask_token"] = r(1, c)
  if v.get("text"):  # open_clip full checkpoint: visual. prefix + text tower
    sd = {f"visual.{k}": a for k, a in sd.items()}
    sd.update({"token_embedding.weight": r(20, 8), "positional_embedding": r(6, 8),
               "transformer.resblocks.0.ln_1.weight": r(8), "ln_final.weight": r(8),
               "text_projection": r(8, 8), "logit_scale": r()})  # fmt: skip
  return sd


def variant_config(v: dict) -> ViTConfig:
  clip = v["family"] == "open_clip"
  return ViTConfig(
    image_size=v["grid"] * v["patch"], patch_size=v["patch"], width=v["width"],
    layers=v["layers"], heads=v["heads"], mlp_ratio=2.0, num_registers=v.get("registers", 0),
    class_token=v.get("class_token", True),
    pos_embed_on="patches" if v.get("facebook") else v.get("pos", "all"),
    ln_pre=v.get("ln_pre", False), final_norm=v.get("final_norm", True),
    fc_norm=v.get("fc_norm", False), pool=v.get("pool", "token"), output_dim=v.get("proj"),
    act=v["act"], layerscale_init=0.1 if v.get("layerscale") else None, ln_eps=v["eps"],
    patch_bias=v.get("patch_bias", not clip), name=v["name"],
  )  # fmt: skip


BASE = dict(width=32, heads=4, layers=2, patch=8, grid=3)
CLIP = dict(BASE, family="open_clip", eps=1e-5, ln_pre=True, proj=24)
TIMMV = dict(BASE, family="timm", eps=1e-6, act="gelu")
VARIANTS = [
  dict(CLIP, name="clip_gelu_ls_text", act="gelu", layerscale=True, ln_pre=False, text=True),
  dict(CLIP, name="clip_quickgelu_resized", act="quick_gelu", size=(40, 32)),
  dict(TIMMV, name="timm_reg_patches_ls_head", registers=2, pos="patches", layerscale=True,
       head=True),
  dict(TIMMV, name="timm_reg_all", registers=3, pos="all", ln_pre=True),
  dict(TIMMV, name="timm_avg_fcnorm_noclass", class_token=False, pool="avg", final_norm=False,
       fc_norm=True),
  dict(TIMMV, name="timm_patches_resized", registers=1, pos="patches", size=(48, 32)),
  dict(TIMMV, name="dinov2_facebook_layout", registers=2, facebook=True, mask_token=True,
       layerscale=True, size=(32, 40)),
]  # fmt: skip


def torch_resample(pos: np.ndarray, new: tuple[int, int]) -> np.ndarray:
  """timm's resample_abs_pos_embed / open_clip's resize_pos_embed: bicubic, antialias."""
  torch = parity.torch()
  g = int(round(pos.shape[1] ** 0.5))
  t = torch.tensor(pos.reshape(1, g, g, -1), dtype=torch.float32).permute(0, 3, 1, 2)
  t = torch.nn.functional.interpolate(t, size=new, mode="bicubic", antialias=True,
                                      align_corners=False)  # fmt: skip
  return t.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], -1).double().numpy()


@pytest.mark.parametrize("v", VARIANTS, ids=[v["name"] for v in VARIANTS])
def test_variant_matches_numpy_reference(v: dict) -> None:
  sd = random_state_dict(v)
  cfg = variant_config(v)
  params, notes = convert_state_dict(sd, cfg, source=v["name"])
  size = v.get("size", (cfg.image_size, cfg.image_size))
  images = np.random.default_rng(1).normal(size=(2, *size, 3)).astype(np.float32)
  resample = torch_resample if "size" in v else None
  want = reference(sd, v, images, resample)
  got = flat_outputs(run(cfg)(params, images))
  tol = {"atol": 2e-5, "rtol": 1e-4}
  for k in want:
    parity.check(f"{v['name']}/{k}", got[k], want[k], tol)
  if v.get("text"):
    assert any("left 6 keys of the text tower" in s for s in notes), notes
  if v.get("head"):
    assert any("dropped the timm classifier head (head.weight (10, 32)" in s for s in notes)
  if v.get("facebook"):
    assert any("mask_token" in s for s in notes) and any("class position" in s for s in notes)
  # What the weights cannot show comes from the base; every size is read from the file.
  keep = ("heads", "act", "ln_eps", "layerscale_init", "pool", "name")
  base = ViTConfig(**{k: getattr(cfg, k) for k in keep})
  assert config_from_state_dict(sd, base) == cfg


def test_get_tokens_drops_registers_and_averages_without_class_token() -> None:
  v = VARIANTS[3]  # 3 registers, position embedding on all tokens
  cfg = variant_config(v)
  params, _ = convert_state_dict(random_state_dict(v), cfg)
  images = np.random.default_rng(2).normal(size=(2, 24, 32, 3)).astype(np.float32)  # 3 x 4
  out = run(cfg)(params, images)
  tokens = jax.jit(get_tokens, static_argnums=2)
  local, glob = tokens(params, images, cfg)
  assert local.shape == (2, cfg.layers, 3, 4, cfg.width) and glob.shape == (2, cfg.layers, 32)
  for i, block in enumerate(out["blocks"]):
    block = np.asarray(block)
    np.testing.assert_allclose(local[:, i], block[:, 4:].reshape(2, 3, 4, -1), atol=1e-5)
    np.testing.assert_allclose(glob[:, i], block[:, 0], atol=1e-5)
    assert not np.allclose(block[:, 1], block[:, 0], atol=1e-3)  # a register, not the cls
  v = VARIANTS[4]  # no class token: the global token is the mean patch token
  cfg = variant_config(v)
  params, _ = convert_state_dict(random_state_dict(v), cfg)
  local, glob = tokens(params, images, cfg)
  np.testing.assert_allclose(glob, np.asarray(local).mean(axis=(2, 3)), atol=1e-5)


@pytest.mark.parametrize("new", [(6, 6), (2, 2), (5, 3)])
def test_position_resampling_is_torch_bicubic_antialiased(new: tuple[int, int]) -> None:
  pos = np.random.default_rng(3).normal(size=(1, 16, 5)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    got = np.asarray(resample_pos_grid(pos, (4, 4), new))
  np.testing.assert_allclose(got, torch_resample(pos, new), atol=2e-6)


# ---------------------------------------------------------------- files and errors


def test_load_backbone_reads_safetensors_and_npz_and_refuses_pickles(tmp_path) -> None:
  v = VARIANTS[2]
  sd, cfg = random_state_dict(v), variant_config(v)
  params, _ = convert_state_dict(sd, cfg)
  st, npz = tmp_path / "w.safetensors", tmp_path / "w.npz"
  files.write_safetensors(str(st), {k: a.astype(np.float16) for k, a in sd.items()})
  np.savez(npz, **sd)
  from_npz, _ = load_backbone(str(npz), cfg)
  jax.tree.map(np.testing.assert_array_equal, from_npz, params)
  from_st, notes = load_backbone(str(st), cfg)
  assert "cast float16 weights to float32" in notes
  want = jax.tree.map(lambda a: a.astype(np.float16).astype(np.float32), params)
  jax.tree.map(np.testing.assert_array_equal, from_st, want)
  pt = tmp_path / "w.pt"
  pt.write_bytes(b"not read")
  with pytest.raises(InputError, match=r"w\.pt: is a torch pickle .*--allow-pickle"):
    load_backbone(str(pt), cfg)


def _errors_case():
  v = VARIANTS[2]  # timm: registers, patch-only positions, LayerScale, head
  return random_state_dict(v), variant_config(v)


def test_unused_key_is_named_with_the_config_field() -> None:
  sd, cfg = _errors_case()
  sd = {**sd, "blocks.0.attn.q_norm.weight": np.ones(8, np.float32)}
  with pytest.raises(InputError, match=r"f\.npz: 1 timm key\(s\) not used .*q_norm\.weight"):
    convert_state_dict(sd, cfg, source="f.npz")
  sd, cfg = _errors_case()
  no_ls = dataclasses.replace(cfg, layerscale_init=None)
  with pytest.raises(InputError, match=r"blocks\.0\.ls1\.gamma.*config\.layerscale_init=None"):
    convert_state_dict(sd, no_ls, source="f.npz")
  fewer = dataclasses.replace(cfg, layers=1)
  with pytest.raises(InputError, match=r"config\.layers=1"):
    convert_state_dict(sd, fewer, source="f.npz")


def test_wrong_shape_names_key_field_expected_and_found() -> None:
  sd, cfg = _errors_case()
  bigger = dataclasses.replace(cfg, image_size=32)  # grid 4: 16 positions, the file has 9
  with pytest.raises(
    InputError,
    match=r"f\.npz: pos_embed: shape expected \(1, 16, 32\), found \(1, 9, 32\) \(dim 1: "
    r"\(config\.image_size 32 // config\.patch_size 8\)\^2 \+ 0",
  ):
    convert_state_dict(sd, bigger, source="f.npz")
  wider = dataclasses.replace(cfg, width=48, heads=4)
  with pytest.raises(InputError, match=r"patch_embed\.proj\.weight: .*dim 0: config\.width = 48"):
    convert_state_dict(sd, wider, source="f.npz")


def test_missing_key_and_unknown_layout() -> None:
  sd, cfg = _errors_case()
  del sd["blocks.1.ls2.gamma"]
  with pytest.raises(InputError, match=r"blocks\.1\.ls2\.gamma: missing .*layerscale_init=0\.1"):
    convert_state_dict(sd, cfg, source="f.npz")
  with pytest.raises(InputError, match="expected an open_clip visual tower .* or a timm ViT"):
    convert_state_dict({"encoder.weight": np.zeros(2, np.float32)}, cfg)
  with pytest.raises(InputError, match=r"ViTConfig\(vit\)\.pos_embed_on: expected one of"):
    ViTConfig(pos_embed_on="cls")
