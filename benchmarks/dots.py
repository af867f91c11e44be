"""The matmul floor of a train step: every dot of the compiled step, timed alone.

A step cannot run faster than its matmuls. This reads every dot XLA runs in a family's
compiled train step (inside fusions too), times each shape alone through jax (XLA:CPU's
kernels, the flags boldjax sets) and through torch at the same shapes, and sums them. Set
against issue #6's targets (1.2x torch's step; 75% of the matmul ceiling), the floor says
whether tuning the rest of the step (norms, softmax, GELU, copies, the optimizer) can reach a
target at all: if the matmuls alone take longer than the target step, it cannot.

  python -m benchmarks.dots --family=patch_gpt          # floor, targets, slowest shapes
  python -m benchmarks.dots --family=all --json

Dots under a conditional (DINO's masked-token head chunks) are reported apart and left out
of the floor, which therefore stays a lower bound; dots inside a while loop would run more
than once, so a step that has any is refused.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any

import jax
import numpy as np

from benchmarks import flops as flops_lib
from benchmarks import run

# HLO element types -> numpy / torch dtype names.
DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "f64": "float64"}

# `%name = f32[2,3]{1,0} op(` (operands may carry their shapes inline).
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\w+)\[([\d,]*)\]\S*\s+([\w\-]+)\(")
_OPERAND = re.compile(r"(?:\w+\[[\d,]*\]\S*\s+)?%?([\w.\-]+)")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->\s*.*\{\s*$")
_CALLEES = re.compile(
  r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


@dataclasses.dataclass(frozen=True)
class Dot:
  """One dot_general's operand shapes and dimension numbers (XLA's output order)."""

  dtype: str
  lhs: tuple[int, ...]
  rhs: tuple[int, ...]
  lhs_batch: tuple[int, ...]
  lhs_contracting: tuple[int, ...]
  rhs_batch: tuple[int, ...]
  rhs_contracting: tuple[int, ...]

  @property
  def flops(self) -> float:
    contract = math.prod(self.lhs[d] for d in self.lhs_contracting)
    out = (
      math.prod(self.lhs)
      // contract
      * math.prod(
        self.rhs[d] for d in range(len(self.rhs)) if d not in self.rhs_batch + self.rhs_contracting
      )
    )
    return 2.0 * out * contract

  def einsum(self) -> str:
    """The einsum equation of this dot, output in XLA's order (batch, lhs free, rhs free)."""
    letters = iter("abcdefghijklmnopqrstuvwxyz")
    lhs = [next(letters) for _ in self.lhs]
    rhs = [""] * len(self.rhs)
    for lb, rb in zip(self.lhs_batch, self.rhs_batch, strict=True):
      rhs[rb] = lhs[lb]
    for lc, rc in zip(self.lhs_contracting, self.rhs_contracting, strict=True):
      rhs[rc] = lhs[lc]
    rhs = [r or next(letters) for r in rhs]
    shared = set(self.lhs_batch) | set(self.lhs_contracting)
    out = [lhs[d] for d in self.lhs_batch]
    out += [lhs[d] for d in range(len(lhs)) if d not in shared]
    out += [rhs[d] for d in range(len(rhs)) if d not in self.rhs_batch + self.rhs_contracting]
    return f"{''.join(lhs)},{''.join(rhs)}->{''.join(out)}"


@dataclasses.dataclass(frozen=True)
class StepDots:
  dots: list[Dot]  # every dot the step runs once (fusions included), with repeats
  conditional: list[Dot]  # dots under a conditional: may or may not run


def _dims(attrs: str, name: str) -> tuple[int, ...]:
  m = re.search(name + r"=\{([\d,]*)\}", attrs)
  return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()


def _reachable(roots: set[str], callees: dict[str, set[str]]) -> set[str]:
  """The computations `roots` run, directly or through the computations they call."""
  seen, todo = set(), list(roots)
  while todo:
    c = todo.pop()
    if c not in seen:
      seen.add(c)
      todo.extend(callees.get(c, ()))
  return seen


def parse_dots(hlo_text: str) -> StepDots:
  """Every dot of a compiled module's HLO text, split by whether a conditional guards it."""
  shapes: dict[str, tuple[str, tuple[int, ...]]] = {}
  found: list[tuple[str, str, str, str, str]] = []  # computation, dtype, lhs, rhs, attrs
  callees: dict[str, set[str]] = collections.defaultdict(set)
  conditional_roots: set[str] = set()
  loop_roots: set[str] = set()
  computation = ""
  for line in hlo_text.splitlines():
    head = _COMPUTATION.match(line)
    if head and "=" not in line.split("(")[0]:
      computation = head.group(1)
      continue
    # Calls, loops and conditionals may have tuple shapes, which _INSTRUCTION skips.
    callees[computation].update(_CALLEES.findall(line))
    if re.search(r"=.*\swhile\(", line):
      loop_roots.update(re.findall(r"(?:body|condition)=%?([\w.\-]+)", line))
    for group in _BRANCHES.findall(line):
      conditional_roots.update(b.strip().lstrip("%") for b in group.split(",") if b.strip())
    conditional_roots.update(re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", line))
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, dtype, dims, op = m.groups()
    shapes[name] = (dtype, tuple(int(d) for d in dims.split(",") if d))
    if op == "dot":
      args = line[m.end() :]
      operands = _OPERAND.findall(args.split(")")[0])
      found.append((computation, dtype, operands[0], operands[1], args))
  guarded, in_loop = _reachable(conditional_roots, callees), _reachable(loop_roots, callees)
  looped = sum(comp in in_loop for comp, *_ in found)
  if looped:
    raise ValueError(
      f"benchmarks.dots: {looped} dot(s) of the step sit in a while loop; they run a number "
      "of times the HLO text does not say, so no floor is computed"
    )
  dots, conditional = [], []
  for comp, dtype, lhs, rhs, attrs in found:
    dot = Dot(
      dtype=dtype,
      lhs=shapes[lhs][1],
      rhs=shapes[rhs][1],
      lhs_batch=_dims(attrs, "lhs_batch_dims"),
      lhs_contracting=_dims(attrs, "lhs_contracting_dims"),
      rhs_batch=_dims(attrs, "rhs_batch_dims"),
      rhs_contracting=_dims(attrs, "rhs_contracting_dims"),
    )
    (conditional if comp in guarded else dots).append(dot)
  return StepDots(dots, conditional)


def _best_seconds(call, repeats: int, min_s: float = 0.02) -> float:
  """Fastest of `repeats` timings (a floor: noise only adds); each times enough
  back-to-back calls to last min_s."""
  call()
  t0 = time.perf_counter()
  call()
  n = max(1, int(min_s / max(time.perf_counter() - t0, 1e-6)))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(n):
      call()
    times.append((time.perf_counter() - t0) / n)
  return float(min(times))


def time_jax(dot: Dot, repeats: int = 7) -> float:
  """Seconds of this dot alone through XLA (jitted, result awaited)."""
  rng = np.random.default_rng(0)
  lhs = jax.numpy.asarray(rng.standard_normal(dot.lhs), DTYPES[dot.dtype])
  rhs = jax.numpy.asarray(rng.standard_normal(dot.rhs), DTYPES[dot.dtype])
  numbers = ((dot.lhs_contracting, dot.rhs_contracting), (dot.lhs_batch, dot.rhs_batch))
  f = jax.jit(lambda a, b: jax.lax.dot_general(a, b, numbers))
  return _best_seconds(lambda: f(lhs, rhs).block_until_ready(), repeats)


def time_torch(dot: Dot, repeats: int = 7) -> float:
  """Seconds of the same contraction through torch.einsum (what torch's Linear / bmm run)."""
  import torch

  dtype = getattr(torch, DTYPES[dot.dtype])
  lhs, rhs = torch.randn(dot.lhs, dtype=dtype), torch.randn(dot.rhs, dtype=dtype)
  equation = dot.einsum()
  with torch.no_grad():
    return _best_seconds(lambda: torch.einsum(equation, lhs, rhs), repeats)


def floor(family: str, side: run.JaxSide, repeats: int = 7) -> dict[str, Any]:
  """The family's step dots (side: run.build_jax's) timed alone: sums, FLOPs, slowest shapes."""
  hlo = side.step.lower(side.state, side.batch).compile().as_text()
  step = parse_dots(hlo)
  counts = collections.Counter(step.dots)
  cond_counts = collections.Counter(step.conditional)
  rows = []
  for dot in sorted(set(counts) | set(cond_counts), key=lambda d: -d.flops):
    t_jax = time_jax(dot, repeats)
    t_torch = time_torch(dot, repeats)
    rows.append(
      dict(
        einsum=dot.einsum(),
        lhs=dot.lhs,
        rhs=dot.rhs,
        count=counts[dot],
        count_conditional=cond_counts[dot],
        gflop=dot.flops / 1e9,
        ms_jax=1e3 * t_jax,
        ms_torch=1e3 * t_torch,
      )
    )
  _, analytic = run.shapes_and_flops(family, side)
  return {
    "family": family,
    "dots": len(step.dots),
    "dots_conditional": len(step.conditional),
    "distinct_shapes": len(rows),
    "dot_gflop": sum(r["gflop"] * r["count"] for r in rows),
    "dot_gflop_conditional": sum(r["gflop"] * r["count_conditional"] for r in rows),
    "analytic_train_step_gflop": analytic.train_step / 1e9,
    "floor_s_jax": sum(r["ms_jax"] * r["count"] for r in rows) / 1e3,
    "floor_s_torch": sum(r["ms_torch"] * r["count"] for r in rows) / 1e3,
    "conditional_s_jax": sum(r["ms_jax"] * r["count_conditional"] for r in rows) / 1e3,
    "shapes": rows,
  }


def against_targets(result: dict, step: dict, ceiling_gflops: float) -> dict[str, float]:
  """The step time each issue-#6 target needs, and the floor's share of it."""
  ratio_target_s = step["step_s_torch"] / 1.2
  ceiling_target_s = step["train_step_gflop"] / (0.75 * ceiling_gflops)
  return {
    "step_s_boldjax": step["step_s_boldjax"],
    "step_s_torch": step["step_s_torch"],
    "target_step_s_1p2x_torch": ratio_target_s,
    "target_step_s_75pct_ceiling": ceiling_target_s,
    "floor_over_1p2x_target": result["floor_s_jax"] / ratio_target_s,
    "floor_over_75pct_target": result["floor_s_jax"] / ceiling_target_s,
    "rest_of_step_s_boldjax": step["step_s_boldjax"] - result["floor_s_jax"],
  }


def format_report(result: dict, top: int = 12) -> str:
  r = result
  lines = [
    f"## {r['family']}: {r['dots']} dots ({r['distinct_shapes']} shapes), "
    f"{r['dot_gflop']:.2f} GFLOP (flops.py counts {r['analytic_train_step_gflop']:.2f} per step)",
    f"matmul floor: boldjax/XLA {1e3 * r['floor_s_jax']:.1f} ms, "
    f"torch {1e3 * r['floor_s_torch']:.1f} ms"
    + (
      f"; under conditionals (not in the floor): {r['dots_conditional']} dots, "
      f"{r['dot_gflop_conditional']:.2f} GFLOP, {1e3 * r['conditional_s_jax']:.1f} ms"
      if r["dots_conditional"]
      else ""
    ),
  ]
  if "targets" in r:
    t = r["targets"]
    lines.append(
      f"step: boldjax {1e3 * t['step_s_boldjax']:.1f} ms (of which not matmul "
      f"{1e3 * t['rest_of_step_s_boldjax']:.1f} ms), torch {1e3 * t['step_s_torch']:.1f} ms; "
      f"1.2x torch needs <= {1e3 * t['target_step_s_1p2x_torch']:.1f} ms "
      f"(floor = {100 * t['floor_over_1p2x_target']:.0f}% of it); 75% of the ceiling needs "
      f"<= {1e3 * t['target_step_s_75pct_ceiling']:.1f} ms "
      f"(floor = {100 * t['floor_over_75pct_target']:.0f}%)"
    )
  lines += [
    "",
    "| einsum | lhs | rhs | count | GFLOP each | ms jax | ms torch | GFLOP/s jax | GFLOP/s torch |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  by_time = sorted(r["shapes"], key=lambda s: -s["ms_jax"] * (s["count"] + s["count_conditional"]))
  for s in by_time[:top]:
    lines.append(
      f"| {s['einsum']} | {s['lhs']} | {s['rhs']} | {s['count']}"
      + (f" (+{s['count_conditional']} cond.)" if s["count_conditional"] else "")
      + f" | {s['gflop']:.3f} | {s['ms_jax']:.2f} | {s['ms_torch']:.2f} | "
      f"{s['gflop'] / s['ms_jax'] * 1e3:.0f} | {s['gflop'] / s['ms_torch'] * 1e3:.0f} |"
    )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
  from boldjax import xla_flags

  xla_flags.apply_defaults()  # before the first jax computation, as every entry point
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--family", default="all", choices=(*run.FAMILIES, "all"))
  p.add_argument("--json", action="store_true", help="print one JSON document")
  p.add_argument("--repeats", type=int, default=7, help="timings per shape (the fastest counts)")
  p.add_argument("--no-steps", action="store_true", help="skip timing the steps themselves")
  p.add_argument("--no-wait", action="store_true", help="time even if the machine is busy")
  args = p.parse_args(argv)

  import torch

  torch.set_num_threads(len(os.sched_getaffinity(0)) or 1)
  families = run.FAMILIES if args.family == "all" else (args.family,)
  if not args.no_wait:
    run.wait_for_idle()
  ceiling = flops_lib.matmul_ceiling()
  results = []
  for fam in families:
    # With --json, stdout carries the JSON only: progress (dataset builds) goes to stderr.
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
      side = run.build_jax(run.load_config(fam))
      try:
        result = floor(fam, side, args.repeats)
      except ValueError as e:  # a step whose dots run in a loop (the LSTM autoencoder)
        results.append({"family": fam, "error": str(e)})
        print(f"## {fam}: no floor: {e}", file=sys.stderr if args.json else sys.stdout)
        continue
      if not args.no_steps:
        step = run.bench_family(fam, repeats=5, steps_per_repeat=3, warmup=2, side=side)
        result["targets"] = against_targets(result, step, ceiling)
    result["matmul_ceiling_gflops"] = ceiling
    results.append(result)
    if not args.json:
      print(format_report(result), flush=True)
      print()
  if args.json:
    print(json.dumps(results, indent=1))
  else:
    print(f"f32 matmul ceiling (jnp.dot 2048^3): {ceiling:.1f} GFLOP/s")
  return results


if __name__ == "__main__":
  main()
