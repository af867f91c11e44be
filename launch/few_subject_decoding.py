"""Pretrained vs from-scratch decoding with few training subjects (the original's Fig. 5).

  python -m launch.few_subject_decoding --out=runs/fig5 --synthetic=coupling --subjects=1,2

1. pretrains one CSM GPT run (configs/csm_gpt.py) on every training subject, or reuses
   --pretrained=WORKDIR (a finished run on the same synthetic data);
2. for each number of training subjects n and each seed, trains configs/decode.py twice with
   the same steps, seed and subject draw (data.split_seed = seed): from scratch and
   initialised from the pretrained run;
3. prints a markdown table of held-out-subject balanced accuracy (mean +- sd over seeds, with
   chance) at every evaluation step, and writes results.json + fig5.png under --out;
4. with --probe (default), also probes the frozen pretrained features on n training subjects
   (`boldjax.evaluate --train_subjects=n`, logistic) next to the same model at random init
   and the raw windows: whether pretraining made the states easier to read before any
   fine-tuning. Its subject splits are evaluate's (20 % test, 20 % val), not decode's.

Every run is an ordinary workdir (re-running resumes/reuses finished runs). --set applies
config overrides to every run (e.g. --set=data.synthetic.noise_scale=1.0), so pretraining and
decoding always see the same synthetic data; --decode_set only to the decoding runs (e.g.
--decode_set=optim.lr=1e-3 --decode_set=model.decode_pooling=mean).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from absl import flags

from boldjax import cli
from launch.few_subject_report import (
  count_classes,
  held_out_curve,
  plot,
  probe_table,
  summarise,
)

_OUT = flags.DEFINE_string("out", "runs/fig5", "Directory of every run and the results.")
_PRETRAINED = flags.DEFINE_string("pretrained", None, "Existing CSM workdir (skips pretraining).")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", 1000, "CSM pretraining steps.")
_SUBJECTS = flags.DEFINE_list("subjects", ["1", "2", "4"], "Numbers of training subjects.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (init, data order, subject draw).")
_STEPS = flags.DEFINE_integer("steps", 300, "Decoding steps, the same for both arms.")
_EVERY = flags.DEFINE_integer("eval_every", 50, "Held-out evaluation interval.")
_SPLIT = flags.DEFINE_string("split", "test", "Held-out split to report.")
_SYNTHETIC = flags.DEFINE_string(
  "synthetic", "activation", "Synthetic regime of every run (boldjax/parcellated_config.py)."
)
_SET = flags.DEFINE_multi_string("set", [], "key=value config overrides for every run.")
_DECODE_SET = flags.DEFINE_multi_string(
  "decode_set", [], "key=value overrides for the decoding runs only (e.g. optim.lr=1e-3)."
)
_PROBE = flags.DEFINE_bool(
  "probe", True, "Also probe the frozen pretrained features on n training subjects."
)
_ARMS = flags.DEFINE_list("arms", ["scratch", "pretrained"], "Arms to run (scratch first).")

# arm -> decode.py arguments; the first arm is the reference the others are compared with.
ARMS = {
  "scratch": "",
  "pretrained": "init={pretrained},",
  "pretrained_frozen": "init={pretrained},freeze=True,",
}


def _train(config: str, workdir: str, overrides: list[str]) -> None:
  if os.path.exists(os.path.join(workdir, "done.json")):
    print(f"[reuse] {workdir}", flush=True)
    return
  cmd = [sys.executable, "-m", "boldjax.main", f"--config={config}", f"--workdir={workdir}"]
  cmd += [f"--config.{kv}" for kv in overrides]
  print(f"[run] {' '.join(cmd[2:])}", flush=True)
  _run(cmd, os.path.join(os.path.dirname(workdir) or ".", os.path.basename(workdir) + ".log"))
  with open(os.path.join(workdir, "done.json"), "w") as f:
    json.dump({"cmd": cmd}, f)


def _run(cmd: list[str], log_path: str) -> None:
  """Run a child command into its log; a child's refusal of its input is ours (exit 2)."""
  with open(log_path, "w") as log:
    code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
  if code == cli.EXIT_BAD_INPUT:
    with open(log_path) as log:
      reason = [line for line in log.read().splitlines() if ": error: " in line][-1:]
    raise cli.InputError(f"{' '.join(cmd[2:])}: {' '.join(reason) or 'bad input'} (log {log_path})")
  if code:
    raise RuntimeError(f"{' '.join(cmd[2:])} failed with exit status {code}; see {log_path}")


def check_flags() -> None:
  """Everything a child run would refuse, refused before any folder is made."""
  from boldjax.parcellated_config import SYNTHETIC_REGIMES

  unknown = [a for a in _ARMS.value if a not in ARMS]
  if unknown:
    raise cli.InputError(f"--arms: expected names from {sorted(ARMS)}, found {unknown}")
  if _SYNTHETIC.value not in SYNTHETIC_REGIMES:
    raise cli.InputError(
      f"--synthetic: expected one of {sorted(SYNTHETIC_REGIMES)}, found {_SYNTHETIC.value!r}"
    )
  for name, values in (("--subjects", _SUBJECTS.value), ("--seeds", _SEEDS.value)):
    bad = [v for v in values if not v.isdigit()]
    if bad or not values:
      raise cli.InputError(f"{name}: expected non-negative integers, found {values}")
  pretrained = _PRETRAINED.value
  if pretrained is not None and not os.path.exists(os.path.join(pretrained, "config.json")):
    raise cli.InputError(
      f"{pretrained}/config.json: --pretrained: expected a boldjax workdir, found no config.json"
    )


def _probe(pretrained: str, n: str, out: str) -> dict:
  """boldjax.evaluate's few-subject logistic probe of the pretrained run (reused when the file
  holds the same subjects, seeds and repeats)."""
  path = os.path.join(out, f"probe_n{n}.json")
  want = {"train_subjects": int(n), "seed": int(_SEEDS.value[0]), "repeats": len(_SEEDS.value)}
  if os.path.exists(path):
    with open(path) as f:
      done = json.load(f)
    if {k: done["settings"].get(k) for k in want} == want:
      return done
  cmd = [
    sys.executable, "-m", "boldjax.evaluate", f"--workdir={pretrained}",
    f"--train_subjects={n}", "--protocol=logistic", "--baselines=random_init,identity",
    f"--repeats={want['repeats']}", f"--seed={want['seed']}", f"--out={path}",
  ]  # fmt: skip
  print(f"[probe] {' '.join(cmd[2:])}", flush=True)
  _run(cmd, os.path.join(out, f"probe_n{n}.log"))
  with open(path) as f:
    return json.load(f)


def main(argv) -> None:
  del argv
  check_flags()
  out = _OUT.value
  os.makedirs(out, exist_ok=True)
  arms = list(_ARMS.value)
  pretrained = _PRETRAINED.value
  if pretrained is None:
    pretrained = os.path.join(out, "pretrain_csm")
    config = f"configs/csm_gpt.py:synthetic={_SYNTHETIC.value}"
    _train(config, pretrained, [f"total_steps={_PRETRAIN_STEPS.value}", *_SET.value])

  results: dict[str, dict[str, list[dict[int, float]]]] = {}
  for n in _SUBJECTS.value:
    results[n] = {arm: [] for arm in arms}
    for seed in _SEEDS.value:
      for arm in arms:
        workdir = os.path.join(out, f"decode_n{n}_seed{seed}_{arm}")
        overrides = [
          f"seed={seed}",
          f"data.split_seed={seed}",
          f"total_steps={_STEPS.value}",
          f"evals.test.every_steps={_EVERY.value}",
          f"evals.test.split={_SPLIT.value}",
          *_SET.value,
          *_DECODE_SET.value,
        ]
        args = ARMS[arm].format(pretrained=pretrained)
        config = f"configs/decode.py:{args}train_subjects={n},synthetic={_SYNTHETIC.value}"
        _train(config, workdir, overrides)
        results[n][arm].append(held_out_curve(workdir, _SPLIT.value))

  curves = [c for r in results.values() for a in arms for c in r[a]]
  steps = sorted(set.intersection(*(set(c) for c in curves)))
  first = os.path.join(out, f"decode_n{_SUBJECTS.value[0]}_seed{_SEEDS.value[0]}_{arms[0]}")
  chance = 1.0 / count_classes(first)
  table = summarise(results, arms, steps, chance)
  print(table)
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump({"chance": chance, "steps": steps, "arms": arms, "curves": results}, f, indent=1)
  plot(results, arms, steps, chance, os.path.join(out, "fig5.png"))
  print(f"wrote {out}/results.json and {out}/fig5.png")
  if _PROBE.value:
    print()
    print(probe_table({n: _probe(pretrained, n, out) for n in _SUBJECTS.value}))


if __name__ == "__main__":
  cli.run_absl("python -m launch.few_subject_decoding", main)
