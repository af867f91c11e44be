"""Every parity fixture case is read by a test (or waits, by name, for its family's issue)."""

import importlib.util

import pytest

from tests import parity

# Case-name patterns -> the test module that checks them.
CLAIMED = {
  "boldgpt_*": "tests/test_parity_boldgpt.py",
  "lfb_*": "tests/test_parity_lfb.py",
  "semantoks*": "tests/test_parity_semantoks.py",
}
# Cases of families not built yet: the issue that adds the family adds its parity test.
PENDING = {
  "bddn_encoding": "issue 17 (encoding models)",
  "openclip_vit": "issue 17 (ViT backbones)",
  "timm_vit": "issue 17 (ViT backbones)",
  "sd_vae": "issue 18 (KL-VAE)",
  "fmri2img_basic_ae": "issue 18 (fmri2img encoder)",
  "cortexmae": "issue 20 (video MAE)",
}


def _case_folders() -> list[str]:
  if not parity.PARITY_DIR.is_dir():
    parity.absent(f"no parity fixtures folder {parity.PARITY_DIR}")
  return sorted(p.name for p in parity.PARITY_DIR.iterdir() if (p / "spec.json").exists())


def test_every_fixture_case_is_read_by_a_test():
  from fnmatch import fnmatch

  unread = [
    case for case in _case_folders()
    if not any(fnmatch(case, pattern) for pattern in CLAIMED) and case not in PENDING
  ]  # fmt: skip
  assert not unread, (
    f"parity cases under {parity.PARITY_DIR} that no test reads: {unread}; add a "
    "tests/test_parity_*.py for them (or list them in PENDING with their issue)"
  )
  for pattern in CLAIMED:
    assert parity.cases(pattern) != [parity.MISSING], f"no {pattern} case in {parity.PARITY_DIR}"


def test_torch_is_installed_where_parity_is_required():
  if importlib.util.find_spec("torch") is None:
    if parity.REQUIRED:
      pytest.fail("torch is missing: the torch-reference tests need the test extra's torch")
    pytest.skip("torch not installed (pip install -e '.[test]')")
