"""Every command refuses bad input in one line naming file and field, exit 2, no output."""

import pytest

from tests.cli_helpers import command_refuses, prepare_refuses

pytestmark = pytest.mark.slow  # each case starts a python process that imports jax

CONFIG = "--config=configs/gpt_small.py:runlocal"


def test_main_refuses_an_unknown_config_key_and_suggests_the_right_one(tmp_path):
  line = command_refuses(
    "boldjax.main", [CONFIG, "--config.modl.depth=2", f"--workdir={tmp_path / 'w'}"],
    r"--config\.modl\.depth: config has no field 'modl'.*"
    r"Did you mean \"model\" instead of \"modl\"\?",
    tmp_path / "w",
  )  # fmt: skip
  assert "Traceback" not in line


def test_main_refuses_a_bad_config_argument_and_value(tmp_path):
  command_refuses(
    "boldjax.main", ["--config=configs/gpt_small.py:size=huge", f"--workdir={tmp_path / 'w'}"],
    r"gpt_small\.py:size=huge.*'size': expected one of \['base', 'small', 'tiny'\], found 'huge'",
    tmp_path / "w",
  )  # fmt: skip
  command_refuses(
    "boldjax.main", [CONFIG, "--config.total_steps=many", f"--workdir={tmp_path / 'w'}"],
    r"--config\.total_steps=many: .*many", tmp_path / "w",
  )  # fmt: skip


def test_main_refuses_a_missing_dataset_and_leaves_no_workdir(tmp_path):
  command_refuses(
    "boldjax.main",
    [CONFIG, f"--config.data.path={tmp_path / 'nodata'}", f"--workdir={tmp_path / 'w'}"],
    r"nodata/meta\.json: missing", tmp_path / "w",
  )  # fmt: skip


def test_sample_and_evaluate_refuse_what_is_not_a_workdir(tmp_path):
  for module in ("boldjax.sample", "boldjax.evaluate"):
    command_refuses(
      module, [f"--workdir={tmp_path / 'nothing'}", f"--out={tmp_path / 'o.png'}"],
      r"nothing/config\.json: not found: .* is not a boldjax workdir", tmp_path / "o.png",
    )  # fmt: skip
  command_refuses(
    "boldjax.evaluate", [f"--workdir={tmp_path}", "--protocol=linear,bogus"],
    r"--protocol: expected some of .*bogus",
  )  # fmt: skip


def test_launchers_refuse_bad_flags_before_making_folders(tmp_path):
  command_refuses(
    "launch.few_subject_decoding", [f"--out={tmp_path / 'fig5'}", "--synthetic=rhythms"],
    r"--synthetic: expected one of \[.*'rhythm'.*\], found 'rhythms'", tmp_path / "fig5",
  )  # fmt: skip
  command_refuses(
    "launch.few_subject_decoding", [f"--out={tmp_path / 'fig5'}", "--subjects=1,two"],
    r"--subjects: expected non-negative integers", tmp_path / "fig5",
  )  # fmt: skip
  command_refuses(
    "launch.sweep", ["--config=configs/nothing.py", "--print"],
    r"configs/nothing\.py", None,
  )  # fmt: skip


def test_prepare_refuses_unknown_formats_and_flags_in_one_line(tmp_path, capsys):
  prepare_refuses(capsys, ["parquet", "x"], r"invalid choice: 'parquet'", None)
  prepare_refuses(
    capsys, ["nsd_flat", tmp_path, f"--out={tmp_path / 'o'}", "--limit=ten"],
    r"argument --limit: invalid int value: 'ten'", tmp_path / "o",
  )  # fmt: skip
