"""What a checkpoint family of `python -m boldjax.convert` is: a Converter registered as
("converter", name) by its own module (boldgpt.py, lfb.py, semantoks.py; a new family is a
new module and one import line in convert/__init__.py).

Each converter maps a torch state_dict onto the params the config's task initialises, using
its module's numpy converters. It checks what it can name in
config terms first (a size the weights imply but the config sets differently becomes a hint
naming the config field); the command then checks every param path and shape.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from boldjax.cli import InputError
from boldjax.convert.tree import get_path, set_path

PyTree = Any


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


def mismatches(pairs: list[tuple[str, Any, Any]]) -> list[str]:
  return [
    f"{field}={want!r} but the checkpoint has {have!r}"
    for field, want, have in pairs
    if want != have
  ]


def fail_fields(source: str, family: str, problems: list[str]) -> None:
  if problems:
    raise InputError(
      f"{source}: the {family} checkpoint does not fit the config: " + "; ".join(problems)
    )


def fresh_graft(params: PyTree, fresh: PyTree, keys: tuple[str, ...]) -> PyTree:
  """params with the top-level `keys` left to the fresh init (parts the file lacks)."""
  out = dict(params)
  for k in keys:
    out[k] = fresh[k]  # shapes: the command fills them from the task's init
  return out


class Converter:
  """Base: `tasks` lists the config.task.name values this family's weights can serve."""

  name = ""
  tasks: tuple[str, ...] = ()
  decode_backbone = False  # also serves the decode task as config.task.backbone=name

  def check_task(self, config: Any) -> None:
    task = config.task.name
    ok = task in self.tasks
    if task == "decode" and self.decode_backbone:
      ok = config.task.get("backbone") == self.name
    if not ok:
      want = list(self.tasks) + (
        [f"decode with task.backbone={self.name!r}"] if self.decode_backbone else []
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


__all__ = ["Converted", "Converter", "Options", "get_path", "set_path"]
