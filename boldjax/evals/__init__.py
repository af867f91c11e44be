from boldjax.evals import loss  # noqa: F401  (registers the "loss" evaluator)
