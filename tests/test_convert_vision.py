"""`python -m boldjax.convert open_clip|timm`: a published vision tower as the encoding
family's backbone.

The openclip_vit / timm_vit fixtures are written as published files (open_clip: `visual.`
prefix plus a text-tower key; timm: a classifier head), converted with the architecture
given as config.data.backbone.arch overrides read from spec.json, and the workdir's backbone
file, loaded the way training loads it, must give the fixture's block outputs, features,
pooled feature and embedding within spec.json's tolerances.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from boldjax.cli import InputError
from boldjax.convert import cli, files
from boldjax.convert.vision import BACKBONE_FILE
from boldjax.data import backbones
from boldjax.models.vit import PRESETS
from tests import parity
from tests.test_parity_vision import compare, flat_outputs, openclip_config, run, timm_config

CASES = parity.cases("openclip_vit*") + parity.cases("timm_vit*")
REPO = Path(__file__).resolve().parents[1]
CONFIG = f"{REPO / 'configs/encoding.py'}:runlocal"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
  """One synthetic stimulus set for every conversion here."""
  return tmp_path_factory.mktemp("cache")


def fixture(case: str):
  spec, sd, inputs, outputs = parity.load(case)
  clip = spec["reference"]["library"] == "open_clip"
  cfg = openclip_config(spec) if clip else timm_config(spec)
  return spec, dict(sd), inputs, outputs, cfg, ("open_clip" if clip else "timm")


def arch_flags(cfg) -> list[str]:
  """The ViTConfig as overrides of the runlocal config's preset."""
  base = PRESETS["tiny"]
  out = []
  for f in dataclasses.fields(cfg):
    value = getattr(cfg, f.name)
    if f.name != "name" and value != getattr(base, f.name):
      out.append(f"--config.data.backbone.arch.{f.name}={0 if value is None else value}")
  return out


def published(sd: dict, family: str, width: int) -> dict:
  """What a downloaded file holds around the tower."""
  sd = dict(sd)
  if family == "open_clip":
    sd = {f"visual.{k}": v for k, v in sd.items()}
    sd["logit_scale"] = np.array(4.6, np.float32)
    sd["text_projection"] = np.ones((8, 8), np.float32)
  else:
    sd["head.weight"] = np.ones((10, width), np.float32)
    sd["head.bias"] = np.zeros(10, np.float32)
  return sd


@pytest.mark.parametrize("case", CASES)
def test_vision_tower_converts_into_the_encoding_backbone(tmp_path, cache_dir, case):
  from boldjax import checkpoint

  spec, sd, inputs, outputs, cfg, family = fixture(case)
  path = tmp_path / "published.safetensors"
  files.write_safetensors(str(path), published(sd, family, cfg.width))
  workdir = tmp_path / "w"
  argv = [family, str(path), f"--config={CONFIG}", f"--workdir={workdir}",
          f"--config.data.cache_dir={cache_dir}", *arch_flags(cfg)]  # fmt: skip
  assert cli.main(argv) == 0

  config = checkpoint.load_config(str(workdir))
  assert config.data.backbone.weights == str(workdir / BACKBONE_FILE)
  marker = json.loads((workdir / cli.MARKER).read_text())
  notes = " | ".join(marker["notes"])
  if family == "open_clip":
    assert "took the visual tower" in notes and "text tower" in notes
  else:
    assert "dropped the timm classifier head (head.weight (10," in notes
  # The tower as training reads it (config.data.backbone of the workdir) = the fixture.
  backbone = backbones.load(config.data.backbone)
  assert backbone.config == dataclasses.replace(cfg, name="tiny+arch")
  images = np.ascontiguousarray(inputs["images"].transpose(0, 2, 3, 1))
  compare(flat_outputs(run(backbone.config)(backbone.params, images)), outputs, spec)
  # The file holds the tower only, torch names, nothing else.
  written = files.read_safetensors(str(workdir / BACKBONE_FILE))
  assert sorted(written) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(written[k], sd[k])


@pytest.mark.parametrize("case", CASES[:1])
def test_vision_conversion_refusals_name_the_field(tmp_path, case):
  spec, sd, _, _, cfg, family = fixture(case)
  other = "timm" if family == "open_clip" else "open_clip"
  path = tmp_path / "published.safetensors"
  files.write_safetensors(str(path), sd)
  workdir = tmp_path / "w"
  base = [str(path), f"--config={CONFIG}", f"--workdir={workdir}"]
  with pytest.raises(InputError, match=f"expected {other} weights, found a {family} state_dict"):
    cli.main([other, *base, *arch_flags(cfg)])
  # The runlocal preset (tiny) without overrides: each size the weights show is named.
  with pytest.raises(InputError, match=rf"width: config 64, checkpoint {cfg.width}.*"
                     rf"--config.data.backbone.arch.width={cfg.width}"):  # fmt: skip
    cli.main([family, *base])
  with pytest.raises(InputError, match="config.data.backbone.weights: expected it unset"):
    cli.main([family, *base, *arch_flags(cfg), "--config.data.backbone.weights=x.safetensors"])
  with pytest.raises(InputError, match=r"config.task.name: a .* checkpoint expects one of "
                     r"\['encoding'\], found 'next_patch'"):  # fmt: skip
    cli.main([family, str(path), f"--config={REPO / 'configs/gpt_small.py'}:runlocal",
              f"--workdir={workdir}"])  # fmt: skip
  # The heads the weights cannot show: a value that does not divide the width.
  with pytest.raises(InputError, match="config.data.backbone.arch: .*heads: expected a divisor"):
    cli.main(
      [family, *base, *arch_flags(cfg), f"--config.data.backbone.arch.heads={cfg.width + 1}"]
    )
  assert not workdir.exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".w.")]
