"""Evaluation plumbing: FC baseline, label sources, examples as the pipelines build them,
the table, and end to end: the evaluate CLI on tiny CSM and patch-GPT runs."""

import json
import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from boldjax.evals import baselines, features, probe_evaluator
from boldjax.evals import examples as examples_lib
from boldjax.evals import labels as labels_lib
from configs import csm_gpt


def test_fc_equals_corrcoef_upper_triangle():
  rng = np.random.default_rng(0)
  bold = rng.standard_normal((4, 2, 20, 6)).astype(np.float32)
  mask = np.zeros((4, 2, 20), bool)
  for i, n in enumerate([20, 12, 7, 15]):
    mask[i, 0, :n] = True
    mask[i, 1, : n - 3] = True
  bold[3, 1, :, 2] = 1.5  # a constant parcel: corrcoef gives nan, FC gives 0
  fc = baselines.fc_features(bold, mask)
  iu = np.triu_indices(6, k=1)
  assert fc.shape == (4, 2, 15)
  for i in range(4):
    for k in range(2):
      with np.errstate(invalid="ignore", divide="ignore"):
        ref = np.corrcoef(bold[i, k][mask[i, k]].T)[iu]
      np.testing.assert_allclose(fc[i, k], np.nan_to_num(ref, nan=0.0), rtol=1e-5, atol=1e-6)
  assert np.all(fc[3, 1][(iu[0] == 2) | (iu[1] == 2)] == 0)


def test_crop_starts_spread_evenly():
  np.testing.assert_array_equal(examples_lib.crop_starts(10, 30, 10, 3), [10, 20, 30])
  np.testing.assert_array_equal(examples_lib.crop_starts(0, 8, 20, 2), [0, 0])
  np.testing.assert_array_equal(examples_lib.crop_starts(5, 17, 8, 1), [5])


def test_label_sources_registry_and_errors(tmp_path):
  assert labels_lib.label_source("auto", "parcellated").name == "state"
  assert labels_lib.label_source("auto", "flat").name == "stimulus"
  with pytest.raises(KeyError, match=r"known: \['state', 'stimulus', 'task'\] or a path"):
    labels_lib.label_source("mood", "parcellated")
  with pytest.raises(
    ValueError, match="applies to \\('flat',\\) data.*usable: \\['state', 'task'\\]"
  ):
    labels_lib.label_source("stimulus", "parcellated")
  bad = tmp_path / "bad.csv"
  bad.write_text("participant,label\nsub-00,a\n")
  with pytest.raises(ValueError, match=r"bad.csv: header expected columns subject\[,run\],label"):
    labels_lib.label_source(str(bad), "parcellated")
  clash = tmp_path / "clash.csv"
  clash.write_text("subject,label\nsub-00,a\nsub-00,b\n")
  with pytest.raises(ValueError, match=r"clash.csv:3: field 'label'"):
    labels_lib.label_source(str(clash), "parcellated")
  good = tmp_path / "traits.csv"
  good.write_text("subject,run,label\nsub-00,run-01,hi\n3,run-00,lo\nsub-09,run-00,\n")
  source = labels_lib.label_source(str(good), "parcellated")
  cols = {
    "subject": np.array(["sub-00", "sub-00", "sub-03", "sub-09"]),
    "subject_id": np.array([0, 0, 3, 9]),
    "run": np.array(["run-01", "run-00", "run-00", "run-00"]),
    "label": np.array([-1, -1, -1, -1]),
  }
  labels, names = source.label(cols, [])
  assert names == ["hi", "lo"] and labels.tolist() == [0, -1, 1, -1]
  assert source.unit == "run"


def _csm_config():
  return csm_gpt.get_config("runlocal")


def test_state_examples_equal_decode_pipeline_batches():
  from boldjax.data import pipeline_for

  config = _csm_config()
  info = pipeline_for(config.data).prepare(config.data)
  ex = examples_lib.load_examples(config, info, "state")
  assert ex.kind == "parcellated" and ex.unit == "block" and ex.num_crops == 1
  assert ex.num_examples == 199 and sorted(set(ex.labels.tolist())) == [0, 1, 2, 3, 4]
  assert len(np.unique(ex.subjects)) == 6
  data_cfg = ml_collections.ConfigDict(config.data.to_dict())
  data_cfg.mode = "decode"
  batch = next(
    iter(
      pipeline_for(data_cfg).make_dataset(
        data_cfg, info, split="val", train=False, seed=0, batch_size=8
      )
    )
  )
  val = np.flatnonzero(ex.source_split == "val")[:8]
  for key in ("bold", "t_sec", "mask", "length"):
    np.testing.assert_array_equal(ex.inputs[key][val, 0], batch[key], err_msg=key)
  np.testing.assert_array_equal(ex.labels[val], batch["label"])
  np.testing.assert_array_equal(ex.subjects[val], batch["subject_id"])


def test_csv_labels_give_runs_with_crops(tmp_path):
  from boldjax.data import pipeline_for

  config = _csm_config()
  info = pipeline_for(config.data).prepare(config.data)
  path = tmp_path / "sex.csv"
  path.write_text("subject,label\n" + "".join(f"sub-0{i},{'fm'[i % 2]}\n" for i in range(5)))
  ex = examples_lib.load_examples(config, info, str(path), crops=3, crop_frames=20)
  runs_per_subject = 6  # 2 rest + 4 task runs
  assert ex.unit == "run" and ex.num_examples == 5 * runs_per_subject
  assert ex.class_names == ["f", "m"]
  assert sorted(set(ex.subjects.tolist())) == [0, 1, 2, 3, 4]
  np.testing.assert_array_equal(ex.labels, ex.subjects % 2)
  assert ex.inputs["bold"].shape == (30, 3, config.data.seq_max, 16)
  np.testing.assert_array_equal(ex.inputs["length"], 20)
  first, last = ex.inputs["bold"][0, 0, :20], ex.inputs["bold"][0, 2, :20]
  assert not np.allclose(first, last)  # crops at the start and at the end of the run
  assert np.all(ex.inputs["bold"][:, :, 20:] == 0)


class _FakeTask:
  """features(): cls (B, 2, F) model crops, mean (B, F), tokens without a token_mask."""

  def features(self, params, batch):
    x = batch["x"] * params["w"]
    return {"cls": jnp.stack([x, -x], axis=1), "mean": x + 1.0, "tokens": x[:, None, :] * 2}


def test_extract_features_batches_pads_and_flattens_crops():
  from boldjax import sharding

  mesh = sharding.make_mesh((("data", -1), ("fsdp", 1), ("tensor", 1)))
  n, k, f = 13, 2, 3  # 26 crops: not a multiple of the batch or of the 8 devices
  x = np.arange(n * k * f, dtype=np.float32).reshape(n, k, f)
  ex = examples_lib.ExampleSet(
    kind="flat", inputs={"x": x}, labels=np.zeros(n, int), subjects=np.arange(n),
    subject_names=[], class_names=["a"], source_split=np.array(["train"] * n),
    label_name="t", unit="map",
  )  # fmt: skip
  params = {"w": jnp.float32(2.0)}
  out = features.extract_features(
    _FakeTask(), params, ex, mesh=mesh, rules=(), batch_size=4, log=None
  )
  assert sorted(out) == ["cls", "mean", "token_mask", "tokens"]
  assert out["cls"].shape == (n, 2 * k, f)  # example crops x model crops
  np.testing.assert_array_equal(out["cls"][:, 0], 2 * x[:, 0])
  np.testing.assert_array_equal(out["cls"][:, 1], -2 * x[:, 0])
  np.testing.assert_array_equal(out["cls"][:, 3], -2 * x[:, 1])
  np.testing.assert_array_equal(out["mean"], 2 * x + 1)
  assert out["tokens"].dtype == np.float16 and out["tokens"].shape == (n, k, 1, f)
  np.testing.assert_array_equal(out["tokens"][:, :, 0], 4 * x)
  assert out["token_mask"].all() and out["token_mask"].shape == (n, k, 1)
  only = features.extract_features(
    _FakeTask(), params, ex, mesh=mesh, rules=(), keys=("mean",), tokens=False, log=None
  )
  assert sorted(only) == ["mean"]
  with pytest.raises(KeyError, match=r"--features \['pooled'\]: not in features\(\) output"):
    features.extract_features(_FakeTask(), params, ex, mesh=mesh, rules=(), keys=("pooled",))


def test_format_table_and_settings():
  results = {
    "protocols": ["linear", "attentive"],
    "rows": {
      "cls": {"linear": {"mean": 0.8123, "sd": 0.0456}, "attentive": {"na": "needs tokens"}},
      "fc": {"linear": {"na": "no time axis"}, "attentive": {"na": "needs tokens"}},
    },
    "splits": [{"seed": 0, "num_subjects": {"train": 6, "val": 3, "test": 3}}] * 2,
    "split_by": "subject",
    "chance": 0.2,
    "num_classes": 5,
    "labels": "state",
    "num_subjects": 12,
    "num_examples": 400,
    "unit": "block",
    "num_crops": 1,
    "task": "csm",
    "step": 6,
  }
  table = probe_evaluator.format_table(results)
  assert "| cls | 0.812 +- 0.046 | n/a (1) |" in table
  assert "| fc | n/a (2) | n/a (1) |" in table
  assert "n/a (1): needs tokens" in table and "n/a (2): no time axis" in table
  assert "chance 0.200 (5 classes" in table and "train/val/test: 6/3/3 (of 12)" in table
  cfg = ml_collections.ConfigDict(
    {"type": "probe", "every_steps": 5, "protocols": ("linear",), "head_steps": 7}
  )
  s = probe_evaluator.settings_from_config(cfg)
  assert s.protocols == ("linear",) and s.probe.head_steps == 7 and s.baselines == ()
  cfg.lables = "state"
  with pytest.raises(KeyError, match=r"unknown fields \['lables'\]"):
    probe_evaluator.settings_from_config(cfg)
  with pytest.raises(ValueError, match="--protocol: expected some of"):
    probe_evaluator.check_settings(probe_evaluator.EvalSettings(protocols=("ridge",)))


# -------------------------------------------------------------------------------------------
# End to end.
# -------------------------------------------------------------------------------------------

FAST_FLAGS = dict(repeats=2, linear_epochs=10, head_steps=60)
ROWS = ["cls", "mean", "tokens", "random_init/cls", "random_init/mean", "random_init/tokens"]
PROTOCOLS = ["linear", "logistic", "attentive", "mlp"]


def _run_cli(workdir: str, capsys) -> tuple[dict, str]:
  from absl.testing import flagsaver

  from boldjax import evaluate

  with flagsaver.flagsaver(workdir=workdir, **FAST_FLAGS):
    evaluate.main(["evaluate"])
  out = capsys.readouterr().out
  path = out.strip().splitlines()[-1].removeprefix("wrote ")
  assert os.path.dirname(path) == os.path.join(workdir, "eval")
  with open(path) as f:
    return json.load(f), out


def _check_results(results: dict, rows: list[str], na: dict[tuple[str, str], str]) -> None:
  assert results["protocols"] == PROTOCOLS
  assert set(rows) <= set(results["rows"])
  for row, cells in results["rows"].items():
    assert sorted(cells) == sorted(PROTOCOLS), row
    for protocol, cell in cells.items():
      expected_na = na.get((row, protocol))
      if expected_na is None:
        expected_na = ("attentive" == protocol) != row.endswith("tokens")
      if expected_na:
        assert "na" in cell, (row, protocol)
        continue
      assert 0.0 <= cell["mean"] <= 1.0 and 0.0 <= cell["sd"] <= 0.5, (row, protocol)
      assert len(cell["test"]) == 2 and all(0.0 <= v <= 1.0 for v in cell["test"])
  for split in results["splits"]:
    parts = [set(split["subjects"][k]) for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert split["num_subjects"]["test"] >= 2


@pytest.mark.slow
@pytest.mark.value_check("shuffled_labels")
def test_evaluate_cli_on_a_tiny_csm_run(tmp_path, capsys):
  from boldjax import train

  config = _csm_config()
  config.unlock()
  config.evals.probe = ml_collections.ConfigDict(
    {"type": "probe", "every_steps": 6, "protocols": ("logistic",), "head_steps": 20}
  )
  config.lock()
  out = train.run(config, str(tmp_path))
  assert 0.0 <= out["probe/cls/logistic"] <= 1.0 and out["probe/chance"] == pytest.approx(0.2)
  capsys.readouterr()
  results, printed = _run_cli(str(tmp_path), capsys)
  rows = [*ROWS, "pooled", "random_init/pooled", "fc", "identity"]
  _check_results(results, rows, {})
  assert results["task"] == "csm" and results["labels"] == "state"
  assert results["num_subjects"] == 6 and results["chance"] == pytest.approx(0.2)
  assert results["splits"][0]["num_subjects"] == {"train": 3, "val": 1, "test": 2}
  assert "| identity |" in printed and "chance 0.200 (5 classes" in printed
  print(printed)  # the measured table (pytest -s)
  # Above chance by a margin. Measured 2026-12-03 (AMD EPYC, 2 cores): mean/logistic
  # 0.615 +- 0.017, tokens/attentive 0.618, identity 0.675, chance 0.200. Six training
  # steps are too few for training to matter (random_init/mean 0.598), so no claim on that.
  rows = results["rows"]
  assert rows["mean"]["logistic"]["mean"] > 0.2 + 0.2
  assert rows["tokens"]["attentive"]["mean"] > 0.2 + 0.2


@pytest.mark.slow
@pytest.mark.value_check("shuffled_labels")
def test_evaluate_cli_on_a_tiny_patch_gpt_run(tmp_path, capsys):
  from boldjax import train
  from configs import gpt_small

  config = gpt_small.get_config("runlocal")
  config.unlock()
  config.data.synthetic.num_subjects = 6  # subject-wise splits need >= 3 subjects
  config.lock()
  train.run(config, str(tmp_path))
  capsys.readouterr()
  results, printed = _run_cli(str(tmp_path), capsys)
  na = {("fc", p): True for p in PROTOCOLS}
  _check_results(results, [*ROWS, "fc", "identity"], na)
  assert results["rows"]["fc"]["linear"] == {"na": baselines.FC_NA}
  assert results["task"] == "next_patch" and results["labels"] == "stimulus"
  assert results["num_examples"] == 240 and results["chance"] == pytest.approx(1 / 8)
  assert f"n/a (3): {baselines.FC_NA}" in printed
  print(printed)
  # Above chance (1/8) by a margin. Measured 2026-12-03 (AMD EPYC, 2 cores): mean/logistic
  # 0.269 +- 0.044, tokens/attentive 0.250 +- 0.012, identity 0.819; random_init/mean 0.256
  # (six training steps: training does not matter yet).
  rows = results["rows"]
  assert rows["mean"]["logistic"]["mean"] > 0.125 + 0.06
  assert rows["tokens"]["attentive"]["mean"] > 0.125 + 0.06


def test_run_task_label_source_labels_rest_and_task_runs():
  from boldjax import registry

  source = registry.get("labels", "task")
  labels, names = source.label({"task": np.array(["task", "rest", "task"])}, [])
  assert names == ["rest", "task"] and labels.tolist() == [1, 0, 1]
  assert source.unit == "run"
