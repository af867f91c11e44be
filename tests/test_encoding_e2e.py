"""The encoding family end to end: configs/encoding.py trains on the planted synthetic default,
prints R^2, the ridge baseline and the recovery; encoding_maps and the colab draw the maps."""

import os
import re
from pathlib import Path

import controls
import numpy as np
import pytest
from run_helpers import with_overrides

from boldjax import encoding_maps, train
from configs import encoding as encoding_config

REPO = Path(__file__).resolve().parents[1]


def small_config(**overrides):
  """runlocal data (240 images, ~380 vertices) trained long enough to learn something."""
  steps = {
    "total_steps": 200, "log_every": 100, "checkpoint_every": 200,
    "evals.val.every_steps": 200, "evals.encoding.every_steps": 200, "task.reg_steps": 100,
  }  # fmt: skip
  return with_overrides(encoding_config.get_config("runlocal"), **{**steps, **overrides})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, request):
  # Module-scoped, so the conftest's per-test control would come too late: apply it here.
  with pytest.MonkeyPatch.context() as mp:
    control = request.config.getoption("--control")
    if control:
      controls.apply(control, mp, tmp_path_factory)
    workdir = str(tmp_path_factory.mktemp("encoding") / "run")
    final = train.run(small_config(), workdir)
  return workdir, final


@pytest.mark.slow
@pytest.mark.value_check("shuffled_labels")
def test_encoding_runlocal_learns_the_planted_responses(trained):
  _, final = trained
  r2 = final["encoding/test/r2_median"]
  print({k: round(v, 3) for k, v in final.items() if k.startswith("encoding/")})
  # Held-out R^2 well above zero and the planted receptive-field positions found. (The
  # layer needs the full default's 3000 images: here every vertex may settle on one.)
  assert r2 > 0.1, final
  assert final["encoding/planted/x_corr"] > 0.6 and final["encoding/planted/y_corr"] > 0.6, final
  assert final["encoding/ridge/r2_median"] > 0.0, final
  assert final["encoding/test/r2_frac_ceiling_median"] == pytest.approx(r2 / 0.5, rel=0.2)


@pytest.mark.slow
def test_encoding_maps_cli_writes_the_maps_and_the_per_vertex_arrays(trained, tmp_path, capsys):
  workdir, final = trained
  out = tmp_path / "maps.png"
  encoding_maps.main([f"--workdir={workdir}", f"--out={out}", "--clusters=3"])
  assert out.stat().st_size > 20_000
  with np.load(tmp_path / "maps.npz") as z:
    res = {k: z[k] for k in z.files}
  n = len(res["r2"])
  assert res["sel_layer"].shape[0] == n and res["readout"].shape[0] == n
  np.testing.assert_allclose(np.sum(res["sel_layer"], -1), 1.0, rtol=1e-5)
  assert set(np.unique(res["clusters"])) == {0, 1, 2}
  # The same held-out R^2 as the run's final evaluation.
  assert np.nanmedian(res["r2"]) == pytest.approx(final["encoding/test/r2_median"], abs=1e-5)
  assert "median R^2" in capsys.readouterr().out


@pytest.mark.slow
def test_encoding_maps_colab_executes(trained, tmp_path, monkeypatch):
  import nbformat
  from nbclient import NotebookClient

  workdir, final = trained
  monkeypatch.setenv("BOLDJAX_WORKDIR", workdir)
  monkeypatch.setenv("BOLDJAX_COLAB_OUT", str(tmp_path))
  monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  nb = nbformat.read(REPO / "colabs" / "encoding_maps.ipynb", as_version=4)
  NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
  ).execute()
  text = "".join(
    o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
  )
  found = re.search(r"held-out R\^2: median ([-\d.]+)", text)
  assert found, text[-2000:]
  assert float(found.group(1)) == pytest.approx(final["encoding/test/r2_median"], abs=6e-4)
  assert "planted layer: Spearman" in text
  assert (tmp_path / "encoding_maps.png").stat().st_size > 20_000


def test_encoding_config_rejects_an_unknown_backbone():
  with pytest.raises(ValueError, match="backbone.*expected one of"):
    encoding_config.get_config("backbone=resnet50")
