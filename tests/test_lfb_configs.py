"""Each learning-from-brains config trains through the one loop; decode grafts a checkpoint."""

import importlib

import numpy as np
import pytest

from boldjax import train


@pytest.mark.slow
@pytest.mark.parametrize("name", ["csm_gpt", "seq_bert", "net_bert", "autoencoder"])
def test_pretraining_config_trains(name, tmp_path):
  config = importlib.import_module(f"configs.{name}").get_config("runlocal")
  out = train.run(config, str(tmp_path))
  assert np.isfinite(out["val/loss"]) and out["val/loss"] > 0


@pytest.mark.slow
def test_decode_from_pretrained_csm(tmp_path):
  from configs import csm_gpt, decode

  train.run(csm_gpt.get_config("runlocal"), str(tmp_path / "csm"))
  config = decode.get_config(f"runlocal,init={tmp_path / 'csm'},train_subjects=2")
  out = train.run(config, str(tmp_path / "decode"))
  assert 0.0 <= out["test/accuracy"] <= 1.0
  assert 0.0 <= out["test/balanced_accuracy"] <= 1.0
  assert out["baseline/chance_balanced_accuracy"] == pytest.approx(1 / 5)
