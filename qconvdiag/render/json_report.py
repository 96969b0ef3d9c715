"""JSON renderer: schema_version 2 (``report.schema.json``), ``allow_nan=False``, deterministic
(no timings). One conv's report has ``"kind": "conv"``, a model walk's ``"kind": "model"``."""

from __future__ import annotations

import json

from ..model_report import ModelReport
from ..report import Report


def render_json(report: Report | ModelReport) -> str:
    return json.dumps(report.to_dict(), allow_nan=False, indent=2) + "\n"
