"""Run N random cases per engine through the emulator and torch; print one JSON summary.

Used in-process by test_emulate.py and in a subprocess with the ISA forced down (so the
int16-saturating kernels of pre-VNNI CPUs are exercised on any CPU).
"""

from __future__ import annotations

import json
import sys

import numpy as np

from qconvdiag.arithmetic.emulate import emulate
from qconvdiag.arithmetic.engines import probe, refusals, select_kernel
from qconvdiag.arithmetic.torch_ref import run_conv
from tests.cases import random_codes_case


def check(n: int, seed: int, relu: bool = False) -> dict[str, object]:
    """``relu``: every conv with a fused ReLU (torch's conv{d}d_relu, ConvReLU modules)."""
    rng = np.random.default_rng(seed)
    profiles = probe()
    engines = [e for e, p in profiles.items() if p.available]
    result: dict[str, dict[str, object]] = {
        e: {"ran": 0, "refused": 0, "refusal_predicted": 0, "mismatched_cases": 0,
            "saturated_cases": 0, "failures": []} for e in engines
    }
    for i in range(n):
        case = random_codes_case(rng, i)
        for e in engines:
            kernel = select_kernel(e, case.w_qp, case.geometry.groups, case.w.shape[1],
                                   case.w.shape[0] // case.geometry.groups, case.geometry,
                                   tuple(case.w.shape[2:]))
            r = run_conv(e, case.x, case.x_qp, case.w, case.w_qp, case.bias,
                         case.out_qp.scale[0], case.out_qp.zero_point[0], case.geometry,
                         relu=relu)
            predicted = bool(refusals(kernel.kernel, case.x_qp, case.w_qp, case.w.shape[0]))
            stats = result[e]
            if not r.ran:
                stats["refused"] += 1
                stats["refusal_predicted"] += int(predicted)
                if not predicted:
                    stats["failures"].append(f"{case.label}: unexpected refusal {r.error}")
                continue
            if predicted:
                stats["failures"].append(f"{case.label}: predicted a refusal but torch ran it")
            stats["ran"] += 1
            em = emulate(kernel, case.x, case.x_qp, case.w, case.w_qp, case.bias, case.out_qp,
                         case.geometry, relu)
            stats["saturated_cases"] += int(em.saturated_pairs > 0)
            bad = int(np.count_nonzero(em.output_codes != r.output_codes))
            if bad:
                stats["mismatched_cases"] += 1
                stats["failures"].append(
                    f"{case.label} [{kernel.kernel}/{kernel.accumulation}]: {bad} of "
                    f"{r.output_codes.size} codes differ")
    return {"profiles": {e: p.to_dict() for e, p in profiles.items()}, "engines": result}


if __name__ == "__main__":
    print(json.dumps(check(int(sys.argv[1]), int(sys.argv[2]), relu="--relu" in sys.argv)))
