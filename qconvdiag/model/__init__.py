"""Whole models: capture every quantized conv of a model with its float twin (capture.py), keep
them in one bundle file (bundle.py), rank them by their own and propagated error and diagnose
the worst (walk.py, each conv screened by screen.py)."""
