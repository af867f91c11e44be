"""Sweeps: a config's sweep() turns into one command per point."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_sweep_prints_one_command_per_point():
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "launch.sweep",
      "--config=configs/gpt_small.py",
      "--print",
      "--launcher=slurm",
      "--workdir_root=/runs",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.splitlines()
  assert len(out) == 4
  assert out[0] == (
    "sbatch launch/slurm.sbatch --config=configs/gpt_small.py "
    "--workdir=/runs/target=categorical_lr=0.0003 --config.task.target=categorical "
    "--config.optim.lr=0.0003"
  )
  assert out[3].endswith("--config.task.target=continuous --config.optim.lr=0.001")


def test_few_subject_summary_pairs_arms_by_seed():
  from launch.few_subject_report import summarise

  results = {
    "1": {
      "scratch": [{50: 0.2, 100: 0.3}, {50: 0.4, 100: 0.5}],
      "pretrained": [{50: 0.5, 100: 0.4}, {50: 0.3, 100: 0.7}],
    }
  }
  lines = summarise(results, ["scratch", "pretrained"], [50, 100], 0.2).splitlines()
  assert lines[0] == "held-out balanced accuracy, mean +- sd over seeds (chance 0.200)"
  # step 50: gains +0.3 and -0.1 -> +0.100 +- 0.200, 1 of 2 seeds better
  assert lines[-2] == "| 1 | 50 | 0.300 +- 0.100 | 0.400 +- 0.100 | +0.100 +- 0.200 (1/2 better) |"
  assert lines[-1] == "| 1 | 100 | 0.400 +- 0.100 | 0.550 +- 0.150 | +0.150 +- 0.050 (2/2 better) |"


def test_few_subject_probe_table_reads_evaluate_results():
  from launch.few_subject_report import probe_table

  def result(pretrained, random):
    cell = lambda m, sd: {"logistic": {"mean": m, "sd": sd}}
    rows = {"mean": cell(pretrained, 0.05), "random_init/mean": cell(random, 0.1)}
    return {"rows": rows, "splits": [{}, {}, {}], "chance": 0.2}

  lines = probe_table({"1": result(0.37, 0.636), "4": result(0.886, 0.933)}).splitlines()
  assert lines[0].endswith("mean +- sd over 3 subject splits (chance 0.200)")
  assert lines[2] == "| train subjects | mean | random_init/mean |"
  assert lines[4] == "| 1 | 0.370 +- 0.050 | 0.636 +- 0.100 |"
  assert lines[5] == "| 4 | 0.886 +- 0.050 | 0.933 +- 0.100 |"


def test_synthetic_regimes_reach_the_data_spec():
  from boldjax.data.bold_pipeline import synthetic_spec
  from configs import csm_gpt, decode

  coupled = synthetic_spec(decode.get_config("synthetic=coupling,train_subjects=2").data)
  assert (coupled.coupling_scale, coupled.coupling_lag_s, coupled.task_scale) == (3.0, 1.0, 0.0)
  assert (coupled.block_seconds, coupled.run_seconds) == (30.0, 300.0)
  assert synthetic_spec(csm_gpt.get_config("synthetic=coupling").data) == coupled
  rhythm = synthetic_spec(decode.get_config("synthetic=rhythm").data)
  assert (rhythm.rhythm_scale, rhythm.coupling_scale, rhythm.task_scale) == (3.0, 0.0, 0.0)
  assert synthetic_spec(csm_gpt.get_config("synthetic=rhythm").data) == rhythm
  default = synthetic_spec(csm_gpt.get_config().data)
  assert (default.coupling_scale, default.task_scale, default.block_seconds) == (0.0, 1.0, 16.0)
  assert default.rhythm_scale == 0.0
  with pytest.raises(ValueError, match="'synthetic': expected one of"):
    csm_gpt.get_config("synthetic=bogus")
