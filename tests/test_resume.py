"""Re-running a workdir: finished runs, runs killed after their last checkpoint, changed configs."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from boldjax import checkpoint, train, workdir
from boldjax.cli import InputError
from boldjax.metrics import read_jsonl
from tests.run_helpers import gpt_runlocal

REPO = Path(__file__).resolve().parents[1]
CONFIG = "--config=configs/gpt_small.py:runlocal"


def _main(*args, prelude: str = ""):
  """`python -m boldjax.main ARGS` (after `prelude` code), as a user runs it."""
  code = f"{prelude}\nimport runpy, sys\nsys.argv = ['boldjax.main', *{list(args)!r}]\n"
  code += "runpy.run_module('boldjax.main', run_name='__main__')"
  return subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600
  )


def _table(stdout: str) -> dict[str, float]:
  """The 'final evaluation:' lines of a run's output."""
  lines = stdout.split("final evaluation:\n", 1)[1].splitlines()
  rows = {}
  for line in lines:
    if not line.startswith("  "):
      break
    *name, value = line.split()
    rows[" ".join(name)] = float(value)
  return rows


_config = gpt_runlocal


@pytest.mark.slow
def test_rerun_of_a_finished_run_prints_its_final_table_and_exits_zero(tmp_path):
  run_dir = tmp_path / "run"
  first = _main(CONFIG, f"--workdir={run_dir}")
  assert first.returncode == 0, first.stderr[-3000:]
  assert (run_dir / checkpoint.FINAL_FILE).exists()
  again = _main(CONFIG, f"--workdir={run_dir}")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "run complete at step 6" in again.stdout
  assert _table(again.stdout) == _table(first.stdout)
  assert set(_table(first.stdout)) >= {"val/loss", "val/accuracy", "baseline unigram_loss"}


@pytest.mark.slow
def test_kill9_after_the_last_checkpoint_then_rerun_exits_zero(tmp_path):
  run_dir = tmp_path / "run"
  # SIGKILL the process right where it would write the final table: every checkpoint is
  # on disk, nothing after it happened.
  prelude = (
    "import os, signal\nfrom boldjax import checkpoint\nreal = checkpoint.write_json\n"
    "def write_json(file, value):\n"
    "  if file.name == checkpoint.FINAL_FILE: os.kill(os.getpid(), signal.SIGKILL)\n"
    "  real(file, value)\n"
    "checkpoint.write_json = write_json\n"
  )
  killed = _main(CONFIG, f"--workdir={run_dir}", prelude=prelude)
  assert killed.returncode == -signal.SIGKILL
  assert 6 in checkpoint.make_manager(str(run_dir), every_steps=1, keep=3).all_steps()
  assert not (run_dir / checkpoint.FINAL_FILE).exists()

  again = _main(CONFIG, f"--workdir={run_dir}")
  assert again.returncode == 0, again.stderr[-3000:]
  assert "run complete at step 6" in again.stdout
  table = _table(again.stdout)
  # The evaluation is recomputed from the restored state: it equals what the killed run
  # logged at step 6 before it died.
  logged = [r for r in read_jsonl(str(run_dir / "metrics.jsonl")) if "val/loss" in r]
  assert logged[-1]["step"] == 6
  assert table["val/loss"] == pytest.approx(logged[-1]["val/loss"], abs=1e-4)
  assert table["val/accuracy"] == pytest.approx(logged[-1]["val/accuracy"], abs=1e-4)
  assert json.loads((run_dir / checkpoint.FINAL_FILE).read_text())["step"] == 6


def test_resume_with_a_changed_model_width_is_refused_and_keeps_config_json(tmp_path):
  run_dir = tmp_path / "run"
  train.run(_config(total_steps=2), str(run_dir))
  saved = (run_dir / checkpoint.CONFIG_FILE).read_bytes()
  changed = _main(
    CONFIG, "--config.total_steps=4", "--config.model.embed_dim=96", f"--workdir={run_dir}"
  )
  assert changed.returncode == 2, changed.stderr[-3000:]
  message = changed.stderr.strip().splitlines()
  assert len(message) == 1, changed.stderr
  assert "model.embed_dim: expected 192, found 96" in message[0]
  assert str(run_dir / checkpoint.CONFIG_FILE) in message[0]
  assert "total_steps" not in message[0].split("Only")[0]  # a safe key is not refused
  assert (run_dir / checkpoint.CONFIG_FILE).read_bytes() == saved
  assert checkpoint.make_manager(str(run_dir), every_steps=1, keep=3).all_steps() == [2]


def test_safe_keys_may_change_on_resume(tmp_path):
  run_dir = str(tmp_path / "run")
  train.run(_config(total_steps=2), run_dir)
  final = train.run(_config(total_steps=4, log_every=1), run_dir)
  assert checkpoint.load_config(run_dir).total_steps == 4
  assert "val/loss" in final
  refused, allowed = checkpoint.config_changes(
    _config(total_steps=2), _config(total_steps=4, **{"evals.val.every_steps": 1})
  )
  assert refused == []
  assert allowed == [
    "evals.val.every_steps: expected 4, found 1",
    "total_steps: expected 2, found 4",
  ]


def test_checkpoint_that_does_not_fit_the_model_says_so(tmp_path):
  run_dir = tmp_path / "run"
  train.run(_config(total_steps=2), str(run_dir))
  # The config claims another width than the checkpoint holds: not "unreadable".
  raw = json.loads((run_dir / checkpoint.CONFIG_FILE).read_text())
  raw["model"]["embed_dim"] = 96
  (run_dir / checkpoint.CONFIG_FILE).write_text(json.dumps(raw))
  with pytest.raises(
    InputError, match=r"does not match the model .*expected shape \(96,\), found \(192,\)"
  ):
    workdir.load_run(str(run_dir))


def test_restore_fit_check_names_missing_and_extra_arrays(tmp_path):
  import jax
  import jax.numpy as jnp

  from boldjax.state import TrainState

  manager = checkpoint.make_manager(str(tmp_path), every_steps=1, keep=1, async_save=False)
  saved = TrainState(step=jnp.zeros((), jnp.int32), params={"a": jnp.ones(3), "b": jnp.ones(2)},
                     opt_state={}, extra={})  # fmt: skip
  checkpoint.save(manager, 1, saved, None, force=True)
  model = TrainState(step=jnp.zeros((), jnp.int32), params={"a": jnp.ones(4), "c": jnp.ones(2)},
                     opt_state={}, extra={})  # fmt: skip
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), model)
  with pytest.raises(InputError) as error:
    checkpoint.restore(manager, abstract)
  text = str(error.value)
  assert "params/c: missing" in text
  assert "params/b: not in the model" in text
  assert "params/a: expected shape (4,), found (3,)" in text
  assert "3 arrays differ" in text
  assert os.path.isdir(tmp_path / "checkpoints" / "1")


def test_a_converted_workdir_is_a_starting_point_not_a_run_to_resume(tmp_path):
  run_dir = tmp_path / "converted"
  run_dir.mkdir()
  (run_dir / checkpoint.CONVERTED_FILE).write_text(json.dumps({"source": "/w/boldgpt.pt"}))
  with pytest.raises(InputError, match=r"converted checkpoint of /w/boldgpt\.pt .*"
                     r"--config\.task\.init_from=.*converted and a new --workdir"):  # fmt: skip
    train.run(_config(), str(run_dir))
  assert sorted(p.name for p in run_dir.iterdir()) == [checkpoint.CONVERTED_FILE]
