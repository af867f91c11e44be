"""Evaluation in three layers: where features come from (labels, examples, features), what
is fitted on them (heads, probes, baselines), and the benchmark that runs the protocols and
prints the table (probe_evaluator; the `python -m boldjax.evaluate` command and the periodic
"probe" evaluator). Notebooks call the same functions.
"""

# Imported for their registrations: label sources, example builders, evaluators.
from boldjax.evals import (  # noqa: F401
  encoding,
  examples,
  labels,
  loss,
  probe_evaluator,
  reconstruction,
)
