"""`python -m boldjax.convert`: parity fixtures written as published files -> workdirs.

Each fixture's state_dict.npz is written as .safetensors, .npz, a torch .pt and a wrapped
.pt ({'model_state_dict': {'module.' + name: ...}}); the converted workdir is loaded with
boldjax.workdir.load_run and must give the fixture's outputs within spec.json's
tolerances. Sizes come from spec.json (config overrides), never from this file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from boldjax.convert import cli, files
from tests import parity

REPO = Path(__file__).resolve().parents[1]
PARITY_DIR = parity.PARITY_DIR
FORMATS = ("safetensors", "npz", "pt", "wrapped.pt")
LFB = {"lfb_gpt_csm": "csm", "lfb_bert": "seq_bert", "lfb_netbert": "net_bert"}
LFB_ALL = {**LFB, "lfb_autoencoder": "autoencoder"}


def _have(case: str) -> bool:
  """Run the test: the fixture is there, or parity is required (and a missing one fails)."""
  return parity.REQUIRED or (PARITY_DIR / case / "spec.json").exists()


_load = parity.load


def write_checkpoint(sd: dict[str, np.ndarray], path: Path, fmt: str) -> Path:
  """The fixture's state_dict as a published file would hold it."""
  path = path.with_suffix(".pt") if fmt.endswith("pt") else path.with_suffix("." + fmt)
  if fmt == "safetensors":
    files.write_safetensors(str(path), sd)
  elif fmt == "npz":
    np.savez(path, **sd)
  else:
    import torch

    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    if fmt == "wrapped.pt":
      tensors = {"model_state_dict": {f"module.{k}": v for k, v in tensors.items()}, "epoch": 3}
    torch.save(tensors, path)
  return path


def convert(*argv: str) -> None:
  assert cli.main([str(a) for a in argv]) == 0


_check = parity.check  # NaN/Inf fail; the worst err/tol is named


def _compare(case: str, actual: dict, outputs: dict, tolerances: dict, must: tuple[str, ...]):
  missing = [k for k in must if k not in actual]
  assert not missing, f"{case}: computed no {missing}"
  checked = [k for k in tolerances if k in actual and k in outputs]
  assert checked
  for k in checked:
    _check(f"{case}/{k}", actual[k], outputs[k], tolerances[k])


# ------------------------------------------------------------------------------- files


@pytest.mark.skipif(not _have("lfb_autoencoder"), reason=f"no fixtures under {PARITY_DIR}")
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_reads_the_same_state_dict(tmp_path, fmt):
  _, sd, _, _ = _load("semantoks" if _have("semantoks") else "lfb_autoencoder")
  path = write_checkpoint(sd, tmp_path / "ckpt", fmt)
  got, notes = files.load_state_dict(str(path), allow_pickle=fmt.endswith("pt"))
  assert list(got) == list(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(got[k], v, err_msg=k)
  if fmt == "wrapped.pt":
    assert notes == ["took the nested 'model_state_dict' dict", "stripped the 'module.' prefix"]


def test_safetensors_bf16_and_bad_headers(tmp_path):
  import struct

  x = np.arange(6, dtype=np.float32).reshape(2, 3)
  bits = (x.view(np.uint32) >> 16).astype("<u2").tobytes()
  header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 12]}}).encode()
  path = tmp_path / "bf16.safetensors"
  path.write_bytes(struct.pack("<Q", len(header)) + header + bits)
  np.testing.assert_array_equal(files.read_safetensors(str(path))["w"], x)  # exact in bf16
  (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
  with pytest.raises(files.InputError, match="bad.safetensors: safetensors header length"):
    files.read_safetensors(str(tmp_path / "bad.safetensors"))
  with pytest.raises(files.InputError, match=r"format expected one of .*found '\.h5'"):
    (tmp_path / "x.h5").write_bytes(b"")
    files.read_checkpoint(str(tmp_path / "x.h5"))


# --------------------------------------------------------------------- lfb families


def _lfb_config(case: str, family: str) -> list[str]:
  """Config args for a fixture: decode (keeps its head) or the pretraining config."""
  from boldjax.convert.lfb import model_kwargs_from_spec

  spec, sd, _, _ = _load(case)
  kw = model_kwargs_from_spec(spec)
  has_head = any(k.startswith("decoder.decoding_head.") for k in sd)
  config = f"configs/decode.py:backbone={family}" if has_head else f"configs/{family}.py"
  field = {
    "embedding_dim": kw["embed_dim"],
    "num_hidden_layers": kw["num_layers"],
    "num_attention_heads": kw["num_heads"],
    "intermediate_dim_factor": kw["intermediate_factor"],
    "n_positions": kw["n_positions"],
    "tr_precision": kw["tr_precision"],
    "num_hidden_layers_embedding_model": kw["embed_layers"],
    "num_hidden_layers_unembedding_model": kw["unembed_layers"],
    "hidden_activation": kw["hidden_activation"],
  }
  return [
    f"--config={REPO / config}",
    f"--config.data.synthetic.num_parcels={kw['in_dim']}",
    *[f"--config.model.{k}={v}" for k, v in field.items()],
  ]


def lfb_outputs(case: str, workdir: str) -> None:
  """The fixture's outputs from the converted workdir, compared within tolerance."""
  import test_parity_lfb as lfb_parity

  from boldjax.convert.lfb import infer_structure, params_to_torch
  from boldjax.tasks.decode import cross_entropy
  from boldjax.workdir import load_run

  spec, sd, inputs, outputs = _load(case)
  run = load_run(workdir)
  model = run.task.model
  params = jax.device_get(nn.unbox(run.state.params))
  st = infer_structure(sd)
  tolerances = {k: v for k, v in spec["tolerances"].items() if isinstance(v, dict)}
  actual: dict[str, np.ndarray] = {}
  with jax.default_matmul_precision("highest"):
    fn, _ = lfb_parity._pretrain(model, params, inputs, model.style)
    (_, out), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
    actual.update({k: np.asarray(v) for k, v in jax.device_get(out).items() if k in outputs})
    if st["style"] == "autoencoder":
      actual["encoder/hidden"] = np.asarray(out["encoder/hidden"])[None]
    for name, g in params_to_torch(grads, st, model.num_heads).items():
      if not name.startswith("decoder.decoding_head"):
        actual[f"grad/{name}"] = np.asarray(g)
    if st["num_classes"]:
      dk = {
        k: f"decoding/{k}" if f"decoding/{k}" in inputs else k for k in lfb_parity._DECODING_KEYS
      }
      x, t = jnp.asarray(inputs[dk["inputs"]]), jnp.asarray(inputs[dk["t_rs"]])
      am = jnp.asarray(inputs[dk["attention_mask"]]).astype(bool)
      dec = jax.jit(lambda p: model.apply({"params": p}, x, t, am, method="decode"))(params)
      labels = jnp.asarray(inputs[dk["labels"]]).astype(jnp.int32)
      actual["decoding/decoding_loss"] = cross_entropy(dec["logits"], labels, jnp.ones(len(labels)))
      for key, value in dec.items():
        actual[f"decoding/{key}"] = np.asarray(value)
  must = ("grad/embedder.wt_re.weight",) + (("decoding/logits",) if st["num_classes"] else ())
  _compare(case, actual, outputs, tolerances, must)


@pytest.mark.parametrize("case", sorted(LFB_ALL))
def test_lfb_converts_to_matching_workdir(tmp_path, case):
  parity.folder(case)  # skips without fixtures, fails where they are required
  family = LFB_ALL[case]
  _, sd, _, _ = _load(case)
  path = write_checkpoint(sd, tmp_path / "ckpt", "safetensors")
  workdir = tmp_path / "w"
  convert(family, path, *_lfb_config(case, family), f"--workdir={workdir}")
  marker = json.loads((workdir / cli.MARKER).read_text())
  assert marker["family"] == family and marker["step"] == 0 and not marker["resumable"]
  assert marker["sha256"] == cli.sha256(str(path))
  lfb_outputs(case, str(workdir))


# Every format reads back to the identical state_dict (test_every_format_reads_the_same_
# state_dict), so the end-to-end run of another format takes one case and one format per
# converter (the wrapped torch pickle: pickle loading and the wrapper keys); the
# safetensors run of every case is in the fast tests.
@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["wrapped.pt"])
@pytest.mark.parametrize("case", ["lfb_gpt_csm"])
def test_lfb_every_format_converts(tmp_path, case, fmt):
  parity.folder(case)  # skips without fixtures, fails where they are required
  family = LFB_ALL[case]
  _, sd, _, _ = _load(case)
  path = write_checkpoint(sd, tmp_path / "ckpt", fmt)
  workdir = tmp_path / "w"
  pickle = ["--allow-pickle"] if fmt.endswith("pt") else []
  convert(family, path, *_lfb_config(case, family), f"--workdir={workdir}", *pickle)
  lfb_outputs(case, str(workdir))


# ------------------------------------------------------------------------------ boldgpt

BOLDGPT = ("boldgpt_categorical", "boldgpt_continuous")


def _boldgpt_args(case: str, root: Path) -> list[str]:
  """A flat-map dataset on the fixture's mask holding its maps, and gpt_small overrides
  with the fixture's sizes (the data pipeline then builds the checkpoint's patch layout)."""
  from boldjax.data import records

  spec, _, inputs, _ = _load(case)
  ck = spec["constructor_kwargs"]
  data = root / "data"
  if not data.exists():
    maps = zip(inputs["activity"], inputs["subject_id"], strict=True)
    examples = [
      {"activity": a, "subject_id": int(s), "trial_id": i} for i, (a, s) in enumerate(maps)
    ]
    meta = {"name": case, "source": "parity fixture", "num_subjects": int(ck["num_subs"])}
    records.build_flat_dataset(
      str(data), {"train": examples, "val": examples}, inputs["mask"], meta
    )
  target = "categorical" if ck["categorical"] else "continuous"
  return [
    f"--config={REPO / 'configs/gpt_small.py'}:target={target}",
    "--config.data.source=array_record",
    f"--config.data.path={data}",
    f"--config.data.patch_size={ck['patch_size']}",
    f"--config.data.ordering={ck['ordering']}",
    f"--config.data.shuffle_order={ck['shuffle']}",
    f"--config.model.embed_dim={ck['embed_dim']}",
    f"--config.model.depth={ck['depth']}",
    f"--config.model.num_heads={ck['num_heads']}",
    f"--config.model.mlp_ratio={ck['mlp_ratio']}",
    f"--config.model.num_subjects={ck['num_subs']}",
    # continuous: no vocabulary; categorical: the converter takes the checkpoint's
    *([] if ck["categorical"] else ["--config.data.tokenizer.vocab_size=0"]),
  ]


def boldgpt_outputs(case: str, workdir: str) -> None:
  """The fixture's outputs (default and explicit random order) from the converted workdir."""
  from boldjax.convert.boldgpt import params_to_torch
  from boldjax.tasks.next_patch import categorical_loss, continuous_loss
  from boldjax.workdir import load_run

  spec, sd, inputs, outputs = _load(case)
  run = load_run(workdir)
  model, layout, tok = run.task.model, run.info.layout, run.info.tokenizer
  params = jax.device_get(nn.unbox(run.state.params))
  if "tokenizer.vocab" in sd:  # the checkpoint's vocabulary, not a fitted one
    assert run.config.data.tokenizer.path == str(Path(workdir).resolve() / "tokenizer.npz")
    np.testing.assert_array_equal(tok.vocab, sd["tokenizer.vocab"])
  patch_mask = jnp.asarray(layout.patch_mask)

  def loss_fn(p, x, targets, subject, order):
    out = model.apply({"params": p}, x, subject, order)
    if model.categorical:
      return categorical_loss(out, targets)[0], out
    mask = patch_mask[None] if order is None else jnp.take(patch_mask, order, axis=0)
    return continuous_loss(out, x, mask)[0], out

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  patches = layout.patchify(inputs["activity"])
  subject = jnp.asarray(inputs["subject_id"].astype(np.int32))
  actual: dict[str, np.ndarray] = {"patchify_inverse": layout.unpatchify(outputs["patches"])}
  runs = {"": None, "_random_order": inputs["order_random"].astype(np.int32)}
  with jax.default_matmul_precision("highest"):
    for sfx, order in runs.items():
      x = patches if order is None else np.take_along_axis(patches, order[..., None], axis=1)
      actual["patches" + sfx] = x
      targets = x
      if model.categorical:
        targets = actual["tokens" + sfx] = tok.encode(x)
      (loss, out), grads = grad_fn(params, x, targets, subject, order)
      actual[("logits" if model.categorical else "predictions") + sfx] = out
      actual["loss" + sfx] = loss
      for name, g in params_to_torch(grads).items():
        actual[f"grad{sfx}/{name}"] = g
  tolerances = {k: v for k, v in spec["tolerances"].items() if isinstance(v, dict)}
  must = ("loss", "loss_random_order") + (("tokens",) if model.categorical else ())
  _compare(case, actual, outputs, tolerances, must)


@pytest.mark.parametrize("case", BOLDGPT)
def test_boldgpt_converts_to_matching_workdir(tmp_path, case):
  parity.folder(case)  # skips without fixtures, fails where they are required
  _, sd, _, _ = _load(case)
  path = write_checkpoint(sd, tmp_path / "ckpt", "safetensors")
  workdir = tmp_path / "w"
  convert("boldgpt", path, *_boldgpt_args(case, tmp_path), f"--workdir={workdir}")
  marker = json.loads((workdir / cli.MARKER).read_text())
  assert marker["family"] == "boldgpt" and marker["sha256"] == cli.sha256(str(path))
  assert (workdir / "tokenizer.npz").exists() == ("tokenizer.vocab" in sd)
  boldgpt_outputs(case, str(workdir))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["wrapped.pt"])
@pytest.mark.parametrize("case", BOLDGPT[:1])
def test_boldgpt_every_format_converts(tmp_path, case, fmt):
  parity.folder(case)  # skips without fixtures, fails where they are required
  _, sd, _, _ = _load(case)
  path = write_checkpoint(sd, tmp_path / "ckpt", fmt)
  pickle = ["--allow-pickle"] if fmt.endswith("pt") else []
  workdir = tmp_path / "w"
  convert("boldgpt", path, *_boldgpt_args(case, tmp_path), f"--workdir={workdir}", *pickle)
  boldgpt_outputs(case, str(workdir))


@pytest.mark.skipif(not _have("boldgpt_categorical"), reason=f"no fixtures under {PARITY_DIR}")
def test_tokenizer_path_is_checked(tmp_path):
  """config.data.tokenizer.path: a vocabulary of the wrong width or size is one line."""
  from boldjax.cli import InputError
  from boldjax.data import pipeline

  _, sd, _, _ = _load("boldgpt_categorical")
  args = _boldgpt_args("boldgpt_categorical", tmp_path)
  config = cli.load_config(args[0][len("--config=") :], args[1:])
  vocab = sd["tokenizer.vocab"]
  np.savez(tmp_path / "narrow.npz", vocab=vocab[:, :-1])
  np.savez(tmp_path / "few.npz", vocab=vocab[:7])
  cases = {
    "narrow.npz": rf"narrow.npz: field 'vocab' expected dim {vocab.shape[1]} .*found \(",
    "few.npz": rf"few.npz: field 'vocab' expected {len(vocab)} entries .*found 7",
    "none.npz": r"none.npz: config.data.tokenizer.path expected an existing .npz file",
  }
  for name, match in cases.items():
    config.data.tokenizer.path = str(tmp_path / name)
    with pytest.raises(InputError, match=match):
      pipeline.prepare(config.data)
  # The converter refuses a given path that is not the checkpoint's vocabulary.
  path = write_checkpoint(sd, tmp_path / "ckpt", "npz")
  np.savez(tmp_path / "other.npz", vocab=vocab[::-1])
  with pytest.raises(InputError, match=r"other.npz: config.data.tokenizer.path expected the vo"):
    cli.main(["boldgpt", str(path), *args, f"--config.data.tokenizer.path={tmp_path / 'other.npz'}",
              f"--workdir={tmp_path / 'w'}"])  # fmt: skip
  assert not (tmp_path / "w").exists()


# ---------------------------------------------------------------------------- semantoks


def _semantoks_args(root: Path) -> list[str]:
  """A parcellated dataset with the fixture's network map (runs of one crop at TR 2 s) and
  dino_small:semantoks overrides with the fixture's sizes (the tokenizer tuple included)."""
  from boldjax.convert.semantoks import semantoks_kwargs
  from boldjax.data import bold_records

  spec, _, inputs, _ = _load("semantoks")
  kw = semantoks_kwargs(spec["constructor_kwargs"], inputs["network_map"])
  enc, head = kw["encoder"], kw["head"]
  R, T = len(inputs["network_map"]), enc["patch_size"] * enc["num_patches"]
  data = root / "data"
  if not data.exists():
    rng = np.random.default_rng(0)
    runs = {
      split: [
        {"bold": rng.standard_normal((T, R)).astype(np.float32), "tr": 2.0,
         "subject": f"{split}{i}", "subject_id": 2 * s + i, "run": f"{split}{i}"}
        for i in range(2)
      ]
      for s, split in enumerate(("train", "val"))
    }  # fmt: skip
    meta = {
      "name": "semantoks", "source": "parity fixture", "num_parcels": R,
      "network_of_parcel": inputs["network_map"].tolist(),
    }  # fmt: skip
    bold_records.build_bold_dataset(str(data), runs, meta)
  tokenizer = tuple(
    {"type": b.type, "kernel_size": b.kernel_size, "out_channels": b.out_channels,
     "depthwise": b.depthwise, "dilation": b.dilation, "num_scales": b.num_scales,
     "decay_min": b.decay_min, "decay_max": b.decay_max}
    for b in enc["branches"]
  )  # fmt: skip
  fields = {
    "data.path": data,
    "data.patch_size": enc["patch_size"],
    "data.crop_length": T,
    "model.embed_dim": enc["embed_dim"],
    "model.depth": enc["depth"],
    "model.num_heads": enc["num_heads"],
    "model.mlp_dim": enc["mlp_dim"],
    "model.layer_scale_init": enc["layer_scale_init"],
    "model.tokenizer": repr(tokenizer),
    "model.head_hidden_dim": head["hidden_dim"],
    "model.head_bottleneck_dim": head["bottleneck_dim"],
    "model.head_nlayers": head["nlayers"],
  }
  config = f"--config={REPO / 'configs/dino_small.py'}:semantoks"
  return [config, *[f"--config.{k}={v}" for k, v in fields.items()]]


def semantoks_outputs(workdir: str, role: str) -> None:
  """The chosen encoder's outputs (teacher: unmasked views; student: masked) and its
  head's, from the converted workdir; the EMA teacher state equals the loaded encoder."""
  import test_parity_semantoks as semantoks_parity

  from boldjax.models.semantoks import split_tokens
  from boldjax.workdir import load_run

  spec, _, inputs, outputs = _load("semantoks")
  run = load_run(workdir)
  task = run.task
  params = jax.device_get(nn.unbox(run.state.params))
  extra = jax.device_get(nn.unbox(run.state.extra))
  jax.tree.map(np.testing.assert_array_equal, extra["teacher"], params)
  B, N, P = inputs["view1"].shape[0], task.num_networks, task.num_patches
  x = jnp.asarray(np.concatenate([inputs["view1"], inputs["view2"]]))
  masks = np.concatenate([inputs["mask1"], inputs["mask2"]])
  variables = {"params": params["encoder"], "buffers": extra["buffers"]["encoder"]}
  with jax.default_matmul_precision("highest"):
    mask = jnp.asarray(masks if role == "student" else np.zeros_like(masks))
    out = jax.jit(task.encoder.apply)(variables, x, mask)
    parts = split_tokens(out["tokens"], N, P)
    heads = {k: jax.jit(task.head.apply)({"params": params["head"]}, v) for k, v in parts.items()}
  actual = {}
  for v in range(2):
    sl, sfx = slice(v * B, (v + 1) * B), f"_v{v + 1}"
    actual[f"{role}_tokens{sfx}"] = out["tokens"][sl]
    actual[f"{role}_tokenizer_out{sfx}"] = out["tokenizer_out"][sl]
    actual[f"{role}_head_cls{sfx}"] = heads["cls"][sl]
    actual[f"{role}_head_net{sfx}"] = heads["net"][sl]
    actual[f"{role}_head_mask{sfx}"] = np.asarray(heads["patch"][sl])[masks[sl].reshape(B, -1)]
    if role == "teacher":
      actual[f"teacher_cls_avg{sfx}"] = out["cls_avg"][sl]
  names = [k for k in actual if k in outputs]
  assert len(names) >= 10 - 2 * (role == "student"), names
  for k in names:
    _check(f"semantoks/{k}", actual[k], outputs[k], semantoks_parity._tolerance(spec, k))


@pytest.mark.skipif(not _have("semantoks"), reason=f"no fixtures under {PARITY_DIR}")
@pytest.mark.parametrize("role", ("teacher", "student"))
def test_semantoks_converts_to_matching_workdir(tmp_path, role):
  _, sd, _, _ = _load("semantoks")
  path = write_checkpoint(sd, tmp_path / "ckpt", "safetensors")
  workdir = tmp_path / "w"
  encoder = [] if role == "teacher" else ["--encoder=student"]  # teacher is the default
  convert("semantoks", path, *_semantoks_args(tmp_path), f"--workdir={workdir}", *encoder)
  marker = json.loads((workdir / cli.MARKER).read_text())
  assert marker["options"]["encoder"] == role
  assert f"took the {role} encoder and predictor" in " ".join(marker["notes"])
  semantoks_outputs(str(workdir), role)


@pytest.mark.slow
@pytest.mark.skipif(not _have("semantoks"), reason=f"no fixtures under {PARITY_DIR}")
@pytest.mark.parametrize("fmt", ["training.pt"])
def test_semantoks_every_format_converts(tmp_path, fmt):
  _, sd, _, _ = _load("semantoks")
  if fmt == "training.pt":
    import torch

    # What the original's main.py saves (checkpoint_epoch_N.pth): the SimDINOModel
    # state_dict (student_* and teacher_* keys) among optimizer / scheduler state.
    path = tmp_path / "checkpoint_epoch_100.pth"
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    adam = {"step": torch.tensor(4000.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.ones(3)}
    saved = {
      "epoch": 99, "model_state_dict": tensors,
      "optimizer_state_dict": {"state": {0: adam}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
      "scheduler_state_dict": {"last_epoch": 4000, "_step_count": 4001},
      "loss": 0.25, "config": {"model": {"embedding_dim": 192}}, "lr": 1e-4, "wd": 0.3,
      "mask_loss_weight": 0.5,
    }  # fmt: skip
    torch.save(saved, path)
  else:
    path = write_checkpoint(sd, tmp_path / "ckpt", fmt)
  pickle = ["--allow-pickle"] if fmt.endswith("pt") else []
  workdir = tmp_path / "w"
  convert("semantoks", path, *_semantoks_args(tmp_path), f"--workdir={workdir}", *pickle)
  semantoks_outputs(str(workdir), "teacher")


# ---------------------------------------------------------------------------- refusals


@pytest.mark.skipif(not _have("lfb_autoencoder"), reason=f"no fixtures under {PARITY_DIR}")
def test_pickle_is_refused_without_allow_pickle(tmp_path):
  _, sd, _, _ = _load("lfb_autoencoder")
  path = write_checkpoint(sd, tmp_path / "ckpt", "pt")
  workdir = tmp_path / "w"
  proc = subprocess.run(
    [sys.executable, "-m", "boldjax.convert", "autoencoder", str(path),
     f"--config={REPO / 'configs/autoencoder.py'}", f"--workdir={workdir}"],
    capture_output=True, text=True, cwd=REPO, timeout=300,
  )  # fmt: skip
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert str(path) in lines[0] and "pickle" in lines[0] and "--allow-pickle" in lines[0]
  assert "torch" in lines[0] and "arbitrary code" in lines[0]
  assert not workdir.exists()


@pytest.mark.skipif(not _have("lfb_autoencoder"), reason=f"no fixtures under {PARITY_DIR}")
def test_incompatible_checkpoints_name_the_key(tmp_path):
  _, sd, _, _ = _load("lfb_autoencoder")
  args = _lfb_config("lfb_autoencoder", "autoencoder")
  workdir = tmp_path / "w"
  gone = "decoder.decoder.linear_output_layer.1.bias"
  cases = {
    "missing": ({k: v for k, v in sd.items() if k != gone}, gone),
    "unexpected": ({**sd, "decoder.extra.weight": np.zeros(3, np.float32)}, "decoder.extra.weight"),
    "shape": (
      {**sd, "decoder.encoder.pooler_layer.1.bias": np.zeros(7, np.float32)},
      r"autoencoder/encoder/pooler/bias \(decoder.encoder.pooler_layer.1.bias\): "
      r"expected \(\d+,\), found \(7,\)",
    ),
  }
  for name, (bad, match) in cases.items():
    path = write_checkpoint(bad, tmp_path / name, "npz")
    with pytest.raises(ValueError, match=match):
      cli.main(["autoencoder", str(path), *args, f"--workdir={workdir}"])
    assert not workdir.exists(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".w.")], name
  # A config whose sizes differ: the hint names the config field.
  path = write_checkpoint(sd, tmp_path / "ok", "npz")
  with pytest.raises(ValueError, match="config.model.embedding_dim=64 but the checkpoint has"):
    cli.main(["autoencoder", str(path), *args, "--config.model.embedding_dim=64",
              f"--workdir={workdir}"])  # fmt: skip
  with pytest.raises(ValueError, match="config.task.name: a csm checkpoint expects"):
    cli.main(["csm", str(path), *args, f"--workdir={workdir}"])
  assert not workdir.exists()
  workdir.mkdir()
  (workdir / "x").write_text("")
  with pytest.raises(ValueError, match="exists and is not empty.*--overwrite"):
    cli.main(["autoencoder", str(path), *args, f"--workdir={workdir}"])


# ---------------------------------------------------------------------------- fine-tune


@pytest.mark.slow
@pytest.mark.skipif(not _have("lfb_autoencoder"), reason=f"no fixtures under {PARITY_DIR}")
def test_new_run_starts_from_a_converted_workdir(tmp_path):
  from boldjax import train
  from boldjax.workdir import load_run

  _, sd, _, _ = _load("lfb_autoencoder")
  path = write_checkpoint(sd, tmp_path / "ckpt", "wrapped.pt")
  args = _lfb_config("lfb_autoencoder", "autoencoder")
  converted = tmp_path / "converted"
  convert("autoencoder", path, *args, f"--workdir={converted}", "--allow-pickle")
  want = jax.device_get(load_run(str(converted)).state.params)
  # lr 0: the run's params stay the ones it started from.
  config = cli.load_config(
    args[0][len("--config=") :],
    args[1:] + [f"--config.task.init_from={converted}", "--config.optim.lr=0.0",
                "--config.total_steps=2", "--config.checkpoint_every=2", "--config.log_every=1",
                "--config.evals.val.every_steps=100"],
  )  # fmt: skip
  run_dir = tmp_path / "finetune"
  train.run(config, str(run_dir))
  got = jax.device_get(load_run(str(run_dir)).state.params)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  fresh = load_run(str(converted)).task
  assert fresh.config.task.init_from == ""  # the converted workdir itself starts nothing
