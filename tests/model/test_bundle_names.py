"""Names a model bundle holds are printed into fixes, code a user pastes and runs: module
paths, class and function names only (model/names.py). A crafted bundle put
"bn\\nimport os; os.system(...)" into QCD064's printed fix, and a kind with a newline into
QCD065's; each is refused on reading now, in one line."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from qconvdiag.errors import QconvdiagError  # noqa: E402
from qconvdiag.model.names import is_kind, is_op_name, is_path  # noqa: E402

EVIL = "bn\nimport os; os.system('echo pwned')\n#"


@pytest.fixture(scope="module")
def healthy():  # noqa: ANN201
    import warnings

    import qconvdiag
    from tests import models

    f, q = models.eager("x86")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qconvdiag.capture_model(f, q, models.inputs(2, 8, 7))


def test_names_are_module_paths_kinds_or_calls():
    assert is_path("features.3.conv") and is_path("") and is_path("layer-1.0")
    assert not is_path(EVIL) and not is_path("a'b") and not is_path("a..b")
    assert is_kind("ReLU6") and not is_kind("ReLU6()\nimport os")
    assert is_op_name("the relu6 call after features.3") and is_op_name("add")
    assert not is_op_name("the relu6 call after x\nimport os")


def _with(meta: dict, healthy_bundle):  # noqa: ANN001, ANN202
    from qconvdiag.io import BUNDLE_KEY
    from qconvdiag.model.bundle import bundle_from_mapping, bundle_to_mapping

    mapping = bundle_to_mapping(healthy_bundle)
    mapping[BUNDLE_KEY] = {**mapping[BUNDLE_KEY], **meta}
    return bundle_from_mapping(mapping, "b.npz")


REUSED = {"name": "relu", "kind": "ReLU", "convs": ["conv"], "other_calls": 0, "lost": [],
          "lost_other": 0, "misfused": ["conv"], "across": ["bn"]}
OP = {"name": "act", "kind": "ReLU6", "scale": 0.1, "zero_point": 0, "dtype": "quint8",
      "float_range": [0, 0], "after": ["c1"], "sampled": True, "tensor_qparams": False}


@pytest.mark.parametrize("meta", [
    {"reused": [{**REUSED, "across": [EVIL]}]},
    {"reused": [{**REUSED, "name": EVIL}]},
    {"reused": [{**REUSED, "kind": "ReLU()\nimport os"}]},
    {"ops": [{**OP, "name": EVIL}]},
    {"ops": [{**OP, "kind": "ReLU6\nimport os"}]},
    {"ops": [{**OP, "wrong": {"kind": "ReLU6\nimport os", "outputs_off": 3, "total": 10,
                              "max_steps": 4.0, "contiguous_ok": True,
                              "channels_last": True}}]},
    {"stale": [{"layer": EVIL, "differ": 1, "total": 2}]},
    {"lost_after": {"last_conv": EVIL, "last_conv_sqnr_db": 1.0, "output_sqnr_db": 0.0,
                    "after": []}},
    {"lost_after": {"last_conv": "conv", "last_conv_sqnr_db": 1.0, "output_sqnr_db": 0.0,
                    "after": [], "output": EVIL}},
    {"lost_after": {"last_conv": "conv", "last_conv_sqnr_db": 10 ** 400,
                    "output_sqnr_db": 0.0, "after": []}},
])
def test_a_bundle_with_code_in_its_names_is_refused(meta, healthy):  # noqa: ANN001
    with pytest.raises(QconvdiagError, match="malformed|must hold|capture the model again"):
        _with(meta, healthy)


def test_a_layer_named_with_code_is_refused(healthy):  # noqa: ANN001
    from qconvdiag.io import BUNDLE_KEY
    from qconvdiag.model.bundle import bundle_from_mapping, bundle_to_mapping

    mapping = bundle_to_mapping(healthy)
    meta = mapping[BUNDLE_KEY]
    meta["layers"][0] = {**meta["layers"][0], "name": EVIL}
    with pytest.raises(QconvdiagError, match="has no name"):
        bundle_from_mapping(mapping, "b.npz")


@pytest.mark.parametrize("kept", [
    {"name": EVIL, "gain": [1.0] * 8, "shift": [0.0] * 8, "activation": ""},
    {"name": "bn1", "gain": [1.0] * 8, "shift": [0.0] * 8, "activation": EVIL},
    {"name": "bn1", "gain": [1.0] * 7, "shift": [0.0] * 8, "activation": ""},
    {"name": "bn1", "gain": [float("nan")] * 8, "shift": [0.0] * 8, "activation": ""},
    {"name": "bn1", "gain": [1.0] * 8, "shift": [0.0] * 8, "activation": None},
    {"name": "bn1", "gain": "12345678", "shift": [0.0] * 8, "activation": ""},
])
def test_a_kept_batchnorm_with_code_or_bad_numbers_is_refused(kept, healthy):  # noqa: ANN001
    """QCD072's fix prints the kept BatchNorm's and its ReLU's names."""
    from qconvdiag.io import BUNDLE_KEY
    from qconvdiag.model.bundle import bundle_from_mapping, bundle_to_mapping

    mapping = bundle_to_mapping(healthy)
    meta = mapping[BUNDLE_KEY]
    meta["layers"][0] = {**meta["layers"][0], "bn_kept": kept}
    with pytest.raises(QconvdiagError, match="'bn_kept' is malformed"):
        bundle_from_mapping(mapping, "b.npz")


@pytest.mark.parametrize("edit", [
    lambda layer: layer.__setitem__("bn_folded_stats", [1, 2]),
    lambda layer: layer.__setitem__("bn_folded_stats", {"eps": 10 ** 400, "running_var": [1.0]}),
    lambda layer: layer.__setitem__("bn_folded_stats", {"eps": -1.0, "running_var": [1.0]}),
    lambda layer: layer.__setitem__("calibration_range", [0, 10 ** 400]),
])
def test_malformed_layer_records_are_refused_in_one_line(edit, healthy):  # noqa: ANN001
    """helper-52: an integer beyond float's range gave 'internal error: OverflowError'."""
    from qconvdiag.io import BUNDLE_KEY
    from qconvdiag.model.bundle import bundle_from_mapping, bundle_to_mapping

    mapping = bundle_to_mapping(healthy)
    layer = mapping[BUNDLE_KEY]["layers"][0]
    layer["bn_folded"] = layer.get("bn_folded") or "bn1"
    edit(layer)
    with pytest.raises(QconvdiagError, match="malformed|must be"):
        bundle_from_mapping(mapping, "b.npz")


def test_a_batchnorm_with_eps_0_is_kept_and_read_back(healthy):  # noqa: ANN001
    """helper-52: a BatchNorm2d(eps=0.0), captured and saved, made the bundle unreadable."""
    import dataclasses

    from qconvdiag.case import FoldedBatchNorm
    from qconvdiag.model.bundle import bundle_from_mapping, bundle_to_mapping

    lay = healthy.layers[0]
    stats = FoldedBatchNorm("bn1", 0.0, (1.0,) * lay.case.weight.shape[0])
    bundle = dataclasses.replace(healthy, layers=(dataclasses.replace(
        lay, bn_folded="bn1", case=dataclasses.replace(lay.case, folded_bn=stats)),
        *healthy.layers[1:]))
    assert bundle_from_mapping(bundle_to_mapping(bundle), "b.npz").layers[0].case.folded_bn \
        == stats
