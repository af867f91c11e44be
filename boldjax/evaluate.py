"""Probe any checkpoint against baselines on held-out subjects.

  python -m boldjax.evaluate --workdir=runs/csm_gpt
  python -m boldjax.evaluate --workdir=runs/gpt_small --protocol=logistic,attentive
  python -m boldjax.evaluate --workdir=RUN --labels=traits.csv --crops=8 --crop_frames=40
  python -m boldjax.evaluate --workdir=runs/csm_gpt --train_subjects=1 --repeats=5

Prints a markdown table (rows = the model's features and the baselines, columns =
protocols, "mean +- sd" test balanced accuracy over --repeats subject splits, chance and
subjects per split) and writes the full results to WORKDIR/eval/probe_<labels>_step<N>.json.

Contract with the task families (any registered Task works through it):
- features(params, batch) -> dict, called jitted on batches of the run's own input format
  (parcellated: bold (B, T, R), t_sec, mask, length, subject_id as decode-mode batches;
  flat maps: patches, tokens, order (identity), subject_id), sharded over the mesh's data
  axes. What features() receives is task.feature_params(params, extra) (the params, or e.g.
  an EMA teacher kept in extra).
- Vector features: every (B, F) value, plus 'cls' when it is (B, K, F): K crops of the
  example, each a separate training sample, whose logits are averaged at test (the
  Semantoks protocol). --features=a,b picks keys explicitly ((B, F) or (B, K, F)).
- 'tokens' (B, N, D) with optional 'token_mask' (B, N) (default all valid) feed the
  attentive probe (row "tokens").
- Crops can also come from here: --crops=K takes K windows of --crop_frames frames spread
  evenly over each example (parcellated data), each run through features() separately.
- Labels: --labels=NAME from the "labels" registry ('state': decode-mode task blocks of
  parcellated data; 'stimulus': the flat maps' stimulus class; 'auto' picks by data kind),
  or a CSV path with columns subject[,run],label (one example per run / map).
- Splits are by subject (never leaking one): sklearn train_test_split of the subjects,
  test 20 % then val 20 %, seeds seed..seed+repeats-1; all dataset splits are pooled first.
- Baselines on the same splits: fc (Pearson FC upper triangle of the raw window), identity
  (raw window / map pixels), random_init (fresh task.init params, same features path).
  Cells that do not apply read "n/a" with the reason under the table.
"""

from __future__ import annotations

import dataclasses

from absl import app, flags

from boldjax import cli, workdir
from boldjax.evals import probe_evaluator, probes

_WORKDIR = flags.DEFINE_string("workdir", None, "Trained run directory.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_PROTOCOL = flags.DEFINE_list(
  "protocol", "linear,logistic,attentive,mlp", f"Protocols: {sorted(probes.PROTOCOLS)}."
)
_LABELS = flags.DEFINE_string("labels", "auto", "Label source name or CSV path.")
_FEATURES = flags.DEFINE_list("features", [], "features() keys to probe (default: all vectors).")
_BASELINES = flags.DEFINE_list(
  "baselines", ",".join(probe_evaluator.BASELINES), "Baselines: fc, identity, random_init."
)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Repeated subject splits (seeds seed..).")
_SEED = flags.DEFINE_integer("seed", 0, "First split seed.")
_VAL = flags.DEFINE_float("val_fraction", 0.2, "Fraction of subjects for validation.")
_TEST = flags.DEFINE_float("test_fraction", 0.2, "Fraction of subjects for test.")
_TRAIN_SUBJECTS = flags.DEFINE_integer(
  "train_subjects",
  None,
  "Label-scarce probe: train on this many of the training subjects "
  "(val still selects hyperparameters, without the logistic refit on train + val).",
)
_SPLIT_BY = flags.DEFINE_enum("split_by", "subject", ["subject", "example"], "Split unit.")
_CROPS = flags.DEFINE_integer("crops", 1, "Crops per example (parcellated data).")
_CROP_FRAMES = flags.DEFINE_integer("crop_frames", 0, "Frames per crop (0: seq_max).")
_MAX_PER_SUBJECT = flags.DEFINE_integer("max_per_subject", None, "Cap examples per subject.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Feature-extraction batch size.")
_LINEAR_EPOCHS = flags.DEFINE_integer("linear_epochs", 50, "Linear-probe epochs.")
_HEAD_STEPS = flags.DEFINE_integer("head_steps", 500, "Attentive/MLP probe steps.")
_OUT = flags.DEFINE_string("out", None, "JSON path (default WORKDIR/eval/...).")


def settings_from_flags() -> probe_evaluator.EvalSettings:
  options = dataclasses.replace(
    probes.ProbeOptions(), linear_epochs=_LINEAR_EPOCHS.value, head_steps=_HEAD_STEPS.value
  )
  return probe_evaluator.EvalSettings(
    labels=_LABELS.value,
    protocols=tuple(_PROTOCOL.value),
    features=tuple(_FEATURES.value),
    baselines=tuple(_BASELINES.value),
    repeats=_REPEATS.value,
    seed=_SEED.value,
    val_fraction=_VAL.value,
    test_fraction=_TEST.value,
    train_subjects=_TRAIN_SUBJECTS.value,
    split_by=_SPLIT_BY.value,
    crops=_CROPS.value,
    crop_frames=_CROP_FRAMES.value,
    max_per_subject=_MAX_PER_SUBJECT.value,
    batch_size=_BATCH.value,
    probe=options,
  )


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  settings = settings_from_flags()
  probe_evaluator.check_settings(settings)
  run = workdir.load_run(_WORKDIR.value, _STEP.value)
  print(f"[boldjax.evaluate] {_WORKDIR.value}: task {run.config.task.name} step {run.step}")
  results = probe_evaluator.evaluate_run(run, settings)
  results["workdir"] = _WORKDIR.value
  path = probe_evaluator.write_json(results, _WORKDIR.value, _OUT.value)
  print()
  print(probe_evaluator.format_table(results))
  print(f"\nwrote {path}")


if __name__ == "__main__":
  cli.run_absl("python -m boldjax.evaluate", main)
