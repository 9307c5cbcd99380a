"""Local `evaluate` metric modules; load one with `evaluate.load(ivpt.metrics.evaluate_module_path(name))`."""
