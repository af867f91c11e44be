"""Import SamGijsen/Brain-Semantoks `SimDINOModel` state_dicts (student + EMA teacher).

Result: {"student": {"params": {"encoder", "head"}, "buffers": {"encoder"}}, "teacher": same}
for boldjax.models.semantoks.SemantoksEncoder / DinoHead ("buffers" holds the frozen SLConv
kernel_norm, see that module). Layouts:
  - Linear (out, in) -> kernel (in, out); Conv1d (out, in, k) -> kernel (k, in, out).
  - qkv Linear (3D, D) -> query / key / value kernels (D, heads, head_dim) (rows q | k | v,
    heads contiguous); proj (D, D) -> out kernel (heads, head_dim, D).
  - DINOHead mlp.{2i} (Linear, GELU between) -> linear_{i}; `mlp` itself when nlayers == 1.
  - SLConv kernel_list.i / D / kernel_norm keep the torch layout.
Keys recognised and skipped on purpose (any other unused key is an error):
  - network_tokenizers.<atlas>.* for every atlas but the first: dead copies, never called
    (their kernel_norm buffers were never initialised);
  - inter_network_transformer.norm.*: built, never applied (CNN_TF.norm is used instead);
  - *_mask_predictor.*: the same module as *_predictor (checked equal);
  - buffers recomputed here and checked: temporal_pos_embedding, slconv.multiplier,
    slconv.kernel_norm_initialized (False: kernel_norm is computed from the kernel, as the
    original's first forward would).
`params_to_torch` is the exact inverse for {"encoder", "head"} params (or their gradients).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import numpy as np

from boldjax import registry
from boldjax.cli import InputError
from boldjax.convert.converter import (
  Converted,
  Converter,
)
from boldjax.convert.tree import get_path, set_path
from boldjax.models import network_tokenizer as nt
from boldjax.models import semantoks as sm

Rule = tuple[str, tuple[str, ...], Callable[[np.ndarray], np.ndarray], Callable[..., np.ndarray]]


def _same(x: np.ndarray) -> np.ndarray:
  return x


def _t(x: np.ndarray) -> np.ndarray:
  return x.T


def _conv(x: np.ndarray) -> np.ndarray:
  return np.transpose(x, (2, 1, 0))


def _linear(torch_name: str, path: tuple[str, ...]) -> list[Rule]:
  return [
    (f"{torch_name}.weight", path + ("kernel",), _t, _t),
    (f"{torch_name}.bias", path + ("bias",), _same, _same),
  ]


def _norm(torch_name: str, path: tuple[str, ...]) -> list[Rule]:
  return [
    (f"{torch_name}.weight", path + ("scale",), _same, _same),
    (f"{torch_name}.bias", path + ("bias",), _same, _same),
  ]


def semantoks_kwargs(
  constructor_kwargs: Mapping[str, Any], network_map: np.ndarray, source: str = "spec.json"
) -> dict[str, Any]:
  """Module kwargs from the original SimDINOModel constructor arguments + CNN_TF.network_map.

  Returns {"encoder": SemantoksEncoder kwargs, "head": DinoHead kwargs, "loss":
  simdino_losses kwargs, "atlas_names": (...)}. The first atlas' tokenizers are the used ones.
  """
  ck = dict(constructor_kwargs)
  where = f"{source}: constructor_kwargs"
  if ck.get("backbone_type", "cnn_tf") != "cnn_tf":
    raise ValueError(f"{where}.backbone_type: expected 'cnn_tf', found {ck['backbone_type']!r}")
  for key in ("max_spatial", "min_spatial", "use_separate_mask_predictor"):
    if ck.get(key):
      raise ValueError(f"{where}.{key}: only False is supported, found {ck[key]!r}")
  if ck.get("tokenizer_config") is None:  # the original's fallback tokenizer
    ck["tokenizer_config"] = [
      {"type": "dense", "kernel_size": 3, "depthwise": False, "out_channels": ck["embedding_dim"]}
    ]
  branches = nt.branches_from_config(ck["tokenizer_config"], f"{where}.tokenizer_config")
  D = int(ck["embedding_dim"])
  if sum(b.out_channels for b in branches) != D:
    raise ValueError(
      f"{where}: embedding_dim {D} != sum of tokenizer out_channels "
      f"{sum(b.out_channels for b in branches)}"
    )
  if ck.get("global_pooling", "cls") != "cls":
    raise ValueError(f"{where}.global_pooling: expected 'cls', found {ck['global_pooling']!r}")
  patch, T = int(ck["patch_size"]), int(ck["target_time_length"])
  rois = nt.network_rois_from_map(np.asarray(network_map))
  if sorted(np.unique(np.asarray(network_map)).tolist()) != list(range(len(rois))):
    raise ValueError(f"{source}: network ids must be 0..N-1, found {np.unique(network_map)}")
  encoder = dict(
    network_rois=rois,
    branches=branches,
    embed_dim=D,
    depth=int(ck["depth"]),
    num_heads=int(ck["heads"]),
    mlp_dim=int(ck["mlp_dim"]),
    patch_size=patch,
    num_patches=(T - patch) // patch + 1,
    layer_scale_init=ck.get("layer_scale_init_value"),
    do_masking=bool(ck.get("do_masking", False)),
    tokenizer_final_norm=str(ck.get("tokenizer_final_norm", "layer")),
    tokenizer_pooling=str(ck.get("tokenizer_pooling_type", "mean")),
    drop_path_rate=float(ck.get("drop_path_rate", 0.0)),
    emb_dropout=float(ck.get("emb_dropout", 0.0)),
  )
  head = dict(
    hidden_dim=int(ck["projection_hidden_dim"]),
    bottleneck_dim=int(ck["projection_bottleneck_dim"]),
    nlayers=int(ck["projection_nlayers"]),
  )
  loss = dict(
    mask_loss_weight=float(ck.get("mask_loss_weight", 0.0)),
    eps=0.05,
    coeff=float(ck.get("coeff", 1)),
  )
  return {"encoder": encoder, "head": head, "loss": loss, "atlas_names": tuple(ck["atlas_names"])}


def encoder_rules(prefix: str, enc: Mapping[str, Any], atlas: str) -> tuple[list[Rule], list[Rule]]:
  """(param rules, buffer rules) of one CNN_TF (prefix e.g. 'student_encoder')."""
  params: list[Rule] = []
  buffers: list[Rule] = []
  for n in range(len(enc["network_rois"])):
    tp, path = f"{prefix}.network_tokenizers.{atlas}.{n}", (f"tokenizer_{n}",)
    for i, b in enumerate(enc["branches"]):
      bp, bpath = f"{tp}.branches.{i}", path + (f"branch_{i}",)
      if b.type == "sgconv":
        sp, spath = f"{bp}.slconv", bpath + ("slconv",)
        for j in range(b.num_scales):
          params.append((f"{sp}.kernel_list.{j}", spath + (f"kernel_{j}",), _same, _same))
        params.append((f"{sp}.D", spath + ("D",), _same, _same))
        buffers.append((f"{sp}.kernel_norm", spath + ("kernel_norm",), _same, _same))
        params += _linear(f"{bp}.projection", bpath + ("projection",))
      elif b.depthwise:
        for part in ("depthwise", "pointwise"):
          params.append((f"{bp}.{part}.weight", bpath + (part, "kernel"), _conv, _conv))
          params.append((f"{bp}.{part}.bias", bpath + (part, "bias"), _same, _same))
      else:
        params.append((f"{bp}.weight", bpath + ("conv", "kernel"), _conv, _conv))
        params.append((f"{bp}.bias", bpath + ("conv", "bias"), _same, _same))
    if enc["tokenizer_final_norm"] == "layer":
      params += _norm(f"{tp}.norm", path + ("norm",))
  it = f"{prefix}.inter_network_transformer"
  if enc["do_masking"]:
    params.append((f"{it}.mask_embedding", ("mask_embedding",), _same, _same))
  params.append((f"{it}.cls_token", ("cls_token",), _same, _same))
  params.append(
    (f"{it}.network_learnable_pos_embedding.weight", ("network_embedding",), _same, _same)
  )
  H = enc["num_heads"]
  for i in range(enc["depth"]):
    bp, path = f"{it}.transformer_blocks.{i}", (f"block_{i}",)
    params += _norm(f"{bp}.norm1", path + ("norm1",)) + _norm(f"{bp}.norm2", path + ("norm2",))
    for j, name in enumerate(("query", "key", "value")):

      def q_fwd(w, j=j):
        D = w.shape[1]
        return w[j * D : (j + 1) * D].T.reshape(D, H, -1)

      params.append((f"{bp}.attn.qkv.weight#{j}", path + ("attn", name, "kernel"), q_fwd, None))

    def o_fwd(w):
      return w.T.reshape(H, -1, w.shape[0])

    def o_inv(k):
      return k.reshape(-1, k.shape[-1]).T

    params.append((f"{bp}.attn.proj.weight", path + ("attn", "out", "kernel"), o_fwd, o_inv))
    params.append((f"{bp}.attn.proj.bias", path + ("attn", "out", "bias"), _same, _same))
    params += _linear(f"{bp}.mlp.0", path + ("fc1",)) + _linear(f"{bp}.mlp.3", path + ("fc2",))
    if enc["layer_scale_init"]:
      params.append((f"{bp}.ls1.gamma", path + ("ls1",), _same, _same))
      params.append((f"{bp}.ls2.gamma", path + ("ls2",), _same, _same))
  params += _norm(f"{prefix}.norm", ("norm",))
  return params, buffers


def head_rules(prefix: str, nlayers: int) -> list[Rule]:
  """DINOHead(remove_last_layer=True) Linear layers (prefix e.g. 'student_predictor')."""
  n = max(nlayers, 1)
  if n == 1:
    return _linear(f"{prefix}.mlp", ("linear_0",))
  return [r for i in range(n) for r in _linear(f"{prefix}.mlp.{2 * i}", (f"linear_{i}",))]


def _flat_shapes(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat_shapes(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = tuple(np.shape(v))
  return out


def _expected_shapes(kwargs: Mapping[str, Any]) -> tuple[dict, dict, dict]:
  """Param / buffer shapes of the boldjax modules (abstract init, no compute)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  enc_kw = kwargs["encoder"]
  encoder = sm.SemantoksEncoder(**enc_kw)
  head = sm.DinoHead(**kwargs["head"])
  num_rois = 1 + max(max(r) for r in enc_kw["network_rois"])
  x = jax.ShapeDtypeStruct((1, num_rois, enc_kw["num_patches"] * enc_kw["patch_size"]), jnp.float32)
  enc = jax.eval_shape(lambda: nn.unbox(encoder.init(jax.random.key(0), jnp.zeros(x.shape))))
  hv = jax.eval_shape(
    lambda: nn.unbox(head.init(jax.random.key(0), jnp.zeros((1, enc_kw["embed_dim"]))))
  )
  return _flat_shapes(enc["params"]), _flat_shapes(enc["buffers"]), _flat_shapes(hv["params"])


def _check_close(
  sd: Mapping[str, np.ndarray], key: str, expected: np.ndarray, source: str, what: str
) -> None:
  found = np.asarray(sd[key], np.float64)
  if found.shape != expected.shape or not np.allclose(found, expected, rtol=1e-6, atol=1e-6):
    raise ValueError(f"{source}: {key}: expected {what}, found values that differ")


def semantoks_params(
  state_dict: Mapping[str, Any], kwargs: Mapping[str, Any], source: str = "state_dict"
) -> dict[str, dict[str, Any]]:
  """SimDINOModel state_dict -> {"student"|"teacher": {"params", "buffers"}} (float32).

  kwargs: the output of `semantoks_kwargs`. Missing keys, unknown keys and shape mismatches
  raise, naming the key.
  """
  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  enc_kw, atlases = kwargs["encoder"], tuple(kwargs["atlas_names"])
  want_p, want_b, want_h = _expected_shapes(kwargs)
  used: set[str] = set()
  out: dict[str, dict[str, Any]] = {}
  for role in ("student", "teacher"):
    enc_prefix, head_prefix = f"{role}_encoder", f"{role}_predictor"
    p_rules, b_rules = encoder_rules(enc_prefix, enc_kw, atlases[0])
    groups = (
      ("encoder", p_rules, want_p, "params"),
      ("encoder", b_rules, want_b, "buffers"),
      ("head", head_rules(head_prefix, kwargs["head"]["nlayers"]), want_h, "params"),
    )
    tree: dict[str, Any] = {"params": {}, "buffers": {}}
    for part, rules, want, coll in groups:
      missing = sorted({r[0].split("#")[0] for r in rules} - set(sd))
      if missing:
        raise KeyError(f"{source}: missing keys {missing}")
      for name, path, fwd, _ in rules:
        base = name.split("#")[0]
        value = np.asarray(fwd(sd[base]), np.float32)
        if coll == "buffers":
          flag = base.replace("kernel_norm", "kernel_norm_initialized")
          used.add(flag)
          if flag in sd and not bool(sd[flag]):  # never run: the first forward would set it
            value = _kernel_norm(sd, base.rsplit(".", 1)[0], enc_kw, path)
        if want.get(path) != value.shape:
          raise ValueError(
            f"{source}: {base}: expected shape {want.get(path)} for {coll} "
            f"{'/'.join(path)}, found {value.shape}"
          )
        set_path(tree[coll].setdefault(part, {}), path, value)
        used.add(base)
      missing_paths = sorted(set(want) - {r[1] for r in rules})
      if missing_paths:
        raise KeyError(f"{source}: no torch key for {part} {coll} {missing_paths}")
    out[role] = tree
    used |= _check_extras(sd, enc_prefix, head_prefix, enc_kw, atlases, source)
  unknown = sorted(set(sd) - used)
  if unknown:
    raise KeyError(f"{source}: unknown keys (not part of SimDINOModel(cnn_tf)): {unknown}")
  return out


def _kernel_norm(
  sd: Mapping[str, np.ndarray], sp: str, enc_kw: Mapping[str, Any], path
) -> np.ndarray:
  """kernel_norm from the stored kernel (what the original computes at its first forward)."""
  i = int(path[1].split("_")[1])
  b = enc_kw["branches"][i]
  kernels = [sd[f"{sp}.kernel_list.{j}"] for j in range(b.num_scales)]
  R = kernels[0].shape[1]
  k = np.asarray(nt.slconv_kernel(kernels, nt.slconv_multiplier(b.decay_min, b.decay_max, R)))
  return np.linalg.norm(k, axis=-1, keepdims=True).astype(np.float32)


def _check_extras(
  sd: Mapping[str, np.ndarray],
  enc_prefix: str,
  head_prefix: str,
  enc_kw: Mapping[str, Any],
  atlases: Sequence[str],
  source: str,
) -> set[str]:
  """The keys skipped on purpose for one role (see the module docstring), after checks."""
  used: set[str] = set()
  dead = re.compile(
    rf"{re.escape(enc_prefix)}\.network_tokenizers\.({'|'.join(map(re.escape, atlases[1:]))})\..+"
  )
  if len(atlases) > 1:
    used |= {k for k in sd if dead.fullmatch(k)}
  it = f"{enc_prefix}.inter_network_transformer"
  used |= {f"{it}.norm.weight", f"{it}.norm.bias"} & set(sd)
  key = f"{it}.temporal_pos_embedding"
  if key in sd:
    P, D = enc_kw["num_patches"], enc_kw["embed_dim"]
    _check_close(
      sd, key, sm.sincos_1d(D, P).astype(np.float32), source, f"the ({P}, {D}) sin-cos table"
    )
    used.add(key)
  for n, rois in enumerate(enc_kw["network_rois"]):
    for i, b in enumerate(enc_kw["branches"]):
      key = f"{enc_prefix}.network_tokenizers.{atlases[0]}.{n}.branches.{i}.slconv.multiplier"
      if b.type == "sgconv" and key in sd:
        mult = nt.slconv_multiplier(b.decay_min, b.decay_max, len(rois)).reshape(1, -1, 1)
        _check_close(sd, key, mult, source, f"linspace({b.decay_min}, {b.decay_max})")
        used.add(key)
  alias = head_prefix.replace("_predictor", "_mask_predictor")
  for k in [k for k in sd if k.startswith(alias + ".")]:
    twin = head_prefix + k[len(alias) :]
    if twin not in sd or not np.array_equal(sd[k], sd[twin]):
      raise ValueError(
        f"{source}: {k}: expected the shared {head_prefix} weights (use_separate_mask_predictor "
        "is not supported), found different values"
      )
    used.add(k)
  return used


def params_to_torch(
  params: Mapping[str, Any], kwargs: Mapping[str, Any], role: str = "student"
) -> dict[str, np.ndarray]:
  """{"encoder", "head"} params (or gradients) -> torch names and layouts (the inverse)."""
  import flax.linen as nn

  params = nn.unbox(params)
  enc_kw = kwargs["encoder"]
  p_rules, _ = encoder_rules(f"{role}_encoder", enc_kw, kwargs["atlas_names"][0])
  h_rules = head_rules(f"{role}_predictor", kwargs["head"]["nlayers"])
  out: dict[str, np.ndarray] = {}
  packed: dict[str, list[Any]] = {}
  for part, rules in (("encoder", p_rules), ("head", h_rules)):
    for name, path, _, inv in rules:
      value = np.asarray(get_path(params[part], path))
      if inv is None:  # qkv: (D, heads, hd) kernels -> rows of one (3D, D) weight
        base, j = name.split("#")
        packed.setdefault(base, [None] * 3)[int(j)] = value.reshape(value.shape[0], -1).T
      else:
        out[name] = inv(value)
  for base, parts in packed.items():
    out[base] = np.concatenate(parts, axis=0)
  return out


class SemantoksConverter(Converter):
  """SamGijsen/Brain-Semantoks SimDINOModel: one encoder + its DINO head (teacher default)."""

  name = "semantoks"
  tasks = ("dino",)
  ROLES = ("teacher", "student")

  def convert(self, sd, task, fresh, fresh_extra, info, options, source) -> Converted:
    del fresh
    role = options.encoder
    if role not in self.ROLES:
      raise InputError(f"--encoder: expected one of {list(self.ROLES)}, found {role!r}")
    other = [r for r in self.ROLES if r != role][0]
    mine = (f"{role}_encoder.", f"{role}_predictor.", f"{role}_mask_predictor.")
    theirs = (f"{other}_encoder.", f"{other}_predictor.", f"{other}_mask_predictor.")
    if not any(k.startswith(mine[0]) for k in sd):
      raise InputError(
        f"{source}: --encoder={role}: expected {mine[0]}* keys, found none (keys start with "
        f"{sorted({k.split('.')[0] for k in sd})})"
      )
    # Only the chosen role is converted: its keys also stand in for the other role.
    picked = {k: v for k, v in sd.items() if not k.startswith(theirs)}
    skipped = len(sd) - len(picked)
    both = dict(picked)
    for k, v in picked.items():
      for a, b in zip(mine, theirs, strict=True):
        if k.startswith(a):
          both[b + k[len(a) :]] = v
    atlases = self._atlases(picked, role, options.atlas, source)
    enc = task.encoder
    enc_kw = {
      f.name: getattr(enc, f.name)
      for f in dataclasses.fields(enc)
      if f.name not in ("parent", "name")
    }
    head = task.head
    kwargs = {
      "encoder": enc_kw,
      "head": {"hidden_dim": head.hidden_dim, "bottleneck_dim": head.bottleneck_dim,
               "nlayers": head.nlayers},
      "atlas_names": atlases,
    }  # fmt: skip
    self._rules = {}
    p_rules, b_rules = encoder_rules(f"{role}_encoder", enc_kw, atlases[0])
    for name, path, *_ in p_rules:
      self._rules[("encoder", *path)] = name.split("#")[0]
    for name, path, *_ in head_rules(f"{role}_predictor", head.nlayers):
      self._rules[("head", *path)] = name
    conv = semantoks_params(both, kwargs, source)[role]
    params = nn.unbox(conv["params"])
    extra = dict(fresh_extra)
    extra["teacher"] = params  # the loaded encoder is both student and EMA teacher
    extra["buffers"] = conv["buffers"]
    if "step" in extra:  # the EMA's step counter: a converted workdir is at step 0
      extra["step"] = np.zeros(extra["step"].shape, extra["step"].dtype)
    notes = [f"took the {role} encoder and predictor (atlas {atlases[0]!r})"]
    if skipped:
      notes.append(f"left out {skipped} {other}_* keys (--encoder={role})")
    return Converted(params, extra, notes)

  def _atlases(self, sd, role: str, atlas: str | None, source: str) -> tuple[str, ...]:
    prefix = f"{role}_encoder.network_tokenizers."
    found = list(dict.fromkeys(k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)))
    if atlas is None:
      from boldjax.data.semantoks_layout import ATLASES

      atlas = found[0] if len(found) == 1 else (ATLASES[0] if ATLASES[0] in found else None)
      if atlas is None:
        raise InputError(f"{source}: several atlases {found}: pass --atlas=NAME (the used one)")
    if atlas not in found:
      raise InputError(f"--atlas: expected one of {found} ({source}), found {atlas!r}")
    return (atlas, *[a for a in found if a != atlas])

  def torch_name(self, path):
    return getattr(self, "_rules", {}).get(tuple(path))


registry.register("converter", "semantoks")(SemantoksConverter())
