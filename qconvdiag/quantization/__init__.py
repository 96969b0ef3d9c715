"""Quantization setup: qparams and their arithmetic (qparams.py), torch's observers
(observers.py), and the paths a case is diagnosed on: as given, and production (paths.py)."""
