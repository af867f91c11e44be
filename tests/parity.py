"""Parity fixtures: where they live, which cases exist, and the one comparison every test uses.

Fixtures are outputs of the original PyTorch implementations (../shared/parity, or the
folder BOLDJAX_PARITY_DIR names). A user without them gets skips that say so; CI (CI=true)
or BOLDJAX_REQUIRE_PARITY=1 turns a missing folder or case into a failure, so parity can
never pass by vanishing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
PARITY_DIR = Path(os.environ.get("BOLDJAX_PARITY_DIR", REPO.parent / "shared" / "parity"))
REQUIRED = (
  os.environ.get("BOLDJAX_REQUIRE_PARITY", "") not in ("", "0")
  or os.environ.get("CI", "").lower() == "true"
)
MISSING = "missing-fixtures"  # the one parameter of a test whose fixtures are absent


def absent(reason: str) -> None:
  """Skip (a user without the fixtures) or fail (CI / BOLDJAX_REQUIRE_PARITY=1)."""
  if REQUIRED:
    pytest.fail(f"{reason} (parity is required under CI=true or BOLDJAX_REQUIRE_PARITY=1)")
  pytest.skip(f"{reason} (set BOLDJAX_PARITY_DIR)")


def cases(pattern: str) -> list[str]:
  """Case folders matching `pattern` that hold a spec.json; [MISSING] when there are none."""
  found = sorted(p.name for p in PARITY_DIR.glob(pattern) if (p / "spec.json").exists())
  return found or [MISSING]


def folder(case: str) -> Path:
  if case == MISSING or not (PARITY_DIR / case / "spec.json").exists():
    absent(f"no parity fixture {PARITY_DIR / case if case != MISSING else PARITY_DIR}")
  return PARITY_DIR / case


def load(case: str) -> tuple[dict, dict, dict, dict]:
  """(spec, state_dict, inputs, outputs) of a case."""
  where = folder(case)
  spec = json.loads((where / "spec.json").read_text())
  arrays = [dict(np.load(where / f"{name}.npz")) for name in ("state_dict", "inputs", "outputs")]
  return (spec, *arrays)


def tolerance(spec: dict, name: str) -> dict:
  """spec['tolerances'][name], or the entry whose 'prefix/' starts the name."""
  tols = spec["tolerances"]
  if name in tols:
    return tols[name]
  prefixes = sorted((k for k in tols if k.endswith("/") and name.startswith(k)), key=len)
  assert prefixes, f"no tolerance for output {name!r} in spec.json"
  return tols[prefixes[-1]]


def worst_ratio(name: str, actual: Any, expected: Any, tol: dict) -> float:
  """max |a - e| / (atol + rtol |e|) after checking shapes, finiteness and exact outputs.

  NaN or Inf anywhere in `actual` fails (unless the reference has the same non-finite
  value at the same place), so a broken model can never compare as 'within tolerance'.
  """
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
  if actual.dtype.kind in "fc" or expected.dtype.kind in "fc":
    a64, e64 = actual.astype(np.float64), expected.astype(np.float64)
    same = (a64 == e64) | (np.isnan(a64) & np.isnan(e64))
    bad = (~np.isfinite(a64) | ~np.isfinite(e64)) & ~same
    if bad.any():
      where = tuple(int(i) for i in np.argwhere(bad)[0])
      raise AssertionError(
        f"{name}: {int(bad.sum())} non-finite value(s) that differ, first at {where}: got "
        f"{a64[where]}, expected {e64[where]}"
      )
  if tol.get("exact") or (tol.get("atol") == 0.0 and tol.get("rtol", 0.0) == 0.0):
    mismatch = int(np.sum(actual != expected))
    assert mismatch == 0, f"{name}: {mismatch} of {actual.size} entries differ (exact expected)"
    return 0.0
  a64, e64 = actual.astype(np.float64), expected.astype(np.float64)
  err = np.abs(a64 - e64)
  allowed = tol.get("atol", 0.0) + tol.get("rtol", 0.0) * np.abs(e64)
  with np.errstate(divide="ignore", invalid="ignore"):
    ratio = np.where(err == 0, 0.0, err / allowed)
  ratio = np.where(np.isfinite(e64) & np.isfinite(a64), ratio, 0.0)  # equal non-finite
  return float(np.max(ratio)) if ratio.size else 0.0


def check(name: str, actual: Any, expected: Any, tol: dict) -> float:
  """worst_ratio <= 1, or fail naming the output, the worst err/tol and where it is."""
  ratio = worst_ratio(name, actual, expected, tol)
  if ratio > 1.0:
    a64 = np.asarray(actual, np.float64)
    e64 = np.asarray(expected, np.float64)
    allowed = tol.get("atol", 0.0) + tol.get("rtol", 0.0) * np.abs(e64)
    with np.errstate(divide="ignore", invalid="ignore"):
      r = np.abs(a64 - e64) / allowed
    where = np.unravel_index(int(np.nanargmax(r)), r.shape) if r.ndim else ()
    where = tuple(int(i) for i in where)
    raise AssertionError(
      f"{name}: worst err/tol {ratio:.3g} at {where}: got {a64[where]!r}, expected "
      f"{e64[where]!r} (atol {tol.get('atol', 0.0)}, rtol {tol.get('rtol', 0.0)})"
    )
  return ratio


def check_all(actual: dict[str, Any], outputs: dict[str, Any], spec: dict) -> dict[str, float]:
  """Every output the test computed, against the fixture; returns name -> worst err/tol."""
  ratios = {name: check(name, value, outputs[name], tolerance(spec, name))
            for name, value in actual.items()}  # fmt: skip
  worst = max(ratios, key=ratios.get) if ratios else None
  if worst is not None:
    print(f"parity: {len(ratios)} outputs, worst err/tol {ratios[worst]:.3g} ({worst})")
  return ratios


def compare_outputs(case: str, spec: dict, actual: dict, outputs: dict) -> None:
  """Every fixture output against boldjax's, all failures listed (NaN/Inf failing); prints
  the worst err/tol."""
  missing = sorted(set(outputs) - set(actual))
  assert not missing, f"{case}: no boldjax value for fixture outputs {missing}"
  failures, ratios = [], {}
  for k in outputs:
    try:
      ratios[k] = check(f"{case}/{k}", actual[k], outputs[k], tolerance(spec, k))
    except AssertionError as e:
      failures.append(str(e)[:400])
  assert not failures, "\n".join(failures)
  worst = max(ratios, key=ratios.get)
  print(f"{case}: {len(ratios)} outputs, worst err/tol {ratios[worst]:.3g} ({worst})")


def torch():
  """The torch module for the torch-reference tests; missing torch fails where required."""
  try:
    import torch as torch_module
  except ImportError:
    absent("torch is not installed (the test extra installs torch==2.13.0)")
  return torch_module


def assert_nan_fails(
  compare: Callable[[dict, dict], Any],
  actual: dict,
  outputs: dict,
  names: Iterable[str],
  broken_value: float = np.nan,
) -> None:
  """compare(actual, outputs) fails on a NaN in each float output named (fixture side) and
  on `broken_value` in boldjax's value of it: a broken model never passes parity."""
  for name in names:
    kinds = {np.asarray(outputs[name]).dtype.kind, np.asarray(actual[name]).dtype.kind}
    if "f" not in kinds:
      continue
    poisoned = {**outputs, name: np.asarray(outputs[name], np.float64).copy()}
    poisoned[name].reshape(-1)[-1] = np.nan
    with pytest.raises(AssertionError, match="non-finite"):
      compare(actual, poisoned)
    broken = {**actual, name: np.asarray(actual[name], np.float64).copy()}
    broken[name].reshape(-1)[0] = broken_value
    with pytest.raises(AssertionError, match="non-finite"):
      compare(broken, outputs)
