"""Import athms/learning-from-brains PyTorch state_dicts into LfbModel params (and back).

Layout differences handled here:
  - torch Linear weights are (out, in); flax kernels (in, out). HF GPT-2 Conv1D weights
    (c_attn, c_proj, c_fc) are already (in, out); c_attn packs [q | k | v] along the output
    axis (heads contiguous inside each) and is split into query / key / value.
  - attention kernels are (D, heads, head_dim) / (heads, head_dim, D) in boldjax.
  - LSTM weight_ih_l0 / weight_hh_l0 (4H, in) are transposed; *_reverse is the backward
    direction. Gate order (i, f, g, o) and both biases are kept.
  - embedder / unembedder torch.nn.Sequential indices: layer k's Linear sits at 4k, its
    LayerNorm at 4k+1 ([Linear, LayerNorm, GELU, Dropout] per hidden layer).
Buffers and never-used weights (GPT-2 wte / attn.bias / attn.masked_bias, BERT
word_embeddings / position_ids) are skipped; any other unknown or missing key raises.
`params_to_torch` is the exact inverse (used to compare gradients by torch name).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from boldjax import registry
from boldjax.cli import InputError
from boldjax.convert.converter import (
  Converted,
  Converter,
  fail_fields,
  fresh_graft,
  mismatches,
)
from boldjax.convert.tree import get_path, set_path

STYLES = {"CSM": "csm", "BERT": "bert", "NetBERT": "netbert", "autoencoder": "autoencoder"}
IGNORED = (
  re.compile(r"decoder\.transformer\.wte\.weight"),
  re.compile(r"decoder\.transformer\.h\.\d+\.attn\.(bias|masked_bias)"),
  re.compile(r"decoder\.transformer\.embeddings\.(word_embeddings\.weight|position_ids)"),
)

Rule = tuple[str, tuple[str, ...], Callable[[np.ndarray], np.ndarray], Callable[..., np.ndarray]]


def _f32(x: Any) -> np.ndarray:
  return np.asarray(x, np.float32)


def _same(x: np.ndarray) -> np.ndarray:
  return x


def _t(x: np.ndarray) -> np.ndarray:
  return x.T


def _linear(torch_name: str, path: tuple[str, ...]) -> list[Rule]:
  return [
    (torch_name + ".weight", path + ("kernel",), _t, _t),
    (torch_name + ".bias", path + ("bias",), _same, _same),
  ]


def _norm(torch_name: str, path: tuple[str, ...]) -> list[Rule]:
  return [
    (torch_name + ".weight", path + ("scale",), _same, _same),
    (torch_name + ".bias", path + ("bias",), _same, _same),
  ]


def _heads_in(heads: int, transpose: bool):
  """(D, D) torch weight -> (D, heads, hd) kernel, and back."""

  def fwd(w):
    w = w.T if transpose else w
    return w.reshape(w.shape[0], heads, -1)

  def inv(k):
    w = k.reshape(k.shape[0], -1)
    return w.T if transpose else w

  return fwd, inv


def _heads_out(heads: int, transpose: bool):
  """(D, D) torch weight -> (heads, hd, D) kernel, and back."""

  def fwd(w):
    w = w.T if transpose else w
    return w.reshape(heads, -1, w.shape[1])

  def inv(k):
    w = k.reshape(-1, k.shape[-1])
    return w.T if transpose else w

  return fwd, inv


def _bias_heads(heads: int):
  return (lambda b: b.reshape(heads, -1)), (lambda b: b.reshape(-1))


def _stack(prefix: str, path: tuple[str, ...], n: int, out_last_norm: bool) -> list[Rule]:
  """Embedder / unembedder Sequential: Linear at 4k, LayerNorm at 4k+1."""
  rules: list[Rule] = []
  for k in range(n):
    rules += _linear(f"{prefix}.{4 * k}", path + (f"linear_{k}",))
    if k < n - 1 or out_last_norm:
      rules += _norm(f"{prefix}.{4 * k + 1}", path + (f"norm_{k}",))
  return rules


def rules_for(
  style: str,
  *,
  num_layers: int,
  num_heads: int,
  embed_layers: int = 1,
  unembed_layers: int | None = 1,
  num_classes: int = 0,
) -> list[Rule]:
  """Every (torch name, flax path, to_flax, to_torch) of an LfbModel configuration."""
  r: list[Rule] = []
  r += _stack("embedder.embed_model.model", ("embedder",), embed_layers, True)
  r.append(("embedder.wt_re.weight", ("embedder", "wt_re", "embedding"), _same, _same))
  if unembed_layers:
    r += _stack("unembedder.model", ("unembedder",), unembed_layers, False)
  if style in ("csm", "bert", "netbert"):
    r += [(f"embedder.{n}", (n,), _same, _same) for n in ("msk_embed", "cls_embed")]
    r += _linear("decoder.pooler_layer.0", ("pooler",))
    if num_classes:
      r += _linear("decoder.decoding_head.0", ("decoding_head",))
  if style == "csm":
    T, P = "decoder.transformer", ("transformer",)
    r.append((f"{T}.wpe.weight", P + ("wpe", "embedding"), _same, _same))
    for i in range(num_layers):
      pre, path = f"{T}.h.{i}", P + (f"h_{i}",)
      r += _norm(f"{pre}.ln_1", path + ("ln_1",)) + _norm(f"{pre}.ln_2", path + ("ln_2",))
      for j, name in enumerate(("query", "key", "value")):

        def w_fwd(w, j=j):
          D = w.shape[0]
          return w[:, j * D : (j + 1) * D].reshape(D, num_heads, -1)

        def b_fwd(b, j=j):
          D = b.shape[0] // 3
          return b[j * D : (j + 1) * D].reshape(num_heads, -1)

        # the inverse is assembled in params_to_torch (three kernels -> one c_attn)
        r.append((f"{pre}.attn.c_attn.weight#{j}", path + ("attn", name, "kernel"), w_fwd, None))
        r.append((f"{pre}.attn.c_attn.bias#{j}", path + ("attn", name, "bias"), b_fwd, None))
      fwd, inv = _heads_out(num_heads, transpose=False)
      r.append((f"{pre}.attn.c_proj.weight", path + ("attn", "out", "kernel"), fwd, inv))
      r.append((f"{pre}.attn.c_proj.bias", path + ("attn", "out", "bias"), _same, _same))
      for name in ("c_fc", "c_proj"):
        r.append((f"{pre}.mlp.{name}.weight", path + (name, "kernel"), _same, _same))
        r.append((f"{pre}.mlp.{name}.bias", path + (name, "bias"), _same, _same))
    r += _norm(f"{T}.ln_f", P + ("ln_f",))
  elif style in ("bert", "netbert"):
    T, P = "decoder.transformer", ("transformer",)
    r.append(("embedder.sep_embed", ("sep_embed",), _same, _same))
    r += _linear("decoder.is_next_head.0", ("is_next_head",))
    for name in ("position_embeddings", "token_type_embeddings"):
      r.append((f"{T}.embeddings.{name}.weight", P + (name, "embedding"), _same, _same))
    r += _norm(f"{T}.embeddings.LayerNorm", P + ("embeddings_norm",))
    for i in range(num_layers):
      pre, path = f"{T}.encoder.layer.{i}", P + (f"layer_{i}",)
      for name in ("query", "key", "value"):
        fwd, inv = _heads_in(num_heads, transpose=True)
        bf, bi = _bias_heads(num_heads)
        att = path + ("attention", name)
        r.append((f"{pre}.attention.self.{name}.weight", att + ("kernel",), fwd, inv))
        r.append((f"{pre}.attention.self.{name}.bias", att + ("bias",), bf, bi))
      fwd, inv = _heads_out(num_heads, transpose=True)
      out = path + ("attention", "out")
      r.append((f"{pre}.attention.output.dense.weight", out + ("kernel",), fwd, inv))
      r.append((f"{pre}.attention.output.dense.bias", out + ("bias",), _same, _same))
      r += _norm(f"{pre}.attention.output.LayerNorm", path + ("attention_norm",))
      r += _linear(f"{pre}.intermediate.dense", path + ("intermediate",))
      r += _linear(f"{pre}.output.dense", path + ("output",))
      r += _norm(f"{pre}.output.LayerNorm", path + ("output_norm",))
  elif style == "autoencoder":
    A = ("autoencoder",)

    def lstm(prefix: str, suffix: str, path: tuple[str, ...]) -> list[Rule]:
      return [
        (f"{prefix}.weight_ih_l0{suffix}", path + ("weight_ih",), _t, _t),
        (f"{prefix}.weight_hh_l0{suffix}", path + ("weight_hh",), _t, _t),
        (f"{prefix}.bias_ih_l0{suffix}", path + ("bias_ih",), _same, _same),
        (f"{prefix}.bias_hh_l0{suffix}", path + ("bias_hh",), _same, _same),
      ]

    enc, dec = A + ("encoder",), A + ("decoder",)
    r += _linear("decoder.encoder.pooler_layer.1", enc + ("pooler",))
    for i in range(num_layers):
      r += lstm(f"decoder.encoder.lstms.{i}", "", enc + (f"lstms_{i}_fwd",))
      r += lstm(f"decoder.encoder.lstms.{i}", "_reverse", enc + (f"lstms_{i}_bwd",))
      r += lstm(f"decoder.decoder.lstms.{i}", "", dec + (f"lstms_{i}",))
    for i in range(num_layers - 1):
      r += _norm(f"decoder.encoder.layer_norms.{i}.0", enc + (f"layer_norms_{i}",))
      r += _norm(f"decoder.decoder.layer_norms.{i}.0", dec + (f"layer_norms_{i}",))
    r += _linear("decoder.decoder.linear_output_layer.1", dec + ("linear_output",))
    if num_classes:
      r += _linear("decoder.decoding_head.0", ("decoding_head",))
  else:
    raise ValueError(
      f"convert_lfb: style must be one of {sorted(STYLES.values())}, found {style!r}"
    )
  return r


def infer_structure(sd: Mapping[str, Any], source: str = "state_dict") -> dict[str, Any]:
  """style / num_layers / embed_layers / unembed_layers / num_classes / sizes from the keys."""
  keys = set(sd)

  def count(pattern: str) -> int:
    ids = {int(m.group(1)) for k in keys if (m := re.fullmatch(pattern, k))}
    return max(ids) + 1 if ids else 0

  if any(k.startswith("decoder.transformer.h.") for k in keys):
    style, num_layers = "csm", count(r"decoder\.transformer\.h\.(\d+)\..+")
  elif any(k.startswith("decoder.transformer.encoder.layer.") for k in keys):
    msk = np.shape(sd.get("embedder.msk_embed", np.zeros((1, 1, 2))))
    style = "netbert" if msk[-1] == 1 and msk[1] > 1 else "bert"
    num_layers = count(r"decoder\.transformer\.encoder\.layer\.(\d+)\..+")
  elif any(k.startswith("decoder.encoder.lstms.") for k in keys):
    style, num_layers = "autoencoder", count(r"decoder\.encoder\.lstms\.(\d+)\..+")
  else:
    raise KeyError(
      f"{source}: not a learning-from-brains GPT / BERT / autoencoder state_dict (no "
      "decoder.transformer.h.*, decoder.transformer.encoder.layer.* or decoder.encoder.lstms.*)"
    )
  embed_idx = count(r"embedder\.embed_model\.model\.(\d+)\.weight")
  unembed_idx = count(r"unembedder\.model\.(\d+)\.weight")
  head = sd.get("decoder.decoding_head.0.weight")
  wt_re = np.shape(sd["embedder.wt_re.weight"]) if "embedder.wt_re.weight" in keys else None
  if wt_re is None:
    raise KeyError(f"{source}: missing embedder.wt_re.weight")
  return dict(
    style=style,
    num_layers=num_layers,
    embed_layers=(embed_idx - 2) // 4 + 1 if embed_idx else 0,
    unembed_layers=(unembed_idx - 1) // 4 + 1 if unembed_idx else 0,
    num_classes=int(np.shape(head)[0]) if head is not None else 0,
    embed_dim=int(wt_re[1]),
    num_tr_embeddings=int(wt_re[0]),
    in_dim=int(np.shape(sd["embedder.embed_model.model.0.weight"])[1]),
  )


def convert_lfb(
  state_dict: Mapping[str, Any], *, num_heads: int, source: str = "state_dict"
) -> tuple[dict[str, Any], dict[str, Any]]:
  """learning-from-brains Model state_dict -> (LfbModel params, structure).

  structure: style, num_layers, embed_layers, unembed_layers, num_classes, embed_dim,
  in_dim, num_tr_embeddings (the LfbModel sizes the weights imply; num_heads cannot be
  read from weights and is given). Unknown or missing keys and bad shapes raise.
  """
  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  st = infer_structure(sd, source)
  if st["style"] != "autoencoder" and st["embed_dim"] % num_heads:
    raise ValueError(
      f"{source}: embed dim {st['embed_dim']} not divisible by num_heads={num_heads}"
    )
  rules = rules_for(
    st["style"],
    num_layers=st["num_layers"],
    num_heads=num_heads,
    embed_layers=st["embed_layers"],
    unembed_layers=st["unembed_layers"],
    num_classes=st["num_classes"],
  )
  wanted = {name.split("#")[0] for name, *_ in rules}
  missing = sorted(wanted - set(sd))
  unknown = sorted(k for k in set(sd) - wanted if not any(p.fullmatch(k) for p in IGNORED))
  if missing or unknown:
    raise KeyError(
      f"{source}: cannot convert to LfbModel({st['style']}): missing keys {missing}, "
      f"unknown keys {unknown}"
    )
  params: dict[str, Any] = {}
  for name, path, fwd, _ in rules:
    set_path(params, path, _f32(fwd(sd[name.split("#")[0]])))
  return params, st


def params_to_torch(params: Mapping[str, Any], structure: Mapping[str, Any], num_heads: int):
  """LfbModel params (or gradients) -> torch names and layouts (inverse of convert_lfb)."""
  import flax.linen as nn

  params = nn.unbox(params)
  rules = rules_for(
    structure["style"],
    num_layers=structure["num_layers"],
    num_heads=num_heads,
    embed_layers=structure["embed_layers"],
    unembed_layers=structure["unembed_layers"],
    num_classes=structure["num_classes"],
  )
  out: dict[str, np.ndarray] = {}
  packed: dict[str, list[np.ndarray]] = {}
  for name, path, _, inv in rules:
    value = np.asarray(get_path(params, path))
    if inv is None:  # GPT-2 c_attn: concatenate q | k | v along the output axis
      base, j = name.split("#")
      flat = value.reshape(value.shape[0], -1) if value.ndim == 3 else value.reshape(-1)
      packed.setdefault(base, [None] * 3)[int(j)] = flat
    else:
      out[name] = inv(value)
  for base, parts in packed.items():
    out[base] = np.concatenate(parts, axis=-1)
  return out


_ACT = ("gelu_new", "gelu", "relu")


def model_kwargs_from_spec(spec: Mapping[str, Any], source: str = "spec.json") -> dict[str, Any]:
  """LfbModel kwargs from a parity spec's `config` (the original's make_model arguments).

  The TR table keeps the original's 300 s maximum: make_embedder passes `max_t_r`, which
  BaseEmbedder swallows, so `t_r_max` stays at its default whatever the config says.
  """
  cfg = dict(spec["config"])
  style = STYLES.get(cfg.get("training_style"))
  if style is None:
    raise ValueError(
      f"{source}: config.training_style expected one of {sorted(STYLES)}, "
      f"found {cfg.get('training_style')!r}"
    )
  if cfg.get("hidden_activation", "gelu_new") not in _ACT:
    raise ValueError(f"{source}: config.hidden_activation must be one of {_ACT}")
  return dict(
    style=style,
    in_dim=int(cfg["parcellation_dim"]),
    embed_dim=int(cfg["embedding_dim"]),
    num_layers=int(cfg["num_hidden_layers"]),
    num_heads=int(cfg.get("num_attention_heads", 12)),
    intermediate_factor=int(cfg.get("intermediate_dim_factor", 4)),
    n_positions=int(cfg.get("n_positions", 512)),
    dropout=float(cfg.get("dropout", 0.1)),
    tr_precision=float(cfg.get("tr_precision", 0.2)),
    tr_max=300.0,
    embed_layers=int(cfg.get("num_hidden_layers_embedding_model", 1)),
    unembed_layers=int(cfg.get("num_hidden_layers_unembedding_model", 1)),
    hidden_activation=str(cfg.get("hidden_activation", "gelu_new")),
  )


def lfb_backbones() -> tuple[str, ...]:
  return ("csm", "seq_bert", "net_bert", "autoencoder")


class LfbConverter(Converter):
  """athms/learning-from-brains `pytorch_model.bin` of one backbone (CSM / BERT / ...)."""

  decode_backbone = True

  def __init__(self, name: str):
    from boldjax.tasks.decode import BACKBONES

    self.name, self.tasks, self.style = name, (name,), BACKBONES[name]
    self._rules: dict[tuple[str, ...], str] = {}

  def convert(self, sd, task, fresh, fresh_extra, info, options, source) -> Converted:
    del fresh_extra
    m = task.model
    st = infer_structure(sd, source)
    if st["style"] != self.style:
      raise InputError(
        f"{source}: family {self.name!r} expects a {self.style} model, found a "
        f"{st['style']} state_dict (pick the family that matches the file)"
      )
    notes: list[str] = []
    problems = mismatches(
      [
        ("config.model.embedding_dim", m.embed_dim, st["embed_dim"]),
        ("config.model.num_hidden_layers", m.num_layers, st["num_layers"]),
        ("config.model.num_hidden_layers_embedding_model", m.embed_layers, st["embed_layers"]),
        ("info.num_parcels (config.data)", m.in_dim, st["in_dim"]),
        (
          "config.model.tr_max / tr_precision (TR table rows)",
          int(m.tr_max / m.tr_precision) + 1,
          st["num_tr_embeddings"],
        ),
      ]
    )
    if m.architecture != "autoencoder" or st["unembed_layers"]:
      problems += mismatches(
        [
          (
            "config.model.num_hidden_layers_unembedding_model",
            m.unembed_layers,
            st["unembed_layers"],
          )
        ]
      )
    head_keys = ("decoding_head",)
    if st["num_classes"] and not m.num_classes:
      problems.append(
        f"the file holds a {st['num_classes']}-class decoding head (decoder.decoding_head.*) "
        f"that task {task.name!r} has no place for: convert with "
        f"--config=configs/decode.py:backbone={self.name} to keep it, or pass "
        "--drop=decoder.decoding_head to leave it out"
      )
    elif st["num_classes"] and m.num_classes != st["num_classes"]:
      problems.append(
        f"info.num_classes (config.data)={m.num_classes} but the checkpoint's decoding head "
        f"has {st['num_classes']} classes"
      )
    fail_fields(source, self.name, problems)
    params, st = convert_lfb(sd, num_heads=m.num_heads, source=source)
    self._rules = {
      path: name.split("#")[0]
      for name, path, *_ in rules_for(
        st["style"],
        num_layers=st["num_layers"],
        num_heads=m.num_heads,
        embed_layers=st["embed_layers"],
        unembed_layers=st["unembed_layers"],
        num_classes=m.num_classes,
      )
    }
    if m.num_classes and not st["num_classes"]:
      params = fresh_graft(params, fresh, head_keys)
      notes.append("decoding_head: not in the checkpoint, freshly initialised")
    return Converted(params, None, notes)

  def torch_name(self, path):
    return self._rules.get(tuple(path))


for _name in lfb_backbones():
  registry.register("converter", _name)(LfbConverter(_name))
