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
@pytest.mark.value_check("shuffled_labels", "untrained")
def test_decode_from_pretrained_csm(tmp_path):
  from configs import csm_gpt, decode

  train.run(csm_gpt.get_config("runlocal"), str(tmp_path / "csm"))
  config = decode.get_config(f"runlocal,init={tmp_path / 'csm'},train_subjects=2")
  config.unlock()
  config.total_steps, config.optim.lr, config.evals.test.every_steps = 40, 1e-3, 40
  config.lock()
  out = train.run(config, str(tmp_path / "decode"))
  assert out["baseline/chance_balanced_accuracy"] == pytest.approx(1 / 5)
  # Held-out subjects above chance by a margin: measured 0.414 balanced accuracy (chance
  # 0.200) after 40 steps on 2026-12-03 (AMD EPYC, 2 cores); 6 steps stay at chance.
  assert out["test/balanced_accuracy"] > 0.2 + 0.1
