"""Reports of every sample on engine fbgemm, for the golden files.

Run with the ISA forced to AVX2 (FBGEMM_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2) so
the numbers do not depend on the CPU: ``python -m tests.golden_reports [--write]``.
"""

from __future__ import annotations

import json
import sys

from qconvdiag import Options, diagnose
from qconvdiag.io import FORMATS, load_case
from tests.repo import ROOT

GOLDEN = ROOT / "tests" / "golden"
#: Fields that describe the machine or the versions, not the case.
MACHINE_FIELDS = ("cpu", "torch_warnings", "qconvdiag_version", "torch_version")


def reports() -> dict[str, dict]:
    out = {}
    for sample in sorted((ROOT / "samples").iterdir()):
        if sample.suffix not in FORMATS:
            continue
        data = diagnose(load_case(sample), Options(engine="fbgemm")).to_dict()
        for key in MACHINE_FIELDS:
            data.pop(key, None)
        data["case"]["source"] = sample.name
        out[sample.name] = data
    return out


if __name__ == "__main__":
    result = reports()
    if "--write" in sys.argv:
        for name, data in result.items():
            (GOLDEN / f"{name}.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    print(json.dumps(result, allow_nan=False))
