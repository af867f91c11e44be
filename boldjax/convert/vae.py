"""Import diffusers AutoencoderKL state_dicts (Stable Diffusion's VAE) into
boldjax.models.vae params, with numpy only.

Layout differences handled here:
  - torch Conv2d weights (O, I, kh, kw) become flax kernels (kh, kw, I, O); GroupNorm
    weight/bias become scale/bias.
  - the mid-block attention's Linear weights (out, in) become kernels (in, out). diffusers
    >= 0.14 names them to_q / to_k / to_v / to_out.0; older files (and many published
    SD-1.5 VAEs) use query / key / value / proj_attn, some stored as 1x1 convs
    (C, C, 1, 1): every combination loads to the same params.
  - module lists `down_blocks.0.resnets.1` become `down_blocks_0/resnets_1`.
A `vae.` prefix (a VAE saved inside a pipeline) is taken off with a note. Every key must be
used and every param filled with the shape jax.eval_shape gives for the config; anything
else is an InputError naming the torch key and the config field.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from boldjax import registry
from boldjax.cli import InputError
from boldjax.convert.converter import Converted, Converter
from boldjax.convert.tree import check_filled, set_path
from boldjax.models.vae import VAEConfig, abstract_params

Params = Any
Dim = tuple[int, str]  # (size, what in the config sets it)

# New attention names -> the names of diffusers < 0.14 (and many published SD files).
OLD_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
PREFIX = "vae."
# Fields the weights show; norm_num_groups, norm_eps and scaling_factor they do not.
FROM_WEIGHTS = (
  "in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
  "mid_attention",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Entry:
  """One torch key: its shape (each dim with what in the config sets it), the flax path its
  value goes to, the layout change, and the config field that makes it expected."""

  key: str
  dims: tuple[Dim, ...]
  path: tuple[str, ...]
  layout: str  # "conv" | "linear" | "same"
  field: str | None = None


def _conv(torch: str, path: tuple[str, ...], out: Dim, inp: Dim, k: int, field=None) -> list:
  kdim = (k, f"{k}x{k} kernel")
  return [
    Entry(f"{torch}.weight", (out, inp, kdim, kdim), path + ("kernel",), "conv", field),
    Entry(f"{torch}.bias", (out,), path + ("bias",), "same", field),
  ]


def _norm(torch: str, path: tuple[str, ...], width: Dim, field=None) -> list:
  return [
    Entry(f"{torch}.weight", (width,), path + ("scale",), "same", field),
    Entry(f"{torch}.bias", (width,), path + ("bias",), "same", field),
  ]


def _resnet(torch: str, path: tuple[str, ...], cin: Dim, cout: Dim, field: str) -> list:
  out = _norm(f"{torch}.norm1", path + ("norm1",), cin, field)
  out += _conv(f"{torch}.conv1", path + ("conv1",), cout, cin, 3, field)
  out += _norm(f"{torch}.norm2", path + ("norm2",), cout, field)
  out += _conv(f"{torch}.conv2", path + ("conv2",), cout, cout, 3, field)
  if cin[0] != cout[0]:
    out += _conv(f"{torch}.conv_shortcut", path + ("conv_shortcut",), cout, cin, 1,
                 "block_out_channels")  # fmt: skip
  return out


def _mid(torch: str, path: tuple[str, ...], c: Dim, config: VAEConfig) -> list:
  out = _resnet(f"{torch}.resnets.0", path + ("resnets_0",), c, c, "block_out_channels")
  if config.mid_attention:
    a, ap = f"{torch}.attentions.0", path + ("attentions_0",)
    out += _norm(f"{a}.group_norm", ap + ("group_norm",), c, "mid_attention")
    for name in OLD_ATTENTION:
      leaf = ap + (name.split(".")[0],)
      out.append(Entry(f"{a}.{name}.weight", (c, c), leaf + ("kernel",), "linear",
                       "mid_attention"))  # fmt: skip
      out.append(Entry(f"{a}.{name}.bias", (c,), leaf + ("bias",), "same", "mid_attention"))
  out += _resnet(f"{torch}.resnets.1", path + ("resnets_1",), c, c, "block_out_channels")
  return out


def entries(config: VAEConfig) -> list[Entry]:
  """Every torch key an AutoencoderKL of `config` has, with its shape and target."""
  chans = tuple(config.block_out_channels)
  n = len(chans)

  def ch(i: int) -> Dim:
    return (chans[i], f"config.block_out_channels[{i}]")

  lat = (config.latent_channels, "config.latent_channels")
  lat2 = (2 * config.latent_channels, "2 * config.latent_channels")
  out: list[Entry] = []
  enc = ("encoder",)
  out += _conv("encoder.conv_in", enc + ("conv_in",), ch(0),
               (config.in_channels, "config.in_channels"), 3)  # fmt: skip
  for i in range(n):
    cin = ch(max(i - 1, 0))
    for j in range(config.layers_per_block):
      t, p = f"encoder.down_blocks.{i}.resnets.{j}", enc + (f"down_blocks_{i}", f"resnets_{j}")
      out += _resnet(t, p, cin if j == 0 else ch(i), ch(i), "layers_per_block")
    if i < n - 1:
      t, p = f"encoder.down_blocks.{i}.downsamplers.0.conv", enc + (
        f"down_blocks_{i}", "downsamplers_0", "conv")  # fmt: skip
      out += _conv(t, p, ch(i), ch(i), 3, "block_out_channels")
  out += _mid("encoder.mid_block", enc + ("mid_block",), ch(n - 1), config)
  out += _norm("encoder.conv_norm_out", enc + ("conv_norm_out",), ch(n - 1))
  out += _conv("encoder.conv_out", enc + ("conv_out",), lat2, ch(n - 1), 3)
  out += _conv("quant_conv", ("quant_conv",), lat2, lat2, 1)
  out += _conv("post_quant_conv", ("post_quant_conv",), lat, lat, 1)
  dec = ("decoder",)
  out += _conv("decoder.conv_in", dec + ("conv_in",), ch(n - 1), lat, 3)
  out += _mid("decoder.mid_block", dec + ("mid_block",), ch(n - 1), config)
  for i in range(n):
    level = n - 1 - i
    for j in range(config.layers_per_block + 1):
      t, p = f"decoder.up_blocks.{i}.resnets.{j}", dec + (f"up_blocks_{i}", f"resnets_{j}")
      cin = ch(min(level + 1, n - 1)) if j == 0 else ch(level)
      out += _resnet(t, p, cin, ch(level), "layers_per_block")
    if i < n - 1:
      t, p = f"decoder.up_blocks.{i}.upsamplers.0.conv", dec + (
        f"up_blocks_{i}", "upsamplers_0", "conv")  # fmt: skip
      out += _conv(t, p, ch(level), ch(level), 3, "block_out_channels")
  out += _norm("decoder.conv_norm_out", dec + ("conv_norm_out",), ch(0))
  out += _conv("decoder.conv_out", dec + ("conv_out",), (config.out_channels,
               "config.out_channels"), ch(0), 3)  # fmt: skip
  return out


_LAYOUTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
  "conv": lambda a: a.transpose(2, 3, 1, 0),
  "linear": lambda a: a.reshape(a.shape[0], a.shape[1]).T,
  "same": lambda a: a,
}


def _old_name(key: str) -> str | None:
  for new, old in OLD_ATTENTION.items():
    tail = f".attentions.0.{new}."
    if tail in key:
      return key.replace(tail, f".attentions.0.{old}.")
  return None


def _shape_error(source: str, key: str, e: Entry, found: tuple[int, ...]) -> InputError:
  want = tuple(n for n, _ in e.dims)
  if len(found) != len(want):
    detail = f"rank {len(want)} expected"
  else:
    pairs = enumerate(zip(e.dims, found, strict=True))
    detail = "; ".join(f"dim {i}: {w} = {n}, found {f}" for i, ((n, w), f) in pairs if n != f)
  return InputError(f"{source}: {key}: shape expected {want}, found {found} ({detail})")


_HINTS = (
  (re.compile(r"\.down_blocks\.(\d+)\.|\.up_blocks\.(\d+)\."), "block_out_channels"),
  (re.compile(r"\.resnets\.(\d+)\."), "layers_per_block"),
  (re.compile(r"\.attentions\.0\."), "mid_attention"),
  (re.compile(r"\.(downsamplers|upsamplers)\.0\."), "block_out_channels"),
  (re.compile(r"\.conv_shortcut\."), "block_out_channels"),
)


def _unused_error(source: str, unused: list[str], config: VAEConfig) -> InputError:
  hints = []
  for key in unused:
    for pattern, field in _HINTS:
      if pattern.search(key):
        hint = f"config.{field}={getattr(config, field)!r}"
        if hint not in hints:
          hints.append(hint)
        break
  shown = ", ".join(unused[:8]) + (f", ... ({len(unused)} in all)" if len(unused) > 8 else "")
  why = f" (check {', '.join(hints)})" if hints else ""
  return InputError(
    f"{source}: {len(unused)} key(s) not used by the AutoencoderKL the config describes: "
    f"{shown}{why}"
  )


def take_vae(sd: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], list[str]]:
  """(the VAE's own state_dict, notes): a `vae.` prefix (pipeline files) is taken off."""
  sd, notes = dict(sd), []
  if any(k.startswith(PREFIX) for k in sd):
    rest = sorted(k for k in sd if not k.startswith(PREFIX))
    sd = {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)}
    notes.append(f"took the VAE ('vae.' prefix, {len(sd)} keys); left {len(rest)} other keys")
  if "encoder.conv_in.weight" not in sd or "decoder.conv_in.weight" not in sd:
    hint = ""
    if any(k.startswith(("encoder.down.", "first_stage_model.")) for k in sd):
      hint = " (this is the original CompVis/ldm layout: convert it with diffusers first)"
    raise InputError(
      "state_dict: expected a diffusers AutoencoderKL (encoder.conv_in.weight, "
      f"decoder.conv_in.weight), found keys {sorted(sd)[:6]}{hint}"
    )
  return sd, notes


def convert_state_dict(
  sd: Mapping[str, Any], config: VAEConfig, *, source: str = "state_dict"
) -> tuple[Params, list[str]]:
  """(params for AutoencoderKL(config), notes) from a diffusers state_dict (numpy arrays)."""
  sd, notes = take_vae(sd)
  notes.insert(0, f"diffusers AutoencoderKL, {len(sd)} keys")
  params: dict[str, Any] = {}
  cast, old = set(), 0
  for e in entries(config):
    key = e.key
    if key not in sd and (alt := _old_name(key)) is not None and alt in sd:
      key, old = alt, old + 1
    if key not in sd:
      why = f"config.{e.field}={getattr(config, e.field)!r} expects it" if e.field else "needed"
      raise InputError(f"{source}: {e.key}: missing from the checkpoint ({why})")
    value = np.asarray(sd.pop(key))
    found = tuple(value.shape)
    want = tuple(n for n, _ in e.dims)
    if e.layout == "linear" and found == want + (1, 1):
      found = want  # a 1x1-conv attention projection
    if found != want:
      raise _shape_error(source, key, e, tuple(value.shape))
    if value.dtype != np.float32:
      cast.add(str(value.dtype))
    set_path(params, e.path, _LAYOUTS[e.layout](np.asarray(value, np.float32)))
  if sd:
    raise _unused_error(source, sorted(sd), config)
  if old:
    notes.append(f"read {old} attention tensors under the old names query/key/value/proj_attn")
  if cast:
    notes.append(f"cast {', '.join(sorted(cast))} weights to float32")
  check_filled(params, abstract_params(config), source, f"VAE config {config.name!r}")
  return params, notes


def config_from_state_dict(sd: Mapping[str, Any], base: VAEConfig) -> VAEConfig:
  """`base` with every size the weights show replaced by theirs (channels per level, blocks
  per level, latent and image channels, mid attention). norm_num_groups, norm_eps and
  scaling_factor are not in the weights and stay as `base` says."""
  sd, _ = take_vae(sd)
  levels = sorted({int(m.group(1)) for k in sd
                   if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k))})  # fmt: skip
  chans = tuple(
    int(np.shape(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"])[0]) for i in levels
  )
  per = {int(m.group(1)) for k in sd
         if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)\.", k))}  # fmt: skip
  return dataclasses.replace(
    base,
    in_channels=int(np.shape(sd["encoder.conv_in.weight"])[1]),
    out_channels=int(np.shape(sd["decoder.conv_out.weight"])[0]),
    block_out_channels=chans or base.block_out_channels,
    layers_per_block=len(per) or base.layers_per_block,
    latent_channels=int(np.shape(sd["decoder.conv_in.weight"])[1]),
    mid_attention=any(".mid_block.attentions." in k for k in sd),
  )


def check_sizes(sd: Mapping[str, Any], config: VAEConfig, source: str, prefix: str) -> None:
  """The sizes the weights show against `config`; a mismatch names `{prefix}.<field>`."""
  found = config_from_state_dict(sd, config)
  diffs = [(f, getattr(config, f), getattr(found, f)) for f in FROM_WEIGHTS
           if getattr(config, f) != getattr(found, f)]  # fmt: skip
  if diffs:
    shown = "; ".join(f"{prefix}.{f}: config {w!r}, checkpoint {h!r}" for f, w, h in diffs)
    flag = lambda v: "(" + ",".join(map(str, v)) + ")" if isinstance(v, tuple) else v  # noqa: E731
    flags = " ".join(f"--{prefix}.{f}={flag(h)}" for f, _, h in diffs)
    raise InputError(
      f"{source}: the VAE weights do not fit the config: {shown}; set {flags} "
      "(norm_num_groups is not in the weights: check it too)"
    )


class SdVaeConverter(Converter):
  """A diffusers AutoencoderKL file (SD-1.5's VAE or any other size) for the 'vae' task."""

  name = "sd_vae"
  tasks = ("vae",)

  def __init__(self):
    self._names: dict[tuple[str, ...], str] = {}

  def convert(self, sd, task, fresh, fresh_extra, info, options, source) -> Converted:
    del fresh, fresh_extra, info, options
    config = task.vae_config
    check_sizes(sd, config, source, "config.model")
    params, notes = convert_state_dict(sd, config, source=source)
    self._names = {e.path: e.key for e in entries(config)}
    notes.append(f"VAE {config}: {len(self._names)} tensors")
    return Converted(params=params, notes=notes)

  def torch_name(self, path):
    return self._names.get(tuple(path))


registry.register("converter", "sd_vae")(SdVaeConverter())
