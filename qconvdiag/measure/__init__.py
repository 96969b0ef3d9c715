"""Measurement: the stage ladder (ladder_plan.py, stages.py, blocks.py, reference.py), error
metrics (metrics.py), the error budget (budget.py), what the findings read (evidence.py) and the
engines side by side (compare.py)."""
