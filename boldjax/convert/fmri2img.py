"""Import aaalgo/fmri2img FmriEncoder state_dicts (models/basic_ae.py) into FmriEncoder params.

Layouts: fc1/fc2/fc3 are torch Linear (out, in) -> Dense kernels (in, out); deconv1 is a
ConvTranspose2d weight (in, out, kh, kw) -> kernel (kh, kw, in, out) (unflipped: the model
flips it). A checkpoint of the seed's whole Fmri2Image (keys under 'encoder.', the frozen
SD VAE under 'vae.') converts too: the VAE keys are left out and counted (the frozen VAE
comes from config.task.decoder_from). `params_to_torch` is the exact inverse (used to
compare gradients by torch name).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from boldjax import registry
from boldjax.cli import InputError
from boldjax.convert.converter import Converted, Converter, fail_fields, mismatches
from boldjax.convert.tree import get_path, set_path

_FC = re.compile(r"fc(\d+)\.weight")


def _rules(num_fc: int) -> list[tuple[str, tuple[str, ...], str]]:
  """(torch name, flax path, layout) for every param; layout: 'same' | 't' | 'deconv'."""
  rules = []
  for i in range(1, num_fc + 1):
    rules.append((f"fc{i}.weight", (f"fc{i}", "kernel"), "t"))
    rules.append((f"fc{i}.bias", (f"fc{i}", "bias"), "same"))
  rules.append(("deconv1.weight", ("deconv1", "kernel"), "deconv"))
  rules.append(("deconv1.bias", ("deconv1", "bias"), "same"))
  return rules


def _to_flax(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == "deconv":
    return x.transpose(2, 3, 0, 1)
  return x.T if layout == "t" else x


def _to_torch(x: np.ndarray, layout: str) -> np.ndarray:
  if layout == "deconv":
    return x.transpose(2, 3, 0, 1)
  return x.T if layout == "t" else x


def split_fmri2image(
  state_dict: Mapping[str, Any], source: str = "state_dict"
) -> tuple[dict[str, np.ndarray], int]:
  """(FmriEncoder keys, number of vae.* keys left out) of an encoder or Fmri2Image dict."""
  keys = list(state_dict)
  if any(k.startswith("encoder.") for k in keys):
    other = [k for k in keys if not k.startswith(("encoder.", "vae."))]
    if other:
      raise KeyError(f"{source}: unknown Fmri2Image keys {sorted(other)[:12]} (expected "
                     "encoder.*, vae.*)")  # fmt: skip
    sd = {k[len("encoder.") :]: np.asarray(v) for k, v in state_dict.items()
          if k.startswith("encoder.")}  # fmt: skip
    return sd, sum(k.startswith("vae.") for k in keys)
  return {k: np.asarray(v) for k, v in state_dict.items()}, 0


def infer_structure(sd: Mapping[str, Any], source: str = "state_dict") -> dict[str, Any]:
  """input_dim, hidden (fc widths in order), reshape_channels and latent_channels."""
  found = sorted(int(m.group(1)) for k in sd if (m := _FC.fullmatch(k)))
  if not found or "deconv1.weight" not in sd:
    raise KeyError(f"{source}: not an fmri2img FmriEncoder state_dict (no fc1.weight or "
                   "deconv1.weight)")  # fmt: skip
  if found != list(range(1, len(found) + 1)):
    raise KeyError(f"{source}: fc layers {found} are not numbered 1..{len(found)}")
  w = np.shape(sd["deconv1.weight"])
  if len(w) != 4:
    raise KeyError(f"{source}: deconv1.weight: expected (in, out, kh, kw), found {w}")
  return dict(
    input_dim=int(np.shape(sd["fc1.weight"])[1]),
    hidden=tuple(int(np.shape(sd[f"fc{i}.weight"])[0]) for i in found),
    reshape_channels=int(w[0]),
    latent_channels=int(w[1]),
    kernel=(int(w[2]), int(w[3])),
  )


def convert_fmri_encoder(
  state_dict: Mapping[str, Any], *, source: str = "state_dict"
) -> tuple[dict[str, Any], dict[str, Any]]:
  """FmriEncoder (or Fmri2Image) state_dict -> (FmriEncoder params, structure).

  structure: infer_structure's sizes plus 'dropped_vae' (vae.* keys left out). Missing or
  unknown keys and bad shapes raise KeyError naming them.
  """
  from boldjax.models.fmri2img import KERNEL

  sd, dropped = split_fmri2image(state_dict, source)
  st = infer_structure(sd, source)
  rules = _rules(len(st["hidden"]))
  wanted = {name for name, *_ in rules}
  missing, unknown = sorted(wanted - set(sd)), sorted(set(sd) - wanted)
  if missing or unknown:
    raise KeyError(f"{source}: cannot convert to FmriEncoder: missing keys {missing}, unknown "
                   f"keys {unknown}")  # fmt: skip
  widths = (st["input_dim"], *st["hidden"])
  expect = {}
  for i in range(1, len(widths)):
    expect[f"fc{i}.weight"] = (widths[i], widths[i - 1])
    expect[f"fc{i}.bias"] = (widths[i],)
  expect["deconv1.weight"] = (st["reshape_channels"], st["latent_channels"], KERNEL, KERNEL)
  expect["deconv1.bias"] = (st["latent_channels"],)
  bad = [f"{k}: expected {v}, found {tuple(np.shape(sd[k]))}"
         for k, v in expect.items() if tuple(np.shape(sd[k])) != v]  # fmt: skip
  if bad:
    raise KeyError(f"{source}: FmriEncoder shapes do not agree: " + "; ".join(bad))
  params: dict[str, Any] = {}
  for name, path, layout in rules:
    set_path(params, path, np.asarray(_to_flax(np.asarray(sd[name]), layout), np.float32))
  return params, {**st, "dropped_vae": dropped}


def params_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """FmriEncoder params (or gradients) -> FmriEncoder torch names and layouts."""
  import flax.linen as nn

  params = nn.unbox(params)
  num_fc = sum(1 for k in params if re.fullmatch(r"fc\d+", k))
  return {name: _to_torch(np.asarray(get_path(params, path)), layout)
          for name, path, layout in _rules(num_fc)}  # fmt: skip


class Fmri2ImgConverter(Converter):
  """An aaalgo/fmri2img FmriEncoder (or whole Fmri2Image) checkpoint for the 'fmri2img' task."""

  name = "fmri2img"
  tasks = ("fmri2img",)

  def __init__(self):
    self._names: dict[tuple[str, ...], str] = {}

  def convert(self, sd, task, fresh, fresh_extra, info, options, source) -> Converted:
    del fresh, fresh_extra, info, options
    m = task.model
    inner, dropped = split_fmri2image(sd, source)
    try:
      st = infer_structure(inner, source)
    except KeyError as e:
      raise InputError(str(e).strip("'\"")) from e
    reshape = m.hidden[-1] // (m.latent_hw[0] * m.latent_hw[1] // 4)
    problems = mismatches([
      ("info.num_voxels (config.data)", m.input_dim, st["input_dim"]),
      ("config.model.hidden", tuple(m.hidden), st["hidden"]),
      ("config.model.latent_channels", m.latent_channels, st["latent_channels"]),
      ("reshape channels (config.model.hidden[-1] / (latent_size/2)^2)", reshape,
       st["reshape_channels"]),
    ])  # fmt: skip
    fail_fields(source, self.name, problems)
    params, st = convert_fmri_encoder(sd, source=source)
    self._names = {path: name for name, path, _ in _rules(len(st["hidden"]))}
    notes = [f"FmriEncoder {st['input_dim']} -> {' -> '.join(map(str, st['hidden']))} -> "
             f"{st['reshape_channels']}x{m.latent_hw[0] // 2}x{m.latent_hw[1] // 2} -> "
             f"latent {m.latent_hw[0]}x{m.latent_hw[1]}x{st['latent_channels']}"]  # fmt: skip
    if dropped:
      notes.append(f"left out {dropped} vae.* keys (the frozen VAE comes from "
                   "config.task.decoder_from)")  # fmt: skip
    extra = task.host_extra() if hasattr(task, "host_extra") else None
    return Converted(params, extra, notes)

  def torch_name(self, path):
    return self._names.get(tuple(path))


registry.register("converter", "fmri2img")(Fmri2ImgConverter())
