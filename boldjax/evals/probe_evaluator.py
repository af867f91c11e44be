"""The probe benchmark of a run (features x protocols x baselines), shared by
`python -m boldjax.evaluate` and the periodic evaluator "probe" of config.evals.

  config.evals.probe = {"type": "probe", "every_steps": 500, "labels": "auto",
                        "protocols": ("logistic",), "features": (), "repeats": 1}

The periodic evaluator probes the model's current features only (no baselines) and yields
"<name>/<row>/<protocol>" -> mean test balanced accuracy over the repeats.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from boldjax import checkpoint, registry
from boldjax.evals import baselines, features, probes
from boldjax.evals import examples as examples_lib

BASELINES = ("fc", "identity", "random_init")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """What to probe and how (the CLI flags / the evaluator's config fields)."""

  labels: str = "auto"
  protocols: tuple[str, ...] = ("linear", "logistic", "attentive", "mlp")
  features: tuple[str, ...] = ()  # () = every (B, F) output of features() plus 'cls'
  baselines: tuple[str, ...] = BASELINES
  repeats: int = 3
  seed: int = 0
  val_fraction: float = 0.2
  test_fraction: float = 0.2
  train_subjects: int | None = None  # label-scarce probe: this many training subjects
  split_by: str = "subject"  # or "example" (leaks subjects; for data with < 3 subjects)
  crops: int = 1
  crop_frames: int = 0
  max_per_subject: int | None = None
  batch_size: int = 64
  probe: probes.ProbeOptions = probes.ProbeOptions()


def check_settings(s: EvalSettings) -> None:
  bad = [p for p in s.protocols if p not in probes.PROTOCOLS]
  if bad or not s.protocols:
    raise ValueError(
      f"--protocol: expected some of {sorted(probes.PROTOCOLS)}, found {list(s.protocols)}"
    )
  bad = [b for b in s.baselines if b not in BASELINES]
  if bad:
    raise ValueError(f"--baselines: expected some of {list(BASELINES)}, found {bad}")
  if s.split_by not in ("subject", "example"):
    raise ValueError(f"--split_by: expected 'subject' or 'example', found {s.split_by!r}")
  if s.repeats < 1:
    raise ValueError(f"--repeats: expected >= 1, found {s.repeats}")
  if s.train_subjects is not None and s.split_by != "subject":
    raise ValueError(f"--train_subjects: needs --split_by=subject, found --split_by={s.split_by}")


def model_rows(prefix: str, feats: dict[str, np.ndarray]) -> list[FeatureRow]:
  """One row per vector feature, plus a tokens row for the attentive probe."""
  rows = [
    FeatureRow(f"{prefix}{k}", "vector", feats[k])
    for k in sorted(feats)
    if k not in ("tokens", "token_mask")
  ]
  if "tokens" in feats:
    rows.append(FeatureRow(f"{prefix}tokens", "tokens", (feats["tokens"], feats["token_mask"])))
  return rows


def evaluate_run(
  run: Any,
  settings: EvalSettings,
  *,
  examples: examples_lib.ExampleSet | None = None,
  params: Any = None,
  log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
  """Features of `run` (a workdir.LoadedRun or anything with config/info/task/state/mesh/
  rules/step) and its baselines, probed on repeated subject splits -> a JSON-able dict."""
  check_settings(settings)
  t0 = time.perf_counter()
  if examples is None:
    examples = examples_lib.load_examples(
      run.config, run.info, settings.labels, crops=settings.crops,
      crop_frames=settings.crop_frames, max_per_subject=settings.max_per_subject,
      seed=settings.seed,
    )  # fmt: skip
  if params is None:
    params = run.task.feature_params(run.state.params, run.state.extra)
  want_tokens = "attentive" in settings.protocols
  extract = dict(
    mesh=run.mesh, rules=run.rules, batch_size=settings.batch_size,
    keys=tuple(settings.features) or None, tokens=want_tokens, log=log,
  )  # fmt: skip
  rows = model_rows("", features.extract_features(run.task, params, examples, **extract))
  if "random_init" in settings.baselines:
    fresh, extra = baselines.random_init_params(run, settings.seed + 1000)
    fresh = run.task.feature_params(fresh, extra)
    feats = features.extract_features(run.task, fresh, examples, label="random init", **extract)
    rows += model_rows("random_init/", feats)
  if "fc" in settings.baselines:
    fc, why = baselines.fc_or_reason(examples)
    rows.append(FeatureRow("fc", "vector", fc, why))
  if "identity" in settings.baselines:
    rows.append(FeatureRow("identity", "vector", baselines.identity_features(examples)))
  if settings.split_by == "subject":
    groups = examples.subjects
  else:
    groups = np.arange(examples.num_examples)
  if log is not None:
    log(
      f"[boldjax.evaluate] {examples.num_examples} examples ({examples.unit}s, "
      f"{examples.num_crops} crop(s)) of {len(np.unique(examples.subjects))} subjects, "
      f"labels {examples.label_name!r} ({len(np.unique(examples.labels))} classes); "
      f"{len(rows)} rows x {len(settings.protocols)} protocols x {settings.repeats} splits"
    )
  bench = run_benchmark(
    rows, examples.labels, groups, protocols=settings.protocols, repeats=settings.repeats,
    seed=settings.seed, val_fraction=settings.val_fraction,
    test_fraction=settings.test_fraction, train_subjects=settings.train_subjects,
    options=settings.probe, log=log,
  )  # fmt: skip
  names = [examples.class_names[c] for c in bench["classes"]]
  for split in bench["splits"]:
    counts = {k: len(v) for k, v in split["subjects"].items()}
    split["num_subjects" if settings.split_by == "subject" else "num_groups"] = counts
    if settings.split_by == "example":  # report the subjects each split still contains
      idx = {k: np.asarray(v) for k, v in split["subjects"].items()}
      split["num_subjects"] = {k: len(np.unique(examples.subjects[v])) for k, v in idx.items()}
      del split["subjects"]
  return {
    "workdir": getattr(run, "workdir", None),
    "step": int(run.step),
    "task": str(run.config.task.name),
    "data": {"kind": examples.kind, "source": str(run.config.data.source)},
    "labels": examples.label_name,
    "unit": examples.unit,
    "class_names": names,
    "num_examples": int(examples.num_examples),
    "num_crops": int(examples.num_crops),
    "num_subjects": int(len(np.unique(examples.subjects))),
    "subject_names": list(examples.subject_names),
    "split_by": settings.split_by,
    "protocols": list(settings.protocols),
    "settings": _jsonable(dataclasses.asdict(settings)),
    "seconds": time.perf_counter() - t0,
    **bench,
  }


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return x


def format_table(results: dict[str, Any]) -> str:
  """Markdown: rows = features/baselines, columns = protocols ("mean +- sd" of the test
  balanced accuracy over the repeats, "n/a (k)" with the reasons below)."""
  protocols = results["protocols"]
  lines = [
    "| features | " + " | ".join(protocols) + " |",
    "|---|" + "---|" * len(protocols),
  ]
  reasons: list[str] = []
  for row, cells in results["rows"].items():
    out = []
    for p in protocols:
      cell = cells[p]
      if "na" in cell:
        if cell["na"] not in reasons:
          reasons.append(cell["na"])
        out.append(f"n/a ({reasons.index(cell['na']) + 1})")
      else:
        out.append(f"{cell['mean']:.3f} +- {cell['sd']:.3f}")
    lines.append(f"| {row} | " + " | ".join(out) + " |")
  splits = results["splits"]
  counts = sorted({tuple(s["num_subjects"][k] for k in ("train", "val", "test")) for s in splits})
  n_sub = ", ".join("/".join(map(str, c)) for c in counts)
  held_out = "subjects" if results["split_by"] == "subject" else "examples"
  lines += [
    "",
    f"Balanced accuracy on held-out test {held_out}, "
    f"mean +- sd over {len(splits)} split(s) (seeds {splits[0]['seed']}..{splits[-1]['seed']}); "
    f"chance {results['chance']:.3f} ({results['num_classes']} classes, labels "
    f"{results['labels']!r}).",
    f"Subjects train/val/test: {n_sub} (of {results['num_subjects']}); "
    f"{results['num_examples']} examples ({results['unit']}s, {results['num_crops']} crop(s) "
    "each); "
    f"task {results['task']} at step {results['step']}.",
  ]
  if results["split_by"] == "example":
    lines.append("WARNING: split by example: subjects appear in train and test.")
  lines += [f"n/a ({i + 1}): {r}" for i, r in enumerate(reasons)]
  return "\n".join(lines)


def write_json(results: dict[str, Any], workdir: str, path: str | None = None) -> str:
  """WORKDIR/eval/probe_<labels>_step<step>.json (or `path`); returns the path."""
  if path is None:
    stem = os.path.splitext(str(results["labels"]))[0].replace(os.sep, "_")
    path = checkpoint.path(workdir) / "eval" / f"probe_{stem}_step{results['step']}.json"
  checkpoint.write_json(epath.Path(path), _jsonable(results))
  return str(path)


def settings_from_config(cfg: ml_collections.ConfigDict) -> EvalSettings:
  """EvalSettings from an evaluator config (unknown fields are an error)."""
  known = {f.name for f in dataclasses.fields(EvalSettings)} - {"probe"}
  fields = {k: v for k, v in cfg.items() if k not in ("type", "every_steps")}
  probe_fields = {f.name for f in dataclasses.fields(probes.ProbeOptions)}
  unknown = sorted(set(fields) - known - probe_fields)
  if unknown:
    raise KeyError(
      f"config.evals.<probe>: unknown fields {unknown}; known: "
      f"{sorted(known | probe_fields | {'type', 'every_steps'})}"
    )
  base = {"protocols": ("logistic",), "baselines": (), "repeats": 1}
  main = {
    k: tuple(v) if isinstance(v, list | tuple) else v for k, v in fields.items() if k in known
  }
  opts = {
    k: tuple(v) if isinstance(v, list | tuple) else v
    for k, v in fields.items()
    if k in probe_fields
  }
  return EvalSettings(**{**base, **main}, probe=probes.ProbeOptions(**opts))


@registry.register("evaluator", "probe")
class ProbeEvaluator:
  """Probes the current params' features every `every_steps` (examples loaded once)."""

  def __init__(self, name: str, cfg: ml_collections.ConfigDict, *, task, info, config, mesh, rules):
    self.name = name
    self.every_steps = cfg.every_steps
    self.settings = settings_from_config(cfg)
    check_settings(self.settings)
    self._task, self._info, self._config = task, info, config
    self._mesh, self._rules = mesh, rules
    self._examples: examples_lib.ExampleSet | None = None

  def run(self, state, step: int) -> Iterator[tuple[str, float]]:
    s = self.settings
    if self._examples is None:
      self._examples = examples_lib.load_examples(
        self._config, self._info, s.labels, crops=s.crops, crop_frames=s.crop_frames,
        max_per_subject=s.max_per_subject, seed=s.seed,
      )  # fmt: skip
    run = _RunView(self._config, self._info, self._task, state, int(step), self._mesh, self._rules)
    results = evaluate_run(run, s, examples=self._examples, log=None)
    for row, cells in results["rows"].items():
      for protocol, cell in cells.items():
        if "mean" in cell:
          yield f"{self.name}/{row}/{protocol}", cell["mean"]
    yield f"{self.name}/chance", results["chance"]


@dataclasses.dataclass
class _RunView:
  """The fields of workdir.LoadedRun that evaluate_run reads, for a run in progress."""

  config: Any
  info: Any
  task: Any
  state: Any
  step: int
  mesh: Any
  rules: Any


@dataclasses.dataclass
class FeatureRow:
  """One table row: vectors (n, K, F), tokens ((n, K, N, D), (n, K, N)), or n/a + why."""

  name: str
  kind: str  # "vector" | "tokens"
  data: Any = None
  na_reason: str | None = None


def _select(x, idx: np.ndarray):
  return jax.tree.map(lambda a: np.asarray(a)[idx], x)


def run_benchmark(
  rows: Sequence[FeatureRow],
  labels: np.ndarray,
  subjects: np.ndarray,
  *,
  protocols: Sequence[str],
  repeats: int = 3,
  seed: int = 0,
  val_fraction: float = 0.2,
  test_fraction: float = 0.2,
  train_subjects: int | None = None,
  options: probes.ProbeOptions | None = None,
  log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
  """Every (row, protocol) on the same `repeats` subject splits (seeds seed..seed+R-1).

  Returns {"rows": {row: {protocol: {"mean", "sd", "test", "val", "chosen"} | {"na": why}}},
  "splits": [{"seed", "subjects": {split: ids}, "examples": {split: count}}], "chance",
  "num_classes", "classes"}. sd is the population sd over repeats (np.std, as Semantoks).
  train_subjects: every probe trains on that many training subjects (probes.subject_splits), and
  the logistic probe does not refit on train + val.
  """
  options = probes.ProbeOptions() if options is None else options
  unknown = [p for p in protocols if p not in probes.PROTOCOLS]
  if unknown:
    raise KeyError(f"unknown protocols {unknown}; known: {sorted(probes.PROTOCOLS)}")
  if train_subjects is not None:  # val selects; it must not join the few training subjects
    options = dataclasses.replace(options, logistic_refit_on_val=False)
  labels = np.asarray(labels)
  classes = np.unique(labels)
  y = np.searchsorted(classes, labels).astype(np.int32)
  num_classes = len(classes)
  if num_classes < 2:
    raise ValueError(f"probes: need at least 2 classes in the labels, found {classes.tolist()}")
  splits = []
  for r in range(repeats):
    s = probes.subject_splits(
      subjects, seed + r, val_fraction=val_fraction, test_fraction=test_fraction,
      labels=labels, train_subjects=train_subjects,
    )  # fmt: skip
    idx = probes.split_indices(subjects, s)
    splits.append({"seed": seed + r, "subjects": s, "indices": idx})
  # Every split's training set fits in the largest one: one compilation per row shape.
  crops = {int(np.shape(jax.tree.leaves(r.data)[0])[1]) for r in rows if r.data is not None}
  capacity = max(len(s["indices"]["train"]) for s in splits) * max(crops | {1})
  out_rows: dict[str, dict[str, Any]] = {}
  for row in rows:
    cells: dict[str, Any] = {}
    for protocol in protocols:
      if row.na_reason is not None:
        cells[protocol] = {"na": row.na_reason}
        continue
      if probes.PROTOCOL_INPUT[protocol] != row.kind:
        why = (
          "needs per-token features (see the tokens row)"
          if row.kind == "vector"
          else "takes vectors (see the cls/mean rows)"
        )
        cells[protocol] = {"na": why}
        continue
      tests, vals, chosen, notes = [], [], [], []
      start = time.perf_counter()
      for split in splits:
        data = {k: (_select(row.data, i), y[i]) for k, i in split["indices"].items()}
        res = probes.PROTOCOLS[protocol](data, num_classes, split["seed"], options, capacity)
        tests.append(res.test)
        vals.append(res.val)
        chosen.append(res.chosen)
        notes.append(res.notes)
      cells[protocol] = {
        "mean": float(np.mean(tests)),
        "sd": float(np.std(tests)),
        "test": [float(t) for t in tests],
        "val": [float(v) for v in vals],
        "chosen": chosen,
        "notes": notes,
      }
      if log is not None:
        log(
          f"[boldjax.evaluate] {row.name:>18s} {protocol:<9s} balanced accuracy "
          f"{np.mean(tests):.3f} +- {np.std(tests):.3f} ({time.perf_counter() - start:.1f}s)"
        )
    out_rows[row.name] = cells
  return {
    "rows": out_rows,
    "splits": [
      {
        "seed": s["seed"],
        "subjects": {k: np.asarray(v).tolist() for k, v in s["subjects"].items()},
        "examples": {k: int(len(v)) for k, v in s["indices"].items()},
      }
      for s in splits
    ],
    "chance": 1.0 / num_classes,
    "num_classes": num_classes,
    "classes": classes.tolist(),
  }
