"""Import open_clip visual towers and timm ViTs (supervised, MAE, DINOv2 with registers) into
boldjax.models.vit params, with numpy only.

Layout differences handled here:
  - torch Linear weights are (out, in); flax kernels are (in, out). The patch conv
    (C, channels, p, p) becomes an NHWC conv kernel (p, p, channels, C).
  - attention packs q, k, v in one (3C, C) matrix (open_clip `attn.in_proj_weight`, timm
    `attn.qkv.weight`), rows [0:C] = q, [C:2C] = k, [2C:3C] = v, heads contiguous inside
    each; they become query / key / value (C, heads, head_dim), the output projection
    (heads, head_dim, C).
  - open_clip's class_embedding (C,) and positional_embedding (T, C) become cls_token
    (1, 1, C) and pos_embed (1, T, C); LayerNorm weight/bias become scale/bias.
What published files carry around the tower is taken off and said in a note: open_clip's
`visual.` prefix and its text tower, timm's classifier `head`, and facebookresearch/dinov2's
own layout (`mask_token` dropped; with `register_tokens`, the class position inside pos_embed
is added to cls_token as timm's _convert_dinov2 does: exact at every image size, since DINOv2
never resamples the class position).
Every key must be used and every param filled with the shape jax.eval_shape gives for the
config; anything else is an InputError naming the torch key and the config field.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from boldjax import registry
from boldjax.cli import InputError
from boldjax.convert.converter import Converted, Converter
from boldjax.convert.files import load_state_dict, write_safetensors
from boldjax.convert.tree import check_filled, set_path
from boldjax.models.vit import ViTConfig, abstract_params

Params = Any
Put = Callable[[np.ndarray], list[tuple[tuple[str, ...], np.ndarray]]]

# Torch names per family (None: the family has no such part).
FAMILIES: dict[str, dict[str, str | None]] = {
  "open_clip": {
    "patch": "conv1", "cls": "class_embedding", "reg": None, "pos": "positional_embedding",
    "ln_pre": "ln_pre", "blocks": "transformer.resblocks.", "final": "ln_post",
    "fc_norm": None, "proj": "proj", "norm1": "ln_1", "qkv_w": "attn.in_proj_weight",
    "qkv_b": "attn.in_proj_bias", "out": "attn.out_proj", "ls1": "ls_1.gamma",
    "norm2": "ln_2", "fc1": "mlp.c_fc", "fc2": "mlp.c_proj", "ls2": "ls_2.gamma",
  },
  "timm": {
    "patch": "patch_embed.proj", "cls": "cls_token", "reg": "reg_token", "pos": "pos_embed",
    "ln_pre": "norm_pre", "blocks": "blocks.", "final": "norm", "fc_norm": "fc_norm",
    "proj": None, "norm1": "norm1", "qkv_w": "attn.qkv.weight", "qkv_b": "attn.qkv.bias",
    "out": "attn.proj", "ls1": "ls1.gamma", "norm2": "norm2", "fc1": "mlp.fc1",
    "fc2": "mlp.fc2", "ls2": "ls2.gamma",
  },
}  # fmt: skip
TIMM_HEAD = ("head.weight", "head.bias")

# Unused keys that a config field would have used: named in the error as a hint.
_HINTS = (
  (re.compile(r"(^|\.)ls_?[12]\.gamma$"), "layerscale_init"),
  (re.compile(r"^(ln_pre|norm_pre)\."), "ln_pre"),
  (re.compile(r"^(ln_post|norm)\."), "final_norm"),
  (re.compile(r"^fc_norm\."), "fc_norm"),
  (re.compile(r"^reg_token$"), "num_registers"),
  (re.compile(r"^proj$"), "output_dim"),
  (re.compile(r"^(conv1|patch_embed\.proj)\.bias$"), "patch_bias"),
  (re.compile(r"(in_proj_bias|qkv\.bias)$"), "qkv_bias"),
  (re.compile(r"^(cls_token|class_embedding)$"), "class_token"),
  (re.compile(r"^(blocks|transformer\.resblocks)\.(\d+)\."), "layers"),
)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One torch key: its expected shape (each dim with what in the config sets it), where its
  value goes, and the config field that makes the key expected (None: always expected)."""

  key: str
  dims: tuple[tuple[int, str], ...]
  put: Put
  field: str | None = None


def _to(path: tuple[str, ...], fn: Callable[[np.ndarray], np.ndarray] = lambda a: a) -> Put:
  return lambda a: [(path, fn(a))]


def _linear(module: tuple[str, ...], torch: str, out: tuple, inp: tuple, bias: bool,
            field: str | None = None) -> list[Entry]:  # fmt: skip
  entries = [Entry(f"{torch}.weight", (out, inp), _to(module + ("kernel",), np.transpose), field)]
  if bias:
    entries.append(Entry(f"{torch}.bias", (out,), _to(module + ("bias",)), field))
  return entries


def _norm(module: tuple[str, ...], torch: str, width: tuple, field: str | None = None) -> list:
  return [
    Entry(f"{torch}.weight", (width,), _to(module + ("scale",)), field),
    Entry(f"{torch}.bias", (width,), _to(module + ("bias",)), field),
  ]


def _split_qkv(block: tuple[str, ...], leaf: str, heads: int) -> Put:
  """(3C, C) weight or (3C,) bias -> query / key / value kernel (C, h, d) or bias (h, d)."""

  def put(a: np.ndarray) -> list[tuple[tuple[str, ...], np.ndarray]]:
    c = a.shape[0] // 3
    parts = []
    for i, name in enumerate(("query", "key", "value")):
      w = a[i * c : (i + 1) * c]
      w = w.T.reshape(w.shape[1], heads, c // heads) if w.ndim == 2 else w.reshape(heads, -1)
      parts.append((block + ("attn", name, leaf), w))
    return parts

  return put


def entries(config: ViTConfig, family: str) -> list[Entry]:
  """Every torch key the config expects in a `family` state_dict, with its shape and target."""
  names, cfg = FAMILIES[family], config
  if family == "open_clip" and cfg.num_registers:
    raise InputError(f"config.num_registers={cfg.num_registers}: open_clip towers have none")
  if family == "timm" and cfg.output_dim is not None:
    raise InputError(
      f"config.output_dim={cfg.output_dim}: timm ViTs have no projection (their `head` is a "
      "classifier and is dropped); set output_dim=None"
    )
  if family == "open_clip" and cfg.fc_norm:
    raise InputError("config.fc_norm=True: open_clip towers have no fc_norm")
  c, h = cfg.width, cfg.heads
  W = (c, "config.width")
  W3 = (3 * c, "3 * config.width")
  M = (cfg.mlp_dim, f"config.width * config.mlp_ratio ({c} * {cfg.mlp_ratio})")
  P = (cfg.patch_size, "config.patch_size")
  n_pre = cfg.num_pos - cfg.grid**2
  T = (
    cfg.num_pos,
    f"(config.image_size {cfg.image_size} // config.patch_size {cfg.patch_size})^2 + {n_pre} "
    f"prefix position(s) (config.pos_embed_on={cfg.pos_embed_on!r}, class_token="
    f"{cfg.class_token}, num_registers={cfg.num_registers})",
  )
  one = (1, "1")
  out: list[Entry] = []
  patch = (cfg.width, "config.width"), (cfg.channels, "config.channels"), P, P
  out.append(Entry(f"{names['patch']}.weight", patch, _to(("patch_embed", "kernel"), _conv_kernel)))
  if cfg.patch_bias:
    out.append(Entry(f"{names['patch']}.bias", (W,), _to(("patch_embed", "bias")), "patch_bias"))
  if cfg.class_token:
    dims = (W,) if family == "open_clip" else (one, one, W)
    out.append(Entry(names["cls"], dims, _to(("cls_token",), _reshape(1, 1, c)), "class_token"))
  if cfg.num_registers:
    dims = (one, (cfg.num_registers, "config.num_registers"), W)
    out.append(Entry(names["reg"], dims, _to(("reg_tokens",)), "num_registers"))
  dims = (T, W) if family == "open_clip" else (one, T, W)
  out.append(Entry(names["pos"], dims, _to(("pos_embed",), _reshape(1, cfg.num_pos, c))))
  if cfg.ln_pre:
    out += _norm(("ln_pre",), names["ln_pre"], W, "ln_pre")
  for i in range(cfg.layers):
    pre, blk = f"{names['blocks']}{i}.", (f"blocks_{i}",)
    out += _norm(blk + ("norm1",), pre + names["norm1"], W, "layers")
    out.append(Entry(pre + names["qkv_w"], (W3, W), _split_qkv(blk, "kernel", h), "layers"))
    if cfg.qkv_bias:
      out.append(Entry(pre + names["qkv_b"], (W3,), _split_qkv(blk, "bias", h), "qkv_bias"))
    out_kernel = _to(blk + ("attn", "out", "kernel"), lambda a: a.T.reshape(h, c // h, c))
    out.append(Entry(pre + names["out"] + ".weight", (W, W), out_kernel, "layers"))
    out.append(Entry(pre + names["out"] + ".bias", (W,), _to(blk + ("attn", "out", "bias"))))
    out += _norm(blk + ("norm2",), pre + names["norm2"], W, "layers")
    out += _linear(blk + ("mlp", "fc1"), pre + names["fc1"], M, W, True, "layers")
    out += _linear(blk + ("mlp", "fc2"), pre + names["fc2"], W, M, True, "layers")
    if cfg.layerscale_init is not None:
      for ls in ("ls1", "ls2"):
        out.append(Entry(pre + names[ls], (W,), _to(blk + (ls, "gamma")), "layerscale_init"))
  if cfg.final_norm:
    out += _norm(("norm",), names["final"], W, "final_norm")
  if cfg.fc_norm:
    out += _norm(("fc_norm",), names["fc_norm"], W, "fc_norm")
  if cfg.output_dim is not None:
    dims = (W, (cfg.output_dim, "config.output_dim"))
    out.append(Entry(names["proj"], dims, _to(("proj", "kernel")), "output_dim"))
  return out


def _conv_kernel(a: np.ndarray) -> np.ndarray:
  return a.transpose(2, 3, 1, 0)  # (C, ch, p, p) -> (p, p, ch, C)


def _reshape(*shape: int) -> Callable[[np.ndarray], np.ndarray]:
  return lambda a: a.reshape(shape)


def take_tower(sd: Mapping[str, np.ndarray]) -> tuple[str, dict[str, np.ndarray], list[str]]:
  """(family, the tower's own state_dict, notes): what surrounds the tower is taken off."""
  sd, notes = dict(sd), []
  if any(k.startswith("visual.") for k in sd):
    rest = sorted(k for k in sd if not k.startswith("visual."))
    sd = {k[len("visual.") :]: v for k, v in sd.items() if k.startswith("visual.")}
    notes.append(
      f"took the visual tower ('visual.' prefix, {len(sd)} keys); left {len(rest)} keys of "
      f"the text tower and logit scale" + (f" ({', '.join(rest[:3])}, ...)" if rest else "")
    )
  if any(k.startswith("trunk.") for k in sd):
    raise InputError(
      "open_clip towers with a timm trunk (visual.trunk.*) are not supported: convert the "
      "timm model's own checkpoint instead"
    )
  if "conv1.weight" in sd or "class_embedding" in sd:
    family = "open_clip"
  elif "patch_embed.proj.weight" in sd:
    family = "timm"
  else:
    raise InputError(
      "state_dict: expected an open_clip visual tower (conv1.weight, class_embedding) or a "
      f"timm ViT (patch_embed.proj.weight), found keys {sorted(sd)[:6]}"
    )
  if family == "timm":
    head = [k for k in TIMM_HEAD if k in sd]
    if head:
      shapes = ", ".join(f"{k} {tuple(sd[k].shape)}" for k in head)
      notes.append(f"dropped the timm classifier head ({shapes}): the ViT returns features")
      for k in head:
        del sd[k]
    if "mask_token" in sd or "register_tokens" in sd:
      notes += _fold_dinov2(sd)
  return family, sd, notes


def _fold_dinov2(sd: dict[str, np.ndarray]) -> list[str]:
  """facebookresearch/dinov2 layout -> timm's (in place)."""
  notes = []
  if "mask_token" in sd:
    del sd["mask_token"]
    notes.append("dropped DINOv2's mask_token (used only in training)")
  if "register_tokens" not in sd:
    return notes  # no registers: timm keeps this layout (pos_embed_on='all')
  sd["reg_token"] = sd.pop("register_tokens")
  pos, cls = sd.get("pos_embed"), sd.get("cls_token")
  if pos is not None and cls is not None and pos.ndim == 3 and _is_square(pos.shape[1] - 1):
    sd["cls_token"] = np.asarray(cls, np.float32) + np.asarray(pos[:, :1], np.float32)
    sd["pos_embed"] = pos[:, 1:]
    notes.append(
      "facebookresearch/dinov2 layout with registers: added the class position to cls_token "
      "and kept the patch positions (pos_embed_on='patches'), as timm's _convert_dinov2 does"
    )
  return notes


def _shape_error(source: str, e: Entry, found: tuple[int, ...]) -> InputError:
  want = tuple(n for n, _ in e.dims)
  if len(found) != len(want):
    detail = f"rank {len(want)} expected"
  else:
    pairs = enumerate(zip(e.dims, found, strict=True))
    detail = "; ".join(f"dim {i}: {w} = {n}, found {f}" for i, ((n, w), f) in pairs if n != f)
  return InputError(f"{source}: {e.key}: shape expected {want}, found {found} ({detail})")


def _unused_error(source: str, family: str, unused: list[str], config: ViTConfig) -> InputError:
  hints = []
  for key in unused:
    for pattern, field in _HINTS:
      m = pattern.search(key)
      if m and (field != "layers" or int(m.group(2)) >= config.layers):
        hint = f"config.{field}={getattr(config, field)!r}"
        if hint not in hints:
          hints.append(hint)
        break
  shown = ", ".join(unused[:8]) + (f", ... ({len(unused)} in all)" if len(unused) > 8 else "")
  why = f" (check {', '.join(hints)})" if hints else ""
  return InputError(
    f"{source}: {len(unused)} {family} key(s) not used by the ViT the config describes: "
    f"{shown}{why}"
  )


def convert_state_dict(
  sd: Mapping[str, np.ndarray], config: ViTConfig, *, source: str = "state_dict"
) -> tuple[Params, list[str]]:
  """(params for ViT(config), notes) from an open_clip or timm state_dict (numpy arrays)."""
  family, sd, notes = take_tower(sd)
  notes.insert(0, f"{family} ViT, {len(sd)} keys")
  params: dict[str, Any] = {}
  cast = set()
  for e in entries(config, family):
    if e.key not in sd:
      why = f"config.{e.field}={getattr(config, e.field)!r} expects it" if e.field else "needed"
      raise InputError(f"{source}: {e.key}: missing from the {family} checkpoint ({why})")
    value = sd.pop(e.key)
    if tuple(value.shape) != tuple(n for n, _ in e.dims):
      raise _shape_error(source, e, tuple(value.shape))
    if value.dtype != np.float32:
      cast.add(str(value.dtype))
    for path, array in e.put(np.asarray(value, np.float32)):
      set_path(params, path, array)
  if sd:
    raise _unused_error(source, family, sorted(sd), config)
  if cast:
    notes.append(f"cast {', '.join(sorted(cast))} weights to float32")
  check_filled(params, abstract_params(config), source, f"config {config.name!r}")
  return params, notes


def load_backbone(
  path: str, config: ViTConfig, *, allow_pickle: bool = False
) -> tuple[Params, list[str]]:
  """(params, notes) of a .safetensors / .npz (torch pickles only with allow_pickle) file."""
  sd, notes = load_state_dict(path, allow_pickle=allow_pickle)
  params, more = convert_state_dict(sd, config, source=path)
  return params, notes + more


def config_from_state_dict(sd: Mapping[str, np.ndarray], base: ViTConfig) -> ViTConfig:
  """`base` with every size the weights show replaced by theirs (width, layers, patch size,
  image size, registers, which norms, LayerScale, projection). What the weights cannot
  show (heads, activation, eps, pooling) stays as `base` says."""
  family, sd, _ = take_tower(sd)
  n = FAMILIES[family]
  patch = sd[f"{n['patch']}.weight"]
  width, channels, p = patch.shape[0], patch.shape[1], patch.shape[2]
  blocks = {int(m.group(1)) for k in sd if (m := re.match(re.escape(n["blocks"]) + r"(\d+)\.", k))}
  fc1 = sd.get(f"{n['blocks']}0.{n['fc1']}.weight")
  class_token = n["cls"] in sd
  regs = sd[n["reg"]].shape[1] if n["reg"] and n["reg"] in sd else 0
  pos_len = sd[n["pos"]].shape[-2]
  prefix = int(class_token) + regs
  on_all, on_patches = _is_square(pos_len - prefix), _is_square(pos_len)
  pos_on = base.pos_embed_on if (on_all and on_patches) else ("all" if on_all else "patches")
  grid = math.isqrt(pos_len - (prefix if pos_on == "all" else 0))
  has_ls = f"{n['blocks']}0.{n['ls1']}" in sd
  has = lambda name: name is not None and f"{name}.weight" in sd  # noqa: E731
  return dataclasses.replace(
    base,
    image_size=grid * p, patch_size=p, width=width, channels=channels, layers=len(blocks),
    mlp_ratio=(fc1.shape[0] / width) if fc1 is not None else base.mlp_ratio,
    num_registers=regs, class_token=class_token, pos_embed_on=pos_on,
    ln_pre=has(n["ln_pre"]), final_norm=has(n["final"]), fc_norm=has(n["fc_norm"]),
    output_dim=sd["proj"].shape[1] if family == "open_clip" and "proj" in sd else None,
    layerscale_init=(base.layerscale_init or 1e-5) if has_ls else None,
    qkv_bias=f"{n['blocks']}0.{n['qkv_b']}" in sd, patch_bias=f"{n['patch']}.bias" in sd,
    pool=base.pool if class_token else "avg",
  )  # fmt: skip


def _is_square(n: int) -> bool:
  return n > 0 and math.isqrt(n) ** 2 == n


# ------------------------------------------------------------ `python -m boldjax.convert`

BACKBONE_FILE = "backbone.safetensors"
# What config_from_state_dict reads from the weights, compared with config.data.backbone.
_READ_FROM_WEIGHTS = (
  "image_size", "patch_size", "width", "channels", "layers", "mlp_ratio", "num_registers",
  "class_token", "pos_embed_on", "ln_pre", "final_norm", "fc_norm", "output_dim",
  "layerscale_init", "qkv_bias", "patch_bias",
)  # fmt: skip


def _arch_value(field: str, value: Any) -> Any:
  """A ViTConfig value as config.data.backbone.arch spells it (0 for None)."""
  if field in ("output_dim", "layerscale_init") and value is None:
    return 0
  return value


def check_backbone_sizes(tower: Mapping[str, np.ndarray], config: ViTConfig, source: str) -> None:
  """The sizes the weights show against the config's ViT; a mismatch names the arch field."""
  found = config_from_state_dict(tower, config)
  diffs = []
  for field in _READ_FROM_WEIGHTS:
    want, have = getattr(config, field), getattr(found, field)
    if field == "layerscale_init":  # the weights show only whether there is LayerScale
      want, have = want is not None, have is not None
      if want != have:
        diffs.append((field, config.layerscale_init, 1e-5 if have else None))
    elif want != have:
      diffs.append((field, want, have))
  if diffs:
    shown = "; ".join(f"{f}: config {_arch_value(f, w)!r}, checkpoint {_arch_value(f, h)!r}"
                      for f, w, h in diffs)  # fmt: skip
    flags = " ".join(f"--config.data.backbone.arch.{f}={_arch_value(f, h)}" for f, _, h in diffs)
    raise InputError(
      f"{source}: the weights do not fit config.data.backbone (ViT {config.name!r}): "
      f"{shown}; set {flags} (heads, act and ln_eps are not in the "
      "weights: check them too)"
    )


class VisionConverter(Converter):
  """A published open_clip visual tower or timm ViT as the frozen backbone of 'encoding'.

  The encoding task trains FactorTopy on cached tokens; the backbone is not among its params.
  So the workdir gets the tower itself (checked against config.data.backbone, written
  torch-free as WORKDIR/backbone.safetensors) and a config whose data.backbone.weights
  names it; FactorTopy starts from its fresh init. Building the state runs the backbone over
  the stimulus set once: the token cache it writes is keyed by the tower's sha256, so
  training on the converted backbone reads it.
  """

  tasks = ("encoding",)

  def __init__(self, family: str):
    self.name = family
    self._scratch_path: str | None = None

  def configure(self, config, sd, source, scratch) -> list:
    from boldjax.data import backbones

    bcfg = config.data.backbone
    given = str(bcfg.get("weights") or "")
    if given:
      raise InputError(
        f"config.data.backbone.weights: expected it unset (the converter points it at the "
        f"tower of {source}), found {given!r}"
      )
    family, tower, notes = take_tower(sd)
    if family != self.name:
      raise InputError(
        f"{source}: expected {self.name} weights, found a {family} state_dict (run "
        f"`python -m boldjax.convert {family} ...`)"
      )
    vit_config = backbones.backbone_config(bcfg)
    check_backbone_sizes(tower, vit_config, source)
    _, more = convert_state_dict(tower, vit_config, source=source)  # every key and shape
    path = os.path.join(scratch, BACKBONE_FILE)
    write_safetensors(path, tower)
    with config.unlocked():
      bcfg.weights = path
    self._scratch_path = path
    n = sum(int(np.prod(a.shape)) for a in tower.values())
    return (
      notes
      + more
      + [
        f"config.data.backbone.weights = WORKDIR/{BACKBONE_FILE} (the {family} tower, "
        f"{len(tower)} tensors, {n:,} parameters, checked against {vit_config.name!r})",
        "FactorTopy starts from its fresh init: train it on this backbone with "
        f"--config.data.backbone.weights=WORKDIR/{BACKBONE_FILE} and the same config",
      ]
    )

  def convert(self, sd, task, fresh, fresh_extra, info, options, source) -> Converted:
    del sd, task, fresh_extra, options, source
    scratch = self._scratch_path

    def save(f) -> None:
      with open(scratch, "rb") as src:
        shutil.copyfileobj(src, f)

    notes = [f"token cache of this tower (reused by training): {info.tokens_path}"]
    return Converted(params=fresh, notes=notes, artifacts={BACKBONE_FILE: save})

  def finalize_config(self, config, workdir) -> None:
    if self._scratch_path and config.data.backbone.get("weights") == self._scratch_path:
      with config.unlocked():
        config.data.backbone.weights = os.path.join(workdir, BACKBONE_FILE)
    self._scratch_path = None


for _family in FAMILIES:
  registry.register("converter", _family)(VisionConverter(_family))
