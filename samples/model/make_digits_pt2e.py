"""The PT2E model sample: the digits CNN of make_digits.py (the same training), quantized with
torchao's PT2E flow instead of torch.ao's eager one: ``torch.export`` (strict), ``prepare_pt2e``
with ``X86InductorQuantizer``'s default config, calibration, ``convert_pt2e``. Writes
``samples/model/digits_pt2e.pt``, a model bundle whose convs run on engine x86_inductor (the
oneDNN kernels ``torch.compile`` with freezing lowers them to)::

    .venv/bin/python samples/model/make_digits_pt2e.py   # the 'samples' and 'pt2e' extras
    .venv/bin/qconvdiag explain samples/model/digits_pt2e.pt

Deterministic: the same bytes on every run (one thread, fixed seeds).
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
#: torch.export fixes the batch size it saw: the model is exported, calibrated and captured on
#: batches of this many images.
BATCH = 64


def digits_script() -> ModuleType:
    """make_digits.py beside this script (its data, model and training)."""
    spec = importlib.util.spec_from_file_location("make_digits", HERE / "make_digits.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quantize_pt2e(net: Any, calibration: list[Any]) -> Any:
    """torchao's PT2E flow, as its x86 inductor tutorial does it."""
    import torch

    from qconvdiag.torchao_import import require_torchao

    require_torchao("the PT2E sample")
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    exported = torch.export.export(copy.deepcopy(net), (calibration[0],), strict=True).module()
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for batch in calibration:
            prepared(batch)
    return convert_pt2e(prepared)


def batches(x: Any) -> list[Any]:
    return [x[i:i + BATCH] for i in range(0, len(x) - BATCH + 1, BATCH)]


def build(trained: Any = None) -> tuple[Any, Any, list[Any], list[Any], float, float]:
    """The float model (``trained``, or make_digits.py's training), its PT2E twin, the
    calibration and test batches, and the float and quantized test accuracies (on the whole
    batches of the test set)."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    digits = digits_script()
    x_train, y_train, x_test, y_test = digits.digits()
    net = trained if trained is not None else digits.train(digits.model(), x_train, y_train)
    calibration = batches(x_train[:3 * BATCH])
    converted = quantize_pt2e(net, calibration)
    test = batches(x_test)
    labels = torch.cat(batches(y_test))
    with torch.no_grad():
        acc_f = float((torch.cat([net(b) for b in test]).argmax(1) == labels).float().mean())
        acc_q = float((torch.cat([converted(b) for b in test]).argmax(1) == labels)
                      .float().mean())
    return net, converted, calibration, test, acc_f, acc_q


def main(trained: Any = None) -> None:
    import warnings

    import qconvdiag

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net, converted, calibration, test, acc_f, acc_q = build(trained)
        path = HERE / "digits_pt2e.pt"
        qconvdiag.capture_model(net, converted, test[:1], path, calibration=calibration)
    print(f"wrote {path}: test accuracy {acc_f:.3f} float, {acc_q:.3f} quantized (PT2E)")


if __name__ == "__main__":
    main()
