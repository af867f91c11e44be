"""`python -m boldjax.convert FAMILY CHECKPOINT --config=... --workdir=W`: a published
PyTorch checkpoint in, a boldjax workdir out.

The workdir holds config.json, an orbax checkpoint at step 0 (the full TrainState: params
from the file, fresh optimizer state, the task's extra, e.g. DINO's EMA teacher = the loaded
encoder) and `converted.json` (source file, sha256, family, options, notes). It has no data
iterator state: `boldjax.sample` / `boldjax.evaluate` read it like any run, and a new run
starts from it with `--config.task.init_from=W`; it is not a run to resume.

Every key and shape is checked against the params the config's task initialises; bad input
is one line naming the file and field, exit status 2, and nothing is left behind (the
workdir is written to a temporary sibling and renamed into place).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from boldjax.cli import InputError, one_line, run_argparse
from boldjax.convert import converter as converter_lib
from boldjax.convert import files

PROG = "boldjax.convert"
MARKER = "converted.json"
_SHOWN = 12  # names listed per problem kind


def _parser() -> argparse.ArgumentParser:
  from boldjax import registry

  p = argparse.ArgumentParser(
    prog=f"python -m {PROG}",
    description="Convert a published PyTorch checkpoint into a boldjax workdir.",
    epilog="Config overrides: --config.a.b=v (as boldjax.main). --verbose: show tracebacks.",
  )
  p.add_argument("family", help=f"one of {registry.names('converter')}")
  p.add_argument("checkpoint", help="a .safetensors, .npz or (with --allow-pickle) .pt/.pth/.bin")
  p.add_argument("--config", required=True, help="configs/X.py[:args], sizes must match")
  p.add_argument("--workdir", required=True, help="output folder (must not exist or be empty)")
  p.add_argument("--allow-pickle", action="store_true", help="read torch pickles (runs code)")
  p.add_argument("--overwrite", action="store_true", help="replace a non-empty workdir")
  p.add_argument("--encoder", default="teacher", help="semantoks: teacher (default) | student")
  p.add_argument("--atlas", default=None, help="semantoks: the atlas whose tokenizers are used")
  p.add_argument(
    "--drop", action="append", default=[], help="leave out torch keys with this prefix (counted)"
  )
  return p


def load_config(spec: str, overrides: Sequence[str]) -> Any:
  """configs/X.py[:arg] with --config.a.b=v overrides, exactly as boldjax.main reads them."""
  from absl import flags
  from ml_collections import config_flags

  fv = flags.FlagValues()
  argv = [PROG, f"--config={spec}", *overrides]
  config_flags.DEFINE_config_file("config", None, "config", flag_values=fv, sys_argv=argv)
  fv(argv)
  return fv.config


def _flat(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out: dict[tuple[str, ...], Any] = {}
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      out.update(_flat(v, prefix + (str(k),)))
  else:
    out[prefix] = tree
  return out


def check_tree(
  want: Any, have: Any, what: str, source: str, converter: converter_lib.Converter
) -> None:
  """Every path and shape of `want` (the task's fresh tree) present in `have`, nothing more."""
  w, h = _flat(want), _flat(have)

  def name(path: tuple[str, ...]) -> str:
    torch = converter.torch_name(path)
    return "/".join(path) + (f" ({torch})" if torch else "")

  def listed(paths: list[tuple[str, ...]]) -> str:
    more = f" and {len(paths) - _SHOWN} more" if len(paths) > _SHOWN else ""
    return "[" + ", ".join(name(p) for p in paths[:_SHOWN]) + "]" + more

  problems = []
  missing = sorted(set(w) - set(h))
  unexpected = sorted(set(h) - set(w))
  if missing:
    problems.append(f"missing {what} {listed(missing)}")
  if unexpected:
    problems.append(f"unexpected {what} {listed(unexpected)}")
  shapes = [
    f"{name(p)}: expected {tuple(np.shape(w[p]))}, found {tuple(np.shape(h[p]))}"
    for p in sorted(set(w) & set(h))
    if tuple(np.shape(w[p])) != tuple(np.shape(h[p]))
  ]
  if shapes:
    problems.append("shape mismatch " + "; ".join(shapes[:_SHOWN]))
  if problems:
    raise InputError(f"{source}: does not fit the config's model: " + "; ".join(problems))


def sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _cast_like(tree: Any, like: Any) -> Any:
  import jax

  return jax.tree.map(lambda v, ref: np.asarray(v, dtype=ref.dtype), tree, like)


def build_state(config: Any, converter: converter_lib.Converter, sd, options, source: str):
  """(TrainState with the converted weights, Converted) for the config's task."""
  import jax

  from boldjax import build
  from boldjax import state as state_lib

  run = build.build_run(config, mesh_axes=build.DATA_PARALLEL)
  rng, task, info, tx, spec = run.init_rng, run.task, run.info, run.tx, run.spec
  with run.context():
    # The converter sees shapes only: compiling the task's init can take a minute (Semantoks),
    # and it is run only when leaves are left for it (e.g. a head the file lacks).
    fresh_params, fresh_extra = spec.abstract.params, spec.abstract.extra
    try:
      conv = converter.convert(sd, task, fresh_params, fresh_extra, info, options, source)
    except KeyError as e:  # the numpy converters name missing / unknown keys in a KeyError
      raise InputError(one_line(e)) from e
    check_tree(fresh_params, conv.params, "params", source, converter)
    conv_extra = fresh_extra if conv.extra is None else conv.extra
    if conv.extra is not None:
      check_tree(fresh_extra, conv.extra, "state entries", source, converter)
    params, extra = conv.params, conv_extra
    if any(_abstract(x) for x in jax.tree.leaves((params, extra), is_leaf=_abstract)):
      fresh = jax.device_get(spec.init(rng))
      pick = lambda v, f: f if _abstract(v) else v  # noqa: E731
      params = jax.tree.map(pick, params, fresh.params, is_leaf=_abstract)
      extra = jax.tree.map(pick, extra, fresh.extra, is_leaf=_abstract)
    params = jax.device_put(_cast_like(params, fresh_params), spec.shardings.params)
    extra = jax.device_put(_cast_like(extra, fresh_extra), spec.shardings.extra)
    opt_state = jax.jit(tx.init, out_shardings=spec.shardings.opt_state)(params)
    step = jax.device_put(np.zeros((), np.int32), spec.shardings.step)
    state = state_lib.TrainState(step=step, params=params, opt_state=opt_state, extra=extra)
  return state, conv


def _abstract(x: Any) -> bool:
  import jax

  return isinstance(x, jax.ShapeDtypeStruct)


def write_workdir(workdir: str, config: Any, state: Any, marker: dict, artifacts, overwrite: bool):
  """Everything into a temporary sibling folder, then renamed into place."""
  from boldjax import checkpoint

  parent = os.path.dirname(os.path.abspath(workdir)) or "."
  os.makedirs(parent, exist_ok=True)
  base = os.path.basename(os.path.abspath(workdir))
  tmp = os.path.join(parent, f".{base}.converting-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  old = None
  try:
    os.makedirs(tmp)
    checkpoint.save_config(tmp, config)
    manager = checkpoint.make_manager(tmp, every_steps=1, keep=1, async_save=False)
    checkpoint.save(manager, 0, state, None, force=True)
    manager.wait_until_finished()
    manager.close()
    for name, save in artifacts.items():
      with open(os.path.join(tmp, name), "wb") as f:
        save(f)
    with open(os.path.join(tmp, MARKER), "w") as f:
      json.dump(marker, f, indent=2)
    if os.path.exists(workdir):
      old = os.path.join(parent, f".{base}.replaced-{uuid.uuid4().hex[:8]}")
      os.rename(workdir, old)
    os.rename(tmp, workdir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if old is not None and not os.path.exists(workdir):
      os.rename(old, workdir)
      old = None
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def main(argv: Sequence[str]) -> int:
  """Parse, convert, check, write; bad input raises (one line, exit 2 via run_argparse)."""
  from boldjax import registry

  config_args = [a for a in argv if a.startswith("--config.")]
  rest = [a for a in argv if not a.startswith("--config.")]
  parser = _parser()
  try:
    args = parser.parse_args(rest)
  except SystemExit as e:  # argparse already printed its usage line
    raise SystemExit(2 if e.code else 0) from None
  converter = registry.get("converter", args.family)
  if os.path.exists(args.workdir) and os.listdir(args.workdir) and not args.overwrite:
    raise InputError(
      f"--workdir: {args.workdir} exists and is not empty (pass --overwrite to replace it)"
    )
  sd, notes = files.load_state_dict(args.checkpoint, allow_pickle=args.allow_pickle)
  dropped = {}
  for prefix in args.drop:
    gone = [k for k in sd if k.startswith(prefix)]
    if not gone:
      raise InputError(
        f"--drop={prefix}: expected keys with this prefix in {args.checkpoint}, found none"
      )
    dropped[prefix] = len(gone)
    sd = {k: v for k, v in sd.items() if not k.startswith(prefix)}
    notes.append(f"dropped {len(gone)} keys {prefix}* (--drop)")
  config = load_config(args.config, config_args)
  converter.check_task(config)
  options = converter_lib.Options(encoder=args.encoder, atlas=args.atlas, drop=tuple(args.drop))
  scratch = tempfile.mkdtemp(prefix="boldjax-convert-")
  try:
    # Files the data pipeline must read while the state is built (boldGPT's vocabulary, the
    # vision tower); artifacts may copy them into the workdir, so scratch outlives it.
    notes += converter.configure(config, sd, args.checkpoint, scratch)
    state, conv = build_state(config, converter, sd, options, args.checkpoint)
    converter.finalize_config(config, os.path.abspath(args.workdir))
    notes += conv.notes
    marker = {
      "family": args.family,
      "source": os.path.abspath(args.checkpoint),
      "sha256": sha256(args.checkpoint),
      "config": args.config,
      "config_overrides": config_args,
      "options": dataclasses.asdict(options),
      "dropped": dropped,
      "num_tensors": len(sd),
      "notes": notes,
      "step": 0,
      "resumable": False,
    }
    write_workdir(args.workdir, config, state, marker, conv.artifacts, args.overwrite)
    n = sum(int(np.prod(np.shape(x))) for x in _flat(state.params).values())
    print(
      f"{PROG}: {args.family} {args.checkpoint} ({len(sd)} tensors) -> {args.workdir} "
      f"(task {config.task.name}, {n:,} parameters, step 0)"
    )
    for note in notes:
      print(f"  note: {note}")
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  return 0


def run(argv: Sequence[str] | None = None) -> None:
  """Console entry: one line and exit 2 on bad input, traceback with --verbose."""
  run_argparse(PROG, main, sys.argv[1:] if argv is None else argv)
