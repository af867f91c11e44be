from boldjax.evals import (
  loss,  # noqa: F401  (registers the "loss" evaluator)
  probe_evaluator,  # noqa: F401  (registers the "probe" evaluator and the label sources)
)
