"""Measurement: the stage ladder (stages.py, blocks.py, reference.py), error metrics
(metrics.py), the error budget (budget.py), what the findings read (evidence.py) and the
engines side by side (compare.py)."""
