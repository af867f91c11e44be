"""Import clane9/boldGPT (IGPT) PyTorch state_dicts into PatchGPT params.

Layout differences handled here:
  - torch Linear weights are (out, in); flax kernels are (in, out).
  - attention `q` (D -> D) becomes query (D, heads, head_dim); `kv` (D -> 2D) packs
    rows [0:D] = K and [D:2D] = V, heads contiguous inside each, and becomes key / value;
    `proj` becomes out (heads, head_dim, D).
  - LayerNorm weight/bias become scale/bias.
The buffers patchify.* become a PatchLayout and tokenizer.vocab a KMeansTokenizer.
`params_to_torch` is the exact inverse (also used to compare gradients by torch name).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from boldjax import registry
from boldjax.cli import InputError
from boldjax.convert.converter import (
  Converted,
  Converter,
  fail_fields,
  mismatches,
)
from boldjax.data.patching import PatchLayout
from boldjax.data.tokenizer import KMeansTokenizer

PREFIX = "decoder."
_EMBEDDINGS = ("group_token", "sub_embed", "pos_embed", "next_pos_query", "eos_query", "reg_embed")
_LINEARS = {"patch_embed": "patch_embed", "cross_embed": "cross_embed", "head": "head"}
_NORMS = {"norm1", "norm2", "norm3"}
_BUFFERS = (
  "patchify.mask",
  "patchify.patch_mask",
  "patchify.patch_indices",
  "patchify.order",
  "patchify.ranking",
)
_REQUIRED_TOP = (
  "group_token",
  "pos_embed",
  "patch_embed.weight",
  "patch_embed.bias",
  "norm.weight",
  "norm.bias",
  "head.weight",
  "head.bias",
)
_REQUIRED_BLOCK = (
  "norm1.weight",
  "norm1.bias",
  "attn.q.weight",
  "attn.kv.weight",
  "attn.proj.weight",
  "attn.proj.bias",
  "norm3.weight",
  "norm3.bias",
  "mlp.fc1.weight",
  "mlp.fc1.bias",
  "mlp.fc2.weight",
  "mlp.fc2.bias",
)
_BLOCK_RE = re.compile(r"blocks\.(\d+)\.(.+)")


def _f32(x: Any) -> np.ndarray:
  return np.asarray(x, np.float32)


def _attention(sd: Mapping[str, np.ndarray], pre: str, heads: int) -> dict[str, Any]:
  """q / kv / proj (torch) -> query / key / value / out (flax)."""
  q = _f32(sd[pre + "q.weight"])
  kv = _f32(sd[pre + "kv.weight"])
  D = q.shape[1]
  if q.shape != (D, D) or kv.shape != (2 * D, D):
    raise ValueError(
      f"state_dict {pre}q.weight / kv.weight: expected ({D}, {D}) / ({2 * D}, {D}), "
      f"found {q.shape} / {kv.shape}"
    )
  hd = D // heads

  def kernel(w: np.ndarray) -> np.ndarray:
    return w.T.reshape(D, heads, hd)

  return {
    "query": {"kernel": kernel(q)},
    "key": {"kernel": kernel(kv[:D])},
    "value": {"kernel": kernel(kv[D:])},
    "out": {
      "kernel": _f32(sd[pre + "proj.weight"]).T.reshape(heads, hd, D),
      "bias": _f32(sd[pre + "proj.bias"]),
    },
  }


def _linear(sd: Mapping[str, np.ndarray], pre: str) -> dict[str, np.ndarray]:
  return {"kernel": _f32(sd[pre + "weight"]).T, "bias": _f32(sd[pre + "bias"])}


def _norm(sd: Mapping[str, np.ndarray], pre: str) -> dict[str, np.ndarray]:
  return {"scale": _f32(sd[pre + "weight"]), "bias": _f32(sd[pre + "bias"])}


def convert_boldgpt(
  state_dict: Mapping[str, Any],
  *,
  num_heads: int,
  model: Any = None,
  source: str = "state_dict",
) -> tuple[dict[str, Any], dict[str, Any]]:
  """boldGPT IGPT state_dict -> (PatchGPT params, extras).

  extras: 'layout' (PatchLayout | None, from patchify.* buffers), 'tokenizer'
  (KMeansTokenizer | None, from tokenizer.vocab) and 'model_kwargs' (the PatchGPT sizes the
  weights imply, except dropout rates). Unknown or missing keys raise. With `model` (a
  PatchGPT) the params must also match its parameter tree exactly (names and shapes).
  """
  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  dec = {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)}
  others = {k for k in sd if not k.startswith(PREFIX)}
  unknown = sorted(others - set(_BUFFERS) - {"tokenizer.vocab"})
  block_ids = sorted({int(m.group(1)) for k in dec if (m := _BLOCK_RE.fullmatch(k))})
  depth = block_ids[-1] + 1 if block_ids else 0
  with_cross = any(re.fullmatch(r"blocks\.\d+\.cross\..+", k) for k in dec)

  # Every name the decoder may hold, and the subset it must hold.
  required = list(_REQUIRED_TOP)
  if "next_pos_query" in dec or "eos_query" in dec:
    required += ["next_pos_query", "eos_query"]
  if with_cross:
    required += ["cross_embed.weight", "cross_embed.bias"]
  block_required = list(_REQUIRED_BLOCK)
  if with_cross:
    block_required += [
      "norm2.weight",
      "norm2.bias",
      "cross.q.weight",
      "cross.kv.weight",
      "cross.proj.weight",
      "cross.proj.bias",
    ]
  required += [f"blocks.{i}.{k}" for i in range(depth) for k in block_required]
  allowed = set(required) | {"sub_embed", "reg_embed"}
  missing = [k for k in required if k not in dec]
  unknown += sorted(PREFIX + k for k in set(dec) - allowed)
  if missing or unknown:
    raise KeyError(
      f"{source}: cannot convert to PatchGPT: missing keys {[PREFIX + k for k in missing]}, "
      f"unknown keys {unknown}"
    )

  params: dict[str, Any] = {name: _f32(dec[name]) for name in _EMBEDDINGS if name in dec}
  for torch_name, flax_name in _LINEARS.items():
    if torch_name + ".weight" in dec:
      params[flax_name] = _linear(dec, torch_name + ".")
  params["norm"] = _norm(dec, "norm.")
  for i in range(depth):
    pre = f"blocks.{i}."
    block: dict[str, Any] = {
      norm: _norm(dec, pre + norm + ".") for norm in sorted(_NORMS) if pre + norm + ".weight" in dec
    }
    for attn in ("attn", "cross"):
      if pre + attn + ".q.weight" in dec:
        block[attn] = _attention(dec, pre + attn + ".", num_heads)
    block["mlp"] = {"fc1": _linear(dec, pre + "mlp.fc1."), "fc2": _linear(dec, pre + "mlp.fc2.")}
    params[f"blocks_{i}"] = block

  D = params["pos_embed"].shape[1]
  if D % num_heads:
    raise ValueError(f"{source}: embed dim {D} is not divisible by num_heads={num_heads}")
  layout = _layout(sd, source) if "patchify.patch_mask" in sd else None
  tokenizer = KMeansTokenizer(sd["tokenizer.vocab"]) if "tokenizer.vocab" in sd else None
  patch_dim = params["patch_embed"]["kernel"].shape[0]
  head_out = params["head"]["kernel"].shape[1]
  categorical = tokenizer is not None or head_out != patch_dim
  if tokenizer is not None and tokenizer.vocab_size != head_out:
    raise ValueError(
      f"{source}: tokenizer.vocab has {tokenizer.vocab_size} entries but decoder.head has "
      f"{head_out} outputs"
    )
  model_kwargs = dict(
    num_patches=params["pos_embed"].shape[0],
    patch_dim=patch_dim,
    categorical=categorical,
    vocab_size=head_out if categorical else 1024,
    num_subjects=params["sub_embed"].shape[0] if "sub_embed" in params else 1024,
    embed_dim=D,
    depth=depth,
    num_heads=num_heads,
    mlp_ratio=params["blocks_0"]["mlp"]["fc1"]["kernel"].shape[1] / D if depth else 4.0,
    with_sub_embed="sub_embed" in params,
    with_next_pos="next_pos_query" in params,
    num_registers=params["reg_embed"].shape[0] if "reg_embed" in params else 0,
    with_cross=with_cross,
  )
  if layout is not None and layout.num_patches != model_kwargs["num_patches"]:
    raise ValueError(
      f"{source}: patchify has {layout.num_patches} patches, decoder.pos_embed has "
      f"{model_kwargs['num_patches']}"
    )
  if model is not None:
    check_params(model, params, source)
  return params, {"layout": layout, "tokenizer": tokenizer, "model_kwargs": model_kwargs}


def check_params(model: Any, params: Mapping[str, Any], source: str = "params") -> None:
  """Raise unless `params` has exactly the names and shapes `model.init` would create
  (flax ignores surplus params silently, so a stray tensor would otherwise go unnoticed)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  B, N, P = 1, model.num_patches, model.patch_dim
  subject = jnp.zeros((B,), jnp.int32) if model.with_sub_embed else None
  order = jnp.zeros((B, N), jnp.int32) if model.with_next_pos else None
  context = None
  if model.with_cross:  # the context width is whatever cross_embed was trained on
    width = np.shape(params.get("cross_embed", {}).get("kernel", np.zeros((1, 1))))[0]
    context = jnp.zeros((B, 1, width), jnp.float32)
  abstract = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((B, N, P)), subject, order, context)
  )
  want = {
    jax.tree_util.keystr(k): v.shape
    for k, v in jax.tree_util.tree_leaves_with_path(nn.unbox(abstract)["params"])
  }
  have = {
    jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)
  }
  missing = sorted(set(want) - set(have))
  unknown = sorted(set(have) - set(want))
  shapes = [
    f"{k}: expected {want[k]}, found {have[k]}"
    for k in sorted(set(want) & set(have))
    if tuple(want[k]) != tuple(have[k])
  ]
  if missing or unknown or shapes:
    raise ValueError(
      f"{source}: params do not fit the model: missing {missing}, unknown {unknown}, "
      f"shape mismatches {shapes}"
    )


def _layout(sd: Mapping[str, np.ndarray], source: str) -> PatchLayout:
  """patchify.* buffers -> PatchLayout, checking order/ranking agree with patch_indices."""
  missing = [k for k in _BUFFERS if k not in sd]
  if missing:
    raise KeyError(f"{source}: missing patchify buffers {missing}")
  patch_mask = np.asarray(sd["patchify.patch_mask"])
  p = math.isqrt(patch_mask.shape[1])
  if p * p != patch_mask.shape[1]:
    raise ValueError(f"{source}: patchify.patch_mask must be (N, p*p), found {patch_mask.shape}")
  indices = np.asarray(sd["patchify.patch_indices"])
  layout = PatchLayout.from_buffers(sd["patchify.mask"], p, indices, patch_mask, source)
  order = np.asarray(sd["patchify.order"])
  ranking = np.asarray(sd["patchify.ranking"])
  raster = np.sort(indices)
  if not np.array_equal(raster[order], indices) or not np.array_equal(np.argsort(order), ranking):
    raise ValueError(
      f"{source}: patchify.order / patchify.ranking are inconsistent with patch_indices"
    )
  return layout


def params_to_torch(params: Mapping[str, Any], prefix: str = PREFIX) -> dict[str, np.ndarray]:
  """PatchGPT params (or gradients) -> boldGPT torch names and layouts (inverse of convert)."""
  import flax.linen as nn

  params = nn.unbox(params)
  out: dict[str, np.ndarray] = {}

  def linear(name: str, p: Mapping[str, Any]) -> None:
    out[name + ".weight"] = np.asarray(p["kernel"]).T
    out[name + ".bias"] = np.asarray(p["bias"])

  for key, value in params.items():
    if key in _EMBEDDINGS:
      out[prefix + key] = np.asarray(value)
    elif key in _LINEARS.values():
      linear(prefix + key, value)
    elif key == "norm":
      out[prefix + "norm.weight"] = np.asarray(value["scale"])
      out[prefix + "norm.bias"] = np.asarray(value["bias"])
    elif key.startswith("blocks_"):
      pre = f"{prefix}blocks.{int(key[len('blocks_') :])}."
      for part, sub in value.items():
        if part in _NORMS:
          out[pre + part + ".weight"] = np.asarray(sub["scale"])
          out[pre + part + ".bias"] = np.asarray(sub["bias"])
        elif part in ("attn", "cross"):
          q = np.asarray(sub["query"]["kernel"])
          D = q.shape[0]
          out[pre + part + ".q.weight"] = q.reshape(D, -1).T
          k = np.asarray(sub["key"]["kernel"]).reshape(D, -1).T
          v = np.asarray(sub["value"]["kernel"]).reshape(D, -1).T
          out[pre + part + ".kv.weight"] = np.concatenate([k, v], axis=0)
          ok = np.asarray(sub["out"]["kernel"])
          out[pre + part + ".proj.weight"] = ok.reshape(-1, ok.shape[-1]).T
          out[pre + part + ".proj.bias"] = np.asarray(sub["out"]["bias"])
        elif part == "mlp":
          linear(pre + "mlp.fc1", sub["fc1"])
          linear(pre + "mlp.fc2", sub["fc2"])
        else:
          raise KeyError(f"params_to_torch: unknown block entry {key}/{part}")
    else:
      raise KeyError(f"params_to_torch: unknown parameter {key!r}")
  return out


_SPEC_TO_MODEL = {
  "categorical": "categorical",
  "with_sub_embed": "with_sub_embed",
  "vocab_size": "vocab_size",
  "shuffle": "with_next_pos",
  "num_subs": "num_subjects",
  "embed_dim": "embed_dim",
  "depth": "depth",
  "num_heads": "num_heads",
  "mlp_ratio": "mlp_ratio",
  "drop_rate": "drop_rate",
  "sub_drop_rate": "sub_drop_rate",
  "proj_drop_rate": "proj_drop_rate",
  "attn_drop_rate": "attn_drop_rate",
  "drop_path_rate": "drop_path_rate",
}
_SPEC_LAYOUT_ONLY = {"patch_size", "ordering"}


def model_kwargs_from_spec(spec: Mapping[str, Any], source: str = "spec.json") -> dict[str, Any]:
  """PatchGPT kwargs from a parity spec (constructor_kwargs of boldgpt's _create_boldgpt)."""
  ctor = dict(spec["constructor_kwargs"])
  unknown = sorted(set(ctor) - set(_SPEC_TO_MODEL) - _SPEC_LAYOUT_ONLY)
  if unknown:
    raise KeyError(
      f"{source}: constructor_kwargs has unknown fields {unknown}; known: "
      f"{sorted(set(_SPEC_TO_MODEL) | _SPEC_LAYOUT_ONLY)}"
    )
  derived = spec.get("derived", {})
  for field in ("num_patches", "patch_dim"):
    if field not in derived:
      raise KeyError(
        f"{source}: derived.{field} is required to size PatchGPT; found {sorted(derived)}"
      )
  kwargs = {_SPEC_TO_MODEL[k]: v for k, v in ctor.items() if k in _SPEC_TO_MODEL}
  kwargs["num_patches"] = int(derived["num_patches"])
  kwargs["patch_dim"] = int(derived["patch_dim"])
  kwargs["num_registers"] = int(derived.get("num_registers", 0))
  kwargs["layer_norm_eps"] = float(derived.get("layernorm_eps", 1e-5))
  gelu = str(derived.get("gelu", "exact"))
  if not gelu.startswith(("exact", "tanh")):
    raise ValueError(f"{source}: derived.gelu must start with 'exact' or 'tanh', found {gelu!r}")
  kwargs["gelu_approximate"] = gelu.startswith("tanh")
  return kwargs


TOKENIZER_FILE = "tokenizer.npz"  # boldGPT: the checkpoint's vocabulary, in the workdir


class BoldGptConverter(Converter):
  """clane9/boldGPT IGPT `.pt`: decoder.* weights, patchify.* layout, tokenizer.vocab."""

  name = "boldgpt"
  tasks = ("next_patch",)

  def convert(self, sd, task, fresh, fresh_extra, info, options, source) -> Converted:
    del fresh, fresh_extra, options
    m = task.model
    params, extras = convert_boldgpt(sd, num_heads=m.num_heads, source=source)
    kw = extras["model_kwargs"]
    problems = mismatches(
      [
        ("config.task.target (categorical)", m.categorical, kw["categorical"]),
        ("config.model.embed_dim", m.embed_dim, kw["embed_dim"]),
        ("config.model.depth", m.depth, kw["depth"]),
        ("config.model.mlp_ratio", float(m.mlp_ratio), float(kw["mlp_ratio"])),
        ("config.model.num_registers", m.num_registers, kw["num_registers"]),
        ("config.model.with_sub_embed", m.with_sub_embed, kw["with_sub_embed"]),
        ("config.model.with_next_pos", m.with_next_pos, kw["with_next_pos"]),
        ("num_patches (config.data.patch_size / mask)", m.num_patches, kw["num_patches"]),
        ("patch_dim (config.data.patch_size)", m.patch_dim, kw["patch_dim"]),
      ]
    )
    if kw["with_sub_embed"]:
      problems += mismatches([("config.model.num_subjects", m.num_subjects, kw["num_subjects"])])
    if m.categorical:
      problems += mismatches([("config.data.tokenizer.vocab_size", m.vocab_size, kw["vocab_size"])])
    fail_fields(source, self.name, problems)
    notes: list[str] = []
    layout = extras["layout"]
    if layout is not None:
      own = info.layout
      same = np.array_equal(np.asarray(own.mask), np.asarray(layout.mask)) and all(
        np.array_equal(np.asarray(getattr(own, f)), np.asarray(getattr(layout, f)))
        for f in ("patch_mask", "patch_indices")
      )
      if not same:
        raise InputError(
          f"{source}: patchify.* (the checkpoint's flat-map mask and patch order) differ from "
          f"the layout config.data builds (mask {np.shape(own.mask)}, {own.num_patches} "
          "patches): set config.data.path to data on the same flat map and "
          "config.data.patch_size / ordering to the checkpoint's"
        )
    artifacts: dict[str, Any] = {}
    tok = extras["tokenizer"]
    if tok is not None:
      artifacts[TOKENIZER_FILE] = tok.save
      own = getattr(info, "tokenizer", None)
      if own is None or not np.array_equal(np.asarray(own.vocab), np.asarray(tok.vocab)):
        raise InputError(  # configure() points the pipeline at the checkpoint's vocabulary
          f"{source}: tokenizer.vocab expected to be the vocabulary config.data uses, found "
          "a different one (config.data.tokenizer.path)"
        )
    return Converted(params, None, notes, artifacts)

  def configure(self, config, sd, source, scratch) -> list:
    """The checkpoint's tokenizer.vocab becomes config.data.tokenizer.path, so the converted
    workdir encodes and decodes tokens with the vocabulary the weights were trained on."""
    if "tokenizer.vocab" not in sd:
      return []
    from boldjax.data.tokenizer import KMeansTokenizer

    try:
      tok = KMeansTokenizer(np.asarray(sd["tokenizer.vocab"]))
    except ValueError as e:
      raise InputError(f"{source}: tokenizer.vocab: {e}") from e
    tcfg = config.data.tokenizer
    given = tcfg.get("path")
    if given:
      other = KMeansTokenizer.load(given)
      if not np.array_equal(other.vocab, tok.vocab):
        raise InputError(
          f"{given}: config.data.tokenizer.path expected the vocabulary of {source} "
          f"(tokenizer.vocab {tok.vocab.shape}), found a different one {other.vocab.shape} "
          "(leave it unset: the converter uses the checkpoint's)"
        )
    path = os.path.join(scratch, TOKENIZER_FILE)
    tok.save(path)
    notes = []
    with config.unlocked():
      if tcfg.get("vocab_size") != tok.vocab_size:
        notes.append(
          f"config.data.tokenizer.vocab_size={tcfg.get('vocab_size')} set to the "
          f"checkpoint's {tok.vocab_size}"
        )
      tcfg.vocab_size = tok.vocab_size
      tcfg.path = path
    self._scratch_path = path
    notes.append(
      f"config.data.tokenizer.path = WORKDIR/{TOKENIZER_FILE} (the checkpoint's "
      f"tokenizer.vocab, {tok.vocab_size} x {tok.dim}; not fitted)"
    )
    return notes

  def finalize_config(self, config, workdir) -> None:
    if getattr(self, "_scratch_path", None) and config.data.tokenizer.get("path") == (
      self._scratch_path
    ):
      with config.unlocked():
        config.data.tokenizer.path = os.path.join(workdir, TOKENIZER_FILE)
    self._scratch_path = None


registry.register("converter", "boldgpt")(BoldGptConverter())
