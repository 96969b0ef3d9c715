"""JSON renderer: schema_version 1, ``allow_nan=False``, deterministic (no timings)."""

from __future__ import annotations

import json

from ..report import Report


def render_json(report: Report) -> str:
    return json.dumps(report.to_dict(), allow_nan=False, indent=2) + "\n"
