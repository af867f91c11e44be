"""Reading and summarising the runs of launch/few_subject_decoding.py (no flags, importable)."""

from __future__ import annotations

import json
import os

import numpy as np


def held_out_curve(workdir: str, split: str) -> dict[int, float]:
  """step -> exact split balanced accuracy logged by the loss evaluator."""
  key = f"{split}/balanced_accuracy"
  curve = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if key in row:
        curve[int(row["step"])] = float(row[key])
  if not curve:
    raise ValueError(f"{workdir}/metrics.jsonl: no {key!r} rows (was the split evaluated?)")
  return curve


def summarise(results: dict, arms: list[str], steps: list[int], chance: float) -> str:
  """Markdown: per (subjects, step) each arm's mean +- sd and its paired gain over arms[0]."""
  ref = arms[0]
  head = " | ".join(arms) + " | " + " | ".join(f"{a} - {ref}" for a in arms[1:])
  lines = [
    f"held-out balanced accuracy, mean +- sd over seeds (chance {chance:.3f})",
    "",
    f"| train subjects | step | {head} |",
    "|---|---|" + "---|" * (2 * len(arms) - 1),
  ]
  for n, by_arm in results.items():
    for step in steps:
      vals = {a: np.array([c[step] for c in by_arm[a]]) for a in arms}
      cells = [f"{v.mean():.3f} +- {v.std():.3f}" for v in vals.values()]
      for a in arms[1:]:
        d = vals[a] - vals[ref]
        cells.append(f"{d.mean():+.3f} +- {d.std():.3f} ({int((d > 0).sum())}/{len(d)} better)")
      lines.append(f"| {n} | {step} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def probe_table(probes: dict[str, dict]) -> str:
  """Markdown: frozen-feature logistic probes (boldjax.evaluate JSONs) per training subjects."""
  first = next(iter(probes.values()))
  rows = list(first["rows"])
  lines = [
    "frozen features, logistic probe on n training subjects: held-out balanced accuracy, "
    f"mean +- sd over {len(first['splits'])} subject splits (chance {first['chance']:.3f})",
    "",
    "| train subjects | " + " | ".join(rows) + " |",
    "|---|" + "---|" * len(rows),
  ]
  for n, res in probes.items():
    cells = [res["rows"][r]["logistic"] for r in rows]
    lines.append(
      f"| {n} | " + " | ".join(f"{c['mean']:.3f} +- {c['sd']:.3f}" for c in cells) + " |"
    )
  return "\n".join(lines)


def plot(results: dict, arms: list[str], steps: list[int], chance: float, path: str) -> None:
  """Left: accuracy vs training subjects at the last step; right: vs steps, per n."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
  ns = [int(n) for n in results]
  for arm in arms:
    vals = np.array([[c[steps[-1]] for c in results[n][arm]] for n in results])
    line = ax.errorbar(ns, vals.mean(1), yerr=vals.std(1), marker="o", capsize=3, label=arm)
    for n, style in zip(results, ("-", "--", ":", "-."), strict=False):
      curve = np.array([[c[s] for s in steps] for c in results[n][arm]]).mean(0)
      ax2.plot(steps, curve, style, color=line[0].get_color(), label=f"{arm}, n={n}")
  for a in (ax, ax2):
    a.axhline(chance, ls="--", color="k", lw=0.8)
    a.set_ylabel("held-out balanced accuracy")
  ax.set_xlabel("training subjects")
  ax.set_xticks(ns)
  ax.set_title(f"after {steps[-1]} steps (dashed: chance)")
  ax.legend(frameon=False)
  ax2.set_xlabel("decoding steps")
  ax2.set_title("mean over seeds")
  ax2.legend(frameon=False, fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def count_classes(workdir: str) -> int:
  """Number of classes of a decoding run, from its logged per-class metrics."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      keys = [k for k in json.loads(line) if k.endswith("_count") and "/class_" in k]
      if keys:
        return len({k.split("/")[1] for k in keys})
  raise ValueError(f"{workdir}/metrics.jsonl: no class_*_count metrics")
