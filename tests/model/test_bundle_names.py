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
