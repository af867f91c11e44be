"""Import huzeyann/BrainDecodesDeepNets FactorTopy state_dicts into boldjax FactorTopy params.

Accepted forms: FactorTopy's own keys, or a PLModel checkpoint (keys under 'model.', the
frozen vertex coordinates as 'coords', and the frozen backbone under 'backbone.', which is
left out and counted: the token cache runs its own backbone). Layouts:
  - {space,layer,scale}_selector_mlp.{1,3,5}: Sequential indices of the two hidden Linear
    layers and the bias-free output Linear -> {kind}_selector/{hidden_0,hidden_1,out};
    torch (out, in) weights -> (in, out) kernels.
  - local_token_bottleneck.<layer>.weight (bd, C, 1, 1) (Conv2d 1x1) and
    global_token_bottleneck.<layer>.weight (bd, C) (Linear) -> {local,global}_bottleneck_<i>
    kernels (C, bd), i = the position of <layer> in the constructor's layer list (the
    state_dict's key order, or `layers` when given).
  - weight (N, bd), bias (N,): the per-vertex readout, unchanged.
`params_to_torch` is the exact inverse (used to compare gradients by torch name).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from boldjax import registry
from boldjax.cli import InputError
from boldjax.convert.converter import Converted, Converter, fail_fields, mismatches
from boldjax.convert.tree import get_path, set_path

SELECTORS = ("space", "layer", "scale")
_SEQ = {"1": "hidden_0", "3": "hidden_1", "5": "out"}
_LOCAL = re.compile(r"local_token_bottleneck\.([^.]+)\.weight")


def _rules(layer_keys: Sequence[str]) -> list[tuple[str, tuple[str, ...], str]]:
  """(torch name, flax path, layout) for every param; layout: 'same' | 't' | 'conv1x1'."""
  rules = [("weight", ("weight",), "same"), ("bias", ("bias",), "same")]
  for kind in SELECTORS:
    for idx, name in _SEQ.items():
      path = (f"{kind}_selector", name)
      rules.append((f"{kind}_selector_mlp.{idx}.weight", path + ("kernel",), "t"))
      if name != "out":
        rules.append((f"{kind}_selector_mlp.{idx}.bias", path + ("bias",), "same"))
  for i, key in enumerate(layer_keys):
    rules.append((f"local_token_bottleneck.{key}.weight", (f"local_bottleneck_{i}", "kernel"),
                  "conv1x1"))  # fmt: skip
    rules.append((f"global_token_bottleneck.{key}.weight", (f"global_bottleneck_{i}", "kernel"),
                  "t"))  # fmt: skip
  return rules


def _to_flax(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == "conv1x1":
    return x.reshape(x.shape[0], x.shape[1]).T
  return x.T if layout == "t" else x


def _to_torch(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == "conv1x1":
    return x.T.reshape(x.shape[1], x.shape[0], 1, 1)
  return x.T if layout == "t" else x


def split_plmodel(
  state_dict: Mapping[str, Any], source: str = "state_dict"
) -> tuple[dict[str, np.ndarray], np.ndarray | None, int]:
  """(FactorTopy keys, coords or None, number of backbone.* keys left out) of a checkpoint."""
  keys = list(state_dict)
  if any(k.startswith("model.") for k in keys):
    other = [k for k in keys if not k.startswith(("model.", "backbone.")) and k != "coords"]
    if other:
      raise KeyError(f"{source}: unknown PLModel keys {sorted(other)[:12]} (expected model.*, "
                     "coords, backbone.*)")  # fmt: skip
    sd = {
      k[len("model.") :]: np.asarray(v) for k, v in state_dict.items() if k.startswith("model.")
    }
    dropped = sum(k.startswith("backbone.") for k in keys)
  else:
    sd = {k: np.asarray(v) for k, v in state_dict.items() if k != "coords"}
    dropped = 0
  coords = state_dict.get("coords")
  return sd, (None if coords is None else np.asarray(coords, np.float32)), dropped


def infer_structure(
  sd: Mapping[str, Any], layers: Sequence[Any] | None = None, source: str = "state_dict"
) -> dict[str, Any]:
  """Sizes a FactorTopy state_dict implies: layers (keys, in order), layer_widths,
  num_vertices, bottleneck, hidden, num_freqs (from the selectors' 6 F input width)."""
  found = [m.group(1) for k in sd if (m := _LOCAL.fullmatch(k))]
  if not found or "weight" not in sd or "space_selector_mlp.1.weight" not in sd:
    raise KeyError(f"{source}: not a FactorTopy state_dict (no local_token_bottleneck.*, "
                   "weight or space_selector_mlp.1.weight)")  # fmt: skip
  keys = found if layers is None else [str(x) for x in layers]
  if sorted(keys) != sorted(found):
    raise KeyError(f"{source}: layers {keys} do not match the checkpoint's bottleneck layers "
                   f"{found}")  # fmt: skip
  w_in = np.shape(sd["space_selector_mlp.1.weight"])
  if w_in[1] % 6:
    raise KeyError(f"{source}: space_selector_mlp.1.weight input width {w_in[1]} is not "
                   "6 * num_freqs (3 coordinates x sin/cos)")  # fmt: skip
  return dict(
    layers=keys,
    layer_widths=[int(np.shape(sd[f"local_token_bottleneck.{k}.weight"])[1]) for k in keys],
    num_vertices=int(np.shape(sd["weight"])[0]),
    bottleneck=int(np.shape(sd["weight"])[1]),
    hidden=int(w_in[0]),
    num_freqs=int(w_in[1]) // 6,
  )


def convert_factortopy(
  state_dict: Mapping[str, Any],
  *,
  layers: Sequence[Any] | None = None,
  source: str = "state_dict",
) -> tuple[dict[str, Any], dict[str, Any]]:
  """FactorTopy (or PLModel) state_dict -> (FactorTopy params, structure).

  structure: infer_structure's sizes plus 'coords' ((N, 3) float32 or None, a PLModel's
  frozen vertex coordinates) and 'dropped_backbone' (backbone.* keys left out). Missing or
  unknown keys and bad shapes raise KeyError naming them.
  """
  sd, coords, dropped = split_plmodel(state_dict, source)
  st = infer_structure(sd, layers, source)
  rules = _rules(st["layers"])
  wanted = {name for name, *_ in rules}
  missing, unknown = sorted(wanted - set(sd)), sorted(set(sd) - wanted)
  if missing or unknown:
    raise KeyError(f"{source}: cannot convert to FactorTopy: missing keys {missing}, unknown "
                   f"keys {unknown}")  # fmt: skip
  N, bd, hid, L = st["num_vertices"], st["bottleneck"], st["hidden"], len(st["layers"])
  expect = {
    "bias": (N,),
    "space_selector_mlp.5.weight": (2, hid),
    "layer_selector_mlp.5.weight": (L, hid),
    "scale_selector_mlp.5.weight": (1, hid),
  }
  for kind in SELECTORS:
    expect[f"{kind}_selector_mlp.1.weight"] = (hid, 6 * st["num_freqs"])
    expect[f"{kind}_selector_mlp.1.bias"] = (hid,)
    expect[f"{kind}_selector_mlp.3.weight"] = (hid, hid)
    expect[f"{kind}_selector_mlp.3.bias"] = (hid,)
  for key, c in zip(st["layers"], st["layer_widths"], strict=True):
    expect[f"local_token_bottleneck.{key}.weight"] = (bd, c, 1, 1)
    expect[f"global_token_bottleneck.{key}.weight"] = (bd, c)
  bad = [f"{k}: expected {v}, found {tuple(np.shape(sd[k]))}"
         for k, v in expect.items() if tuple(np.shape(sd[k])) != v]  # fmt: skip
  if bad:
    raise KeyError(f"{source}: FactorTopy shapes do not agree: " + "; ".join(bad))
  if coords is not None and coords.shape != (N, 3):
    raise KeyError(f"{source}: coords expected shape ({N}, 3), found {coords.shape}")
  params: dict[str, Any] = {}
  for name, path, layout in rules:
    set_path(params, path, np.asarray(_to_flax(np.asarray(sd[name]), layout), np.float32))
  return params, {**st, "coords": coords, "dropped_backbone": dropped}


def params_to_torch(params: Mapping[str, Any], layers: Sequence[Any]) -> dict[str, np.ndarray]:
  """FactorTopy params (or gradients) -> FactorTopy torch names and layouts."""
  import flax.linen as nn

  params = nn.unbox(params)
  keys = [str(x) for x in layers]
  return {name: _to_torch(np.asarray(get_path(params, path)), layout)
          for name, path, layout in _rules(keys)}  # fmt: skip


def _max_pe_difference(a: np.ndarray, b: np.ndarray, num_freqs: int) -> float:
  from boldjax.models.factortopy import position_encoding

  return float(np.max(np.abs(position_encoding(a, num_freqs) - position_encoding(b, num_freqs))))


class BddnConverter(Converter):
  """A BrainDecodesDeepNets FactorTopy / PLModel checkpoint for the 'encoding' task."""

  name = "bddn"
  tasks = ("encoding",)

  def __init__(self):
    self._names: dict[tuple[str, ...], str] = {}

  def convert(self, sd, task, fresh, fresh_extra, info, options, source) -> Converted:
    del fresh, fresh_extra, options
    m = task.model
    inner, coords, dropped = split_plmodel(sd, source)
    try:
      st = infer_structure(inner, None, source)
    except KeyError as e:
      raise InputError(str(e).strip("'\"")) from e
    widths = m.token_dim if not isinstance(m.token_dim, int) else (m.token_dim,) * m.num_layers
    problems = mismatches([
      ("info.num_vertices (config.data)", m.num_vertices, st["num_vertices"]),
      ("info.num_layers (config.data)", m.num_layers, len(st["layers"])),
      ("info.token_dim (config.data)", list(widths), st["layer_widths"]),
      ("config.task.bottleneck", m.bottleneck, st["bottleneck"]),
      ("config.task.hidden", m.hidden, st["hidden"]),
      ("config.task.num_freqs", m.num_freqs, st["num_freqs"]),
    ])  # fmt: skip
    fail_fields(source, self.name, problems)
    params, st = convert_factortopy(sd, source=source)
    self._names = {path: name for name, path, _ in _rules(st["layers"])}
    notes = [f"layers {st['layers']} (checkpoint key order) -> layer index 0..{m.num_layers - 1}"]
    if dropped:
      notes.append(f"left out {dropped} backbone.* keys (the token cache runs its own backbone)")
    if coords is None:
      notes.append("no coords in the checkpoint: the vertex set is info.coords, unchecked")
    else:
      mine = np.asarray(info.coords, np.float32)
      if mine.shape != coords.shape:
        raise InputError(f"{source}: coords: expected info.coords' shape {mine.shape}, found "
                         f"{coords.shape}")  # fmt: skip
      if not np.array_equal(mine, coords):
        # The encoding is invariant to a shift and a uniform scale of the vertex set.
        diff = _max_pe_difference(mine, coords, m.num_freqs)
        if diff > 1e-4:
          raise InputError(
            f"{source}: coords: expected the vertex coordinates of info.coords (config.data), "
            f"found different ones (max |coord diff| "
            f"{float(np.max(np.abs(mine - coords))):.4g}, position-encoding diff {diff:.3g})"
          )
        notes.append(f"coords differ from info.coords by a shift / scale only (encoding diff "
                     f"{diff:.2g})")  # fmt: skip
      else:
        notes.append("coords: identical to info.coords")
    return Converted(params, None, notes)

  def torch_name(self, path):
    return self._names.get(tuple(path))


registry.register("converter", "bddn")(BddnConverter())
