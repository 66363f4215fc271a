"""The preprocessing contract: round trip, validation that names every problem, reading from models."""

import dataclasses

import pytest

from covidct.engine.contract import Contract, ContractError, read_contract
from tests.conftest import tiny_model

GOOD = dict(image_size=(256, 256), class_names=("non-COVID", "COVID"), positive_class="COVID", threshold=0.4)


def test_round_trip():
    c = Contract(**GOOD, metrics={"roc_auc": 0.9}, source_sha256="ab" * 32, project_version="1.2.3")
    assert Contract.from_json(c.to_json()) == c


def test_every_problem_is_listed_at_once():
    with pytest.raises(ContractError) as e:
        Contract(image_size=(0, 256), class_names=("a", "a"), positive_class="b", threshold=1.5,
                 interpolation="bogus", window={"level": 0, "width": -1})
    msg = str(e.value)
    for word in ("image_size", "class_names", "threshold", "interpolation", "window"):
        assert word in msg


@pytest.mark.parametrize("text,fragment", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "must be an object"),
    ('{"image_size": [256, 256]}', "lacks required keys"),
    ('{"image_size": [256, 256], "class_names": ["a", "b"], "positive_class": "b", "threshold": 0.5, "x": 1}',
     "unknown keys"),
    ('{"image_size": [256, 256], "class_names": ["a", "b"], "positive_class": "a", "threshold": 0.5}',
     "positive_class"),
])
def test_bad_json(text, fragment):
    with pytest.raises(ContractError, match=fragment):
        Contract.from_json(text)


def test_read_contract_from_model(tmp_path):
    c = Contract(**{**GOOD, "image_size": (32, 32)})
    assert read_contract(tiny_model(tmp_path / "m.onnx", (32, 32), contract=c)) == c


def test_model_without_contract_or_not_a_model(tmp_path):
    with pytest.raises(ContractError, match="no 'covidct_contract'"):
        read_contract(tiny_model(tmp_path / "bare.onnx", with_contract=False))
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"definitely not protobuf")
    with pytest.raises(ContractError, match="not a loadable ONNX model"):
        read_contract(junk)


def test_frozen():
    c = Contract(**GOOD)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.threshold = 0.9
