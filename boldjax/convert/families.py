"""The checkpoint families `python -m boldjax.convert` knows, registered as ("converter", name).

Each converter maps a torch state_dict onto the params the config's task initialises, using
the numpy converters (boldgpt.py, lfb.py, semantoks.py). It checks what it can name in
config terms first (a size the weights imply but the config sets differently becomes a hint
naming the config field); the command then checks every param path and shape.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import numpy as np

from boldjax import registry
from boldjax.cli import InputError
from boldjax.convert import boldgpt, lfb, semantoks
from boldjax.convert.tree import get_path, set_path

PyTree = Any
TOKENIZER_FILE = "tokenizer.npz"  # boldGPT: the checkpoint's vocabulary, in the workdir


@dataclasses.dataclass
class Options:
  """Command-line choices that shape a conversion."""

  encoder: str = "teacher"  # semantoks: which encoder (and predictor) becomes the model
  atlas: str | None = None  # semantoks: the atlas whose tokenizers are used
  drop: tuple[str, ...] = ()  # torch key prefixes the user asked to leave out


@dataclasses.dataclass
class Converted:
  # numpy trees with the task's structure; a leaf left as the jax.ShapeDtypeStruct the
  # converter was given is taken from the task's fresh init
  params: PyTree
  extra: PyTree | None = None  # replaces TrainState.extra (None: the fresh one)
  notes: list[str] = dataclasses.field(default_factory=list)
  artifacts: dict[str, Any] = dataclasses.field(default_factory=dict)  # name -> saver(path)


def _mismatches(pairs: list[tuple[str, Any, Any]]) -> list[str]:
  return [
    f"{field}={want!r} but the checkpoint has {have!r}"
    for field, want, have in pairs
    if want != have
  ]


def _fail_fields(source: str, family: str, problems: list[str]) -> None:
  if problems:
    raise InputError(
      f"{source}: the {family} checkpoint does not fit the config: " + "; ".join(problems)
    )


def _fresh_graft(params: PyTree, fresh: PyTree, keys: tuple[str, ...]) -> PyTree:
  """params with the top-level `keys` left to the fresh init (parts the file lacks)."""
  out = dict(params)
  for k in keys:
    out[k] = fresh[k]  # shapes: the command fills them from the task's init
  return out


class Converter:
  """Base: `tasks` lists the config.task.name values this family's weights can serve."""

  name = ""
  tasks: tuple[str, ...] = ()

  def check_task(self, config: Any) -> None:
    task = config.task.name
    ok = task in self.tasks
    if task == "decode" and self.name in lfb_backbones():
      ok = config.task.get("backbone") == self.name
    if not ok:
      want = list(self.tasks) + (
        [f"decode with task.backbone={self.name!r}"] if self.name in lfb_backbones() else []
      )
      raise InputError(
        f"config.task.name: a {self.name} checkpoint expects one of {want}, found {task!r}"
        + (f" (task.backbone={config.task.get('backbone')!r})" if task == "decode" else "")
      )

  def convert(
    self, sd: dict[str, np.ndarray], task: Any, fresh: PyTree, fresh_extra: PyTree,
    info: Any, options: Options, source: str,
  ) -> Converted:  # fmt: skip
    raise NotImplementedError

  def torch_name(self, path: tuple[str, ...]) -> str | None:
    """The torch key of a param path, when known (for error messages)."""
    del path
    return None

  def configure(self, config: Any, sd: dict[str, np.ndarray], source: str, scratch: str) -> list:
    """Point config at files taken from the checkpoint (written under `scratch`) before the
    data pipeline and task are built; returns notes."""
    del config, sd, source, scratch
    return []

  def finalize_config(self, config: Any, workdir: str) -> None:
    """Rewrite those paths to their place in the finished workdir before config.json."""
    del config, workdir


def lfb_backbones() -> tuple[str, ...]:
  return ("csm", "seq_bert", "net_bert", "autoencoder")


class LfbConverter(Converter):
  """athms/learning-from-brains `pytorch_model.bin` of one backbone (CSM / BERT / ...)."""

  def __init__(self, name: str):
    from boldjax.tasks.decode import BACKBONES

    self.name, self.tasks, self.style = name, (name,), BACKBONES[name]
    self._rules: dict[tuple[str, ...], str] = {}

  def convert(self, sd, task, fresh, fresh_extra, info, options, source) -> Converted:
    del fresh_extra
    m = task.model
    st = lfb.infer_structure(sd, source)
    if st["style"] != self.style:
      raise InputError(
        f"{source}: family {self.name!r} expects a {self.style} model, found a "
        f"{st['style']} state_dict (pick the family that matches the file)"
      )
    notes: list[str] = []
    problems = _mismatches(
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
      problems += _mismatches(
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
    _fail_fields(source, self.name, problems)
    params, st = lfb.convert_lfb(sd, num_heads=m.num_heads, source=source)
    self._rules = {
      path: name.split("#")[0]
      for name, path, *_ in lfb.rules_for(
        st["style"],
        num_layers=st["num_layers"],
        num_heads=m.num_heads,
        embed_layers=st["embed_layers"],
        unembed_layers=st["unembed_layers"],
        num_classes=m.num_classes,
      )
    }
    if m.num_classes and not st["num_classes"]:
      params = _fresh_graft(params, fresh, head_keys)
      notes.append("decoding_head: not in the checkpoint, freshly initialised")
    return Converted(params, None, notes)

  def torch_name(self, path):
    return self._rules.get(tuple(path))


class BoldGptConverter(Converter):
  """clane9/boldGPT IGPT `.pt`: decoder.* weights, patchify.* layout, tokenizer.vocab."""

  name = "boldgpt"
  tasks = ("next_patch",)

  def convert(self, sd, task, fresh, fresh_extra, info, options, source) -> Converted:
    del fresh, fresh_extra, options
    m = task.model
    params, extras = boldgpt.convert_boldgpt(sd, num_heads=m.num_heads, source=source)
    kw = extras["model_kwargs"]
    problems = _mismatches(
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
      problems += _mismatches([("config.model.num_subjects", m.num_subjects, kw["num_subjects"])])
    if m.categorical:
      problems += _mismatches(
        [("config.data.tokenizer.vocab_size", m.vocab_size, kw["vocab_size"])]
      )
    _fail_fields(source, self.name, problems)
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
    p_rules, b_rules = semantoks.encoder_rules(f"{role}_encoder", enc_kw, atlases[0])
    for name, path, *_ in p_rules:
      self._rules[("encoder", *path)] = name.split("#")[0]
    for name, path, *_ in semantoks.head_rules(f"{role}_predictor", head.nlayers):
      self._rules[("head", *path)] = name
    conv = semantoks.semantoks_params(both, kwargs, source)[role]
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


def _register() -> None:
  for name in lfb_backbones():
    registry.register("converter", name)(LfbConverter(name))
  registry.register("converter", "boldgpt")(BoldGptConverter())
  registry.register("converter", "semantoks")(SemantoksConverter())


_register()


__all__ = ["Converted", "Converter", "Options", "get_path", "set_path"]
